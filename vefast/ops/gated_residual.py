"""Gated residual of adaLN-Zero, alone or fused with the next adaLN modulation (docs/math.md §7).

    h[b, n, :] = x[b, n, :] + gate[b, :] * y[b, n, :]                (gated_residual: DiT's gated residual)
    out        = norm(h) * weight * (1 + scale[b, :]) + shift[b, :]   (gated_residual_norm_modulate: h and out)

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
- API: one function per use, each with one return type. :func:`gated_residual` returns h;
  :func:`gated_residual_norm_modulate` takes the next norm_modulate's arguments as keywords (``shift``,
  ``scale``, ``norm``, ``weight``, ``eps``, as :func:`vefast.norm_modulate`) and returns
  ``GatedResidualNormOutput(residual=h, modulated=out)``.
- Output dtypes are the promotion of the input dtypes, as in eager PyTorch; float64 runs eager.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import check_grid_axis, check_same_device, check_tensor, on_tensor_device, triton_path
from ._rownorm import _load_modulation, _modulation_row, _norm_modulate_tile_bwd, _normalize, _row_tile
from .norm_modulate import (check_norm_modulate_args, chunking, finish_modulation_grads, mod_strides,
                            norm_modulate_reference, promoted, row_blocks)


class GatedResidualNormOutput(NamedTuple):
    """What :func:`gated_residual_norm_modulate` returns: ``residual`` = x + gate * y (the new residual
    stream), ``modulated`` = norm_modulate(residual, shift, scale, ...) (the next sub-block's input)."""

    residual: torch.Tensor
    modulated: torch.Tensor


# --------------------------------------------------------------------------------------------
# eager references
# --------------------------------------------------------------------------------------------
def gated_residual_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Eager ``x + gate.unsqueeze(1) * y``."""
    return x + gate.unsqueeze(1) * y


def gated_residual_norm_modulate_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, *,
                                           shift: torch.Tensor | None, scale: torch.Tensor, norm: str = "layernorm",
                                           weight: torch.Tensor | None = None, eps: float = 1e-6
                                           ) -> GatedResidualNormOutput:
    """Eager ``h = x + gate.unsqueeze(1) * y`` then ``modulate(norm(h), shift, scale)``."""
    h = gated_residual_reference(x, y, gate)
    return GatedResidualNormOutput(h, norm_modulate_reference(h, shift, scale, norm=norm, weight=weight, eps=eps))


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
                   IS_RMS: tl.constexpr, HAS_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   SPLIT: tl.constexpr):
    """Per tile of rows: dh (+ the norm-modulate backward), dx = dh, dy = gate * dh, and the fp32 partials
    of dgate (and of dscale, dshift) summed over the program's tiles. Only the partial rows stay in registers
    across tiles: the (B, D) vectors gate, scale, weight are re-read per tile (cache hits), and each
    (BLOCK_N, BLOCK_D) operand is loaded where it is used. ``SPLIT`` > 1 (fused, rows wider than 4096): the
    grid's axis 0 is (chunk, column slice of BLOCK_D); a program reads its rows whole for their statistics
    (:func:`_split_stats`, its neighbour reads the same rows at the same time: L2 hits) and computes the
    gradients and partials of its slice (:func:`_bwd_slice`): whole rows of 8192 fp32 per program spilled
    (codegen gate, docs/speed_checks.md)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if SPLIT > 1:  # program (chunk, slice): the row statistics from every slice, the gradients of its own
        chunk = pid // SPLIT
        cols = (pid % SPLIT) * BLOCK_D + tl.arange(0, BLOCK_D)
        acc_g = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_p = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_q = tl.zeros([BLOCK_D], dtype=tl.float32)
        t = 0
        while t < tiles_per_prog:
            rows = ((chunk * tiles_per_prog + t) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
            rc = rows[:, None]
            rmask = (rows < N)[:, None]
            rp = _RowPtrs(DH + b * s_dhb + rc * s_dhn, DOUT + b * s_gob + rc * s_gon, HRES + b * s_hb + rc * s_hn,
                          Y + b * s_yb + rc * s_yn, b * s_ob + rc * s_on)
            mean, rstd, c1, c2 = _split_stats(rp, SCALE, W, b, rmask, D, eps, s_god, s_hd, s_scb, s_scd, s_w,
                                              IS_RMS, HAS_W, SPLIT, BLOCK_N, BLOCK_D)
            acc_g, acc_p, acc_q = _bwd_slice(rp, GATE, SCALE, W, DX, DY, b, cols, rmask, D, mean, rstd, c1, c2,
                                             acc_g, acc_p, acc_q, s_dhd, s_god, s_hd, s_yd, s_gb, s_gd,
                                             s_scb, s_scd, s_w, HAS_DH, WRITE_DX, IS_RMS, HAS_W)
            t += 1
        part = (b * n_chunks + chunk) * D + cols
        tl.store(PART_G + part, acc_g, mask=cols < D)
        tl.store(PART_P + part, acc_p, mask=cols < D)
        tl.store(PART_Q + part, acc_q, mask=cols < D)
    else:
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        acc_g = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_p = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_q = tl.zeros([BLOCK_D], dtype=tl.float32)
        t = 0
        while t < tiles_per_prog:  # a while loop: the interpreter rejects range() over a runtime bound
            rows = ((pid * tiles_per_prog + t) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
            mask = (rows < N)[:, None] & cmask[None, :]
            rc = rows[:, None]
            cc = cols[None, :]
            if FUSE_NORM:
                g = tl.load(DOUT + b * s_gob + rc * s_gon + cc * s_god, mask=mask, other=0.0).to(tl.float32)
                hres = tl.load(HRES + b * s_hb + rc * s_hn + cc * s_hd, mask=mask, other=0.0).to(tl.float32)
                xhat, rstd = _normalize(hres, cmask, D, eps, IS_RMS)
                dh, acc_p, acc_q = _norm_modulate_tile_bwd(g, xhat, rstd, SCALE, W, b, cols, cmask, D, acc_p, acc_q,
                                                           s_scb, s_scd, s_w, IS_RMS, HAS_W)
                if HAS_DH:
                    dh += tl.load(DH + b * s_dhb + rc * s_dhn + cc * s_dhd, mask=mask, other=0.0).to(tl.float32)
            elif HAS_DH:
                dh = tl.load(DH + b * s_dhb + rc * s_dhn + cc * s_dhd, mask=mask, other=0.0).to(tl.float32)
            else:
                dh = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            dh = tl.where(mask, dh, 0.0)
            offs = b * s_ob + rc * s_on + cc
            if WRITE_DX:
                tl.store(DX + offs, dh.to(DX.dtype.element_ty), mask=mask)
            y = tl.load(Y + b * s_yb + rc * s_yn + cc * s_yd, mask=mask, other=0.0).to(tl.float32)
            acc_g += tl.sum(dh * y, axis=0)
            gate = tl.load(GATE + b * s_gb + cols * s_gd, mask=cmask, other=0.0).to(tl.float32)
            tl.store(DY + offs, (dh * gate[None, :]).to(DY.dtype.element_ty), mask=mask)
            t += 1
        part = (b * n_chunks + pid) * D + cols
        tl.store(PART_G + part, acc_g, mask=cmask)
        if FUSE_NORM:
            tl.store(PART_P + part, acc_p, mask=cmask)
            tl.store(PART_Q + part, acc_q, mask=cmask)


class _RowPtrs(NamedTuple):
    """The row bases of one tile (``SPLIT`` > 1): dh, dout, h, y pointers and the dx / dy offset."""

    dh: object
    dout: object
    h: object
    y: object
    out: object


@triton.jit
def _split_stats(rp, SCALE, W, b, rmask, D, eps, s_god, s_hd, s_scb, s_scd, s_w, IS_RMS: tl.constexpr,
                 HAS_W: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(mean (0 for RMS), rstd, c1 = mean(gw), c2 = mean(gw * xhat)) of the rows, read slice by slice, with gw =
    dout * weight * (1 + scale): the statistics of :func:`_normalize` / :func:`_normalize_bwd` (LayerNorm: the
    mean first, then the centered sums, as there)."""
    zero = tl.zeros([BLOCK_N], dtype=tl.float32)
    s1, s2, s3 = zero, zero, zero
    for p in tl.static_range(SPLIT):
        cols = p * BLOCK_D + tl.arange(0, BLOCK_D)
        m = rmask & (cols < D)[None, :]
        h = tl.load(rp.h + cols[None, :] * s_hd, mask=m, other=0.0).to(tl.float32)
        if IS_RMS:
            gw = tl.load(rp.dout + cols[None, :] * s_god, mask=m, other=0.0).to(tl.float32) * \
                _modulation_row(SCALE, W, b, cols, cols < D, s_scb, s_scd, s_w, HAS_W)
            s1 += tl.sum(h * h, axis=1)
            s2 += tl.sum(gw * h, axis=1)
        else:
            s1 += tl.sum(h, axis=1)
    if IS_RMS:
        rstd = tl.rsqrt(s1 / D + eps)
        return zero, rstd, zero, s2 * rstd / D
    mean = s1 / D
    s1, s2, s3 = zero, zero, zero
    for p in tl.static_range(SPLIT):
        cols = p * BLOCK_D + tl.arange(0, BLOCK_D)
        m = rmask & (cols < D)[None, :]
        xc = tl.where(m, tl.load(rp.h + cols[None, :] * s_hd, mask=m, other=0.0).to(tl.float32) - mean[:, None], 0.0)
        gw = tl.load(rp.dout + cols[None, :] * s_god, mask=m, other=0.0).to(tl.float32) * \
            _modulation_row(SCALE, W, b, cols, cols < D, s_scb, s_scd, s_w, HAS_W)
        s1 += tl.sum(xc * xc, axis=1)
        s2 += tl.sum(gw * xc, axis=1)
        s3 += tl.sum(gw, axis=1)
    rstd = tl.rsqrt(s1 / D + eps)
    return mean, rstd, s3 / D, s2 * rstd / D


@triton.jit
def _bwd_slice(rp, GATE, SCALE, W, DX, DY, b, cols, rmask, D, mean, rstd, c1, c2, acc_g, acc_p, acc_q,
              s_dhd, s_god, s_hd, s_yd, s_gb, s_gd, s_scb, s_scd, s_w,
              HAS_DH: tl.constexpr, WRITE_DX: tl.constexpr, IS_RMS: tl.constexpr, HAS_W: tl.constexpr):
    """The rows' slice ``cols``: xhat again from h and the statistics, the partials, dh, dx, dy."""
    cmask = cols < D
    mask = rmask & cmask[None, :]
    cc = cols[None, :]
    g = tl.load(rp.dout + cc * s_god, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(rp.h + cc * s_hd, mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        xhat = h * rstd[:, None]
    else:
        xhat = tl.where(mask, h - mean[:, None], 0.0) * rstd[:, None]
    acc_p += tl.sum(g * xhat, axis=0)
    acc_q += tl.sum(g, axis=0)
    gw = g * _modulation_row(SCALE, W, b, cols, cmask, s_scb, s_scd, s_w, HAS_W)
    if IS_RMS:
        dh = (gw - xhat * c2[:, None]) * rstd[:, None]
    else:
        dh = (gw - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
    if HAS_DH:
        dh += tl.load(rp.dh + cc * s_dhd, mask=mask, other=0.0).to(tl.float32)
    dh = tl.where(mask, dh, 0.0)
    offs = rp.out + cc
    if WRITE_DX:
        tl.store(DX + offs, dh.to(DX.dtype.element_ty), mask=mask)
    y = tl.load(rp.y + cc * s_yd, mask=mask, other=0.0).to(tl.float32)
    acc_g += tl.sum(dh * y, axis=0)
    gate = tl.load(GATE + b * s_gb + cols * s_gd, mask=cmask, other=0.0).to(tl.float32)
    tl.store(DY + offs, (dh * gate[None, :]).to(DY.dtype.element_ty), mask=mask)
    return acc_g, acc_p, acc_q


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


SPLIT_FROM = 8192  # padded row width from which two programs share the rows of the fused backward


def bwd_blocks(D: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps) of the backward: the forward's tiles, but one row per tile from 2048
    columns on (two rows of 2048 with 8 warps spilled on sm_90; codegen gate, docs/speed_checks.md)."""
    block_n, block_d, num_warps = row_blocks(D)
    return (1 if block_d >= 2048 else block_n), block_d, num_warps


@on_tensor_device
def _gr_bwd(dh, dout, hres, y, gate, shift, scale, weight, x_dtype, fuse: bool, rms: bool, eps: float):
    """(dx or empty, dy, dgate, dshift, dscale, dweight); empty tensors stand for "not computed"."""
    B, N, D = y.shape
    check_grid_axis("gated_residual: batch size B", B)
    dev = y.device
    block_n, block_d, num_warps = bwd_blocks(D)
    tiles, chunks = chunking(B, N, block_n)
    dy = torch.empty((B, N, D), dtype=y.dtype, device=dev)
    dx = torch.empty((B, N, D), dtype=x_dtype, device=dev) if fuse else dy
    part_g = torch.empty((B, chunks, D), dtype=torch.float32, device=dev)
    part_p = torch.empty_like(part_g) if fuse else part_g
    part_q = torch.empty_like(part_g) if fuse else part_g
    some = dh if dh is not None else dout
    split = 2 if fuse and block_d >= SPLIT_FROM else 1
    _gr_bwd_kernel[(chunks * split, B)](
        some, dout if dout is not None else some, hres if hres is not None else y, y, gate,
        scale if scale is not None else gate, weight if weight is not None else gate,
        dx, dy, part_g, part_p, part_q, N, D, eps, tiles, chunks,
        *(dh.stride() if dh is not None else (0, 0, 0)), *(dout.stride() if dout is not None else (0, 0, 0)),
        *(hres.stride() if hres is not None else (0, 0, 0)), *y.stride(), *gate.stride(),
        *(scale.stride() if scale is not None else (0, 0)), weight.stride(0) if weight is not None else 0,
        dy.stride(0), dy.stride(1),
        FUSE_NORM=fuse, HAS_DH=dh is not None, WRITE_DX=fuse, IS_RMS=rms, HAS_W=weight is not None,
        BLOCK_N=block_n, BLOCK_D=block_d // split, SPLIT=split, num_warps=num_warps)
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
    return (x.new_empty(x.shape, dtype=promoted(x, y, gate)),
            x.new_empty(x.shape, dtype=promoted(x, y, gate, shift, scale, weight)))


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
    ctx.set_materialize_grads(False)  # an unused residual gives dh = None: no (B, N, D) zeros written and read


def _grnm_backward(ctx, dh, dout):
    hres, y, gate, shift, scale, weight = ctx.saved_tensors
    if dout is None:  # only the residual is used downstream: the modulated output's gradient is 0
        dout = torch.zeros_like(hres, dtype=promoted(hres, shift, scale, weight))
    dx, dy, dgate, dshift, dscale, dweight = _grnm_bwd_op(dh, dout, hres, y, gate, shift, scale, weight,
                                                         ctx.x_dtype, ctx.rms, ctx.eps)
    return (dx, dy, dgate, dshift if shift is not None else None, dscale,
            dweight if weight is not None else None, None, None)


_grnm_op.register_autograd(_grnm_backward, setup_context=_grnm_setup_context)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def _check_residual_args(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> None:
    """x, y (B, N, D) and gate (B, D) floating tensors on one device."""
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


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``h = x + gate * y`` with x, y (B, N, D) and gate (B, D) broadcast over tokens (DiT's adaLN-Zero
    residual, docs/math.md §7). Returns h (B, N, D) in the promoted dtype. Differentiable in x, y, gate.

    For the residual followed by the next sub-block's ``norm_modulate``, use
    :func:`gated_residual_norm_modulate` (one pass instead of two).
    """
    _check_residual_args(x, y, gate)
    if not triton_path("gated_residual", x, y, gate) or x.numel() == 0:
        return gated_residual_reference(x, y, gate)
    return _gated_residual_op(x, y, gate)


def gated_residual_norm_modulate(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, *,
                                 shift: torch.Tensor | None, scale: torch.Tensor, norm: str = "layernorm",
                                 weight: torch.Tensor | None = None, eps: float = 1e-6) -> GatedResidualNormOutput:
    """The gated residual and the next adaLN modulation in one pass (docs/math.md §7)::

        h   = x + gate * y
        out = norm(h) * weight * (1 + scale) + shift       (= vefast.norm_modulate(h, shift, scale, ...))

    x, y (B, N, D); gate, scale (B, D) and shift (B, D) or None (LightningDiT's ``wo_shift``), broadcast
    over tokens; ``norm``, ``weight`` (D,) or None and ``eps`` as in :func:`vefast.norm_modulate`.
    Returns ``GatedResidualNormOutput(residual=h, modulated=out)``, each in the promoted dtype of its
    inputs. Differentiable in every tensor argument; an unused ``residual`` costs its backward nothing.
    """
    _check_residual_args(x, y, gate)
    check_norm_modulate_args(x, shift, scale, norm, weight, eps)
    if not triton_path("gated_residual", x, y, gate, shift, scale, weight) or x.numel() == 0:
        return gated_residual_norm_modulate_reference(x, y, gate, shift=shift, scale=scale, norm=norm, weight=weight,
                                                      eps=eps)
    h, out = _grnm_op(x, y, gate, shift, scale, weight, norm == "rmsnorm", float(eps))
    return GatedResidualNormOutput(h, out)
