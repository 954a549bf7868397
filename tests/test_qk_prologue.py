"""The fused q/k prologue (vefast.ops.qk_prologue): per-head RMSNorm / LayerNorm / none + 2D RoPE, forward and
backward, against float64 (flash-attn rule: error <= 2x the error of the same eager computation in the input
dtype, plus a small floor); strided qkv as a Linear makes it, non-square and ragged token grids, with and
without norm parameters; outputs poisoned; bitwise-deterministic weight gradients; argument checks.

CPU lane: the kernels run under TRITON_INTERPRET=1. The prologue has no dots, so bf16 runs there, with one
interpreter artifact corrected (:func:`gpu_bf16_rounding`): Triton 3.6's interpreter truncates fp32 -> bf16
casts, where the GPU's ``cvt.rn.bf16.f32`` rounds to nearest even. gpu lane: the same tests on CUDA tensors
(``device`` fixture). Runtime on 2 CPU cores: ~25 s.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import triton
import triton.language as tl

from vefast.ops import qk_prologue as qp
from vefast.ops._common import interpret_mode
from vefast.ops.qk_prologue import QKNorm, qk_norm_rope, qk_norm_rope_reference
from vefast.ops.rope import rope_2d_freqs, rotate_half

from helpers import err_bound, needs_interpreter, poison_

HEAD_DIMS = (64, 72, 80, 96, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def gpu_bf16_rounding(monkeypatch):
    """Round the interpreter's fp32 -> bf16 casts to nearest even, as the GPU does (the interpreter truncates:
    ``InterpreterBuilder.cast_impl`` passes no rounding mode); nothing changes outside the interpreter."""
    if not interpret_mode():
        return
    from triton.runtime import interpreter as interp

    cast = interp.InterpreterBuilder.cast_impl

    def cast_rne(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16)
            return interp.TensorHandle(bits.numpy().view(np.uint16), dst_type.scalar)
        return cast(self, src, dst_type)
    monkeypatch.setattr(interp.InterpreterBuilder, "cast_impl", cast_rne)


@triton.jit
def _to_bf16_kernel(X, Y, N: tl.constexpr):
    tl.store(Y + tl.arange(0, N), tl.load(X + tl.arange(0, N)).to(tl.bfloat16))


def test_bf16_rounding_fixture_rounds_to_nearest_even(device):
    """With the fixture above a kernel's fp32 -> bf16 cast is torch's (round to nearest even, as on the GPU)."""
    x = torch.tensor([1 + 2**-8 + 2**-10, 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8 + 2**-10), 3.0, 1e-3, 0.0, -7.5],
                     device=device)
    y = torch.empty(8, dtype=torch.bfloat16, device=device)
    _to_bf16_kernel[(1,)](x, y, 8)
    assert torch.equal(y, x.to(torch.bfloat16))


def _linear_qkv(B, N, H, hd, dtype, device, seed=0):
    """qkv straight from a fused qkv Linear (with bias): its output viewed as (B, N, 3, H, hd)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(32, 3 * H * hd, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.5)
        lin.bias.copy_(torch.randn(lin.bias.shape, generator=g))
    x = torch.randn(B, N, 32, generator=g)
    qkv = lin(x).detach().view(B, N, 3, H, hd)
    return qkv.to(device=device, dtype=dtype).requires_grad_(True)


def _params(kind, hd, device, *, weight=True, bias=True, seed=1):
    """(q_weight, k_weight, q_bias, k_bias) float32 leaves for a norm kind (None where absent)."""
    g = torch.Generator().manual_seed(seed)
    w = weight and kind != "none"
    b = bias and kind == "layer"

    def leaf(on, base):
        return (torch.rand(hd, generator=g) + base).to(device).requires_grad_(True) if on else None
    return leaf(w, 0.5), leaf(w, 0.5), leaf(b, -0.5), leaf(b, -0.5)


def _run(fn, qkv, params, grads):
    """(q, k) of fn and the gradients of qkv and the present params for the output gradients ``grads``."""
    leaves = [qkv] + [p for p in params if p is not None]
    q, k = fn(qkv, *params)
    return (q, k), torch.autograd.grad((q, k), leaves, grads)


def _clone(t, dtype=None):
    return None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(True)


