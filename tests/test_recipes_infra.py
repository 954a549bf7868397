"""Recipe infrastructure: typed configs, checkpoints (safetensors + JSON, atomic), data, metrics."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vefast.recipes import checkpoint as ck
from vefast.recipes.config import CONFIG_DIR, ConfigError, load_config, parse_overrides, resume_mismatch
from vefast.recipes.data import (LatentShardDataset, ImageFolderDataset, StepSampler, SyntheticImageDataset,
                                 read_latent_stats, shard_range)
from vefast.recipes.dit import DiTConfig
from vefast.recipes.metrics import JSONLLogger, lpips_check, psnr, read_jsonl, ssim
from vefast.recipes.tokenizer import TokenizerConfig


# ------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cls = TokenizerConfig if path.name.startswith("tokenizer") else DiTConfig
    cfg = load_config(cls, path.name)
    assert isinstance(cfg, cls)


def test_overrides_nested_and_typed():
    cfg = load_config(TokenizerConfig, "tokenizer_f16d32_ve.yaml",
                      ["train.batch_size=16", "loss.latent=kl", "model.channel_mult=[1, 2, 4]", "train.lr=3e-4"])
    assert cfg.train.batch_size == 16 and cfg.loss.latent == "kl"
    assert cfg.model.channel_mult == (1, 2, 4) and cfg.train.lr == pytest.approx(3e-4)
    cfg = load_config(DiTConfig, "dit_tiny", ["sample.cfg_interval=[0.2, 0.9]", "optim.lr=1"])
    assert cfg.sample.cfg_interval == (0.2, 0.9) and cfg.optim.lr == 1.0  # int accepted for float
    assert parse_overrides(["a.b.c=[1, 2]", "a.d=x"]) == {"a": {"b": {"c": [1, 2]}, "d": "x"}}


@pytest.mark.parametrize("overrides, match", [
    (["train.batchsize=4"], r"unknown config key\(s\) 'train.batchsize'.*valid keys in 'train'"),
    (["nonsense=1"], r"unknown config key\(s\) 'nonsense'"),
    (["train.batch_size=four"], r"'train.batch_size': expected int, got 'four'"),
    (["train.batch_size=2.5"], r"'train.batch_size': expected int"),
    (["train.lr=fast"], r"'train.lr': expected float, got 'fast'"),
    (["loss.lpips_pretrained=1"], r"'loss.lpips_pretrained': expected bool"),
    (["loss.latent=vae"], r"'loss.latent': expected one of \['ve', 'kl'\], got 'vae'"),
    (["train.betas=[0.5]"], r"'train.betas': expected 2 values"),
    (["train.steps=0"], r"train.steps must be > 0"),
    (["model.norm_groups=7"], r"model.norm_groups=7 must divide"),
    (["train.image_size=40"], r"image_size=40 must be a multiple of the downsampling factor 16"),
    (["model=3"], r"'model': expected a mapping"),
    (["train.lr"], r"--set expects key=value"),
])
def test_bad_tokenizer_configs(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TokenizerConfig, "tokenizer_f16d32_ve.yaml", overrides)


@pytest.mark.parametrize("overrides, match", [
    (["transport.timesteps=lognorm"], r"expected one of \['uniform', 'logit_normal', 'vr'\]"),
    (["transport.timesteps=vr", "transport.vr_table=/nonexistent/table.json"], r"transport.vr_table: no such file"),
    (["transport.vr_table=/nonexistent/table.json"], r"vr_table is set but transport.timesteps is 'logit_normal'"),
    (["sample.cfg_interval=[0.9, 0.1]"], r"cfg_interval must satisfy 0 <= lo <= hi <= 1"),
    (["sample.cfg_scale=0.5"], r"cfg_scale must be >= 1"),
    (["optim.name=sgd"], r"'optim.name': expected one of \['adamw', 'muon'\]"),
    (["optim.ema=1.5"], r"optim.ema must be in \[0, 1\)"),
    (["model.kwargs=3"], r"'model.kwargs': expected a mapping"),
])
def test_bad_dit_configs(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(DiTConfig, "lightningdit_b1.yaml", overrides)


def test_missing_config_file_lists_shipped():
    with pytest.raises(ConfigError, match=r"no such file.*tokenizer_f16d32_ve.yaml"):
        load_config(TokenizerConfig, "no_such_config.yaml")


def test_resume_mismatch_ignores_free_keys():
    a = {"seed": 0, "train": {"steps": 10, "lr": 1.0}, "sample": {"steps": 5}}
    b = {"seed": 0, "train": {"steps": 20, "lr": 1.0}, "sample": {"steps": 9}}
    assert resume_mismatch(a, b) == []
    b["train"]["lr"] = 2.0
    assert resume_mismatch(a, b) == ["train.lr"]


# --------------------------------------------------------------------------------- checkpoint

def _trained_adamw(seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.5, 0.9))
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(4, 5)).pow(2).mean().backward()
        opt.step()
    return m, opt


def test_checkpoint_round_trip_is_exact(tmp_path):
    m, opt = _trained_adamw()
    path = ck.save_checkpoint(tmp_path, 3, tensors={"model": m.state_dict()}, states={"opt": opt.state_dict()},
                              meta={"data_position": 3, "config": {"a": [1, 2]}})
    assert path.name == "step-00000003" and (tmp_path / "checkpoints" / "latest").read_text().strip() == path.name
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "opt.safetensors", "state.json"]
    c = ck.load_checkpoint(tmp_path)
    assert c.step == 3 and c.meta["data_position"] == 3
    m2, opt2 = _trained_adamw(seed=1)
    m2.load_state_dict(c.tensors("model"))
    opt2.load_state_dict(c.state("opt"))
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for name, v in s1["state"][k].items():
            assert torch.equal(v, s2["state"][k][name]), (k, name)
    # one more identical step from both
    x = torch.randn(4, 5)
    for mm, oo in ((m, opt), (m2, opt2)):
        oo.zero_grad()
        mm(x).pow(2).mean().backward()
        oo.step()
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_flatten_restores_int_keys_and_tuples():
    obj = {"state": {0: {"step": torch.tensor(3.0)}, 1: {}}, "groups": [{"betas": (0.5, 0.9), "x": None}]}
    tensors: dict = {}
    flat = ck.flatten(obj, tensors, "")
    json.dumps(flat)  # JSON-safe
    back = ck.unflatten(json.loads(json.dumps(flat)), tensors)
    assert set(back["state"]) == {0, 1} and back["groups"][0]["betas"] == (0.5, 0.9)
    assert torch.equal(back["state"][0]["step"], torch.tensor(3.0))
    with pytest.raises(TypeError, match="cannot store a object"):
        ck.flatten({"a": object()}, {}, "")


def test_failed_write_keeps_previous_checkpoint(tmp_path):
    m, opt = _trained_adamw()
    ck.save_checkpoint(tmp_path, 1, tensors={"model": m.state_dict()})
    with pytest.raises(TypeError):
        ck.save_checkpoint(tmp_path, 2, tensors={"model": m.state_dict()}, states={"bad": {"x": object()}})
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001"]  # no temp dir left, latest intact
    assert ck.load_checkpoint(tmp_path).step == 1


def test_keep_prunes_old_checkpoints(tmp_path):
    m, _ = _trained_adamw()
    for s in (1, 2, 3):
        ck.save_checkpoint(tmp_path, s, tensors={"model": m.state_dict()}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000003"]


def test_loading_rejects_non_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint found"):
        ck.load_checkpoint(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="no checkpoint found"):
        ck.load_checkpoint(tmp_path)


# --------------------------------------------------------------------------------------- data

def test_synthetic_is_deterministic_and_class_conditional():
    ds = SyntheticImageDataset(12, 16, num_classes=3, seed=5)
    x, y = ds[4]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 1
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(ds[4][0], SyntheticImageDataset(12, 16, num_classes=3, seed=5)[4][0])
    assert not torch.equal(ds[4][0], SyntheticImageDataset(12, 16, num_classes=3, seed=6)[4][0])
    # same class, different index: different images sharing the class palette
    assert not torch.equal(ds[1][0], ds[4][0])
    with pytest.raises(ValueError, match="at least 1 image"):
        SyntheticImageDataset(0, 16)


def test_step_sampler_shards_and_resumes():
    n, b, world = 23, 3, 2
    s0 = [StepSampler(n, b, seed=1, rank=r, world_size=world) for r in range(world)]
    steps = n // (b * world)
    for step in range(2 * steps):
        parts = [s.batch(step) for s in s0]
        assert all(len(p) == b for p in parts)
        assert not set(parts[0]) & set(parts[1])  # ranks disjoint
    epoch0 = sum((s0[r].batch(k) for k in range(steps) for r in range(world)), [])
    assert len(set(epoch0)) == steps * b * world  # no repeats within an epoch
    resumed = StepSampler(n, b, seed=1, rank=1, world_size=world, start_step=5, stop_step=8)
    assert list(resumed) == [s0[1].batch(k) for k in (5, 6, 7)] and len(resumed) == 3
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepSampler(5, 3, seed=0, world_size=2)


def test_shard_range_covers_everything():
    for n, w in ((10, 3), (2, 4), (7, 1)):
        seen = [i for r in range(w) for i in shard_range(n, r, w)]
        assert seen == list(range(n))


def test_image_folder_resize_center_crop(tmp_path):
    from PIL import Image

    for c, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / c).mkdir()
        arr = np.zeros((40, 60, 3), dtype=np.uint8)
        arr[:] = color
        arr[:, :10] = 255  # left band, cropped away by the center crop
        Image.fromarray(arr).save(tmp_path / c / "a.png")
    ds = ImageFolderDataset(tmp_path, 16)
    assert ds.classes == ["cat", "dog"] and len(ds) == 2
    x, y = ds[1]
    assert x.shape == (3, 16, 16) and y == 1
    assert torch.allclose(x[:, 8, 8], torch.tensor([-1.0, -1.0, 1.0]))
    assert x[0].max() < -0.9  # the white band is outside the center crop
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a directory"):
        ImageFolderDataset(tmp_path / "nope", 16)
    with pytest.raises(ValueError, match="no class sub-directories"):
        ImageFolderDataset(tmp_path / "empty", 16)


def test_latent_shards_normalized_and_stats_required(tmp_path):
    from safetensors.torch import save_file

    z = torch.randn(5, 2, 3, 3) * 2 + 1
    save_file({"latents": z[:3], "labels": torch.arange(3)}, str(tmp_path / "shard-000-00000.safetensors"))
    save_file({"latents": z[3:], "labels": torch.arange(3, 5)}, str(tmp_path / "shard-000-00001.safetensors"))
    with pytest.raises(ValueError, match="no stats.json"):
        LatentShardDataset(tmp_path)
    (tmp_path / "stats.json").write_text(json.dumps({"mean": [1.0, 1.0], "std": [2.0, 2.0]}))
    ds = LatentShardDataset(tmp_path)
    assert len(ds) == 5 and ds.latent_shape == (2, 3, 3)
    x, y = ds[4]
    assert y == 4 and torch.allclose(x, (z[4] - 1) / 2)
    with pytest.raises(ValueError, match="no 'latents_flip'"):
        LatentShardDataset(tmp_path, flip=True)
    (tmp_path / "stats.json").write_text(json.dumps({"mean": [1.0], "std": [2.0]}))
    with pytest.raises(ValueError, match="stats have 1 channels, latents 2"):
        LatentShardDataset(tmp_path)
    (tmp_path / "stats.json").write_text(json.dumps({"mean": [1.0, 1.0], "std": [0.0, 2.0]}))
    with pytest.raises(ValueError, match="non-positive std"):
        read_latent_stats(tmp_path)


# ------------------------------------------------------------------------------------ metrics

def test_psnr_ssim_known_values():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    y = x + 0.2  # 0.1 shift on [0, 1] -> mse 0.01 -> 20 dB (where not clamped)
    xc = x.clamp(-0.9, 0.7)
    assert torch.allclose(psnr(xc, xc + 0.2), torch.full((2,), 20.0), atol=1e-3)
    assert (ssim(x, y) < 1).all() and (ssim(x, -x) < 0.5).all()


def test_lpips_missing_weights_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"LPIPS \(vgg\) needs the torchvision ImageNet backbone weights.*lpips_pretrained=false"):
        lpips_check("vgg", True)
    lpips_check("vgg", False)
    with pytest.raises(ValueError, match="lpips net"):
        lpips_check("resnet", False)


def test_jsonl_logger(tmp_path):
    log = JSONLLogger(tmp_path / "m.jsonl")
    log.log(1, loss=torch.tensor(2.5), n=3, bad=float("nan"))
    log.log(2, loss=1.0)
    rows = read_jsonl(tmp_path / "m.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] == 2.5 and rows[0]["bad"] == "nan"
    JSONLLogger(tmp_path / "off.jsonl", enabled=False).log(1, a=1)
    assert not (tmp_path / "off.jsonl").exists()
