"""``train-tokenizer`` and ``extract-latents`` on tiny configs (CPU, synthetic data, random LPIPS / DINOv2).

Most runs use the eager reference ops (TRITON_INTERPRET=0) to stay fast; one step runs every
vefast kernel interpreted (TRITON_INTERPRET=1), which is the lane the recipes use on a GPU.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vefast.cli import main as cli
from vefast.recipes.checkpoint import load_checkpoint
from vefast.recipes.config import ConfigError, load_config
from vefast.recipes.data import LatentShardDataset
from vefast.recipes.metrics import read_jsonl
from vefast.recipes.tokenizer import TokenizerConfig, load_tokenizer, train

FAST = ["loss.align=none", "loss.lpips_weight=0", "loss.gan_start=1"]


def _train(out, overrides=(), synthetic=32, **kw):
    cfg = load_config(TokenizerConfig, "tokenizer_tiny.yaml", list(overrides))
    return train(cfg, out=out, synthetic=synthetic, progress=False, **kw)


from helpers import launch_report, needs_interpreter  # noqa: E402

# Import the Triton ops now, while the lane's TRITON_INTERPRET=1 is set, so their kernels are interpreted
# kernels even when an eager run below imports them first.
import vefast.ops.reparam  # noqa: F401,E402
import vefast.ops.vf_loss  # noqa: F401,E402
import vefast.ops.align_loss  # noqa: F401,E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok_run(tmp_path_factory, eager):
    """Tiny VE + VF + LPIPS + GAN tokenizer, 12 steps."""
    out = tmp_path_factory.mktemp("tok")
    assert _train(out, synthetic=64) == 0
    return out


def test_tokenizer_losses_decrease_and_checkpoint(tok_run):
    rows = [r for r in read_jsonl(tok_run / "metrics.jsonl") if "nll" in r]
    assert [r["step"] for r in rows] == list(range(1, 13))
    first = sum(r["nll"] for r in rows[:3]) / 3
    last = sum(r["nll"] for r in rows[-3:]) / 3
    assert last < 0.9 * first, (first, last)
    assert all("vf" in r and r["w_vf"] > 0 for r in rows)
    assert all(("d_loss" in r) == (r["step"] > 4) for r in rows)  # GAN starts at loss.gan_start = 4
    val = [r for r in read_jsonl(tok_run / "metrics.jsonl") if "val_psnr" in r]
    assert val and {"val_psnr", "val_ssim", "val_lpips"} <= set(val[-1])
    ckpt = load_checkpoint(tok_run)
    assert ckpt.step == 12 and ckpt.meta["kind"] == "tokenizer"
    stats = ckpt.meta["latent_stats"]
    assert len(stats["mean"]) == len(stats["std"]) == 4 and min(stats["std"]) > 0
    assert json.loads((tok_run / "latent_stats.json").read_text()) == stats
    assert {"model", "aux", "disc", "opt", "opt_disc"} <= {p.stem for p in ckpt.path.glob("*.safetensors")}
    ae, cfg, _ = load_tokenizer(tok_run)
    assert cfg.model.latent_channels == 4 and ae.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 8, 4, 4)


@pytest.mark.expect_fallback("*:cpu")
def test_tokenizer_kl_and_reals_variants(tmp_path, eager):
    assert _train(tmp_path / "kl", ["loss.latent=kl", "loss.align=reals", "loss.lpips_weight=0", "train.steps=2",
                                    "train.val_every=2"]) == 0
    rows = [r for r in read_jsonl(tmp_path / "kl" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and all("kl" in r or "latent" in r for r in rows) and all("reals" in r for r in rows)


@pytest.mark.expect_fallback("*:cpu")
def test_tokenizer_resume_is_bitwise(tmp_path, eager):
    over = FAST + ["train.ckpt_every=2", "train.val_every=100"]
    assert _train(tmp_path / "full", over + ["train.steps=4"]) == 0
    assert _train(tmp_path / "part", over + ["train.steps=2"]) == 0
    assert _train(tmp_path / "part", over + ["train.steps=4"], resume=True) == 0
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    assert a.step == b.step == 4
    for name in ("model", "aux", "disc", "opt", "opt_disc"):
        ta, tb = a.tensors(name), b.tensors(name)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (name, k)


@needs_interpreter
def test_tokenizer_interpreted_kernels_one_step(tmp_path, monkeypatch):
    """One step with every fused op (VE, VF) running its Triton kernel under the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "interp"
    assert _train(out, ["train.steps=1", "loss.gan_start=0", "loss.lpips_weight=0", "train.val_every=1",
                        "train.stats_images=4", "train.val_images=4"], synthetic=8) == 0
    row = read_jsonl(out / "metrics.jsonl")[0]
    assert all(torch.isfinite(torch.tensor(row[k])) for k in ("nll", "latent", "vf", "w_vf", "w_gan", "d_loss"))


