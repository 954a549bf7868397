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


from helpers import needs_interpreter  # noqa: E402

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


def test_tokenizer_kl_and_reals_variants(tmp_path, eager):
    assert _train(tmp_path / "kl", ["loss.latent=kl", "loss.align=reals", "loss.lpips_weight=0", "train.steps=2",
                                    "train.val_every=2"]) == 0
    rows = [r for r in read_jsonl(tmp_path / "kl" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and all("kl" in r or "latent" in r for r in rows) and all("reals" in r for r in rows)


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
