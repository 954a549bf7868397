"""Fused reparameterization losses (vefast.ops.reparam, docs/math.md §1-2): values and gradients against a
float64 reference, Philox noise, layouts, reductions, clamp region, bad inputs, torch.compile."""
from __future__ import annotations

import pytest
import torch
from helpers import err_bound, poison_, strided
from scipy import stats

from vefast.ops import reparam as R
from vefast.ops.reparam import kl_loss, kl_loss_reference, ve_loss, ve_loss_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VE_KW = dict(lambda_var=0.1, lambda_reg=1e-3, tau=1.0, delta=1e-6)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def naive(kind, mean, logvar, noise, reduction="mean", **kw):
    """The same computation in eager PyTorch at the input dtype (LDM-style), the err_bound yardstick."""
    red = (lambda x: x.mean()) if reduction == "mean" else (lambda x: x.sum() / x.shape[0])
    lv = torch.clamp(logvar, -30.0, 20.0)
    std, var = torch.exp(0.5 * lv), torch.exp(lv)
    z = mean + std * noise.to(mean.dtype)
    if kind == "ve":
        v = red(1.0 / (var + kw["delta"]))
        r = red(torch.exp(z.abs() - kw["tau"]))
        return (z, kw["lambda_var"] * v + kw["lambda_reg"] * r, v, r)
    return (z, red(0.5 * (mean * mean + var - 1.0 - lv)))


def fused(kind, *a, **kw):
    return tuple(ve_loss(*a, **kw) if kind == "ve" else kl_loss(*a, **kw))


def reference(kind, *a, **kw):
    return tuple(ve_loss_reference(*a, **kw) if kind == "ve" else kl_loss_reference(*a, **kw))


def kind_kw(kind):
    return dict(VE_KW) if kind == "ve" else {}


