"""Fused reparameterization losses: VE loss ([VE], eqs. 9-11) and the KL baseline (docs/math.md §1-2).

Given ``mean`` and ``logvar`` (LDM / VA-VAE convention: the two halves of the encoder's ``moments``
along dim 1), one forward pass over the data computes

    lv  = clamp(logvar, -30, 20)                (gradient 0 outside, inclusive bounds, as torch.clamp)
    var = exp(lv),  std = exp(0.5 lv),  z = mean + std * eps,  eps ~ N(0, I)
    VE:  L_var = R(1 / (var + delta))           (eq. 9)
         L_reg = R(exp(|z| - tau))              (eq. 10, on the sampled z)
         loss  = lambda_var L_var + lambda_reg L_reg   (eq. 11 without L_rec)
    KL:  loss  = R(0.5 (mean^2 + var - 1 - lv))

with ``R`` = "mean" (over every element) or "sum" (sum over non-batch dims, mean over dim 0).
Backward (before R's 1/N or 1/B), with ``g`` the upstream gradient of each term:
``dL_var/dlv = -var / (var + delta)^2``, ``dL_reg/dz = sign(z) exp(|z| - tau)``, ``dz/dmean = 1``,
``dz/dlv = 0.5 std eps``, ``dKL/dmean = mean``, ``dKL/dlv = 0.5 (var - 1)``.

Choices (documented in docs/reparam.md):
- ``delta`` is not published; default 1e-6. Paper defaults lambda_var = 0.1, lambda_reg = 1e-6, tau = 1.
- Math in float32 for fp16/bf16/fp32 inputs (float64 for float64 inputs): 1/var reaches 1e13 and
  exp(|z| - 1) overflows fp16 past |z| = 12.1. ``z`` is returned in the input dtype; the loss
  terms are 0-dim float32 (float64 for float64 inputs). ``L_reg`` uses the unrounded z.
- ``noise=None`` on the Triton path: eps is drawn inside the kernel with Philox from a seed taken
  from ``generator`` (``_common.draw_seed``), never stored, and regenerated in backward. One Philox
  call gives four normals (``tl.randn4x``): element ``i`` (its *logical* row-major index, so z does
  not depend on strides) uses counter ``(i // (4Q)) * Q + i % Q`` and output ``(i // Q) % 4``, with
  ``Q = NOISE_Q = 256`` fixed (kernel tiles are whole groups of 4Q elements, so the noise does not
  depend on the tiling either). This is 4x less Philox work than one ``tl.randn`` per element, which
  would make the kernel compute-bound on bf16. The eager CPU path draws
  ``torch.randn(shape, generator=generator)`` instead: the two paths' noise streams differ.
- ``noise`` given: used as is; no gradient flows to it.
- Deterministic: per-program partial sums in the compute dtype, reduced in a fixed order by one
  program (no atomics).
- Layout: contiguous tensors, or a batch stride with a contiguous inner block (the views
  ``moments.chunk(2, dim=1)``) are read in place; other layouts are made contiguous. Upstream
  gradients may be stride-0 expanded views (read as one scalar, no copy) or absent (z unused).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import (check_finite_number, check_generator, check_reduction, check_same_device, check_same_shape, check_tensor,
                      draw_seed, host_item, interpret_mode, on_tensor_device, reduction_scale, triton_path)

__all__ = ["VEOutput", "KLOutput", "ve_loss", "kl_loss", "ve_loss_reference", "kl_loss_reference", "NOISE_Q"]

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
NOISE_Q = 256  # Philox counters per noise group (4 * NOISE_Q elements); part of the noise semantics
_VE, _KL = 0, 1


class VEOutput(NamedTuple):
    """``z`` (input dtype), ``loss = lambda_var * var_loss + lambda_reg * reg_loss``, and the two terms."""

    z: torch.Tensor
    loss: torch.Tensor
    var_loss: torch.Tensor
    reg_loss: torch.Tensor


class KLOutput(NamedTuple):
    """``z`` (input dtype) and the reduced KL divergence to N(0, I)."""

    z: torch.Tensor
    loss: torch.Tensor


# ----------------------------------------------------------------------------------------------
# Eager reference (any dtype; float64 in tests). Also the CPU path outside the interpreter.
# ----------------------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    return x.mean() if reduction == "mean" else x.sum() / x.shape[0]


def _reference_common(mean, logvar, noise):
    cdt = _compute_dtype(mean.dtype)
    m = mean.to(cdt)
    lv = logvar.to(cdt).clamp(LOGVAR_MIN, LOGVAR_MAX)
    std = torch.exp(0.5 * lv)
    var = torch.exp(lv)
    z = m + std * noise.detach().to(cdt)
    return m, lv, var, z


def ve_loss_reference(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor, *, lambda_var: float = 0.1,
                      lambda_reg: float = 1e-6, tau: float = 1.0, delta: float = 1e-6,
                      reduction: str = "mean") -> VEOutput:
    """Eager VE loss (docs/math.md §2, [VE] eqs. 9-11) with the given ``noise``; float32 math for
    half inputs, float64 for float64. Differentiable by autograd w.r.t. mean and logvar."""
    _, _, var, z = _reference_common(mean, logvar, noise)
    var_loss = _reduce(1.0 / (var + delta), reduction)
    reg_loss = _reduce(torch.exp(z.abs() - tau), reduction)
    return VEOutput(z.to(mean.dtype), lambda_var * var_loss + lambda_reg * reg_loss, var_loss, reg_loss)


def kl_loss_reference(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor, *,
                      reduction: str = "mean") -> KLOutput:
    """Eager KL(N(mean, var) || N(0, I)) = R(0.5 (mean^2 + var - 1 - logvar)) (docs/math.md §2) and z."""
    m, lv, var, z = _reference_common(mean, logvar, noise)
    return KLOutput(z.to(mean.dtype), _reduce(0.5 * (m * m + var - 1.0 - lv), reduction))


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _rowcol(base, loc, M, LAYOUT: tl.constexpr):
    """(row, col) of logical indices ``base + loc`` in a (rows, M) view. LAYOUT 0: every tensor is
    flat (row 0, col = index); 1: M is a multiple of the tile (one row per program); 2: general."""
    if LAYOUT == 0:
        row = base * 0
        col = base + loc
    elif LAYOUT == 1:
        row = base // M
        col = (base - row * M) + loc
    else:
        i = base + loc
        row = i // M
        col = i - row * M
    return row, col


@triton.jit
def _out(x, ptr, RND_BF16: tl.constexpr):
    """Cast to the element type of ``ptr`` rounding to nearest even. The interpreter truncates
    fp32 -> bf16 (compiled Triton rounds), so under TRITON_INTERPRET the rounding is done by hand."""
    if RND_BF16:
        u = x.to(tl.float32).to(tl.uint32, bitcast=True)
        u = (u + (0x7FFF + ((u >> 16) & 1))) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True).to(ptr.dtype.element_ty)
    else:
        return x.to(ptr.dtype.element_ty)


@triton.jit
def _recip(x):
    """1 / x. float64: the fp32 reciprocal refined by two Newton steps (within an ulp; x = var + delta is
    in fp32 range): the IEEE float64 division's slow path is a subroutine call across which ptxas spills."""
    if x.dtype == tl.float64:
        r = (1.0 / x.to(tl.float32)).to(tl.float64)
        r = tl.fma(r, tl.fma(-x, r, 1.0), r)
        return tl.fma(r, tl.fma(-x, r, 1.0), r)
    else:
        return 1.0 / x


