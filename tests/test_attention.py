"""vefast.attention and vefast.qk_norm_rope_attention: SDPA core + fused Triton q/k prologue, backend choice.

CPU lane (TRITON_INTERPRET=1): the default path -- the Triton prologue around torch's CPU SDPA kernels, called
explicitly -- against float64 (flash-attn rule), RMSNorm / LayerNorm / none, with the fused path spied on and
no fallback reported; LightningDiT and timm (DiT / SiT qk_norm) equivalence; the op count of a forward +
backward; the eager fallback outside the interpreter and for float64 (reported); fake implementations and
torch.compile(fullgraph=True); the backend choice ("auto" is SDPA without a measurement, the table's schema
and lookup, the unvalidated-"cuda" warning); the extension's registration and C++ argument checks.
gpu lane: the same on CUDA tensors at real sizes, each SDPA backend, no copies around the kernels, bitwise
repeatable backwards with deterministic=True, "auto" = SDPA, and the CUDA kernel (backend="cuda").
Runtime on 2 CPU cores: ~35 s.
"""
from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

import vefast
from vefast import _ext
from vefast.ops import _common
from vefast.ops import attention as att
from vefast.ops import qk_prologue as qp
from vefast.ops._common import record_fallbacks
from vefast.ops.attention import (attention, attention_reference, qk_norm_rope_attention,
                                  qk_norm_rope_attention_reference)
from vefast.ops.rope import rope_2d_freqs, rotate_half

from helpers import err_bound, needs_interpreter, strided
from test_qk_prologue import gpu_bf16_rounding  # noqa: F401  (autouse: the GPU's bf16 rounding in the interpreter)

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
# Relative floor of the flash-attn rule: one rounding of the dtype. The bf16 / fp16 gradients of the whole
# attention are chaotic in the rounding of q and k (an ulp of q moves dq by an ulp of its own scale), so two
# equally good implementations differ from float64 by comparable, independent amounts.
FLOOR = {torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-8}
CORE_PREFIXES = ("_scaled_dot_product_", "_flash_attention", "_efficient_attention", "_cudnn_attention",
                 "_fused_sdp_choice")


def _assert_close(x, ref, dtype, what):
    err = (x.double() - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1.0)
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3e} > {TOL[dtype] * scale:.3e}"


@contextlib.contextmanager
def spy_prologue():
    """Count the Triton prologue launches (forward, backward) of the fused path."""
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = qp.launch_fwd, qp.launch_bwd

    def f(*a, **k):
        calls["fwd"] += 1
        return fwd(*a, **k)

    def b(*a, **k):
        calls["bwd"] += 1
        return bwd(*a, **k)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qp, "launch_fwd", f)
        mp.setattr(qp, "launch_bwd", b)
        yield calls


def _module_params(kind, hd, device):
    """(q_weight, k_weight, q_bias, k_bias) float32 leaves of a q/k norm kind."""
    g = torch.Generator().manual_seed(hd)
    if kind == "none":
        return None, None, None, None
    ws = [(torch.rand(hd, generator=g) + 0.5).to(device).requires_grad_(True) for _ in range(2)]
    bs = [None, None]
    if kind == "layer":
        bs = [torch.randn(hd, generator=g).to(device).requires_grad_(True) for _ in range(2)]
    return ws[0], ws[1], bs[0], bs[1]


def _eager(qkv, q_norm_weight, k_norm_weight, rope, *, norm, q_norm_bias, k_norm_bias, eps):
    """The same computation in eager torch, in qkv's dtype: the reference prologue, then SDPA (what the
    eager fallback runs)."""
    spec = qp.QKNorm(norm, q_norm_weight, k_norm_weight, q_norm_bias, k_norm_bias, eps)
    q, k = qp.qk_norm_rope_reference(qkv, spec, rope)
    return att._sdpa_native(q, k, qkv[:, :, 2], qkv.shape[-1] ** -0.5)


def _fused_vs_float64(qkv, kind, params, rope, floor):
    """Output and gradients of qk_norm_rope_attention against the float64 reference (flash-attn rule, the eager
    computation in qkv's dtype as the comparison)."""
    qw, kw, qb, kb = params
    eps = 1e-5 if kind == "layer" else 1e-6

    def run(x, *ps, tables=rope, fn=qk_norm_rope_attention):
        it = iter(ps)
        w = [next(it) if p is not None else None for p in params]
        return fn(x, w[0], w[1], tables, norm=kind, q_norm_bias=w[2], k_norm_bias=w[3], eps=eps)

    leaves = [qkv] + [p for p in params if p is not None]
    torch.manual_seed(11)
    out = run(*leaves)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    e_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    e_out = run(*e_leaves, fn=_eager)
    e_grads = torch.autograd.grad(e_out, e_leaves, dout)
    r_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    rope64 = tuple(t.double() for t in rope) if rope is not None else None
    r_out = run(*r_leaves, tables=rope64, fn=qk_norm_rope_attention_reference)
    r_grads = torch.autograd.grad(r_out, r_leaves, dout.double())
    assert out.shape == qkv[:, :, 0].shape and out.dtype == qkv.dtype
    for got, eager, ref in zip((out, *grads), (e_out, *e_grads), (r_out, *r_grads)):
        assert got.dtype == eager.dtype
        err_bound(got, eager, ref, floor=floor * max(1.0, ref.abs().max().item()))


# ---------------------------------------------------------------------------------------------------------
# The default path on CPU tensors (interpreter): Triton prologue + torch's CPU SDPA kernels.

