"""VA-VAE's vision-foundation ("VF") alignment loss, fused (MATH.md §3a; hustvl/LightningDiT, vavae).

With z (B, C, h, w) the sampled latent, W (D', C) the bias-free 1x1 projection (VA-VAE's
``linear_proj`` with ``reverse_proj=True``), z' = W z per token, f (B, D', h, w) the frozen DINOv2
patch features at the latent grid, N = h*w tokens and cos taken over the channel dim per token:

    L_mcos = mean_{b,n}   relu(1 - m1 - cos(z'_bn, f_bn))
    L_mdms = mean_{b,i,j} relu(|cos(z'_bi, z'_bj) - cos(f_bi, f_bj)| - m2)
    L_vf   = w_cos * L_mcos + w_dms * L_mdms            (defaults m1 = 0.5, m2 = 0.25, w = 1, 1)

How the fused path computes it (choices the papers leave open are marked *):
- The z side never leaves the C-dim latent space. z'_n = W z_n lies in the column space of W; with
  Q (D' x k, k = min(D', C)) an orthonormal basis of it (reduced QR of W, held constant) and
  P = Q^T W (k x C), ||z'_n|| = ||P z_n|| and cos(z'_i, z'_j) = u_i . u_j with the unit vectors
  u_n = P z_n / ||P z_n|| ((B, N, k) fp32). The gradient w.r.t. W through P is exact (Q Q^T W = W).
  Unlike the quadratic form z^T (W^T W) z, this has no cancellation when W z_n is small.
  cos(z'_n, f_n) = (z_n . W^T f_n) / (||z'_n|| ||f_n||), where W^T f is one (C x D') @ (D' x N)
  product per batch item. z' (B, D', N) is never formed.
- The f side: 1 / ||f_n|| is computed once per call (fp32); the kernel takes the raw features in
  their own dtype (bf16 / fp16 / fp32) and scales each D'-contraction tile of f_I^T f_J by
  r_I r_J in fp32, so normalized features are never written either.
- One Triton kernel per call runs flash-attention style over (i-tile, j-tile) pairs of tokens:
  program (i-tile, b) loops over every j-tile, builds the (BM, BN) tiles of both similarity
  matrices in registers (fp32 accumulation; the D' contraction in the features' dtype on tensor
  cores), adds relu(|S^z - S^f| - m2) into its row sums and writes one fp32 partial per program
  (deterministic: ``torch.sum`` over the partials, no atomics). No (B, N, N) tensor reaches HBM.
  N and D' are compile-time constants, so both loops are ``range`` loops that the compiler
  software-pipelines (and that the interpreter accepts: it rejects ``range`` over runtime bounds).
*- Backward without recomputation: the pair term is a sum of pointwise functions of the two
  similarities, so dL/dS^z_ij = sign(S^z - S^f) [|S^z - S^f| > m2] is known in the forward tile.
  The kernel computes S^z_ij = a_i . b_j (here a = b = u). When a gradient is needed the same
  kernel also accumulates dL/da_I = sum_j g_ij b_j and dL/db_I = sum_j g_ij a_j into (B, N, k) fp32
  buffers; backward only scales them by the incoming gradient (autograd adds both into du). The D'
  contraction therefore runs once per step instead of twice (recomputing the tiles in a separate
  backward would cost a second full pass over f).
  The C-space glue (Q, P z, W^T f) is ordinary differentiable torch code, O(B N C D').
- Under TRITON_INTERPRET the feature tiles are cast to fp32 before ``tl.dot`` (the interpreter's
  bf16 dot is wrong in triton 3.6); products of bf16 / fp16 values are exact in fp32, so this is
  the GPU's arithmetic up to the accumulation order.
*- Norms are clamped at eps = 1e-8 before dividing (``F.cosine_similarity``'s clamp, used by
  VA-VAE for the cos term; its dms term uses ``F.normalize``'s 1e-12: only zero vectors differ).
- The losses are returned in fp32 (float64 when an input is float64). float64 inputs run the
  eager reference (the kernel accumulates in fp32), reported once.
- The adaptive VF weight of VA-VAE (``||grad L_nll|| / ||grad L_vf||``) belongs to the training
  recipe, not to this op (MATH §3a).
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
# eager reference (MATH §3a written out; float64 in tests; also the CPU path)
# --------------------------------------------------------------------------------------------
def vf_loss_reference(z: torch.Tensor, features: torch.Tensor, proj_weight: torch.Tensor, *,
                      margin_cos: float = 0.5, margin_dms: float = 0.25, weight_cos: float = 1.0,
                      weight_dms: float = 1.0, upcast: bool = True) -> VFOutput:
    """MATH §3a with both (B, N, N) similarity matrices materialized.

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
# Triton kernel: the pairwise (dms) term, with its gradient w.r.t. (a, b) when asked
# --------------------------------------------------------------------------------------------
@triton.jit
def _vf_pair_kernel(a_ptr, b_ptr, f_ptr, rf_ptr, part_ptr, ga_ptr, gb_ptr,
                    C, margin, s_ab, s_an, s_fb, s_fd, s_fn,
                    N: tl.constexpr, D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_C: tl.constexpr, Z_PREC: tl.constexpr, F_PREC: tl.constexpr,
                    WITH_GRAD: tl.constexpr, DOT_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    n_tiles_m = tl.num_programs(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < N
    mask_c = offs_c < C
    # a, b, grad buffers are contiguous (B, N, C) fp32
    ab_row = a_ptr + bid * s_ab
    a_i = tl.load(ab_row + offs_m[:, None] * s_an + offs_c[None, :],
                  mask=mask_m[:, None] & mask_c[None, :], other=0.0)
    r_i = tl.load(rf_ptr + bid * N + offs_m, mask=mask_m, other=0.0)
    f_base = f_ptr + bid * s_fb
    fi_ptrs = f_base + offs_m[:, None] * s_fn + offs_k[None, :] * s_fd          # (BM, BK)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    ga = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    gb = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask_nc = mask_n[:, None] & mask_c[None, :]
        b_j = tl.load(b_ptr + bid * s_ab + offs_n[:, None] * s_an + offs_c[None, :], mask=mask_nc, other=0.0)
        s_z = tl.dot(a_i, tl.trans(b_j), input_precision=Z_PREC)
        s_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        fj_ptrs = f_base + offs_k[:, None] * s_fd + offs_n[None, :] * s_fn      # (BK, BN)
        for k in range(0, D, BLOCK_K):
            mask_k = (k + offs_k) < D
            f_i = tl.load(fi_ptrs + k * s_fd, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            f_j = tl.load(fj_ptrs + k * s_fd, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if DOT_F32:  # the interpreter's bf16 tl.dot is wrong (triton 3.6); bf16 products are exact in fp32
                f_i = f_i.to(tl.float32)
                f_j = f_j.to(tl.float32)
            s_f = tl.dot(f_i, f_j, s_f, input_precision=F_PREC)
        r_j = tl.load(rf_ptr + bid * N + offs_n, mask=mask_n, other=0.0)
        diff = s_z - s_f * r_i[:, None] * r_j[None, :]
        excess = tl.abs(diff) - margin
        active = (excess > 0) & mask_m[:, None] & mask_n[None, :]
        acc += tl.sum(tl.where(active, excess, 0.0), axis=1)
        if WITH_GRAD:
            g = tl.where(active, tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0)), 0.0)
            a_j = tl.load(ab_row + offs_n[:, None] * s_an + offs_c[None, :], mask=mask_nc, other=0.0)
            ga = tl.dot(g, b_j, ga, input_precision=Z_PREC)
            gb = tl.dot(g, a_j, gb, input_precision=Z_PREC)
    tl.store(part_ptr + bid * n_tiles_m + pid_m, tl.sum(acc, axis=0))
    if WITH_GRAD:
        out_off = bid * s_ab + offs_m[:, None] * s_an + offs_c[None, :]
        out_mask = mask_m[:, None] & mask_c[None, :]
        tl.store(ga_ptr + out_off, ga, mask=out_mask)
        tl.store(gb_ptr + out_off, gb, mask=out_mask)


_TUNED: list = []


def _gpu_configs() -> list:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in ((128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 4),
                                     (128, 64, 32, 4, 4), (64, 128, 64, 4, 3))]


def _tuned_kernel():
    """The autotuned kernel, built on the first CUDA call (no work at import time)."""
    if not _TUNED:
        _TUNED.append(triton.autotune(_gpu_configs(), key=["N", "D", "BLOCK_C", "WITH_GRAD"],
                                       reset_to_zero=["part_ptr"])(_vf_pair_kernel))
    return _TUNED[0]


@on_tensor_device
def _vf_pair_launch(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor, rf: torch.Tensor, margin: float,
                    with_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bsz, n, c = a.shape
    check_grid_axis("vf_loss: batch size B", bsz)
    d = f.shape[1]
    block_c = max(16, triton.next_power_of_2(c))
    # fp32 features: true fp32 dots (as cuBLAS' default); bf16/fp16: tensor-core dots of the features,
    # tf32 for the small C-dim dots of the fp32 latent side
    z_prec = f_prec = "ieee" if f.dtype == torch.float32 else "tf32"
    ga = torch.empty_like(a) if with_grad else a.new_empty(0)
    gb = torch.empty_like(a) if with_grad else a.new_empty(0)
    args = (a, b, f, rf)
    strides = (a.stride(0), a.stride(1), f.stride(0), f.stride(1), f.stride(2))
    if f.is_cuda and not interpret_mode():
        kernel = _tuned_kernel()

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_M"]), bsz)

        # the partials buffer depends on BLOCK_M: size it for the smallest tile
        part = torch.zeros(bsz * triton.cdiv(n, 64), device=a.device, dtype=torch.float32)
        kernel[grid](*args, part, ga, gb, c, float(margin), *strides, N=n, D=d, BLOCK_C=block_c,
                     Z_PREC=z_prec, F_PREC=f_prec, WITH_GRAD=with_grad, DOT_F32=False)
    else:
        bm = bn = bk = 16
        part = torch.zeros(bsz * triton.cdiv(n, bm), device=a.device, dtype=torch.float32)
        _vf_pair_kernel[(triton.cdiv(n, bm), bsz)](
            *args, part, ga, gb, c, float(margin), *strides, N=n, D=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            BLOCK_C=block_c, Z_PREC=z_prec, F_PREC=f_prec, WITH_GRAD=with_grad, DOT_F32=True)
    return part.sum(), ga, gb


# --------------------------------------------------------------------------------------------
# torch.library op: pair-loss sum (and, when asked, its gradient w.r.t. a and b)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("vefast::vf_pair_loss", mutates_args=())
def _vf_pair_op(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor, rf: torch.Tensor, margin: float,
                with_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _vf_pair_launch(a, b, f, rf, margin, with_grad)


@_vf_pair_op.register_fake
def _(a, b, f, rf, margin, with_grad):
    shape = a.shape if with_grad else (0,)
    return a.new_empty(()), a.new_empty(shape), a.new_empty(shape)


def _vf_pair_setup(ctx, inputs, output):
    ctx.with_grad = inputs[5]
    ctx.save_for_backward(output[1], output[2])


def _vf_pair_backward(ctx, g_loss, _g_ga, _g_gb):
    if not ctx.with_grad:
        raise RuntimeError("vefast::vf_pair_loss was run with with_grad=False; its gradient is unavailable")
    ga, gb = ctx.saved_tensors
    return g_loss * ga, g_loss * gb, None, None, None, None


_vf_pair_op.register_autograd(_vf_pair_backward, setup_context=_vf_pair_setup)


def _vf_loss_fused(z: torch.Tensor, features: torch.Tensor, w: torch.Tensor, margin_cos: float,
                   margin_dms: float, weight_cos: float, weight_dms: float) -> VFOutput:
    bsz, c = z.shape[:2]
    zf = z.reshape(bsz, c, -1).float()                                    # (B, C, N)
    wf = w.float()
    # W z_n lies in the column space of W. With an orthonormal basis Q of it (reduced QR, held constant),
    # P = Q^T W (k x C, k = min(D', C)) gives ||P z|| = ||W z|| and (P z_i).(P z_j) = (W z_i).(W z_j), and
    # its gradient w.r.t. W is exactly W's (Q Q^T W = W). Every similarity becomes a dot of unit vectors
    # in k <= C dims: no (B, D', N) projection, and no cancellation as in z^T (W^T W) z.
    q = torch.linalg.qr(wf.detach())[0]                                   # (D', k)
    pz = torch.matmul(q.t() @ wf, zf)                                     # (B, k, N)
    rz = 1.0 / torch.linalg.vector_norm(pz, dim=1).clamp_min(EPS)        # 1 / ||W z_n||
    f = features.reshape(bsz, features.shape[1], -1)                      # (B, D', N), a view
    rf = 1.0 / torch.linalg.vector_norm(f, dim=1, dtype=torch.float32).clamp_min(EPS)
    # cos(z'_n, f_n) = z_n . (W^T f_n) / (||W z_n|| ||f_n||); W^T f in the features' dtype
    wtf = torch.matmul(w.t().to(f.dtype), f).float()                      # (B, C, N)
    cos = (zf * wtf).sum(1) * rz * rf
    cos_loss = torch.relu(1.0 - margin_cos - cos).mean()
    u = (pz * rz[:, None]).transpose(1, 2).contiguous()                   # (B, N, k): unit W z_n
    with_grad = torch.is_grad_enabled() and u.requires_grad
    pair_sum = _vf_pair_op(u, u, f.detach(), rf.detach().contiguous(), float(margin_dms), with_grad)[0]
    n = zf.shape[2]
    dms_loss = pair_sum / float(bsz * n * n)
    return VFOutput(weight_cos * cos_loss + weight_dms * dms_loss, cos_loss, dms_loss)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def _check_vf_args(z, features, proj_weight, margins_and_weights) -> torch.Tensor:
    check_tensor("z", z)
    check_tensor("features", features)
    check_tensor("proj_weight", proj_weight)
    check_same_device(z=z, features=features, proj_weight=proj_weight)
    if z.dim() != 4:
        raise ValueError(f"z must be (B, C, h, w), got shape {tuple(z.shape)}")
    if features.dim() != 4:
        raise ValueError(f"features must be (B, D', h, w), got shape {tuple(features.shape)}")
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
    """VA-VAE's VF loss (MATH §3a): ``w_cos * L_mcos + w_dms * L_mdms`` -> :class:`VFOutput`.

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