def inputs(shape, dtype, *, lv_scale=1.5, seed=0, device="cpu"):
    """(mean, logvar, noise) drawn on the CPU (same values in every lane), then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(shape, generator=g).to(device, dtype)
    logvar = (lv_scale * torch.randn(shape, generator=g) - 1.0).to(device, dtype)
    noise = torch.randn(shape, generator=g).to(device, dtype)
    return mean, logvar, noise


def upstream(outs, dtype, seed=1):
    """Random upstream gradients for every output (z in its dtype, losses as 0-dim scalars)."""
    g = torch.Generator().manual_seed(seed)
    dev = outs[0].device
    grads = [torch.randn(outs[0].shape, generator=g).to(device=dev, dtype=dtype)]
    grads += [torch.randn((), generator=g).to(device=dev, dtype=o.dtype) for o in outs[1:]]
    return grads


def grads_of(outs, leaves, gouts):
    return torch.autograd.grad(outs, leaves, gouts)


def leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).requires_grad_()


def floor_for(ref, zmax=0.0):
    """A few fp32 ulps of ``ref``; VE terms get the conditioning of exp(|z| - tau) (|z| times that)."""
    return 2.0**-22 * (ref.abs().max().item() + 1.0) * (1.0 + zmax)


def check_against_reference(kind, mean, logvar, noise, reduction, *, call=None):
    """fused (Triton path) vs float64 reference, within 2x the eager error at the input dtype."""
    kw = kind_kw(kind)
    m, lv = leaf(mean), leaf(logvar)
    outs = call(m, lv) if call is not None else fused(kind, m, lv, noise, reduction=reduction, **kw)
    m64, lv64 = leaf(mean, torch.float64), leaf(logvar, torch.float64)
    ref = reference(kind, m64, lv64, noise.double(), reduction=reduction, **kw)
    me, lve = leaf(mean), leaf(logvar)
    eag = naive(kind, me, lve, noise, reduction, **kw)
    assert outs[0].dtype == mean.dtype and outs[0].shape == mean.shape
    for o in outs[1:]:
        assert o.dim() == 0 and o.dtype == torch.float32
    zmax = ref[0].abs().max().item() if kind == "ve" else 0.0
    for f, e, r in zip(outs, eag, ref):
        assert torch.isfinite(e).all(), "inputs out of the dtype's range: the comparison would be vacuous"
        err_bound(f, e, r.detach(), floor=floor_for(r, zmax))
    gouts = upstream(outs, mean.dtype)
    gf = grads_of(outs, (m, lv), gouts)
    gr = grads_of(ref, (m64, lv64), [g.double() for g in gouts])
    ge = grads_of(eag, (me, lve), [g.to(e.dtype) for g, e in zip(gouts, eag)])
    for f, e, r in zip(gf, ge, gr):
        assert torch.isfinite(e).all(), "inputs out of the dtype's range: the comparison would be vacuous"
        assert f.dtype == mean.dtype and f.shape == mean.shape
        err_bound(f, e, r, floor=floor_for(r, zmax))


# ---------------------------------------------------------------------------------------------
# values and gradients vs float64
# ---------------------------------------------------------------------------------------------
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# odd sizes, 1 element, 4-D latents, more than one program (3 x 1100); every dtype meets both kinds and reductions
CASES = [
    ("ve", F32, (1,), "mean"), ("kl", F32, (7,), "sum"), ("ve", F32, (2, 4, 3, 3), "sum"),
    ("ve", F32, (3, 1100), "sum"), ("kl", F32, (2, 3, 17, 5), "mean"),
    ("ve", BF16, (3, 5), "mean"), ("kl", BF16, (2, 4, 3, 3), "sum"), ("ve", BF16, (2, 3, 17, 5), "mean"),
    ("kl", BF16, (3, 1100), "sum"),
    ("ve", F16, (7,), "sum"), ("kl", F16, (1,), "mean"), ("ve", F16, (2, 3, 17, 5), "sum"), ("kl", F16, (3, 5), "mean"),
]


@pytest.mark.parametrize("kind,dtype,shape,reduction", CASES, ids=str)
def test_matches_float64_reference(kind, dtype, shape, reduction, device):
    # fp16: keep |z| moderate so exp(|z| - tau) and its gradients stay inside the fp16 range
    mean, logvar, noise = inputs(shape, dtype, lv_scale=0.8 if dtype == torch.float16 else 1.5, device=device)
    check_against_reference(kind, mean, logvar, noise, reduction)


@pytest.mark.parametrize("kind", ["ve", "kl"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_float64_inputs_give_float64_losses(kind, reduction, device):
    mean, logvar, noise = inputs((3, 2, 5), torch.float64, device=device)
    m, lv = leaf(mean), leaf(logvar)
    outs = fused(kind, m, lv, noise, reduction=reduction, **kind_kw(kind))
    m2, lv2 = leaf(mean), leaf(logvar)
    ref = reference(kind, m2, lv2, noise, reduction=reduction, **kind_kw(kind))
    for o, r in zip(outs, ref):
        assert o.dtype == torch.float64
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
    gouts = upstream(outs, torch.float64)
    for a, b in zip(grads_of(outs, (m, lv), gouts), grads_of(ref, (m2, lv2), gouts)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_reductions_relate_by_elements_per_sample(device):
    mean, logvar, noise = inputs((4, 3, 5), torch.float32, device=device)
    a = ve_loss(mean, logvar, noise, reduction="mean", **VE_KW)
    b = ve_loss(mean, logvar, noise, reduction="sum", **VE_KW)
    for x, y in zip(a[1:], b[1:]):
        torch.testing.assert_close(x * 15, y, rtol=1e-5, atol=0)
    torch.testing.assert_close(a.loss, VE_KW["lambda_var"] * a.var_loss + VE_KW["lambda_reg"] * a.reg_loss)


# ---------------------------------------------------------------------------------------------
# layouts: chunk views (batch stride + contiguous inner), copies, stride-0 and absent upstream grads
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,shape,dtype", [  # general rows (M = 105) / tile-aligned rows (M = 1024)
    ("ve", (3, 6, 5, 7), torch.bfloat16), ("kl", (3, 6, 5, 7), torch.float32),
    ("ve", (2, 8, 16, 16), torch.float32), ("kl", (2, 8, 16, 16), torch.bfloat16)], ids=str)
def test_moments_views_and_moments_op(kind, shape, dtype, device):
    g = torch.Generator().manual_seed(5)
    moments = torch.randn(shape, generator=g).to(device, dtype)
    noise = torch.randn((shape[0], shape[1] // 2, *shape[2:]), generator=g).to(device, dtype)
    mean, logvar = moments.chunk(2, dim=1)
    assert not mean.is_contiguous()
    check_against_reference(kind, mean, logvar, noise, "sum")
    # the moments op: reads moments in place, writes d moments in one buffer
    kw = kind_kw(kind)
    fn = R.ve_loss_from_moments if kind == "ve" else R.kl_loss_from_moments
    mom = leaf(moments)
    outs = tuple(fn(mom, noise, reduction="sum", **kw))
    m, lv = leaf(mean), leaf(logvar)
    outs2 = fused(kind, m, lv, noise, reduction="sum", **kw)
    for a, b in zip(outs, outs2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    gouts = upstream(outs, dtype)
    (gm,) = grads_of(outs, (mom,), gouts)
    gm2 = torch.cat(grads_of(outs2, (m, lv), gouts), dim=1)
    torch.testing.assert_close(gm, gm2, rtol=0, atol=0)


def test_strided_noise_and_inputs_are_copied_correctly(device):
    mean, logvar, noise = inputs((3, 4, 9), torch.float32, device=device)
    check_against_reference("ve", strided(mean), strided(logvar), strided(noise), "mean")


@pytest.mark.parametrize("kind,dz_kind", [("ve", "expanded"), ("kl", "strided"), ("ve", "batch_strided"),
                                          ("kl", "absent"), ("ve", "absent")])
def test_upstream_gradient_layouts(kind, dz_kind, device):
    mean, logvar, noise = inputs((3, 4, 5), torch.float32, device=device)
    kw = kind_kw(kind)
    m, lv = leaf(mean), leaf(logvar)
    outs = fused(kind, m, lv, noise, reduction="sum", **kw)
    m64, lv64 = leaf(mean, torch.float64), leaf(logvar, torch.float64)
    ref = reference(kind, m64, lv64, noise.double(), reduction="sum", **kw)
    dz = torch.randn(3, 4, 5, device=device)
    if dz_kind == "expanded":  # what z.sum() sends: all strides 0
        dz = torch.tensor(0.7, device=device).expand(3, 4, 5)
    elif dz_kind == "strided":
        dz = strided(dz)
    elif dz_kind == "batch_strided":
        dz = torch.randn(3, 8, 5, device=device)[:, 2:6]
    if dz_kind == "absent":  # z unused: only the loss has a gradient
        gf = torch.autograd.grad(outs[1], (m, lv))
        gr = torch.autograd.grad(ref[1], (m64, lv64))
    else:
        gf = torch.autograd.grad((outs[0], outs[1]), (m, lv), (dz, torch.tensor(1.3, device=device)))
        gr = torch.autograd.grad((ref[0], ref[1]), (m64, lv64),
                                 (dz.double(), torch.tensor(1.3, dtype=torch.float64, device=device)))
    for f, r in zip(gf, gr):
        torch.testing.assert_close(f.double(), r, rtol=2e-5, atol=1e-6)


def test_only_mean_requires_grad(device):
    mean, logvar, noise = inputs((2, 3, 4), torch.float32, device=device)
    m = leaf(mean)
    out = ve_loss(m, logvar, noise, **VE_KW)
    (gm,) = torch.autograd.grad(out.loss + out.z.sum(), m)
    m64 = leaf(mean, torch.float64)
    ref = ve_loss_reference(m64, logvar.double(), noise.double(), **VE_KW)
    (gr,) = torch.autograd.grad(ref.loss + ref.z.sum(), m64)
    torch.testing.assert_close(gm.double(), gr, rtol=2e-5, atol=1e-7)


def test_outputs_are_fully_written(monkeypatch, device):
    """Every buffer the launchers allocate starts as NaN: an unwritten element would show."""
    orig = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison_(orig(*a, **k)))
    mean, logvar, noise = inputs((3, 1031), torch.float32, device=device)
    m, lv = leaf(mean), leaf(logvar)
    one = torch.tensor(1.0, device=device)
    for nz in (noise, None):
        out = ve_loss(m, lv, nz)
        gm, glv = torch.autograd.grad((out.z, out.loss), (m, lv), (torch.ones_like(out.z), one))
        for t in (*out, gm, glv):
            assert torch.isfinite(t).all()
    mom = leaf(torch.randn(2, 6, 7, 3, device=device))
    out = R.kl_loss_from_moments(mom)
    (g,) = torch.autograd.grad((out.z, out.loss), mom, (torch.ones_like(out.z), one))
    assert torch.isfinite(g).all() and torch.isfinite(out.z).all()


# ---------------------------------------------------------------------------------------------
# clamp region
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ve", "kl"])
def test_clamp_region_gradients_are_zero(kind, device):
    logvar = torch.tensor([[-35.0, -30.0, -29.0, 0.5, 19.5, 20.0, 25.0, -100.0]], device=device)
    mean = torch.full_like(logvar, 0.01)
    noise = torch.full_like(logvar, 1e-9)  # keeps z small where var is huge
    kw = kind_kw(kind)
    m, lv = leaf(mean), leaf(logvar)
    outs = fused(kind, m, lv, noise, **kw)
    m64, lv64 = leaf(mean, torch.float64), leaf(logvar, torch.float64)
    ref = reference(kind, m64, lv64, noise.double(), **kw)
    gouts = [torch.ones_like(outs[0])] + [torch.tensor(1.0, device=device)] * (len(outs) - 1)
    gf = grads_of(outs, (m, lv), gouts)
    gr = grads_of(ref, (m64, lv64), [g.double() for g in gouts])
    outside = (logvar < -30) | (logvar > 20)
    assert (gf[1][outside] == 0).all()
    assert (gf[1][~outside] != 0).all()  # bounds are inclusive, as torch.clamp
    for f, r in zip(gf, gr):
        torch.testing.assert_close(f.double(), r, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", ["ve", "kl"])
def test_nan_logvar_propagates_like_torch_clamp(kind, device):
    """A NaN logvar must give NaN (as torch.clamp), not a clamped finite value: GPU min/max drop NaN."""
    logvar = torch.tensor([[0.5, float("nan"), -1.0, 2.0]], device=device)
    mean = torch.tensor([[0.1, 0.2, -0.3, 0.4]], device=device)
    noise = torch.tensor([[0.5, -0.5, 1.0, 0.25]], device=device)
    kw = kind_kw(kind)
    m, lv = leaf(mean), leaf(logvar)
    outs = fused(kind, m, lv, noise, **kw)
    m64, lv64 = leaf(mean, torch.float64), leaf(logvar, torch.float64)
    ref = reference(kind, m64, lv64, noise.double(), **kw)
    for f, r in zip(outs, ref):
        assert torch.equal(torch.isnan(f), torch.isnan(r)), (f, r)
    gf = grads_of(outs, (m, lv), [torch.ones_like(outs[0])] + [torch.ones_like(o) for o in outs[1:]])
    gr = grads_of(ref, (m64, lv64), [torch.ones_like(r) for r in ref])
    for f, r in zip(gf, gr):
        assert torch.equal(torch.isnan(f), torch.isnan(r)), (f, r)


# ---------------------------------------------------------------------------------------------
# in-kernel Philox noise (on the device: the GPU lane tests the kernels' noise, not torch.randn)
# ---------------------------------------------------------------------------------------------
def test_philox_seeded_reproducible_and_layout_independent(device):
    moments = torch.randn(3, 10, 7, 5, device=device)
    mean, logvar = moments.chunk(2, dim=1)
    z1 = ve_loss(mean, logvar, generator=torch.Generator().manual_seed(11)).z
    z2 = ve_loss(mean.contiguous(), logvar.contiguous(), generator=torch.Generator().manual_seed(11)).z
    z3 = R.kl_loss_from_moments(moments, generator=torch.Generator().manual_seed(11)).z
    z4 = ve_loss(mean, logvar, generator=torch.Generator().manual_seed(12)).z
    assert torch.equal(z1, z2) and torch.equal(z1, z3)
    assert (z1 != z4).float().mean() > 0.99
    torch.manual_seed(3)
    z5 = kl_loss(mean, logvar).z
    torch.manual_seed(3)
    assert torch.equal(z5, kl_loss(mean, logvar).z)


def test_philox_noise_is_standard_normal(device):
    n = 3 * 4096 + 77
    zero = torch.zeros(n, device=device)
    eps = ve_loss(zero, zero, generator=torch.Generator().manual_seed(0)).z.double().cpu()
    assert stats.kstest(eps.numpy(), "norm").pvalue > 1e-3
    assert abs(eps.mean().item()) < 5 / n**0.5 and abs(eps.std().item() - 1) < 0.03
    # the four Philox outputs of one counter fill four sub-blocks of a group: they must be uncorrelated
    q = R.NOISE_Q
    lanes = eps[: 3 * 4 * q].view(3, 4, q).permute(1, 0, 2).reshape(4, -1)
    corr = torch.corrcoef(lanes)
    assert (corr - torch.eye(4, dtype=corr.dtype)).abs().max() < 0.1


@pytest.mark.parametrize("kind,reduction", [("ve", "mean"), ("kl", "sum")])
def test_philox_backward_regenerates_forward_noise(kind, reduction, device):
    """Backward with in-kernel noise equals the float64 reference fed eps = (z - mean) / std."""
    mean, logvar, _ = inputs((3, 5, 70), torch.float64, lv_scale=0.5, device=device)
    kw = kind_kw(kind)
    m, lv = leaf(mean), leaf(logvar)
    outs = fused(kind, m, lv, reduction=reduction, generator=torch.Generator().manual_seed(7), **kw)
    eps = (outs[0].detach() - mean) / torch.exp(0.5 * logvar)
    m2, lv2 = leaf(mean), leaf(logvar)
    ref = reference(kind, m2, lv2, eps, reduction=reduction, **kw)
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-12)
    gouts = upstream(outs, torch.float64)
    for a, b in zip(grads_of(outs, (m, lv), gouts), grads_of(ref, (m2, lv2), gouts)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_philox_gradient_by_finite_differences(device):
    """Directional central difference of loss + <w, z> with a fixed seed (float64) vs the backward."""
    mean, logvar, _ = inputs((2, 3, 4), torch.float64, lv_scale=0.5, device=device)
    g = torch.Generator().manual_seed(9)
    w, vm, vl = (torch.randn(2, 3, 4, generator=g, dtype=torch.float64).to(device) for _ in range(3))

    def f(m, lv):
        out = ve_loss(m, lv, generator=torch.Generator().manual_seed(4), reduction="sum", **VE_KW)
        return out.loss + (out.z * w).sum()

    m, lv = leaf(mean), leaf(logvar)
    gm, glv = torch.autograd.grad(f(m, lv), (m, lv))
    h = 1e-6
    fd = (f(mean + h * vm, logvar + h * vl) - f(mean - h * vm, logvar - h * vl)) / (2 * h)
    torch.testing.assert_close(fd, (gm * vm).sum() + (glv * vl).sum(), rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# eager CPU path (outside the interpreter)
# ---------------------------------------------------------------------------------------------
@pytest.mark.expect_fallback("ve_loss:cpu", "kl_loss:cpu")
def test_eager_cpu_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    mean, logvar, noise = inputs((2, 3, 4), torch.float32)
    out = ve_loss(mean, logvar, noise, **VE_KW)
    ref = ve_loss_reference(mean, logvar, noise, **VE_KW)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    z = kl_loss(mean, logvar, generator=torch.Generator().manual_seed(2)).z
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(z, kl_loss_reference(mean, logvar, eps).z, rtol=0, atol=0)
    from vefast.ops._common import reported_fallbacks
    assert {"ve_loss:cpu", "kl_loss:cpu"} <= set(reported_fallbacks())  # never silent


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------
def test_bad_inputs():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="logvar must have the shape of mean"):
        ve_loss(x, torch.randn(2, 4))
    with pytest.raises(ValueError, match="noise must have the shape of mean"):
        kl_loss(x, x, torch.randn(3, 2))
    with pytest.raises(TypeError, match="mean must have dtype"):
        ve_loss(torch.ones(2, 3, dtype=torch.int64), x)
    with pytest.raises(TypeError, match="logvar must be a torch.Tensor"):
        ve_loss(x, 1.0)
    with pytest.raises(TypeError, match="logvar must have the dtype of mean"):
        ve_loss(x, x.double())
    with pytest.raises(TypeError, match="noise must have dtype"):
        ve_loss(x, x, torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="logvar must be on the device of mean"):
        ve_loss(x, x.to("meta"))
    with pytest.raises(ValueError, match="noise must be on the device of mean"):
        kl_loss(x, x, x.to("meta"))
    with pytest.raises(ValueError, match="reduction must be one of"):
        ve_loss(x, x, reduction="batchmean")
    with pytest.raises(ValueError, match="delta must be >= 0"):
        ve_loss(x, x, delta=-1e-3)
    for name in ("tau", "lambda_var", "lambda_reg", "delta"):
        with pytest.raises(ValueError, match=f"{name} must be finite"):
            ve_loss(x, x, **{name: float("nan")})
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        ve_loss(x, x, generator=1234)
    with pytest.raises(ValueError, match="at least one element"):
        kl_loss(torch.ones(0, 3), torch.ones(0, 3))
    with pytest.raises(ValueError, match="batch dim"):
        kl_loss(torch.tensor(1.0), torch.tensor(0.0), reduction="sum")
    with pytest.raises(ValueError, match="even size along dim 1"):
        R.ve_loss_from_moments(torch.randn(2, 3, 4))


def test_no_gradient_to_noise(device):
    mean, logvar, noise = inputs((2, 5), torch.float32, device=device)
    n = leaf(noise)
    out = ve_loss(leaf(mean), leaf(logvar), n)
    assert torch.autograd.grad(out.loss + out.z.sum(), n, allow_unused=True)[0] is None


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------
def test_torch_compile_fullgraph(device):
    kind = "ve"
    torch._dynamo.reset()
    mean, logvar, noise = inputs((2, 3, 5), torch.float32, device=device)
    kw = kind_kw(kind)

    def f(m, lv, n):
        return fused(kind, m, lv, n, reduction="sum", **kw)

    cf = torch.compile(f, fullgraph=True)
    m, lv = leaf(mean), leaf(logvar)
    outs = cf(m, lv, noise)
    m2, lv2 = leaf(mean), leaf(logvar)
    ref = f(m2, lv2, noise)
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    gouts = upstream(outs, torch.float32)
    for a, b in zip(grads_of(outs, (m, lv), gouts), grads_of(ref, (m2, lv2), gouts)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torch_compile_in_kernel_noise(device):
    torch._dynamo.reset()
    mean, logvar, _ = inputs((2, 3, 5), torch.float32, device=device)
    cf = torch.compile(lambda m, lv: tuple(ve_loss(m, lv)), fullgraph=True, backend="aot_eager")
    m, lv = leaf(mean), leaf(logvar)
    z, loss, _, _ = cf(m, lv)
    eps = (z.detach().double() - mean.double()) / torch.exp(0.5 * logvar.double())
    ref = ve_loss_reference(mean.double(), logvar.double(), eps)
    torch.testing.assert_close(loss.double(), ref.loss, rtol=1e-5, atol=0)
    gm, glv = torch.autograd.grad(loss, (m, lv))
    assert torch.isfinite(gm).all() and torch.isfinite(glv).all()


# ---------------------------------------------------------------------------------------------
# GPU lane: real sizes
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["ve", "kl"])
@pytest.mark.parametrize("shape", [(256, 64, 16, 16), (64, 8, 32, 32)], ids=str)
def test_gpu_real_sizes_bf16(kind, shape):
    g = torch.Generator(device="cuda").manual_seed(0)
    moments = torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16)
    mean, logvar = moments.chunk(2, dim=1)
    noise = torch.randn(mean.shape, device="cuda", generator=g).to(torch.bfloat16)
    check_against_reference(kind, mean, logvar, noise, "sum")
    zero = torch.zeros(mean.shape, device="cuda")
    eps = ve_loss(zero, zero, generator=torch.Generator(device="cuda").manual_seed(1)).z.double().flatten()
    assert stats.kstest(eps[:200_000].cpu().numpy(), "norm").pvalue > 1e-4
    a = R.ve_loss_from_moments(moments, generator=torch.Generator(device="cuda").manual_seed(3))
    b = ve_loss(mean, logvar, generator=torch.Generator(device="cuda").manual_seed(3))
    assert torch.equal(a.z, b.z) and torch.equal(a.loss, b.loss)