@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("kind,hd", [("rms", 72), ("rms", 64), ("layer", 80), ("none", 128), ("layer", 96)])
def test_default_path_vs_float64(kind, hd, dtype):
    B, H = 2, 3
    rope = rope_2d_freqs(hd, (2, 3))
    qkv = torch.randn(B, 6, 3, H, hd).to(dtype).requires_grad_(True)
    with spy_prologue() as calls, record_fallbacks() as events:
        _fused_vs_float64(qkv, kind, _module_params(kind, hd, "cpu"), rope, floor=FLOOR[dtype])
    assert calls == {"fwd": 1, "bwd": 1}, "the fused prologue did not run"
    assert not events, [e.key for e in events]


@needs_interpreter
def test_default_path_without_rope_and_strided():
    """Norm only (no RoPE), qkv a non-contiguous view (slot-major memory), weights without biases."""
    hd = 64
    qkv = torch.randn(2, 3, 5, 2, hd).permute(0, 2, 1, 3, 4).detach().requires_grad_(True)
    assert not qkv.is_contiguous()
    qw, kw, _, _ = _module_params("rms", hd, "cpu")
    with spy_prologue() as calls:
        _fused_vs_float64(qkv, "rms", (qw, kw, None, None), None, floor=1e-6)
        _fused_vs_float64(qkv, "layer", (qw, kw, None, None), None, floor=1e-6)
    assert calls == {"fwd": 2, "bwd": 2}


class _LDiTRMSNorm(nn.Module):
    """LightningDiT's RMSNorm (models/rmsnorm.py), verbatim in behavior."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        return self._norm(x.float()).type_as(x) * self.weight


def _module_attention(qkv, qn, kn, cos, sin):
    """LightningDiT / timm Attention.forward from the qkv projection on: permute, q/k norm, rope, cast, SDPA."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd)
    if qn is not None:
        q, k = qn(q), kn(k)
    if cos is not None:
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
    q, k = q.to(v.dtype), k.to(v.dtype)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("kind,use_rope", [("rms", True), ("rms", False), ("layer", True), ("layer", False),
                                           ("none", True)])
def test_matches_the_modules(kind, use_rope, dtype):
    """LightningDiT's RMSNorm and timm's nn.LayerNorm q/k norms (with RoPE for LightningDiT), on the fused path."""
    B, grid, H, hd = 2, 3, 2, 72
    qkv = torch.randn(B, grid * grid, 3, H, hd).to(dtype)
    qn = kn = None
    if kind != "none":
        qn, kn = (_LDiTRMSNorm(hd), _LDiTRMSNorm(hd)) if kind == "rms" else (nn.LayerNorm(hd), nn.LayerNorm(hd))
        with torch.no_grad():
            for p in (*qn.parameters(), *kn.parameters()):
                p.uniform_(0.5, 1.5)
    cos, sin = rope_2d_freqs(hd, grid) if use_rope else (None, None)
    if kind == "layer":  # LayerNorm on bf16 activations runs under autocast in float32 (and so does our kernel)
        expected = _module_attention(qkv.float(), qn, kn, cos, sin).to(dtype)
    else:
        expected = _module_attention(qkv, qn, kn, cos, sin)
    with spy_prologue() as calls:
        out = qk_norm_rope_attention(qkv, getattr(qn, "weight", None), getattr(kn, "weight", None),
                                     (cos, sin) if use_rope else None, norm=kind, q_norm_bias=getattr(qn, "bias", None),
                                     k_norm_bias=getattr(kn, "bias", None), eps=qn.eps if qn is not None else 1e-6)
    assert calls["fwd"] == (1 if kind != "none" or use_rope else 0)
    torch.testing.assert_close(out, expected.detach(), rtol=TOL[dtype], atol=TOL[dtype])


