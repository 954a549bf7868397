"""GPU benchmark: sampling throughput and FID feature extraction (issue 13 item 4).

- ``sample_step``: one guided ODE step of LightningDiT-B/1 and -XL/1 on 32 x 16 x 16 latents (VA-VAE
  f16d32 at 256 px), batch 64 images (128 rows through the model: conditional + null class), bf16
  autocast, the EMA-style eval model: ``vefast`` (fused modules) vs ``eager`` (reference modules). Rows
  carry ``img_per_s_250_euler`` = batch / (250 x the step time): the images per second per GPU of a
  250-step Euler run with guidance on every step (an upper bound on the time: the guidance interval
  skips the doubled batch outside it; Heun costs about twice).
- ``decode``: the f16d32 tokenizer's decoder at 256 px, batch 64 (the other part of a sample's cost).
- ``inception``: torch-fidelity's TF-Inception (what ``vefast fid`` runs) on uint8 256 x 256 images,
  batch 200 (random weights: the same cost): ``img_per_s``; and ``frechet``: the Fréchet distance of
  two 2048-dim statistics (scipy sqrtm in float64 on the host CPU, ADM's formula).

    python -m benchmarks.run_gpu sample
"""
from __future__ import annotations

import os
import time
from typing import Any

import torch

from .harness import add_ratios, eager_cpu_path, measure

LATENT = (32, 16, 16)
DIT_MODELS = ("LightningDiT-B/1", "LightningDiT-XL/1")
BATCH = 64
INCEPTION_BATCH = 200
EULER_STEPS = 250


def _dit(model_name: str, variant: str, device: torch.device, tiny: bool):
    from vefast.recipes.config import load_config
    from vefast.recipes.dit import DiTConfig, build_dit

    over = [f"model.fused={'true' if variant == 'vefast' else 'false'}"]
    if not tiny:
        over.append(f"model.name={model_name}")
    cfg = load_config(DiTConfig, "dit_tiny.yaml" if tiny else "lightningdit_xl1.yaml", over)
    torch.manual_seed(0)
    model, _ = build_dit(cfg, LATENT if not tiny else (4, 4, 4))
    return model.to(device).eval().requires_grad_(False), cfg


def _sample_step_case(model_name: str, variant: str, device: torch.device, tiny: bool, batch: int):
    from vefast.recipes.dit import sample_ode

    model, cfg = _dit(model_name, variant, device, tiny)
    latent = LATENT if not tiny else (4, 4, 4)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(batch, *latent, generator=g).to(device)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
    precision = "bf16" if device.type == "cuda" else "fp32"

    def step() -> None:  # one Euler step with guidance at t = 0.5 (inside any interval)
        sample_ode(model, noise, y, num_classes=cfg.num_classes, steps=1, sampler="euler", cfg_scale=1.5,
                   cfg_interval=(0.0, 1.0), t_end=1.0, precision=precision)

    case = dict(name="sample_step", model=model_name if not tiny else "tiny", batch=batch, cfg=True,
                dtype=precision)
    return step, case


def _decode_case(device: torch.device, tiny: bool, batch: int):
    from vefast.recipes.config import load_config
    from vefast.recipes.tokenizer_config import TokenizerConfig, build_autoencoder

    cfg = load_config(TokenizerConfig, "tokenizer_tiny.yaml" if tiny else "tokenizer_f16d32_ve.yaml", [])
    ae = build_autoencoder(cfg.model).to(device).eval().requires_grad_(False)
    size = cfg.train.image_size
    z = torch.randn(batch, ae.latent_channels, size // ae.downsample_factor, size // ae.downsample_factor,
                    device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step() -> None:
        with torch.no_grad(), autocast:
            ae.decode(z)

    return step, dict(name="decode", model="tiny" if tiny else "f16d32", batch=batch, image_size=size)


def _inception_case(device: torch.device, batch: int, size: int):
    from vefast.recipes.fid import load_inception

    model = load_inception(None, device, random_init=True)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).to(device)

    def step() -> None:
        model(x)

    return step, dict(name="inception", batch=batch, image_size=size)


def _frechet_row(dim: int) -> dict[str, Any]:
    import numpy as np

    from vefast.recipes.fid import FIDStatistics

    g = np.random.default_rng(0)
    a, b = g.normal(size=(3 * dim, dim)), g.normal(size=(3 * dim, dim)) + 0.1
    sa, sb = FIDStatistics.of(a), FIDStatistics.of(b)
    t0 = time.perf_counter()
    sa.frechet_distance(sb)
    return {"name": "frechet", "variant": "scipy-sqrtm", "dim": dim, "ms": (time.perf_counter() - t0) * 1e3,
            "host_cpus": os.cpu_count()}


def _add(rows: list[dict[str, Any]], build, variant: str, warmup: int, rep: int, per: str = "batch") -> None:
    case: dict[str, Any] = {}
    try:
        step, case = build()
        row = measure(step, variant=variant, warmup=warmup, rep=rep, **case)
        row["img_per_s"] = case[per] / (row["ms"] * 1e-3)
        if case.get("name") == "sample_step":
            row["img_per_s_250_euler"] = case["batch"] / (EULER_STEPS * row["ms"] * 1e-3)
    except torch.cuda.OutOfMemoryError as e:
        row = {**case, "variant": variant, "error": f"OOM: {str(e).splitlines()[0]}"}
    except ImportError as e:  # torch-fidelity not installed on the GPU machine: travel it as a wheel in .whl/
        row = {**case, "variant": variant, "error": f"ImportError: {e}"}
    rows.append(row)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run(device: torch.device, *, tiny: bool, warmup: int, rep: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    batch = 2 if tiny else BATCH
    for model_name in DIT_MODELS[:1] if tiny else DIT_MODELS:
        for variant in ("vefast", "eager"):
            _add(rows, lambda: _sample_step_case(model_name, variant, device, tiny, batch), variant, warmup, rep)
    ok = [r for r in rows if "ms" in r and r.get("name") == "sample_step"]
    add_ratios(ok, key=("name", "model", "batch"), reference="eager")
    _add(rows, lambda: _decode_case(device, tiny, batch), "eager", warmup, rep)
    if tiny:  # one timed call: the CPU runs the 299 px network at ~1 s per image (the wiring is what counts here)
        step, case = _inception_case(device, 1, 32)
        t0 = time.perf_counter()
        step()
        ms = (time.perf_counter() - t0) * 1e3
        rows.append({**case, "variant": "torch-fidelity", "ms": ms, "img_per_s": 1e3 / ms})
    else:
        _add(rows, lambda: _inception_case(device, INCEPTION_BATCH, 256), "torch-fidelity", warmup, rep)
    rows.append(_frechet_row(64 if tiny else 2048))
    return rows


def run(ceilings: dict) -> list[dict[str, Any]]:
    return _run(torch.device("cuda"), tiny=False, warmup=3, rep=20)


def dry_run() -> list[dict[str, Any]]:
    """The same cases at tiny sizes on the CPU (tiny configs, batch 2, a 64-dim Fréchet distance)."""
    with eager_cpu_path():
        return _run(torch.device("cpu"), tiny=True, warmup=1, rep=1)
