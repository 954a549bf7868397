"""VA-VAE's vision-foundation ("VF") alignment loss, fused (docs/math.md §3a; hustvl/LightningDiT, vavae).

With z (B, C, h, w) the sampled latent, W (D', C) the bias-free 1x1 projection (VA-VAE's
``linear_proj`` with ``reverse_proj=True``), z' = W z per token, f (B, D', h, w) the frozen DINOv2
patch features at the latent grid, N = h*w tokens and cos taken over the channel dim per token:

    L_mcos = mean_{b,n}   relu(1 - m1 - cos(z'_bn, f_bn))
    L_mdms = mean_{b,i,j} relu(|cos(z'_bi, z'_bj) - cos(f_bi, f_bj)| - m2)
    L_vf   = w_cos * L_mcos + w_dms * L_mdms            (defaults m1 = 0.5, m2 = 0.25, w = 1, 1)

How the fused path computes it (choices the papers leave open are marked *), per call one forward and
one backward Triton launch (plus a (D' x C) QR and two small sums); the features are read once each way:
- The z side never leaves the C-dim latent space. z'_n = W z_n lies in the column space of W; with the
  reduced QR W = Q R (Q D' x k orthonormal, k = min(D', C), held constant) and P = Q^T W = R (k x C),
  ||z'_n|| = ||P z_n|| and cos(z'_i, z'_j) = u_i . u_j with the unit vectors u_n = P z_n / ||P z_n||.
  The kernels form P z_n from z tiles (a (T, C) @ (C, k) dot); z' (B, D', N) is never formed. Unlike the
  quadratic form z^T (W^T W) z, this has no cancellation when W z_n is small. dL/dW = Q dL/dP + (the
  cosine term's W^T f part) exactly (Q Q^T W = W).
- Forward kernel, program (i-tile, b), flash-attention style: a prologue over D' builds ||f_i||^2 and
  W^T f_i ((BM, BK) @ (BK, C) dots, W in the features' dtype), hence r_i = 1 / ||f_i|| and
  cos(z'_i, f_i) = (z_i . W^T f_i) r_i / ||P z_i||; then for every j-tile the (BM, BN) tiles of both
  similarity matrices in registers: S^f from the raw features in their own dtype, scaled by r_i r_j in
  fp32 (||f_j||^2 summed from the f_j tiles the D' loop loads anyway, 1/BM extra work), S^z = u_i . u_j
  with u_j from the z_j tile; the row sums of relu(|S^z - S^f| - m2). One fp32 partial per program and
  term (deterministic: ``torch.sum`` over the partials, no atomics). No (B, N, N) tensor, no normalized
  features and no separate pass over f (norms, W^T f) reach HBM. N and D' are compile-time constants,
  so the loops are ``range`` loops that the compiler software-pipelines.
*- Backward without recomputing the pair tiles: the pair term is a sum of pointwise functions of the two
  similarities, so g_ij = dL/dS^z_ij = sign(S^z - S^f) [|S^z - S^f| > m2] is known in the forward tile.
  With S^z_ij = u_i . u_j and g symmetric, dL/du_I = 2 sum_j g_Ij u_j: when a gradient is needed the
  forward accumulates gu_I = sum_j g_Ij u_j ((B, N, k) fp32) and also writes W^T f (B, N, C), r and cos
  (B, N) fp32. With c_n = dL/dcos_n, a_n = ||P z_n|| and s = 2 x the upstream gradient of the pair sum:
      v_n = (s gu_n - (s u_n . gu_n + c_n cos_n) u_n) / a_n           (dL/d(P z_n))
      dz_n = c_n r_n / a_n  W^T f_n + P^T v_n
      dW = sum_n f_n (c_n r_n / a_n  z_n)^T + Q sum_n v_n z_n^T
  The backward kernel, program (d-tile, group of batch items), reads f once: it accumulates
  f[d-tile] (alpha z)^T and dP^T = sum z v^T over its tokens and writes the fp32 partial of dW of its
  group (a deterministic two-stage reduction: ``torch.sum`` over <= 8 partials); its d-tile-0 programs
  write dz. No (B, N, C) glue pass remains.
*- Precision of the dots: bf16 / fp16 features contract in their dtype (forward; the backward casts
  the feature tiles to fp32 for tf32 dots), the small k-dim dots of the z side in tf32. fp32 features
  contract in ``tf32x3`` (three tf32 tensor-core products, about fp32 accuracy: eager PyTorch's fp32
  matmul is IEEE) and the z-side dots in IEEE fp32, keeping the fused error within 2x the eager one.
  With 16-bit features the forward rounds W to their dtype for the W^T f_i dot (as autocast rounds a
  bf16 projection): the cosine term then carries W's rounding (~2^-9 relative in bf16, and fp16 flushes
  |W| < 6e-8), more than eager fp32 on mixed inputs (fp32 z and W, bf16 features) would; an fp32
  prologue (tf32x3) would remove it at the price of registers the configs do not have today.
  Each precision family and kernel has its own autotune configs, all free of spills on sm_90 and sm_80.
- NaN in z or f propagates to both terms, as in the eager reference (the relu masks keep NaN).
- Under TRITON_INTERPRET the feature tiles are cast to fp32 before ``tl.dot`` (the interpreter's
  bf16 dot is wrong in triton 3.6); products of bf16 / fp16 values are exact in fp32, so this is
  the GPU's arithmetic up to the accumulation order.
*- Norms are clamped at eps = 1e-8 before dividing (``F.cosine_similarity``'s clamp, used by
  VA-VAE for the cos term; its dms term uses ``F.normalize``'s 1e-12: only zero vectors differ).
- The losses are returned in fp32 (float64 when an input is float64). float64 inputs run the
  eager reference (the kernel accumulates in fp32), reported once.
- The adaptive VF weight of VA-VAE (``||grad L_nll|| / ||grad L_vf||``) belongs to the training
  recipe, not to this op (docs/math.md §3a).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import (check_finite_number, check_grid_axis, check_same_device, check_tensor, interpret_mode,
                      on_tensor_device, triton_path)

EPS = 1e-8


class VFOutput(NamedTuple):
    """``loss = weight_cos * cos_loss + weight_dms * dms_loss`` (0-dim tensors)."""

    loss: torch.Tensor
    cos_loss: torch.Tensor
    dms_loss: torch.Tensor


# --------------------------------------------------------------------------------------------
# eager reference (docs/math.md §3a written out; float64 in tests; also the CPU path)
# --------------------------------------------------------------------------------------------
def vf_loss_reference(z: torch.Tensor, features: torch.Tensor, proj_weight: torch.Tensor, *,
                      margin_cos: float = 0.5, margin_dms: float = 0.25, weight_cos: float = 1.0,
                      weight_dms: float = 1.0, upcast: bool = True) -> VFOutput:
    """docs/math.md §3a with both (B, N, N) similarity matrices materialized.

    ``upcast=True`` computes in fp32 (float64 for float64 inputs); ``upcast=False`` computes in the
    inputs' promoted dtype, as eager PyTorch code does (the benchmarks' "eager" variant).
    """
    dtype = torch.promote_types(torch.promote_types(z.dtype, features.dtype), proj_weight.dtype)
    if upcast:
        dtype = torch.promote_types(dtype, torch.float32)
    b, c = z.shape[:2]
    w = proj_weight.reshape(proj_weight.shape[0], c).to(dtype)
    zp = torch.matmul(w, z.to(dtype).reshape(b, c, -1))                 # (B, D', N)
    fp = features.to(dtype).reshape(b, features.shape[1], -1)            # (B, D', N)
    zn = zp / torch.linalg.vector_norm(zp, dim=1, keepdim=True).clamp_min(EPS)
    fn = fp / torch.linalg.vector_norm(fp, dim=1, keepdim=True).clamp_min(EPS)
    cos = (zn * fn).sum(1)
    cos_loss = torch.relu(1.0 - margin_cos - cos).mean()
    sim_z = torch.matmul(zn.transpose(1, 2), zn)
    sim_f = torch.matmul(fn.transpose(1, 2), fn)
    dms_loss = torch.relu((sim_z - sim_f).abs() - margin_dms).mean()
    return VFOutput(weight_cos * cos_loss + weight_dms * dms_loss, cos_loss, dms_loss)


# --------------------------------------------------------------------------------------------
# Triton kernels: the forward (both terms, and what the backward needs) and the backward (dz, dW partials)
# --------------------------------------------------------------------------------------------
@triton.jit
def _unit_rows(z_ptrs, mask, pt, EPS: tl.constexpr, Z_PREC: tl.constexpr):
    """Rows of z (fp32, (T, BLOCK_C)), p = z P^T (T, BLOCK_C), ||p|| and u = p / max(||p||, eps)."""
    z = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
    p = tl.dot(z, pt, input_precision=Z_PREC)
    nrm = tl.sqrt(tl.sum(p * p, axis=1))
    u = p / tl.maximum(nrm, EPS, propagate_nan=tl.PropagateNan.ALL)[:, None]
    return z, nrm, u


@triton.jit
def _vf_fwd_kernel(z_ptr, f_ptr, w_ptr, p_ptr, part_ptr, g_ptr, gu_ptr, tok_ptr,
                   C, KP, margin_cos, margin_dms, s_part, s_tok, s_zb, s_zc, s_zn, s_fb, s_fd, s_fn,
                   s_wd, s_wc, s_pk, s_pc,
                   N: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, EPS: tl.constexpr, Z_PREC: tl.constexpr,
                   F_PREC: tl.constexpr, WITH_GRAD: tl.constexpr, DOT_F32: tl.constexpr):
    """Program (i-tile, b). Prologue over D': ||f_i||^2 and W^T f_i; u_i from z_i; the cosine term. Then
    for every j-tile: S^f (the D' loop, ||f_j||^2 from the same f_j tiles), u_j from z_j, S^z - S^f (the u dot
    accumulated onto -S^f), the row sums of relu(|S^z - S^f| - m2) and, with the gradient, gu_i += g_ij u_j.
    Writes two fp32 partials and, with the gradient, W^T f_i, 1/||f_i||, cos_i and gu_i."""
    pid_m = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    n_tiles_m = tl.num_programs(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < N
    mask_c = offs_c < C
    mask_p = offs_c < KP
    f_base = f_ptr + bid * s_fb
    fi_ptrs = f_base + offs_m[:, None] * s_fn + offs_k[None, :] * s_fd          # (BM, BK)
    w_ptrs = w_ptr + offs_k[:, None] * s_wd + offs_c[None, :] * s_wc            # (BK, BLOCK_C)
    # prologue: ||f_i||^2 and W^T f_i (W in the features' dtype)
    sq_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    wtf = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        mask_k = (k + offs_k) < D
        f_i = tl.load(fi_ptrs + k * s_fd, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_k = tl.load(w_ptrs + k * s_wd, mask=mask_k[:, None] & mask_c[None, :], other=0.0).to(f_i.dtype)
        f32 = f_i.to(tl.float32)
        sq_i += tl.sum(f32 * f32, axis=1)
        if DOT_F32:
            f_i = f32
            w_k = w_k.to(tl.float32)
        wtf = tl.dot(f_i, w_k, wtf, input_precision=F_PREC)
    r_i = 1.0 / tl.maximum(tl.sqrt(sq_i), EPS, propagate_nan=tl.PropagateNan.ALL)
    # P^T (C, k), zero-padded to (BLOCK_C, BLOCK_C)
    pt = tl.load(p_ptr + offs_c[None, :] * s_pk + offs_c[:, None] * s_pc, mask=mask_c[:, None] & mask_p[None, :],
                 other=0.0)
    z_base = z_ptr + bid * s_zb
    z_i, nrm_i, u_i = _unit_rows(z_base + offs_m[:, None] * s_zn + offs_c[None, :] * s_zc,
                                 mask_m[:, None] & mask_c[None, :], pt, EPS, Z_PREC)
    cos_i = tl.sum(z_i * wtf, axis=1) * r_i / tl.maximum(nrm_i, EPS, propagate_nan=tl.PropagateNan.ALL)
    t_cos = 1.0 - margin_cos - cos_i
    keep = ((t_cos > 0) | (t_cos != t_cos)) & mask_m                       # NaN propagates
    tl.store(part_ptr + bid * n_tiles_m + pid_m, tl.sum(tl.where(keep, t_cos, 0.0), axis=0))
    if WITH_GRAD:
        tl.store(g_ptr + bid * N * C + offs_m[:, None] * C + offs_c[None, :], wtf,
                 mask=mask_m[:, None] & mask_c[None, :])
        tl.store(tok_ptr + bid * N + offs_m, r_i, mask=mask_m)
        tl.store(tok_ptr + s_tok + bid * N + offs_m, cos_i, mask=mask_m)
    # the pair term
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    gu = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        s_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        sq_j = tl.zeros((BLOCK_N,), dtype=tl.float32)
        fj_ptrs = f_base + offs_k[:, None] * s_fd + offs_n[None, :] * s_fn      # (BK, BN)
        for k in range(0, D, BLOCK_K):
            mask_k = (k + offs_k) < D
            f_i = tl.load(fi_ptrs + k * s_fd, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            f_j = tl.load(fj_ptrs + k * s_fd, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            fj32 = f_j.to(tl.float32)
            sq_j += tl.sum(fj32 * fj32, axis=0)
            if DOT_F32:  # the interpreter's bf16 tl.dot is wrong (triton 3.6); bf16 products are exact in fp32
                f_i = f_i.to(tl.float32)
                f_j = fj32
            s_f = tl.dot(f_i, f_j, s_f, input_precision=F_PREC)
        r_j = 1.0 / tl.maximum(tl.sqrt(sq_j), EPS, propagate_nan=tl.PropagateNan.ALL)
        _, _, u_j = _unit_rows(z_base + offs_n[:, None] * s_zn + offs_c[None, :] * s_zc,
                               mask_n[:, None] & mask_c[None, :], pt, EPS, Z_PREC)
        diff = tl.dot(u_i, tl.trans(u_j), -(s_f * r_i[:, None] * r_j[None, :]), input_precision=Z_PREC)
        excess = tl.abs(diff) - margin_dms
        active = ((excess > 0) | (excess != excess)) & mask_m[:, None] & mask_n[None, :]  # NaN propagates
        acc += tl.sum(tl.where(active, excess, 0.0), axis=1)
        if WITH_GRAD:
            g = tl.where(active, tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, diff)), 0.0)
            gu = tl.dot(g, u_j, gu, input_precision=Z_PREC)
    tl.store(part_ptr + s_part + bid * n_tiles_m + pid_m, tl.sum(acc, axis=0))
    if WITH_GRAD:
        tl.store(gu_ptr + bid * N * KP + offs_m[:, None] * KP + offs_c[None, :], gu,
                 mask=mask_m[:, None] & mask_p[None, :])


@triton.jit
def _vf_bwd_kernel(z_ptr, f_ptr, q_ptr, p_ptr, g_ptr, gu_ptr, tok_ptr, gs_ptr, dz_ptr, part_ptr,
                   B, C, KP, margin_cos, s_tok, s_zb, s_zc, s_zn, s_fb, s_fd, s_fn, s_qd, s_qk, s_pk, s_pc,
                   N: tl.constexpr, D: tl.constexpr, BPG: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, EPS: tl.constexpr, Z_PREC: tl.constexpr,
                   F_PREC: tl.constexpr):
    """Program (d-tile, batch group): for every token n of its BPG batch items, the k-space gradient
    v_n = (s gu_n - [||p_n|| >= eps] (s u_n . gu_n + c_n cos_n) u_n) / a_n and alpha_n = c_n r_n / a_n; it
    accumulates f_n[d-tile] (alpha_n z_n)^T and dP = sum_n v_n z_n^T, and writes the fp32 partial
    dW[d-tile] = sum_n alpha_n f_n z_n^T + Q[d-tile] dP of its group. The d-tile 0 programs also write
    dz_n = alpha_n W^T f_n + P^T v_n."""
    pid_d = tl.program_id(0)
    grp = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    offs_t = tl.arange(0, BLOCK_T)
    mask_d = offs_d < D
    mask_c = offs_c < C
    mask_p = offs_c < KP
    pt = tl.load(p_ptr + offs_c[None, :] * s_pk + offs_c[:, None] * s_pc, mask=mask_c[:, None] & mask_p[None, :],
                 other=0.0)
    g_cos = tl.load(gs_ptr)
    s_pair = 2.0 * tl.load(gs_ptr + 1)     # S^z_ij = u_i . u_j: u appears on both sides
    acc = tl.zeros((BLOCK_D, BLOCK_C), dtype=tl.float32)
    dp = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)                     # dL/dP^T (C, k)
    for bb in range(BPG):
        b = grp * BPG + bb
        b64 = b.to(tl.int64)
        for start in range(0, N, BLOCK_T):
            offs_n = start + offs_t
            mask_n = (offs_n < N) & (b < B)
            mask_nc = mask_n[:, None] & mask_c[None, :]
            z, nrm, u = _unit_rows(z_ptr + b64 * s_zb + offs_n[:, None] * s_zn + offs_c[None, :] * s_zc,
                                   mask_nc, pt, EPS, Z_PREC)
            gu = tl.load(gu_ptr + b64 * N * KP + offs_n[:, None] * KP + offs_c[None, :],
                         mask=mask_n[:, None] & mask_p[None, :], other=0.0)
            r = tl.load(tok_ptr + b64 * N + offs_n, mask=mask_n, other=0.0)
            cos = tl.load(tok_ptr + s_tok + b64 * N + offs_n, mask=mask_n, other=0.0)
            ra = 1.0 / tl.maximum(nrm, EPS)
            c = tl.where(mask_n & (1.0 - margin_cos - cos > 0), -g_cos, 0.0)   # dL/dcos_n
            proj = tl.where(nrm >= EPS, s_pair * tl.sum(u * gu, axis=1) + c * cos, 0.0)
            v = (s_pair * gu - proj[:, None] * u) * ra[:, None]               # dL/dp_n
            alpha = c * r * ra
            dp = tl.dot(tl.trans(z), v, dp, input_precision=Z_PREC)
            f = tl.load(f_ptr + b64 * s_fb + offs_d[:, None] * s_fd + offs_n[None, :] * s_fn,
                        mask=mask_d[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(f, z * alpha[:, None], acc, input_precision=F_PREC)
            if pid_d == 0:
                wtf = tl.load(g_ptr + b64 * N * C + offs_n[:, None] * C + offs_c[None, :], mask=mask_nc, other=0.0)
                dz = alpha[:, None] * wtf + tl.dot(v, tl.trans(pt), input_precision=Z_PREC)
                tl.store(dz_ptr + b64 * C * N + offs_c[None, :] * N + offs_n[:, None],
                         dz.to(dz_ptr.dtype.element_ty), mask=mask_nc)
    q = tl.load(q_ptr + offs_d[:, None] * s_qd + offs_c[None, :] * s_qk, mask=mask_d[:, None] & mask_p[None, :],
                other=0.0)
    acc = tl.dot(q, tl.trans(dp), acc, input_precision=Z_PREC)
    tl.store(part_ptr + (grp * D + offs_d[:, None]) * C + offs_c[None, :], acc, mask=mask_d[:, None] & mask_c[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the forward kernel per precision family. Every config
# of both kernels compiles for sm_90 and sm_80 without spills at N = 256 / 1024, D' = 1024, with and without
# the gradient (python -m benchmarks.codegen --full --kernel vf); spilled: 16-bit 4-warp 128-row tiles,
# fp32 BLOCK_K = 32 tiles with 8 warps (sm_80), fp32 backward tiles of 64 x 64 and 2 stages.
_CONFIGS = {
    "16bit": ((128, 64, 64, 8, 4), (128, 64, 32, 8, 4), (64, 64, 64, 4, 4), (64, 64, 32, 4, 4)),
    "fp32": ((128, 64, 16, 8, 3), (128, 64, 16, 8, 2), (64, 64, 16, 8, 3), (128, 32, 16, 8, 3), (64, 32, 32, 4, 2)),
}
# (BLOCK_D, BLOCK_T, num_warps, num_stages) of the backward kernel
_BWD_CONFIGS = {
    "16bit": ((64, 64, 4, 3), (64, 32, 4, 3), (32, 64, 4, 3)),
    "fp32": ((64, 32, 8, 3), (32, 32, 8, 3), (64, 16, 4, 3), (32, 16, 4, 3)),
}
_BWD_GROUPS = 8  # batch groups of the backward grid: (cdiv(D', BLOCK_D), <= 8) programs, 8 partials of dW
_TUNED: dict[tuple[str, str], triton.runtime.Autotuner] = {}


def _family(fp32_features: bool) -> str:
    return "fp32" if fp32_features else "16bit"


def _gpu_configs(fp32_features: bool = False, backward: bool = False) -> list:
    """The autotune configs of the forward (default) or backward kernel, bf16 / fp16 features (default) or fp32."""
    fam = _family(fp32_features)
    if backward:
        return [triton.Config({"BLOCK_D": bd, "BLOCK_T": bt}, num_warps=w, num_stages=s)
                for bd, bt, w, s in _BWD_CONFIGS[fam]]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in _CONFIGS[fam]]


def _tuned_kernel(fp32_features: bool = False, backward: bool = False):
    """The autotuned kernel of a precision family, built on its first CUDA call (no work at import time)."""
    key = (_family(fp32_features), "bwd" if backward else "fwd")
    if key not in _TUNED:
        configs = _gpu_configs(fp32_features, backward)
        if backward:
            _TUNED[key] = triton.autotune(configs, key=["N", "D", "BLOCK_C", "BPG"])(_vf_bwd_kernel)
        else:
            _TUNED[key] = triton.autotune(configs, key=["N", "D", "BLOCK_C", "WITH_GRAD"],
                                          reset_to_zero=["part_ptr"])(_vf_fwd_kernel)
    return _TUNED[key]


def _precisions(f: torch.Tensor) -> tuple[str, str]:
    """(z-side, feature-side) dot precisions: fp32 features tf32x3 feature dots and IEEE z dots; bf16 / fp16
    features tensor-core feature dots and tf32 z dots (module docstring)."""
    return ("ieee", "tf32x3") if f.dtype == torch.float32 else ("tf32", "tf32")


def _block_c(c: int) -> int:
    return max(16, triton.next_power_of_2(c))


@on_tensor_device
def _vf_fwd_launch(z: torch.Tensor, f: torch.Tensor, w: torch.Tensor, p: torch.Tensor, margin_cos: float,
                   margin_dms: float, with_grad: bool):
    bsz, c, n = z.shape
    check_grid_axis("vf_loss: batch size B", bsz)
    d, kp = f.shape[1], p.shape[0]
    fp32 = f.dtype == torch.float32
    z_prec, f_prec = _precisions(f)
    dev = z.device
    g = torch.empty((bsz, n, c) if with_grad else (0,), device=dev, dtype=torch.float32)
    gu = torch.empty((bsz, n, kp) if with_grad else (0,), device=dev, dtype=torch.float32)
    tok = torch.empty((2, bsz, n) if with_grad else (0,), device=dev, dtype=torch.float32)  # 1/||f_n||, cos_n
    # two rows of partials (cos, pair); their length depends on BLOCK_M: sized for the smallest tile
    min_bm = 16 if interpret_mode() else min(cfg[0] for cfg in _CONFIGS[_family(fp32)])
    part = torch.zeros((2, bsz * triton.cdiv(n, min_bm)), device=dev, dtype=torch.float32)
    args = (z, f, w, p, part, g, gu, tok, c, kp, float(margin_cos), float(margin_dms), part.stride(0), bsz * n,
            *z.stride(), *f.stride(), *w.stride(), *p.stride())
    meta = dict(N=n, D=d, BLOCK_C=_block_c(c), EPS=EPS, Z_PREC=z_prec, F_PREC=f_prec, WITH_GRAD=with_grad)
    if not interpret_mode():  # compiled kernels (CUDA tensors: triton_path admitted them)
        def grid(cfg):
            return (triton.cdiv(n, cfg["BLOCK_M"]), bsz)

        _tuned_kernel(fp32)[grid](*args, **meta, DOT_F32=False)
    else:
        _vf_fwd_kernel[(triton.cdiv(n, 16), bsz)](*args, **meta, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, DOT_F32=True)
    return part.sum(1), g, gu, tok


def _bwd_grid_groups(bsz: int) -> tuple[int, int]:
    """(batch items per group, groups) of the backward grid."""
    per = triton.cdiv(bsz, _BWD_GROUPS)
    return per, triton.cdiv(bsz, per)


@on_tensor_device
def _vf_bwd_launch(z, f, q, p, g, gu, tok, gsums, margin_cos: float):
    bsz, c, n = z.shape
    d, kp = f.shape[1], p.shape[0]
    fp32 = f.dtype == torch.float32
    z_prec, f_prec = _precisions(f)
    per, groups = _bwd_grid_groups(bsz)
    dz = torch.empty((bsz, c, n), device=z.device, dtype=z.dtype)
    part = torch.empty((groups, d, c), device=z.device, dtype=torch.float32)
    args = (z, f, q, p, g, gu, tok, gsums.float().contiguous(), dz, part, bsz, c, kp, float(margin_cos), bsz * n,
            *z.stride(), *f.stride(), *q.stride(), *p.stride())
    meta = dict(N=n, D=d, BPG=per, BLOCK_C=_block_c(c), EPS=EPS, Z_PREC=z_prec, F_PREC=f_prec)
    if not interpret_mode():
        def grid(cfg):
            return (triton.cdiv(d, cfg["BLOCK_D"]), groups)

        _tuned_kernel(fp32, backward=True)[grid](*args, **meta)
    else:
        _vf_bwd_kernel[(triton.cdiv(d, 16), groups)](*args, **meta, BLOCK_D=16, BLOCK_T=16)
    return dz, part.sum(0)


# --------------------------------------------------------------------------------------------
# torch.library ops: the forward (sums of both terms + what the backward needs) and the backward
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("vefast::vf_loss_fwd", mutates_args=())
def _vf_fwd_op(z: torch.Tensor, f: torch.Tensor, w: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
               margin_cos: float, margin_dms: float,
               with_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _vf_fwd_launch(z, f, w, p, margin_cos, margin_dms, with_grad)


@_vf_fwd_op.register_fake
def _(z, f, w, q, p, margin_cos, margin_dms, with_grad):
    bsz, c, n = z.shape
    f32 = dict(dtype=torch.float32)
    if not with_grad:
        return z.new_empty((2,), **f32), z.new_empty((0,), **f32), z.new_empty((0,), **f32), z.new_empty((0,), **f32)
    return (z.new_empty((2,), **f32), z.new_empty((bsz, n, c), **f32), z.new_empty((bsz, n, p.shape[0]), **f32),
            z.new_empty((2, bsz, n), **f32))


@torch.library.custom_op("vefast::vf_loss_bwd", mutates_args=())
def _vf_bwd_op(z: torch.Tensor, f: torch.Tensor, q: torch.Tensor, p: torch.Tensor, g: torch.Tensor,
               gu: torch.Tensor, tok: torch.Tensor, gsums: torch.Tensor,
               margin_cos: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _vf_bwd_launch(z, f, q, p, g, gu, tok, gsums, margin_cos)


@_vf_bwd_op.register_fake
def _(z, f, q, p, g, gu, tok, gsums, margin_cos):
    return z.new_empty(z.shape), z.new_empty((f.shape[1], z.shape[1]), dtype=torch.float32)


def _vf_fwd_setup(ctx, inputs, output):
    z, f, w, q, p, margin_cos, _, with_grad = inputs
    ctx.with_grad, ctx.margin_cos, ctx.w_dtype = with_grad, margin_cos, w.dtype
    ctx.mark_non_differentiable(*output[1:])   # saved for backward only: no zero gradients materialized
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(z, f, q, p, *output[1:])


def _vf_fwd_backward(ctx, g_sums, _g, _gu, _tok):
    if not ctx.with_grad:
        raise RuntimeError("vefast::vf_loss_fwd was run with with_grad=False; its gradient is unavailable")
    z, f, q, p, g, gu, tok = ctx.saved_tensors
    if g_sums is None:
        g_sums = z.new_zeros((2,), dtype=torch.float32)
    dz, dw = _vf_bwd_op(z, f, q, p, g, gu, tok, g_sums, ctx.margin_cos)
    return dz, None, dw.to(ctx.w_dtype), None, None, None, None, None


_vf_fwd_op.register_autograd(_vf_fwd_backward, setup_context=_vf_fwd_setup)


def _vf_loss_fused(z: torch.Tensor, features: torch.Tensor, w: torch.Tensor, margin_cos: float,
                   margin_dms: float, weight_cos: float, weight_dms: float) -> VFOutput:
    bsz, c = z.shape[:2]
    z3 = z.reshape(bsz, c, -1)                                            # (B, C, N)
    f = features.reshape(bsz, features.shape[1], -1)                      # (B, D', N)
    # W z_n lies in the column space of W: with W = Q R (reduced QR, held constant) P = Q^T W = R (k x C) gives
    # ||P z|| = ||W z|| and (P z_i).(P z_j) = (W z_i).(W z_j); dL/dW = Q dL/dP exactly (Q Q^T W = W)
    q, p = torch.linalg.qr(w.detach().float())
    with_grad = torch.is_grad_enabled() and (z.requires_grad or w.requires_grad)
    sums = _vf_fwd_op(z3, f.detach(), w, q, p, float(margin_cos), float(margin_dms), with_grad)[0]
    n = z3.shape[2]
    cos_loss = sums[0] / float(bsz * n)
    dms_loss = sums[1] / float(bsz * n * n)
    return VFOutput(weight_cos * cos_loss + weight_dms * dms_loss, cos_loss, dms_loss)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def _check_feature_layout(features: torch.Tensor, z: torch.Tensor) -> None:
    """features must be channels-first (B, D', h, w); name a channels-last or token layout seen instead."""
    grid, shape = tuple(z.shape[2:]), tuple(features.shape)
    expected = f"features must be (B, D', h, w) = (B, D', {grid[0]}, {grid[1]}) (channels first)"
    if features.dim() == 4 and shape[2:] != grid and shape[1:3] == grid:
        raise ValueError(f"{expected}, got shape {shape}, which looks channels-last (B, h, w, D'): "
                         "pass features.permute(0, 3, 1, 2)")
    if features.dim() == 3 and shape[1] == grid[0] * grid[1]:
        raise ValueError(f"{expected}, got shape {shape}, which looks like tokens (B, N, D') with N = h*w: "
                         f"pass features.transpose(1, 2).reshape(B, D', {grid[0]}, {grid[1]})")
    if features.dim() != 4:
        raise ValueError(f"{expected}, got shape {shape}")


def _check_vf_args(z, features, proj_weight, margins_and_weights) -> torch.Tensor:
    check_tensor("z", z)
    check_tensor("features", features)
    check_tensor("proj_weight", proj_weight)
    check_same_device(z=z, features=features, proj_weight=proj_weight)
    if z.dim() != 4:
        raise ValueError(f"z must be (B, C, h, w), got shape {tuple(z.shape)}")
    _check_feature_layout(features, z)
    if features.shape[0] != z.shape[0]:
        raise ValueError(f"features must have the batch size of z ({z.shape[0]}), got {features.shape[0]}")
    if features.shape[2:] != z.shape[2:]:
        raise ValueError(f"feature grid {tuple(features.shape[2:])} must equal the latent grid "
                         f"{tuple(z.shape[2:])} (resize the DINOv2 input so its patch grid matches, "
                         f"e.g. vefast.dinov2_features(..., grid={tuple(z.shape[2:])}))")
    d, c = features.shape[1], z.shape[1]
    if tuple(proj_weight.shape) not in ((d, c), (d, c, 1, 1)):
        raise ValueError(f"proj_weight must be (D', C) = {(d, c)} or (D', C, 1, 1) = {(d, c, 1, 1)}, "
                         f"got {tuple(proj_weight.shape)}")
    if z.numel() == 0 or features.numel() == 0:
        raise ValueError(f"z and features must be non-empty, got shapes {tuple(z.shape)} and {tuple(features.shape)}")
    for name, value in margins_and_weights.items():
        check_finite_number(name, value)
    return proj_weight.reshape(d, c)


def vf_loss(z: torch.Tensor, features: torch.Tensor, proj_weight: torch.Tensor, *, margin_cos: float = 0.5,
            margin_dms: float = 0.25, weight_cos: float = 1.0, weight_dms: float = 1.0) -> VFOutput:
    """VA-VAE's VF loss (docs/math.md §3a): ``w_cos * L_mcos + w_dms * L_mdms`` -> :class:`VFOutput`.

    ``z`` (B, C, h, w) latents; ``features`` (B, D', h, w) frozen DINOv2 patch features at the latent
    grid (no gradient flows into them); ``proj_weight`` (D', C) or (D', C, 1, 1), the bias-free 1x1
    projection z' = W z. Differentiable w.r.t. ``z`` and ``proj_weight``. The (B, N, N) similarity
    matrices are never materialized on the fused (CUDA / interpreter) path.
    """
    knobs = {"margin_cos": margin_cos, "margin_dms": margin_dms, "weight_cos": weight_cos, "weight_dms": weight_dms}
    w = _check_vf_args(z, features, proj_weight, knobs)
    features = features.detach()
    if not triton_path("vf_loss", z, features, proj_weight):
        return vf_loss_reference(z, features, proj_weight, **knobs)
    return _vf_loss_fused(z, features, w, margin_cos, margin_dms, weight_cos, weight_dms)