@triton.jit
def _clamp_logvar(lv):
    """clamp(lv, -30, 20) keeping NaN (as torch.clamp): GPU min/max return the non-NaN operand."""
    return tl.where(lv != lv, lv, tl.minimum(tl.maximum(lv, -30.0), 20.0))


@triton.jit
def _lane_inputs(loc, eps_rng, base, mean_ptr, logvar_ptr, noise_ptr, N, M, sb_mean, sb_logvar, sb_noise,
                 HAS_NOISE: tl.constexpr, LAYOUT: tl.constexpr, CDT: tl.constexpr):
    """One lane's logical indices, mask, (row, col), and mean, raw logvar and eps in the compute dtype."""
    i = base + loc
    mask = i < N
    row, col = _rowcol(base, loc, M, LAYOUT)
    m = tl.load(mean_ptr + (row * sb_mean + col), mask=mask, other=0.0).to(CDT)
    lv_raw = tl.load(logvar_ptr + (row * sb_logvar + col), mask=mask, other=0.0).to(CDT)
    if HAS_NOISE:
        eps = tl.load(noise_ptr + (row * sb_noise + col), mask=mask, other=0.0).to(CDT)
    else:
        eps = eps_rng.to(CDT)
    return i, mask, row, col, m, lv_raw, eps


@triton.jit
def _fwd_lane(acc_a, acc_b, loc, eps_rng, base, mean_ptr, logvar_ptr, noise_ptr, z_ptr, N, M,
              sb_mean, sb_logvar, sb_noise, tau, delta,
              KIND: tl.constexpr, HAS_NOISE: tl.constexpr, LAYOUT: tl.constexpr, CDT: tl.constexpr,
              RND_BF16: tl.constexpr):
    i, mask, _, _, m, lv_raw, eps = _lane_inputs(loc, eps_rng, base, mean_ptr, logvar_ptr, noise_ptr, N, M,
                                                  sb_mean, sb_logvar, sb_noise, HAS_NOISE, LAYOUT, CDT)
    lv = _clamp_logvar(lv_raw)
    std = tl.exp(0.5 * lv)
    var = tl.exp(lv)
    z = m + std * eps
    tl.store(z_ptr + i, _out(z, z_ptr, RND_BF16), mask=mask)
    if KIND == 0:
        acc_a += tl.where(mask, 1.0 / (var + delta), 0.0)
        acc_b += tl.where(mask, tl.exp(tl.abs(z) - tau), 0.0)
    else:
        acc_a += tl.where(mask, 0.5 * (m * m + var - 1.0 - lv), 0.0)
    return acc_a, acc_b


