"""2D rotary position embedding of LightningDiT (EVA-02 style), eager.

LightningDiT (hustvl/LightningDiT, ``models/rope.py``) builds its rotary tables with
``VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=grid)``:

- ``f_j = theta ** (-2j / dim)`` for ``j < dim // 2`` (float32),
- ``t = arange(grid) / grid * grid`` (float32; equals ``arange(grid)`` up to rounding),
- per axis ``a_i = t_i * f`` with every frequency repeated twice (interleaved pairs),
- token ``(i, j)`` of the ``grid x grid`` map (row-major, ``n = i * grid + j``) gets the angles
  ``[a_i (dim values), a_j (dim values)]``, i.e. the first half of the head dimension rotates with
  the row index and the second half with the column index,
- ``cos`` / ``sin`` of those angles are the (grid*grid, head_dim) float32 buffers.

Application (``rotate_half`` on interleaved pairs, docs/math.md §7):
``out[2i] = x[2i] cos[2i] - x[2i+1] sin[2i]``, ``out[2i+1] = x[2i+1] cos[2i+1] + x[2i] sin[2i+1]``,
i.e. ``out = x * cos + rotate_half(x) * sin`` with ``rotate_half(x)[2i] = -x[2i+1]``,
``rotate_half(x)[2i+1] = x[2i]``.

Choice: :func:`apply_rope` computes in float32 (float64 for float64 inputs) and returns ``x``'s dtype,
which is what LightningDiT's attention ends with (its rope promotes a bf16 ``q`` to float32 through the
float32 tables, then ``q.to(v.dtype)`` before SDPA). The fused q/k prologue (:mod:`vefast.ops.qk_prologue`,
Triton) and the CUDA attention kernel apply the same formula.
"""
from __future__ import annotations

import torch

from ._common import check_int

__all__ = ["rope_2d_freqs", "apply_rope", "rotate_half"]


def rope_2d_freqs(head_dim: int, grid: int | tuple[int, int], *, theta: float = 10000.0,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (rows*cols, head_dim) float32. ``grid`` = n (a square n x n token map: LightningDiT's
    ``VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=n)`` buffers ``freqs_cos``/``freqs_sin``) or
    (rows, cols) for a non-square map (token ``i * cols + j``, the same per-axis angles)."""
    check_int("head_dim", head_dim, min_value=1)
    if head_dim % 4 != 0:
        raise ValueError(f"head_dim must be a positive multiple of 4 (two axes of rotated pairs), got {head_dim}")
    if isinstance(grid, tuple):
        if len(grid) != 2:
            raise ValueError(f"grid must be an int or a (rows, cols) pair, got {grid!r}")
        n_rows, n_cols = grid
    else:
        n_rows = n_cols = grid
    check_int("grid", n_rows, min_value=1)
    check_int("grid", n_cols, min_value=1)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0 or theta == float("inf"):
        raise ValueError(f"theta must be a finite positive number, got {theta!r}")
    dim = head_dim // 2
    # Same float32 operations, in the same order, as VisionRotaryEmbeddingFast.__init__.
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))

    def axis(n: int) -> torch.Tensor:  # (n, dim): angles of positions 0..n-1, pairs interleaved
        t = torch.arange(n) / n * n
        return (t[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)

    rows = axis(n_rows)[:, None, :].expand(n_rows, n_cols, dim)  # angle of the row index i
    cols = axis(n_cols)[None, :, :].expand(n_rows, n_cols, dim)  # angle of the column index j
    full = torch.cat([rows, cols], dim=-1).reshape(n_rows * n_cols, head_dim)
    return full.cos().to(device), full.sin().to(device)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotation: ``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)``."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for x (..., N, head_dim) and cos/sin (N, head_dim).

    Computed in float32 (float64 when ``x`` or the tables are float64), returned in ``x.dtype``.
    """
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (..., N, head_dim), got {tuple(x.shape)}")
    want = tuple(x.shape[-2:])
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape (N, head_dim) = {want}, got {tuple(t.shape)}")
    if x.shape[-1] % 2 != 0:
        raise ValueError(f"head_dim must be even, got {x.shape[-1]}")
    compute = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), torch.float32)
    xf = x.to(compute)
    out = xf * cos.to(compute) + rotate_half(xf) * sin.to(compute)
    return out.to(x.dtype)
