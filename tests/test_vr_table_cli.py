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
pytestmark = pytest.mark.expect_fallback("separation_function:cpu")  # the torch path, on purpose


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


def test_mass_per_quarter_starved_warning_and_uniform_floor(tmp_path, capsys):
    """Issue 13 item 7: the report of the mass per quarter of [0, 1]; a starved quarter is warned about
    (Gaussian data with few rows in many dimensions: the posterior collapses, the density sits at small
    t); a uniform floor removes the warning and is stored in the table."""
    out = tmp_path / "t.json"
    args = ["vr-table", "--gaussian", "4,8,8", "--num-data", "24", "--num-noise", "8", "--num-t", "300", "--out", str(out)]
    assert cli.main(args) == 0
    text = capsys.readouterr()
    assert "mass per quarter of t in [0, 1] (uniform: 0.25 each): [0.00, 0.25]" in text.out
    assert "warning: t in [0.75, 1.00] gets" in text.err and "--mix-uniform" in text.err
    raw = json.loads(out.read_text())
    assert raw["snr_points"] == 128 and raw["interp"] == "pchip" and raw["estimator"] == "paper"
    q = VRTimestepSampler.load(out).quarter_mass()
    assert q[3] < 0.01
    assert cli.main(args + ["--mix-uniform", "0.2"]) == 0
    text = capsys.readouterr()
    assert "warning" not in text.err and "uniform floor 0.2" in text.out
    back = VRTimestepSampler.load(out)
    assert back.mix_uniform == 0.2 and min(back.quarter_mass()) >= 0.05 - 1e-12


def test_exact_and_leave_one_out_modes(tmp_path, capsys):
    out = tmp_path / "t.json"
    base = ["vr-table", "--gaussian", "2,3,3", *SMALL, "--out", str(out)]
    assert cli.main(base + ["--num-t", "300", "--exact"]) == 0
    raw = json.loads(out.read_text())
    assert raw["snr_points"] == "exact" and raw["interp"] == "linear" and len(raw["snr"]) == 299
    assert "S at every timestep" in capsys.readouterr().out
    assert cli.main(base + ["--leave-one-out"]) == 0
    assert json.loads(out.read_text())["estimator"] == "leave_one_out"
    assert "leave-one-out (j != i)" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"mix_uniform must lie in \[0, 1\]"):
        cli.main(base + ["--mix-uniform", "2"])
