"""Triton helpers of the row-normalization kernels (norm_modulate, gated_residual, qk_prologue).

Each program holds tiles of whole rows x [BLOCK_N, BLOCK_D] in fp32 registers (D <= BLOCK_D, masked by
``cmask``) and normalizes them with the non-affine LayerNorm or the RMSNorm:

    xhat = (x - mean) * rstd,  rstd = 1 / sqrt(mean((x - mean)^2) + eps)   (LayerNorm)
    xhat = x * rstd,           rstd = 1 / sqrt(mean(x^2) + eps)            (RMSNorm)

then modulates them, out = xhat * weight * (1 + scale[b]) + shift[b] (docs/math.md §7).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _normalize(x, cmask, D, eps, IS_RMS: tl.constexpr):
    """Rows of fp32 ``x`` [BLOCK_N, BLOCK_D] (zero where ``cmask`` is off) -> (xhat, rstd)."""
    if IS_RMS:
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        xhat = x * rstd[:, None]
    else:
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(cmask[None, :], x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)
        xhat = xc * rstd[:, None]
    return xhat, rstd


@triton.jit
def _normalize_bwd(g, xhat, rstd, D, IS_RMS: tl.constexpr):
    """Gradient through the normalization: ``g`` = dL/dxhat (zero where masked) -> dL/dx."""
    c2 = tl.sum(g * xhat, axis=1) / D
    if IS_RMS:
        dx = (g - xhat * c2[:, None]) * rstd[:, None]
    else:
        c1 = tl.sum(g, axis=1) / D
        dx = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
    return dx


@triton.jit
def _load_modulation(SHIFT, SCALE, W, b, cols, cmask, s_shb, s_shd, s_scb, s_scd, s_w,
                     HAS_SHIFT: tl.constexpr, HAS_W: tl.constexpr):
    """fp32 vectors (shift, 1 + scale, weight) of sample ``b`` over ``cols``."""
    scale1 = 1.0 + tl.load(SCALE + b * s_scb + cols * s_scd, mask=cmask, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        shift = tl.load(SHIFT + b * s_shb + cols * s_shd, mask=cmask, other=0.0).to(tl.float32)
    else:
        shift = tl.zeros_like(scale1)
    if HAS_W:
        w = tl.load(W + cols * s_w, mask=cmask, other=0.0).to(tl.float32)
    else:
        w = tl.full(scale1.shape, 1.0, tl.float32)
    return shift, scale1, w


@triton.jit
def _modulation_row(SCALE, W, b, cols, cmask, s_scb, s_scd, s_w, HAS_W: tl.constexpr):
    """weight * (1 + scale[b]) over ``cols`` (fp32, 0 where masked), as a row [1, BLOCK_D]."""
    _, scale1, w = _load_modulation(SCALE, SCALE, W, b, cols, cmask, 0, 0, s_scb, s_scd, s_w, False, HAS_W)
    return (w * scale1)[None, :]


@triton.jit
def _norm_modulate_tile_bwd(g, xhat, rstd, SCALE, W, b, cols, cmask, D, acc_p, acc_q, s_scb, s_scd, s_w,
                            IS_RMS: tl.constexpr, HAS_W: tl.constexpr):
    """Backward of out = xhat * weight * (1 + scale[b]) + shift[b] over one tile, with (xhat, rstd) from
    :func:`_normalize` of x and ``g`` = dL/dout (zero where masked): (dL/dx, acc_p + sum_rows(g * xhat),
    acc_q + sum_rows(g)), the latter two the partials of dscale / dweight and of dshift.

    The callers normalize x themselves, where it suits their loads (the order of loads and reductions
    sets the register pressure: the codegen gate)."""
    acc_p += tl.sum(g * xhat, axis=0)
    acc_q += tl.sum(g, axis=0)
    dx = _normalize_bwd(g * _modulation_row(SCALE, W, b, cols, cmask, s_scb, s_scd, s_w, HAS_W), xhat, rstd, D,
                        IS_RMS)
    return dx, acc_p, acc_q


@triton.jit
def _row_tile(X, N, D, s_xb, s_xn, s_xd, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (row tile, batch item b): b, the tile's rows and columns, masks, and x[b, rows, :] in fp32."""
    b = tl.program_id(1).to(tl.int64)
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # offsets of strided views
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    cmask = cols < D
    mask = (rows < N)[:, None] & cmask[None, :]
    x = tl.load(X + b * s_xb + rows[:, None] * s_xn + cols[None, :] * s_xd, mask=mask, other=0.0).to(tl.float32)
    return b, rows, cols, cmask, mask, x