class _OpCounter(TorchDispatchMode):
    """The outermost aten ops of a call, vefast custom ops looked into; SDPA core ops and everything inside a
    Triton launch (the interpreter's own copies) are kept apart."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.core: list[str] = []
        self.launches = 0
        self._in_launch = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._in_launch:
            return func(*args, **kwargs)
        opdef = OPDEFS.get(func._schema.name) if func.namespace == "vefast" else None
        if opdef is not None:
            with self:
                return (opdef._backend_fns.get("cpu") or opdef._init_fn)(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        (self.core if name.startswith(CORE_PREFIXES) else self.ops).append(name)
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def launches_apart(self):
        from triton.runtime import interpreter as interp

        call = interp.GridExecutor.__call__

        def counted(executor, *a, **k):
            self.launches += 1
            self._in_launch += 1
            try:
                return call(executor, *a, **k)
            finally:
                self._in_launch -= 1
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(interp.GridExecutor, "__call__", counted)
            yield


@needs_interpreter
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_op_count_of_forward_and_backward(kind):
    """One forward + backward of LightningDiT's attention core runs <= 12 outermost aten ops besides the SDPA
    calls and the Triton launches (views, allocations, autograd's detaches and the weight-gradient sum
    included). The eager code it replaces runs ~250 (issue 10)."""
    hd, grid = 64, 4
    qkv = torch.randn(2, grid * grid, 3, 2, hd, requires_grad=True)
    qw, kw, qb, kb = _module_params(kind, hd, "cpu")
    rope = rope_2d_freqs(hd, grid)
    dout = torch.randn(2, grid * grid, 2, hd)
    leaves = [t for t in (qkv, qw, kw, qb, kb) if t is not None]
    counter = _OpCounter()
    with counter.launches_apart(), counter:
        out = qk_norm_rope_attention(qkv, qw, kw, rope, norm=kind, q_norm_bias=qb, k_norm_bias=kb)
        torch.autograd.grad(out, leaves, dout)
    assert counter.launches == 2  # the prologue forward and backward
    assert [c for c in counter.core if not c.startswith("_fused")] == [
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"]
    assert len(counter.ops) <= 12, counter.ops  # see docs/attention.md ("Op count")
    assert not any(op in ("copy_", "clone", "cat", "stack", "mul", "add", "sub", "pow", "mean", "rsqrt", "to",
                          "_to_copy") for op in counter.ops), counter.ops


@pytest.mark.expect_fallback("qk_norm_rope_attention:cpu")
def test_eager_fallback_outside_the_interpreter(monkeypatch):
    """CPU tensors without the interpreter run the eager reference prologue + SDPA, reported."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hd, grid = 64, 3
    qkv = torch.randn(2, grid * grid, 3, 2, hd, requires_grad=True)
    qn, kn = _LDiTRMSNorm(hd), _LDiTRMSNorm(hd)
    cos, sin = rope_2d_freqs(hd, grid)
    with spy_prologue() as calls, record_fallbacks() as events:
        out = qk_norm_rope_attention(qkv, qn.weight, kn.weight, (cos, sin))
    assert calls["fwd"] == 0 and [e.key for e in events] == ["qk_norm_rope_attention:cpu"]
    torch.testing.assert_close(out, _module_attention(qkv, qn, kn, cos, sin).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.expect_fallback("qk_norm_rope_attention:float64")
def test_float64_runs_the_reference():
    hd, grid = 64, 2
    qkv = torch.randn(1, grid * grid, 3, 2, hd, dtype=torch.float64, requires_grad=True)
    w = torch.rand(hd, dtype=torch.float64) + 0.5
    rope = tuple(t.double() for t in rope_2d_freqs(hd, grid))
    with record_fallbacks() as events:
        out = qk_norm_rope_attention(qkv, w, w, rope)
    assert [e.key for e in events] == ["qk_norm_rope_attention:float64"] and out.dtype == torch.float64
    torch.testing.assert_close(out, qk_norm_rope_attention_reference(qkv, w, w, rope), rtol=1e-12, atol=1e-12)


def test_reference_is_the_formula_in_float64():
    B, grid, H, hd = 1, 4, 2, 64
    qkv = torch.randn(B, grid * grid, 3, H, hd, dtype=torch.float64)
    qw, kw = torch.rand(hd, dtype=torch.float64) + 0.5, torch.rand(hd, dtype=torch.float64) + 0.5
    cos, sin = (t.double() for t in rope_2d_freqs(hd, grid))
    q, k, v = qkv.unbind(2)

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def rope(x):
        return x * cos[:, None] + rotate_half(x) * sin[:, None]

    expected = attention_reference(rope(norm(q, qw)), rope(norm(k, kw)), v)
    torch.testing.assert_close(qk_norm_rope_attention_reference(qkv, qw, kw, (cos, sin)), expected)


# ---------------------------------------------------------------------------------------------------------
# Plain attention (SDPA) and the explicit SDPA op.

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("B,N,H,hd", [(2, 17, 3, 64), (1, 1, 2, 72), (2, 33, 1, 48)])
def test_attention_values_and_grads(B, N, H, hd, dtype):
    base = torch.randn(B, N, 3, H, hd).to(dtype).requires_grad_(True)
    q, k, v = base.unbind(2)  # views into a fused qkv tensor
    out = attention(q, k, v)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = attention_reference(*leaves)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    assert out.dtype == dtype and out.shape == (B, N, H, hd) and out.is_contiguous()
    _assert_close(out, ref, dtype, "out")
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        _assert_close(g, r, dtype, name)


def test_attention_custom_scale_and_strided():
    q, k, v = (strided(torch.randn(2, 9, 2, 64)) for _ in range(3))
    out = attention(q, k, v, scale=0.3)
    _assert_close(out, attention_reference(q.double(), k.double(), v.double(), 0.3), torch.float32, "out")
    qh, kh, vh = (t.double().transpose(1, 2) for t in (q, k, v))
    direct = (torch.softmax(0.3 * qh @ kh.transpose(-1, -2), -1) @ vh).transpose(1, 2)
    torch.testing.assert_close(attention_reference(q.double(), k.double(), v.double(), 0.3), direct)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_explicit_sdpa_op(dtype):
    """vefast::sdpa (the deterministic path of vefast.attention on CUDA) runs torch's kernels explicitly: same
    values and gradients as F.scaled_dot_product_attention, canonical layouts, bitwise repeatable."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 13, 3, 2, 64).to(dtype)
    q_t, k_t, v_t = (t.transpose(1, 2).detach().requires_grad_(True) for t in qkv.unbind(2))
    dout_t = torch.randn(2, 2, 13, 64).to(dtype)
    runs = []
    for _ in range(2):
        out_t, lse = att._sdpa_op(q_t, k_t, v_t, 0.125, att.sdp_enabled_mask(), True)
        runs.append((out_t, *torch.autograd.grad(out_t, (q_t, k_t, v_t), dout_t)))
    ref = F.scaled_dot_product_attention(q_t, k_t, v_t, scale=0.125)
    ref_grads = torch.autograd.grad(ref, (q_t, k_t, v_t), dout_t)
    for got, want in zip(runs[0], (ref, *ref_grads)):
        torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])
        assert got.transpose(1, 2).is_contiguous()  # (B, N, H, hd) memory
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert lse.shape == (2, 2, 13) and lse.dtype == torch.float32


@pytest.mark.expect_fallback("attention:sdpa-math")
def test_math_backend_when_fused_ones_are_disabled():
    """Inside sdpa_kernel(MATH) the explicit math forward / backward run (reported), with the same results."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q_t, k_t, v_t = (torch.randn(1, 2, 5, 64, requires_grad=True) for _ in range(3))
    with sdpa_kernel(SDPBackend.MATH), record_fallbacks() as events:
        out_t, _lse = att._sdpa_op(q_t, k_t, v_t, 0.125, att.sdp_enabled_mask(), False)
        grads = torch.autograd.grad(out_t.sum(), (q_t, k_t, v_t))
    ref = F.scaled_dot_product_attention(q_t, k_t, v_t, scale=0.125)
    for got, want in zip((out_t, *grads), (ref, *torch.autograd.grad(ref.sum(), (q_t, k_t, v_t)))):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    assert [e.key for e in events] == ["attention:sdpa-math"]


def test_deterministic_backward_choice():
    """Without torch's deterministic mode, a deterministic CUDA backward is the memory-efficient kernel with one
    key split, else the explicit math backward."""
    assert att.deterministic_backward(True) == ("efficient", 1)
    assert att.deterministic_backward(False) == ("math", None)


@needs_interpreter
def test_deterministic_flag_is_bitwise_repeatable_on_cpu():
    hd = 64
    qkv = torch.randn(2, 9, 3, 2, hd, requires_grad=True)
    w = torch.rand(hd, requires_grad=True)
    rope = rope_2d_freqs(hd, 3)
    dout = torch.randn(2, 9, 2, hd)
    runs = [torch.autograd.grad(qk_norm_rope_attention(qkv, w, w, rope, deterministic=True), (qkv, w), dout)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# Fake implementations, torch.compile.

def test_fake_shapes_on_meta():
    q = torch.empty(2, 17, 3, 72, device="meta", dtype=torch.bfloat16)
    out, lse = torch.ops.vefast.attention_fwd(q, q, q, 0.1, False)
    assert out.shape == (2, 17, 3, 72) and out.dtype == torch.bfloat16 and out.device.type == "meta"
    assert lse.shape == (2, 3, 17) and lse.dtype == torch.float32
    dq, dk, dv = torch.ops.vefast.attention_bwd(out, q, q, q, out, lse, 0.1, True)
    assert dq.shape == dk.shape == dv.shape == q.shape
    qkv = torch.empty(2, 17, 3, 3, 72, device="meta", dtype=torch.float16)
    w = torch.empty(72, device="meta")
    out, lse = torch.ops.vefast.qk_norm_rope_attention_fwd(qkv, w, None, None, None, 1e-6, 0.1, False)
    assert out.shape == (2, 17, 3, 72) and lse.shape == (2, 3, 17)
    dqkv, dqw, dkw = torch.ops.vefast.qk_norm_rope_attention_bwd(out, qkv, w, None, None, None, out, lse, 1e-6, 0.1,
                                                                 False)
    assert dqkv.shape == qkv.shape and dqw.shape == (72,) and dkw.numel() == 0
    out_t, q_t, k_t, lse = torch.ops.vefast.qk_norm_rope_sdpa(qkv, w, None, w, None, None, None, "rms", 1e-6, 0.1, 15,
                                                              False)
    assert out_t.shape == q_t.shape == k_t.shape == (2, 3, 17, 72) and lse.shape == (2, 3, 17)
    assert out_t.transpose(1, 2).is_contiguous() and q_t.transpose(1, 2).is_contiguous()
    dqkv, part = torch.ops.vefast.qk_norm_rope_sdpa_backward(out_t, qkv, w, None, w, None, None, None, out_t, q_t, k_t,
                                                             lse, "rms", 1e-6, 0.1, 15, False)
    assert dqkv.shape == qkv.shape and dqkv.is_contiguous() and part.shape[1:] == (2, 72)  # dqw, dkw partials


@needs_interpreter
def test_torch_compile_fullgraph_cpu():
    torch._dynamo.reset()
    hd, grid = 64, 2

    def block(qkv, qw, kw, qb, cos, sin):
        q, k, v = qkv.unbind(2)
        a = attention(q, k, v)
        b = qk_norm_rope_attention(qkv, qw, kw, (cos, sin))
        c = qk_norm_rope_attention(qkv, qw, kw, None, norm="layer", q_norm_bias=qb, k_norm_bias=qb, deterministic=True)
        return (a.float() * b.float() + c).sum()

    qkv = torch.randn(2, grid * grid, 3, 2, hd, requires_grad=True)
    qw, kw, qb = (f(hd).requires_grad_(True) for f in (torch.ones, torch.rand, torch.randn))
    cos, sin = rope_2d_freqs(hd, grid)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = compiled(qkv, qw, kw, qb, cos, sin)
    g_got = torch.autograd.grad(got, (qkv, qw, kw, qb))
    want = block(qkv, qw, kw, qb, cos, sin)
    g_want = torch.autograd.grad(want, (qkv, qw, kw, qb))
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------------
# Backend choice.

def test_shipped_table_parses_and_is_empty_until_measured():
    table = att.attention_table()
    assert table["schema"] == att.TABLE_SCHEMA and isinstance(table["entries"], list)
    assert table["entries"] == []  # no GPU measurement exists yet: "auto" is SDPA everywhere
    with pytest.raises(ValueError, match="schema"):
        att.parse_table({"schema": 0, "entries": []})
    with pytest.raises(ValueError, match="lacks"):
        att.parse_table({"schema": 1, "entries": [{"arch": "sm_90"}]})


def _entry(**over):
    e = {"arch": "sm_90", "head_dim": 72, "dtype": "bfloat16", "qk_norm": "rms", "seq_min": 1, "seq_max": 512,
         "backend": "cuda", "validated": True, "speedup_vs_best_sdpa": 1.2, "best_sdpa_backend": "cudnn",
         "batch": [32, 256], "heads": [16], "device": "NVIDIA H200"}
    return {**e, **over}


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device on which the CUDA kernel could run (sm_90), and a settable table."""
    tables = {"table": {"schema": 1, "entries": []}}
    monkeypatch.setattr(att, "_cuda_unavailable", lambda *a: "")
    monkeypatch.setattr(att, "_arch", lambda index: "sm_90")
    monkeypatch.setattr(att, "attention_table", lambda: tables["table"])
    return tables


def _resolve(backend="auto", hd=72, dtype=torch.bfloat16, norm="rms", n=256):
    return att._resolve_backend(backend, "cuda", 0, hd, dtype, norm, n, "qk_norm_rope_attention")


def test_auto_is_sdpa_without_a_measurement(fake_gpu):
    assert _resolve() == "sdpa"
    assert _resolve(backend="sdpa") == "sdpa"
    assert att.table_choice("sm_90", 72, torch.bfloat16, "rms", 256)[1].startswith("no measurement for sm_90")


def test_auto_follows_the_table(fake_gpu):
    fake_gpu["table"] = att.parse_table({"schema": 1, "entries": [
        _entry(), _entry(qk_norm="none", backend="sdpa"), _entry(head_dim=64, validated=False)]})
    assert _resolve() == "cuda" and _resolve(n=512) == "cuda"
    assert _resolve(n=513) == "sdpa"  # outside the measured range
    assert _resolve(norm="none") == "sdpa"  # measured: SDPA faster
    assert _resolve(hd=64) == "sdpa"  # faster but never validated
    assert _resolve(dtype=torch.float16) == "sdpa"  # not measured
    assert "1.20x faster than SDPA (cudnn)" in att.table_choice("sm_90", 72, torch.bfloat16, "rms", 256)[1]


@pytest.mark.expect_fallback("qk_norm_rope_attention:cuda-unvalidated*")
def test_unvalidated_cuda_backend_warns_once(fake_gpu):
    _common._reported.pop("qk_norm_rope_attention:cuda-unvalidated:sm_90", None)
    with pytest.warns(RuntimeWarning, match="never validated on sm_90"):
        assert _resolve(backend="cuda") == "cuda"
    fake_gpu["table"] = {"schema": 1, "entries": [_entry(arch="sm_90")]}
    with record_fallbacks() as events:
        assert _resolve(backend="cuda") == "cuda"
    assert not events  # validated on this arch now


@pytest.mark.expect_fallback("attention:cuda:*")
def test_cuda_backend_on_cpu_runs_sdpa_reported():
    q = torch.randn(1, 4, 1, 64)
    with record_fallbacks() as events:
        out = attention(q, q, q, backend="cuda")
    assert [e.key for e in events] == ["attention:cuda:cpu tensors (the CUDA kernel is CUDA-only)"]
    torch.testing.assert_close(out, attention_reference(q, q, q))


def test_attention_backends_and_info():
    rows = att.attention_backends("cpu")
    assert [r["head_dim"] for r in rows] == list(att.SUPPORTED_HEAD_DIMS)
    assert all(r["backend"] == "sdpa" for r in rows)
    report = vefast.info(verbose=False)
    assert report["attention"] and all("reason" in r for r in report["attention"])
    assert "attention" in vefast._info.format_info(report)


def test_table_generator_round_trip(tmp_path):
    """benchmarks/attention_table.py turns benchmark rows into table entries that resolve as measured."""
    from benchmarks.attention_table import build_table

    rows = []
    for n, cuda_ms in ((256, 1.0), (1024, 3.0)):
        common = dict(name="attention_block", mode="both", arch="sm_90", device="NVIDIA H200", hd=72, dtype="bfloat16",
                      qk_norm="rms", N=n, B=32, H=16)
        rows += [{**common, "variant": "vefast_cuda", "ms": cuda_ms, "max_err_vs_sdpa": 1e-3, "validated": True},
                 {**common, "variant": "vefast_sdpa_cudnn", "ms": 1.5},
                 {**common, "variant": "vefast_sdpa_flash", "ms": 2.0}]
    (tmp_path / "attention_block.json").write_text(json.dumps({"environment": {"commit": "abc"}, "results": rows}))
    table = att.parse_table(build_table(tmp_path))
    [fast, slow] = sorted(table["entries"], key=lambda e: e["seq_min"])
    assert fast["backend"] == "cuda" and fast["seq_min"] <= 256 <= fast["seq_max"] < 1024
    assert slow["backend"] == "sdpa" and slow["seq_min"] <= 1024 <= slow["seq_max"]
    assert fast["best_sdpa_backend"] == "cudnn" and fast["speedup_vs_best_sdpa"] == pytest.approx(1.5)
    assert fast["batch"] == [32] and fast["heads"] == [16] and fast["validated"]


def test_table_compares_each_heads_count_within_itself(tmp_path):
    """CUDA faster at H = 12 but slower at H = 16 (same B, N): the kernel must not win by comparing its H = 12
    time with SDPA's H = 16 time."""
    from benchmarks.attention_table import build_table

    common = dict(name="attention_block", mode="both", arch="sm_90", device="NVIDIA H200", hd=72, dtype="bfloat16",
                  qk_norm="rms", N=256, B=32)
    rows = [{**common, "H": 12, "variant": "vefast_cuda", "ms": 1.0, "validated": True},
            {**common, "H": 12, "variant": "vefast_sdpa_cudnn", "ms": 1.5},
            {**common, "H": 16, "variant": "vefast_cuda", "ms": 2.0, "validated": True},
            {**common, "H": 16, "variant": "vefast_sdpa_cudnn", "ms": 1.2}]
    (tmp_path / "attention_block.json").write_text(json.dumps({"environment": {"commit": "abc"}, "results": rows}))
    [entry] = att.parse_table(build_table(tmp_path))["entries"]
    assert entry["backend"] == "sdpa" and entry["speedup_vs_best_sdpa"] == pytest.approx(0.6)


@needs_interpreter
@pytest.mark.slow
def test_block_benchmark_dry_run():
    """benchmarks/gpu_attention_block.py runs end to end at tiny CPU sizes (its GPU run is one call away)."""
    from benchmarks import gpu_attention_block as bench

    rows = bench.dry_run()
    assert not [r for r in rows if "error" in r]
    modes = {(r["variant"], r["mode"]) for r in rows if r["name"] == "attention_block"}
    assert {("vefast", m) for m in ("fwd", "bwd", "both")} <= modes and ("eager_default", "both") in modes
    assert {r["name"] for r in rows} >= {"prologue_fwd", "prologue_bwd"}


# ---------------------------------------------------------------------------------------------------------
# The extension: registration and C++ argument checks (on CPU tensors: the first check must fire).

def _ext_or_skip():
    if _ext.build_info() is None:
        pytest.skip("vefast._C was not built (VEFAST_SKIP_CUDA_BUILD=1 or no nvcc)")
    return _ext.load()  # built: it must load (raises ExtensionUnavailable with the reason otherwise)


def test_extension_registers_attention():
    C = _ext_or_skip()
    assert callable(C.attention_fwd) and callable(C.attention_bwd)


def test_cpp_checks_raise_on_cpu_tensors():
    C = _ext_or_skip()
    q = torch.randn(1, 4, 1, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="q must be a CUDA tensor"):
        C.attention_fwd(q, q, q, 0.125)
    g = torch.empty_like(q)
    lse = torch.empty(1, 1, 4)
    with pytest.raises(RuntimeError, match="q must be a CUDA tensor"):
        C.attention_bwd(q, q, q, q, q, lse, g, g, g, 0.125)
    with pytest.raises(RuntimeError, match="q must be a CUDA tensor"):
        C.attention_fwd(q, q, q, 0.125, torch.ones(64), None, None, None, 1e-6)


def test_cuda_ops_refuse_cpu_tensors():
    q = torch.randn(1, 4, 1, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="backend 'cuda'.*cannot run"):
        torch.ops.vefast.attention_fwd(q, q, q, 0.125, False)


def test_device_support_is_probed_per_gpu(monkeypatch):
    """Pre-sm_80 GPUs and GPUs without an image in vefast._C cannot take backend 'cuda'."""

    class NoImage:
        def probe_arch(self, index):
            raise RuntimeError("no kernel image is available for execution on the device")

    class Fine:
        def probe_arch(self, index):
            return 90

    att._device_unsupported.cache_clear()
    try:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5))
        assert "compute capability 7.5" in att._device_unsupported(0)
        att._device_unsupported.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (12, 0))
        monkeypatch.setattr(_ext, "load", lambda: NoImage())
        reason = att._device_unsupported(0)
        assert "no kernel image for this GPU (sm_120" in reason and "VEFAST_CUDA_ARCHS" in reason
        att._device_unsupported.cache_clear()
        monkeypatch.setattr(_ext, "load", lambda: Fine())
        assert att._device_unsupported(0) == ""
    finally:
        att._device_unsupported.cache_clear()


