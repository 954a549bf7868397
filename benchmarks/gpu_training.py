"""GPU benchmark: one full training step (forward, backward, optimizer, EMA) in bf16.

LightningDiT-B/1 and -XL/1 at 256 px (VA-VAE latents 32 x 16 x 16), batch 64 per GPU, flow-matching
loss; and the f16d32 tokenizer step (encoder, VE loss, decoder, L1 + LPIPS, VF loss against DINOv2-
sized features). Variants side by side:

- ``vefast``: fused modules (``patch_lightningdit``) / fused VE + VF losses, eager;
- ``eager``: the reference model / the eager reference losses;
- ``compile``: ``torch.compile`` of the reference model (as LightningDiT ships it) / of the reference step;
each with and without gradient checkpointing (DiT). Rows carry img/s and peak memory; ratios are
against ``eager`` and against the best reference configuration (``speedup_vs_best_ref``).

    python -m benchmarks.run_gpu training
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from .harness import add_ratios, measure

LATENT = (32, 16, 16)
DIT_CASES = (("LightningDiT-B/1", 64), ("LightningDiT-XL/1", 64))
TOK_BATCH = 8
TOK_SIZE = 256


def _dit_step(model: torch.nn.Module, fwd, batch: int, ema_decay: float = 0.9999):
    """A closure doing one training step of ``model`` (called through ``fwd``) on fixed random latents."""
    from vefast import path as make_path

    dev = torch.device("cuda")
    path = make_path("linear")
    x1 = torch.randn(batch, *LATENT, device=dev)
    y = torch.randint(0, 1000, (batch,), device=dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    ema = copy.deepcopy(model).requires_grad_(False)
    ep, mp = list(ema.parameters()), list(model.parameters())

    def step() -> None:
        t = torch.rand(batch, device=dev)
        eps = torch.randn_like(x1)
        tb = t.view(-1, 1, 1, 1)
        xt = path.alpha(tb) * x1 + path.sigma(tb) * eps
        ut = path.d_alpha(tb) * x1 + path.d_sigma(tb) * eps
        with torch.autocast("cuda", dtype=torch.bfloat16):
            v = fwd(xt, t, y)
        loss = (v.float()[:, :LATENT[0]] - ut).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ep, [p.detach() for p in mp], 1.0 - ema_decay)

    return step


def _build_dit(name: str, variant: str, ckpt: bool):
    from vefast.models.lightningdit import LightningDiT_models
    from vefast.recipes.dit import enable_grad_checkpointing

    torch.manual_seed(0)
    model = LightningDiT_models[name](input_size=LATENT[1], in_channels=LATENT[0], num_classes=1000).cuda().train()
    if variant == "vefast":
        from vefast.nn import patch_lightningdit

        model = patch_lightningdit(model)
    if ckpt:
        enable_grad_checkpointing(model)
    fwd = torch.compile(model) if variant == "compile" else model
    return model, fwd


def _run_dit(rows: list[dict[str, Any]]) -> None:
    for name, batch in DIT_CASES:
        for ckpt in (False, True):
            for variant in ("vefast", "eager", "compile"):
                case = dict(name="train_step", model=name, batch=batch, grad_checkpointing=ckpt, dtype="bf16")
                try:
                    model, fwd = _build_dit(name, variant, ckpt)
                    row = measure(_dit_step(model, fwd, batch), variant=variant, warmup=5, rep=30, **case)
                    row["img_per_s"] = batch / (row["ms"] * 1e-3)
                except torch.cuda.OutOfMemoryError as e:  # a configuration that does not fit is a result too
                    row = {**case, "variant": variant, "error": f"OOM: {str(e).splitlines()[0]}"}
                rows.append(row)
                del model, fwd
                torch.cuda.empty_cache()


def _tokenizer_step(variant: str):
    """f16d32 tokenizer: encode, VE loss, decode, L1 + LPIPS (random VGG: timing only), VF loss."""
    import vefast
    from vefast.models.tokenizer import AutoencoderKL
    from vefast.ops.reparam import ve_loss_reference
    from vefast.ops.vf_loss import vf_loss_reference
    from vefast.recipes.metrics import build_lpips

    dev = torch.device("cuda")
    torch.manual_seed(0)
    ae = AutoencoderKL().to(dev).train()
    proj = torch.nn.Parameter(torch.randn(1024, 32, device=dev) * 0.02)
    lp = build_lpips("vgg", pretrained=False).to(dev)
    opt = torch.optim.AdamW(list(ae.parameters()) + [proj], lr=1e-4, betas=(0.5, 0.9), fused=True)
    x = torch.rand(TOK_BATCH, 3, TOK_SIZE, TOK_SIZE, device=dev) * 2 - 1
    feats = torch.randn(TOK_BATCH, 1024, 16, 16, device=dev)

    def losses(moments: torch.Tensor):
        mean, logvar = moments.float().chunk(2, 1)
        if variant == "vefast":
            ve = vefast.ve_loss(mean, logvar, reduction="sum")
            vf = vefast.vf_loss(ve.z, feats, proj)
        else:
            ve = ve_loss_reference(mean, logvar, torch.randn_like(mean), reduction="sum")
            vf = vf_loss_reference(ve.z, feats, proj)
        return ve, vf

    loss_fn = torch.compile(losses) if variant == "compile" else losses

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            moments = ae.encode(x)
        ve, vf = loss_fn(moments)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            recon = ae.decode(ve.z).float()
        rec = (x - recon).abs() + lp(recon, x)
        loss = rec.sum() / x.shape[0] + ve.loss + 0.1 * vf.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()

    return step


def _run_tokenizer(rows: list[dict[str, Any]]) -> None:
    for variant in ("vefast", "eager", "compile"):
        case = dict(name="tokenizer_step", model="f16d32", batch=TOK_BATCH, image_size=TOK_SIZE, dtype="bf16")
        row = measure(_tokenizer_step(variant), variant=variant, warmup=3, rep=20, **case)
        row["img_per_s"] = TOK_BATCH / (row["ms"] * 1e-3)
        rows.append(row)
        torch.cuda.empty_cache()


def _best_reference(rows: list[dict[str, Any]]) -> None:
    """``speedup_vs_best_ref``: vefast img/s over the fastest reference (eager or compile, either
    checkpointing setting) of the same model and batch."""
    for r in rows:
        if r["variant"] != "vefast" or "ms" not in r:
            continue
        refs = [q for q in rows if q["variant"] in ("eager", "compile") and "ms" in q
                and q["name"] == r["name"] and q["model"] == r["model"] and q["batch"] == r["batch"]]
        if refs:
            best = min(refs, key=lambda q: q["ms"])
            r["speedup_vs_best_ref"] = best["ms"] / r["ms"]
            r["best_ref"] = f"{best['variant']}{'+ckpt' if best.get('grad_checkpointing') else ''}"


def run(ceilings: dict) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    _run_dit(rows)
    _run_tokenizer(rows)
    ok = [r for r in rows if "ms" in r]
    add_ratios(ok, key=("name", "model", "batch", "grad_checkpointing"), reference="eager")
    add_ratios(ok, key=("name", "model", "batch", "grad_checkpointing"), reference="compile")
    _best_reference(rows)
    return rows