@pytest.mark.expect_fallback("*:cpu")
def test_extract_latents(tok_run, tmp_path, eager):
    out = tmp_path / "lat"
    rc = cli(["extract-latents", "--tokenizer", str(tok_run), "--synthetic", "20", "--out", str(out), "--flip",
              "--batch-size", "8", "--shard-size", "12", "--num-workers", "0", "--device", "cpu"])
    assert rc == 0
    shards = sorted(out.glob("shard-*.safetensors"))
    assert len(shards) == 2
    z = torch.cat([load_file(str(s))["latents"] for s in shards])
    zf = torch.cat([load_file(str(s))["latents_flip"] for s in shards])
    labels = torch.cat([load_file(str(s))["labels"] for s in shards])
    assert z.shape == zf.shape == (20, 4, 4, 4) and labels.tolist() == [i % 4 for i in range(20)]
    stats = json.loads((out / "stats.json").read_text())
    both = torch.cat([z, zf]).double()
    assert torch.allclose(torch.tensor(stats["mean"], dtype=torch.float64), both.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(torch.tensor(stats["std"], dtype=torch.float64), both.std((0, 2, 3), unbiased=False), atol=1e-5)
    info = json.loads((out / "info.json").read_text())
    assert info["latent_shape"] == [4, 4, 4] and info["num_classes"] == 4
    ds = LatentShardDataset(out, flip=True)
    assert len(ds) == 40
    x = torch.stack([ds[i][0] for i in range(40)])
    assert x.mean().abs() < 1e-4 and (x.std((0, 2, 3), unbiased=False) - 1).abs().max() < 1e-4
    rc = cli(["extract-latents", "--tokenizer", str(tok_run), "--synthetic", "4", "--out", str(out)])
    assert rc == 2  # refuses to mix with existing shards


def test_tokenizer_bad_inputs_fail_at_start(tmp_path, capsys, monkeypatch, eager):
    assert cli(["train-tokenizer", "--config", "tokenizer_tiny.yaml", "--synthetic", "8", "--out", str(tmp_path / "a"),
                "--set", "loss.gan_weigth=1"]) == 2
    assert "unknown config key(s) 'loss.gan_weigth'" in capsys.readouterr().err
    assert cli(["train-tokenizer", "--config", "tokenizer_tiny.yaml", "--data", str(tmp_path / "none"),
                "--out", str(tmp_path / "a")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert cli(["train-tokenizer", "--config", "tokenizer_tiny.yaml", "--out", str(tmp_path / "a")]) == 2
    assert "give --data DIR or --synthetic N" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        _train(tmp_path / "fresh", FAST, resume=True)
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        _train(tmp_path / "small", FAST, synthetic=2)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="needs the torchvision ImageNet backbone weights"):
        _train(tmp_path / "lp", ["loss.lpips_pretrained=true"])
    assert not (tmp_path / "lp").exists()  # nothing written: it failed before the run started
    assert cli(["extract-latents", "--tokenizer", str(tmp_path / "none"), "--synthetic", "4", "--out", str(tmp_path / "l")]) == 2


# ------------------------------------------------------------------------------------------------
# issue 13: throughput structure, accumulation, precomputed DINOv2; issue 12: run dirs, one config convention

def _record_step_grads(monkeypatch):
    """Every AdamW step's gradients (copies), in call order: what an optimizer step is given."""
    calls = []
    real = torch.optim.AdamW.step

    def step(self, *a, **k):
        calls.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"] if p.grad is not None])
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return calls


def _grads_close(a, b, rel=1e-4):
    """Every gradient element equal up to ``rel`` of the largest one (rounding, not a different gradient)."""
    assert len(a) == len(b)
    scale = max(float(x.abs().max()) for x in a)
    for i, (x, y) in enumerate(zip(a, b)):
        assert (x - y).abs().max() <= rel * scale, (i, float((x - y).abs().max()), scale)


def _tensors_close(a, b, names, atol):
    for name in names:
        ta, tb = a.tensors(name), b.tensors(name)
        for k in ta:
            assert torch.allclose(ta[k], tb[k], rtol=1e-5, atol=atol), (name, k, (ta[k] - tb[k]).abs().max())


@pytest.mark.expect_fallback("*:cpu")
def test_tokenizer_grad_accum_equals_one_larger_pass(tmp_path, eager, monkeypatch):
    """With every term per sample (L1, LPIPS, NLL, VE, VF at a fixed weight) grad_accum micro-batches give
    the gradient of the whole batch (to float rounding), hence the same losses. (The adaptive weights and
    the discriminator's BatchNorm are per micro-batch, as they are per rank under DDP.)"""
    over = ["loss.gan_weight=0", "loss.vf_adaptive=false", "train.steps=3", "train.flip=true", "train.ckpt_every=3",
            "train.val_every=100", "optim.schedule=cosine", "optim.warmup_steps=1"]
    grads = {}
    for k in (1, 2):
        grads[k] = _record_step_grads(monkeypatch)
        assert _train(tmp_path / f"k{k}", over + [f"train.grad_accum={k}"], synthetic=16) == 0
    _grads_close(grads[1][0], grads[2][0], rel=1e-5)  # the first step's (later: AdamW amplifies rounding)
    ra, rb = ([r for r in read_jsonl(tmp_path / f"k{k}" / "metrics.jsonl") if "loss" in r] for k in (1, 2))
    for key in ("loss", "nll", "vf", "lpips", "grad_norm"):
        assert ra[0][key] == pytest.approx(rb[0][key], rel=1e-5), key
    assert [r["loss"] for r in ra] == pytest.approx([r["loss"] for r in rb], rel=1e-4)
    assert [r["lr"] for r in ra] == pytest.approx([1e-3, 1e-3, 5e-4])  # warm-up 1, cosine over 3


def _force_ddp(module, info, **kwargs):
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, **kwargs)


@pytest.mark.expect_fallback("*:cpu")
@pytest.mark.parametrize("align", ["vf", "reals", "planted-unused"])
def test_tokenizer_ddp_needs_no_find_unused_parameters(align, tmp_path, eager, monkeypatch):
    """Both DDP modules (autoencoder + log-variance + alignment head; discriminator) wrapped without
    find_unused_parameters, over GAN steps with the adaptive weights and accumulation: DDP raises at the
    next step if any parameter took no part in the loss — as it does for a planted unused one."""
    import torch.distributed as dist

    import vefast.recipes.distributed as rd
    import vefast.recipes.tokenizer as tok

    monkeypatch.setattr(rd, "wrap_ddp", _force_ddp)  # DDP in a 1-process group: the reducer checks the same
    if align == "planted-unused":
        real_init = tok.TokenizerTrainModule.__init__

        def planted(self, *a, **kw):
            real_init(self, *a, **kw)
            self.unused = torch.nn.Parameter(torch.zeros(3))

        monkeypatch.setattr(tok.TokenizerTrainModule, "__init__", planted)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    over = ["loss.gan_start=0", "train.steps=3", "train.grad_accum=2", "train.val_every=100", "train.ckpt_every=100",
            "train.stats_images=4", "train.val_images=4", f"loss.align={'vf' if align != 'reals' else 'reals'}"]
    try:
        if align == "planted-unused":
            with pytest.raises(RuntimeError, match="parameters that were not used in producing loss"):
                _train(tmp_path / "run", over, synthetic=8)
        else:
            assert _train(tmp_path / "run", over, synthetic=8) == 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_tokenizer_two_process_gloo_ddp(tmp_path):
    """Real 2-rank DDP: GAN from step 0 (two discriminator forwards per step), adaptive weights, micro-batches
    under no_sync; replicas stay identical."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ddp"
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vefast.cli",
           "train-tokenizer", "--config", "tokenizer_tiny.yaml", "--synthetic", "16", "--out", str(out), "--no-progress",
           "--set", "train.steps=2", "--set", "loss.gan_start=0", "--set", "train.grad_accum=2",
           "--set", "train.ckpt_every=2", "--set", "train.val_every=2", "--set", "train.stats_images=4",
           "--set", "train.val_images=4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, launch_report(proc)
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["replica_max_abs_diff"] for r in rows if "replica_max_abs_diff" in r] == [0.0]
    assert all("d_loss" in r and "w_gan" in r for r in rows if "loss" in r)


@pytest.mark.expect_fallback("*:cpu")
def test_extract_features_then_train_from_them(tmp_path, eager, monkeypatch):
    """`vefast extract-features` stores the config's DINOv2 targets (flipped images too); training from them
    runs no DINOv2 and follows the online run; features computed differently are refused."""
    from vefast.recipes.data import FeatureShards

    feats = tmp_path / "feats"
    assert cli(["extract-features", "--config", "tokenizer_tiny.yaml", "--synthetic", "12", "--out", str(feats),
                "--flip", "--dtype", "float32", "--batch-size", "5", "--shard-size", "5", "--num-workers", "0",
                "--device", "cpu"]) == 0
    shards = FeatureShards(feats)
    assert len(shards.files) == 3 and shards.info["feature_dim"] == 384 and shards.info["grid"] == [4, 4]
    patch, cls = shards.get(7, flipped=True)
    assert patch.shape == (384, 4, 4) and cls.shape == (384,)
    over = ["loss.lpips_weight=0", "loss.gan_weight=0", "train.steps=2", "train.flip=true", "train.val_every=100"]
    online = _record_step_grads(monkeypatch)
    assert _train(tmp_path / "online", over, synthetic=12) == 0
    stored = _record_step_grads(monkeypatch)
    assert _train(tmp_path / "stored", over + [f"loss.dinov2_features={feats}"], synthetic=12) == 0
    _grads_close(online[0], stored[0])  # features from batches of 5, not 4: rounding only
    ra, rb = ([r for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in r] for name in ("online", "stored"))
    assert [r["vf"] for r in ra] == pytest.approx([r["vf"] for r in rb], rel=1e-4)
    with pytest.raises(ConfigError, match=r"computed differently .* loss.dinov2_resize: features 'match_grid', "
                                          r"config '224'"):
        _train(tmp_path / "bad", over + [f"loss.dinov2_features={feats}", "loss.dinov2_resize='224'"], synthetic=12)
    with pytest.raises(ConfigError, match="holds 12 images, the dataset 16"):
        _train(tmp_path / "bad", over + [f"loss.dinov2_features={feats}"], synthetic=16)


@pytest.mark.expect_fallback("*:cpu")
def test_tokenizer_compile_and_checkpointing_options(tmp_path, eager, monkeypatch):
    """model.compile compiles the encoder and the decoder in place (Module.compile: state-dict keys
    unchanged; not run here: inductor on CPU is the GPU benchmark's business); model.grad_checkpointing is the
    autoencoder's use_checkpoint."""
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    assert _train(tmp_path / "c", FAST + ["model.compile=true", "model.grad_checkpointing=true", "train.steps=1",
                                          "train.stats_images=4", "train.val_images=4"], synthetic=8) == 0
    assert compiled == ["Encoder", "Decoder"]
    ae, cfg, _ = load_tokenizer(tmp_path / "c")
    assert cfg.model.grad_checkpointing and ae.use_checkpoint


@pytest.mark.expect_fallback("*:cpu")
def test_rerun_needs_resume_or_overwrite_and_metrics_keep_one_row_per_step(tmp_path, eager):
    out = tmp_path / "run"
    over = FAST + ["train.ckpt_every=2", "train.val_every=100", "train.stats_images=4", "train.val_images=4"]
    assert _train(out, over + ["train.steps=4"], synthetic=8) == 0
    # a kill after step 4 was logged but before its checkpoint: latest still names step 2
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-00000004")
    (out / "checkpoints" / "latest").write_text("step-00000002\n")
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "los')  # and a row cut short
    with pytest.raises(ConfigError, match="already holds a run .* --resume, .* --overwrite"):
        _train(out, over + ["train.steps=4"], synthetic=8)
    assert _train(out, over + ["train.steps=4"], synthetic=8, resume=True) == 0
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert _train(out, over + ["train.steps=2"], synthetic=8, overwrite=True) == 0
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [1, 2]
    assert load_checkpoint(out).step == 2 and sorted(p.name for p in (out / "checkpoints").glob("step-*")) == \
        ["step-00000002"]


def test_load_tokenizer_does_not_import_the_trainer(tok_run, tmp_path):
    """load_tokenizer lives with the checkpoint code: extract-latents (and DiT sampling) import no trainer."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from vefast.cli import main\n"
            f"assert main(['extract-latents', '--tokenizer', {str(tok_run)!r}, '--synthetic', '4', '--out', "
            f"{str(tmp_path / 'lat')!r}, '--num-workers', '0', '--device', 'cpu']) == 0\n"
            "from vefast.recipes.checkpoint import load_tokenizer\n"
            f"load_tokenizer({str(tok_run)!r})\n"
            "import vefast.recipes.dit\n"
            "bad = [m for m in ('vefast.recipes.tokenizer',) if m in sys.modules]\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**__import__('os').environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_load_tokenizer_reads_an_ldm_autoencoder_file(tmp_path):
    """An LDM / VA-VAE autoencoder checkpoint ({"state_dict": {encoder.*, decoder.*, loss.* ...}}, weights-only)
    loads as a tokenizer (architecture read off the weights) for extract-latents and DiT sampling."""
    from vefast.models.tokenizer import AutoencoderKL
    from vefast.recipes.checkpoint import load_tokenizer as load

    torch.manual_seed(0)
    ae = AutoencoderKL(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4, mid_attn=False)
    sd = {**{f"module.{k}": v for k, v in ae.state_dict().items()}, "loss.logvar": torch.zeros(()),
          "loss.discriminator.main.0.weight": torch.zeros(2, 3, 4, 4)}
    torch.save({"state_dict": sd, "global_step": 7}, tmp_path / "vavae.ckpt")
    got, cfg, stats = load(tmp_path / "vavae.ckpt")
    assert stats is None and cfg.model.channel_mult == (1, 2) and cfg.model.latent_channels == 4
    assert not cfg.model.mid_attn and cfg.model.num_res_blocks == 1
    assert all(torch.equal(got.state_dict()[k], v) for k, v in ae.state_dict().items())
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="is not loadable as weights"):
        load(tmp_path / "junk.pt")