# ---------------------------------------------------------------------------------------------------------
# Python argument checks.

def test_bad_inputs_attention():
    q = torch.randn(1, 4, 2, 64)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        attention([1.0], q, q)
    with pytest.raises(ValueError, match=r"q must have shape \(B, N, H, head_dim\)"):
        attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="k must have the shape of q"):
        attention(q, q[:, :3], q)
    with pytest.raises(TypeError, match="v must have the dtype of q"):
        attention(q, q, q.double())
    with pytest.raises(TypeError, match="k must have dtype in"):
        attention(q, q.long(), q)
    with pytest.raises(ValueError, match="scale must be > 0"):
        attention(q, q, q, scale=0.0)
    with pytest.raises(ValueError, match="scale must be finite"):
        attention(q, q, q, scale=float("nan"))
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        attention(q, q, q, deterministic=1)
    with pytest.raises(ValueError, match="B, N, H, head_dim >= 1"):
        attention(q[:, :0], q[:, :0], q[:, :0])
    with pytest.raises(ValueError, match="backend must be one of"):
        attention(q, q, q, backend="flash")


def test_bad_inputs_qk_norm_rope():
    qkv = torch.randn(1, 4, 3, 2, 64)
    cos, sin = rope_2d_freqs(64, 2)
    with pytest.raises(ValueError, match=r"qkv must have shape \(B, N, 3, H, head_dim\)"):
        qk_norm_rope_attention(qkv[:, :, :2], None, None, None)
    with pytest.raises(ValueError, match=r"q_norm_weight must have shape \(head_dim,\)"):
        qk_norm_rope_attention(qkv, torch.ones(32), torch.ones(32), None)
    with pytest.raises(ValueError, match="both given or both None"):
        qk_norm_rope_attention(qkv, torch.ones(64), None, None)
    with pytest.raises(TypeError, match="k_norm_weight must be a torch.Tensor"):
        qk_norm_rope_attention(qkv, torch.ones(64), 1.0, None)
    with pytest.raises(TypeError, match="rope must be a"):
        qk_norm_rope_attention(qkv, None, None, cos)
    with pytest.raises(ValueError, match=r"rope cos must have shape \(N, head_dim\)"):
        qk_norm_rope_attention(qkv, None, None, (cos[:3], sin))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        qk_norm_rope_attention(qkv, None, None, None, eps=-1.0)
    with pytest.raises(ValueError, match="qkv must have shape"):
        qk_norm_rope_attention(torch.randn(4, 3, 2, 64), None, None, None)
    with pytest.raises(ValueError, match="backend must be one of"):
        qk_norm_rope_attention(qkv, None, None, (cos, sin), backend="triton")
    with pytest.raises(ValueError, match="norm must be one of"):
        qk_norm_rope_attention(qkv, None, None, (cos, sin), norm="group")