def _check(qkv, kind, params, rope, *, floor=1e-6):
    """The flash-attn rule for the outputs and every gradient, against the eager reference in qkv's dtype and
    in float64."""
    eps = 1e-6 if kind != "layer" else 1e-5

    def fused(x, qw, kw, qb, kb):
        return qk_norm_rope(x, norm=kind, q_weight=qw, k_weight=kw, q_bias=qb, k_bias=kb, rope=rope, eps=eps)

    def reference(x, qw, kw, qb, kb, tables=rope):
        return qk_norm_rope_reference(x, QKNorm(kind, qw, kw, qb, kb, eps), tables)

    torch.manual_seed(5)
    B, N, _three, H, hd = qkv.shape
    grads = (torch.randn(B, N, H, hd, device=qkv.device).to(qkv.dtype),
             torch.randn(B, N, H, hd, device=qkv.device).to(qkv.dtype))
    out, g = _run(fused, qkv, params, grads)
    e_out, e_g = _run(reference, _clone(qkv), [_clone(p) for p in params], grads)
    rope64 = tuple(t.double() for t in rope) if rope is not None else None
    r_out, r_g = _run(lambda *a: reference(*a, tables=rope64), _clone(qkv, torch.float64),
                      [_clone(p, torch.float64) for p in params], tuple(t.double() for t in grads))
    for got, eager, ref in zip((*out, *g), (*e_out, *e_g), (*r_out, *r_g)):
        assert got.dtype == eager.dtype and got.shape == eager.shape
        err_bound(got, eager, ref, floor=floor * max(1.0, ref.abs().max().item()))
    assert torch.equal(g[0][:, :, 2], torch.zeros_like(g[0][:, :, 2]))  # v is not an input of the prologue


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("hd", HEAD_DIMS)
def test_rms_rope_values_and_grads(hd, dtype, device):
    """LightningDiT's case: RMSNorm with weights + 2D RoPE, qkv from a Linear, 3 heads, a 2 x 3 token grid."""
    qkv = _linear_qkv(2, 6, 3, hd, dtype, device)
    _check(qkv, "rms", _params("rms", hd, device), rope_2d_freqs(hd, (2, 3), device=device))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("kind,weight,bias,use_rope", [
    ("layer", True, True, True),    # timm LayerNorm q/k norm (DiT / SiT qk_norm=True) + RoPE
    ("layer", True, True, False),   # DiT / SiT: no RoPE
    ("layer", False, False, True),  # non-affine LayerNorm
    ("layer", True, False, True),   # LayerNorm(bias=False)
    ("rms", False, False, True),    # RMSNorm without a weight
    ("rms", True, False, False),    # RMSNorm only
    ("none", False, False, True),   # RoPE only
])
def test_norm_variants(kind, weight, bias, use_rope, dtype, device):
    hd = 72
    qkv = _linear_qkv(2, 4, 2, hd, dtype, device, seed=2)
    rope = rope_2d_freqs(hd, 2, device=device) if use_rope else None
    _check(qkv, kind, _params(kind, hd, device, weight=weight, bias=bias), rope)


