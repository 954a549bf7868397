"""vefast.vf_loss (docs/math.md §3a) against float64 MATH references and a re-implementation of VA-VAE's code."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import err_bound, examples, strided
from hypothesis import given, settings
from hypothesis import strategies as st

import vefast
from vefast.ops._common import record_fallbacks
from vefast.ops.vf_loss import vf_loss_reference


def vavae_vf_loss(z, aux_feature, linear_proj_weight, cos_margin=0.5, distmat_margin=0.25, cos_weight=1.0,
                  distmat_weight=1.0):
    """VA-VAE's code path (LightningDiT vavae: AutoencoderKL.forward with reverse_proj=True, then
    LPIPSWithDiscriminator.forward's VF block), in the inputs' dtype."""
    z = F.conv2d(z, linear_proj_weight.reshape(*linear_proj_weight.shape[:2], 1, 1))   # self.linear_proj(z)
    z_flat = z.flatten(2)
    aux_feature_flat = aux_feature.flatten(2)
    z_norm = F.normalize(z_flat, dim=1)
    aux_feature_norm = F.normalize(aux_feature_flat, dim=1)
    z_cos_sim = torch.einsum("bci,bcj->bij", z_norm, z_norm)
    aux_feature_cos_sim = torch.einsum("bci,bcj->bij", aux_feature_norm, aux_feature_norm)
    diff = torch.abs(z_cos_sim - aux_feature_cos_sim)
    vf_loss_1 = F.relu(diff - distmat_margin).mean()
    vf_loss_2 = F.relu(1 - cos_margin - F.cosine_similarity(aux_feature, z)).mean()
    return vf_loss_1 * distmat_weight + vf_loss_2 * cos_weight, vf_loss_2, vf_loss_1


def math_vf_loss(z, f, w, m1, m2, w_cos=1.0, w_dms=1.0):
    """docs/math.md §3a token by token (float64, loops over the batch)."""
    total_cos, total_dms = 0.0, 0.0
    b, c = z.shape[:2]
    for i in range(b):
        zt = (w.reshape(w.shape[0], c) @ z[i].reshape(c, -1)).t()          # (N, D') = z'
        ft = f[i].reshape(f.shape[1], -1).t()
        zn = zt / zt.norm(dim=1, keepdim=True)
        fn = ft / ft.norm(dim=1, keepdim=True)
        total_cos = total_cos + torch.relu(1 - m1 - (zn * fn).sum(1)).sum()
        total_dms = total_dms + torch.relu((zn @ zn.t() - fn @ fn.t()).abs() - m2).sum()
    n = z.shape[2] * z.shape[3]
    cos_loss, dms_loss = total_cos / (b * n), total_dms / (b * n * n)
    return w_cos * cos_loss + w_dms * dms_loss, cos_loss, dms_loss


def make(b, c, h, w, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    f = torch.randn(b, d, h, w, generator=g, dtype=torch.float64) + 0.3      # correlated tokens
    wt = torch.randn(d, c, generator=g, dtype=torch.float64) / c ** 0.5
    return tuple(t.to(device=device, dtype=dtype) for t in (z, f, wt))


def grads(out, z, w):
    return torch.autograd.grad(out[0] + 0.5 * out[1] + 0.25 * out[2], (z, w))


def ref64(z, f, w, **kw):
    z64 = z.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    out = vf_loss_reference(z64, f.double(), w64, **kw)
    return out, grads(out, z64, w64)


SHAPES = [(2, 4, 3, 5, 20), (1, 32, 4, 5, 40), (3, 8, 2, 2, 16), (2, 3, 5, 7, 33)]


@pytest.mark.parametrize("shape", SHAPES)
def test_math_reference_and_vavae_agree(shape):
    z, f, w = make(*shape, dtype=torch.float64)
    for m1, m2 in ((0.5, 0.25), (0.0, 0.0), (0.1, 0.05)):
        a = vf_loss_reference(z, f, w, margin_cos=m1, margin_dms=m2, weight_cos=0.7, weight_dms=1.3)
        b = math_vf_loss(z, f, w, m1, m2, 0.7, 1.3)
        c = vavae_vf_loss(z, f, w, m1, m2, 0.7, 1.3)
        for x, y, v in zip(a, b, c):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(x, v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("shape", "margins"), list(zip(SHAPES, [(0.5, 0.25), (0.0, 0.0), (0.1, 0.05), (0.3, 0.1)])))
def test_fused_fp32_matches_float64(device, shape, margins):
    m1, m2 = margins
    z, f, w = make(*shape, device=device, seed=hash((shape, margins)) % 1000)
    z.requires_grad_(), w.requires_grad_()
    out = vefast.vf_loss(z, f, w, margin_cos=m1, margin_dms=m2, weight_cos=0.7, weight_dms=1.3)
    gz, gw = grads(out, z, w)
    r, (rz, rw) = ref64(z, f, w, margin_cos=m1, margin_dms=m2, weight_cos=0.7, weight_dms=1.3)
    for x, y in zip(out, r):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gz.double(), rz, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_low_precision_within_eager_error(device, dtype):
    z, f, w = make(2, 8, 4, 5, 48, device=device, seed=3)
    zl, fl = z.to(dtype).requires_grad_(), f.to(dtype)
    wl = w.to(dtype).requires_grad_()
    out = vefast.vf_loss(zl, fl, wl, margin_cos=0.1, margin_dms=0.05)
    gz, gw = grads(out, zl, wl)
    assert gz.dtype == dtype and gw.dtype == dtype
    ze, we = zl.detach().clone().requires_grad_(), wl.detach().clone().requires_grad_()
    eager = vavae_vf_loss(ze, fl, we, 0.1, 0.05)
    ez, ew = grads(eager, ze, we)
    r, (rz, rw) = ref64(zl, fl, wl, margin_cos=0.1, margin_dms=0.05)
    for x, e, y in zip(out, eager, r):
        err_bound(x, e, y, floor=1e-4)
    err_bound(gz, ez, rz, floor=2e-4)
    err_bound(gw, ew, rw, floor=2e-4)


def test_strided_inputs_and_4d_weight(device):
    z, f, w = make(2, 6, 3, 4, 24, device=device, seed=5)
    zs, fs = strided(z).requires_grad_(), strided(f)
    w4 = w.reshape(*w.shape, 1, 1).clone().requires_grad_()
    assert not zs.is_contiguous() and not fs.is_contiguous()
    out = vefast.vf_loss(zs, fs, w4)
    gz, gw = grads(out, zs, w4)
    r, (rz, rw) = ref64(z, f, w4)
    torch.testing.assert_close(out.loss.double(), r.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gz.double(), rz, rtol=1e-4, atol=1e-6)
    assert gw.shape == w4.shape
    torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-6)


def test_mixed_dtypes_no_grad_and_determinism(device):
    z, f, w = make(2, 4, 4, 4, 32, device=device, seed=7)
    fb = f.to(torch.bfloat16)
    with torch.no_grad():
        a = vefast.vf_loss(z, fb, w)
    zr = z.clone().requires_grad_()
    b = vefast.vf_loss(zr, fb, w)
    c = vefast.vf_loss(zr, fb, w)
    assert torch.equal(a.loss, b.loss.detach()) and torch.equal(b.loss, c.loss)
    g1, = torch.autograd.grad(b.loss, zr)
    g2, = torch.autograd.grad(c.loss, zr)
    assert torch.equal(g1, g2)


def ref_grads_loss_only(z, f, w, **kw):
    z64 = z.detach().double().cpu().requires_grad_()
    w64 = w.detach().double().cpu().requires_grad_()
    out = vf_loss_reference(z64, f.double().cpu(), w64, **kw)
    return (out.loss, *torch.autograd.grad(out.loss, (z64, w64)))


@settings(max_examples=examples(6))
@given(b=st.integers(1, 2), c=st.integers(1, 12), h=st.integers(1, 5), w=st.integers(1, 6), d=st.integers(2, 36))
def test_shapes_property(device, b, c, h, w, d):
    """Any shape with D' >= 2 (D' = 1: test_single_feature_channel_gradient_is_rounding_noise)."""
    z, f, wt = make(b, c, h, w, d, device=device, seed=b * 1000 + c * 100 + h * 10 + w)
    z.requires_grad_(), wt.requires_grad_()
    out = vefast.vf_loss(z, f, wt, margin_cos=0.2, margin_dms=0.1)
    gz, gw = torch.autograd.grad(out.loss, (z, wt))
    rl, rz, rw = ref_grads_loss_only(z, f, wt, margin_cos=0.2, margin_dms=0.1)
    torch.testing.assert_close(out.loss.double().cpu(), rl, rtol=1e-5, atol=1e-6)
    # gradients: the flash-attn rule against the eager fp32 reference (with C = 1 the cosines are +-1 and
    # dL/dz is 0 up to rounding, so a fixed absolute tolerance would judge fp32 noise, not the kernel)
    ze, we = z.detach().clone().requires_grad_(), wt.detach().clone().requires_grad_()
    ez, ew = torch.autograd.grad(vf_loss_reference(ze, f, we, margin_cos=0.2, margin_dms=0.1).loss, (ze, we))
    err_bound(gz.cpu(), ez.cpu(), rz, floor=1e-6)  # ~8 fp32 ulps of the O(1) loss terms
    err_bound(gw.cpu(), ew.cpu(), rw, floor=1e-6)


@pytest.mark.parametrize("seed", range(8))
def test_single_feature_channel_gradient_is_rounding_noise(device, seed):
    """D' = 1: every cosine is +-1, the loss is piecewise constant in z and W and its exact gradient is 0.
    The fused backward forms it as differences of terms of size |W| |z_n| / ||W z_n|| (the conditioning
    of normalizing W z_n), so what is left is fp32 rounding at that scale: bounded by a few hundred eps
    times that condition number, per token. The loss itself matches the float64 reference."""
    b, c, h, w = 1 + seed % 2, 1 + seed % 5, 1 + seed % 3, 2 + seed % 4
    z, f, wt = make(b, c, h, w, 1, device=device, seed=seed)
    z.requires_grad_(), wt.requires_grad_()
    out = vefast.vf_loss(z, f, wt, margin_cos=0.2, margin_dms=0.1)
    gz, gw = torch.autograd.grad(out.loss, (z, wt))
    rl, rz, rw = ref_grads_loss_only(z, f, wt, margin_cos=0.2, margin_dms=0.1)
    torch.testing.assert_close(out.loss.double().cpu(), rl, rtol=1e-5, atol=1e-6)
    assert float(rz.abs().max()) < 1e-12 and float(rw.abs().max()) < 1e-12  # 0 up to float64 rounding
    zz = z.detach().double().cpu().reshape(b, c, -1)
    wz = torch.einsum("dc,bcn->bdn", wt.detach().double().cpu(), zz).norm(dim=1)
    cond = float((wt.detach().double().cpu().norm() * zz.norm(dim=1) / wz).max())
    bound = 1e-6 + 512 * torch.finfo(torch.float32).eps * cond / (b * h * w)
    assert float(gz.abs().max()) <= bound and float(gw.abs().max()) <= bound, (gz, gw, bound)


def test_torch_compile_fullgraph(device):
    z, f, w = make(2, 4, 3, 3, 20, device=device, seed=11)
    z.requires_grad_(), w.requires_grad_()

    def fn(z, f, w):
        return vefast.vf_loss(z, f, w, margin_cos=0.1, margin_dms=0.05).loss

    # inductor adds minutes of CPU codegen and nothing op-specific: aot_eager on CPU (dynamo + AOT
    # autograd through the fake implementation), inductor where CUDA runs the test
    backend = "inductor" if z.is_cuda else "aot_eager"
    loss = torch.compile(fn, fullgraph=True, backend=backend)(z, f, w)
    gz, gw = torch.autograd.grad(loss, (z, w))
    rl, rz, rw = ref_grads_loss_only(z, f, w, margin_cos=0.1, margin_dms=0.05)
    torch.testing.assert_close(loss.double().cpu(), rl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gz.double().cpu(), rz, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw.double().cpu(), rw, rtol=1e-4, atol=1e-6)


@pytest.mark.expect_fallback("vf_loss:cpu")
def test_cpu_eager_path_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    z, f, w = make(2, 4, 3, 3, 20, seed=13)
    out = vefast.vf_loss(z, f, w)
    r = vf_loss_reference(z.double(), f.double(), w.double())
    torch.testing.assert_close(out.loss.double(), r.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.expect_fallback("vf_loss:float64")
def test_float64_runs_reference_and_is_reported(device):
    z, f, w = make(2, 4, 3, 3, 20, dtype=torch.float64, device=device, seed=19)
    with record_fallbacks() as events:
        out = vefast.vf_loss(z, f, w)
    assert out.loss.dtype == torch.float64
    torch.testing.assert_close(out.loss, math_vf_loss(z, f, w, 0.5, 0.25)[0], rtol=1e-12, atol=1e-12)
    assert [e.key for e in events] == ["vf_loss:float64"]


@pytest.mark.parametrize("where", ["z", "features"])
def test_nan_propagates_like_eager(device, where):
    """A NaN in one token of z or of the features makes both terms NaN, as in the eager reference (the
    kernel's relu masks must not drop NaN)."""
    z, f, w = make(2, 4, 4, 5, 20, device=device, seed=23)
    (z if where == "z" else f)[1, 2, 3, 1] = float("nan")
    with record_fallbacks() as events:
        out = vefast.vf_loss(z, f, w)
    assert events == []  # the fused path ran
    ref = vf_loss_reference(z.double(), f.double(), w.double())
    assert torch.isnan(ref.cos_loss) and torch.isnan(ref.dms_loss)
    assert torch.isnan(out.cos_loss) and torch.isnan(out.dms_loss) and torch.isnan(out.loss)


def test_batch_groups_masked_dims_and_single_term_grads(device):
    """B = 9 (the backward's last batch group is partial), D' and N not multiples of the tiles, and a
    gradient of one term alone (the other term's upstream gradient is 0)."""
    z, f, w = make(9, 3, 3, 5, 17, device=device, seed=29)
    z.requires_grad_(), w.requires_grad_()
    for term in (1, 2):
        out = vefast.vf_loss(z, f, w, margin_cos=0.1, margin_dms=0.05)
        gz, gw = torch.autograd.grad(out[term], (z, w))
        z64, w64 = z.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        r = vf_loss_reference(z64, f.double(), w64, margin_cos=0.1, margin_dms=0.05)
        rz, rw = torch.autograd.grad(r[term], (z64, w64))
        torch.testing.assert_close(out[term].double(), r[term], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gz.double(), rz, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-6)


def test_feature_layout_messages():
    z, f, w = make(2, 4, 3, 5, 20)
    with pytest.raises(ValueError, match=r"\(B, D', h, w\) = \(B, D', 3, 5\).*\(2, 3, 5, 20\).*channels-last"):
        vefast.vf_loss(z, f.permute(0, 2, 3, 1), w)
    with pytest.raises(ValueError, match=r"\(B, D', h, w\) = \(B, D', 3, 5\).*\(2, 15, 20\).*tokens \(B, N, D'\)"):
        vefast.vf_loss(z, f.flatten(2).transpose(1, 2), w)


def test_bad_inputs():
    z, f, w = make(2, 4, 3, 3, 20)
    with pytest.raises(ValueError, match="feature grid"):
        vefast.vf_loss(z, f[:, :, :2], w)
    with pytest.raises(ValueError, match="batch size"):
        vefast.vf_loss(z, f[:1], w)
    with pytest.raises(ValueError, match="proj_weight must be"):
        vefast.vf_loss(z, f, w.t())
    with pytest.raises(ValueError, match=r"z must be \(B, C, h, w\)"):
        vefast.vf_loss(z[0], f, w)
    with pytest.raises(ValueError, match=r"features must be \(B, D', h, w\)"):
        vefast.vf_loss(z, f[0], w)
    with pytest.raises(TypeError, match="z must have dtype"):
        vefast.vf_loss(z.long(), f, w)
    with pytest.raises(TypeError, match="features must be a torch.Tensor"):
        vefast.vf_loss(z, f.numpy(), w)
    with pytest.raises(ValueError, match="must be on the device"):
        vefast.vf_loss(z, f.to("meta"), w)
    with pytest.raises(ValueError, match="margin_dms must be finite"):
        vefast.vf_loss(z, f, w, margin_dms=float("nan"))
    with pytest.raises(TypeError, match="weight_cos must be a real number"):
        vefast.vf_loss(z, f, w, weight_cos="1")


@pytest.mark.gpu
@pytest.mark.parametrize("d", [1024, 1536])
def test_gpu_real_size_bf16(d):
    z, f, w = make(8, 32, 32, 32, d, device="cuda", seed=17)
    zl, fl, wl = z.bfloat16().requires_grad_(), f.bfloat16(), w.requires_grad_()
    grads(vefast.vf_loss(zl, fl, wl), zl, wl)        # autotuning (its benchmark allocates) out of the way
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = vefast.vf_loss(zl, fl, wl)
    gz, gw = grads(out, zl, wl)
    torch.cuda.synchronize()
    # never a (B, N, N) matrix: the whole fwd+bwd stays below one bf16 similarity matrix
    assert torch.cuda.max_memory_allocated() - base < 8 * 1024 * 1024 * 2
    ze, we = zl.detach().clone().requires_grad_(), wl.detach().bfloat16().requires_grad_()
    eager = vavae_vf_loss(ze, fl, we)
    ez, ew = grads(eager, ze, we)
    r, (rz, rw) = ref64(zl, fl, wl)
    for x, e, y in zip(out, eager, r):
        err_bound(x, e, y.cuda(), floor=1e-4)
    err_bound(gz, ez, rz.cuda(), floor=1e-6)
    err_bound(gw, ew, rw.cuda(), floor=1e-6)
