"""Drop-in ``DiagonalGaussianDistribution`` (LDM / VA-VAE, ``ldm/modules/distributions/distributions.py``)
whose sampling and losses run the fused reparameterization op (:mod:`vefast.ops.reparam`, MATH.md §1-2).

Differences from LDM's class, all deliberate:
- ``logvar`` (clamped to [-30, 20]), ``var`` and ``std`` are computed on first access and cached, so a
  trainer that only calls :meth:`ve` / :meth:`kl_loss` / :meth:`sample` never materializes them.
- :meth:`sample` takes an optional ``generator`` and runs the fused kernel (in-kernel Philox noise on
  the Triton path; ``torch.randn(mean.shape, generator=...)`` on the eager CPU path, which for
  float32 draws the same stream as LDM's ``torch.randn(self.mean.shape)``).
- ``deterministic=True``: :meth:`kl` / :meth:`nll` return ``zeros(1)`` on the parameters' device and
  dtype (LDM returns a CPU ``torch.Tensor([0.])``); :meth:`sample` returns ``mean``.
- New: :meth:`ve` (fused VE loss, one call) and :meth:`kl_loss` (fused, reduced KL), both reading
  ``moments`` in place and writing its gradient in one buffer.
"""
from __future__ import annotations

import math
from functools import cached_property

import torch

from ..ops.reparam import KLOutput, VEOutput, kl_loss_from_moments, ve_loss_from_moments

__all__ = ["DiagonalGaussianDistribution"]


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) from ``parameters`` = encoder moments (B, 2C, ...), halves along dim 1."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        if not isinstance(parameters, torch.Tensor):
            raise TypeError(f"parameters must be a torch.Tensor, got {type(parameters).__name__}")
        if parameters.dim() < 2 or parameters.shape[1] % 2:
            raise ValueError("parameters must have an even size along dim 1 (mean, logvar), "
                             f"got shape {tuple(parameters.shape)}")
        self.parameters = parameters
        self.deterministic = bool(deterministic)
        self.mean, self._logvar_raw = torch.chunk(parameters, 2, dim=1)

    # -- LDM attributes, lazy -------------------------------------------------------------------
    @cached_property
    def logvar(self) -> torch.Tensor:
        """``clamp(logvar, -30, 20)`` (gradient 0 outside, as LDM)."""
        return torch.clamp(self._logvar_raw, -30.0, 20.0)

    @cached_property
    def std(self) -> torch.Tensor:
        return torch.zeros_like(self.mean) if self.deterministic else torch.exp(0.5 * self.logvar)

    @cached_property
    def var(self) -> torch.Tensor:
        return torch.zeros_like(self.mean) if self.deterministic else torch.exp(self.logvar)

    def _zero(self) -> torch.Tensor:
        return torch.zeros(1, device=self.parameters.device, dtype=self.parameters.dtype)

    # -- LDM methods ----------------------------------------------------------------------------
    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """``z = mean + std * eps`` (fused; the noise is drawn from ``generator``)."""
        if self.deterministic:
            return self.mean
        return kl_loss_from_moments(self.parameters, generator=generator).z

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """Per-sample KL summed over dims [1, 2, 3] (LDM). ``.sum() / B`` equals
        ``self.kl_loss(reduction="sum").loss`` (the fused form)."""
        if self.deterministic:
            return self._zero()
        if other is None:
            return 0.5 * torch.sum(torch.pow(self.mean, 2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(torch.pow(self.mean - other.mean, 2) / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar, dim=[1, 2, 3])

    def nll(self, sample: torch.Tensor, dims: list[int] | tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
        """Gaussian negative log-likelihood of ``sample``, summed over ``dims`` (LDM)."""
        if self.deterministic:
            return self._zero()
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + torch.pow(sample - self.mean, 2) / self.var,
                               dim=list(dims))

    # -- fused losses ---------------------------------------------------------------------------
    def ve(self, **kwargs) -> VEOutput:
        """Fused z and VE loss in one call: ``vefast.ve_loss`` on (mean, logvar); kwargs as there
        (``noise``, ``lambda_var``, ``lambda_reg``, ``tau``, ``delta``, ``reduction``, ``generator``)."""
        if self.deterministic:
            raise ValueError("ve() needs a stochastic posterior: this one has deterministic=True (var = 0)")
        return ve_loss_from_moments(self.parameters, **kwargs)

    def kl_loss(self, **kwargs) -> KLOutput:
        """Fused z and reduced KL: ``vefast.kl_loss`` on (mean, logvar); kwargs ``noise``,
        ``reduction``, ``generator``. ``reduction="sum"`` is LDM's ``kl().sum() / B``."""
        if self.deterministic:
            return KLOutput(self.mean, torch.zeros((), device=self.parameters.device,
                                                   dtype=torch.float64 if self.parameters.dtype == torch.float64
                                                   else torch.float32))
        return kl_loss_from_moments(self.parameters, **kwargs)
