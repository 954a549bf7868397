"""``vefast vr-table``: Gaussian and file inputs (.npy, .pt, .safetensors), JSON table, plot, errors.
The torch Gram path runs (TRITON_INTERPRET=0), as for a user on a CPU."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vefast import cli
from vefast.sampling import VRTimestepSampler

SMALL = ["--num-data", "24", "--num-noise", "8", "--num-t", "40"]


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def test_gaussian_table_and_plot(tmp_path, capsys):
    out, png = tmp_path / "t.json", tmp_path / "d.png"
    rc = cli.main(["vr-table", "--gaussian", "2,4,4", "--path", "cosine", *SMALL, "--out", str(out),
                   "--plot", str(png), "--seed", "3"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "fitted logit-normal: m =" in text and "density peaks at t =" in text
    raw = json.loads(out.read_text())
    assert raw["path"] == "cosine" and raw["M"] == 24 and raw["K"] == 8 and raw["d"] == 32 and raw["seed"] == 3
    sampler = VRTimestepSampler.load(out)
    assert sampler.num_t == 40 and 0 < sampler.peak < 1
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".safetensors"])
def test_data_files(tmp_path, suffix, capsys):
    x = torch.randn(30, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    f = tmp_path / f"latents{suffix}"
    if suffix == ".npy":
        np.save(f, x.numpy())
    elif suffix == ".pt":
        torch.save({"latents": x}, f)
    else:
        from safetensors.torch import save_file

        save_file({"z": x}, str(f))
    out = tmp_path / "t.json"
    assert cli.main(["vr-table", "--data", str(f), *SMALL, "--out", str(out)]) == 0
    raw = json.loads(out.read_text())
    assert raw["M"] == 24 and raw["d"] == 18
    assert "latents" in capsys.readouterr().out


def test_errors(tmp_path):
    bad = tmp_path / "x.txt"
    bad.write_text("1 2 3")
    with pytest.raises(ValueError, match="must end in .npy, .pt or .safetensors"):
        cli.main(["vr-table", "--data", str(bad), "--out", str(tmp_path / "o.json")])
    with pytest.raises(SystemExit):
        cli.main(["vr-table", "--gaussian", "4,x,4", "--out", str(tmp_path / "o.json")])
    with pytest.raises(SystemExit):  # --data and --gaussian are exclusive
        cli.main(["vr-table", "--gaussian", "4,4,4", "--data", str(bad)])
