"""vefast.align_loss / repa_loss (docs/math.md §3b-c) against float64 references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import err_bound, examples, strided
from hypothesis import given, settings
from hypothesis import strategies as st

import vefast
from vefast.ops._common import record_fallbacks
from vefast.ops.align_loss import align_loss_reference


def math_align(p, t, wc, ws, beta):
    """docs/math.md §3b element by element (float64)."""
    d = p.shape[-1]
    p2, t2 = p.reshape(-1, d), t.reshape(-1, d)
    cos = torch.stack([(a @ b) / (a.norm() * b.norm()) for a, b in zip(p2, t2)])
    x = (p2 - t2).abs()
    hub = torch.where(x < beta, 0.5 * x * x / beta if beta > 0 else x, x - 0.5 * beta)
    cos_loss, smooth_loss = (1 - cos).mean(), hub.mean()
    return wc * cos_loss + ws * smooth_loss, cos_loss, smooth_loss


def repa_reference(p, t):
    """REPA's loss (train.py): -(normalize(z) * normalize(z_tilde)).sum(-1), mean over tokens and batch."""
    return -(F.normalize(p, dim=-1) * F.normalize(t, dim=-1)).sum(-1).mean()


def make(shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=g, dtype=torch.float64)
    t = 0.8 * p + 0.6 * torch.randn(shape, generator=g, dtype=torch.float64)
    return p.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)


def run(fn, p, t, **kw):
    p = p.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    out = fn(p, t, **kw)
    g = torch.autograd.grad(out[0] + 0.3 * out[1] + 0.7 * out[2], (p, t))
    return out, g


SHAPES = [(7,), (3, 5, 24), (2, 3, 4, 100), (3, 2050)]  # 2050 > one 2048-wide block


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("knobs", [(0.9, 0.1, 1.0), (1.0, 0.0, 1.0), (0.5, 0.5, 0.0), (0.2, 1.0, 0.3)])
def test_reference_matches_math(shape, knobs):
    p, t = make(shape, dtype=torch.float64, seed=1)
    wc, ws, beta = knobs
    a = align_loss_reference(p, t, weight_cos=wc, weight_smooth=ws, beta=beta)
    for x, y in zip(a, math_align(p, t, wc, ws, beta)):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("shape", "knobs"), list(zip(SHAPES, [(0.9, 0.1, 1.0), (0.5, 0.5, 0.0), (0.2, 1.0, 0.3),
                                                                 (0.9, 0.1, 1.0)])))
def test_fused_fp32_values_and_grads(device, shape, knobs):
    wc, ws, beta = knobs
    p, t = make(shape, device=device, seed=len(shape))
    out, g = run(vefast.align_loss, p, t, weight_cos=wc, weight_smooth=ws, beta=beta)
    ref, rg = run(align_loss_reference, p.double(), t.double(), weight_cos=wc, weight_smooth=ws, beta=beta)
    for x, y in zip(out, ref):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=1e-6)
    for x, y in zip(g, rg):
        torch.testing.assert_close(x.double(), y, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_low_precision_within_eager_error(device, dtype):
    p, t = make((4, 9, 96), device=device, seed=3)
    pl, tl_ = p.to(dtype), t.to(dtype)
    out, g = run(vefast.align_loss, pl, tl_)
    eager, eg = run(align_loss_reference, pl, tl_, upcast=False)
    ref, rg = run(align_loss_reference, pl.double(), tl_.double())
    assert g[0].dtype == dtype
    for x, e, y in zip(out, eager, ref):
        err_bound(x, e, y, floor=1e-6)
    for x, e, y in zip(g, eg, rg):
        err_bound(x, e, y, floor=1e-7)


def test_strided_and_frozen_target(device):
    p, t = make((6, 40), device=device, seed=4)
    ps, ts = strided(p).requires_grad_(), strided(t)        # last-dim stride 2
    out = vefast.align_loss(ps, ts)
    gp, = torch.autograd.grad(out.loss, ps)
    p64 = p.double().requires_grad_()
    ref = align_loss_reference(p64, t.double())
    rg, = torch.autograd.grad(ref.loss, p64)
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gp.double(), rg, rtol=1e-4, atol=1e-8)
    # target transposed view: (40, 6) rows are columns of a (6, 40) buffer
    q = vefast.align_loss(p.t(), t.t())
    torch.testing.assert_close(q.loss.double(), align_loss_reference(p.t().double(), t.t().double()).loss,
                               rtol=1e-5, atol=1e-6)


