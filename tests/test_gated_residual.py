"""vefast.gated_residual (plain and fused with the next norm_modulate) vs float64 reference."""
from __future__ import annotations

import pytest
import torch
from helpers import err_bound, poison_, strided
from hypothesis import given, settings
from hypothesis import strategies as st

from vefast.ops.gated_residual import GatedResidualOutput, gated_residual, gated_residual_reference
from vefast.ops.norm_modulate import NormModulateArgs

FLOOR = {torch.float32: 2e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}
NAMES = ("x", "y", "gate", "shift", "scale", "weight")


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every torch.empty / empty_like inside the op (outputs, partial sums) starts as NaN."""
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison_(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison_(empty_like(*a, **k)))


def _inputs(B, N, D, dtype, device, *, fuse=False, shift=True, weight=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g), torch.randn(B, D, generator=g)]
    t += [torch.randn(B, D, generator=g) if fuse and shift else None, 0.5 * torch.randn(B, D, generator=g) if fuse else None,
          1 + 0.3 * torch.randn(D, generator=g) if fuse and weight else None]
    return [v.to(device, dtype) if v is not None else None for v in t]


def _run(fn, tensors, douts, norm):
    """Outputs and gradients of fn over the 6 (x, y, gate, shift, scale, weight) inputs."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    if tensors[4] is None:
        outs = (fn(*leaves[:3]),)
    else:
        res = fn(*leaves[:3], norm_modulate=NormModulateArgs(leaves[3], leaves[4], norm, leaves[5]))
        assert isinstance(res, GatedResidualOutput)
        outs = tuple(res)
    torch.autograd.backward(outs, [d.to(o.dtype) for o, d in zip(outs, douts)])
    return [o.detach() for o in outs], [t.grad if t is not None else None for t in leaves]


def _check(tensors, dtype, norm="layernorm", seed=1):
    x = tensors[0]
    g = torch.Generator().manual_seed(seed)
    douts = [torch.randn(x.shape, generator=g).to(x.device, x.dtype) for _ in range(2)]
    outs, grads = _run(gated_residual, tensors, douts, norm)
    eouts, egrads = _run(gated_residual_reference, tensors, douts, norm)
    t64 = [t.double() if t is not None else None for t in tensors]
    routs, rgrads = _run(gated_residual_reference, t64, [d.double() for d in douts], norm)
    for o, e, r in zip(outs, eouts, routs):
        assert o.dtype == e.dtype and o.shape == r.shape
        err_bound(o, e, r, floor=FLOOR[dtype] * r.abs().max().item())
    for name, a, e, r in zip(NAMES, grads, egrads, rgrads):
        assert (a is None) == (r is None), name
        if a is not None:
            assert a.dtype == e.dtype, name
            err_bound(a, e, r, floor=FLOOR[dtype] * r.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_plain(device, dtype, poisoned_empty):
    _check(_inputs(2, 9, 72, dtype, device), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm,weight,shift", [("layernorm", False, True), ("rmsnorm", True, True),
                                               ("rmsnorm", True, False)])
def test_fused_norm_modulate(device, dtype, norm, weight, shift, poisoned_empty):
    _check(_inputs(2, 9, 72, dtype, device, fuse=True, shift=shift, weight=weight), dtype, norm)


@settings(max_examples=6)
@given(B=st.integers(1, 3), N=st.integers(1, 24), D=st.integers(1, 80), fuse=st.booleans(),
       norm=st.sampled_from(["layernorm", "rmsnorm"]), seed=st.integers(0, 2**16))
def test_shapes(B, N, D, fuse, norm, seed):
    _check(_inputs(B, N, D, torch.float32, torch.device("cpu"), fuse=fuse, weight=True, seed=seed), torch.float32,
           norm, seed=seed + 1)


def test_only_modulated_output_used(device):
    """The residual's gradient is absent (None) when only the modulated output is used."""
    x, y, gate, sh, sc, _ = _inputs(2, 5, 24, torch.float32, device, fuse=True)
    leaves = [t.requires_grad_() for t in (x, y, gate, sh, sc)]
    gated_residual(*leaves[:3], norm_modulate=(leaves[3], leaves[4])).modulated.sum().backward()
    t64 = [t.detach().double().requires_grad_() for t in leaves]
    gated_residual_reference(*t64[:3], norm_modulate=(t64[3], t64[4])).modulated.sum().backward()
    for a, b in zip(leaves, t64):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-5, rtol=1e-5)


