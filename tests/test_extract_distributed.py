"""``extract-latents`` on several ranks (2-process gloo through torchrun, as in test_recipes_dit's DDP
test): the shards are cut by global index, so 2 ranks write bitwise the same files, statistics and
info as 1 rank; ``--resume`` keeps finished shards (marker + SHA-256) and redoes missing, corrupted or
half-written ones; mismatched settings and existing extractions are refused; ``--no-progress`` prints
a status line. The encoder runs its eager reference path (TRITON_INTERPRET=0), one thread."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import launch_report, train_tiny_tokenizer
import torch
from safetensors.torch import load_file

from vefast.cli import main as cli
from vefast.recipes import shards as sh
from vefast.recipes.data import LatentShardDataset

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.expect_fallback("*:cpu")]
ARGS = ["--synthetic", "20", "--flip", "--batch-size", "4", "--shard-size", "6", "--num-workers", "0",
        "--device", "cpu", "--no-progress"]
ENV = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def tok(tmp_path_factory, eager):
    base = tmp_path_factory.mktemp("extract")
    train_tiny_tokenizer(base / "tok")
    return base / "tok"


def _run(tok: Path, out: Path, nproc: int, extra=()) -> subprocess.CompletedProcess:
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launch, "-m", "vefast.cli", "extract-latents", "--tokenizer", str(tok),
           "--out", str(out), *ARGS, *extra]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240, cwd=out.parent)


def _contents(out: Path) -> dict:
    files = sorted(out.glob("shard-*.safetensors"))
    return {f.name: load_file(str(f)) for f in files}


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert sorted(a[name]) == sorted(b[name]), name
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)


@pytest.fixture(scope="module")
def runs(tok):
    one, two = tok.parent / "one", tok.parent / "two"
    p1 = _run(tok, one, 1)
    assert p1.returncode == 0, launch_report(p1)
    p2 = _run(tok, two, 2)
    assert p2.returncode == 0, launch_report(p2)
    return one, two, p1, p2


def test_two_ranks_write_the_same_shards_and_stats_as_one(runs):
    one, two, p1, _ = runs
    a, b = _contents(one), _contents(two)
    assert list(a) == [f"shard-{k:05d}.safetensors" for k in range(4)]  # 20 items in shards of 6
    _same(a, b)
    z = torch.cat([t["latents"] for t in a.values()])
    assert z.shape == (20, 4, 4, 4) and torch.cat([t["labels"] for t in a.values()]).tolist() == [i % 4 for i in range(20)]
    assert not torch.equal(z, torch.cat([t["latents_flip"] for t in a.values()]))
    assert (one / "stats.json").read_text() == (two / "stats.json").read_text()
    info1, info2 = json.loads((one / "info.json").read_text()), json.loads((two / "info.json").read_text())
    assert info1.pop("world_size") == 1 and info2.pop("world_size") == 2 and info1 == info2
    # the merged statistics are those of every latent, flipped ones included
    stats = json.loads((one / "stats.json").read_text())
    both = torch.cat([z, torch.cat([t["latents_flip"] for t in a.values()])]).double()
    torch.testing.assert_close(torch.tensor(stats["mean"], dtype=torch.float64), both.mean((0, 2, 3)), rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.tensor(stats["std"], dtype=torch.float64), both.std((0, 2, 3), unbiased=False),
                               rtol=0, atol=1e-12)
    assert stats["count"] == 40 * 4 * 4
    ds = LatentShardDataset(one, flip=True)
    assert len(ds) == 40
    torch.testing.assert_close(ds[3][0] * ds.std + ds.mean, z[3])
    assert "extract-latents: 40/40 img (100.0%)" in p1.stderr and "ETA" in p1.stderr


def test_resume_redoes_only_unfinished_shards(runs, tok, capsys):
    one, two, _, _ = runs
    work = tok.parent / "resume"
    shutil.copytree(two, work)
    for f in ("stats.json", "info.json"):
        (work / f).unlink()
    (work / "shard-00001.safetensors").unlink()                               # a shard never written
    raw = bytearray((work / "shard-00002.safetensors").read_bytes())          # a corrupted one (same size)
    raw[-5] ^= 0xFF
    (work / "shard-00002.safetensors").write_bytes(bytes(raw))
    (work / "shard-00003.done.json").unlink()                                 # written, marker missing
    (work / ".shard-00000.safetensors.999.tmp").write_bytes(b"half")          # a killed writer's temporary
    kept = (work / "shard-00000.safetensors").stat().st_mtime_ns
    assert cli(["extract-latents", "--tokenizer", str(tok), "--out", str(work), *ARGS, "--resume"]) == 0
    assert "rank 0 keeps 1 of its 4 shards" in capsys.readouterr().err
    assert (work / "shard-00000.safetensors").stat().st_mtime_ns == kept
    assert not list(work.glob(".shard-*.tmp"))
    _same(_contents(work), _contents(one))
    assert (work / "stats.json").read_text() == (one / "stats.json").read_text()
    for shard in sh.plan_shards(20, 6):
        assert sh.finished(work, shard, json.loads((work / "extract.json").read_text())["fingerprint"])


def test_refuses_to_mix_extractions(runs, tok, capsys):
    one = runs[0]
    assert cli(["extract-latents", "--tokenizer", str(tok), "--out", str(one), *ARGS]) == 2
    assert "already holds an extraction; pass --resume" in capsys.readouterr().err
    assert cli(["extract-latents", "--tokenizer", str(tok), "--out", str(one), *ARGS, "--resume", "--seed", "1"]) == 2
    assert "settings ['seed'] differ" in capsys.readouterr().err


def test_shard_plan_is_rank_count_independent():
    plan = sh.plan_shards(20, 6)
    assert [(s.start, s.stop) for s in plan] == [(0, 6), (6, 12), (12, 18), (18, 20)]
    for world in (1, 2, 3, 7):
        mine = [sh.rank_shards(plan, r, world) for r in range(world)]
        assert sorted(s.index for m in mine for s in m) == [0, 1, 2, 3]
    assert sh.batches(plan[:2], 4) == [[0, 1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11]]
    with pytest.raises(ValueError, match="shard_size >= 1"):
        sh.plan_shards(5, 0)


def test_tokenizer_validation_writes_a_reconstruction_grid(tok):
    """Issue 13 item 6: inputs above, reconstructions below, at every validation (here: the last step)."""
    from PIL import Image

    png = tok / "samples" / "recon-step-00000002.png"
    with Image.open(png) as im:
        w, h = im.size
    assert h == 2 * 32 and w % 32 == 0 and w >= 32  # one row of 32 px inputs, one of reconstructions
