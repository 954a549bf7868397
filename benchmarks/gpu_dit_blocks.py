"""GPU benchmark of the fused DiT block ops (issue 5, docs/math.md §7): one LightningDiT-XL block and each op.

Block case: one LightningDiT-XL/1 block (D = 1152, 16 heads of 72, RMSNorm, 2D RoPE, SwiGLU, released
flags), bf16 weights and activations, B = 32, N = 256, forward + backward (parameter and input grads).
Variants side by side: ``vefast`` (``patch_lightningdit``: norm_modulate, gated_residual_norm_modulate
for norm2, qk-norm/RoPE attention, swiglu), ``eager`` (the reference block) and ``compile``
(``torch.compile(block)``). ``act_mem_bytes`` is the memory the forward leaves allocated for the
backward (saved activations plus the block output): ``memory_allocated`` after the forward minus
before it, parameters and inputs excluded. Goals (H100): >= 1.3x eager, >= 1.1x compile,
activation memory <= 0.7x eager; block rows carry ``meets_goal``.

Op cases (B = 32, N = 256, D = 1152, bf16, fwd+bwd): norm_modulate (LayerNorm and RMSNorm),
gated_residual, gated_residual_norm_modulate (RMSNorm), swiglu (hidden 3072), each against its
eager reference and ``torch.compile`` of it; ``hbm_fraction`` = achieved GB/s (minimal bytes:
every tensor read or written once per pass) over the measured copy bandwidth.

    python -m benchmarks.run_gpu dit_blocks
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from .harness import add_ratios, measure

B, N, D, HEADS = 32, 256, 1152, 16
DT = torch.bfloat16


def _block_cases(ceilings: dict[str, float]) -> list[dict[str, Any]]:
    from vefast.models.lightningdit import LightningDiTBlock, VisionRotaryEmbeddingFast
    from vefast.nn.dit_modules import FusedDiTBlock

    torch.manual_seed(0)
    eager = LightningDiTBlock(D, HEADS, use_swiglu=True, use_rmsnorm=True).cuda().to(DT)
    with torch.no_grad():  # non-zero adaLN so every branch carries signal
        eager.adaLN_modulation[1].weight.normal_(0, 0.02)
    rope = VisionRotaryEmbeddingFast(dim=D // HEADS // 2, pt_seq_len=int(N ** 0.5)).cuda()
    fused = FusedDiTBlock(copy.deepcopy(eager))
    compiled = torch.compile(eager)
    x = torch.randn(B, N, D, device="cuda", dtype=DT, requires_grad=True)
    c = torch.randn(B, D, device="cuda", dtype=DT, requires_grad=True)
    dout = torch.randn(B, N, D, device="cuda", dtype=DT)
    hidden = int(2 / 3 * 4 * D)
    # matrix work of one block fwd+bwd (3x the forward): qkv, proj, w12, w3, adaLN, attention
    fwd_flops = 2.0 * B * N * D * (3 * D + D + 2 * hidden) + 2.0 * B * N * hidden * D + 2.0 * B * D * 6 * D \
        + 4.0 * B * N * N * D
    rows = []
    for variant, block in (("vefast", fused), ("eager", eager), ("compile", compiled)):
        params = [p for p in block.parameters()]

        def step(block=block, params=params):
            out = block(x, c, rope)
            return torch.autograd.grad(out, [x, c, *params], dout)

        step()  # warm up (compilation, autotuning) before measuring memory
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = block(x, c, rope)
        torch.cuda.synchronize()
        act = torch.cuda.memory_allocated() - before
        del out
        row = measure(step, name="lightningdit_xl_block", variant=variant, flops=3 * fwd_flops, B=B, N=N, D=D,
                      dtype="bfloat16")
        row["act_mem_bytes"] = act
        row["gemm_fraction"] = row["tflops"] / ceilings["bf16_gemm_tflops"]
        rows.append(row)
    ref = {r["variant"]: r for r in rows}
    for r in rows:
        r["act_mem_ratio_vs_eager"] = r["act_mem_bytes"] / ref["eager"]["act_mem_bytes"]
    return rows


def _op_cases(ceilings: dict[str, float]) -> list[dict[str, Any]]:
    import vefast
    from vefast.ops.gated_residual import gated_residual_norm_modulate_reference, gated_residual_reference
    from vefast.ops.norm_modulate import norm_modulate_reference
    from vefast.ops.swiglu import swiglu_reference

    g = torch.Generator(device="cuda").manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, device="cuda", generator=g, dtype=torch.float32).to(DT).requires_grad_()

    x, y, gate, shift, scale, w = t(B, N, D), t(B, N, D), t(B, D), t(B, D), t(B, D), t(D)
    hidden = int(2 / 3 * 4 * D)
    x12 = t(B, N, 2 * hidden)
    act = B * N * D * x.element_size()
    cases = {
        "norm_modulate_layernorm": (
            lambda f: f(x, shift, scale, norm="layernorm"), (x, shift, scale), 5 * act,
            vefast.norm_modulate, norm_modulate_reference),
        "norm_modulate_rmsnorm": (
            lambda f: f(x, shift, scale, norm="rmsnorm", weight=w), (x, shift, scale, w), 5 * act,
            vefast.norm_modulate, norm_modulate_reference),
        "gated_residual": (
            lambda f: f(x, y, gate), (x, y, gate), 5 * act, vefast.gated_residual, gated_residual_reference),
        "gated_residual_norm_modulate": (
            lambda f: sum(f(x, y, gate, shift=shift, scale=scale, norm="rmsnorm", weight=w)),
            (x, y, gate, shift, scale, w), 10 * act, vefast.gated_residual_norm_modulate,
            gated_residual_norm_modulate_reference),
        "swiglu": (
            lambda f: f(x12), (x12,), 8 * B * N * hidden * x12.element_size(), vefast.swiglu, swiglu_reference),
    }
    rows = []
    for name, (call, inputs, nbytes, fused_fn, ref_fn) in cases.items():
        compiled_ref = torch.compile(ref_fn)
        for variant, fn in (("vefast", fused_fn), ("eager", ref_fn), ("compile", compiled_ref)):
            out = call(fn)
            dout = torch.randn_like(out)

            def step(fn=fn, dout=dout, inputs=inputs):
                return torch.autograd.grad(call(fn), inputs, dout)

            row = measure(step, name=name, variant=variant, bytes_moved=nbytes, B=B, N=N, D=D, dtype="bfloat16")
            row["hbm_fraction"] = row["gbps"] / ceilings["hbm_copy_gbps"]
            rows.append(row)
    return rows


def run(ceilings: dict[str, float]) -> list[dict[str, Any]]:
    rows = _block_cases(ceilings) + _op_cases(ceilings)
    add_ratios(rows, key=("name",), reference="eager")
    add_ratios(rows, key=("name",), reference="compile")
    for r in rows:
        if r["variant"] == "vefast" and r["name"] == "lightningdit_xl_block":
            r["meets_goal"] = (r.get("speedup_vs_eager", 0.0) >= 1.3 and r.get("speedup_vs_compile", 0.0) >= 1.1
                               and r["act_mem_ratio_vs_eager"] <= 0.7)
    return rows
