"""Fused q/k prologue of DiT attention: per-head RMSNorm or LayerNorm, then 2D RoPE (docs/math.md §7).

For q and k of a packed qkv projection (B, N, 3, H, hd) -- the view of a fused qkv Linear's output:

    RMSNorm  (LightningDiT):       y = round(x * rsqrt(mean(x^2) + eps)) * w + b
    LayerNorm (timm; DiT / SiT with qk_norm=True, LightningDiT with use_rmsnorm=False):
                                   y = (x - mean(x)) * rsqrt(var(x) + eps) * w + b
    none:                          y = x
    RoPE (EVA / LightningDiT, interleaved pairs, :mod:`vefast.ops.rope`):
                                   out = y * cos + rotate_half(y) * sin,  rotate_half(y)[2i] = -y[2i+1],
                                                                          rotate_half(y)[2i+1] = y[2i]

(w = 1 and b = 0 where a weight / bias is absent; ``round`` is the rounding to the input dtype that
LightningDiT's ``RMSNorm`` does before its weight, ``self._norm(x.float()).type_as(x) * self.weight``.)
q and k are written once, in the input dtype, contiguous (B, N, H, hd): the memory order SDPA's fused
backends read as (B, H, N, hd) views without a copy; v is not touched (SDPA reads it in place).

Backward (one pass): from dq, dk (and dv, copied through) to the gradient of the packed qkv, written
straight into its three slices, with
    rope^T:   dy = g * cos - rotate_half(g * sin)
    norm:     dw = sum_rows dy * xhat_r (xhat_r: the rounded xhat for RMSNorm), db = sum_rows dy,
              dx = rstd * (dy w - mean(dy w) - xhat mean(dy w xhat))     (no mean(dy w) term for RMSNorm)
The rounding of RMSNorm passes the gradient through (as autograd does for ``type_as``).

Choices:
- Statistics in fp32 registers (float32 math whatever the input dtype); the backward *recomputes*
  mean / rstd from x instead of saving them: it reads x anyway (for xhat), so recomputing costs no
  memory traffic, while saving rstd (and mean) would add a write and a read of B*N*H*2 floats per
  norm and one allocation per call.
- Weight / bias gradients: per-program fp32 partials (programs x 2 or 4 x hd), finished by one ``sum``
  over programs: deterministic (no float atomics), bitwise repeatable.
- Tiles: one token x a chunk of its heads x the head dim (padded to a power of two); the rotary table row
  of the token is loaded once and broadcast over the heads and over q and k. Row offsets carry a
  divisibility hint (``VEC``) proven by the launcher, so the loads of a packed qkv vectorize (16 bytes).
- The softmax scale is not folded into q: every SDPA backend already multiplies the scores by
  ``scale * log2(e)`` in one fp32 instruction, so folding saves nothing, and for the usual
  ``hd ** -0.5`` with hd not a power of 4 it would change q's rounding (docs/attention.md).
- float64 inputs and CPU tensors outside ``TRITON_INTERPRET=1`` run :func:`qk_norm_rope_reference`
  (reported once, ``_common.triton_path``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import check_finite_number, check_same_device, check_tensor, on_tensor_device, triton_path
from ._rownorm import _normalize, _normalize_bwd
from .rope import rotate_half

__all__ = ["QKNorm", "NORMS", "qk_norm_rope", "qk_norm_rope_reference", "check_qk_args",
           "minimal_bytes"]

NORMS = ("none", "rms", "layer")
_NORM_ID = {"none": 0, "rms": 1, "layer": 2}
_PARTIAL_TARGET = 1024  # backward programs at most (rows of partials); fixed: results never depend on the GPU
_MIN_TILES = 8  # backward tiles per program at least: the partials stay small against the tiles' bytes


class QKNorm(NamedTuple):
    """How q and k are normalized: ``kind`` in :data:`NORMS`, optional (hd,) weights and biases, eps."""

    kind: str = "none"
    q_weight: torch.Tensor | None = None
    k_weight: torch.Tensor | None = None
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    eps: float = 1e-6

    @property
    def has_weight(self) -> bool:
        return self.q_weight is not None

    @property
    def has_bias(self) -> bool:
        return self.q_bias is not None

    def params(self) -> tuple[torch.Tensor | None, ...]:
        """(q_weight, q_bias, k_weight, k_bias): the order of the partials and of the gradients."""
        return self.q_weight, self.q_bias, self.k_weight, self.k_bias


# --------------------------------------------------------------------------------------------
# eager reference (any float dtype; float64 in the tests)
# --------------------------------------------------------------------------------------------
def _norm_reference(x: torch.Tensor, kind: str, w: torch.Tensor | None, b: torch.Tensor | None, eps: float,
                    dtype: torch.dtype) -> torch.Tensor:
    """Per-head norm of x (in the compute dtype) as the modules do it; ``dtype`` is the input dtype."""
    if kind == "rms":
        y = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype).to(x.dtype)
        y = y * w.to(x.dtype) if w is not None else y
        return y + b.to(x.dtype) if b is not None else y
    if kind == "layer":
        return F.layer_norm(x, (x.shape[-1],), None if w is None else w.to(x.dtype),
                            None if b is None else b.to(x.dtype), eps)
    return x


def qk_norm_rope_reference(qkv: torch.Tensor, norm: QKNorm,
                           rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k), each (B, N, H, hd) in qkv's dtype: the module sequence (norm, then rope in float32;
    float64 throughout for float64 inputs). Differentiable."""
    c = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    out = []
    for which, w, b in ((0, norm.q_weight, norm.q_bias), (1, norm.k_weight, norm.k_bias)):
        y = _norm_reference(qkv[:, :, which].to(c), norm.kind, w, b, norm.eps, qkv.dtype)
        if rope is not None:
            cos, sin = (t.to(c)[:, None, :] for t in rope)  # (N, 1, hd): broadcast over heads
            y = y * cos + rotate_half(y) * sin
        out.append(y.to(qkv.dtype))
    return out[0], out[1]


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _tile(tile, T, H, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Tile ``tile``: one token x a chunk of BLOCK_H heads x BLOCK_D columns (chunks of a token are consecutive
    tiles). Returns the token, its heads [BLOCK_H], their flat row index tok * H + h, columns, column mask, mask."""
    chunks = tl.cdiv(H, BLOCK_H)
    tok = (tile // chunks).to(tl.int64)
    heads = ((tile % chunks) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < HEAD_DIM
    return tok, heads, tok * H + heads, cols, dmask, ((heads < H) & (tok < T))[:, None] & dmask[None, :]


@triton.jit
def _rows(tok, heads, N, s_b, s_n, s_h, VEC: tl.constexpr):
    """Element offsets [BLOCK_H] of the rows (token, head) of a (B, N, H, hd) view with strides (s_b, s_n, s_h)."""
    return tl.multiple_of((tok // N) * s_b + (tok % N) * s_n + heads * s_h, VEC)


@triton.jit
def _rope_tables(COS, SIN, tok, T, N, cols, dmask, HEAD_DIM: tl.constexpr):
    """fp32 cos / sin [1, BLOCK_D] of the token's position ``tok % N``, broadcast over its heads."""
    m = dmask & (tok < T)
    c = tl.load(COS + (tok % N) * HEAD_DIM + cols, mask=m, other=0.0).to(tl.float32)
    s = tl.load(SIN + (tok % N) * HEAD_DIM + cols, mask=m, other=0.0).to(tl.float32)
    return c[None, :], s[None, :]


@triton.jit
def _rotate_half(y, R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Interleaved pairs: (y0, y1, y2, y3, ...) -> (-y1, y0, -y3, y2, ...)."""
    even, odd = tl.split(tl.reshape(y, [R, BLOCK_D // 2, 2]))
    return tl.reshape(tl.join(-odd, even), [R, BLOCK_D])


@triton.jit
def _vector(PTR, cols, dmask, HAS: tl.constexpr, default: tl.constexpr):
    """fp32 (hd,) parameter vector, or ``default`` everywhere when absent."""
    if HAS:
        v = tl.load(PTR + cols, mask=dmask, other=0.0).to(tl.float32)
    else:
        v = tl.full(cols.shape, default, tl.float32)
    return v


@triton.jit
def _prologue_one(X, W, B, OUT, in_rows, out_rows, cols, dmask, mask, c, s, eps,
                  NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ROPE: tl.constexpr,
                  HEAD_DIM: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Forward of q or k on one tile: load x (stride-1 columns), norm, rope, store in OUT's dtype."""
    x = tl.load(X + in_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if NORM != 0:
        xhat, _rstd = _normalize(x, dmask, HEAD_DIM, eps, NORM == 1)
        if NORM == 1:  # LightningDiT's RMSNorm rounds to the input dtype before the weight
            xhat = xhat.to(OUT.dtype.element_ty).to(tl.float32)
        y = xhat * _vector(W, cols, dmask, HAS_W, 1.0)[None, :] + _vector(B, cols, dmask, HAS_B, 0.0)[None, :]
    else:
        y = x
    if HAS_ROPE:
        y = y * c + _rotate_half(y, R, BLOCK_D) * s
    tl.store(OUT + out_rows[:, None] * HEAD_DIM + cols[None, :], y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _qk_fwd_kernel(
        QKV,     # *in   (B, N, 3, H, hd) packed projection, any strides, unit dim stride; q = [:, :, 0], k = [:, :, 1]
        QW,      # *in   (hd,) contiguous q-norm weight, any float dtype (unused unless HAS_W)
        QB,      # *in   (hd,) contiguous q-norm bias (unused unless HAS_B)
        KW,      # *in   (hd,) contiguous k-norm weight (unused unless HAS_W)
        KB,      # *in   (hd,) contiguous k-norm bias (unused unless HAS_B)
        COS,     # *in   (N, hd) contiguous rotary cos table, any float dtype (unused unless HAS_ROPE)
        SIN,     # *in   (N, hd) contiguous rotary sin table (unused unless HAS_ROPE)
        Q_OUT,   # *out  (B, N, H, hd) contiguous: normalized, rotated q in qkv's dtype
        K_OUT,   # *out  (B, N, H, hd) contiguous: normalized, rotated k in qkv's dtype
        T, N, H, eps,                # tokens B * N, tokens per sample, heads, norm epsilon
        s_b, s_n, s_w, s_h,          # qkv strides (elements): batch, token, q/k/v slot, head (dim stride 1)
        NORM: tl.constexpr,          # 0 none, 1 RMSNorm (LightningDiT rounding), 2 LayerNorm
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ROPE: tl.constexpr,
        HEAD_DIM: tl.constexpr,      # hd
        VEC: tl.constexpr,           # every qkv row offset is a multiple of VEC elements (launcher-proven)
        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    tok, heads, flat, cols, dmask, mask = _tile(tl.program_id(0), T, H, HEAD_DIM, BLOCK_H, BLOCK_D)
    rows = _rows(tok, heads, N, s_b, s_n, s_h, VEC)
    c, s = 0.0, 0.0
    if HAS_ROPE:
        c, s = _rope_tables(COS, SIN, tok, T, N, cols, dmask, HEAD_DIM)
    _prologue_one(QKV, QW, QB, Q_OUT, rows, flat, cols, dmask, mask, c, s, eps,
                  NORM, HAS_W, HAS_B, HAS_ROPE, HEAD_DIM, BLOCK_H, BLOCK_D)
    _prologue_one(QKV + s_w, KW, KB, K_OUT, rows, flat, cols, dmask, mask, c, s, eps,
                  NORM, HAS_W, HAS_B, HAS_ROPE, HEAD_DIM, BLOCK_H, BLOCK_D)


@triton.jit
def _prologue_bwd_one(X, G, W, DX, in_rows, g_rows, dx_rows, cols, dmask, mask, c, s, eps,
                      NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_ROPE: tl.constexpr,
                      HEAD_DIM: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Backward of q or k on one tile: dx stored into DX; returns this tile's (sum dy * xhat_r, sum dy)."""
    g = tl.load(G + g_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_ROPE:
        g = g * c - _rotate_half(g * s, R, BLOCK_D)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    if NORM != 0:
        x = tl.load(X + in_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xhat, rstd = _normalize(x, dmask, HEAD_DIM, eps, NORM == 1)
        xr = xhat
        if NORM == 1:
            xr = xhat.to(DX.dtype.element_ty).to(tl.float32)
        dw = tl.sum(g * xr, axis=0)
        db = tl.sum(g, axis=0)
        dx = _normalize_bwd(g * _vector(W, cols, dmask, HAS_W, 1.0)[None, :], xhat, rstd, HEAD_DIM, NORM == 1)
    else:
        dx = g
    tl.store(DX + dx_rows[:, None] * HEAD_DIM + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    return dw, db


@triton.jit
def _qk_bwd_kernel(
        DQ,      # *in   (B, N, H, hd) gradient of the prologue's q output, any strides with a unit dim stride
        DK,      # *in   (B, N, H, hd) gradient of the prologue's k output
        DV,      # *in   (B, N, H, hd) gradient of v, copied into dqkv[:, :, 2] (unused unless HAS_DV: zeros then)
        QKV,     # *in   (B, N, 3, H, hd) packed projection: raw q, k re-read, their statistics recomputed
        QW,      # *in   (hd,) contiguous q-norm weight (unused unless HAS_W)
        KW,      # *in   (hd,) contiguous k-norm weight (unused unless HAS_W)
        COS,     # *in   (N, hd) contiguous rotary cos table (unused unless HAS_ROPE)
        SIN,     # *in   (N, hd) contiguous rotary sin table (unused unless HAS_ROPE)
        DQKV,    # *out  (B, N, 3, H, hd) contiguous gradient of qkv, all three slices written
        PART,    # *out  (programs, P, hd) fp32 partials of (dqw, dkw) if HAS_W, then (dqb, dkb) if HAS_B
        T, N, H, eps, tiles_per_prog,
        s_b, s_n, s_w, s_h,          # qkv strides (dim stride 1)
        q_b, q_n, q_h,               # dq strides
        k_b, k_n, k_h,               # dk strides
        v_b, v_n, v_h,               # dv strides
        NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ROPE: tl.constexpr,
        HAS_DV: tl.constexpr, HEAD_DIM: tl.constexpr,
        VEC: tl.constexpr,           # VEC divides every row offset of qkv, dq, dk, dv
        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    acc_qw = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_qb = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_kw = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_kb = tl.zeros([BLOCK_D], dtype=tl.float32)
    t = 0
    while t < tiles_per_prog:  # a while loop: the interpreter rejects range() over a runtime bound
        tok, heads, flat, cols, dmask, mask = _tile(pid * tiles_per_prog + t, T, H, HEAD_DIM, BLOCK_H, BLOCK_D)
        rows = _rows(tok, heads, N, s_b, s_n, s_h, VEC)
        out_q = flat + tok * 2 * H  # dqkv row of (token, slot 0, head): (tok * 3 + slot) * H + h
        c, s = 0.0, 0.0
        if HAS_ROPE:
            c, s = _rope_tables(COS, SIN, tok, T, N, cols, dmask, HEAD_DIM)
        dw, db = _prologue_bwd_one(QKV, DQ, QW, DQKV, rows, _rows(tok, heads, N, q_b, q_n, q_h, VEC), out_q,
                                   cols, dmask, mask, c, s, eps, NORM, HAS_W, HAS_ROPE, HEAD_DIM, BLOCK_H, BLOCK_D)
        acc_qw += dw
        acc_qb += db
        dw, db = _prologue_bwd_one(QKV + s_w, DK, KW, DQKV, rows, _rows(tok, heads, N, k_b, k_n, k_h, VEC),
                                   out_q + H, cols, dmask, mask, c, s, eps, NORM, HAS_W, HAS_ROPE, HEAD_DIM,
                                   BLOCK_H, BLOCK_D)
        acc_kw += dw
        acc_kb += db
        if HAS_DV:
            dv = tl.load(DV + _rows(tok, heads, N, v_b, v_n, v_h, VEC)[:, None] + cols[None, :], mask=mask, other=0.0)
        else:
            dv = tl.zeros([BLOCK_H, BLOCK_D], dtype=DQKV.dtype.element_ty)
        tl.store(DQKV + (out_q + 2 * H)[:, None] * HEAD_DIM + cols[None, :], dv.to(DQKV.dtype.element_ty), mask=mask)
        t += 1
    d = tl.arange(0, BLOCK_D)
    part = PART + pid * (2 * HAS_W + 2 * HAS_B) * HEAD_DIM + d
    if HAS_W:
        tl.store(part, acc_qw, mask=d < HEAD_DIM)
        tl.store(part + HEAD_DIM, acc_kw, mask=d < HEAD_DIM)
        part += 2 * HEAD_DIM
    if HAS_B:
        tl.store(part, acc_qb, mask=d < HEAD_DIM)
        tl.store(part + HEAD_DIM, acc_kb, mask=d < HEAD_DIM)


# --------------------------------------------------------------------------------------------
# launchers (the allocations are the caller's: the launchers only launch)
# --------------------------------------------------------------------------------------------
class TileConfig(NamedTuple):
    block_h: int  # heads per tile (a tile is one token's chunk of heads)
    block_d: int  # head dim padded to a power of two
    num_warps: int


def tile_config(heads: int, head_dim: int) -> TileConfig:
    """One token x up to 1024 / padded-hd heads (8 heads at hd 72 / 96 / 128, 16 at hd 64), one warp per 256
    values (8 per thread: one 16-byte bf16 vector), at most 4; forward and backward alike. The codegen gate
    (``benchmarks/codegen.py``, sm_90 / sm_80, DiT widths): forward 40-53 registers, backward 80-152, no spills;
    an 8-warp backward of the same tile (4 values per thread) spills 8 bytes on sm_80 with LayerNorm."""
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(heads), max(1, 1024 // block_d))
    return TileConfig(block_h, block_d, max(1, min(4, block_h * block_d // 256)))


def n_tiles(qkv: torch.Tensor, cfg: TileConfig) -> int:
    """Tiles of one launch: tokens x head chunks."""
    return qkv.shape[0] * qkv.shape[1] * triton.cdiv(qkv.shape[3], cfg.block_h)


def _row_strides(t: torch.Tensor, heads_first: bool = False) -> tuple[int, int, int]:
    """(batch, token, head) strides of a (B, N, H, hd) view, or of a (B, H, N, hd) one (``heads_first``)."""
    return (t.stride(0), t.stride(2), t.stride(1)) if heads_first else (t.stride(0), t.stride(1), t.stride(2))


def _vec(elsize: int, *views: tuple[int, tuple[int, ...]]) -> int:
    """Largest VEC in (8, 4, 2, 1), at most 16 bytes, dividing every (base pointer, row strides) of the views
    (the row offsets the kernels compute are then multiples of it: 16-byte loads become possible). Taken
    from pointers and strides, not from view tensors, which would cost an aten op each."""
    vec = 16 // elsize
    while vec > 1:
        if all(ptr % (vec * elsize) == 0 and all(s % vec == 0 for s in strides) for ptr, strides in views):
            return vec
        vec //= 2
    return 1


def _view(t: torch.Tensor, heads_first: bool = False) -> tuple[int, tuple[int, ...]]:
    """(data pointer, row strides) of a (B, N, H, hd) view (or (B, H, N, hd) with ``heads_first``)."""
    return t.data_ptr(), _row_strides(t, heads_first)


def _qkv_views(qkv: torch.Tensor) -> list[tuple[int, tuple[int, ...]]]:
    """(pointer, row strides) of q and k inside qkv."""
    s_b, s_n, s_w, s_h, _ = qkv.stride()
    ptr = qkv.data_ptr()
    return [(ptr, (s_b, s_n, s_h)), (ptr + s_w * qkv.element_size(), (s_b, s_n, s_h))]


def _flags(norm: QKNorm, rope: tuple[torch.Tensor, torch.Tensor] | None) -> dict:
    return dict(NORM=_NORM_ID[norm.kind], HAS_W=norm.has_weight, HAS_B=norm.has_bias, HAS_ROPE=rope is not None)


def _ptr(t: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    return t if t is not None else dummy


def _qkv_args(qkv: torch.Tensor) -> dict:
    """QKV and its strides; qkv's q slice doubles as the (B, N, H, hd) view the VEC proof looks at."""
    s_b, s_n, s_w, s_h, _ = qkv.stride()
    B, N, _three, H, hd = qkv.shape
    return dict(QKV=qkv, T=B * N, N=N, H=H, s_b=s_b, s_n=s_n, s_w=s_w, s_h=s_h, HEAD_DIM=hd)


def _rope_args(rope: tuple[torch.Tensor, torch.Tensor] | None, dummy: torch.Tensor) -> dict:
    cos, sin = rope if rope is not None else (dummy, dummy)
    return dict(COS=cos, SIN=sin)


def backward_grid(qkv: torch.Tensor, cfg: TileConfig) -> tuple[int, int]:
    """(programs, tiles per program) of the backward: at most ``_PARTIAL_TARGET`` programs of at least
    ``_MIN_TILES`` tiles (fewer only when there are fewer tiles)."""
    total = n_tiles(qkv, cfg)
    tiles = max(triton.cdiv(total, _PARTIAL_TARGET), min(total, _MIN_TILES))
    return triton.cdiv(total, tiles), tiles


@on_tensor_device
def launch_fwd(qkv: torch.Tensor, norm: QKNorm, rope: tuple[torch.Tensor, torch.Tensor] | None,
               q_out: torch.Tensor, k_out: torch.Tensor) -> None:
    """Write the prologue's q and k into ``q_out`` / ``k_out`` (contiguous (B, N, H, hd) memory)."""
    B, N, _three, H, hd = qkv.shape
    cfg = tile_config(H, hd)
    grid = (n_tiles(qkv, cfg),)
    _qk_fwd_kernel[grid](QW=_ptr(norm.q_weight, qkv), QB=_ptr(norm.q_bias, qkv), KW=_ptr(norm.k_weight, qkv),
                         KB=_ptr(norm.k_bias, qkv), Q_OUT=q_out, K_OUT=k_out, eps=norm.eps,
                         VEC=_vec(qkv.element_size(), *_qkv_views(qkv)),
                         BLOCK_H=cfg.block_h, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
                         **_qkv_args(qkv), **_rope_args(rope, qkv), **_flags(norm, rope))


@on_tensor_device
def launch_bwd(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor | None, qkv: torch.Tensor, norm: QKNorm,
               rope: tuple[torch.Tensor, torch.Tensor] | None, dqkv: torch.Tensor, part: torch.Tensor, *,
               heads_first: bool = False) -> None:
    """Write the gradient of qkv into ``dqkv`` (contiguous, the shape of qkv) from the gradients of the
    prologue's outputs (``dv`` None: zeros in the v slice) and the per-program partials of the parameter
    gradients into ``part`` (:func:`alloc_bwd`). dq, dk, dv are (B, N, H, hd) views, or (B, H, N, hd) ones with
    ``heads_first`` (as SDPA's backward returns them)."""
    B, N, _three, H, hd = qkv.shape
    cfg = tile_config(H, hd)
    programs, tiles = backward_grid(qkv, cfg)
    dv_ = dv if dv is not None else dq
    views = _qkv_views(qkv) + [_view(t, heads_first) for t in (dq, dk, dv_)]
    elsize = max(t.element_size() for t in (qkv, dq, dk, dv_))
    _qk_bwd_kernel[(programs,)](DQ=dq, DK=dk, DV=dv_, QW=_ptr(norm.q_weight, qkv), KW=_ptr(norm.k_weight, qkv),
                                DQKV=dqkv, PART=part, eps=norm.eps, tiles_per_prog=tiles,
                                **dict(zip(("q_b", "q_n", "q_h"), _row_strides(dq, heads_first))),
                                **dict(zip(("k_b", "k_n", "k_h"), _row_strides(dk, heads_first))),
                                **dict(zip(("v_b", "v_n", "v_h"), _row_strides(dv_, heads_first))),
                                HAS_DV=dv is not None, VEC=_vec(elsize, *views),
                                BLOCK_H=cfg.block_h, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
                                **_qkv_args(qkv), **_rope_args(rope, qkv),
                                **_flags(norm, rope))


def alloc_bwd(qkv: torch.Tensor, norm: QKNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(dqkv, partials) for :func:`launch_bwd`: dqkv contiguous in qkv's shape and dtype; partials
    (programs, P, hd) fp32 with P = 2 per parameter kind present (q and k weights, then biases), or an empty
    tensor without parameters."""
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    rows = 2 * (norm.has_weight + norm.has_bias)
    if rows == 0:
        return dqkv, dqkv.new_empty(0, dtype=torch.float32)
    programs, _ = backward_grid(qkv, tile_config(qkv.shape[3], qkv.shape[4]))
    return dqkv, torch.empty((programs, rows, qkv.shape[4]), dtype=torch.float32, device=qkv.device)


def finish_param_grads(part: torch.Tensor, norm: QKNorm) -> tuple[torch.Tensor | None, ...]:
    """(dq_weight, dq_bias, dk_weight, dk_bias) from the partials (None where the parameter is absent): one
    deterministic sum over the programs."""
    if part.numel() == 0:
        return (None,) * 4
    sums = iter(part.sum(0).unbind(0))  # fp32 sums in the kernel's row order: (qw, kw) then (qb, kb)
    qw, kw = (next(sums), next(sums)) if norm.has_weight else (None, None)
    qb, kb = (next(sums), next(sums)) if norm.has_bias else (None, None)
    return tuple(None if g is None else g if g.dtype == p.dtype else g.to(p.dtype)
                 for g, p in zip((qw, qb, kw, kb), norm.params()))


def minimal_bytes(qkv: torch.Tensor, norm: QKNorm, rope: tuple[torch.Tensor, torch.Tensor] | None
                  ) -> tuple[int, int]:
    """(forward, backward) bytes an ideal prologue moves: forward reads q, k of qkv and writes q, k; backward
    reads dq, dk, dv and raw q, k and writes the three slices of dqkv (tables and parameters once each)."""
    unit = qkv[:, :, 0].numel() * qkv.element_size()
    small = sum(t.numel() * t.element_size() for t in (*(rope or ()), *norm.params()) if t is not None)
    return 4 * unit + small, 8 * unit + small


# --------------------------------------------------------------------------------------------
# argument checks (shared with vefast.ops.attention)
# --------------------------------------------------------------------------------------------
def check_qk_args(qkv: torch.Tensor, norm: QKNorm, rope: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Raise a clear TypeError / ValueError for a bad qkv (B, N, 3, H, hd), norm or rope."""
    check_tensor("qkv", qkv)
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape (B, N, 3, H, head_dim), got {tuple(qkv.shape)}")
    if min(qkv.shape) < 1:
        raise ValueError(f"qkv must have B, N, H, head_dim >= 1, got shape {tuple(qkv.shape)}")
    if qkv.stride(-1) != 1:
        raise ValueError(f"qkv must have a unit stride along head_dim (a view of a Linear's output has one), "
                         f"got strides {qkv.stride()}")
    N, hd = qkv.shape[1], qkv.shape[-1]
    if norm.kind not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm.kind!r}")
    for side in ("weight", "bias"):
        q, k = getattr(norm, f"q_{side}"), getattr(norm, f"k_{side}")
        if (q is None) != (k is None):
            raise ValueError(f"q_norm_{side} and k_norm_{side} must be both given or both None")
        if q is not None and norm.kind == "none":
            raise ValueError(f"q/k norm {side}s given with norm='none'")
        if side == "bias" and q is not None and norm.kind == "rms":
            raise ValueError("RMSNorm takes no bias (q_norm_bias / k_norm_bias must be None for norm='rms')")
        for name, t in ((f"q_norm_{side}", q), (f"k_norm_{side}", k)):
            if t is None:
                continue
            check_tensor(name, t)
            if tuple(t.shape) != (hd,):
                raise ValueError(f"{name} must have shape (head_dim,) = ({hd},), got {tuple(t.shape)}")
            if not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous")
            check_same_device(qkv=qkv, **{name: t})
    if rope is not None:
        if not isinstance(rope, (tuple, list)) or len(rope) != 2:
            raise TypeError(f"rope must be a (cos, sin) pair of tensors or None, got {type(rope).__name__}")
        for name, t in (("rope cos", rope[0]), ("rope sin", rope[1])):
            check_tensor(name, t)
            if tuple(t.shape) != (N, hd):
                raise ValueError(f"{name} must have shape (N, head_dim) = ({N}, {hd}), got {tuple(t.shape)}")
            if not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous")
        check_same_device(qkv=qkv, cos=rope[0], sin=rope[1])
        if hd % 2 != 0:
            raise ValueError(f"head_dim must be even for the rotary embedding, got {hd}")
    check_finite_number("eps", norm.eps, min_value=0.0)


# --------------------------------------------------------------------------------------------
# torch.library op: the prologue alone (for attention implementations other than SDPA)
# --------------------------------------------------------------------------------------------
def _qk_out(qkv: torch.Tensor) -> torch.Tensor:
    B, N, _three, H, hd = qkv.shape
    return torch.empty((B, N, H, hd), dtype=qkv.dtype, device=qkv.device)


@torch.library.custom_op("vefast::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(qkv: torch.Tensor, q_weight: torch.Tensor | None, q_bias: torch.Tensor | None,
                     k_weight: torch.Tensor | None, k_bias: torch.Tensor | None, cos: torch.Tensor | None,
                     sin: torch.Tensor | None, kind: str, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    q, k = _qk_out(qkv), _qk_out(qkv)
    launch_fwd(qkv, QKNorm(kind, q_weight, k_weight, q_bias, k_bias, eps), None if cos is None else (cos, sin), q, k)
    return q, k


@_qk_norm_rope_op.register_fake
def _(qkv, q_weight, q_bias, k_weight, k_bias, cos, sin, kind, eps):
    return _qk_out(qkv), _qk_out(qkv)


@torch.library.custom_op("vefast::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_bwd_op(dq: torch.Tensor, dk: torch.Tensor, qkv: torch.Tensor, q_weight: torch.Tensor | None,
                         q_bias: torch.Tensor | None, k_weight: torch.Tensor | None, k_bias: torch.Tensor | None,
                         cos: torch.Tensor | None, sin: torch.Tensor | None, kind: str, eps: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    norm = QKNorm(kind, q_weight, k_weight, q_bias, k_bias, eps)
    dqkv, part = alloc_bwd(qkv, norm)
    launch_bwd(dq, dk, None, qkv, norm, None if cos is None else (cos, sin), dqkv, part)
    return dqkv, part


@_qk_norm_rope_bwd_op.register_fake
def _(dq, dk, qkv, q_weight, q_bias, k_weight, k_bias, cos, sin, kind, eps):
    return alloc_bwd(qkv, QKNorm(kind, q_weight, k_weight, q_bias, k_bias, eps))


def _qk_setup(ctx, inputs, output):
    qkv, q_weight, q_bias, k_weight, k_bias, cos, sin, kind, eps = inputs
    ctx.save_for_backward(qkv, q_weight, q_bias, k_weight, k_bias, cos, sin)
    ctx.kind, ctx.eps = kind, eps


def _qk_backward(ctx, dq, dk):
    qkv, q_weight, q_bias, k_weight, k_bias, cos, sin = ctx.saved_tensors
    norm = QKNorm(ctx.kind, q_weight, k_weight, q_bias, k_bias, ctx.eps)
    dqkv, part = _qk_norm_rope_bwd_op(dq, dk, qkv, q_weight, q_bias, k_weight, k_bias, cos, sin, ctx.kind, ctx.eps)
    dqw, dqb, dkw, dkb = finish_param_grads(part, norm)
    return dqkv, dqw, dqb, dkw, dkb, None, None, None, None


_qk_norm_rope_op.register_autograd(_qk_backward, setup_context=_qk_setup)


def qk_norm_rope(qkv: torch.Tensor, *, norm: str = "rms", q_weight: torch.Tensor | None = None,
                 k_weight: torch.Tensor | None = None, q_bias: torch.Tensor | None = None,
                 k_bias: torch.Tensor | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                 eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k), each contiguous (B, N, H, hd) in qkv's dtype: per-head ``norm`` ("rms", "layer" or "none")
    of q and k of the packed projection qkv (B, N, 3, H, hd) with optional (hd,) weights / biases, then the
    2D rotary embedding ``rope = (cos, sin)`` ((N, hd) tables, :func:`vefast.ops.rope.rope_2d_freqs`).
    Differentiable in qkv and the parameters; the gradient of qkv has zeros in its v slice."""
    spec = QKNorm(norm, q_weight, k_weight, q_bias, k_bias, eps)
    check_qk_args(qkv, spec, rope)
    if not triton_path("qk_norm_rope", qkv, *spec.params()):
        return qk_norm_rope_reference(qkv, spec, rope)
    cos, sin = rope if rope is not None else (None, None)
    return _qk_norm_rope_op(qkv, q_weight, q_bias, k_weight, k_bias, cos, sin, norm, float(eps))
