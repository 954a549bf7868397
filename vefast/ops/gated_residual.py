"""Gated residual of adaLN-Zero, optionally fused with the next adaLN modulation (MATH.md §7).

    h[b, n, :] = x[b, n, :] + gate[b, :] * y[b, n, :]                       (DiT's gated residual)
    out        = norm(h) * weight * (1 + scale[b, :]) + shift[b, :]          (optional, fused)

In a DiT block the attention branch ends with ``x = x + gate_msa * attn(...)`` and the MLP branch
starts with ``modulate(norm2(x), shift_mlp, scale_mlp)``: the fused form reads x and y once and
writes both the new residual h and the MLP input, instead of three passes (residual, norm,
modulate) and one saved normalized activation.

Choices:
- Backward of the plain op: dx = dout (returned as is, no kernel), dy = dout * gate, and
  dgate = sum_n dout * y reduced deterministically (per-program fp32 partials over chunks of
  tokens, then one ``sum``; no float atomics). y and gate are saved (eager saves the same).
- Backward of the fused op: the residual h (an output, alive anyway as the next layer's input) is
  saved; mean / rstd and norm(h) are recomputed. One pass computes the total gradient of h
  (incoming dh plus the norm-modulate backward), writes dx and dy, and the partials of dgate,
  dshift, dscale (and dweight), all finished by one deterministic ``sum``.
- API: ``gated_residual(x, y, gate)`` returns h; ``gated_residual(x, y, gate,
  norm_modulate=(shift, scale, norm, weight, eps))`` (a :class:`NormModulateArgs` or a plain
  tuple; trailing fields default to "layernorm", None, 1e-6) returns ``GatedResidualOutput(h, out)``.
- Output dtypes are the promotion of the input dtypes, as in eager PyTorch; float64 runs eager.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import check_grid_axis, check_same_device, check_tensor, on_tensor_device, triton_path
from .norm_modulate import (NormModulateArgs, _load_modulation, _normalize, _normalize_bwd, _row_tile,
                            check_norm_modulate_args, chunking, finish_modulation_grads, mod_strides,
                            norm_modulate_reference, promoted, row_blocks)


class GatedResidualOutput(NamedTuple):
    """``residual`` = x + gate * y (the new residual stream); ``modulated`` = norm_modulate(residual, ...)."""

    residual: torch.Tensor
    modulated: torch.Tensor


# --------------------------------------------------------------------------------------------
# eager reference
# --------------------------------------------------------------------------------------------
def gated_residual_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, *,
                             norm_modulate: NormModulateArgs | tuple | None = None
                             ) -> torch.Tensor | GatedResidualOutput:
    """Eager ``x + gate.unsqueeze(1) * y`` (then ``modulate(norm(h), shift, scale)``)."""
    h = x + gate.unsqueeze(1) * y
    if norm_modulate is None:
        return h
    a = NormModulateArgs(*norm_modulate)
    return GatedResidualOutput(h, norm_modulate_reference(h, a.shift, a.scale, norm=a.norm, weight=a.weight, eps=a.eps))


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _gr_fwd_kernel(X, Y, GATE, SHIFT, SCALE, W, H, OUT, N, D, eps,
                   s_xb, s_xn, s_xd, s_yb, s_yn, s_yd, s_gb, s_gd,
                   s_shb, s_shd, s_scb, s_scd, s_w, s_hb, s_hn,
                   FUSE_NORM: tl.constexpr, IS_RMS: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_W: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b, rows, cols, cmask, mask, x = _row_tile(X, N, D, s_xb, s_xn, s_xd, BLOCK_N, BLOCK_D)
    y = tl.load(Y + b * s_yb + rows[:, None] * s_yn + cols[None, :] * s_yd, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + b * s_gb + cols * s_gd, mask=cmask, other=0.0).to(tl.float32)
    h = (x + gate[None, :] * y).to(H.dtype.element_ty)
    offs = b * s_hb + rows[:, None] * s_hn + cols[None, :]
    tl.store(H + offs, h, mask=mask)
    if FUSE_NORM:
        # normalize the residual as stored (rounded to its dtype), as the eager norm would see it
        xhat, rstd = _normalize(h.to(tl.float32), cmask, D, eps, IS_RMS)
        shift, scale1, w = _load_modulation(SHIFT, SCALE, W, b, cols, cmask, s_shb, s_shd, s_scb, s_scd, s_w,
                                            HAS_SHIFT, HAS_W)
        out = xhat * (w * scale1)[None, :] + shift[None, :]
        tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gr_bwd_kernel(DH, DOUT, HRES, Y, GATE, SCALE, W, DX, DY, PART_G, PART_P, PART_Q,
                   N, D, eps, tiles_per_prog, n_chunks,
                   s_dhb, s_dhn, s_dhd, s_gob, s_gon, s_god, s_hb, s_hn, s_hd, s_yb, s_yn, s_yd,
                   s_gb, s_gd, s_scb, s_scd, s_w, s_ob, s_on,
                   FUSE_NORM: tl.constexpr, HAS_DH: tl.constexpr, WRITE_DX: tl.constexpr,
                   IS_RMS: tl.constexpr, HAS_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    gate = tl.load(GATE + b * s_gb + cols * s_gd, mask=cmask, other=0.0).to(tl.float32)
    if FUSE_NORM:
        _, scale1, w = _load_modulation(SCALE, SCALE, W, b, cols, cmask, 0, 0, s_scb, s_scd, s_w, False, HAS_W)
        ws = (w * scale1)[None, :]
    acc_g = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_p = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_q = tl.zeros([BLOCK_D], dtype=tl.float32)
    t = 0
    while t < tiles_per_prog:  # a while loop: the interpreter rejects range() over a runtime bound
        rows = ((pid * tiles_per_prog + t) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask = (rows < N)[:, None] & cmask[None, :]
        rc = rows[:, None]
        cc = cols[None, :]
        if HAS_DH:
            dh = tl.load(DH + b * s_dhb + rc * s_dhn + cc * s_dhd, mask=mask, other=0.0).to(tl.float32)
        else:
            dh = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        if FUSE_NORM:
            g = tl.load(DOUT + b * s_gob + rc * s_gon + cc * s_god, mask=mask, other=0.0).to(tl.float32)
            hres = tl.load(HRES + b * s_hb + rc * s_hn + cc * s_hd, mask=mask, other=0.0).to(tl.float32)
            xhat, rstd = _normalize(hres, cmask, D, eps, IS_RMS)
            acc_p += tl.sum(g * xhat, axis=0)
            acc_q += tl.sum(g, axis=0)
            dh += _normalize_bwd(g * ws, xhat, rstd, D, IS_RMS)
        y = tl.load(Y + b * s_yb + rc * s_yn + cc * s_yd, mask=mask, other=0.0).to(tl.float32)
        dh = tl.where(mask, dh, 0.0)
        acc_g += tl.sum(dh * y, axis=0)
        offs = b * s_ob + rc * s_on + cc
        tl.store(DY + offs, (dh * gate[None, :]).to(DY.dtype.element_ty), mask=mask)
        if WRITE_DX:
            tl.store(DX + offs, dh.to(DX.dtype.element_ty), mask=mask)
        t += 1
    part = (b * n_chunks + pid) * D + cols
    tl.store(PART_G + part, acc_g, mask=cmask)
    if FUSE_NORM:
        tl.store(PART_P + part, acc_p, mask=cmask)
        tl.store(PART_Q + part, acc_q, mask=cmask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
@on_tensor_device
def _gr_fwd(x, y, gate, shift, scale, weight, fuse: bool, rms: bool, eps: float):
    B, N, D = x.shape
    check_grid_axis("gated_residual: batch size B", B)
    h = torch.empty((B, N, D), dtype=promoted(x, y, gate), device=x.device)
    out = torch.empty((B, N, D), dtype=promoted(h, shift, scale, weight), device=x.device) if fuse else h
    block_n, block_d, num_warps = row_blocks(D)
    ms = mod_strides(shift, scale, weight) if fuse else (0, 0, 0, 0, 0)
    _gr_fwd_kernel[(triton.cdiv(N, block_n), B)](
        x, y, gate, shift if shift is not None else gate, scale if scale is not None else gate,
        weight if weight is not None else gate, h, out, N, D, eps,
        *x.stride(), *y.stride(), *gate.stride(), *ms, h.stride(0), h.stride(1),
        FUSE_NORM=fuse, IS_RMS=rms, HAS_SHIFT=shift is not None, HAS_W=weight is not None,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps)
    return h, out


@on_tensor_device
def _gr_bwd(dh, dout, hres, y, gate, shift, scale, weight, x_dtype, fuse: bool, rms: bool, eps: float):
    """(dx or empty, dy, dgate, dshift, dscale, dweight); empty tensors stand for "not computed"."""
    B, N, D = y.shape
    check_grid_axis("gated_residual: batch size B", B)
    dev = y.device
    block_n, block_d, num_warps = row_blocks(D)
    tiles, chunks = chunking(B, N, block_n)
    dy = torch.empty((B, N, D), dtype=y.dtype, device=dev)
    dx = torch.empty((B, N, D), dtype=x_dtype, device=dev) if fuse else dy
    part_g = torch.empty((B, chunks, D), dtype=torch.float32, device=dev)
    part_p = torch.empty_like(part_g) if fuse else part_g
    part_q = torch.empty_like(part_g) if fuse else part_g
    some = dh if dh is not None else dout
    _gr_bwd_kernel[(chunks, B)](
        some, dout if dout is not None else some, hres if hres is not None else y, y, gate,
        scale if scale is not None else gate, weight if weight is not None else gate,
        dx, dy, part_g, part_p, part_q, N, D, eps, tiles, chunks,
        *(dh.stride() if dh is not None else (0, 0, 0)), *(dout.stride() if dout is not None else (0, 0, 0)),
        *(hres.stride() if hres is not None else (0, 0, 0)), *y.stride(), *gate.stride(),
        *(scale.stride() if scale is not None else (0, 0)), weight.stride(0) if weight is not None else 0,
        dy.stride(0), dy.stride(1),
        FUSE_NORM=fuse, HAS_DH=dh is not None, WRITE_DX=fuse, IS_RMS=rms, HAS_W=weight is not None,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps)
    dgate = part_g.sum(1).to(gate.dtype)
    if not fuse:
        empty = y.new_empty(0)
        return empty, dy, dgate, empty, empty, empty
    return (dx, dy, dgate, *finish_modulation_grads(part_p, part_q, shift, scale, weight, y))


# --------------------------------------------------------------------------------------------
# torch.library ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("vefast::gated_residual", mutates_args=())
def _gated_residual_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return _gr_fwd(x, y, gate, None, None, None, False, False, 0.0)[0]


@_gated_residual_op.register_fake
def _(x, y, gate):
    return x.new_empty(x.shape, dtype=promoted(x, y, gate))


@torch.library.custom_op("vefast::gated_residual_backward", mutates_args=())
def _gated_residual_bwd_op(dout: torch.Tensor, y: torch.Tensor, gate: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    _, dy, dgate, _, _, _ = _gr_bwd(dout, None, None, y, gate, None, None, None, y.dtype, False, False, 0.0)
    return dy, dgate


@_gated_residual_bwd_op.register_fake
def _(dout, y, gate):
    return torch.empty_like(y, memory_format=torch.contiguous_format), gate.new_empty(gate.shape)


def _gr_setup_context(ctx, inputs, output):
    x, y, gate = inputs
    ctx.save_for_backward(y, gate)
    ctx.x_dtype = x.dtype


def _gr_backward(ctx, dout):
    y, gate = ctx.saved_tensors
    dy, dgate = _gated_residual_bwd_op(dout, y, gate)
    return dout.to(ctx.x_dtype), dy, dgate


_gated_residual_op.register_autograd(_gr_backward, setup_context=_gr_setup_context)


@torch.library.custom_op("vefast::gated_residual_norm_modulate", mutates_args=())
def _grnm_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor,
             weight: torch.Tensor | None, rms: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _gr_fwd(x, y, gate, shift, scale, weight, True, rms, eps)


@_grnm_op.register_fake
def _(x, y, gate, shift, scale, weight, rms, eps):
    h_dtype = promoted(x, y, gate)
    out_dtype = reduce_dtype(h_dtype, shift, scale, weight)
    return x.new_empty(x.shape, dtype=h_dtype), x.new_empty(x.shape, dtype=out_dtype)


def reduce_dtype(dtype: torch.dtype, *tensors: torch.Tensor | None) -> torch.dtype:
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


@torch.library.custom_op("vefast::gated_residual_norm_modulate_backward", mutates_args=())
def _grnm_bwd_op(dh: torch.Tensor | None, dout: torch.Tensor, hres: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                 shift: torch.Tensor | None, scale: torch.Tensor, weight: torch.Tensor | None, x_dtype: torch.dtype,
                 rms: bool, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _gr_bwd(dh, dout, hres, y, gate, shift, scale, weight, x_dtype, True, rms, eps)


@_grnm_bwd_op.register_fake
def _(dh, dout, hres, y, gate, shift, scale, weight, x_dtype, rms, eps):
    return (y.new_empty(y.shape, dtype=x_dtype), torch.empty_like(y, memory_format=torch.contiguous_format),
            gate.new_empty(gate.shape), shift.new_empty(shift.shape) if shift is not None else y.new_empty(0),
            scale.new_empty(scale.shape), weight.new_empty(weight.shape) if weight is not None else y.new_empty(0))


def _grnm_setup_context(ctx, inputs, output):
    x, y, gate, shift, scale, weight, rms, eps = inputs
    ctx.save_for_backward(output[0], y, gate, shift, scale, weight)
    ctx.x_dtype, ctx.rms, ctx.eps = x.dtype, rms, eps


def _grnm_backward(ctx, dh, dout):
    hres, y, gate, shift, scale, weight = ctx.saved_tensors
    dx, dy, dgate, dshift, dscale, dweight = _grnm_bwd_op(dh, dout, hres, y, gate, shift, scale, weight,
                                                         ctx.x_dtype, ctx.rms, ctx.eps)
    return (dx, dy, dgate, dshift if shift is not None else None, dscale,
            dweight if weight is not None else None, None, None)


_grnm_op.register_autograd(_grnm_backward, setup_context=_grnm_setup_context)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, *,
                   norm_modulate: NormModulateArgs | tuple | None = None
                   ) -> torch.Tensor | GatedResidualOutput:
    """``h = x + gate * y`` with x, y (B, N, D) and gate (B, D) broadcast over tokens (adaLN-Zero).

    With ``norm_modulate=(shift, scale[, norm[, weight[, eps]]])`` also computes the next
    ``norm_modulate(h, shift, scale, norm=..., weight=..., eps=...)`` in the same pass and returns
    ``GatedResidualOutput(residual=h, modulated=out)``. Differentiable in every tensor argument.
    """
    check_tensor("x", x)
    check_tensor("y", y)
    check_tensor("gate", gate)
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, N, D), got {tuple(x.shape)}")
    if y.shape != x.shape:
        raise ValueError(f"y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    if gate.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"gate must have shape (B, D) = {(x.shape[0], x.shape[2])}, got {tuple(gate.shape)}")
    check_same_device(x=x, y=y, gate=gate)
    if norm_modulate is None:
        if not triton_path("gated_residual", x, y, gate) or x.numel() == 0:
            return gated_residual_reference(x, y, gate)
        return _gated_residual_op(x, y, gate)
    if not isinstance(norm_modulate, tuple) or not 2 <= len(norm_modulate) <= 5:
        raise TypeError("norm_modulate must be a NormModulateArgs or a tuple (shift, scale[, norm[, weight[, eps]]]), "
                        f"got {type(norm_modulate).__name__}"
                        + (f" of length {len(norm_modulate)}" if isinstance(norm_modulate, tuple) else ""))
    a = NormModulateArgs(*norm_modulate)
    check_norm_modulate_args(x, a.shift, a.scale, a.norm, a.weight, a.eps)
    if not triton_path("gated_residual", x, y, gate, a.shift, a.scale, a.weight) or x.numel() == 0:
        return gated_residual_reference(x, y, gate, norm_modulate=a)
    h, out = _grnm_op(x, y, gate, a.shift, a.scale, a.weight, a.norm == "rmsnorm", float(a.eps))
    return GatedResidualOutput(h, out)
