"""Monte Carlo separation function of VR-sampling (seed 004, eq. 3.3; MATH.md §5), in Gram form.

Estimator (MATH §5), M data rows ``X`` (M x d), K shared noise rows ``E`` (K x d), SNR ``r``::

    x_il = x1_i + e_l / r,   w_ilj = softmax_j(-r^2 ||x_il - x1_j||^2 / 2)   (j = i included)
    S_hat(r) = 1 / (M K d) * sum_il || sum_j w_ilj x1_j ||^2

Exact reformulation used here (two GEMMs once, then O(M K M) per r, independent of d):
``G = X X^T``, ``P = E X^T``, ``D_ij = G_ii + G_jj - 2 G_ij`` (squared distances). Dropping every
term that does not depend on j, the logits are ``logit_ilj = -r^2/2 D_ij + r (P_lj - P_li)`` (MATH
writes ``r^2 G_ij - r^2/2 G_jj + r P_lj``; the two differ by the j-independent ``-r^2/2 G_ii - r
P_li``, so the softmax is the same, and this centred form has ``logit_ili = 0`` and no large
cancelling terms in fp32). For the squared norm of the posterior mean we use the identity, exact for
weights summing to one,

    || sum_j w_j x_j ||^2 = sum_j w_j G_jj - 1/2 w^T D w

so that the *complement* ``1 - S_hat`` (the quantity VR-sampling multiplies by h_t^2, which is huge
near t = 1) is accumulated directly and accurately::

    C(r) = sum_il [ sum_j w_ilj (G_ii - G_jj) + 1/2 w_il^T D w_il ]
    S_hat(r) = tr(G) / (M d) - C(r) / (M K d)         (tr(G) / (M d) = 1 for standardized data)

Both per-row terms vanish exactly when ``w_il`` is one-hot on ``j = i``. Rows whose off-diagonal
logits are all below ``-ONEHOT_GAP`` (an upper bound ``-r^2/2 min_{j!=i} D_ij + r (max_j P_lj -
P_li)`` checked per row, O(1)) have every off-diagonal weight below e^-110, which underflows to 0
in fp32: they contribute exactly 0 in fp32 (and < 1e-45 in float64), so they are skipped.

Choices: ``G``, ``P`` and ``D`` are formed in float64 (cheap, immune to TF32 settings); the per-r
work runs in fp32 (Triton kernel, fp32 accumulation, ``tl.dot`` in IEEE fp32) or in the working dtype
of the torch path (float64 for float64 inputs). The kernel contracts with ``D`` per row (O(M^2)); the
torch path needs only sums over rows and takes the cheaper contraction: ``1/2 <D, W^T W>`` (one GEMM
with an M x M output) when d >= M, the posterior means ``W X`` (O(M d) per row) when d < M.
Per-program partial sums are reduced in float64 on the host: deterministic, no atomics. The
Monte Carlo statistic is not differentiable: no autograd.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ._common import check_grid_axis, on_tensor_device

ONEHOT_GAP = 110.0  # e^-110 < 2^-150: off-diagonal weights underflow to exactly 0 in fp32


# ---------------------------------------------------------------------------------------------
# direct estimator (eq. 3.3 as written): the reference, float64-capable
# ---------------------------------------------------------------------------------------------
def separation_reference(x1: torch.Tensor, snr: torch.Tensor, noise: torch.Tensor, *,
                         chunk_rows: int = 4096) -> torch.Tensor:
    """Eq. 3.3 as written: build every ``x_il = x1_i + e_l / r`` in d dimensions, squared distances to
    every ``x1_j``, softmax, posterior mean ``sum_j w_ilj x1_j`` and its squared norm; chunked over the
    (i, l) rows. ``x1``: (M, d) (used as given, no standardization), ``noise``: (K, d), ``snr``: (R,).
    Returns S_hat per r in the dtype of ``x1`` (pass float64 for a reference)."""
    m, d = x1.shape
    k = noise.shape[0]
    sq1 = (x1 * x1).sum(-1)
    out = torch.empty(snr.numel(), dtype=x1.dtype, device=x1.device)
    rows = torch.arange(m * k, device=x1.device)
    for n, r in enumerate(snr.tolist()):
        total = x1.new_zeros(())
        for start in range(0, m * k, chunk_rows):
            idx = rows[start:start + chunk_rows]
            x = x1[idx // k] + noise[idx % k] / r                       # (rows, d)
            dist = (x * x).sum(-1, keepdim=True) - 2.0 * (x @ x1.T) + sq1  # ||x_il - x1_j||^2
            w = torch.softmax(-0.5 * r * r * dist, dim=-1)
            mean = w @ x1                                                # posterior mean
            total = total + (mean * mean).sum()
        out[n] = total / (m * k * d)
    return out


# ---------------------------------------------------------------------------------------------
# Gram statistics (shared by both per-r paths)
# ---------------------------------------------------------------------------------------------
def gram_stats(x1: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float64 ``G = X X^T``, ``P = E X^T``, ``D``, ``diag(G)``, and the skip bounds
    ``min_{j != i} D_ij`` and ``max_j P_lj``; ``x1`` (M, d), ``noise`` (K, d)."""
    x = x1.double()
    g = x @ x.T
    p = noise.double() @ x.T
    gd = torch.diagonal(g).clone()
    dist = (gd[:, None] + gd[None, :] - 2.0 * g).clamp_min_(0.0)
    dist.fill_diagonal_(0.0)
    eye = torch.eye(dist.shape[0], dtype=torch.bool, device=dist.device)
    min_dist = dist.masked_fill(eye, float("inf")).amin(-1)
    return {"G": g, "P": p, "D": dist, "gdiag": gd, "min_dist": min_dist, "pmax": p.amax(-1)}


