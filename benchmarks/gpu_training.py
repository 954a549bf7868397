"""GPU benchmark: full training steps through the recipes' own ``train_step``: img/s per GPU and peak memory.

Issue 13's priority order (the runner stops a topic at its budget and keeps the rows measured so far):

1. Tokenizer f16d32 (VE + VF + LPIPS + PatchGAN, DINOv2 ViT-L/14 targets, random weights: timing only) at
   256 px, one rank under DDP (a 1-process group: DDP's bookkeeping without communication):
   - ``vefast``: the recipe's defaults (bf16 autocast of every network, fp32 losses, ``channels_last``, fused
     VE + VF, DINOv2 once per batch at the latent grid, DDP without ``find_unused_parameters``) at batch 8 and 32;
   - ``vavae``: the same model in VA-VAE's shipped configuration: fp32, batch 8, ``find_unused_parameters=True``,
     eager losses, DINOv2 on 224 px inputs, NCHW (torch 2.11's DDP refuses ``find_unused_parameters=True`` with
     the adaptive weights' ``autograd.grad`` — "marked ready twice" — unless ``static_graph=True``, added here);
   - ``vefast_fp32``: vefast's structure and kernels at VA-VAE's batch and precision (fp32, batch 8): what the
     kernels and the step's structure give alone.
   Rows carry ``speedup_vs_vavae`` (img/s over the ``vavae`` row; issue 13's goal: >= 4 at the defaults).
2. LightningDiT-XL/1 and B/1 on 32 x 16 x 16 latents, batch 64 (global-batch draws, AdamW, guarded EMA):
   fused vs reference, with and without activation checkpointing (``model.grad_checkpointing``), and with
   ``train.grad_accum=2`` at the same batch (memory for time); ``torch.compile`` of the reference last.

    python -m benchmarks.run_gpu training
"""
from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from typing import Any

import torch

from .harness import add_ratios, eager_cpu_path, measure

LATENT = (32, 16, 16)
TOK_SIZE = 256
# (variant, batch): highest priority first
TOKENIZER_CASES = (("vefast", 32), ("vavae", 8), ("vefast_fp32", 8), ("vefast", 8))
# (model, variant, grad_checkpointing, grad_accum)
DIT_CASES = tuple((m, v, ck, acc) for m in ("LightningDiT-XL/1", "LightningDiT-B/1")
                  for v, ck, acc in (("vefast", False, 1), ("eager", False, 1), ("vefast", True, 1), ("eager", True, 1),
                                     ("vefast", False, 2))) + \
    (("LightningDiT-B/1", "compile", False, 1), ("LightningDiT-XL/1", "compile", False, 1))
DIT_BATCH = 64


