"""Flow-matching paths (docs/math.md §4): coefficients, derivatives, h_t and SNR against closed forms."""
from __future__ import annotations

import math

import pytest
import torch

import vefast
from vefast.sampling.paths import VP_BETA_MAX, VP_BETA_MIN

T = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)


def test_linear_and_cosine_closed_forms():
    lin, cos = vefast.path("linear"), vefast.path("cosine")
    torch.testing.assert_close(lin.alpha(T), T)
    torch.testing.assert_close(lin.sigma(T), 1 - T)
    torch.testing.assert_close(lin.snr(T), T / (1 - T))
    torch.testing.assert_close(lin.h(T), 1 / (1 - T))
    torch.testing.assert_close(cos.snr(T), torch.tan(math.pi * T / 2))
    torch.testing.assert_close(cos.h(T), (math.pi / 2) / torch.cos(math.pi * T / 2))


def test_vp_matches_sit_constants():
    vp = vefast.path("vp")
    lmc = -0.25 * (1 - T) ** 2 * (VP_BETA_MAX - VP_BETA_MIN) - 0.5 * (1 - T) * VP_BETA_MIN
    torch.testing.assert_close(vp.alpha(T), torch.exp(lmc))
    torch.testing.assert_close(vp.sigma(T), torch.sqrt(1 - torch.exp(2 * lmc)))
    assert VP_BETA_MIN == 0.1 and VP_BETA_MAX == 20.0


@pytest.mark.parametrize("name", ["linear", "cosine", "vp"])
def test_derivatives_by_finite_differences(name):
    p = vefast.path(name)
    eps = 1e-6
    for f, df in ((p.alpha, p.d_alpha), (p.sigma, p.d_sigma)):
        fd = (f(T + eps) - f(T - eps)) / (2 * eps)
        torch.testing.assert_close(df(T), fd, rtol=1e-6, atol=1e-7)
    h = p.d_alpha(T) - p.alpha(T) * p.d_sigma(T) / p.sigma(T)
    torch.testing.assert_close(p.h(T), h)
    assert torch.all(p.snr(T[1:]) > p.snr(T[:-1]))  # SNR increases towards the data end


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_endpoints(name):
    p = vefast.path(name)
    assert float(p.alpha(0.0)) == pytest.approx(0.0, abs=1e-7) and float(p.sigma(0.0)) == pytest.approx(1.0)
    assert float(p.sigma(1.0)) == pytest.approx(0.0, abs=1e-7) and math.isinf(float(p.snr(1.0)))


def test_dtype_and_scalar_inputs():
    p = vefast.path("linear")
    assert p.alpha(torch.tensor([0.5], dtype=torch.float32)).dtype == torch.float32
    assert float(p.snr(0.5)) == pytest.approx(1.0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown path 'edm'"):
        vefast.path("edm")
    with pytest.raises(TypeError, match="path must be a name"):
        vefast.path(3)
    p = vefast.path("cosine")
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        p.snr(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        p.h(torch.tensor([float("nan")]))
    with pytest.raises(TypeError, match="t must be a tensor or a real number"):
        p.alpha("0.5")
    for bad in (1.5, -0.25, float("nan")):
        with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
            p.sigma(bad)


def test_device_tensors_are_not_read():
    """Values are checked for numbers and CPU tensors only: a meta tensor stands in for a CUDA one here
    (any host read of it would raise), out of range on purpose."""
    t = torch.full((3, 1, 1, 1), 2.0, device="meta")
    for name in ("linear", "cosine", "vp"):
        p = vefast.path(name)
        for f in (p.alpha, p.sigma, p.d_alpha, p.d_sigma, p.snr, p.h):
            assert f(t).device.type == "meta" and f(t).shape == t.shape
    assert vefast.UniformSampler().icdf(t).device.type == "meta"
