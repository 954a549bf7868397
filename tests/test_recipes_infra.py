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
                      ["train.batch_size=16", "loss.latent=kl", "model.channel_mult=[1, 2, 4]", "optim.lr=3e-4"])
    assert cfg.train.batch_size == 16 and cfg.loss.latent == "kl"
    assert cfg.model.channel_mult == (1, 2, 4) and cfg.optim.lr == pytest.approx(3e-4)
    cfg = load_config(DiTConfig, "dit_tiny", ["sample.cfg_interval=[0.2, 0.9]", "optim.lr=1"])
    assert cfg.sample.cfg_interval == (0.2, 0.9) and cfg.optim.lr == 1.0  # int accepted for float
    assert parse_overrides(["a.b.c=[1, 2]", "a.d=x"]) == {"a": {"b": {"c": [1, 2]}, "d": "x"}}


@pytest.mark.parametrize("overrides, match", [
    (["train.batchsize=4"], r"unknown config key\(s\) 'train.batchsize'.*valid keys in 'train'"),
    (["nonsense=1"], r"unknown config key\(s\) 'nonsense'"),
    (["train.batch_size=four"], r"'train.batch_size': expected int, got 'four'"),
    (["train.batch_size=2.5"], r"'train.batch_size': expected int"),
    (["optim.lr=fast"], r"'optim.lr': expected float, got 'fast'"),
    (["loss.lpips_pretrained=1"], r"'loss.lpips_pretrained': expected bool"),
    (["loss.latent=vae"], r"'loss.latent': expected one of \['ve', 'kl'\], got 'vae'"),
    (["optim.betas=[0.5]"], r"'optim.betas': expected 2 values"),
    (["train.steps=0"], r"train.steps must be > 0"),
    (["model.norm_groups=7"], r"model.norm_groups=7 must divide"),
    (["train.image_size=40"], r"image_size=40 must be a multiple of the downsampling factor 16"),
    (["model=3"], r"'model': expected a mapping"),
    (["optim.lr"], r"--set expects key=value"),
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


# ------------------------------------------------------------------------------ issues 12 / 13

def test_one_optimizer_convention_old_keys_still_load():
    """Both recipes keep optimizer settings in ``optim``: the tokenizer's old ``train.lr`` (and betas,
    weight_decay, grad_clip, ``loss.disc_lr``) still load, with a FutureWarning naming the new key."""
    import warnings

    from vefast.recipes.config import build_config, check_resume_config, saved_config

    with pytest.warns(FutureWarning, match=r"'train.lr' is deprecated: it is now 'optim.lr'"):
        cfg = load_config(TokenizerConfig, "tokenizer_tiny.yaml", ["train.lr=3e-4", "loss.disc_lr=1e-5"])
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.optim.disc_lr == pytest.approx(1e-5)
    with pytest.raises(ConfigError, match="'train.lr' was renamed to 'optim.lr': give only 'optim.lr'"):
        load_config(TokenizerConfig, "tokenizer_tiny.yaml", ["train.lr=3e-4", "optim.lr=1e-4"])

    with pytest.warns(FutureWarning):
        assert build_config(TokenizerConfig, {"train": {"lr": 0.5}}).optim.lr == 0.5  # an old YAML
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) 'train.learning_rate'"):
        load_config(TokenizerConfig, "tokenizer_tiny.yaml", ["train.learning_rate=3e-4"])
    # a config saved by an older version (old names, keys added since missing) migrates silently
    old = {"seed": 0, "model": {"base_channels": 16, "channel_mult": [1, 2], "norm_groups": 8, "latent_channels": 4},
           "train": {"lr": 1e-3, "betas": [0.5, 0.9], "image_size": 32, "batch_size": 4}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = saved_config(TokenizerConfig, old, "run")
        now = build_config(TokenizerConfig, {**old, "train": {"image_size": 32, "batch_size": 4},
                                             "optim": {"lr": 1e-3, "betas": [0.5, 0.9]}})
        check_resume_config(old, now, "run")  # nothing that matters changed
    assert got.optim.lr == 1e-3 and got.train.grad_accum == 1 and got.optim.schedule == "constant"


def test_lr_schedule_warmup_constant_cosine():
    from vefast.recipes.schedule import LRScheduleConfig, lr_factor

    warm = LRScheduleConfig(warmup_steps=4)
    assert [lr_factor(s, warm, 100) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = LRScheduleConfig(schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    f = [lr_factor(s, cos, 12) for s in range(14)]
    assert f[:3] == [0.5, 1.0, 1.0] and f[12] == pytest.approx(0.1) and f[13] == pytest.approx(0.1)
    assert f[7] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert all(a >= b for a, b in zip(f[2:], f[3:]))
    assert lr_factor(5, LRScheduleConfig(schedule="cosine", decay_steps=10), 1000) == pytest.approx(0.5)
    assert cos.depends_on_run_length() and not LRScheduleConfig(schedule="cosine", decay_steps=9).depends_on_run_length()
    with pytest.raises(ConfigError, match=r"optim.min_lr_ratio must be in \[0, 1\]"):
        load_config(DiTConfig, "dit_tiny.yaml", ["optim.min_lr_ratio=2"])
    with pytest.raises(ConfigError, match=r"optim.decay_steps \(3\) must exceed optim.warmup_steps \(5\)"):
        load_config(TokenizerConfig, "tokenizer_tiny.yaml", ["optim.decay_steps=3", "optim.warmup_steps=5"])


def test_cosine_without_horizon_fixes_the_run_length_on_resume():
    from vefast.recipes.config import check_resume_config, config_to_dict

    saved = config_to_dict(load_config(DiTConfig, "dit_tiny.yaml", ["optim.schedule=cosine"]))
    longer = load_config(DiTConfig, "dit_tiny.yaml", ["optim.schedule=cosine", "train.steps=40"])
    check_resume_config(saved, longer, "run")  # the recipe decides what is fixed
    with pytest.raises(ConfigError, match=r"config keys \['train.steps'\] differ"):
        check_resume_config(saved, longer, "run", fixed=("train.steps",))


def test_jsonl_truncation_drops_redone_steps_and_torn_lines(tmp_path):
    from vefast.recipes.metrics import truncate_jsonl

    f = tmp_path / "m.jsonl"
    f.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a": 3}\n{"step": 3, "val": 1}\n{"ste')
    log = JSONLLogger(f, resume_step=2)
    assert log.dropped == 3 and [r["step"] for r in read_jsonl(f)] == [1, 2]
    log.log(3, a=30)
    assert [r.get("a") for r in read_jsonl(f)] == [1, 2, 30]
    assert truncate_jsonl(f, 10) == 0


def test_lightningdit_latent_stats_file(tmp_path):
    torch.save({"mean": torch.tensor([0.5, -1.0]).view(1, 2, 1, 1), "std": torch.tensor([2.0, 3.0]).view(1, 2, 1, 1)},
               tmp_path / "latents_stats.pt")
    stats = read_latent_stats(tmp_path)
    assert stats["mean"] == [0.5, -1.0] and stats["std"] == [2.0, 3.0] and stats["source"] == "latents_stats.pt"
    (tmp_path / "stats.json").write_text(json.dumps({"mean": [0.0, 0.0], "std": [1.0, 1.0]}))
    assert read_latent_stats(tmp_path)["source"] == "stats.json"  # vefast's own file wins
    (tmp_path / "stats.json").unlink()
    (tmp_path / "latents_stats.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="is not a LightningDiT latent-stats file"):
        read_latent_stats(tmp_path)


def test_optimizer_state_index_and_name_forms_round_trip():
    from vefast.recipes.dit import _optim_state_to_fqn, _optim_state_to_index

    m, opt = _trained_adamw()
    names = [n for n, _ in m.named_parameters()]
    sd = opt.state_dict()
    by_name = _optim_state_to_fqn(sd, names)
    assert set(by_name["state"]) == set(names) and by_name["param_groups"][0]["params"] == names
    back = _optim_state_to_index(by_name, names)
    assert back["param_groups"] == sd["param_groups"] and set(back["state"]) == set(sd["state"])
    assert all(torch.equal(back["state"][i]["exp_avg"], sd["state"][i]["exp_avg"]) for i in sd["state"])


def test_flip_dataset_doubles_with_mirrors():
    from vefast.recipes.data import FlipDataset

    base = SyntheticImageDataset(3, 8, num_classes=2, seed=1)
    ds = FlipDataset(base)
    assert len(ds) == 6 and ds[4][1] == base[1][1]
    assert torch.equal(ds[4][0], base[1][0].flip(-1)) and torch.equal(ds[1][0], base[1][0])
    with pytest.raises(IndexError):
        ds[6]


def test_ldm_config_is_read_off_the_weights():
    from vefast.models.tokenizer import AutoencoderKL, ldm_config_from_state_dict

    ae = AutoencoderKL(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, latent_channels=8)
    cfg = ldm_config_from_state_dict(ae.state_dict())
    assert cfg == dict(in_channels=3, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, latent_channels=8,
                       norm_groups=32, mid_attn=True)
    sd = dict(ae.state_dict(), **{"encoder.down.1.attn.0.q.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="attention inside its resolution levels"):
        ldm_config_from_state_dict(sd)
    with pytest.raises(ValueError, match="not an LDM autoencoder state dict"):
        ldm_config_from_state_dict({"x": torch.zeros(1)})


def test_cli_reports_a_commands_user_errors_and_nothing_else(monkeypatch, capsys):
    """cli.main turns the exceptions a command module lists in USER_ERRORS into `vefast CMD: message` and
    exit 2; any other exception is a bug and keeps its traceback."""
    import sys
    import types

    from vefast import cli

    fake = types.ModuleType("vefast_fake_command")
    fake.USER_ERRORS = (ConfigError,)
    fake.add_arguments = lambda p: p.add_argument("--raise", dest="exc", default="config")

    def fake_main(args):
        raise ConfigError("bad --thing") if args.exc == "config" else KeyError("a bug")

    fake.main = fake_main
    monkeypatch.setitem(sys.modules, "vefast_fake_command", fake)
    monkeypatch.setitem(cli.COMMANDS, "fake", ("vefast_fake_command", "a test command"))
    assert cli.main(["fake"]) == 2
    assert capsys.readouterr().err.strip() == "vefast fake: bad --thing"
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["fake", "--raise", "other"])


@pytest.mark.parametrize("module", ["dit", "tokenizer", "extract_latents", "extract_features", "sample", "fid", "plot"])
def test_commands_that_check_their_inputs_declare_them_as_user_errors(module):
    import importlib

    errors = importlib.import_module(f"vefast.recipes.{module}").USER_ERRORS
    assert any(issubclass(ConfigError, e) for e in errors), module
