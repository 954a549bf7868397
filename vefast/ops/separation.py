"""Monte Carlo separation function of VR-sampling ([VR], eq. 3.3; docs/math.md §5), in Gram form.

Estimator (docs/math.md §5), M data rows ``X`` (M x d), K shared noise rows ``E`` (K x d), SNR ``r``::

    x_il = x1_i + e_l / r,   w_ilj = softmax_j(-r^2 ||x_il - x1_j||^2 / 2)   (j = i included)
    S_hat(r) = 1 / (M K d) * sum_il || sum_j w_ilj x1_j ||^2

Exact reformulation used here (two GEMMs once, then O(M K M) per r, independent of d):
``G = X X^T``, ``P = E X^T``, ``D_ij = G_ii + G_jj - 2 G_ij`` (squared distances). Dropping every
term that does not depend on j, the logits are ``logit_ilj = -r^2/2 D_ij + r (P_lj - P_li)`` (docs/math.md
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
work runs in fp32 (Triton kernel, fp32 accumulation, ``tl.dot`` in IEEE fp32: plain TF32 would spoil
the complement) or in the working dtype of the torch path (float64 for float64 inputs). The kernel
contracts with ``D`` per row (O(M^2), every weight tile recomputed rather than stored, tiling below); the
torch path needs only sums over rows and takes the cheaper contraction: ``1/2 <D, W^T W>`` (one GEMM
with an M x M output) when d >= M, the posterior means ``W X`` (O(M d) per row) when d < M.
Per-program partial sums are reduced in float64 after the launch: deterministic, no atomics. The
Monte Carlo statistic is not differentiable: no autograd.

Leave-one-out (``leave_one_out=True``, docs/vr_sampling.md): the softmax runs over ``j != i`` (the row
``x_il`` was made from is left out of its own posterior). The same identity holds (the weights still sum
to one), so ``C(r)`` has the same form with ``w_ili = 0``; no row is one-hot on ``j = i`` any more, so
no row is skipped (every r costs the dense price).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import GRID_YZ_MAX, on_tensor_device

ONEHOT_GAP = 110.0  # e^-110 < 2^-150: off-diagonal weights underflow to exactly 0 in fp32


# ---------------------------------------------------------------------------------------------
# direct estimator (eq. 3.3 as written): the reference, float64-capable
# ---------------------------------------------------------------------------------------------
def separation_reference(x1: torch.Tensor, snr: torch.Tensor, noise: torch.Tensor, *,
                         chunk_rows: int = 4096, leave_one_out: bool = False) -> torch.Tensor:
    """Eq. 3.3 as written: build every ``x_il = x1_i + e_l / r`` in d dimensions, squared distances to
    every ``x1_j``, softmax, posterior mean ``sum_j w_ilj x1_j`` and its squared norm; chunked over the
    (i, l) rows. ``x1``: (M, d) (used as given, no standardization), ``noise``: (K, d), ``snr``: (R,).
    ``leave_one_out``: the softmax over ``j != i``. Returns S_hat per r in the dtype of ``x1`` (pass
    float64 for a reference)."""
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
            if leave_one_out:
                dist[torch.arange(idx.numel(), device=x1.device), idx // k] = float("inf")
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
def _half_wdw_by_means(w: torch.Tensor, rows: torch.Tensor, x: torch.Tensor, dist: torch.Tensor,
                       gd: torch.Tensor) -> torch.Tensor:
    """``sum over rows of 1/2 w^T D w`` (float64) from the posterior means ``mu = w X``: the weights sum to
    one, so ``1/2 w^T D w = sum_j w_j ||x_j - c||^2 - ||mu - c||^2`` for any centre c, and its two terms
    cancel least when c is near mu. c = x_i (the row's own data point, ``rows``) where the row is mostly
    one-hot on j = i (self weight >= 1/2: both terms vanish together as it collapses), else c = 0 (dense
    rows of standardized data: mu ~ 0). Uncentred near collapse, two O(d) terms left ~d eps of fp32 noise
    per row; centred at x_i in the dense regime, half of an O(d) sum cancels."""
    mu = w @ x
    own = (w * dist[rows]).sum(1) - (mu - x[rows]).square().sum(1)
    origin = (w * gd).sum(1) - mu.square().sum(1)
    self_weight = w.gather(1, rows[:, None]).squeeze(1)
    return torch.where(self_weight >= 0.5, own, origin).sum(dtype=torch.float64)


def separation_complement_torch(x1: torch.Tensor, st: dict[str, torch.Tensor], snr: torch.Tensor, *,
                                dtype: torch.dtype, block_elems: int = 1 << 20,
                                progress: Callable[[int], None] | None = None,
                                leave_one_out: bool = False) -> torch.Tensor:
    """``C(r)`` (module docstring) for every r, in float64, computing in ``dtype``. ``x1``: the (M, d)
    data the stats came from (used for the posterior-mean contraction when d < M). ``leave_one_out``:
    softmax over ``j != i``, no row skipped.

    Only sums over (i, l) are needed, so per block of data rows i the (K, M) weights give
    ``c_ij = sum_l w_ilj`` (then ``sum_j c_ij (G_ii - G_jj)``, no cancellation) and the Gram sum
    ``W^T W`` accumulates over all rows: ``sum_il 1/2 w^T D w = 1/2 <D, W^T W>`` (one GEMM with an M x M
    output, O(M K M^2)). When d < M the posterior means ``W X`` (O(M K M d)) give it instead
    (:func:`_half_wdw_by_means`). Besides the per-data-row bound, every (i, l)
    row whose off-diagonal logits all lie below ``-ONEHOT_GAP`` (checked on its logits, O(M)) is one-hot
    on j = i and left out of that O(M^2) contraction: in fp32 its contribution is exactly 0 (most rows
    of the transition region, where the data-row bound is loose).
    """
    m, d = x1.shape
    k = st["P"].shape[0]
    dist, p, gd = st["D"].to(dtype), st["P"].to(dtype), st["gdiag"].to(dtype)
    pt = p.T.contiguous()
    xw = x1.to(dtype) if d < m else None
    block = max(1, block_elems // (k * m))
    out = torch.zeros(snr.numel(), dtype=torch.float64, device=x1.device)
    for n, r in enumerate(snr.tolist()):
        if leave_one_out:
            active = torch.arange(m, device=x1.device)
        else:
            active = (_row_bound(st, r) >= -ONEHOT_GAP).any(dim=1).nonzero().squeeze(1)
        a_sum = torch.zeros((), dtype=torch.float64, device=x1.device)
        wtw = torch.zeros(m, m, dtype=dtype, device=x1.device) if xw is None else None
        b_sum = torch.zeros((), dtype=torch.float64, device=x1.device)
        for start in range(0, active.numel(), block):
            i = active[start:start + block]
            logits = (p * r).unsqueeze(0) - (pt[i] * r).unsqueeze(2)        # r (P_lj - P_li)
            logits += dist[i].unsqueeze(1) * (-0.5 * r * r)                   # - r^2/2 D_ij
            if leave_one_out:
                logits[torch.arange(i.numel(), device=x1.device), :, i] = float("-inf")
                dense = None
            else:  # rows (i, l) whose off-diagonal logits are all < -GAP: one-hot on j = i
                diag = logits[torch.arange(i.numel(), device=x1.device), :, i].clone()
                logits[torch.arange(i.numel(), device=x1.device), :, i] = float("-inf")
                dense = (logits.amax(dim=-1) >= -ONEHOT_GAP).reshape(-1)
                logits[torch.arange(i.numel(), device=x1.device), :, i] = diag
            w = torch.softmax(logits, dim=-1)                                 # (bi, K, M)
            c = w.sum(dim=1)                                                  # (bi, M)
            a_sum += ((gd[i, None] - gd[None, :]) * c).sum(dtype=torch.float64)
            w2 = w.reshape(-1, m)
            rows = i.repeat_interleave(k)  # the data row of each (i, l) row of w2
            if dense is not None and not bool(dense.all()):
                w2, rows = w2[dense], rows[dense]  # the other rows' w^T D w terms are exactly 0
            if xw is None:
                wtw.addmm_(w2.T, w2)
            else:
                b_sum += _half_wdw_by_means(w2, rows, xw, dist, gd)
        if xw is None:
            b_sum = 0.5 * (dist * wtw).sum(dtype=torch.float64)
        out[n] = a_sum + b_sum
        if progress is not None:
            progress(1)
    return out


# ---------------------------------------------------------------------------------------------
# Triton kernel: one program = (block of noise rows l, data row i, SNR value r)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _logits_tile(p_ptr, dist_ptr, i, offs_l, mask_l, p_li, j0, M, stride_p, stride_d, r, half_r2,
                 BLOCK_J: tl.constexpr, LOO: tl.constexpr):
    """Logits -r^2/2 D_ij + r (P_lj - P_li) of one j tile; -inf on the columns past M (and on j = i
    with ``LOO``)."""
    offs_j = j0 + tl.arange(0, BLOCK_J)
    mask_j = offs_j < M
    d_ij = tl.load(dist_ptr + i * stride_d + offs_j, mask=mask_j, other=0.0)
    p_lj = tl.load(p_ptr + offs_l[:, None] * stride_p + offs_j[None, :],
                   mask=mask_l[:, None] & mask_j[None, :], other=0.0)
    logit = -half_r2 * d_ij[None, :] + r * (p_lj - p_li[:, None])
    keep = mask_j
    if LOO:  # leave-one-out: the softmax runs over j != i
        keep = keep & (offs_j != i)
    return tl.where(keep[None, :], logit, -float("inf")), offs_j, mask_j


@triton.jit
def _weights_tile(p_ptr, dist_ptr, i, offs_l, mask_l, p_li, j0, M, stride_p, stride_d, r, half_r2,
                  m_row, inv_s, BLOCK_J: tl.constexpr, LOO: tl.constexpr):
    """Softmax weights of one j tile from the row max and 1/sum of pass 1 (0 past M)."""
    logit, offs_j, mask_j = _logits_tile(p_ptr, dist_ptr, i, offs_l, mask_l, p_li, j0, M, stride_p, stride_d,
                                         r, half_r2, BLOCK_J, LOO)
    return tl.exp(logit - m_row[:, None]) * inv_s[:, None], offs_j, mask_j


@triton.jit
def _unit_complement(dist_ptr, p_ptr, gd_ptr, mind_ptr, pmax_ptr, i, lb, K, stride_d, stride_p, r, half_r2,
                     M: tl.constexpr, GAP: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_J: tl.constexpr,
                     LOO: tl.constexpr):
    """``C(r)``'s part from data row i and the noise rows of block ``lb``: pass 1 streams the softmax max and
    sum over j tiles; pass 2, per k tile, accumulates ``q = sum_j w_j D_jk`` over the tiles j <= k (the
    off-diagonal ones with weight 2, D symmetric) into one ``tl.dot`` accumulator, then ``w_k . q``. Every
    weight tile is recomputed from P and D (nothing but the accumulators stays live). 0 without work when
    every row is one-hot on j = i (never with ``LOO``: softmax over j != i)."""
    offs_l = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_l = offs_l < K
    p_li = tl.load(p_ptr + offs_l * stride_p + i, mask=mask_l, other=0.0)
    pmax = tl.load(pmax_ptr + offs_l, mask=mask_l, other=0.0)
    bound = -half_r2 * tl.load(mind_ptr + i) + r * (pmax - p_li)
    bound = tl.where(mask_l, bound, -float("inf"))
    if LOO:
        bound = tl.zeros_like(bound)  # every unit is dense
    part = 0.0
    if tl.max(bound, axis=0) >= -GAP:  # else every row is one-hot on j = i: contributes exactly 0
        m_row = tl.full((BLOCK_L,), -float("inf"), tl.float32)
        s_row = tl.zeros((BLOCK_L,), tl.float32)
        for j0 in range(0, M, BLOCK_J):
            logit, _, _ = _logits_tile(p_ptr, dist_ptr, i, offs_l, mask_l, p_li, j0, M, stride_p, stride_d,
                                       r, half_r2, BLOCK_J, LOO)
            m_new = tl.maximum(m_row, tl.max(logit, axis=1))
            s_row = s_row * tl.exp(m_row - m_new) + tl.sum(tl.exp(logit - m_new[:, None]), axis=1)
            m_row = m_new
        inv_s = 1.0 / s_row
        gd_i = tl.load(gd_ptr + i)
        acc = tl.zeros((BLOCK_L,), tl.float32)
        for k0 in range(0, M, BLOCK_J):
            w_k, offs_k, mask_k = _weights_tile(p_ptr, dist_ptr, i, offs_l, mask_l, p_li, k0, M, stride_p,
                                                stride_d, r, half_r2, m_row, inv_s, BLOCK_J, LOO)
            gd_k = tl.load(gd_ptr + offs_k, mask=mask_k, other=0.0)
            acc += tl.sum(w_k * (gd_i - gd_k)[None, :], axis=1)
            q = tl.zeros((BLOCK_L, BLOCK_J), tl.float32)
            for j0 in range(0, k0 + BLOCK_J, BLOCK_J):  # tiles j < k twice, the diagonal tile j = k once
                w_j, offs_j, mask_j = _weights_tile(p_ptr, dist_ptr, i, offs_l, mask_l, p_li, j0, M, stride_p,
                                                    stride_d, r, half_r2, m_row, inv_s, BLOCK_J, LOO)
                w_j = w_j * tl.where(j0 < k0, 2.0, 1.0)  # an off-diagonal tile stands for D_jk and D_kj
                d_jk = tl.load(dist_ptr + offs_j[:, None] * stride_d + offs_k[None, :],
                               mask=mask_j[:, None] & mask_k[None, :], other=0.0)
                q = tl.dot(w_j, d_jk, q, input_precision="ieee")
            acc += 0.5 * tl.sum(q * w_k, axis=1)
        part = tl.sum(tl.where(mask_l, acc, 0.0), axis=0)
    return part


@triton.jit
def _separation_kernel(dist_ptr, p_ptr, gd_ptr, mind_ptr, pmax_ptr, snr_ptr, out_ptr,
                       K, stride_d, stride_p, n_lblocks, n_chunks, M: tl.constexpr, GAP: tl.constexpr,
                       BLOCK_L: tl.constexpr, BLOCK_J: tl.constexpr, LOO: tl.constexpr):
    """Partial ``C(r)`` of program (chunk c, r): the sum of :func:`_unit_complement` over the units
    u = c, c + n_chunks, c + 2 n_chunks, ... < M * n_lblocks, unit u = (data row u // n_lblocks, noise-row
    block u % n_lblocks) (strided: every chunk mixes rows, so dense and skipped units spread evenly)."""
    c = tl.program_id(0)
    pid_r = tl.program_id(1)
    r = tl.load(snr_ptr + pid_r)
    half_r2 = 0.5 * r * r
    total = 0.0
    u = c
    while u < M * n_lblocks:  # a while loop: the interpreter rejects range() over a runtime bound
        total += _unit_complement(dist_ptr, p_ptr, gd_ptr, mind_ptr, pmax_ptr, u // n_lblocks, u % n_lblocks, K,
                                  stride_d, stride_p, r, half_r2, M, GAP, BLOCK_L, BLOCK_J, LOO)
        u += n_chunks
    tl.store(out_ptr + pid_r * n_chunks + c, total)


# Tiling (docs/vr_sampling.md, "The kernel's tiling"): BLOCK_L = 64 noise rows x BLOCK_J = 32 data rows,
# 8 warps, no software pipelining, and row strides of D and P padded to 16 floats (vectorized loads,
# fewer address registers). The ``ieee`` fp32 dot runs on the FMA units with both operands held in
# registers, so registers grow with the tiles: the former 64 x 64 tiling used 255 and spilled 3.7-5.7 KB
# on sm_90 / sm_80; 64-wide j tiles reach 254-255 (spilling at BLOCK_L = 32), num_stages = 2 spills
# 12-24 B, and 4 warps on the 64 x 32 tile hold 128 registers and spill 8 B on sm_90 (ptxas keeps 4
# programs per SM). 8 warps spread the same tile: 124-128 registers on sm_90 and sm_80 at M = 200 and
# M = 4096, with and without leave-one-out, no spill (2 programs of 8 warps per SM). Small M or K take
# 16-wide tiles (tl.dot needs >= 16) and 4 warps.
BLOCK_L_MAX = 64
BLOCK_J_MAX = 32
NUM_WARPS = 8  # for the full 64 x 32 tile; smaller tiles take 4 (_num_warps)
NUM_STAGES = 1
ROW_ALIGN = 16  # floats: Triton specializes integer arguments divisible by 16
# Programs per launch (all r together): each program sums a strided set of (data row, noise-row block) units
# of one r into one fp32 partial. Enough programs for ~15 waves of 4 per SM on an H100 (the units of
# small r are dense, those of large r mostly skipped: many programs keep the tail short); few enough
# that the partials stay a small fraction of D and P (docs/speed_checks.md, "Bytes moved"). A fixed
# count, not the device's: the summation order, hence the result, is the same on every GPU.
TARGET_PROGRAMS = 8192
INT32_MAX = 2**31 - 1


def _block_sizes(m: int, k: int) -> tuple[int, int]:
    block_j = max(16, min(BLOCK_J_MAX, triton.next_power_of_2(m)))
    block_l = max(16, min(BLOCK_L_MAX, triton.next_power_of_2(k)))
    return block_l, block_j


def _num_warps(block_l: int, block_j: int) -> int:
    return NUM_WARPS if block_l * block_j >= BLOCK_L_MAX * BLOCK_J_MAX else 4


def _chunks(units: int, nr: int) -> int:
    """Programs per r (each an fp32 partial): ~TARGET_PROGRAMS over all r, at most one per unit."""
    return max(1, min(units, triton.cdiv(TARGET_PROGRAMS, nr)))


def _aligned_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` (rows, M) as an fp32 view whose row stride is a multiple of ROW_ALIGN floats: ``t`` itself if it
    is one, else one cast-and-copy pass into a padded buffer (the padding columns are never read)."""
    if t.dtype == torch.float32 and t.stride(1) == 1 and t.stride(0) % ROW_ALIGN == 0:
        return t
    rows, cols = t.shape
    buf = torch.empty(rows, triton.cdiv(cols, ROW_ALIGN) * ROW_ALIGN, dtype=torch.float32, device=t.device)
    return buf[:, :cols].copy_(t)


class KernelStats(NamedTuple):
    """The fused kernel's operands (:func:`kernel_stats`): fp32 ``D`` (M, M) and ``P`` (K, M) with row
    strides padded to ROW_ALIGN floats, diag(G), min_{j != i} D_ij, max_j P_lj."""

    dist: torch.Tensor
    p: torch.Tensor
    gdiag: torch.Tensor
    min_dist: torch.Tensor
    pmax: torch.Tensor


def kernel_stats(st: dict[str, torch.Tensor]) -> KernelStats:
    """The kernel's fp32 operands from the float64 :func:`gram_stats`: one cast-and-copy pass per tensor,
    straight into the row-aligned buffers. Built once per call of the separation function (not per r):
    the kernel re-reads D's tiles O(M / BLOCK_J) times per unit through L2, in fp32."""
    f = torch.float32
    return KernelStats(_aligned_rows(st["D"]), _aligned_rows(st["P"]), st["gdiag"].to(f), st["min_dist"].to(f),
                       st["pmax"].to(f))


@on_tensor_device
def _launch_separation(dist: torch.Tensor, p: torch.Tensor, gd: torch.Tensor, min_dist: torch.Tensor,
                       pmax: torch.Tensor, snr: torch.Tensor, *, block_l: int | None = None,
                       block_j: int | None = None, leave_one_out: bool = False) -> torch.Tensor:
    """``C(r)`` for every r (float64, (R,)) from the fp32 statistics: D (M, M), P (K, M) (copied into
    row-aligned fp32 buffers unless they are laid out as :func:`kernel_stats` makes them), diag(G),
    min_{j != i} D_ij, max_j P_lj, snr (R,). ``block_l`` / ``block_j`` override the tiling (tests);
    ``leave_one_out``: softmax over j != i."""
    m, k, nr = dist.shape[0], p.shape[0], snr.numel()
    auto_l, auto_j = _block_sizes(m, k)
    block_l, block_j = block_l or auto_l, block_j or auto_j
    dist, p = _aligned_rows(dist), _aligned_rows(p)
    for name, t in (("D (M, M)", dist), ("P (K, M)", p)):
        if t.shape[0] * t.stride(0) > INT32_MAX:
            raise ValueError(f"separation_function: {name} = {tuple(t.shape)} exceeds the fused kernel's 32-bit "
                             f"offsets (M = {m} data rows, K = {k} noise rows)")
    n_lb = triton.cdiv(k, block_l)
    outs = []
    # M is a compile-time constant: the loops over j tiles then have Python-int bounds, which the
    # interpreter needs (numpy 2.4 refuses int() of its 1-element scalar arrays); one compile per M.
    r_chunk = GRID_YZ_MAX  # the grid's axis 1
    for r0 in range(0, nr, r_chunk):
        sn = snr[r0:r0 + r_chunk]
        chunks = _chunks(m * n_lb, sn.numel())
        part = torch.empty(sn.numel(), chunks, dtype=torch.float32, device=dist.device)
        _separation_kernel[(chunks, sn.numel())](
            dist, p, gd, min_dist, pmax, sn, part, k, dist.stride(0), p.stride(0), n_lb, chunks,
            M=m, GAP=ONEHOT_GAP, BLOCK_L=block_l, BLOCK_J=block_j, LOO=bool(leave_one_out), num_warps=_num_warps(block_l, block_j),
            num_stages=NUM_STAGES)
        outs.append(part.sum(dim=1, dtype=torch.float64))  # float64 accumulation, no float64 copy
    return outs[0] if len(outs) == 1 else torch.cat(outs)


@torch.library.custom_op("vefast::separation_complement", mutates_args=())
def _separation_complement_op(dist: torch.Tensor, p: torch.Tensor, gdiag: torch.Tensor, min_dist: torch.Tensor,
                              pmax: torch.Tensor, snr: torch.Tensor, leave_one_out: bool = False) -> torch.Tensor:
    """Fused per-SNR work: ``C(r)`` (module docstring) for every r, float64 (R,). fp32 inputs (D and P
    as :func:`kernel_stats` lays them out, or any rows of unit stride)."""
    return _launch_separation(dist, p, gdiag.contiguous(), min_dist.contiguous(), pmax.contiguous(),
                              snr.contiguous(), leave_one_out=leave_one_out)


@_separation_complement_op.register_fake
def _(dist, p, gdiag, min_dist, pmax, snr, leave_one_out=False):
    return snr.new_empty(snr.shape, dtype=torch.float64)


def separation_complement_triton(ks: KernelStats, snr: torch.Tensor, *, leave_one_out: bool = False) -> torch.Tensor:
    """``C(r)`` for every r with the fused Triton kernel (fp32 work, float64 result) from the operands of
    :func:`kernel_stats`."""
    return _separation_complement_op(*ks, snr.to(torch.float32), leave_one_out)
