"""GPU benchmark of the alignment losses (issue 4, docs/math.md §3): fwd+bwd time and peak memory.

Variants side by side: ``vefast`` (fused), ``eager`` (the docs/math.md §3 formulas in eager PyTorch at the
input dtype, i.e. VA-VAE's / ReaLS' code path: ``vf_loss_reference(upcast=False)``,
``align_loss_reference(upcast=False)``) and ``compile`` (``torch.compile`` of the eager code).
Cases: B = 64, C = 32, N in {256, 1024}, D' in {768, 1024}, bf16.

Goals (H100): VF loss >= 3x eager and peak memory <= 1/4 of eager at N = 1024; alignment loss
fwd+bwd >= 80% of the measured HBM copy bandwidth. Rows carry ``meets_goal``.

    python -m benchmarks.run_gpu align
"""
from __future__ import annotations

from typing import Any

import torch

from .harness import add_ratios, measure

B, C = 64, 32
TOKENS = (256, 1024)
FEATURE_DIMS = (768, 1024)


def _vf_cases(ceilings: dict[str, float]) -> list[dict[str, Any]]:
    import vefast
    from vefast.ops.vf_loss import vf_loss_reference

    def eager(z, f, w):
        return vf_loss_reference(z, f, w, upcast=False).loss

    compiled = torch.compile(eager)
    variants = {"vefast": lambda z, f, w: vefast.vf_loss(z, f, w).loss, "eager": eager, "compile": compiled}
    rows = []
    for n in TOKENS:
        side = int(round(n ** 0.5))
        for d in FEATURE_DIMS:
            g = torch.Generator(device="cuda").manual_seed(n + d)
            z = torch.randn(B, C, side, side, device="cuda", generator=g).bfloat16().requires_grad_()
            f = torch.randn(B, d, side, side, device="cuda", generator=g).bfloat16()
            w = (torch.randn(d, C, device="cuda", generator=g) / C ** 0.5).bfloat16().requires_grad_()
            # fused work: the D' contraction of the feature similarities once, three C-dim tile products
            flops = 2.0 * B * n * n * d + 3 * 2.0 * B * n * n * C
            for variant, fn in variants.items():
                def step(fn=fn):
                    return torch.autograd.grad(fn(z, f, w), (z, w))

                row = measure(step, name="vf_loss", variant=variant, flops=flops, B=B, C=C, N=n, D=d,
                              dtype="bfloat16")
                row["gemm_fraction"] = row["tflops"] / ceilings["bf16_gemm_tflops"]
                rows.append(row)
            del z, f, w
            torch.cuda.empty_cache()
    return rows


def _align_cases(ceilings: dict[str, float]) -> list[dict[str, Any]]:
    import vefast
    from vefast.ops.align_loss import align_loss_reference

    def eager(p, t):
        return align_loss_reference(p, t, upcast=False).loss

    compiled = torch.compile(eager)
    variants = {"vefast": lambda p, t: vefast.align_loss(p, t).loss, "eager": eager, "compile": compiled}
    rows = []
    for n in TOKENS:
        for d in FEATURE_DIMS:
            g = torch.Generator(device="cuda").manual_seed(n * d)
            p = torch.randn(B, n, d, device="cuda", generator=g).bfloat16().requires_grad_()
            t = torch.randn(B, n, d, device="cuda", generator=g).bfloat16()
            # minimal traffic: forward reads pred and target, backward reads both and writes d pred
            bytes_moved = 5.0 * p.numel() * p.element_size()
            for variant, fn in variants.items():
                def step(fn=fn):
                    return torch.autograd.grad(fn(p, t), (p,))

                row = measure(step, name="align_loss", variant=variant, bytes_moved=bytes_moved, B=B, N=n, D=d,
                              dtype="bfloat16")
                row["hbm_fraction"] = row["gbps"] / ceilings["hbm_copy_gbps"]
                rows.append(row)
            del p, t
            torch.cuda.empty_cache()
    return rows


def run(ceilings: dict[str, float]) -> list[dict[str, Any]]:
    rows = _vf_cases(ceilings) + _align_cases(ceilings)
    key = ("name", "B", "N", "D")
    add_ratios(rows, key=key, reference="eager")
    add_ratios(rows, key=key, reference="compile")
    for r in rows:
        if r["variant"] != "vefast":
            continue
        if r["name"] == "vf_loss" and r["N"] == 1024:
            r["meets_goal"] = (r.get("speedup_vs_eager", 0.0) >= 3.0
                               and r.get("mem_ratio_vs_eager", 1.0) <= 0.25)
        elif r["name"] == "align_loss":
            r["meets_goal"] = r["hbm_fraction"] >= 0.8
    return rows
