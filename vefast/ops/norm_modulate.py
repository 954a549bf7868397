"""Fused adaLN modulation of a normalized activation (docs/math.md §7; DiT eq. "adaLN-Zero").

    out[b, n, :] = norm(x[b, n, :]) * weight * (1 + scale[b, :]) + shift[b, :]

with ``norm`` the non-affine LayerNorm of DiT / SiT, ``(x - mean) / sqrt(var + eps)``, or the
RMSNorm of LightningDiT, ``x / sqrt(mean(x^2) + eps)``; ``weight`` (D,) is the optional affine
weight of the norm (LightningDiT's ``RMSNorm.weight``), ``shift`` is optional (LightningDiT's
``wo_shift``). x is (B, N, D); shift and scale are (B, D), broadcast over the N tokens.

Choices:
- Forward: one pass over x; mean / rstd in fp32 registers, whatever the input dtype.
- Backward: one pass over (dout, x); mean / rstd are recomputed from x instead of being saved, and
  the normalized activation is never stored (eager saves ``norm(x)`` for the product with
  ``1 + scale``: one (B, N, D) activation per call). dshift / dscale / dweight are reduced
  deterministically: each program writes fp32 partial sums over its chunk of tokens into a
  (B, chunks, D) buffer, and one ``sum`` over the chunk axis finishes them (no float atomics).
  With P[b] = sum_n dout * xhat:  dscale = P * weight, dshift = sum_n dout,
  dweight = sum_b (1 + scale[b]) * P[b]. Only the partial rows stay in registers across a program's tiles:
  scale and weight are re-read per tile (cache hits; held, fp32 rows of 4096 / 8192 spilled on sm_80:
  codegen gate, docs/speed_checks.md).
- The output dtype is the promotion of the input dtypes, as in eager PyTorch. float64 inputs run
  the eager reference (the kernels compute in fp32).
- Strides of x, shift, scale and of the incoming gradient are passed to the kernels (shift/scale
  are usually chunks of the adaLN output, stride (6D, 1); gradients of ``sum`` have stride 0).
"""
from __future__ import annotations

from functools import reduce

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (check_finite_number, check_grid_axis, check_same_device, check_tensor, on_tensor_device,
                      triton_path)
from ._rownorm import _load_modulation, _norm_modulate_tile_bwd, _normalize, _row_tile

NORMS = ("layernorm", "rmsnorm")


