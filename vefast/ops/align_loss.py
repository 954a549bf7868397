"""Per-token feature alignment loss: cosine + smooth-L1 (docs/math.md §3b, ReaLS eq. 2) and REPA's loss (§3c).

For pred, target of shape (..., D) with R = prod(...) rows (tokens):

    cos_r       = pred_r . target_r / (max(||pred_r||, eps) max(||target_r||, eps))
    cos_loss    = mean_r (1 - cos_r)                                    (ReaLS L_cos)
    smooth_loss = mean_{r,d} huber_beta(pred_rd - target_rd)            (ReaLS L_smMSE, smooth-L1)
    loss        = weight_cos * cos_loss + weight_smooth * smooth_loss   (defaults 0.9, 0.1, beta 1)

with huber_beta(x) = 0.5 x^2 / beta for |x| < beta, |x| - 0.5 beta otherwise (``F.smooth_l1_loss``;
beta = 0 is the L1 loss). REPA (§3c): ``repa_loss(pred, target) = -mean_r cos_r``, accumulated as a
sum of cosines (not as ``cos_loss - 1``, which cancels in fp32 when the loss is near 0).

Choices:
- Forward: one pass over (pred, target): per row the dot product, both squared norms and the
  Huber row sum, in fp32 registers whatever the input dtype. Each program writes its partial sums
  of (1 - cos), Huber and cos into a (programs, 3) fp32 buffer, finished by one ``sum`` (deterministic),
  and keeps three fp32 numbers per row (cos, 1/||pred||, 1/||target||) for the backward.
- Backward: one more pass reading (pred, target) and writing d pred (and d target when the target
  requires a gradient; usually it is a frozen DINOv2 feature and no gradient is computed).
- eps = 1e-8 clamps each norm (``F.cosine_similarity``); a clamped norm contributes no gradient.
- Any leading shape; the last dim is the feature dim. Strides are passed to the kernels (a
  last-dim stride other than 1 is fine); a leading shape that cannot be viewed as rows is copied.
- Results in fp32 (float64 for float64 inputs, which run the eager reference; reported once).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (check_finite_number, check_same_device, check_same_shape, check_tensor, on_tensor_device,
                      triton_path)

EPS = 1e-8


class AlignOutput(NamedTuple):
    """``loss = weight_cos * cos_loss + weight_smooth * smooth_loss`` (0-dim tensors)."""

    loss: torch.Tensor
    cos_loss: torch.Tensor
    smooth_loss: torch.Tensor


# --------------------------------------------------------------------------------------------
# eager reference (docs/math.md §3b; float64 in tests; also the CPU path)
# --------------------------------------------------------------------------------------------
def _promoted(pred: torch.Tensor, target: torch.Tensor, upcast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """pred, target in their promoted dtype, at least fp32 when ``upcast``."""
    dtype = torch.promote_types(pred.dtype, target.dtype)
    if upcast:
        dtype = torch.promote_types(dtype, torch.float32)
    return pred.to(dtype), target.to(dtype)


def _cosines_reference(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row ``cos_r = p.t / (max(||p||, eps) max(||t||, eps))`` over the last dim, in fp32 or wider."""
    p, t = _promoted(pred, target)
    pn = torch.linalg.vector_norm(p, dim=-1).clamp_min(EPS)
    tn = torch.linalg.vector_norm(t, dim=-1).clamp_min(EPS)
    return (p * t).sum(-1) / (pn * tn)


