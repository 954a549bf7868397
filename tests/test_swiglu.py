"""vefast.swiglu: Triton (interpreter on CPU) vs float64 reference, values and gradients."""
from __future__ import annotations

import pytest
import torch
from helpers import err_bound, examples, poison_, strided
from hypothesis import given, settings
from hypothesis import strategies as st

from vefast.ops.swiglu import swiglu, swiglu_reference

FLOOR = {torch.float32: 2e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}


@pytest.fixture
def poisoned_empty(monkeypatch):
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison_(empty(*a, **k)))


def _run(fn, x12, dout):
    leaf = x12.detach().clone().requires_grad_()
    out = fn(leaf)
    out.backward(dout.to(out.dtype))
    return out.detach(), leaf.grad


def _check(x12, dtype, seed=1):
    dout = (torch.randn(*x12.shape[:-1], x12.shape[-1] // 2, generator=torch.Generator().manual_seed(seed))
            .to(x12.device, dtype))
    out, grad = _run(swiglu, x12, dout)
    eout, egrad = _run(swiglu_reference, x12, dout)
    rout, rgrad = _run(swiglu_reference, x12.double(), dout.double())
    assert out.dtype == dtype and grad.dtype == dtype and out.shape == rout.shape
    err_bound(out, eout, rout, floor=FLOOR[dtype] * rout.abs().max().item())
    err_bound(grad, egrad, rgrad, floor=FLOOR[dtype] * rgrad.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 9, 2 * 48), (5, 2 * 1000), (2 * 3,)])
def test_values_and_grads(device, dtype, shape, poisoned_empty):
    x12 = (2 * torch.randn(shape, generator=torch.Generator().manual_seed(0))).to(device, dtype)
    _check(x12, dtype)


@settings(max_examples=examples(6))
@given(M=st.integers(1, 50), H=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_shapes(device, M, H, seed):
    x12 = torch.randn(M, 2 * H, generator=torch.Generator().manual_seed(seed)).to(device) * 3
    _check(x12, torch.float32, seed + 1)


def test_strided_input_and_stride0_grad(device):
    x = strided(torch.randn(3, 4, 2 * 20, device=device)).requires_grad_()
    swiglu(x).sum().backward()
    x64 = x.detach().double().requires_grad_()
    swiglu_reference(x64).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-6, rtol=1e-6)


def test_torch_compile_fullgraph(device):
    x = torch.randn(2, 5, 2 * 24, device=device, requires_grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")  # inductor adds ~150 s of CPU codegen, nothing op-specific
    def f(x):
        return swiglu(x).square().sum()

    f(x).backward()
    x64 = x.detach().double().requires_grad_()
    swiglu_reference(x64).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)


def test_bad_inputs():
    with pytest.raises(TypeError, match="x12 must be a torch.Tensor"):
        swiglu([1.0, 2.0])
    with pytest.raises(TypeError, match="x12 must have dtype"):
        swiglu(torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="even last dimension"):
        swiglu(torch.ones(2, 5))
    with pytest.raises(ValueError, match="even last dimension"):
        swiglu(torch.tensor(1.0))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_real_size(dtype):
    x12 = torch.randn(8, 256, 2 * 3072, device="cuda").to(dtype)
    _check(x12, dtype)