# --------------------------------------------------------------------------------------------
# eager reference (the module sequence of DiT / LightningDiT; any dtype, float64 in tests)
# --------------------------------------------------------------------------------------------
def norm_reference(x: torch.Tensor, norm: str, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``nn.LayerNorm(D, elementwise_affine=weight is not None, bias=False)`` or LightningDiT's
    ``RMSNorm`` (fp32 statistics, cast back to ``x.dtype``, then ``* weight``)."""
    if norm == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), weight, None, eps)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    h = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)
    return h * weight if weight is not None else h


def modulate_reference(h: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """DiT's ``modulate``: ``h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)``."""
    out = h * (1 + scale.unsqueeze(1))
    return out + shift.unsqueeze(1) if shift is not None else out


def norm_modulate_reference(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor, *,
                            norm: str = "layernorm", weight: torch.Tensor | None = None,
                            eps: float = 1e-6) -> torch.Tensor:
    """Eager ``modulate(norm(x), shift, scale)``."""
    return modulate_reference(norm_reference(x, norm, weight, eps), shift, scale)


# --------------------------------------------------------------------------------------------
# Triton kernels (their row helpers: vefast.ops._rownorm)
# --------------------------------------------------------------------------------------------
@triton.jit
def _nm_fwd_kernel(X, SHIFT, SCALE, W, OUT, N, D, eps,
                   s_xb, s_xn, s_xd, s_shb, s_shd, s_scb, s_scd, s_w, s_ob, s_on,
                   IS_RMS: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_W: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b, rows, cols, cmask, mask, x = _row_tile(X, N, D, s_xb, s_xn, s_xd, BLOCK_N, BLOCK_D)
    xhat, rstd = _normalize(x, cmask, D, eps, IS_RMS)
    shift, scale1, w = _load_modulation(SHIFT, SCALE, W, b, cols, cmask, s_shb, s_shd, s_scb, s_scd, s_w,
                                        HAS_SHIFT, HAS_W)
    out = xhat * (w * scale1)[None, :] + shift[None, :]
    tl.store(OUT + b * s_ob + rows[:, None] * s_on + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _nm_bwd_kernel(DOUT, X, SCALE, W, DX, PART_P, PART_Q, N, D, eps, tiles_per_prog, n_chunks,
                   s_gb, s_gn, s_gd, s_xb, s_xn, s_xd, s_scb, s_scd, s_w, s_dxb, s_dxn,
                   IS_RMS: tl.constexpr, HAS_W: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc_p = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_q = tl.zeros([BLOCK_D], dtype=tl.float32)
    t = 0
    while t < tiles_per_prog:  # a while loop: the interpreter rejects range() over a runtime bound
        rows = ((pid * tiles_per_prog + t) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask = (rows < N)[:, None] & cmask[None, :]
        x = tl.load(X + b * s_xb + rows[:, None] * s_xn + cols[None, :] * s_xd, mask=mask, other=0.0).to(tl.float32)
        xhat, rstd = _normalize(x, cmask, D, eps, IS_RMS)
        g = tl.load(DOUT + b * s_gb + rows[:, None] * s_gn + cols[None, :] * s_gd, mask=mask, other=0.0).to(tl.float32)
        dx, acc_p, acc_q = _norm_modulate_tile_bwd(g, xhat, rstd, SCALE, W, b, cols, cmask, D, acc_p, acc_q,
                                                   s_scb, s_scd, s_w, IS_RMS, HAS_W)
        tl.store(DX + b * s_dxb + rows[:, None] * s_dxn + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        t += 1
    part = (b * n_chunks + pid) * D + cols
    tl.store(PART_P + part, acc_p, mask=cmask)
    tl.store(PART_Q + part, acc_q, mask=cmask)


# --------------------------------------------------------------------------------------------
# launchers (shared with vefast.ops.gated_residual)
# --------------------------------------------------------------------------------------------
def row_blocks(D: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps) for kernels that keep whole rows of length D in registers."""
    block_d = triton.next_power_of_2(D)
    block_n = max(1, min(16, 4096 // block_d))
    num_warps = 4 if block_d <= 1024 else (8 if block_d <= 4096 else 16)
    return block_n, block_d, num_warps


def chunking(B: int, N: int, block_n: int, target_programs: int = 264) -> tuple[int, int]:
    """(tiles_per_program, chunks per sample) of a backward grid (chunks, B) with ~target programs."""
    n_tiles = triton.cdiv(N, block_n)
    chunks = max(1, min(n_tiles, triton.cdiv(target_programs, B)))
    tiles = triton.cdiv(n_tiles, chunks)
    return tiles, triton.cdiv(n_tiles, tiles)


def promoted(*tensors: torch.Tensor | None) -> torch.dtype:
    return reduce(torch.promote_types, [t.dtype for t in tensors if t is not None])


def mod_strides(shift: torch.Tensor | None, scale: torch.Tensor, weight: torch.Tensor | None) -> tuple[int, ...]:
    s_sh = shift.stride() if shift is not None else (0, 0)
    return (*s_sh, *scale.stride(), weight.stride(0) if weight is not None else 0)


def finish_modulation_grads(part_p: torch.Tensor, part_q: torch.Tensor, shift: torch.Tensor | None,
                            scale: torch.Tensor, weight: torch.Tensor | None, x: torch.Tensor):
    """(dshift, dscale, dweight) from the (B, chunks, D) fp32 partials; empty tensors stand for None."""
    p = part_p.sum(1)
    dscale = (p * weight.float() if weight is not None else p).to(scale.dtype)
    dshift = part_q.sum(1).to(shift.dtype) if shift is not None else x.new_empty(0)
    dweight = ((1.0 + scale.float()) * p).sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)
    return dshift, dscale, dweight


@on_tensor_device
def _nm_fwd(x, shift, scale, weight, rms: bool, eps: float) -> torch.Tensor:
    B, N, D = x.shape
    check_grid_axis("norm_modulate: batch size B", B)
    out = torch.empty((B, N, D), dtype=promoted(x, shift, scale, weight), device=x.device)
    block_n, block_d, num_warps = row_blocks(D)
    grid = (triton.cdiv(N, block_n), B)
    _nm_fwd_kernel[grid](x, shift if shift is not None else scale, scale, weight if weight is not None else scale,
                         out, N, D, eps, *x.stride(), *mod_strides(shift, scale, weight), out.stride(0), out.stride(1),
                         IS_RMS=rms, HAS_SHIFT=shift is not None, HAS_W=weight is not None,
                         BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps)
    return out


@on_tensor_device
def _nm_bwd(dout, x, shift, scale, weight, rms: bool, eps: float):
    B, N, D = x.shape
    check_grid_axis("norm_modulate: batch size B", B)
    block_n, block_d, num_warps = row_blocks(D)
    tiles, chunks = chunking(B, N, block_n)
    dx = torch.empty((B, N, D), dtype=x.dtype, device=x.device)
    part_p = torch.empty((B, chunks, D), dtype=torch.float32, device=x.device)
    part_q = torch.empty_like(part_p)
    _nm_bwd_kernel[(chunks, B)](dout, x, scale, weight if weight is not None else scale, dx, part_p, part_q,
                                N, D, eps, tiles, chunks, *dout.stride(), *x.stride(), *scale.stride(),
                                weight.stride(0) if weight is not None else 0, dx.stride(0), dx.stride(1),
                                IS_RMS=rms, HAS_W=weight is not None,
                                BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps)
    return (dx, *finish_modulation_grads(part_p, part_q, shift, scale, weight, x))


# --------------------------------------------------------------------------------------------
# torch.library ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("vefast::norm_modulate", mutates_args=())
def _norm_modulate_op(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor,
                      weight: torch.Tensor | None, rms: bool, eps: float) -> torch.Tensor:
    return _nm_fwd(x, shift, scale, weight, rms, eps)


@_norm_modulate_op.register_fake
def _(x, shift, scale, weight, rms, eps):
    return x.new_empty(x.shape, dtype=promoted(x, shift, scale, weight))


@torch.library.custom_op("vefast::norm_modulate_backward", mutates_args=())
def _norm_modulate_bwd_op(dout: torch.Tensor, x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor,
                          weight: torch.Tensor | None, rms: bool, eps: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _nm_bwd(dout, x, shift, scale, weight, rms, eps)


@_norm_modulate_bwd_op.register_fake
def _(dout, x, shift, scale, weight, rms, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            shift.new_empty(shift.shape) if shift is not None else x.new_empty(0), scale.new_empty(scale.shape),
            weight.new_empty(weight.shape) if weight is not None else x.new_empty(0))


def _nm_setup_context(ctx, inputs, output):
    x, shift, scale, weight, rms, eps = inputs
    ctx.save_for_backward(x, shift, scale, weight)
    ctx.rms, ctx.eps = rms, eps


def _nm_backward(ctx, dout):
    x, shift, scale, weight = ctx.saved_tensors
    dx, dshift, dscale, dweight = _norm_modulate_bwd_op(dout, x, shift, scale, weight, ctx.rms, ctx.eps)
    return dx, (dshift if shift is not None else None), dscale, (dweight if weight is not None else None), None, None


_norm_modulate_op.register_autograd(_nm_backward, setup_context=_nm_setup_context)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def check_norm_modulate_args(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor, norm: str,
                             weight: torch.Tensor | None, eps: float) -> None:
    """Argument checks shared with :func:`vefast.gated_residual_norm_modulate` (x: (B, N, D))."""
    check_tensor("x", x)
    check_tensor("scale", scale)
    if shift is not None:
        check_tensor("shift", shift)
    if weight is not None:
        check_tensor("weight", weight)
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, N, D), got {tuple(x.shape)}")
    B, _, D = x.shape
    if scale.shape != (B, D):
        raise ValueError(f"scale must have shape (B, D) = {(B, D)}, got {tuple(scale.shape)}")
    if shift is not None and shift.shape != (B, D):
        raise ValueError(f"shift must have shape (B, D) = {(B, D)}, got {tuple(shift.shape)}")
    if weight is not None and weight.shape != (D,):
        raise ValueError(f"weight must have shape (D,) = {(D,)}, got {tuple(weight.shape)}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    check_finite_number("eps", eps, min_value=0.0, strict=True)
    check_same_device(x=x, shift=shift, scale=scale, weight=weight)


def norm_modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor, *, norm: str = "layernorm",
                  weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """``norm(x) * weight * (1 + scale) + shift`` over the last axis (docs/math.md §7, DiT's adaLN modulate).

    x: (B, N, D); shift (or None), scale: (B, D) broadcast over tokens; norm: "layernorm"
    (non-affine, DiT / SiT) or "rmsnorm" (LightningDiT); weight: optional (D,) norm weight.
    Returns (B, N, D) in the promoted dtype of the inputs. Differentiable in x, shift, scale, weight.
    """
    check_norm_modulate_args(x, shift, scale, norm, weight, eps)
    if not triton_path("norm_modulate", x, shift, scale, weight) or x.numel() == 0:
        return norm_modulate_reference(x, shift, scale, norm=norm, weight=weight, eps=eps)
    return _norm_modulate_op(x, shift, scale, weight, norm == "rmsnorm", float(eps))
