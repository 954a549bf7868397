"""GPU benchmark of the fused reparameterization + VE loss (issue 2 §4).

fwd+bwd of ``DiagonalGaussianDistribution(moments).ve()`` (vefast) vs eager PyTorch (LDM's class +
the VE formula) vs ``torch.compile`` of that eager code, for VA-VAE latents (B, 32, 16, 16) and LDM
latents (B, 4, 32, 32), B in {32, 256}, bf16 and fp32. The backward gets a realistic upstream
gradient for z (what the decoder sends) plus the loss's.

Minimal bytes (s = element size, N = elements of z): forward reads mean, logvar and writes z (3 N s);
backward reads mean, logvar, dz and writes d mean, d logvar (5 N s). GB/s and the fraction of the
measured copy bandwidth ``ceilings['hbm_copy_gbps']`` are computed on these 8 N s bytes.
"""
from __future__ import annotations

from typing import Any

import torch

from .harness import add_ratios, measure

LAMBDA_VAR, LAMBDA_REG, TAU, DELTA = 0.1, 1e-6, 1.0, 1e-6


class _LDMGaussian:
    """LDM's DiagonalGaussianDistribution (eager), as trainers use it."""

    def __init__(self, parameters: torch.Tensor) -> None:
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self) -> torch.Tensor:
        return self.mean + self.std * torch.randn_like(self.mean)


def eager_ve(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    post = _LDMGaussian(moments)
    z = post.sample()
    var_loss = (1.0 / (post.var + DELTA)).mean()
    reg_loss = torch.exp(z.abs() - TAU).mean()
    return z, LAMBDA_VAR * var_loss + LAMBDA_REG * reg_loss


def fused_ve(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from vefast.nn import DiagonalGaussianDistribution

    out = DiagonalGaussianDistribution(moments).ve(lambda_var=LAMBDA_VAR, lambda_reg=LAMBDA_REG, tau=TAU, delta=DELTA)
    return out.z, out.loss


def _step(fn, moments: torch.Tensor, dz: torch.Tensor, one: torch.Tensor):
    def run() -> None:
        moments.grad = None
        z, loss = fn(moments)
        torch.autograd.backward((z, loss), (dz, one))

    return run


def _fwd(fn, moments: torch.Tensor):
    def run() -> None:
        with torch.no_grad():
            fn(moments)

    return run


def run(ceilings: dict[str, float]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for dtype in (torch.bfloat16, torch.float32):
        for C, H in ((32, 16), (4, 32)):
            for B in (32, 256):
                moments = torch.randn(B, 2 * C, H, H, device="cuda", dtype=dtype, requires_grad=True)
                dz = torch.randn(B, C, H, H, device="cuda", dtype=dtype)
                one = torch.ones((), device="cuda", dtype=torch.float32)
                n = B * C * H * H
                s = moments.element_size()
                torch._dynamo.reset()  # one fresh compile per case (no recompile limit, no dynamic shapes)
                variants = {"vefast": fused_ve, "eager": eager_ve, "compile": torch.compile(eager_ve, dynamic=False)}
                case = dict(B=B, C=C, H=H, W=H, dtype=str(dtype).replace("torch.", ""))
                for variant, fn in variants.items():
                    one_v = one if variant == "vefast" else one.to(dtype)
                    row = measure(_step(fn, moments, dz, one_v), name="ve_loss_fwd_bwd", variant=variant,
                                  bytes_moved=8 * n * s, **case)
                    row["hbm_fraction"] = row["gbps"] / ceilings["hbm_copy_gbps"]
                    rows.append(row)
                    row = measure(_fwd(fn, moments), name="ve_loss_fwd", variant=variant, bytes_moved=3 * n * s,
                                  **case)
                    row["hbm_fraction"] = row["gbps"] / ceilings["hbm_copy_gbps"]
                    rows.append(row)
                del moments, dz
    key = ("name", "B", "C", "H", "dtype")
    add_ratios(rows, key=key, reference="eager")
    add_ratios(rows, key=key, reference="compile")
    return rows
