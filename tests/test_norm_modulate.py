"""vefast.norm_modulate: Triton (interpreter on CPU) vs float64 reference, values and gradients."""
from __future__ import annotations

import pytest
import torch
from helpers import err_bound, examples, poison_, strided
from hypothesis import given, settings
from hypothesis import strategies as st

from vefast.ops import _common
from vefast.ops.norm_modulate import norm_modulate, norm_modulate_reference

# fp32: tolerance floor relative to the output scale (the eager fp32 error can be ~0)
FLOOR = {torch.float32: 2e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every torch.empty / empty_like inside the op (outputs, partial sums) starts as NaN."""
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison_(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison_(empty_like(*a, **k)))


def _inputs(B, N, D, dtype, device, *, shift=True, weight=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, N, D, generator=g) * 2 + 0.5).to(device, dtype)
    sh = torch.randn(B, D, generator=g).to(device, dtype) if shift else None
    sc = (0.5 * torch.randn(B, D, generator=g)).to(device, dtype)
    w = (1 + 0.3 * torch.randn(D, generator=g)).to(device, dtype) if weight else None
    return x, sh, sc, w


def _run(fn, tensors, dout, **kw):
    """Output and gradients (None for absent inputs) of fn(*tensors, **kw) against dout."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves[:3], weight=leaves[3], **kw)
    out.backward(dout.to(out.dtype))
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def _check(x, sh, sc, w, norm, dtype, dout=None):
    dout = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device) if dout is None else dout
    dout = dout.to(x.dtype)  # the same rounded gradient for every variant
    out, grads = _run(norm_modulate, (x, sh, sc, w), dout, norm=norm)
    eager, egrads = _run(norm_modulate_reference, (x, sh, sc, w), dout, norm=norm)
    t64 = [t.double() if t is not None else None for t in (x, sh, sc, w)]
    ref, rgrads = _run(norm_modulate_reference, t64, dout.double(), norm=norm)
    assert out.dtype == eager.dtype and out.shape == x.shape
    err_bound(out, eager, ref, floor=FLOOR[dtype] * ref.abs().max().item())
    for name, g, e, r in zip(("x", "shift", "scale", "weight"), grads, egrads, rgrads):
        assert (g is None) == (r is None), name
        if g is not None:
            assert g.dtype == e.dtype, name
            err_bound(g, e, r, floor=FLOOR[dtype] * r.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("weight", [False, True])
def test_values_and_grads(device, dtype, norm, weight, poisoned_empty):
    x, sh, sc, w = _inputs(2, 9, 72, dtype, device, weight=weight)
    _check(x, sh, sc, w, norm, dtype)


@settings(max_examples=examples(6))
@given(B=st.integers(1, 3), N=st.integers(1, 24), D=st.integers(1, 80), shift=st.booleans(),
       norm=st.sampled_from(["layernorm", "rmsnorm"]), seed=st.integers(0, 2**16))
def test_shapes(device, B, N, D, shift, norm, seed):
    x, sh, sc, w = _inputs(B, N, D, torch.float32, device, shift=shift, weight=norm == "rmsnorm", seed=seed)
    _check(x, sh, sc, w, norm, torch.float32)


@pytest.mark.parametrize("norm,weight,shift,D", [("layernorm", False, True, 5000), ("rmsnorm", True, False, 8192)])
def test_wide_rows(device, norm, weight, shift, D, poisoned_empty):
    """One-row tiles with 8 / 16 warps (rows of 4096 and 8192 columns, masked and exact): the backward
    re-reads the (B, D) vectors per tile instead of holding them (codegen gate, docs/speed_checks.md)."""
    x, sh, sc, w = _inputs(2, 3, D, torch.float32, device, shift=shift, weight=weight)
    _check(x, sh, sc, w, norm, torch.float32)


def test_strided_inputs_and_stride0_grad(device):
    """x strided, shift/scale chunks of an adaLN output (stride 6D), gradient of .sum() (stride 0)."""
    B, N, D = 2, 6, 40
    x = strided(torch.randn(B, N, D, device=device)).requires_grad_()
    ada = torch.randn(B, 6 * D, device=device, requires_grad=True)
    sh, sc = ada.chunk(6, dim=1)[:2]
    w = torch.randn(D, device=device).requires_grad_()
    assert not x.is_contiguous() and sc.stride() == (6 * D, 1)
    norm_modulate(x, sh, sc, norm="rmsnorm", weight=w).sum().backward()
    x64, ada64, w64 = (t.detach().double().requires_grad_() for t in (x, ada, w))
    sh64, sc64 = ada64.chunk(6, dim=1)[:2]
    norm_modulate_reference(x64, sh64, sc64, norm="rmsnorm", weight=w64).sum().backward()
    for g, r in ((x.grad, x64.grad), (ada.grad, ada64.grad), (w.grad, w64.grad)):
        torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-5)


