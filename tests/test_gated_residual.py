"""vefast.gated_residual and vefast.gated_residual_norm_modulate vs float64 references (values, gradients,
the kernels that ran, argument checks)."""
from __future__ import annotations

import pytest
import torch
from helpers import err_bound, examples, poison_, strided
from hypothesis import given, settings
from hypothesis import strategies as st

from vefast.ops import gated_residual as gr
from vefast.ops.gated_residual import (GatedResidualNormOutput, gated_residual, gated_residual_norm_modulate,
                                       gated_residual_norm_modulate_reference, gated_residual_reference)

FLOOR = {torch.float32: 2e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}
NAMES = ("x", "y", "gate", "shift", "scale", "weight")
FUSED = (gated_residual_norm_modulate, gated_residual_norm_modulate_reference)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every torch.empty / empty_like inside the op (outputs, partial sums) starts as NaN."""
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison_(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison_(empty_like(*a, **k)))


@pytest.fixture
def launches(monkeypatch):
    """("fwd" | "bwd", fused) per launch of the op's kernels: proves which kernel ran (plain or fused)."""
    seen = []
    fwd, bwd = gr._gr_fwd, gr._gr_bwd
    monkeypatch.setattr(gr, "_gr_fwd", lambda *a: seen.append(("fwd", a[6])) or fwd(*a))
    monkeypatch.setattr(gr, "_gr_bwd", lambda *a: seen.append(("bwd", a[9])) or bwd(*a))
    return seen


def _inputs(B, N, D, dtype, device, *, fuse=False, shift=True, weight=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g), torch.randn(B, D, generator=g)]
    t += [torch.randn(B, D, generator=g) if fuse and shift else None, 0.5 * torch.randn(B, D, generator=g) if fuse else None,
          1 + 0.3 * torch.randn(D, generator=g) if fuse and weight else None]
    return [v.to(device, dtype) if v is not None else None for v in t]


def _run(fn, tensors, douts, norm, eps):
    """Outputs and gradients of fn over the 6 (x, y, gate, shift, scale, weight) inputs."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    if fn in FUSED:
        res = fn(*leaves[:3], shift=leaves[3], scale=leaves[4], norm=norm, weight=leaves[5], eps=eps)
        assert type(res) is GatedResidualNormOutput
        outs = tuple(res)
    else:
        outs = (fn(*leaves[:3]),)
        assert type(outs[0]) is torch.Tensor
    torch.autograd.backward(outs, [d.to(o.dtype) for o, d in zip(outs, douts)])
    return [o.detach() for o in outs], [t.grad if t is not None else None for t in leaves]


def _check(tensors, dtype, norm="layernorm", eps=1e-6, seed=1, launches=None):
    """vefast vs eager vs float64; with ``launches``, the op's own kernel ran once forward, once backward."""
    fused = tensors[4] is not None
    fn, ref = FUSED if fused else (gated_residual, gated_residual_reference)
    x = tensors[0]
    g = torch.Generator().manual_seed(seed)
    douts = [torch.randn(x.shape, generator=g).to(x.device, x.dtype) for _ in range(2)]
    outs, grads = _run(fn, tensors, douts, norm, eps)
    if launches is not None:
        assert launches == [("fwd", fused), ("bwd", fused)]
    eouts, egrads = _run(ref, tensors, douts, norm, eps)
    t64 = [t.double() if t is not None else None for t in tensors]
    routs, rgrads = _run(ref, t64, [d.double() for d in douts], norm, eps)
    for o, e, r in zip(outs, eouts, routs):
        assert o.dtype == e.dtype and o.shape == r.shape
        err_bound(o, e, r, floor=FLOOR[dtype] * r.abs().max().item())
    for name, a, e, r in zip(NAMES, grads, egrads, rgrads):
        assert (a is None) == (r is None), name
        if a is not None:
            assert a.dtype == e.dtype, name
            err_bound(a, e, r, floor=FLOOR[dtype] * r.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_plain(device, dtype, poisoned_empty, launches):
    _check(_inputs(2, 9, 72, dtype, device), dtype, launches=launches)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm,weight,shift,eps", [("layernorm", False, True, 1e-6), ("rmsnorm", True, True, 1e-6),
                                                   ("rmsnorm", True, False, 0.5)])