def align_loss_reference(pred: torch.Tensor, target: torch.Tensor, *, weight_cos: float = 0.9,
                         weight_smooth: float = 0.1, beta: float = 1.0, upcast: bool = True) -> AlignOutput:
    """docs/math.md §3b in eager PyTorch; ``upcast=True`` computes in fp32 (float64 for float64 inputs),
    ``upcast=False`` in the inputs' promoted dtype (the benchmarks' "eager" variant)."""
    p, t = _promoted(pred, target, upcast)
    cos = _cosines_reference(p, t)
    cos_loss = (1.0 - cos).mean()
    smooth_loss = F.smooth_l1_loss(p, t, beta=beta)
    return AlignOutput(weight_cos * cos_loss + weight_smooth * smooth_loss, cos_loss, smooth_loss)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _align_fwd_kernel(p_ptr, t_ptr, stats_ptr, part_ptr, R, sp_r, sp_d, st_r, st_d, beta, eps,
                      D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < R
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_D).to(tl.int64)  # c * stride of a strided view may pass 2^31
    dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    pp = tl.zeros((BLOCK_R,), dtype=tl.float32)
    tt = tl.zeros((BLOCK_R,), dtype=tl.float32)
    hub = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        m = mask_r[:, None] & (c < D)[None, :]
        p = tl.load(p_ptr + rows64[:, None] * sp_r + c[None, :] * sp_d, mask=m, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + rows64[:, None] * st_r + c[None, :] * st_d, mask=m, other=0.0).to(tl.float32)
        dot += tl.sum(p * t, axis=1)
        pp += tl.sum(p * p, axis=1)
        tt += tl.sum(t * t, axis=1)
        x = p - t
        ax = tl.abs(x)
        h = tl.where(ax < beta, 0.5 * x * x / tl.maximum(beta, 1e-30), ax - 0.5 * beta)
        hub += tl.sum(tl.where(m, h, 0.0), axis=1)
    rp = 1.0 / tl.maximum(tl.sqrt(pp), eps)
    rt = 1.0 / tl.maximum(tl.sqrt(tt), eps)
    cos = dot * rp * rt
    tl.store(stats_ptr + rows64 * 3, cos, mask=mask_r)
    tl.store(stats_ptr + rows64 * 3 + 1, rp, mask=mask_r)
    tl.store(stats_ptr + rows64 * 3 + 2, rt, mask=mask_r)
    tl.store(part_ptr + pid * 3, tl.sum(tl.where(mask_r, 1.0 - cos, 0.0), axis=0))
    tl.store(part_ptr + pid * 3 + 1, tl.sum(hub, axis=0))
    tl.store(part_ptr + pid * 3 + 2, tl.sum(tl.where(mask_r, cos, 0.0), axis=0))


@triton.jit
def _align_bwd_kernel(p_ptr, t_ptr, stats_ptr, gout_ptr, gp_ptr, gt_ptr, R, sp_r, sp_d, st_r, st_d,
                      beta, eps, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                      NEED_GT: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < R
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_D).to(tl.int64)  # c * stride of a strided view may pass 2^31
    # gradients of the three sums: d sum(1 - cos) / d cos_r = -1, d sum(huber) / d x_rd = huber'(x),
    # d sum(cos) / d cos_r = 1
    c_cos = tl.load(gout_ptr + 2) - tl.load(gout_ptr)
    c_sm = tl.load(gout_ptr + 1)
    cos = tl.load(stats_ptr + rows64 * 3, mask=mask_r, other=0.0)
    rp = tl.load(stats_ptr + rows64 * 3 + 1, mask=mask_r, other=0.0)
    rt = tl.load(stats_ptr + rows64 * 3 + 2, mask=mask_r, other=0.0)
    # a clamped norm (1/r == eps) contributes no gradient through the norm
    qp = tl.where(rp < 1.0 / eps, rp * rp, 0.0)
    qt = tl.where(rt < 1.0 / eps, rt * rt, 0.0)
    prt = (rp * rt)[:, None]
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        m = mask_r[:, None] & (c < D)[None, :]
        p = tl.load(p_ptr + rows64[:, None] * sp_r + c[None, :] * sp_d, mask=m, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + rows64[:, None] * st_r + c[None, :] * st_d, mask=m, other=0.0).to(tl.float32)
        x = p - t
        ax = tl.abs(x)
        dh = tl.where(ax < beta, x / tl.maximum(beta, 1e-30), tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0)))
        gp = c_cos * (prt * t - (cos * qp)[:, None] * p) + c_sm * dh
        out = rows64[:, None] * D + c[None, :]
        tl.store(gp_ptr + out, gp.to(gp_ptr.dtype.element_ty), mask=m)
        if NEED_GT:
            gt = c_cos * (prt * p - (cos * qt)[:, None] * t) - c_sm * dh
            tl.store(gt_ptr + out, gt.to(gt_ptr.dtype.element_ty), mask=m)