def test_ragged_and_non_contiguous_qkv(device):
    """N = 7 tokens with arbitrary tables (no grid), qkv a permuted view (slot-major memory) and a batch slice
    of a wider buffer: the kernels take the strides as they are."""
    hd, H = 64, 5
    g = torch.Generator().manual_seed(3)
    slot_major = torch.randn(4, 3, 7, H, hd, generator=g).to(device)
    qkv = slot_major.permute(0, 2, 1, 3, 4)[::2].detach().requires_grad_(True)
    assert not qkv.is_contiguous() and qkv.stride(-1) == 1
    angle = torch.rand(7, hd // 2, generator=g).repeat_interleave(2, dim=-1) * 6.0
    rope = (angle.cos().to(device), angle.sin().to(device))
    _check(qkv, "rms", _params("rms", hd, device), rope)
    _check(qkv, "layer", _params("layer", hd, device), rope)


def test_outputs_fully_written(device):
    """Every element of q, k, dqkv and the partials is written (NaN-poisoned before the launches)."""
    B, N, H, hd = 2, 5, 3, 72
    qkv = torch.randn(B, N, 3, H, hd, device=device)
    norm = QKNorm("layer", *(torch.rand(hd, device=device) for _ in range(4)), eps=1e-5)
    rope = rope_2d_freqs(hd, (1, 5), device=device)
    q, k = poison_(torch.empty(B, N, H, hd, device=device)), poison_(torch.empty(B, N, H, hd, device=device))
    qp.launch_fwd(qkv, norm, rope, q, k)
    assert torch.isfinite(q).all() and torch.isfinite(k).all()
    dqkv, part = qp.alloc_bwd(qkv, norm)
    poison_(dqkv), poison_(part)
    dq, dk, dv = (torch.randn(B, N, H, hd, device=device) for _ in range(3))
    qp.launch_bwd(dq, dk, dv, qkv, norm, rope, dqkv, part)
    assert torch.isfinite(dqkv).all() and torch.isfinite(part).all()
    assert torch.equal(dqkv[:, :, 2], dv)  # dv copied through into the v slice
    # heads_first: the (B, H, N, hd) views SDPA's backward returns give the same result
    dqkv2, part2 = qp.alloc_bwd(qkv, norm)
    qp.launch_bwd(*(t.transpose(1, 2).contiguous().transpose(1, 2).transpose(1, 2) for t in (dq, dk, dv)), qkv, norm,
                  rope, dqkv2, part2, heads_first=True)
    assert torch.equal(dqkv2, dqkv) and torch.equal(part2, part)


def test_weight_grads_bitwise_deterministic(device):
    """Same inputs, same bits: the weight gradients are per-program partials plus one fixed-order sum."""
    hd = 72
    qkv = _linear_qkv(2, 6, 3, hd, torch.float32, device, seed=4)  # 12 tokens: 12 programs' partials summed
    params = _params("layer", hd, device)
    grads = tuple(torch.randn(2, 6, 3, hd, device=device) for _ in range(2))
    rope = rope_2d_freqs(hd, (2, 3), device=device)

    def fused(x, qw, kw, qb, kb):
        return qk_norm_rope(x, norm="layer", q_weight=qw, k_weight=kw, q_bias=qb, k_bias=kb, rope=rope)

    runs = [_run(fused, qkv, params, grads)[1] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_reference_is_the_module_sequence():
    """The reference is LightningDiT's RMSNorm module / timm's nn.LayerNorm, then the rotary embedding."""

    class LDiTRMSNorm(nn.Module):  # LightningDiT models/rmsnorm.py
        def __init__(self, dim, eps=1e-6):
            super().__init__()
            self.eps, self.weight = eps, nn.Parameter(torch.rand(dim) + 0.5)

        def forward(self, x):
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight

    hd = 64
    qkv = torch.randn(2, 9, 3, 2, hd, dtype=torch.bfloat16)
    cos, sin = rope_2d_freqs(hd, 3)
    for kind, make in (("rms", LDiTRMSNorm), ("layer", nn.LayerNorm)):
        qn, kn = make(hd), make(hd)
        if kind == "layer":
            with torch.no_grad():
                for p in (*qn.parameters(), *kn.parameters()):
                    p.uniform_(-1, 1)
        q, k, _v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd), as the models do
        if kind == "layer":  # under autocast LayerNorm runs in float32, then the rotary embedding
            q, k = qn(q.float()), kn(k.float())
        else:
            q, k = qn(q), kn(k)
        want = [(t * cos + rotate_half(t) * sin).to(torch.bfloat16).transpose(1, 2) for t in (q, k)]
        spec = QKNorm(kind, qn.weight, kn.weight, getattr(qn, "bias", None), getattr(kn, "bias", None), qn.eps)
        got = qk_norm_rope_reference(qkv, spec, (cos, sin))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


def test_non_square_rope_tables():
    """grid=(rows, cols): token i * cols + j rotates its first half with row i, its second with column j; a square
    grid gives LightningDiT's tables (tests/test_rope.py checks those bitwise)."""
    hd = 8
    cos, sin = rope_2d_freqs(hd, (2, 3))
    assert cos.shape == sin.shape == (6, hd)
    rows, cols = rope_2d_freqs(hd, 2)[0], rope_2d_freqs(hd, 3)[0]  # square tables: row-major (i, j)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(cos[i * 3 + j, :4], rows[i * 2, :4])   # row angle of i (token (i, 0))
            torch.testing.assert_close(cos[i * 3 + j, 4:], cols[j, 4:])      # column angle of j (token (0, j))
    torch.testing.assert_close(rope_2d_freqs(hd, (3, 3))[1], rope_2d_freqs(hd, 3)[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="grid must be"):
        rope_2d_freqs(hd, (2, 0))


def test_vec_and_tiles():
    """The 16-byte divisibility proof of the launchers, and tiles that hold whole heads."""
    qkv = torch.empty(2, 4, 3, 16, 72, dtype=torch.bfloat16)
    assert qp._vec(2, *qp._qkv_views(qkv)) == 8
    assert qp._vec(4, *qp._qkv_views(qkv.float())) == 4
    odd = torch.empty(2 * 4 * 3 * 16 * 72 + 1, dtype=torch.bfloat16)[1:].view(2, 4, 3, 16, 72)
    assert qp._vec(2, *qp._qkv_views(odd)) == 1  # base pointer off by one element
    assert qp._vec(2, *qp._qkv_views(torch.empty(2, 4, 3, 3, 36, dtype=torch.bfloat16))) == 4  # rows of 72 bytes
    for H, hd in ((16, 72), (12, 64), (1, 128), (3, 80)):
        cfg = qp.tile_config(H, hd)
        assert cfg.block_d >= hd and cfg.block_h * cfg.block_d <= 1024 and cfg.block_h <= max(H, 1) * 2
        assert cfg.block_h * cfg.block_d // (32 * cfg.num_warps) == 8 or cfg.num_warps == 1  # values per thread
    assert qp.tile_config(16, 72) == (8, 128, 4) and qp.tile_config(12, 64) == (16, 64, 4)


def test_minimal_bytes():
    qkv = torch.empty(2, 4, 3, 2, 8, dtype=torch.bfloat16)
    unit = 2 * 4 * 2 * 8 * 2
    rope = rope_2d_freqs(8, 2)
    fwd, bwd = qp.minimal_bytes(qkv, QKNorm("rms", torch.ones(8), torch.ones(8)), rope)
    assert fwd == 4 * unit + 2 * 4 * 8 * 4 + 2 * 8 * 4 and bwd == fwd + 4 * unit


@needs_interpreter
def test_compile_fullgraph():
    torch._dynamo.reset()
    hd = 64
    qkv = torch.randn(2, 4, 3, 2, hd, requires_grad=True)
    w = torch.rand(hd, requires_grad=True)
    rope = rope_2d_freqs(hd, 2)

    def f(x, w):
        q, k = qk_norm_rope(x, q_weight=w, k_weight=w, rope=rope)
        return (q * k).sum()

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(qkv, w)
    want = f(qkv, w)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (qkv, w)), torch.autograd.grad(want, (qkv, w))):
        torch.testing.assert_close(a, b)


