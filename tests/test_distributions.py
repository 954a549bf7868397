"""vefast.nn.DiagonalGaussianDistribution against a verbatim re-implementation of LDM's class."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vefast.nn import DiagonalGaussianDistribution
from vefast.ops.reparam import kl_loss_reference, ve_loss_reference


class LDMDiagonalGaussian:
    """``ldm/modules/distributions/distributions.py`` (CompVis latent-diffusion / stable-diffusion), verbatim."""

    def __init__(self, parameters, deterministic=False):
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if self.deterministic:
            self.var = self.std = torch.zeros_like(self.mean).to(device=self.parameters.device)

    def sample(self):
        x = self.mean + self.std * torch.randn(self.mean.shape).to(device=self.parameters.device)
        return x

    def kl(self, other=None):
        if self.deterministic:
            return torch.Tensor([0.0])
        else:
            if other is None:
                return 0.5 * torch.sum(torch.pow(self.mean, 2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
            else:
                return 0.5 * torch.sum(
                    torch.pow(self.mean - other.mean, 2) / other.var
                    + self.var / other.var
                    - 1.0
                    - self.logvar
                    + other.logvar,
                    dim=[1, 2, 3],
                )

    def nll(self, sample, dims=[1, 2, 3]):  # noqa: B006 (verbatim)
        if self.deterministic:
            return torch.Tensor([0.0])
        logtwopi = np.log(2.0 * np.pi)
        return 0.5 * torch.sum(logtwopi + self.logvar + torch.pow(sample - self.mean, 2) / self.var, dim=dims)

    def mode(self):
        return self.mean


def moments(shape=(2, 8, 3, 5), seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(shape, generator=g, dtype=torch.float64)
    m[:, 0, 0, 0] = 25.0  # a mean channel entry (no clamp)
    m[:, shape[1] // 2, 0, 0] = -40.0  # a logvar entry in the clamp region
    return m.to(device, dtype).requires_grad_()


def test_attributes_and_eager_methods_match_ldm():
    p, q = moments(seed=0), moments(seed=1)
    ours, ldm = DiagonalGaussianDistribution(p), LDMDiagonalGaussian(p)
    other_ours, other_ldm = DiagonalGaussianDistribution(q), LDMDiagonalGaussian(q)
    assert ours.parameters is p and ours.deterministic is False
    for name in ("mean", "logvar", "std", "var"):
        torch.testing.assert_close(getattr(ours, name), getattr(ldm, name), rtol=0, atol=0)
    torch.testing.assert_close(ours.mode(), ldm.mode(), rtol=0, atol=0)
    x = torch.randn_like(ldm.mean)
    pairs = [(ours.kl(), ldm.kl()), (ours.kl(other_ours), ldm.kl(other_ldm)), (ours.nll(x), ldm.nll(x)),
             (ours.nll(x, dims=[1, 2]), ldm.nll(x, dims=[1, 2]))]
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    ga = torch.autograd.grad(sum(a.sum() for a, _ in pairs), p)[0]
    gb = torch.autograd.grad(sum(b.sum() for _, b in pairs), p)[0]
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=0)


def test_deterministic_posterior():
    p = moments()
    ours, ldm = DiagonalGaussianDistribution(p, deterministic=True), LDMDiagonalGaussian(p, deterministic=True)
    torch.testing.assert_close(ours.std, ldm.std, rtol=0, atol=0)
    torch.testing.assert_close(ours.var, ldm.var, rtol=0, atol=0)
    torch.testing.assert_close(ours.sample(), ldm.sample(), rtol=0, atol=0)
    torch.testing.assert_close(ours.kl(), ldm.kl(), rtol=0, atol=0)  # CPU float32 [0.], as LDM
    torch.testing.assert_close(ours.nll(ldm.mean), ldm.nll(ldm.mean), rtol=0, atol=0)
    out = ours.kl_loss()
    assert out.z is ours.mean and out.loss.item() == 0.0
    with pytest.raises(ValueError, match="deterministic=True"):
        ours.ve()


def test_derived_tensors_are_lazy(device):
    ours = DiagonalGaussianDistribution(moments(device=device))
    ours.ve(noise=torch.randn(2, 4, 3, 5, dtype=torch.float64, device=device))
    ours.sample()
    ours.kl_loss(reduction="sum")
    assert not {"logvar", "std", "var"} & set(vars(ours))
    _ = ours.std
    assert {"logvar", "std"} <= set(vars(ours))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_ve_and_kl_match_reference(dtype, device):
    p = moments(dtype=dtype, device=device)
    noise = torch.randn(2, 4, 3, 5, dtype=torch.float64, device=device)
    out = DiagonalGaussianDistribution(p).ve(noise=noise, reduction="sum", lambda_reg=1e-3)
    p64 = p.detach().double().requires_grad_()
    m64, lv64 = p64.chunk(2, dim=1)
    ref = ve_loss_reference(m64, lv64, noise, reduction="sum", lambda_reg=1e-3)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.double(), b.detach(), **tol)
    dz = torch.randn(2, 4, 3, 5, dtype=torch.float64, device=device)
    one = torch.tensor(1.0, device=device)
    (g,) = torch.autograd.grad((out.z, out.loss), p, (dz.to(dtype), one))
    (gr,) = torch.autograd.grad((ref.z, ref.loss), p64, (dz.to(dtype).double(), one.double()))
    assert g.dtype == dtype and g.is_contiguous()
    torch.testing.assert_close(g.double(), gr, **tol)
    assert (g[:, 4, 0, 0] == 0).all()  # clamp region of logvar
    # fused KL, "sum" reduction == LDM's kl().sum() / B
    kl = DiagonalGaussianDistribution(p).kl_loss(noise=noise, reduction="sum")
    ldm = LDMDiagonalGaussian(p64).kl()
    torch.testing.assert_close(kl.loss.double(), ldm.sum().detach() / 2, **tol)
    torch.testing.assert_close(kl.z.double(), kl_loss_reference(m64, lv64, noise).z.detach(), **tol)


def test_sample_uses_the_generator_and_is_differentiable(device):
    p = moments(shape=(2, 6, 4, 4), dtype=torch.float32, device=device)
    post = DiagonalGaussianDistribution(p)
    z1 = post.sample(generator=torch.Generator().manual_seed(1))
    z2 = post.sample(generator=torch.Generator().manual_seed(1))
    z3 = post.sample(generator=torch.Generator().manual_seed(2))
    assert torch.equal(z1, z2) and not torch.equal(z1, z3)
    eps = (z1.detach().double() - post.mean.double()) / post.std.double()
    (g,) = torch.autograd.grad(z1.sum(), p)
    expected = torch.cat([torch.ones_like(eps), torch.where(post.logvar == post._logvar_raw, 0.5 * post.std * eps, 0)], 1)
    torch.testing.assert_close(g.double(), expected.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.expect_fallback("DiagonalGaussianDistribution.sample:cpu")
def test_eager_cpu_sample_is_ldms_stream(monkeypatch):
    """Outside the interpreter, float32 CPU sampling draws exactly LDM's torch.randn stream."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p = moments(shape=(2, 6, 4, 4), dtype=torch.float32)
    torch.manual_seed(123)
    ours = DiagonalGaussianDistribution(p).sample()
    torch.manual_seed(123)
    theirs = LDMDiagonalGaussian(p).sample()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_bad_parameters():
    with pytest.raises(ValueError, match="even size along dim 1"):
        DiagonalGaussianDistribution(torch.randn(2, 3, 4, 4))
    with pytest.raises(TypeError, match="parameters must be a torch.Tensor"):
        DiagonalGaussianDistribution([1.0, 2.0])
    with pytest.raises(ValueError, match="reduction must be one of"):
        DiagonalGaussianDistribution(torch.randn(2, 4, 2, 2)).ve(reduction="none")
