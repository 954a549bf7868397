"""``train-dit`` on tiny configs: flow-matching training, sampling, resume, Muon, DDP, bad configs.

Latents come from a 2-step tiny tokenizer (synthetic data). Runs use the eager reference ops
(TRITON_INTERPRET=0) except the fused-module run, which interprets the Triton kernels.
"""
from __future__ import annotations

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
from vefast.recipes.dit import DiTConfig, build_dit, muon_param_split, sample_ode, train
from vefast.recipes.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


from helpers import launch_report, needs_interpreter, train_tiny_tokenizer  # noqa: E402

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
    train_tiny_tokenizer(base / "tok")
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
    png = out / "samples" / "step-00000120-classes-0-2.png"  # 4 images: 2 rows (classes 0 and 2) of 2
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


@pytest.mark.expect_fallback("*:cpu")
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


def test_grad_checkpointing_is_the_models_use_checkpoint(eager, monkeypatch):
    """model.grad_checkpointing sets the model's own use_checkpoint (one name per layer): every block runs
    under torch.utils.checkpoint while training, and values, gradients and state-dict keys are unchanged."""
    import vefast.models.dit as dit_models

    cfg = load_config(DiTConfig, "dit_tiny.yaml", ["model.fused=false", "transport.label_dropout=0"])
    torch.manual_seed(0)
    a, _ = build_dit(cfg, (4, 4, 4))
    torch.manual_seed(0)
    b, _ = build_dit(load_config(DiTConfig, "dit_tiny.yaml", ["model.fused=false", "transport.label_dropout=0",
                                                              "model.grad_checkpointing=true"]), (4, 4, 4))
    assert not a.use_checkpoint and b.use_checkpoint
    assert a.state_dict().keys() == b.state_dict().keys()
    calls = []
    real = dit_models.checkpoint
    monkeypatch.setattr(dit_models, "checkpoint", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    x, t, y = torch.randn(3, 4, 4, 4), torch.rand(3), torch.tensor([0, 1, 2])
    outs = []
    for m in (a, b):
        m.train()
        out = m(x, t, y)
        out.square().mean().backward()
        outs.append(out)
    assert len(calls) == len(b.blocks)  # b's blocks only, once each
    assert torch.allclose(outs[0], outs[1], rtol=1e-6, atol=1e-7)
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
    assert proc.returncode == 0, launch_report(proc)
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


@pytest.mark.expect_fallback("*:cpu")
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


# ------------------------------------------------------------------------------------------------
# issue 13: accumulation, FSDP2, anchors' checkpoints and latents, start checks; issue 12: run dirs

def _same_tensors(a, b, names, exact=True, atol=0.0):
    for name in names:
        ta, tb = a.tensors(name), b.tensors(name)
        assert ta.keys() == tb.keys(), name
        for k in ta:
            if exact:
                assert torch.equal(ta[k], tb[k]), (name, k)
            else:
                assert torch.allclose(ta[k], tb[k], rtol=1e-5, atol=atol), (name, k, (ta[k] - tb[k]).abs().max())


def _torchrun(spec, tmp_path, timeout=300):
    f = tmp_path / "spec.json"
    f.write_text(json.dumps(spec))
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_runs.py"), str(f)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    assert proc.returncode == 0, launch_report(proc)


@pytest.mark.expect_fallback("*:cpu")
def test_dit_grad_accum_equals_one_larger_pass(latents, tmp_path, eager):
    """train.grad_accum splits each step's batch into micro-batches: the same data, t, noise and label
    drops (drawn for the whole batch), so the run equals grad_accum=1 up to float rounding."""
    over = ["train.steps=3", "train.batch_size=8", "transport.timesteps=logit_normal", "sample.steps=1",
            "sample.num_images=1", "optim.schedule=cosine", "optim.warmup_steps=1"]
    for k in (1, 4):
        assert _train(latents, tmp_path / f"k{k}", over + [f"train.grad_accum={k}"]) == 0
    a, b = load_checkpoint(tmp_path / "k1"), load_checkpoint(tmp_path / "k4")
    _same_tensors(a, b, ("model", "ema"), exact=False, atol=1e-6)
    la, lb = _losses(tmp_path / "k1"), _losses(tmp_path / "k4")
    assert la == pytest.approx(lb, rel=1e-5) and la[0] != la[1]
    with pytest.raises(ConfigError, match="grad_accum=3 must divide train.batch_size=8"):
        load_config(DiTConfig, "dit_tiny.yaml", ["train.batch_size=8", "train.grad_accum=3"])


@pytest.mark.expect_fallback("*:cpu")
def test_dit_fsdp_two_ranks_match_one_process_and_resume_bitwise(latents, tmp_path, eager):
    """train.parallel=fsdp on 2 gloo ranks: the same trajectory as one process with the whole global batch
    (to float rounding: the gradient sums are reduced in another order), full safetensors checkpoints on
    rank 0, and a resumed FSDP run bitwise equal to an uninterrupted one."""
    over = ["model.fused=false", "train.parallel=fsdp", "train.ckpt_every=2", "sample.steps=1", "sample.num_images=1",
            "transport.timesteps=logit_normal", "optim.warmup_steps=1"]
    run = {"recipe": "dit", "config": "dit_tiny.yaml", "latents": str(latents)}
    _torchrun([{**run, "set": over + ["train.batch_size=4", "train.steps=4"], "out": str(tmp_path / "full")},
               {**run, "set": over + ["train.batch_size=4", "train.steps=2"], "out": str(tmp_path / "part")},
               {**run, "set": over + ["train.batch_size=4", "train.steps=4"], "out": str(tmp_path / "part"),
                "resume": True}], tmp_path)
    full, part = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    assert full.step == part.step == 4 and full.meta["parallel"] == "fsdp" and full.meta["world_size"] == 2
    _same_tensors(full, part, ("model", "ema", "opt0"))
    assert [r["step"] for r in read_jsonl(tmp_path / "part" / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    assert _train(latents, tmp_path / "one", over + ["train.batch_size=8", "train.steps=4"]) == 0
    one = load_checkpoint(tmp_path / "one")
    assert one.meta["parallel"] == "ddp"  # a single process has nothing to shard
    _same_tensors(full, one, ("model", "ema"), exact=False, atol=1e-6)
    _same_tensors(full, one, ("opt0",), exact=False, atol=1e-7)  # one optimizer-state layout for both
    with pytest.raises(ConfigError, match="train.parallel=fsdp needs optim.name=adamw"):
        load_config(DiTConfig, "dit_tiny.yaml", ["train.parallel=fsdp", "optim.name=muon"])


@pytest.mark.expect_fallback("*:cpu")
def test_dit_start_checks_classes_and_latent_stats(latents, tmp_path, eager):
    with pytest.raises(ConfigError, match=r"num_classes=5 but the latents .* have 4 classes \(info.json\): "
                                          r"set num_classes=4"):
        _train(latents, tmp_path / "r", ["num_classes=5"])
    other = tmp_path / "other_stats"
    other.mkdir()
    for f in latents.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    stats = json.loads((latents / "stats.json").read_text())
    (other / "stats.json").write_text(json.dumps({**stats, "std": [3 * s for s in stats["std"]]}))
    with pytest.raises(ConfigError, match=r"do not match the statistics of the tokenizer .*\(channel 0: latents"):
        _train(other, tmp_path / "r", ["train.steps=1"])
    assert not (tmp_path / "r").exists()
    assert _train(other, tmp_path / "r", ["train.steps=1", "train.check_latent_stats=false", "sample.steps=1",
                                          "sample.num_images=1"]) == 0
    with pytest.raises(ConfigError, match="are not those .* was trained on"):  # resumed on other latents
        _train(latents, tmp_path / "r", ["train.steps=2", "train.check_latent_stats=false"], resume=True)


def _tiny_dit_state(cfg_over=()):
    cfg = load_config(DiTConfig, "dit_tiny.yaml", ["model.fused=false", *cfg_over])
    torch.manual_seed(123)
    model, _ = build_dit(cfg, (4, 4, 4))
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.expect_fallback("*:cpu")
def test_dit_init_from_released_checkpoints(latents, tmp_path, eager):
    """model.init_from: a bare EMA state dict (DiT / SiT releases) with DDP / compile prefixes, a
    LightningDiT / REPA training dict with argparse args (weights-only load), EMA or model weights, REPA
    projectors ignored or loaded, every key checked; then sampling from it with --sample-only."""
    import argparse

    from vefast.recipes.dit import DiTTrainModule, load_init_weights

    ema = _tiny_dit_state()
    raw = {k: v + 1 for k, v in ema.items()}
    proj = {f"projectors.0.{k}": v for k, v in vefast_nn_projector().state_dict().items()}
    torch.save({f"module._orig_mod.{k}": v for k, v in ema.items()}, tmp_path / "bare.pt")
    torch.save({"model": {**raw, **proj}, "ema": {**ema, **proj}, "opt": {}, "steps": 10,
                "args": argparse.Namespace(model="SiT-XL/2", lr=1e-4)}, tmp_path / "repa_like.pt")

    def fresh(repa=False):
        over = ["model.fused=false"] + (["repa.weight=0.5", "repa.encoder_depth=1", "repa.proj_dim=32"] if repa else [])
        cfg = load_config(DiTConfig, "dit_tiny.yaml", over)
        torch.manual_seed(0)
        model, _ = build_dit(cfg, (4, 4, 4))
        return cfg, DiTTrainModule(model, cfg, 64 if repa else None, 384 if repa else None)

    for file, weights, want in (("bare.pt", "ema", ema), ("repa_like.pt", "ema", ema), ("repa_like.pt", "model", raw)):
        cfg, module = fresh()
        cfg.model.init_from, cfg.model.init_weights = str(tmp_path / file), weights
        report = load_init_weights(module, cfg)
        assert all(torch.equal(module.model.state_dict()[k], want[k]) for k in want), (file, weights)
        assert ("ignored 6 REPA projector tensors" in report) == (file == "repa_like.pt"), report
    cfg, module = fresh(repa=True)
    cfg.model.init_from = str(tmp_path / "repa_like.pt")
    assert "REPA projector too" in load_init_weights(module, cfg)
    assert all(torch.equal(module.projector.state_dict()[k[13:]], v) for k, v in proj.items())
    # a checkpoint of another model: every problem named at once, nothing loaded
    big = _tiny_dit_state(["model.kwargs={hidden_size: 64, depth: 3, num_heads: 2, patch_size: 1}"])
    torch.save({"ema": {k: v for k, v in big.items() if not k.startswith("final_layer.linear")}}, tmp_path / "other.pt")
    cfg, module = fresh()
    cfg.model.init_from = str(tmp_path / "other.pt")
    with pytest.raises(ConfigError, match=r"does not fit LightningDiT: missing \(2\): final_layer.linear.bias, "
                                          r"final_layer.linear.weight; unexpected \(\d+\): blocks.2"):
        load_init_weights(module, cfg)
    cfg.model.init_weights = "model"
    with pytest.raises(ConfigError, match=r"no 'model' state dict in the checkpoint \(top-level keys: \['ema'\]"):
        load_init_weights(module, cfg)

    torch.save({"ema": ema, "obj": _NotWeights()}, tmp_path / "pickled.pt")
    cfg.model.init_from, cfg.model.init_weights = str(tmp_path / "pickled.pt"), "ema"
    with pytest.raises(ConfigError, match=r"is not loadable as weights \(torch.load\(weights_only=True\)"):
        load_init_weights(module, cfg)
    # sampling straight from a released checkpoint
    out = tmp_path / "sampled"
    assert cli(["train-dit", "--config", "dit_tiny.yaml", "--latents", str(latents), "--out", str(out), "--no-fused",
                "--sample-only", "--no-progress", "--set", f"model.init_from={tmp_path / 'bare.pt'}",
                "--set", "sample.steps=1", "--set", "sample.num_images=1"]) == 0
    assert list((out / "samples").glob("step-00000000*.png")) and not (out / "checkpoints").exists()


class _NotWeights:
    """An arbitrary pickled object: torch.load(weights_only=True) refuses it."""


def vefast_nn_projector():
    from vefast.nn import REPAProjector

    torch.manual_seed(5)
    return REPAProjector(64, 384, proj_dim=32)


@pytest.mark.expect_fallback("*:cpu")
def test_dit_reads_lightningdit_latents(latents, tmp_path, eager):
    """A LightningDiT extract_features.py directory (*.safetensors with latents / latents_flip / labels,
    latents_stats.pt with (1, C, 1, 1) mean / std, no info.json) trains as it is."""
    from vefast.recipes.data import LatentShardDataset

    ld = tmp_path / "ldit"
    ld.mkdir()
    for i, f in enumerate(sorted(latents.glob("shard-*.safetensors"))):
        (ld / f"latents_rank00_shard{i:03d}.safetensors").write_bytes(f.read_bytes())
    stats = json.loads((latents / "stats.json").read_text())
    torch.save({k: torch.tensor(stats[k]).view(1, -1, 1, 1) for k in ("mean", "std")}, ld / "latents_stats.pt")
    ours, theirs = LatentShardDataset(latents, flip=True), LatentShardDataset(ld, flip=True)
    assert theirs.stats["source"] == "latents_stats.pt" and len(ours) == len(theirs)
    for i in (0, 5, len(ours) - 1):
        assert torch.allclose(ours[i][0], theirs[i][0], atol=1e-6) and ours[i][1] == theirs[i][1]
    with pytest.raises(ConfigError, match="sampling needs the tokenizer"):
        _train(ld, tmp_path / "r", ["train.steps=1"])
    assert _train(ld, tmp_path / "r", ["train.steps=2", "train.flip=true", f"sample.tokenizer={latents.parent / 'tok'}",
                                       "sample.steps=1", "sample.num_images=1"]) == 0


@pytest.mark.expect_fallback("*:cpu")
def test_dit_rerun_needs_resume_or_overwrite_and_device_flag(latents, tmp_path, capsys, eager):
    args = ["train-dit", "--config", "dit_tiny.yaml", "--latents", str(latents), "--out", str(tmp_path / "r"),
            "--no-fused", "--no-progress", "--device", "cpu", "--set", "train.steps=1", "--set", "sample.steps=1",
            "--set", "sample.num_images=1"]
    assert cli(args + ["--set", "train.device=cuda"]) == 0  # --device wins over the config
    assert load_config(DiTConfig, str(tmp_path / "r" / "config.yaml")).train.device == "cpu"
    capsys.readouterr()
    assert cli(args) == 2
    assert "already holds a run (checkpoints, metrics.jsonl, config.yaml); continue it with --resume" \
        in capsys.readouterr().err
    assert cli(args + ["--resume", "--overwrite"]) == 2
    assert "--resume and --overwrite contradict" in capsys.readouterr().err
    (tmp_path / "r" / "notes.txt").write_text("mine")
    assert cli(args + ["--overwrite", "--set", "train.steps=2"]) == 0
    assert [r["step"] for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if "loss" in r] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").glob("step-*")) == ["step-00000002"]
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"  # only what the recipe writes goes