def _row_bound(st: dict[str, torch.Tensor], r: float) -> torch.Tensor:
    """Upper bound of every off-diagonal logit of row (i, l), shape (M, K)."""
    return -0.5 * r * r * st["min_dist"][:, None] + r * (st["pmax"][None, :] - st["P"].T)


# ---------------------------------------------------------------------------------------------
# torch Gram path (CPU, float64 anywhere)
# ---------------------------------------------------------------------------------------------
def separation_complement_torch(x1: torch.Tensor, st: dict[str, torch.Tensor], snr: torch.Tensor, *,
                                dtype: torch.dtype, block_elems: int = 1 << 20,
                                progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """``C(r)`` (module docstring) for every r, in float64, computing in ``dtype``. ``x1``: the (M, d)
    data the stats came from (used for the posterior-mean contraction when d < M).

    Only sums over (i, l) are needed, so per block of data rows i the (K, M) weights give
    ``c_ij = sum_l w_ilj`` (then ``sum_j c_ij (G_ii - G_jj)``, no cancellation) and the Gram sum
    ``W^T W`` accumulates over all rows: ``sum_il 1/2 w^T D w = 1/2 <D, W^T W>`` (one GEMM with an M x M
    output, O(M K M^2)). When d < M the posterior means ``W X`` (O(M K M d)) give it instead:
    ``sum_il 1/2 w^T D w = sum_j c_j G_jj - ||W X||_F^2``.
    """
    m, d = x1.shape
    k = st["P"].shape[0]
    dist, p, gd = st["D"].to(dtype), st["P"].to(dtype), st["gdiag"].to(dtype)
    pt = p.T.contiguous()
    xw = x1.to(dtype) if d < m else None
    block = max(1, block_elems // (k * m))
    out = torch.zeros(snr.numel(), dtype=torch.float64, device=x1.device)
    for n, r in enumerate(snr.tolist()):
        active = (_row_bound(st, r) >= -ONEHOT_GAP).any(dim=1).nonzero().squeeze(1)
        a_sum = torch.zeros((), dtype=torch.float64, device=x1.device)
        wtw = torch.zeros(m, m, dtype=dtype, device=x1.device) if xw is None else None
        mean_sq = torch.zeros((), dtype=torch.float64, device=x1.device)
        col = torch.zeros(m, dtype=dtype, device=x1.device)
        for start in range(0, active.numel(), block):
            i = active[start:start + block]
            logits = (p * r).unsqueeze(0) - (pt[i] * r).unsqueeze(2)        # r (P_lj - P_li)
            logits += dist[i].unsqueeze(1) * (-0.5 * r * r)                   # - r^2/2 D_ij
            w = torch.softmax(logits, dim=-1)                                 # (bi, K, M)
            c = w.sum(dim=1)                                                  # (bi, M)
            a_sum += ((gd[i, None] - gd[None, :]) * c).sum(dtype=torch.float64)
            w2 = w.reshape(-1, m)
            if xw is None:
                wtw.addmm_(w2.T, w2)
            else:
                col += c.sum(0)
                mean_sq += (w2 @ xw).square().sum(dtype=torch.float64)
        if xw is None:
            b_sum = 0.5 * (dist * wtw).sum(dtype=torch.float64)
        else:
            b_sum = (col * gd).sum(dtype=torch.float64) - mean_sq
        out[n] = a_sum + b_sum
        if progress is not None:
            progress(1)
    return out


# ---------------------------------------------------------------------------------------------
# Triton kernel: one program = (block of noise rows l, data row i, SNR value r)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _logits_tile(p_ptr, dist_ptr, i, offs_l, mask_l, p_li, j0, M, stride_p, stride_d, r, half_r2,
                 BLOCK_J: tl.constexpr):
    """Logits -r^2/2 D_ij + r (P_lj - P_li) of one j tile; -inf on the columns past M."""
    offs_j = j0 + tl.arange(0, BLOCK_J)
    mask_j = offs_j < M
    d_ij = tl.load(dist_ptr + i * stride_d + offs_j, mask=mask_j, other=0.0)
    p_lj = tl.load(p_ptr + offs_l[:, None] * stride_p + offs_j[None, :],
                   mask=mask_l[:, None] & mask_j[None, :], other=0.0)
    logit = -half_r2 * d_ij[None, :] + r * (p_lj - p_li[:, None])
    return tl.where(mask_j[None, :], logit, -float("inf")), offs_j, mask_j


@triton.jit
def _weights_tile(p_ptr, dist_ptr, i, offs_l, mask_l, p_li, j0, M, stride_p, stride_d, r, half_r2,
                  m_row, inv_s, BLOCK_J: tl.constexpr):
    """Softmax weights of one j tile from the row max and 1/sum of pass 1 (0 past M)."""
    logit, offs_j, mask_j = _logits_tile(p_ptr, dist_ptr, i, offs_l, mask_l, p_li, j0, M, stride_p, stride_d,
                                         r, half_r2, BLOCK_J)
    return tl.exp(logit - m_row[:, None]) * inv_s[:, None], offs_j, mask_j


@triton.jit
def _separation_kernel(dist_ptr, p_ptr, gd_ptr, mind_ptr, pmax_ptr, snr_ptr, out_ptr,
                       K, stride_d, stride_p, n_lblocks, M: tl.constexpr, GAP: tl.constexpr,
                       BLOCK_L: tl.constexpr, BLOCK_J: tl.constexpr):
    pid_l = tl.program_id(0)
    i = tl.program_id(1)
    pid_r = tl.program_id(2)
    r = tl.load(snr_ptr + pid_r)
    half_r2 = 0.5 * r * r
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_l = offs_l < K
    p_li = tl.load(p_ptr + offs_l * stride_p + i, mask=mask_l, other=0.0)
    pmax = tl.load(pmax_ptr + offs_l, mask=mask_l, other=0.0)
    bound = -half_r2 * tl.load(mind_ptr + i) + r * (pmax - p_li)
    bound = tl.where(mask_l, bound, -float("inf"))
    if tl.max(bound, axis=0) < -GAP:  # every row is one-hot on j = i: contributes exactly 0
        tl.store(out_ptr + (pid_r * M + i) * n_lblocks + pid_l, 0.0)
    else:
        # pass 1: streaming max and sum of exp over j tiles
        m_row = tl.full((BLOCK_L,), -float("inf"), tl.float32)
        s_row = tl.zeros((BLOCK_L,), tl.float32)
        for j0 in range(0, M, BLOCK_J):
            logit, _, _ = _logits_tile(p_ptr, dist_ptr, i, offs_l, mask_l, p_li, j0, M, stride_p, stride_d,
                                       r, half_r2, BLOCK_J)
            m_new = tl.maximum(m_row, tl.max(logit, axis=1))
            s_row = s_row * tl.exp(m_row - m_new) + tl.sum(tl.exp(logit - m_new[:, None]), axis=1)
            m_row = m_new
        inv_s = 1.0 / s_row
        gd_i = tl.load(gd_ptr + i)
        acc_a = tl.zeros((BLOCK_L,), tl.float32)
        acc_b = tl.zeros((BLOCK_L,), tl.float32)
        # pass 2: sum_j w_j (G_ii - G_jj) and w^T D w by tiles, D symmetric -> J <= K tiles only
        for k0 in range(0, M, BLOCK_J):
            w_k, offs_k, mask_k = _weights_tile(p_ptr, dist_ptr, i, offs_l, mask_l, p_li, k0, M, stride_p,
                                                stride_d, r, half_r2, m_row, inv_s, BLOCK_J)
            gd_k = tl.load(gd_ptr + offs_k, mask=mask_k, other=0.0)
            acc_a += tl.sum(w_k * (gd_i - gd_k)[None, :], axis=1)
            d_kk = tl.load(dist_ptr + offs_k[:, None] * stride_d + offs_k[None, :],
                           mask=mask_k[:, None] & mask_k[None, :], other=0.0)
            q = tl.dot(w_k, d_kk, input_precision="ieee")
            for j0 in range(0, k0, BLOCK_J):  # off-diagonal tiles J < K, counted twice
                w_j, offs_j, mask_j = _weights_tile(p_ptr, dist_ptr, i, offs_l, mask_l, p_li, j0, M, stride_p,
                                                    stride_d, r, half_r2, m_row, inv_s, BLOCK_J)
                d_jk = tl.load(dist_ptr + offs_j[:, None] * stride_d + offs_k[None, :],
                               mask=mask_j[:, None] & mask_k[None, :], other=0.0)
                q += 2.0 * tl.dot(w_j, d_jk, input_precision="ieee")
            acc_b += tl.sum(q * w_k, axis=1)
        total = tl.sum(tl.where(mask_l, acc_a + 0.5 * acc_b, 0.0), axis=0)
        tl.store(out_ptr + (pid_r * M + i) * n_lblocks + pid_l, total)


def _block_sizes(m: int, k: int) -> tuple[int, int]:
    block_j = max(16, min(64, triton.next_power_of_2(m)))
    block_l = max(16, min(64, triton.next_power_of_2(k)))
    return block_l, block_j


@on_tensor_device
def _launch_separation(dist: torch.Tensor, p: torch.Tensor, gd: torch.Tensor, min_dist: torch.Tensor,
                       pmax: torch.Tensor, snr: torch.Tensor, *, block_l: int | None = None,
                       block_j: int | None = None) -> torch.Tensor:
    m, k, nr = dist.shape[0], p.shape[0], snr.numel()
    check_grid_axis("separation_function: data rows M", m)
    auto_l, auto_j = _block_sizes(m, k)
    block_l, block_j = block_l or auto_l, block_j or auto_j
    n_lb = triton.cdiv(k, block_l)
    out = torch.empty(nr, dtype=torch.float64, device=dist.device)
    # M is a compile-time constant: the loops over j tiles then have Python-int bounds, which the
    # interpreter needs (numpy 2.4 refuses int() of its 1-element scalar arrays); one compile per M.
    # bound the partials buffer (nr_chunk * M * n_lb fp32) to 64 MiB and the grid's axis 2
    r_chunk = max(1, min(65535, (1 << 24) // max(1, m * n_lb)))
    for r0 in range(0, nr, r_chunk):
        sn = snr[r0:r0 + r_chunk]
        part = torch.empty(sn.numel(), m, n_lb, dtype=torch.float32, device=dist.device)
        _separation_kernel[(n_lb, m, sn.numel())](
            dist, p, gd, min_dist, pmax, sn, part, k, dist.stride(0), p.stride(0), n_lb,
            M=m, GAP=ONEHOT_GAP, BLOCK_L=block_l, BLOCK_J=block_j, num_warps=4)
        out[r0:r0 + sn.numel()] = part.double().sum(dim=(1, 2))
    return out


@torch.library.custom_op("vefast::separation_complement", mutates_args=())
def _separation_complement_op(dist: torch.Tensor, p: torch.Tensor, gdiag: torch.Tensor, min_dist: torch.Tensor,
                              pmax: torch.Tensor, snr: torch.Tensor) -> torch.Tensor:
    """Fused per-SNR work: ``C(r)`` (module docstring) for every r, float64 (R,). fp32 inputs."""
    return _launch_separation(dist.contiguous(), p.contiguous(), gdiag.contiguous(), min_dist.contiguous(),
                              pmax.contiguous(), snr.contiguous())


@_separation_complement_op.register_fake
def _(dist, p, gdiag, min_dist, pmax, snr):
    return snr.new_empty(snr.shape, dtype=torch.float64)


def separation_complement_triton(st: dict[str, torch.Tensor], snr: torch.Tensor) -> torch.Tensor:
    """``C(r)`` for every r with the fused Triton kernel (fp32 work, float64 result)."""
    f = torch.float32
    return _separation_complement_op(st["D"].to(f), st["P"].to(f), st["gdiag"].to(f), st["min_dist"].to(f),
                                     st["pmax"].to(f), snr.to(f))