@pytest.mark.expect_fallback("qk_norm_rope:float64", "qk_norm_rope:cpu")
def test_fallbacks_are_reported(monkeypatch):
    """float64 and (outside the interpreter) CPU tensors run the reference, reported."""
    from vefast.ops._common import record_fallbacks

    qkv = torch.randn(1, 4, 3, 1, 8, dtype=torch.float64)
    with record_fallbacks() as events:
        q, k = qk_norm_rope(qkv, norm="none", rope=rope_2d_freqs(8, 2))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with record_fallbacks() as cpu_events:
        qk_norm_rope(qkv.float(), norm="none")
    assert [e.key for e in events] == ["qk_norm_rope:float64"] and q.dtype == torch.float64
    assert [e.key for e in cpu_events] == ["qk_norm_rope:cpu"]


def test_bad_inputs():
    qkv = torch.randn(1, 4, 3, 2, 8)
    w = torch.ones(8)
    with pytest.raises(ValueError, match=r"qkv must have shape \(B, N, 3, H, head_dim\)"):
        qk_norm_rope(qkv[:, :, :2])
    with pytest.raises(ValueError, match="norm must be one of"):
        qk_norm_rope(qkv, norm="batch")
    with pytest.raises(ValueError, match="both given or both None"):
        qk_norm_rope(qkv, q_weight=w)
    with pytest.raises(ValueError, match="RMSNorm takes no bias"):
        qk_norm_rope(qkv, q_weight=w, k_weight=w, q_bias=w, k_bias=w)
    with pytest.raises(ValueError, match="norm='none'"):
        qk_norm_rope(qkv, norm="none", q_weight=w, k_weight=w)
    with pytest.raises(ValueError, match=r"q_norm_weight must have shape \(head_dim,\)"):
        qk_norm_rope(qkv, q_weight=torch.ones(4), k_weight=torch.ones(4))
    with pytest.raises(ValueError, match="unit stride along head_dim"):
        qk_norm_rope(torch.randn(1, 4, 3, 2, 16)[..., ::2])
    with pytest.raises(ValueError, match=r"rope cos must have shape \(N, head_dim\)"):
        qk_norm_rope(qkv, rope=(torch.ones(3, 8), torch.ones(3, 8)))
    with pytest.raises(TypeError, match="rope must be a"):
        qk_norm_rope(qkv, rope=torch.ones(4, 8))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        qk_norm_rope(qkv, eps=-1.0)
    with pytest.raises(TypeError, match="qkv must have dtype in"):
        qk_norm_rope(qkv.long())