@contextlib.contextmanager
def one_rank_group(device: torch.device):
    """A 1-process group, so the steps run under DDP as on a cluster (NCCL on CUDA, gloo on the CPU)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    fd, store = tempfile.mkstemp(prefix="vefast-bench-pg-")
    os.close(fd)
    os.unlink(store)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def eager_ops(enabled: bool):
    """Every vefast op on its eager reference path (VA-VAE's losses are plain PyTorch)."""
    if not enabled:
        yield
        return
    from vefast.ops import _common

    real = _common.use_triton
    _common.use_triton = lambda *tensors: False
    try:
        yield
    finally:
        _common.use_triton = real


def _tokenizer_case(variant: str, batch: int, device: torch.device, tiny: bool):
    """(step closure, case fields) for one tokenizer configuration, built from the recipe's pieces."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from vefast.models.tokenizer import NLayerDiscriminator
    from vefast.recipes.config import load_config
    from vefast.recipes.metrics import NonFiniteGuard, build_lpips
    from vefast.recipes.schedule import base_lrs
    from vefast.recipes.tokenizer import (TokenizerConfig, TokenizerStep, TokenizerTrainModule, dino_feature_dim,
                                          load_dino, train_step)

    vavae = variant == "vavae"
    fp32 = variant in ("vavae", "vefast_fp32")
    over = ["loss.lpips_pretrained=false", "loss.dinov2_pretrained=false", "loss.gan_start=0",
            f"train.batch_size={batch}", f"train.precision={'fp32' if fp32 else 'bf16'}",
            f"train.channels_last={'false' if vavae else 'true'}", "train.steps=100"]
    if vavae and not tiny:  # 224 px -> 16 x 16 patches: the f16 latent grid at 256 px
        over.append("loss.dinov2_resize='224'")
    cfg = load_config(TokenizerConfig, "tokenizer_tiny.yaml" if tiny else "tokenizer_f16d32_ve.yaml", over)
    lc, tc = cfg.loss, cfg.train
    torch.manual_seed(0)
    dino = load_dino(lc, device)
    module = TokenizerTrainModule(cfg, dino_feature_dim(dino)).to(device)
    disc = NLayerDiscriminator(3, lc.disc_channels, lc.disc_layers, lc.disc_norm).to(device)
    lp = build_lpips(lc.lpips_net, False).to(device)
    if tc.channels_last:
        for m in (module, disc, lp):
            m.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas)
    ids = [device.index or 0] if device.type == "cuda" else None
    ddp = DDP(module, device_ids=ids, find_unused_parameters=vavae, static_graph=vavae)
    ddp_d = DDP(disc, device_ids=ids, find_unused_parameters=vavae, broadcast_buffers=False)
    size = tc.image_size
    f = 2 ** (len(cfg.model.channel_mult) - 1)
    run = TokenizerStep(cfg=cfg, module=module, ddp_module=ddp, disc=disc, ddp_disc=ddp_d, opt=opt, opt_d=opt_d,
                        dino=dino, lpips_model=lp, grid=(size // f, size // f), device=device, rank=0,
                        guard=NonFiniteGuard("bench", device), base_lrs=base_lrs([opt, opt_d]))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    labels = torch.zeros(batch, dtype=torch.int64)
    module.train()
    disc.train()

    def step() -> None:
        with eager_ops(vavae):
            train_step(run, (x, labels), 10)

    case = dict(name="tokenizer_step", model="tiny" if tiny else "f16d32", batch=batch, image_size=size,
                dtype="fp32" if fp32 else "bf16", channels_last=tc.channels_last, find_unused_parameters=vavae,
                static_graph=vavae,
                fused_losses=not vavae, dinov2_input="224" if vavae else "latent grid x 14")
    return step, case


def _dit_case(model_name: str, variant: str, ckpt: bool, accum: int, batch: int, device: torch.device,
              latent: tuple[int, int, int], tiny: bool):
    from vefast.recipes.config import load_config
    from vefast.recipes.dit import (DiTConfig, DiTStep, DiTTrainModule, build_dit, build_optimizers,
                                    recipe_label_dropout, train_step)
    from vefast.recipes.metrics import NonFiniteGuard
    from vefast.recipes.schedule import base_lrs
    import vefast

    over = [f"model.fused={'true' if variant == 'vefast' else 'false'}",
            f"model.grad_checkpointing={'true' if ckpt else 'false'}", f"train.grad_accum={accum}",
            f"train.batch_size={batch}", "train.precision=bf16"]
    if not tiny:
        over.append(f"model.name={model_name}")
    cfg = load_config(DiTConfig, "dit_tiny.yaml" if tiny else "lightningdit_xl1.yaml", over)
    torch.manual_seed(0)
    model, _ = build_dit(cfg, latent)
    recipe_label_dropout(model)
    ema = copy.deepcopy(model).eval().requires_grad_(False).to(device)
    module = DiTTrainModule(model, cfg, None, None).to(device).train()
    opts = build_optimizers(module, cfg.optim)
    fwd = torch.compile(module) if variant == "compile" else module
    run = DiTStep(cfg=cfg, module=module, fwd=fwd, sync=module, ema=ema, opts=opts, path=vefast.path("linear"),
                  t_sampler=vefast.LogitNormalSampler(0.0, 1.0), guard=NonFiniteGuard("bench", device), device=device,
                  rank=0, world_size=1, channels=latent[0], base_lrs=base_lrs(opts))
    g = torch.Generator().manual_seed(2)
    batch_data = (torch.randn(batch, *latent, generator=g).to(device),
                  torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device))

    def step() -> None:
        train_step(run, batch_data, 0)

    case = dict(name="train_step", model=model_name if not tiny else "tiny", batch=batch, grad_checkpointing=ckpt,
                grad_accum=accum, dtype="bf16")
    return step, case


def _measure_case(build, rows: list[dict[str, Any]], variant: str, warmup: int, rep: int) -> None:
    case: dict[str, Any] = {}
    try:
        step, case = build()
        row = measure(step, variant=variant, warmup=warmup, rep=rep, **case)
        row["img_per_s"] = case["batch"] / (row["ms"] * 1e-3)
    except torch.cuda.OutOfMemoryError as e:  # a configuration that does not fit is a result too
        row = {**case, "variant": variant, "error": f"OOM: {str(e).splitlines()[0]}"}
    rows.append(row)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _tokenizer_ratios(rows: list[dict[str, Any]]) -> None:
    """``speedup_vs_vavae`` (img/s ratio) and ``mem_ratio_vs_vavae`` on every tokenizer row."""
    ref = next((r for r in rows if r.get("name") == "tokenizer_step" and r["variant"] == "vavae" and "ms" in r), None)
    if ref is None:
        return
    for r in rows:
        if r.get("name") == "tokenizer_step" and "ms" in r and r is not ref:
            r["speedup_vs_vavae"] = r["img_per_s"] / ref["img_per_s"]
            if r.get("peak_mem_bytes") and ref.get("peak_mem_bytes"):
                r["mem_ratio_vs_vavae"] = r["peak_mem_bytes"] / ref["peak_mem_bytes"]


def _run(device: torch.device, *, tiny: bool, warmup: int, rep: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    latent = (4, 4, 4) if tiny else LATENT
    seen = set()  # the dry run measures each code path once (tiny sizes make the cases alike)
    with one_rank_group(device):
        for variant, batch in TOKENIZER_CASES:
            if tiny and variant in seen:
                continue
            seen.add(variant)
            _measure_case(lambda: _tokenizer_case(variant, 2 if tiny else batch, device, tiny), rows, variant,
                          warmup, rep)
    _tokenizer_ratios(rows)
    for model_name, variant, ckpt, accum in DIT_CASES:
        if tiny and (variant == "compile" or (variant, ckpt, accum) in seen):
            continue  # (inductor on the CPU is not what this dry run checks)
        seen.add((variant, ckpt, accum))
        _measure_case(lambda: _dit_case(model_name, variant, ckpt, accum, 4 if tiny else DIT_BATCH, device, latent,
                                        tiny), rows, variant, warmup, rep)
    ok = [r for r in rows if "ms" in r and r.get("name") == "train_step"]
    add_ratios(ok, key=("name", "model", "batch", "grad_checkpointing", "grad_accum"), reference="eager")
    return rows


def run(ceilings: dict) -> list[dict[str, Any]]:
    return _run(torch.device("cuda"), tiny=False, warmup=3, rep=20)


def dry_run() -> list[dict[str, Any]]:
    """The same cases at tiny sizes on the CPU (tiny configs, batch 2 / 4): every step builds and runs."""
    threads = torch.get_num_threads()
    with eager_cpu_path():
        torch.set_num_threads(1)
        try:
            return _run(torch.device("cpu"), tiny=True, warmup=1, rep=1)
        finally:
            torch.set_num_threads(threads)