def test_repa_loss(device):
    p, t = make((2, 16, 48), device=device, seed=5)
    pr = p.clone().requires_grad_()
    loss = vefast.repa_loss(pr, t)
    g, = torch.autograd.grad(loss, pr)
    p64 = p.double().requires_grad_()
    ref = repa_reference(p64, t.double())
    rg, = torch.autograd.grad(ref, p64)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), rg, rtol=1e-4, atol=1e-8)


@settings(max_examples=examples(6))
@given(rows=st.lists(st.integers(1, 4), min_size=0, max_size=3), d=st.integers(1, 70),
       beta=st.sampled_from([0.0, 0.5, 1.0]))
def test_shapes_property(device, rows, d, beta):
    p, t = make((*rows, d), device=device, seed=d)
    out, g = run(vefast.align_loss, p, t, beta=beta)
    ref, rg = run(align_loss_reference, p.double(), t.double(), beta=beta)
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-6)
    for x, y in zip(g, rg):
        torch.testing.assert_close(x.double(), y, rtol=1e-4, atol=1e-7)


def test_torch_compile_fullgraph(device):
    p, t = make((3, 8, 40), device=device, seed=6)
    p.requires_grad_()
    backend = "inductor" if p.is_cuda else "aot_eager"       # inductor's CPU codegen adds minutes
    fn = torch.compile(lambda a, b: vefast.align_loss(a, b).loss, fullgraph=True, backend=backend)
    loss = fn(p, t)
    g, = torch.autograd.grad(loss, p)
    ref = align_loss_reference(p.double(), t.double())
    torch.testing.assert_close(loss.double(), ref.loss, rtol=1e-5, atol=1e-6)
    p64 = p.detach().double().requires_grad_()
    rg_loss, = torch.autograd.grad(align_loss_reference(p64, t.double()).loss, p64)
    torch.testing.assert_close(g.double(), rg_loss, rtol=1e-4, atol=1e-8)


@pytest.mark.expect_fallback("align_loss:cpu")
def test_cpu_eager_path_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p, t = make((3, 20), seed=7)
    out = vefast.align_loss(p, t)
    torch.testing.assert_close(out.loss.double(), align_loss_reference(p.double(), t.double()).loss,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.expect_fallback("align_loss:float64")
def test_float64_runs_reference_and_is_reported(device):
    p, t = make((3, 20), dtype=torch.float64, device=device, seed=8)
    with record_fallbacks() as events:
        out = vefast.align_loss(p, t)
    assert out.loss.dtype == torch.float64
    torch.testing.assert_close(out.loss, math_align(p, t, 0.9, 0.1, 1.0)[0], rtol=1e-12, atol=1e-12)
    assert [e.key for e in events] == ["align_loss:float64"]


def test_bad_inputs():
    p, t = make((3, 20))
    with pytest.raises(ValueError, match="target must have the shape of pred"):
        vefast.align_loss(p, t[:, :10])
    with pytest.raises(TypeError, match="pred must have dtype"):
        vefast.align_loss(p.long(), t)
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        vefast.align_loss(p, [1.0])
    with pytest.raises(ValueError, match="must be on the device"):
        vefast.align_loss(p, t.to("meta"))
    with pytest.raises(ValueError, match="beta must be >= 0"):
        vefast.align_loss(p, t, beta=-1.0)
    with pytest.raises(ValueError, match="weight_cos must be finite"):
        vefast.align_loss(p, t, weight_cos=float("inf"))
    with pytest.raises(ValueError, match="at least one row"):
        vefast.align_loss(p[:0], t[:0])
    with pytest.raises(ValueError, match="D >= 1"):
        vefast.align_loss(torch.ones(()), torch.ones(()))


@pytest.mark.gpu
@pytest.mark.parametrize("d", [768, 1024])
def test_gpu_real_size_bf16(d):
    p, t = make((8, 1024, d), dtype=torch.bfloat16, device="cuda", seed=9)
    out, g = run(vefast.align_loss, p, t)
    eager, eg = run(align_loss_reference, p, t, upcast=False)
    ref, rg = run(align_loss_reference, p.double(), t.double())
    for x, e, y in zip(out, eager, ref):
        err_bound(x, e, y, floor=1e-6)
    for x, e, y in zip(g, eg, rg):
        err_bound(x, e, y, floor=1e-9)
