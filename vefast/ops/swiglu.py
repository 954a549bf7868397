"""SwiGLU on the fused ``w12`` projection output (docs/math.md §7; LightningDiT's ``SwiGLUFFN``).

    x1, x2 = x12.chunk(2, dim=-1)          (first half gates, second half is the value)
    out    = silu(x1) * x2 = x1 * sigmoid(x1) * x2

as in LightningDiT's ``SwiGLUFFN.forward`` (``hidden = F.silu(x1) * x2``; Shazeer 2020, eq. 6).

Backward, with s = sigmoid(x1):  dx1 = dout * x2 * s * (1 + x1 * (1 - s)),  dx2 = dout * x1 * s,
written into one (..., 2H) gradient (the gradient of ``w12``'s output). Only x12 is saved;
sigmoid(x1) is recomputed (eager autograd also keeps ``silu(x1)``, an extra (..., H) activation).
fp32 math whatever the input dtype; float64 runs the eager reference. Strides of x12 and of the
incoming gradient are passed to the kernels (2D views of the leading dimensions).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import check_tensor, on_tensor_device, triton_path


def swiglu_reference(x12: torch.Tensor) -> torch.Tensor:
    """Eager ``F.silu(x1) * x2`` with ``x1, x2 = x12.chunk(2, -1)``."""
    x1, x2 = x12.chunk(2, dim=-1)
    return F.silu(x1) * x2


@triton.jit
def _load_halves(X, M, H, s_xm, s_xh, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's (BLOCK_M, BLOCK_H) tile of x1 = x12[..., :H] and x2 = x12[..., H:], in fp32."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    mask = (rows < M)[:, None] & (cols < H)[None, :]
    p1 = X + rows[:, None] * s_xm + cols[None, :] * s_xh
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + H * s_xh, mask=mask, other=0.0).to(tl.float32)
    return rows, cols, mask, x1, x2


@triton.jit
def _swiglu_fwd_kernel(X, OUT, M, H, s_xm, s_xh, s_om, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    rows, cols, mask, x1, x2 = _load_halves(X, M, H, s_xm, s_xh, BLOCK_M, BLOCK_H)
    out = x1 * tl.sigmoid(x1) * x2
    tl.store(OUT + rows[:, None] * s_om + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DOUT, X, DX, M, H, s_gm, s_gh, s_xm, s_xh, s_dm,
                       BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    rows, cols, mask, x1, x2 = _load_halves(X, M, H, s_xm, s_xh, BLOCK_M, BLOCK_H)
    g = tl.load(DOUT + rows[:, None] * s_gm + cols[None, :] * s_gh, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(x1)
    dx1 = g * x2 * s * (1.0 + x1 * (1.0 - s))
    dx2 = g * x1 * s
    pd = DX + rows[:, None] * s_dm + cols[None, :]
    tl.store(pd, dx1.to(DX.dtype.element_ty), mask=mask)
    tl.store(pd + H, dx2.to(DX.dtype.element_ty), mask=mask)


def _blocks(H: int) -> tuple[int, int]:
    block_h = min(1024, triton.next_power_of_2(H))
    return max(1, 2048 // block_h), block_h


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """(M, last) view of ``t`` (a copy only when the leading dimensions cannot be flattened)."""
    return t.reshape(-1, t.shape[-1])


@on_tensor_device
def _swiglu_fwd(x12: torch.Tensor) -> torch.Tensor:
    x = _as_rows(x12)
    M, H = x.shape[0], x.shape[1] // 2
    out = torch.empty((M, H), dtype=x12.dtype, device=x12.device)
    bm, bh = _blocks(H)
    _swiglu_fwd_kernel[(triton.cdiv(M, bm), triton.cdiv(H, bh))](x, out, M, H, *x.stride(), out.stride(0),
                                                                BLOCK_M=bm, BLOCK_H=bh, num_warps=4)
    return out.view(*x12.shape[:-1], H)


@on_tensor_device
def _swiglu_bwd(dout: torch.Tensor, x12: torch.Tensor) -> torch.Tensor:
    x = _as_rows(x12)
    g = _as_rows(dout)
    M, H = x.shape[0], x.shape[1] // 2
    dx = torch.empty((M, 2 * H), dtype=x12.dtype, device=x12.device)
    bm, bh = _blocks(H)
    _swiglu_bwd_kernel[(triton.cdiv(M, bm), triton.cdiv(H, bh))](g, x, dx, M, H, *g.stride(), *x.stride(),
                                                                dx.stride(0), BLOCK_M=bm, BLOCK_H=bh, num_warps=4)
    return dx.view(x12.shape)


@torch.library.custom_op("vefast::swiglu", mutates_args=())
def _swiglu_op(x12: torch.Tensor) -> torch.Tensor:
    return _swiglu_fwd(x12)


@_swiglu_op.register_fake
def _(x12):
    return x12.new_empty((*x12.shape[:-1], x12.shape[-1] // 2))


@torch.library.custom_op("vefast::swiglu_backward", mutates_args=())
def _swiglu_bwd_op(dout: torch.Tensor, x12: torch.Tensor) -> torch.Tensor:
    return _swiglu_bwd(dout, x12)


@_swiglu_bwd_op.register_fake
def _(dout, x12):
    return x12.new_empty(x12.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dout):
    (x12,) = ctx.saved_tensors
    return _swiglu_bwd_op(dout, x12)


_swiglu_op.register_autograd(_backward, setup_context=_setup_context)


def swiglu(x12: torch.Tensor) -> torch.Tensor:
    """``silu(x1) * x2`` with ``x1, x2 = x12.chunk(2, -1)`` (LightningDiT's SwiGLUFFN; Shazeer 2020 eq. 6).

    x12: (..., 2H), the output of the fused ``w12`` Linear. Returns (..., H) in x12's dtype.
    """
    check_tensor("x12", x12)
    if x12.dim() < 1 or x12.shape[-1] % 2:
        raise ValueError(f"x12 must have an even last dimension (..., 2H), got shape {tuple(x12.shape)}")
    if not triton_path("swiglu", x12) or x12.numel() == 0:
        return swiglu_reference(x12)
    return _swiglu_op(x12)
