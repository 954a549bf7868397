"""Timestep samplers sharing one protocol (``pdf``, ``cdf``, ``icdf``, ``sample``), so a trainer swaps
them freely: :class:`UniformSampler`, :class:`LogitNormalSampler` (SD3; docs/math.md §6) and
:class:`vefast.sampling.VRTimestepSampler`. t = 1 is data, t = 0 noise; for codebases where t = 1 is
noise use ``1 - sampler.sample(n)`` (and ``LogitNormalSampler(-m, s)`` for the same law).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from ..ops._common import check_generator, check_int
from ..ops.timestep_sample import T_HI, T_LO, uniforms_reference
from .paths import _as_t


def interp1d(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x, xp nondecreasing, flat outside [xp[0], xp[-1]]
    (``numpy.interp``); zero-width segments take the left value."""
    xp, fp = xp.to(device=x.device, dtype=torch.float64), fp.to(device=x.device, dtype=torch.float64)
    xd = x.to(torch.float64).clamp(xp[0], xp[-1])
    k = (torch.searchsorted(xp, xd, right=True) - 1).clamp_(0, xp.numel() - 2)
    x0, x1, f0, f1 = xp[k], xp[k + 1], fp[k], fp[k + 1]
    den = x1 - x0
    frac = torch.where(den > 0, (xd - x0) / torch.where(den > 0, den, 1.0), 0.0)
    return f0 + frac * (f1 - f0)


def _resolve_device(device: torch.device | str | None, generator: torch.Generator | None) -> torch.device:
    check_generator(generator)
    if device is None:
        return generator.device if generator is not None else torch.device("cpu")
    return torch.device(device)


class TimestepSampler(ABC):
    """Protocol of every vefast timestep sampler (t in (0, 1), t = 1 data)."""

    @abstractmethod
    def pdf(self, t: torch.Tensor | float) -> torch.Tensor:
        """Density pi(t), t in [0, 1]."""

    @abstractmethod
    def cdf(self, t: torch.Tensor | float) -> torch.Tensor:
        """Distribution function F(t) of the samples, t in [0, 1]."""

    @abstractmethod
    def icdf(self, u: torch.Tensor | float) -> torch.Tensor:
        """Inverse distribution function F^-1(u), u in [0, 1]."""

    def _draw(self, n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
        u = uniforms_reference(n, device=device, generator=generator)
        return self.icdf(u).to(torch.float32).clamp_(T_LO, T_HI)

    def sample(self, n: int, *, device: torch.device | str | None = None, generator: torch.Generator | None = None,
               return_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """n float32 timesteps in (0, 1) on ``device`` (default: the generator's device, else CPU).

        With ``return_weights=True`` also returns ``w = 1 / pi(t)`` (float32). ``E_pi[w] = 1`` exactly,
        so the weights are mean-1 without a batch-dependent rescaling, and ``E_pi[w f(t)]`` equals the
        uniform-t expectation of f: an unbiased reweighting back to uniform sampling. (Training with
        the sampler *without* weights optimizes a different, reweighted objective, which is the point
        of VR-sampling; the weights are for users who want the original objective with lower
        variance.)

        No host synchronization, so it can run every training step: the draws happen on the
        generator's device (from a CPU generator to a CUDA ``device``: a host->device copy that does not
        wait for the stream) and no value is read back.
        """
        check_int("n", n, min_value=0)
        dev = _resolve_device(device, generator)
        t = self._draw(n, dev, generator)
        if not return_weights:
            return t
        return t, (1.0 / self.pdf(t).to(torch.float64)).to(torch.float32)

    def ks_distance(self, other: TimestepSampler, num: int = 20001) -> float:
        """Kolmogorov-Smirnov distance ``sup_t |F_self(t) - F_other(t)|`` on a uniform grid of ``num`` t."""
        t = torch.linspace(0.0, 1.0, num, dtype=torch.float64)
        return float((self.cdf(t).double() - other.cdf(t).double()).abs().max())


class UniformSampler(TimestepSampler):
    """t ~ U(0, 1): the flow-matching default."""

    def pdf(self, t):
        return torch.ones_like(_as_t(t))

    def cdf(self, t):
        return _as_t(t).clone()

    def icdf(self, u):
        return _as_t(u, "u").clone()

    def __repr__(self) -> str:
        return "UniformSampler()"


class LogitNormalSampler(TimestepSampler):
    """SD3's logit-normal: ``t = sigmoid(m + s n)``, ``n ~ N(0, 1)`` (docs/math.md §6; [VR] §4.3).

    ``pdf(t) = 1/(s sqrt(2 pi)) 1/(t (1-t)) exp(-(logit t - m)^2 / (2 s^2))``,
    ``cdf(t) = Phi((logit t - m) / s)``. With t = 1 noise (diffusers, SiT variants) use m' = -m.
    """

    def __init__(self, m: float = 0.0, s: float = 1.0) -> None:
        from ..ops._common import check_finite_number

        check_finite_number("m", m)
        check_finite_number("s", s, min_value=0.0, strict=True)
        self.m, self.s = float(m), float(s)

    def pdf(self, t):
        t = _as_t(t)
        td = t.double()
        z = (torch.logit(td) - self.m) / self.s
        p = torch.exp(-0.5 * z * z) / (self.s * math.sqrt(2 * math.pi) * td * (1 - td))
        return torch.where((td > 0) & (td < 1), p, 0.0).to(t.dtype)

    def cdf(self, t):
        t = _as_t(t)
        return torch.special.ndtr((torch.logit(t.double()) - self.m) / self.s).to(t.dtype)

    def icdf(self, u):
        u = _as_t(u, "u")
        return torch.sigmoid(self.m + self.s * torch.special.ndtri(u.double())).to(u.dtype)

    def _draw(self, n, device, generator):
        gen_device = generator.device if generator is not None else torch.device("cpu")
        z = torch.randn(n, generator=generator, device=gen_device, dtype=torch.float64)
        z = z.to(device, non_blocking=z.device.type == "cpu")  # host->device: no stream sync
        return torch.sigmoid(self.m + self.s * z).to(torch.float32).clamp_(T_LO, T_HI)

    def __repr__(self) -> str:
        return f"LogitNormalSampler(m={self.m}, s={self.s})"