def test_fused_norm_modulate(device, dtype, norm, weight, shift, eps, poisoned_empty, launches):
    _check(_inputs(2, 9, 72, dtype, device, fuse=True, shift=shift, weight=weight), dtype, norm, eps,
           launches=launches)


@settings(max_examples=examples(6))
@given(B=st.integers(1, 3), N=st.integers(1, 24), D=st.integers(1, 80), fuse=st.booleans(),
       norm=st.sampled_from(["layernorm", "rmsnorm"]), seed=st.integers(0, 2**16))
def test_shapes(device, B, N, D, fuse, norm, seed):
    _check(_inputs(B, N, D, torch.float32, device, fuse=fuse, weight=True, seed=seed), torch.float32, norm, seed=seed + 1)


@pytest.mark.parametrize("norm,weight,shift,D", [("layernorm", False, True, 5000), ("rmsnorm", True, True, 8192),
                                                 ("rmsnorm", True, False, 2100)])
def test_wide_rows(device, norm, weight, shift, D, poisoned_empty):
    """Rows wider than 4096 (the fused backward's two-slice programs, SPLIT = 2) and 2048-wide one-row backward
    tiles (codegen gate choices), masked and exact widths."""
    _check(_inputs(2, 3, D, torch.float32, device, fuse=True, shift=shift, weight=weight), torch.float32, norm)


def test_only_modulated_output_used(device):
    """The residual's gradient is absent (None) when only the modulated output is used."""
    x, y, gate, sh, sc, _ = _inputs(2, 5, 24, torch.float32, device, fuse=True)
    leaves = [t.requires_grad_() for t in (x, y, gate, sh, sc)]
    gated_residual_norm_modulate(*leaves[:3], shift=leaves[3], scale=leaves[4]).modulated.sum().backward()
    t64 = [t.detach().double().requires_grad_() for t in leaves]
    gated_residual_norm_modulate_reference(*t64[:3], shift=t64[3], scale=t64[4]).modulated.sum().backward()
    for a, b in zip(leaves, t64):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-5, rtol=1e-5)


def test_strided_inputs_and_stride0_grad(device):
    """Strided x, transposed y, gate / shift / scale as chunks of one adaLN output; ``.sum()`` gradients (stride 0)."""
    B, N, D = 2, 6, 40
    x = strided(torch.randn(B, N, D, device=device)).requires_grad_()
    y = torch.randn(B, D, N, device=device).transpose(1, 2).requires_grad_()
    ada = torch.randn(B, 6 * D, device=device, requires_grad=True)

    def block(x, y, ada, plain, fused):
        _, sc, gate, sh, gate2, _ = ada.chunk(6, dim=1)
        h, out = fused(x, y, gate, shift=sh, scale=sc, norm="rmsnorm")
        return h.sum() + out.sum() + plain(x, y, gate2).sum()

    block(x, y, ada, gated_residual, gated_residual_norm_modulate).backward()
    x64, y64, ada64 = (t.detach().double().requires_grad_() for t in (x, y, ada))
    block(x64, y64, ada64, gated_residual_reference, gated_residual_norm_modulate_reference).backward()
    for g, r in ((x.grad, x64.grad), (y.grad, y64.grad), (ada.grad, ada64.grad)):
        torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-5)