def _blocks(d: int) -> tuple[int, int, int]:
    block_d = min(triton.next_power_of_2(d), 2048)
    block_r = max(1, min(64, 4096 // block_d))
    num_warps = 4 if block_r * block_d <= 4096 else 8
    return block_r, block_d, num_warps


@on_tensor_device
def _align_fwd_launch(p: torch.Tensor, t: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    r, d = p.shape
    block_r, block_d, warps = _blocks(d)
    grid = triton.cdiv(r, block_r)
    stats = torch.empty(r, 3, device=p.device, dtype=torch.float32)
    part = torch.empty(grid, 3, device=p.device, dtype=torch.float32)
    _align_fwd_kernel[(grid,)](p, t, stats, part, r, p.stride(0), p.stride(1), t.stride(0), t.stride(1),
                               float(beta), EPS, D=d, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return part.sum(0), stats


@on_tensor_device
def _align_bwd_launch(p, t, stats, gout, beta, need_gt):
    r, d = p.shape
    block_r, block_d, warps = _blocks(d)
    gp = torch.empty(r, d, device=p.device, dtype=p.dtype)
    gt = torch.empty(r, d, device=t.device, dtype=t.dtype) if need_gt else gp.new_empty(0)
    _align_bwd_kernel[(triton.cdiv(r, block_r),)](
        p, t, stats, gout, gp, gt, r, p.stride(0), p.stride(1), t.stride(0), t.stride(1), float(beta), EPS,
        D=d, BLOCK_R=block_r, BLOCK_D=block_d, NEED_GT=need_gt, num_warps=warps)
    return gp, gt


# --------------------------------------------------------------------------------------------
# torch.library ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("vefast::align_loss", mutates_args=())
def _align_op(pred: torch.Tensor, target: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums (3,) = [sum_r (1 - cos_r), sum huber, sum_r cos_r], stats (R, 3)); pred / target are (R, D)."""
    return _align_fwd_launch(pred, target, beta)


@_align_op.register_fake
def _(pred, target, beta):
    return pred.new_empty((3,), dtype=torch.float32), pred.new_empty((pred.shape[0], 3), dtype=torch.float32)


@torch.library.custom_op("vefast::align_loss_backward", mutates_args=())
def _align_bwd_op(pred: torch.Tensor, target: torch.Tensor, stats: torch.Tensor, grad_sums: torch.Tensor,
                  beta: float, need_target_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _align_bwd_launch(pred, target, stats, grad_sums.float().contiguous(), beta, need_target_grad)


@_align_bwd_op.register_fake
def _(pred, target, stats, grad_sums, beta, need_target_grad):
    gt = torch.empty_like(target, memory_format=torch.contiguous_format) if need_target_grad else target.new_empty(0)
    return torch.empty_like(pred, memory_format=torch.contiguous_format), gt


def _align_setup(ctx, inputs, output):
    pred, target, beta = inputs
    ctx.beta = beta
    ctx.need_gt = ctx.needs_input_grad[1]
    ctx.save_for_backward(pred, target, output[1])


def _align_backward(ctx, g_sums, _g_stats):
    pred, target, stats = ctx.saved_tensors
    gp, gt = _align_bwd_op(pred, target, stats, g_sums, ctx.beta, ctx.need_gt)
    return gp, (gt if ctx.need_gt else None), None


_align_op.register_autograd(_align_backward, setup_context=_align_setup)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def _check_align_args(pred, target, knobs) -> None:
    check_tensor("pred", pred)
    check_tensor("target", target)
    check_same_device(pred=pred, target=target)
    check_same_shape(pred=pred, target=target)
    if pred.dim() < 1 or pred.shape[-1] == 0 or pred.numel() == 0:
        raise ValueError(f"pred must be (..., D) with D >= 1 and at least one row, got shape {tuple(pred.shape)}")
    for name, value in knobs.items():
        check_finite_number(name, value, min_value=0.0 if name == "beta" else None)


def align_loss(pred: torch.Tensor, target: torch.Tensor, *, weight_cos: float = 0.9, weight_smooth: float = 0.1,
               beta: float = 1.0) -> AlignOutput:
    """ReaLS alignment loss (docs/math.md §3b, ReaLS eq. 2) over the last dim, any leading shape.

    ``loss = weight_cos * mean(1 - cos) + weight_smooth * smooth_l1(pred, target, beta)``; cos per
    row (token) over the last dim, smooth-L1 averaged over every element.
    """
    _check_align_args(pred, target, {"weight_cos": weight_cos, "weight_smooth": weight_smooth, "beta": beta})
    if not triton_path("align_loss", pred, target):
        return align_loss_reference(pred, target, weight_cos=weight_cos, weight_smooth=weight_smooth, beta=beta)
    d = pred.shape[-1]
    sums, _ = _align_op(pred.reshape(-1, d), target.reshape(-1, d), float(beta))
    r = pred.numel() // d
    cos_loss = sums[0] / r
    smooth_loss = sums[1] / (r * d)
    return AlignOutput(weight_cos * cos_loss + weight_smooth * smooth_loss, cos_loss, smooth_loss)


def repa_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """REPA's projection loss (docs/math.md §3c): ``-mean_r cos(pred_r, target_r)`` over the last dim.

    Mathematically ``align_loss(pred, target, weight_cos=1, weight_smooth=0).cos_loss - 1``, but the
    cosines are summed directly (fp32; float64 for float64 inputs), so a loss near 0 keeps its relative
    accuracy. REPA weights it by 0.5 (``proj_coeff``) in the DiT loss.
    """
    _check_align_args(pred, target, {})
    if not triton_path("repa_loss", pred, target):
        return -_cosines_reference(pred, target).mean()
    d = pred.shape[-1]
    sums, _ = _align_op(pred.reshape(-1, d), target.reshape(-1, d), 1.0)
    return -sums[2] / (pred.numel() // d)
