"""vefast.ops.rope against a line-by-line re-implementation of LightningDiT's VisionRotaryEmbeddingFast.

einops is not installed: its ``rearrange``/``repeat`` calls are re-written with torch ops that do the
same index mapping (``'... n -> ... (n r)', r=2`` is repeat_interleave; ``'... (d r) -> ... d r'`` is
unflatten).
"""
from __future__ import annotations

import pytest
import torch

from vefast.ops.rope import apply_rope, rope_2d_freqs


def _broadcat(tensors, dim=-1):
    # LightningDiT's broadcat: expand every non-concatenated dim to the max, then cat.
    shape_len = tensors[0].dim()
    dim = (dim + shape_len) if dim < 0 else dim
    dims = list(zip(*(list(t.shape) for t in tensors)))
    expandable = [(i, val) for i, val in enumerate(dims) if i != dim]
    max_dims = [(i, max(val)) for i, val in expandable]
    expanded = [(i, (val,) * len(tensors)) for i, val in max_dims]
    expanded.insert(dim, (dim, dims[dim]))
    shapes = list(zip(*(v for _, v in expanded)))
    return torch.cat([t.expand(*s) for t, s in zip(tensors, shapes)], dim=dim)


def _rotate_half_ldit(x):
    x = x.unflatten(-1, (-1, 2))  # rearrange('... (d r) -> ... d r', r=2)
    x1, x2 = x.unbind(dim=-1)
    x = torch.stack((-x2, x1), dim=-1)
    return x.flatten(-2)  # rearrange('... d r -> ... (d r)')


class _VisionRotaryEmbeddingFast(torch.nn.Module):
    """LightningDiT models/rope.py, freqs_for='lang', einops replaced by torch ops."""

    def __init__(self, dim, pt_seq_len=16, ft_seq_len=None, theta=10000):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
        if ft_seq_len is None:
            ft_seq_len = pt_seq_len
        t = torch.arange(ft_seq_len) / ft_seq_len * pt_seq_len
        freqs = torch.einsum("..., f -> ... f", t, freqs)
        freqs = freqs.repeat_interleave(2, dim=-1)  # repeat('... n -> ... (n r)', r=2)
        freqs = _broadcat((freqs[:, None, :], freqs[None, :, :]), dim=-1)
        self.register_buffer("freqs_cos", freqs.cos().view(-1, freqs.shape[-1]))
        self.register_buffer("freqs_sin", freqs.sin().view(-1, freqs.shape[-1]))

    def forward(self, t):
        return t * self.freqs_cos + _rotate_half_ldit(t) * self.freqs_sin


@pytest.mark.parametrize("head_dim,grid", [(72, 16), (64, 16), (128, 8), (8, 3), (96, 7)])
def test_freqs_equal_lightningdit_buffers(head_dim, grid, device):
    ref = _VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=grid)
    cos, sin = rope_2d_freqs(head_dim, grid, device=device)
    assert cos.dtype == sin.dtype == torch.float32 and cos.device.type == device.type
    assert cos.shape == sin.shape == (grid * grid, head_dim)
    assert torch.equal(cos.cpu(), ref.freqs_cos) and torch.equal(sin.cpu(), ref.freqs_sin)


def test_freqs_theta_and_layout():
    cos, sin = rope_2d_freqs(8, 4, theta=100.0)
    # token n = i * grid + j: first half rotates with the row i, second half with the column j.
    i, j = 2, 3
    f = torch.tensor([1.0, 100.0 ** -0.5])
    ang = torch.cat([(i * f).repeat_interleave(2), (j * f).repeat_interleave(2)])
    torch.testing.assert_close(cos[i * 4 + j], ang.cos())
    torch.testing.assert_close(sin[i * 4 + j], ang.sin())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_apply_rope_matches_lightningdit(dtype, device):
    head_dim, grid = 72, 5
    ref = _VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=grid).to(device)
    cos, sin = rope_2d_freqs(head_dim, grid, device=device)
    x = torch.randn(2, 3, grid * grid, head_dim).to(device, dtype)
    expected = ref(x).to(dtype)  # LightningDiT: float32 math through the float32 tables, then q.to(v.dtype)
    out = apply_rope(x, cos, sin)
    assert out.dtype == dtype
    if dtype == torch.float64:
        # float64 x: our math stays in float64 (tables upcast), LightningDiT's too (type promotion).
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    else:
        assert torch.equal(out, expected)


def test_apply_rope_is_a_rotation_and_grad(device):
    cos, sin = rope_2d_freqs(16, 3, device=device)
    x = torch.randn(4, 9, 16, dtype=torch.float64, device=device, requires_grad=True)
    out = apply_rope(x, cos, sin)
    # each interleaved pair is rotated: norms preserved
    torch.testing.assert_close(out.unflatten(-1, (-1, 2)).norm(dim=-1), x.unflatten(-1, (-1, 2)).norm(dim=-1))
    xs = x[:1].detach().clone().requires_grad_(True)
    torch.autograd.gradcheck(lambda t: apply_rope(t, cos.double(), sin.double()), (xs,))


def test_bad_inputs():
    with pytest.raises(ValueError, match="head_dim must be a positive multiple of 4"):
        rope_2d_freqs(70, 4)
    with pytest.raises(ValueError, match="grid must be a positive int"):
        rope_2d_freqs(64, 0)
    with pytest.raises(TypeError, match="head_dim must be an int"):
        rope_2d_freqs(64.0, 4)
    with pytest.raises(ValueError, match="theta"):
        rope_2d_freqs(64, 4, theta=-1.0)
    cos, sin = rope_2d_freqs(8, 2)
    with pytest.raises(ValueError, match="cos must have shape"):
        apply_rope(torch.randn(3, 8), cos, sin)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        apply_rope([1.0], cos, sin)