@triton.jit
def _tile_noise(seed, HAS_NOISE: tl.constexpr, Q: tl.constexpr, GROUPS: tl.constexpr, IDX64: tl.constexpr):
    """This program's tile: id, first logical index, (GROUPS, Q) offsets of lane 0, and the four
    Philox normal lanes of noise group (pid * GROUPS + g) (zeros when the noise is given)."""
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    g = tl.arange(0, GROUPS)[:, None]
    q = tl.arange(0, Q)[None, :]
    if HAS_NOISE:
        n0 = tl.zeros((GROUPS, Q), tl.float32)
        n1 = n0
        n2 = n0
        n3 = n0
    else:
        n0, n1, n2, n3 = tl.randn4x(seed, (pid * GROUPS + g) * Q + q)
    return pid, pid * (GROUPS * 4 * Q), g * (4 * Q) + q, n0, n1, n2, n3


@triton.jit(do_not_specialize=["seed"])
def _reparam_fwd_kernel(mean_ptr, logvar_ptr, noise_ptr, z_ptr, part_ptr, seed, N, M,
                        sb_mean, sb_logvar, sb_noise, tau, delta,
                        KIND: tl.constexpr, HAS_NOISE: tl.constexpr, LAYOUT: tl.constexpr,
                        Q: tl.constexpr, GROUPS: tl.constexpr, IDX64: tl.constexpr, CDT: tl.constexpr,
                        RND_BF16: tl.constexpr):
    """One tile = GROUPS noise groups of 4*Q logical elements; writes z and two partial sums."""
    pid, base, loc, n0, n1, n2, n3 = _tile_noise(seed, HAS_NOISE, Q, GROUPS, IDX64)
    acc_a = tl.zeros((GROUPS, Q), CDT)
    acc_b = tl.zeros((GROUPS, Q), CDT)
    acc_a, acc_b = _fwd_lane(acc_a, acc_b, loc, n0, base, mean_ptr, logvar_ptr, noise_ptr, z_ptr, N, M,
                             sb_mean, sb_logvar, sb_noise, tau, delta, KIND, HAS_NOISE, LAYOUT, CDT, RND_BF16)
    acc_a, acc_b = _fwd_lane(acc_a, acc_b, loc + Q, n1, base, mean_ptr, logvar_ptr, noise_ptr, z_ptr, N, M,
                             sb_mean, sb_logvar, sb_noise, tau, delta, KIND, HAS_NOISE, LAYOUT, CDT, RND_BF16)
    acc_a, acc_b = _fwd_lane(acc_a, acc_b, loc + 2 * Q, n2, base, mean_ptr, logvar_ptr, noise_ptr, z_ptr, N, M,
                             sb_mean, sb_logvar, sb_noise, tau, delta, KIND, HAS_NOISE, LAYOUT, CDT, RND_BF16)
    acc_a, acc_b = _fwd_lane(acc_a, acc_b, loc + 3 * Q, n3, base, mean_ptr, logvar_ptr, noise_ptr, z_ptr, N, M,
                             sb_mean, sb_logvar, sb_noise, tau, delta, KIND, HAS_NOISE, LAYOUT, CDT, RND_BF16)
    tl.store(part_ptr + pid * 2, tl.sum(acc_a))
    tl.store(part_ptr + pid * 2 + 1, tl.sum(acc_b))


@triton.jit
def _reparam_finalize_kernel(part_ptr, loss_ptr, a_ptr, b_ptr, P, scale, lam_a, lam_b,
                             KIND: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, CDT: tl.constexpr):
    """Deterministic reduction of the per-program partials (fixed order, one program). ITERS (a
    power of two >= cdiv(P, BLOCK)) is a constexpr: few variants, and the interpreter needs a
    Python loop bound."""
    offs = tl.arange(0, BLOCK)
    acc_a = tl.zeros((BLOCK,), CDT)
    acc_b = tl.zeros((BLOCK,), CDT)
    for it in range(ITERS):
        idx = it * BLOCK + offs
        acc_a += tl.load(part_ptr + idx * 2, mask=idx < P, other=0.0)
        acc_b += tl.load(part_ptr + idx * 2 + 1, mask=idx < P, other=0.0)
    a = tl.sum(acc_a) * scale
    b = tl.sum(acc_b) * scale
    if KIND == 0:
        tl.store(a_ptr, a)
        tl.store(b_ptr, b)
        tl.store(loss_ptr, lam_a * a + lam_b * b)
    else:  # KL: the single term is the loss; b is 0
        tl.store(a_ptr, a)
        tl.store(b_ptr, a * 0.0)
        tl.store(loss_ptr, a)