def test_strided_inputs_and_stride0_grad(device):
    B, N, D = 2, 6, 40
    x = strided(torch.randn(B, N, D, device=device)).requires_grad_()
    y = torch.randn(B, D, N, device=device).transpose(1, 2).requires_grad_()
    ada = torch.randn(B, 6 * D, device=device, requires_grad=True)
    _, sc, gate, sh = ada.chunk(6, dim=1)[:4]
    h, out = gated_residual(x, y, gate, norm_modulate=(sh, sc, "rmsnorm"))
    (h.sum() + out.sum()).backward()
    x64, y64, ada64 = (t.detach().double().requires_grad_() for t in (x, y, ada))
    _, sc64, gate64, sh64 = ada64.chunk(6, dim=1)[:4]
    h64, out64 = gated_residual_reference(x64, y64, gate64, norm_modulate=(sh64, sc64, "rmsnorm"))
    (h64.sum() + out64.sum()).backward()
    for g, r in ((x.grad, x64.grad), (y.grad, y64.grad), (ada.grad, ada64.grad)):
        torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-5)


def test_deterministic_backward(device):
    tensors = _inputs(3, 37, 72, torch.float32, device, fuse=True, weight=True)
    douts = [torch.randn(3, 37, 72, device=device) for _ in range(2)]
    runs = [_run(gated_residual, tensors, douts, "rmsnorm")[1] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph(device):
    x, y, gate, sh, sc, w = _inputs(2, 5, 24, torch.float32, device, fuse=True, weight=True)
    leaves = [t.requires_grad_() for t in (x, y, gate, sh, sc, w)]

    @torch.compile(fullgraph=True, backend="aot_eager")  # inductor adds ~150 s of CPU codegen, nothing op-specific
    def f(x, y, gate, sh, sc, w):
        h, out = gated_residual(x, y, gate, norm_modulate=(sh, sc, "rmsnorm", w))
        return gated_residual(h, out, gate).square().sum()

    f(*leaves).backward()
    t64 = [t.detach().double().requires_grad_() for t in leaves]
    h, out = gated_residual_reference(*t64[:3], norm_modulate=(t64[3], t64[4], "rmsnorm", t64[5]))
    gated_residual_reference(h, out, t64[2]).square().sum().backward()
    for a, b in zip(leaves, t64):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-4, rtol=1e-4)


def test_bad_inputs():
    x, y, gate, sh, sc, _ = _inputs(2, 3, 8, torch.float32, torch.device("cpu"), fuse=True)
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        gated_residual(x, None, gate)
    with pytest.raises(TypeError, match="gate must have dtype"):
        gated_residual(x, y, gate.int())
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, D\)"):
        gated_residual(x[0], y[0], gate)
    with pytest.raises(ValueError, match="y must have the shape of x"):
        gated_residual(x, y[:, :2], gate)
    with pytest.raises(ValueError, match=r"gate must have shape \(B, D\)"):
        gated_residual(x, y, gate[:1])
    with pytest.raises(ValueError, match="gate must be on the device of x"):
        gated_residual(x, y, gate.to("meta"))
    with pytest.raises(TypeError, match="norm_modulate must be a NormModulateArgs or a tuple"):
        gated_residual(x, y, gate, norm_modulate=[sh, sc])
    with pytest.raises(TypeError, match="of length 1"):
        gated_residual(x, y, gate, norm_modulate=(sc,))
    with pytest.raises(ValueError, match="norm must be one of"):
        gated_residual(x, y, gate, norm_modulate=(sh, sc, "groupnorm"))
    with pytest.raises(ValueError, match=r"scale must have shape \(B, D\)"):
        gated_residual(x, y, gate, norm_modulate=(sh, sc[:, :3]))


@pytest.mark.gpu
@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_real_size(fuse, dtype):
    tensors = _inputs(8, 256, 1152, dtype, torch.device("cuda"), fuse=fuse, weight=True)
    _check(tensors, dtype, "rmsnorm")
    douts = [torch.randn(8, 256, 1152, device="cuda") for _ in range(2)]
    runs = [_run(gated_residual, tensors, douts, "rmsnorm")[1] for _ in range(2)]
    for a, b in zip(*runs):
        assert a is None or torch.equal(a, b)
