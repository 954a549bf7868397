"""``train-dit`` on tiny configs: flow-matching training, sampling, resume, Muon, DDP, bad configs.

Latents come from a 2-step tiny tokenizer (synthetic data). Runs use the eager reference ops
(TRITON_INTERPRET=0) except the fused-module run, which interprets the Triton kernels.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vefast.cli import main as cli
from vefast.recipes.checkpoint import load_checkpoint
from vefast.recipes.config import ConfigError, load_config
from vefast.recipes.dit import DiTConfig, build_dit, enable_grad_checkpointing, muon_param_split, sample_ode, train
from vefast.recipes.metrics import read_jsonl
from vefast.recipes.tokenizer import TokenizerConfig
from vefast.recipes.tokenizer import train as train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


from helpers import needs_interpreter  # noqa: E402

# Import the Triton ops now, while the lane's TRITON_INTERPRET=1 is set, so their kernels are interpreted
# kernels even when an eager run below imports them first.
import vefast.nn.patch  # noqa: F401,E402
import vefast.ops.norm_modulate  # noqa: F401,E402
import vefast.ops.gated_residual  # noqa: F401,E402
import vefast.ops.swiglu  # noqa: F401,E402
import vefast.ops.reparam  # noqa: F401,E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def latents(tmp_path_factory, eager):
    base = tmp_path_factory.mktemp("dit")
    cfg = load_config(TokenizerConfig, "tokenizer_tiny.yaml",
                      ["loss.align=none", "loss.lpips_weight=0", "loss.gan_weight=0", "train.steps=2",
                       "train.stats_images=8", "train.val_images=4"])
    assert train_tokenizer(cfg, out=base / "tok", synthetic=16, progress=False) == 0
    assert cli(["extract-latents", "--tokenizer", str(base / "tok"), "--synthetic", "32", "--out", str(base / "lat"),
                "--flip", "--batch-size", "16", "--num-workers", "0", "--device", "cpu"]) == 0
    return base / "lat"


def _train(latents, out, overrides=(), **kw):
    cfg = load_config(DiTConfig, "dit_tiny.yaml", ["model.fused=false", *overrides])
    return train(cfg, latents=latents, out=out, progress=False, **kw)


def _losses(out):
    return [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]


def test_dit_trains_and_samples(latents, tmp_path):
    out = tmp_path / "run"
    assert _train(latents, out, ["train.steps=120", "optim.lr=3e-3", "train.batch_size=16", "train.flip=true",
                                 "train.ckpt_every=120"]) == 0
    losses = _losses(out)
    assert len(losses) == 120
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < 0.9 * first, (first, last)
    png = out / "samples" / "step-00000120.png"
    assert png.is_file()
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (64, 64)  # 4 samples of 32 px in a 2 x 2 grid
    ckpt = load_checkpoint(out)
    assert ckpt.meta["kind"] == "dit" and {"model", "ema", "opt0"} <= {p.stem for p in ckpt.path.glob("*.safetensors")}


def test_dit_resume_is_bitwise(latents, tmp_path, eager):
    over = ["train.ckpt_every=3", "sample.num_images=1", "sample.steps=1", "transport.timesteps=logit_normal"]
    assert _train(latents, tmp_path / "full", over + ["train.steps=6"]) == 0
    assert _train(latents, tmp_path / "part", over + ["train.steps=3"]) == 0
    assert _train(latents, tmp_path / "part", over + ["train.steps=6"], resume=True) == 0
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    assert a.step == b.step == 6
    for name in ("model", "ema", "opt0"):
        ta, tb = a.tensors(name), b.tensors(name)
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (name, k)
    assert _losses(tmp_path / "full")[3:] == _losses(tmp_path / "part")[3:]
    with pytest.raises(ConfigError, match=r"config keys \['optim.lr'\] differ"):
        _train(latents, tmp_path / "part", over + ["train.steps=8", "optim.lr=0.5"], resume=True)


def test_dit_muon_and_vr_timesteps(latents, tmp_path, eager):
    out = tmp_path / "muon"
    assert _train(latents, out, ["optim.name=muon", "train.steps=3", "transport.timesteps=vr", "transport.vr_num_data=16",
                                 "transport.vr_num_noise=16", "transport.vr_num_t=64", "sample.steps=1",
                                 "sample.num_images=1"]) == 0
    ckpt = load_checkpoint(out)
    assert {"opt0", "opt1"} <= {p.stem for p in ckpt.path.glob("*.safetensors")}
    cfg = load_config(DiTConfig, "dit_tiny.yaml", ["model.fused=false"])
    model, _ = build_dit(cfg, (4, 4, 4))
    muon, rest = muon_param_split(model)
    assert muon and all(p.ndim == 2 for p in muon)
    assert {id(p) for p in muon}.isdisjoint(id(p) for p in rest)
    assert len(muon) + len(rest) == len([p for p in model.parameters() if p.requires_grad])


def test_grad_checkpointing_matches(eager):
    cfg = load_config(DiTConfig, "dit_tiny.yaml", ["model.fused=false", "transport.label_dropout=0"])
    torch.manual_seed(0)
    a, _ = build_dit(cfg, (4, 4, 4))
    b = enable_grad_checkpointing(copy.deepcopy(a))
    assert a.state_dict().keys() == b.state_dict().keys()
    x, t, y = torch.randn(3, 4, 4, 4), torch.rand(3), torch.tensor([0, 1, 2])
    for m in (a, b):
        m.train()
        m(x, t, y).square().mean().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), n


class _ConstVelocity(torch.nn.Module):
    """v(x, t, y) = y + 1 per sample (null class num_classes -> v = 0)."""

    def __init__(self, num_classes):
        super().__init__()
        self.n = num_classes
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append(float(t[0]))
        v = torch.where(y == self.n, torch.zeros_like(y), y + 1).float()
        return v.view(-1, 1, 1, 1).expand_as(x).clone()


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_sample_ode_cfg_interval(sampler):
    noise = torch.zeros(2, 1, 2, 2)
    y = torch.tensor([0, 2])
    m = _ConstVelocity(num_classes=3)
    out = sample_ode(m, noise, y, num_classes=3, steps=4, sampler=sampler)
    assert torch.allclose(out[:, 0, 0, 0], torch.tensor([1.0, 3.0]))  # integral of a constant field
    # guidance scale 2 only on the second half: v = 2 (y + 1) there, y + 1 elsewhere -> 1.5 (y + 1)
    out = sample_ode(m, noise, y, num_classes=3, steps=4, sampler=sampler, cfg_scale=2.0, cfg_interval=(0.5, 1.0))
    expect = torch.tensor([1.0, 3.0]) * (1.5 if sampler == "euler" else 1.625)
    assert torch.allclose(out[:, 0, 0, 0], expect), out[:, 0, 0, 0]
    with pytest.raises(ValueError, match="sampler"):
        sample_ode(m, noise, y, num_classes=3, sampler="rk4")


@needs_interpreter
def test_dit_fused_modules_interpreted(latents, tmp_path, monkeypatch):
    pytest.importorskip("vefast.ops.attention")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = load_config(DiTConfig, "dit_tiny.yaml", ["train.steps=2", "sample.steps=1", "sample.num_images=1"])
    assert cfg.model.fused
    assert train(cfg, latents=latents, out=tmp_path / "fused", progress=False) == 0
    assert all(torch.isfinite(torch.tensor(v)) for v in _losses(tmp_path / "fused"))


def test_dit_two_process_gloo_ddp(latents, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "vefast.cli", "train-dit", "--config", "dit_tiny.yaml", "--latents", str(latents), "--out", str(out),
           "--no-fused", "--no-progress", "--set", "train.steps=4", "--set", "train.ckpt_every=2",
           "--set", "train.batch_size=4", "--set", "sample.steps=1", "--set", "sample.num_images=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(out / "metrics.jsonl")
    div = [r["replica_max_abs_diff"] for r in rows if "replica_max_abs_diff" in r]
    assert div == [0.0, 0.0]  # replicas identical at both checkpoints
    ckpt = load_checkpoint(out)
    assert ckpt.step == 4 and ckpt.meta["world_size"] == 2


def test_dit_bad_inputs_fail_at_start(latents, tmp_path, capsys, eager):
    bad = tmp_path / "bad_latents"
    bad.mkdir()
    for f in latents.glob("shard-*"):
        (bad / f.name).write_bytes(f.read_bytes())
    assert cli(["train-dit", "--config", "dit_tiny.yaml", "--latents", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "no stats.json" in capsys.readouterr().err
    assert cli(["train-dit", "--config", "dit_tiny.yaml", "--latents", str(latents), "--out", str(tmp_path / "r"),
                "--set", "optim.lr=fast"]) == 2
    assert "'optim.lr': expected float, got 'fast'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="model.name 'DiT-Z/9' is not a known model"):
        _train(latents, tmp_path / "r", ["model.name=DiT-Z/9"])
    with pytest.raises(ConfigError, match="has no DINOv2 features"):
        _train(latents, tmp_path / "r", ["repa.weight=0.5"])
    with pytest.raises(ConfigError, match="sample.fid_images > 0 needs"):
        _train(latents, tmp_path / "r", ["sample.fid_images=10"])
    with pytest.raises(ConfigError, match="bad model.kwargs"):
        _train(latents, tmp_path / "r", ["model.kwargs={depth: 2, hidden_size: 64, num_heads: 2, bogus: 1}"])
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        _train(latents, tmp_path / "r", resume=True)
    info = json.loads((latents / "info.json").read_text())
    assert Path(info["tokenizer"]).is_dir()
    assert not (tmp_path / "r").exists()


def test_dit_repa_with_stored_features(latents, tmp_path, eager):
    lat = tmp_path / "lat_repa"
    assert cli(["extract-latents", "--tokenizer", str(latents.parent / "tok"), "--synthetic", "16", "--out", str(lat),
                "--repa-dinov2", "vit_small_patch14_dinov2.lvd142m", "--repa-random-init", "--num-workers", "0",
                "--device", "cpu"]) == 0
    info = json.loads((lat / "info.json").read_text())
    assert info["repa_feature_dim"] == 384 and info["repa_grid"] == 4
    out = tmp_path / "repa"
    assert _train(lat, out, ["train.steps=4", "repa.weight=0.5", "repa.encoder_depth=1", "repa.proj_dim=32",
                             "optim.lr=3e-3", "sample.steps=1", "sample.num_images=1"]) == 0
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "repa_loss" in r]
    assert len(rows) == 4 and rows[-1]["repa_loss"] < rows[0]["repa_loss"]
    assert all(abs(r["loss"] - r["fm_loss"] - 0.5 * r["repa_loss"]) < 1e-5 for r in rows)
    assert "projector" in {p.stem for p in load_checkpoint(out).path.glob("*.safetensors")}