def test_deterministic_backward(device):
    x, sh, sc, w = _inputs(3, 37, 72, torch.float32, device, weight=True)
    dout = torch.randn(x.shape, device=device)
    runs = [_run(norm_modulate, (x, sh, sc, w), dout, norm="layernorm")[1] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph(device):
    x, sh, sc, w = _inputs(2, 5, 24, torch.float32, device, weight=True)
    leaves = [t.requires_grad_() for t in (x, sh, sc, w)]

    @torch.compile(fullgraph=True, backend="aot_eager")  # inductor adds ~150 s of CPU codegen, nothing op-specific
    def f(x, sh, sc, w):
        return norm_modulate(x, sh, sc, norm="rmsnorm", weight=w).square().sum()

    f(*leaves).backward()
    t64 = [t.detach().double().requires_grad_() for t in leaves]
    norm_modulate_reference(*t64[:3], norm="rmsnorm", weight=t64[3]).square().sum().backward()
    for a, b in zip(leaves, t64):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.expect_fallback("norm_modulate:cpu")
def test_eager_fallback_on_cpu_is_reported(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, sh, sc, w = _inputs(2, 3, 8, torch.float32, torch.device("cpu"), weight=True)
    with _common.record_fallbacks() as events:
        out = norm_modulate(x, sh, sc, norm="rmsnorm", weight=w)
    assert torch.equal(out, norm_modulate_reference(x, sh, sc, norm="rmsnorm", weight=w))
    assert [e.key for e in events] == ["norm_modulate:cpu"]
    assert "norm_modulate:cpu" in _common.reported_fallbacks()


@pytest.mark.expect_fallback("norm_modulate:float64")
def test_float64_runs_reference(device):
    x, sh, sc, _ = _inputs(2, 3, 8, torch.float64, device)
    with _common.record_fallbacks() as events:
        out = norm_modulate(x, sh, sc)
    assert torch.equal(out, norm_modulate_reference(x, sh, sc))
    assert [e.key for e in events] == ["norm_modulate:float64"]


def test_bad_inputs():
    x, sh, sc, w = _inputs(2, 3, 8, torch.float32, torch.device("cpu"), weight=True)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        norm_modulate(x.tolist(), sh, sc)
    with pytest.raises(TypeError, match="scale must have dtype"):
        norm_modulate(x, sh, sc.long())
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, D\)"):
        norm_modulate(x[0], sh, sc)
    with pytest.raises(ValueError, match=r"scale must have shape \(B, D\)"):
        norm_modulate(x, sh, sc[:, :4])
    with pytest.raises(ValueError, match=r"shift must have shape \(B, D\)"):
        norm_modulate(x, sh[:1], sc)
    with pytest.raises(ValueError, match=r"weight must have shape \(D,\)"):
        norm_modulate(x, sh, sc, weight=w[:3])
    with pytest.raises(ValueError, match="norm must be one of"):
        norm_modulate(x, sh, sc, norm="batchnorm")
    with pytest.raises(ValueError, match="eps must be > 0"):
        norm_modulate(x, sh, sc, eps=0.0)
    with pytest.raises(ValueError, match="scale must be on the device of x"):
        norm_modulate(x, sh, sc.to("meta"))


@pytest.mark.gpu
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_real_size(norm, dtype):
    x, sh, sc, w = _inputs(8, 256, 1152, dtype, torch.device("cuda"), weight=norm == "rmsnorm")
    _check(x, sh, sc, w, norm, dtype, dout=torch.randn(x.shape, device="cuda"))
    dout = torch.randn(x.shape, device="cuda")
    runs = [_run(norm_modulate, (x, sh, sc, w), dout, norm=norm)[1] for _ in range(2)]
    for a, b in zip(*runs):
        assert a is None or torch.equal(a, b)