@triton.jit
def _bwd_lane(loc, eps_rng, base, c_a, c_b, dz_scalar, mean_ptr, logvar_ptr, noise_ptr, dz_ptr, dmean_ptr,
              dlogvar_ptr, N, M, sb_mean, sb_logvar, sb_noise, sb_dz, sb_dmean, sb_dlogvar, tau, delta,
              KIND: tl.constexpr, HAS_NOISE: tl.constexpr, DZ_MODE: tl.constexpr, LAYOUT: tl.constexpr,
              WRITE_DMEAN: tl.constexpr, WRITE_DLOGVAR: tl.constexpr, CDT: tl.constexpr, RND_BF16: tl.constexpr):
    _, mask, row, col, m, lv_raw, eps = _lane_inputs(loc, eps_rng, base, mean_ptr, logvar_ptr, noise_ptr, N, M,
                                                      sb_mean, sb_logvar, sb_noise, HAS_NOISE, LAYOUT, CDT)
    inside = (lv_raw >= -30.0) & (lv_raw <= 20.0)
    lv = _clamp_logvar(lv_raw)
    std = tl.exp(0.5 * lv)
    var = tl.exp(lv)
    if DZ_MODE == 1:
        gz = tl.load(dz_ptr + (row * sb_dz + col), mask=mask, other=0.0).to(CDT)
    elif DZ_MODE == 2:
        gz = tl.zeros_like(m) + dz_scalar
    else:
        gz = tl.zeros_like(m)
    if KIND == 0:
        z = m + std * eps
        sgn = tl.where(z > 0, 1.0, tl.where(z < 0, -1.0, 0.0)).to(CDT)
        gz = gz + c_b * sgn * tl.exp(tl.abs(z) - tau)
        dm = gz
        inv = _recip(var + delta)
        dlv = gz * (0.5 * std * eps) - c_a * var * (inv * inv)
    else:
        dm = gz + c_a * m
        dlv = gz * (0.5 * std * eps) + c_a * 0.5 * (var - 1.0)
    dlv = tl.where(inside, dlv, 0.0)
    if WRITE_DMEAN:
        tl.store(dmean_ptr + (row * sb_dmean + col), _out(dm, dmean_ptr, RND_BF16), mask=mask)
    if WRITE_DLOGVAR:
        tl.store(dlogvar_ptr + (row * sb_dlogvar + col), _out(dlv, dlogvar_ptr, RND_BF16), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _reparam_bwd_kernel(mean_ptr, logvar_ptr, noise_ptr, dz_ptr, gl_ptr, ga_ptr, gb_ptr, dmean_ptr, dlogvar_ptr,
                        seed, N, M, sb_mean, sb_logvar, sb_noise, sb_dz, sb_dmean, sb_dlogvar,
                        scale, lam_a, lam_b, tau, delta,
                        KIND: tl.constexpr, HAS_NOISE: tl.constexpr, DZ_MODE: tl.constexpr,
                        HAS_GL: tl.constexpr, HAS_GA: tl.constexpr, HAS_GB: tl.constexpr,
                        WRITE_DMEAN: tl.constexpr, WRITE_DLOGVAR: tl.constexpr, LAYOUT: tl.constexpr,
                        Q: tl.constexpr, GROUPS: tl.constexpr, IDX64: tl.constexpr, CDT: tl.constexpr,
                        RND_BF16: tl.constexpr):
    """Regenerates eps from the seed (or reads noise) and writes dmean, dlogvar in one pass."""
    _, base, loc, n0, n1, n2, n3 = _tile_noise(seed, HAS_NOISE, Q, GROUPS, IDX64)
    # coefficient of each term's elementwise gradient: (g_term + lambda_term * g_loss) * scale
    c_a = tl.zeros((), CDT)
    c_b = tl.zeros((), CDT)
    if HAS_GL:
        gl = tl.load(gl_ptr).to(CDT)
        c_a += lam_a * gl
        c_b += lam_b * gl
    if HAS_GA:
        c_a += tl.load(ga_ptr).to(CDT)
    if HAS_GB:
        c_b += tl.load(gb_ptr).to(CDT)
    c_a = c_a * scale
    c_b = c_b * scale
    dz_scalar = tl.zeros((), CDT)
    if DZ_MODE == 2:
        dz_scalar = tl.load(dz_ptr).to(CDT)
    _bwd_lane(loc, n0, base, c_a, c_b, dz_scalar, mean_ptr, logvar_ptr, noise_ptr, dz_ptr, dmean_ptr, dlogvar_ptr,
              N, M, sb_mean, sb_logvar, sb_noise, sb_dz, sb_dmean, sb_dlogvar, tau, delta,
              KIND, HAS_NOISE, DZ_MODE, LAYOUT, WRITE_DMEAN, WRITE_DLOGVAR, CDT, RND_BF16)
    _bwd_lane(loc + Q, n1, base, c_a, c_b, dz_scalar, mean_ptr, logvar_ptr, noise_ptr, dz_ptr, dmean_ptr,
              dlogvar_ptr, N, M, sb_mean, sb_logvar, sb_noise, sb_dz, sb_dmean, sb_dlogvar, tau, delta,
              KIND, HAS_NOISE, DZ_MODE, LAYOUT, WRITE_DMEAN, WRITE_DLOGVAR, CDT, RND_BF16)
    _bwd_lane(loc + 2 * Q, n2, base, c_a, c_b, dz_scalar, mean_ptr, logvar_ptr, noise_ptr, dz_ptr, dmean_ptr,
              dlogvar_ptr, N, M, sb_mean, sb_logvar, sb_noise, sb_dz, sb_dmean, sb_dlogvar, tau, delta,
              KIND, HAS_NOISE, DZ_MODE, LAYOUT, WRITE_DMEAN, WRITE_DLOGVAR, CDT, RND_BF16)
    _bwd_lane(loc + 3 * Q, n3, base, c_a, c_b, dz_scalar, mean_ptr, logvar_ptr, noise_ptr, dz_ptr, dmean_ptr,
              dlogvar_ptr, N, M, sb_mean, sb_logvar, sb_noise, sb_dz, sb_dmean, sb_dlogvar, tau, delta,
              KIND, HAS_NOISE, DZ_MODE, LAYOUT, WRITE_DMEAN, WRITE_DLOGVAR, CDT, RND_BF16)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
_FIN_BLOCK = 1024


def _split(x: torch.Tensor, logvar: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, logvar): the given pair, or the two halves of ``moments`` along dim 1."""
    if logvar is not None:
        return x, logvar
    mean, lv = x.chunk(2, dim=1)
    return mean, lv


def _batch_stride(t: torch.Tensor, M: int) -> int | None:
    """Stride of dim 0 if ``t`` is (batch stride, contiguous inner block), else None."""
    if t.dim() == 0:
        return M
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != expected:
            return None
        expected *= size
    return M if t.shape[0] == 1 else t.stride(0)


def _readable(t: torch.Tensor, M: int) -> tuple[torch.Tensor, int]:
    sb = _batch_stride(t, M)
    if sb is None:
        t = t.contiguous()
        sb = M
    return t, sb


def _tiling(N: int, device: torch.device, dtype: torch.dtype) -> tuple[int, int, int]:
    """(GROUPS, num_warps, programs). GROUPS changes the tile, never the noise. num_warps = 4 GROUPS keeps
    2 elements per thread and lane at every GROUPS: 4 warps at GROUPS = 4 spilled (codegen gate,
    docs/speed_checks.md), and so did float64 at GROUPS = 4 (float64 tiles stay at one group)."""
    groups_of_4q = triton.cdiv(N, 4 * NOISE_Q)
    groups = 1
    if not interpret_mode() and dtype != torch.float64:  # compiled kernels (CUDA tensors: triton_path admitted them)
        idx = device.index if device.index is not None else torch.cuda.current_device()
        sms = torch.cuda.get_device_properties(idx).multi_processor_count  # cached by torch
        groups = 4 if groups_of_4q >= 8 * sms else (2 if groups_of_4q >= 4 * sms else 1)
    return groups, 4 * groups, triton.cdiv(groups_of_4q, groups)


def _geometry(mean: torch.Tensor) -> tuple[int, int, int]:
    N = mean.numel()
    B = mean.shape[0] if mean.dim() > 0 else 1
    return N, B, N // max(B, 1)


def _layout(M: int, tile: int, strides: list[int]) -> int:
    if all(s == M for s in strides):
        return 0
    return 1 if M % tile == 0 else 2


def _idx64(N: int, B: int, strides: list[int], tile: int) -> bool:
    reach = max([N] + [B * abs(s) for s in strides]) + tile
    return reach >= 2**31 - 1


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return _compute_dtype(dtype)


def _rnd_bf16(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and interpret_mode()


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _prepare(x, logvar, noise):
    """mean, logvar and noise as kernel operands: readable views, their geometry (N, B, M) and
    batch strides. Without noise the noise pointer is a dummy (mean) that the kernel never reads."""
    mean, lv = _split(x, logvar)
    N, B, M = _geometry(mean)
    mean, sb_m = _readable(mean, M)
    lv, sb_l = _readable(lv, M)
    has_noise = noise is not None
    if has_noise:
        noise, sb_n = _readable(noise, M)
    else:
        noise, sb_n = mean, M
    return mean, lv, noise, has_noise, (N, B, M), (sb_m, sb_l, sb_n)


@on_tensor_device
def _fwd_launch(x, logvar, noise, seed, kind, lam_a, lam_b, tau, delta, reduction):
    mean, lv, noise, has_noise, (N, B, M), (sb_m, sb_l, sb_n) = _prepare(x, logvar, noise)
    groups, warps, P = _tiling(N, mean.device, mean.dtype)
    tile = groups * 4 * NOISE_Q
    strides = [sb_m, sb_l, sb_n]
    ldt = _loss_dtype(mean.dtype)
    z = torch.empty(mean.shape, dtype=mean.dtype, device=mean.device)
    part = torch.empty((P, 2), dtype=ldt, device=mean.device)
    seed_v = int(host_item(seed)) if seed is not None else 0
    cdt = _tl_dtype(mean.dtype)
    _reparam_fwd_kernel[(P,)](
        mean, lv, noise, z, part, seed_v, N, M, sb_m, sb_l, sb_n, float(tau), float(delta),
        KIND=kind, HAS_NOISE=has_noise, LAYOUT=_layout(M, tile, strides), Q=NOISE_Q, GROUPS=groups,
        IDX64=_idx64(N, B, strides, tile), CDT=cdt,
        RND_BF16=_rnd_bf16(mean.dtype), num_warps=warps)
    loss = torch.empty((), dtype=ldt, device=mean.device)
    a = torch.empty((), dtype=ldt, device=mean.device)
    b = torch.empty((), dtype=ldt, device=mean.device)
    _reparam_finalize_kernel[(1,)](part, loss, a, b, P, reduction_scale(N, B, reduction), float(lam_a),
                                   float(lam_b), KIND=kind, BLOCK=_FIN_BLOCK,
                                   ITERS=triton.next_power_of_2(triton.cdiv(P, _FIN_BLOCK)), CDT=cdt, num_warps=4)
    return z, loss, a, b


@on_tensor_device
def _bwd_launch(x, logvar, noise, seed, dz, g_loss, g_a, g_b, kind, lam_a, lam_b, tau, delta, reduction,
                need_x, need_logvar):
    mean, lv, noise, has_noise, (N, B, M), (sb_m, sb_l, sb_n) = _prepare(x, logvar, noise)
    if dz is None:
        dz_mode, dz, sb_dz = 0, mean, M
    elif all(s == 0 for s in dz.stride()):
        dz_mode, sb_dz = 2, M
    else:
        dz_mode = 1
        dz, sb_dz = _readable(dz, M)
    moments = logvar is None
    if moments:
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        dmean, dlv = dx.chunk(2, dim=1)
        sb_dm = sb_dl = M if B == 1 else dx.stride(0)
        write_m = write_l = need_x
        dlogvar_out = x.new_empty(0)
    else:
        dmean = torch.empty(mean.shape, dtype=mean.dtype, device=mean.device) if need_x else mean.new_empty(0)
        dlv = torch.empty(lv.shape, dtype=lv.dtype, device=lv.device) if need_logvar else lv.new_empty(0)
        dx, dlogvar_out = dmean, dlv
        sb_dm = sb_dl = M
        write_m, write_l = need_x, need_logvar
        if not need_x:
            dmean = mean  # never written (WRITE_DMEAN=False); any valid pointer
        if not need_logvar:
            dlv = lv
    if write_m or write_l:
        groups, warps, P = _tiling(N, mean.device, mean.dtype)
        tile = groups * 4 * NOISE_Q
        strides = [sb_m, sb_l, sb_n, sb_dz, sb_dm, sb_dl]
        scale = reduction_scale(N, B, reduction)
        dummy = mean
        _reparam_bwd_kernel[(P,)](
            mean, lv, noise, dz, g_loss if g_loss is not None else dummy, g_a if g_a is not None else dummy,
            g_b if g_b is not None else dummy, dmean, dlv, int(host_item(seed)) if seed is not None else 0,
            N, M, sb_m, sb_l, sb_n, sb_dz, sb_dm, sb_dl, scale, float(lam_a), float(lam_b), float(tau), float(delta),
            KIND=kind, HAS_NOISE=has_noise, DZ_MODE=dz_mode, HAS_GL=g_loss is not None, HAS_GA=g_a is not None,
            HAS_GB=g_b is not None, WRITE_DMEAN=write_m, WRITE_DLOGVAR=write_l,
            LAYOUT=_layout(M, tile, strides), Q=NOISE_Q, GROUPS=groups, IDX64=_idx64(N, B, strides, tile),
            CDT=_tl_dtype(mean.dtype), RND_BF16=_rnd_bf16(mean.dtype), num_warps=warps)
    return dx, dlogvar_out


# ----------------------------------------------------------------------------------------------
# torch.library ops. ``x`` is ``mean`` (with ``logvar``) or, when ``logvar`` is None, ``moments``
# (mean and logvar are its halves along dim 1; backward then writes d moments in one buffer, so
# autograd needs no concatenation of the two halves).
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("vefast::reparam_fwd", mutates_args=())
def _reparam_fwd_op(x: torch.Tensor, logvar: torch.Tensor | None, noise: torch.Tensor | None,
                    seed: torch.Tensor | None, kind: int, lam_a: float, lam_b: float, tau: float, delta: float,
                    reduction: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd_launch(x, logvar, noise, seed, kind, lam_a, lam_b, tau, delta, reduction)


@_reparam_fwd_op.register_fake
def _(x, logvar, noise, seed, kind, lam_a, lam_b, tau, delta, reduction):
    mean, _lv = _split(x, logvar)
    ldt = _loss_dtype(mean.dtype)
    return (x.new_empty(mean.shape), x.new_empty((), dtype=ldt), x.new_empty((), dtype=ldt),
            x.new_empty((), dtype=ldt))


@torch.library.custom_op("vefast::reparam_bwd", mutates_args=())
def _reparam_bwd_op(x: torch.Tensor, logvar: torch.Tensor | None, noise: torch.Tensor | None,
                    seed: torch.Tensor | None, dz: torch.Tensor | None, g_loss: torch.Tensor | None,
                    g_a: torch.Tensor | None, g_b: torch.Tensor | None, kind: int, lam_a: float, lam_b: float,
                    tau: float, delta: float, reduction: str, need_x: bool,
                    need_logvar: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _bwd_launch(x, logvar, noise, seed, dz, g_loss, g_a, g_b, kind, lam_a, lam_b, tau, delta, reduction,
                       need_x, need_logvar)


@_reparam_bwd_op.register_fake
def _(x, logvar, noise, seed, dz, g_loss, g_a, g_b, kind, lam_a, lam_b, tau, delta, reduction, need_x,
      need_logvar):
    if logvar is None:
        return (x.new_empty(x.shape) if need_x else x.new_empty(0)), x.new_empty(0)
    return (x.new_empty(x.shape) if need_x else x.new_empty(0),
            logvar.new_empty(logvar.shape) if need_logvar else logvar.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, logvar, noise, seed, kind, lam_a, lam_b, tau, delta, reduction = inputs
    ctx.save_for_backward(x, logvar, noise, seed)
    ctx.args = (kind, lam_a, lam_b, tau, delta, reduction)
    ctx.has_logvar = logvar is not None
    ctx.set_materialize_grads(False)


def _backward(ctx, dz, g_loss, g_a, g_b):
    x, logvar, noise, seed = ctx.saved_tensors
    kind, lam_a, lam_b, tau, delta, reduction = ctx.args
    need_x = ctx.needs_input_grad[0]
    need_lv = ctx.has_logvar and ctx.needs_input_grad[1]
    if kind == _KL:  # the KL op's extra outputs are copies of / zero beside the loss: fold them in
        g_loss = g_loss if g_a is None else (g_a if g_loss is None else g_loss + g_a)
        g_a = g_b = None
    if not (need_x or need_lv) or (dz is None and g_loss is None and g_a is None and g_b is None):
        return None, None, None, None, None, None, None, None, None, None
    dx, dlv = torch.ops.vefast.reparam_bwd(x, logvar, noise, seed, dz, g_loss, g_a, g_b, kind, lam_a, lam_b, tau,
                                           delta, reduction, need_x, need_lv)
    return (dx if need_x else None, dlv if need_lv else None, None, None, None, None, None, None, None, None)


_reparam_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def _check_args(mean, logvar, noise, generator, reduction, *, moments: bool = False) -> None:
    name = "moments" if moments else "mean"
    check_tensor(name, mean)
    if not moments:
        check_tensor("logvar", logvar)
        if logvar.dtype != mean.dtype:
            raise TypeError(f"logvar must have the dtype of mean ({mean.dtype}), got {logvar.dtype}")
        check_same_device(mean=mean, logvar=logvar)
        check_same_shape(mean=mean, logvar=logvar)
    if noise is not None:
        check_tensor("noise", noise)
        check_same_device(**{name: mean, "noise": noise})
    check_generator(generator)
    check_reduction(reduction)
    if mean.numel() == 0:
        raise ValueError(f"{name} must have at least one element, got shape {tuple(mean.shape)}")
    if reduction == "sum" and mean.dim() == 0:
        raise ValueError(f"reduction='sum' needs a batch dim 0; {name} is 0-dim")


def _check_moments(moments: torch.Tensor) -> None:
    check_tensor("moments", moments)
    if moments.dim() < 2 or moments.shape[1] % 2:
        raise ValueError(f"moments must have an even size along dim 1 (mean, logvar), got shape {tuple(moments.shape)}")


def _eager_noise(mean: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is not None and generator.device.type != mean.device.type:
        raise ValueError(f"generator must be on the device of mean ({mean.device.type}) for the eager path, "
                         f"got {generator.device}")
    return torch.randn(mean.shape, generator=generator, dtype=_compute_dtype(mean.dtype), device=mean.device)


def _run(kind: int, mean: torch.Tensor | None, logvar: torch.Tensor | None, moments: torch.Tensor | None,
         noise, lam_a, lam_b, tau, delta, reduction, generator):
    """Dispatch (checked arguments). Returns (z, loss, term_a, term_b); terms are None for KL on the eager path."""
    x = moments if moments is not None else mean
    m, lv = _split(x, None if moments is not None else logvar)
    if noise is not None:
        check_same_shape(mean=m, noise=noise)
    if triton_path("ve_loss" if kind == _VE else "kl_loss", x, float64_in_kernel=True):
        seed = draw_seed(generator) if noise is None else None
        return torch.ops.vefast.reparam_fwd(x, None if moments is not None else lv, noise, seed, kind,
                                            float(lam_a), float(lam_b), float(tau), float(delta), reduction)
    eps = noise if noise is not None else _eager_noise(m, generator)
    if kind == _VE:
        return tuple(ve_loss_reference(m, lv, eps, lambda_var=lam_a, lambda_reg=lam_b, tau=tau, delta=delta,
                                       reduction=reduction))
    z, loss = kl_loss_reference(m, lv, eps, reduction=reduction)
    return z, loss, None, None


def _check_ve_numbers(lambda_var, lambda_reg, tau, delta) -> None:
    check_finite_number("lambda_var", lambda_var, min_value=0.0)  # a negative weight would reward collapse
    check_finite_number("lambda_reg", lambda_reg, min_value=0.0)
    check_finite_number("tau", tau)
    check_finite_number("delta", delta, min_value=0.0)


def ve_loss(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor | None = None, *,
            lambda_var: float = 0.1, lambda_reg: float = 1e-6, tau: float = 1.0, delta: float = 1e-6,
            reduction: str = "mean", generator: torch.Generator | None = None) -> VEOutput:
    """Fused reparameterization + Variance Expansion loss ([VE], eqs. 9-11; docs/math.md §1-2).

    ``z = mean + exp(0.5 clamp(logvar, -30, 20)) * eps``;
    ``loss = lambda_var R(1 / (var + delta)) + lambda_reg R(exp(|z| - tau))``, R = ``reduction``
    ("mean" over every element, or "sum" over non-batch dims then mean over dim 0).
    ``noise=None``: eps is drawn in-kernel (Philox, seed from ``generator``) on the Triton path,
    with ``torch.randn(generator=generator)`` on the eager CPU path (different streams).
    Differentiable w.r.t. ``mean`` and ``logvar``; no gradient flows to ``noise``.
    Returns ``VEOutput(z, loss, var_loss, reg_loss)``; z in the input dtype, losses 0-dim float32
    (float64 for float64 inputs).
    """
    _check_args(mean, logvar, noise, generator, reduction)
    _check_ve_numbers(lambda_var, lambda_reg, tau, delta)
    return VEOutput(*_run(_VE, mean, logvar, None, noise, lambda_var, lambda_reg, tau, delta, reduction, generator))


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor | None = None, *,
            reduction: str = "mean", generator: torch.Generator | None = None) -> KLOutput:
    """Fused reparameterization + KL(N(mean, var) || N(0, I)) = R(0.5 (mean^2 + var - 1 - logvar)).

    Same conventions as :func:`ve_loss` (docs/math.md §1-2). ``reduction="sum"`` equals LDM's
    ``posterior.kl().sum() / B``. Returns ``KLOutput(z, loss)``.
    """
    _check_args(mean, logvar, noise, generator, reduction)
    z, loss, _, _ = _run(_KL, mean, logvar, None, noise, 1.0, 0.0, 1.0, 0.0, reduction, generator)
    return KLOutput(z, loss)


def ve_loss_from_moments(moments: torch.Tensor, noise: torch.Tensor | None = None, *, lambda_var: float = 0.1,
                         lambda_reg: float = 1e-6, tau: float = 1.0, delta: float = 1e-6, reduction: str = "mean",
                         generator: torch.Generator | None = None) -> VEOutput:
    """:func:`ve_loss` on ``mean, logvar = moments.chunk(2, dim=1)``, read in place; backward writes
    ``d moments`` in one buffer (no concatenation of the two halves' gradients)."""
    _check_moments(moments)
    _check_args(moments, None, noise, generator, reduction, moments=True)
    _check_ve_numbers(lambda_var, lambda_reg, tau, delta)
    return VEOutput(*_run(_VE, None, None, moments, noise, lambda_var, lambda_reg, tau, delta, reduction,
                          generator))


def kl_loss_from_moments(moments: torch.Tensor, noise: torch.Tensor | None = None, *, reduction: str = "mean",
                         generator: torch.Generator | None = None) -> KLOutput:
    """:func:`kl_loss` on ``mean, logvar = moments.chunk(2, dim=1)``, read in place (see above)."""
    _check_moments(moments)
    _check_args(moments, None, noise, generator, reduction, moments=True)
    z, loss, _, _ = _run(_KL, None, None, moments, noise, 1.0, 0.0, 1.0, 0.0, reduction, generator)
    return KLOutput(z, loss)