def test_public_exports():
    assert vefast.attention is attention and vefast.qk_norm_rope_attention is qk_norm_rope_attention


# ---------------------------------------------------------------------------------------------------------
# gpu lane.

def _gpu_qkv(B, N, H, hd, dtype, seed):
    torch.manual_seed(seed)
    return torch.randn(B, N, 3, H, hd, device="cuda", dtype=dtype).requires_grad_(True)


GPU_DEFAULT_CASES = ([("rms", hd, torch.bfloat16) for hd in (64, 72, 80, 96, 128)]
                     + [("rms", 72, torch.float16), ("layer", 72, torch.bfloat16), ("layer", 128, torch.float16),
                        ("none", 72, torch.bfloat16), ("none", 64, torch.float16)])


@pytest.mark.gpu
@pytest.mark.parametrize("kind,hd,dtype", GPU_DEFAULT_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_gpu_default_path_vs_float64(kind, hd, dtype):
    """Real sizes (N 256, 16 heads): Triton prologue + SDPA's default backend, flash-attn rule."""
    qkv = _gpu_qkv(4, 256, 16, hd, dtype, seed=hd)
    with spy_prologue() as calls, record_fallbacks() as events:
        _fused_vs_float64(qkv, kind, _module_params(kind, hd, "cuda"), rope_2d_freqs(hd, 16, device="cuda"),
                          floor=FLOOR[dtype])
    assert calls == {"fwd": 1, "bwd": 1} and not events


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "efficient", "cudnn"])
def test_gpu_each_sdpa_backend_and_mixed_contexts(backend):
    """Inside sdpa_kernel(backend) that kernel runs (forward and backward, even when the backward runs outside
    the block), with correct results."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
         "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    qkv = _gpu_qkv(2, 256, 16, 72, torch.bfloat16, seed=1)
    w = torch.rand(72, device="cuda", requires_grad=True)
    rope = rope_2d_freqs(72, 16, device="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with sdpa_kernel(b):
            out = qk_norm_rope_attention(qkv, w, w, rope)
        grads = torch.autograd.grad(out, (qkv, w), torch.randn_like(out))
    names = {e.name for e in prof.events()}
    want = {"flash": "aten::_scaled_dot_product_flash_attention", "efficient": "aten::_efficient_attention_backward",
            "cudnn": "aten::_scaled_dot_product_cudnn_attention"}[backend]
    assert want in names, sorted(n for n in names if "attention" in n)
    ref = qk_norm_rope_attention_reference(qkv.double(), w.double(), w.double(), tuple(t.double() for t in rope))
    assert (out.double() - ref).abs().max().item() < 3e-2
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.gpu
def test_gpu_no_copies_around_the_kernels():
    """The fused path hands SDPA its layouts without copies: no copy_ / clone / cat / stack anywhere in a
    forward + backward (the torch profiler sees the ops inside the SDPA calls too)."""
    qkv = _gpu_qkv(8, 256, 16, 72, torch.bfloat16, seed=2)
    w = torch.rand(72, device="cuda", requires_grad=True)
    rope = rope_2d_freqs(72, 16, device="cuda")
    out = qk_norm_rope_attention(qkv, w, w, rope)  # warm up
    dout = torch.randn(8, 256, 16 * 72, device="cuda", dtype=torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = qk_norm_rope_attention(qkv, w, w, rope)
        torch.autograd.grad(out.reshape(8, 256, -1), (qkv, w), dout)
    copies = [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::cat", "aten::stack")]
    assert not copies, copies


@pytest.mark.gpu
def test_gpu_auto_is_sdpa_without_a_measurement():
    qkv = _gpu_qkv(2, 256, 16, 72, torch.bfloat16, seed=3)
    assert att.attention_table()["entries"] == []
    assert att._resolve_backend("auto", "cuda", qkv.device.index or 0, 72, torch.bfloat16, "rms", 256, "t") == "sdpa"
    with spy_prologue() as calls:
        qk_norm_rope_attention(qkv, None, None, rope_2d_freqs(72, 16, device="cuda"))
    assert calls["fwd"] == 1
    assert all(r["backend"] == "sdpa" for r in att.attention_backends())


@pytest.mark.gpu
@pytest.mark.parametrize("torch_mode", [False, True])
def test_gpu_deterministic_is_bitwise_repeatable(torch_mode):
    """deterministic=True: two backwards give the same bits (with torch's deterministic mode off: the
    memory-efficient kernel with one key split; on: torch's own deterministic choice)."""
    qkv = _gpu_qkv(8, 1024, 16, 72, torch.bfloat16, seed=4)
    w = torch.rand(72, device="cuda", requires_grad=True)
    rope = rope_2d_freqs(72, 32, device="cuda")
    dout = torch.randn(8, 1024, 16, 72, device="cuda", dtype=torch.bfloat16)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(torch_mode)
    try:
        runs = [torch.autograd.grad(qk_norm_rope_attention(qkv, w, w, rope, deterministic=True), (qkv, w), dout)
                for _ in range(2)]
        q, k, v = (t.detach().requires_grad_(True) for t in qkv.unbind(2))
        plain = [torch.autograd.grad(attention(q, k, v, deterministic=True), (q, k, v), dout) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in (*zip(*runs), *zip(*plain)):
        assert torch.equal(a, b)


def _sdpa_bnhd(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _check_flash_rule(fused_fn, eager_fn, inputs, dout, floor, ref_fn=None):
    """Output and gradients of fused_fn vs float64 (ref_fn, default eager_fn, on float64 inputs): error <= 2x
    eager_fn's error in the input dtype + floor."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fused_fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout)
    assert torch.isfinite(out).all()
    eleaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    eout = eager_fn(*eleaves)
    egrads = torch.autograd.grad(eout, eleaves, dout)
    rleaves = [t.detach().double().requires_grad_(True) for t in inputs]
    rout = (ref_fn or eager_fn)(*rleaves)
    rgrads = torch.autograd.grad(rout, rleaves, dout.double())
    err_bound(out, eout, rout, floor=floor)
    for g, e, r in zip(grads, egrads, rgrads):
        err_bound(g, e, r, floor=floor)


def _cuda_available_or_skip():
    reason = att._cuda_unavailable("cuda", torch.cuda.current_device(), torch.bfloat16, 72, "rms")
    if reason:
        pytest.skip(reason)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("hd", [64, 72, 80, 96, 128])
@pytest.mark.parametrize("N,B,H", [(1, 3, 2), (17, 2, 3), (256, 4, 4), (1024, 2, 2), (4096, 1, 2)])
def test_gpu_cuda_kernel_vs_float64(N, B, H, hd, dtype):
    _cuda_available_or_skip()
    torch.manual_seed(N * 131 + hd)
    q, k, v = torch.randn(B, N, 3, H, hd, device="cuda", dtype=dtype).unbind(2)
    dout = torch.randn(B, N, H, hd, device="cuda", dtype=dtype)
    with record_fallbacks() as events:
        _check_flash_rule(lambda a, b, c: attention(a, b, c, backend="cuda"), _sdpa_bnhd, (q, k, v), dout, floor=1e-3)
    assert not [e for e in events if not e.key.startswith("attention:cuda-unvalidated")], "CUDA kernel not taken"


@pytest.mark.gpu
@pytest.mark.parametrize("hd", [72, 128])
def test_gpu_cuda_kernel_edge_layouts(hd):
    """N = 65 (a last tile with one valid key), q with a non-unit head-dim stride, a stride-0 dout."""
    _cuda_available_or_skip()
    torch.manual_seed(hd + 65)
    B, N, H = 2, 65, 3
    q = torch.randn(B, N, hd, H, device="cuda", dtype=torch.bfloat16).transpose(2, 3)  # stride(-1) = H
    k, v = (torch.randn(B, N, H, hd, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dout = torch.randn(1, 1, 1, hd, device="cuda", dtype=torch.bfloat16).expand(B, N, H, hd)
    _check_flash_rule(lambda a, b, c: attention(a, b, c, backend="cuda"), _sdpa_bnhd, (q, k, v), dout, floor=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("hd,grid", [(72, 16), (64, 5), (128, 8)])
@pytest.mark.parametrize("use_norm,use_rope", [(True, True), (False, True), (True, False)])
def test_gpu_cuda_kernel_qk_norm_rope_vs_float64(hd, grid, dtype, use_norm, use_rope):
    """backend="cuda": RMSNorm + RoPE in the kernel's tile loads, the Triton prologue backward after it."""
    _cuda_available_or_skip()
    torch.manual_seed(hd + grid)
    B, H, N = 3, 4, grid * grid
    qkv = torch.randn(B, N, 3, H, hd, device="cuda", dtype=dtype)
    dout = torch.randn(B, N, H, hd, device="cuda", dtype=dtype)
    ws = [torch.rand(hd, device="cuda") + 0.5, torch.rand(hd, device="cuda") + 0.5] if use_norm else []
    cos, sin = rope_2d_freqs(hd, grid, device="cuda")

    def fused(x, *w):
        return qk_norm_rope_attention(x, w[0] if w else None, w[1] if w else None, (cos, sin) if use_rope else None,
                                      backend="cuda")

    def eager(x, *w):  # LightningDiT's eager sequence in x's dtype (its RMSNorm works in float32)
        qn = kn = None
        if w:
            qn, kn = _LDiTRMSNorm(hd).to(x.device), _LDiTRMSNorm(hd).to(x.device)
            del qn.weight, kn.weight
            qn.weight, kn.weight = w[0], w[1]  # plain tensors: gradients flow to the leaves
        return _module_attention(x, qn, kn, cos if use_rope else None, sin if use_rope else None)

    def ref64(x, *w):
        rope = (cos.double(), sin.double()) if use_rope else None
        return qk_norm_rope_attention_reference(x, w[0] if w else None, w[1] if w else None, rope)

    with spy_prologue() as calls:
        _check_flash_rule(fused, eager, (qkv, *ws), dout, floor=2e-3, ref_fn=ref64)
    assert calls["fwd"] == 0 and calls["bwd"] == (1 if use_norm or use_rope else 0)


@pytest.mark.gpu
def test_gpu_cuda_kernel_deterministic():
    _cuda_available_or_skip()
    qkv = _gpu_qkv(8, 256, 16, 72, torch.bfloat16, seed=3)
    dout = torch.randn(8, 256, 16, 72, device="cuda", dtype=torch.bfloat16)
    rope = rope_2d_freqs(72, 16, device="cuda")
    w = torch.ones(72, device="cuda", requires_grad=True)
    runs = [torch.autograd.grad(qk_norm_rope_attention(qkv, w, w, rope, deterministic=True, backend="cuda"),
                                (qkv, w), dout) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
