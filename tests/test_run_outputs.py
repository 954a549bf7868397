"""What a run shows (issue 13 item 6): progress bars / status lines, ``vefast plot``, sample and
reconstruction grids, no empty metrics rows, optional Weights & Biases. No training here (fast)."""
from __future__ import annotations

import io
import json
import sys
import types

import pytest
import torch
from PIL import Image

from vefast.cli import main as cli
from vefast.recipes import images
from vefast.recipes.metrics import JSONLLogger, read_jsonl
from vefast.recipes.progress import ProgressReporter, format_eta


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_status_lines_without_a_bar():
    """``--no-progress``: a line every ``every_s`` seconds (done/total, img/s, ETA, all-rank estimate) and a
    last one at close; ranks other than 0 print nothing."""
    clock, out = Clock(), io.StringIO()
    p = ProgressReporter(100, desc="sample", bar=False, every_s=10, world_size=2, stream=out, clock=clock)
    for t, n in ((4.0, 20), (8.0, 20), (10.0, 10), (15.0, 10)):
        clock.t = t
        p.update(n)
    lines = out.getvalue().splitlines()
    assert lines == ["sample: 50/100 img (50.0%), 5.0 img/s, ETA 0:00:10 [rank 0 of 2; all ranks ~10.0 img/s]"]
    clock.t = 20.0
    p.update(30)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[1].startswith("sample: 90/100 img (90.0%), 4.5 img/s, ETA 0:00:02")
    assert lines[2].endswith(" done")
    quiet = io.StringIO()
    q = ProgressReporter(10, desc="x", bar=False, enabled=False, stream=quiet, clock=clock)
    q.update(10)
    q.close()
    assert quiet.getvalue() == ""
    assert format_eta(3725) == "1:02:05" and format_eta(float("inf")) == "?"
    with pytest.raises(ValueError, match="status interval"):
        ProgressReporter(1, desc="x", every_s=0)


def test_grid_labels_and_names():
    labels, rows, per_row = images.grid_labels(64, 1000)
    assert rows == list(images.IMAGENET_GRID_CLASSES) and per_row == 8
    assert labels.tolist() == [c for c in rows for _ in range(8)]
    labels, rows, per_row = images.grid_labels(4, 4)
    assert labels.tolist() == [0, 0, 2, 2] and rows == [0, 2] and per_row == 2
    assert images.grid_labels(6, 10, classes=[3])[1] == [3, 3]
    assert images.grid_filename(120, [0, 2]) == "step-00000120-classes-0-2.png"
    with pytest.raises(ValueError, match="outside"):
        images.grid_classes(4, 2, [7])


def test_sample_and_reconstruction_grids(tmp_path):
    x = torch.rand(5, 3, 8, 6) * 2 - 1
    p = images.save_grid(x, tmp_path / "g.png", nrow=2)
    with Image.open(p) as im:
        assert im.size == (12, 24)  # 2 per row, 3 rows
        top_left = im.load()[0, 0]
    assert list(top_left) == images.to_uint8(x)[0, :, 0, 0].tolist()
    r = images.save_reconstruction_grid(x, -x, tmp_path / "r.png", max_images=4)
    with Image.open(r) as im:
        assert im.size == (4 * 6, 2 * 8)  # inputs above, reconstructions below
        px = im.load()
        assert tuple(px[0, 8]) == tuple(images.to_uint8(-x)[0, :, 0, 0].tolist())


def _metrics(path):
    rows = [{"step": s, "time": 0.0, "loss": 1.0 / s, "fm_loss": 0.9 / s, "grad_norm": 2.0, "img_per_s": 100.0 + s}
            for s in range(1, 30)]
    rows += [{"step": 10, "time": 0.0, "val_psnr": 20.0}, {"step": 20, "time": 0.0, "val_psnr": 22.0, "fid": "nan"},
             {"time": 0.0, "note": "no step"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_plot_command(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    _metrics(run / "metrics.jsonl")
    assert cli(["plot", str(run)]) == 0
    png = run / "metrics.png"
    with Image.open(png) as im:
        assert im.size[0] > 500 and im.size[1] > 4 * 250  # 4 panels: losses, img/s, validation, other
    assert "plot written to" in capsys.readouterr().out
    assert cli(["plot", str(run / "metrics.jsonl"), "--out", str(tmp_path / "a.png"), "--keys", "loss,val_psnr"]) == 0
    with Image.open(tmp_path / "a.png") as im:
        assert im.size[1] < 3 * 360  # 2 panels
    assert cli(["plot", str(run), "--keys", "bogus"]) == 2
    assert "no numeric values for ['bogus']" in capsys.readouterr().err
    assert cli(["plot", str(tmp_path / "none")]) == 2


def test_logger_writes_no_empty_rows_and_mirrors_to_wandb(tmp_path, monkeypatch):
    log = JSONLLogger(tmp_path / "m.jsonl")
    log.log(1)           # nothing to log: no row
    log.log(2, **{})
    log.log(3, loss=torch.tensor(0.5))
    assert [r["step"] for r in read_jsonl(tmp_path / "m.jsonl")] == [3]
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ValueError, match="Weights & Biases is not installed.*pip install wandb"):
        JSONLLogger(tmp_path / "w.jsonl", wandb="proj")
    calls = []

    class FakeRun:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(util=types.SimpleNamespace(generate_id=lambda: "abc123"),
                                 init=lambda **k: calls.append(("init", k)) or FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = JSONLLogger(tmp_path / "w.jsonl", wandb="proj", config={"seed": 0})
    log.log(5, loss=1.5, note="text")
    log.close()
    assert calls[0][0] == "init" and calls[0][1]["project"] == "proj" and calls[0][1]["id"] == "abc123"
    assert calls[0][1]["config"] == {"seed": 0} and calls[0][1]["resume"] == "allow"
    assert calls[1] == ("log", {"loss": 1.5}, 5) and calls[2] == ("finish",)
    assert (tmp_path / "wandb_id").read_text().strip() == "abc123"
    off = JSONLLogger(tmp_path / "x.jsonl", wandb="proj", enabled=False)  # other ranks: nothing
    assert off._wandb is None