def test_deterministic_backward(device):
    tensors = _inputs(3, 37, 72, torch.float32, device, fuse=True, weight=True)
    douts = [torch.randn(3, 37, 72, device=device) for _ in range(2)]
    runs = [_run(gated_residual_norm_modulate, tensors, douts, "rmsnorm", 1e-6)[1] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph(device):
    x, y, gate, sh, sc, w = _inputs(2, 5, 24, torch.float32, device, fuse=True, weight=True)
    leaves = [t.requires_grad_() for t in (x, y, gate, sh, sc, w)]

    def block(fused, plain, x, y, gate, sh, sc, w):
        h, out = fused(x, y, gate, shift=sh, scale=sc, norm="rmsnorm", weight=w, eps=1e-5)
        return plain(h, out, gate).square().sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")  # inductor: ~150 s of CPU codegen
    compiled(gated_residual_norm_modulate, gated_residual, *leaves).backward()
    t64 = [t.detach().double().requires_grad_() for t in leaves]
    block(gated_residual_norm_modulate_reference, gated_residual_reference, *t64).backward()
    for a, b in zip(leaves, t64):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-4, rtol=1e-4)


def test_bad_inputs():
    x, y, gate, sh, sc, _ = _inputs(2, 3, 8, torch.float32, torch.device("cpu"), fuse=True)
    both = (gated_residual, lambda x, y, gate: gated_residual_norm_modulate(x, y, gate, shift=sh, scale=sc))
    for fn in both:  # the residual's arguments, checked alike by both functions
        with pytest.raises(TypeError, match="y must be a torch.Tensor"):
            fn(x, None, gate)
        with pytest.raises(TypeError, match="gate must have dtype"):
            fn(x, y, gate.int())
        with pytest.raises(ValueError, match=r"x must have shape \(B, N, D\)"):
            fn(x[0], y[0], gate)
        with pytest.raises(ValueError, match="y must have the shape of x"):
            fn(x, y[:, :2], gate)
        with pytest.raises(ValueError, match=r"gate must have shape \(B, D\)"):
            fn(x, y, gate[:1])
        with pytest.raises(ValueError, match="gate must be on the device of x"):
            fn(x, y, gate.to("meta"))
    # the old calling forms are gone: no tuple of arguments, no positional modulation
    with pytest.raises(TypeError, match="unexpected keyword argument 'norm_modulate'"):
        gated_residual(x, y, gate, norm_modulate=(sh, sc))
    with pytest.raises(TypeError, match="positional argument"):
        gated_residual_norm_modulate(x, y, gate, sh, sc)
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'scale'"):
        gated_residual_norm_modulate(x, y, gate, shift=sh)

    def fused(**kw):
        return gated_residual_norm_modulate(x, y, gate, **{"shift": sh, "scale": sc, **kw})
    with pytest.raises(TypeError, match="scale must be a torch.Tensor"):
        fused(scale=(sc,))
    with pytest.raises(ValueError, match=r"scale must have shape \(B, D\)"):
        fused(scale=sc[:, :3])
    with pytest.raises(ValueError, match=r"shift must have shape \(B, D\)"):
        fused(shift=sh[:1])
    with pytest.raises(ValueError, match=r"weight must have shape \(D,\)"):
        fused(weight=torch.ones(3))
    with pytest.raises(ValueError, match="norm must be one of"):
        fused(norm="groupnorm")
    with pytest.raises(ValueError, match="eps must be"):
        fused(eps=0.0)
    with pytest.raises(ValueError, match="scale must be on the device of x"):
        fused(scale=sc.to("meta"))


@pytest.mark.gpu
@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_real_size(fuse, dtype):
    tensors = _inputs(8, 256, 1152, dtype, torch.device("cuda"), fuse=fuse, weight=True)
    _check(tensors, dtype, "rmsnorm")
    douts = [torch.randn(8, 256, 1152, device="cuda") for _ in range(2)]
    fn = gated_residual_norm_modulate if fuse else gated_residual
    runs = [_run(fn, tensors, douts, "rmsnorm", 1e-6)[1] for _ in range(2)]
    for a, b in zip(*runs):
        assert a is None or torch.equal(a, b)
