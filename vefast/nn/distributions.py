"""Drop-in ``DiagonalGaussianDistribution`` (LDM / VA-VAE, ``ldm/modules/distributions/distributions.py``)
whose sampling and losses run the fused reparameterization op (:mod:`vefast.ops.reparam`, docs/math.md §1-2).

Same as LDM's class (tested against its behaviour):
- :meth:`sample` on the eager path (CPU tensors outside the Triton interpreter) computes LDM's
  ``mean + std * torch.randn(mean.shape).to(device)``: float32 noise from the default CPU generator
  (or ``generator``), promoted, so the RNG stream, the values and the output dtype (float32 for
  bf16/fp16 moments, float64 for float64) are LDM's.
- ``deterministic=True``: :meth:`sample` still consumes one ``randn`` and returns the mean promoted
  as above; :meth:`kl` / :meth:`nll` return LDM's CPU float32 ``tensor([0.])``.
- :meth:`kl` takes VA-VAE's ``no_sum`` (its ``pp_style`` loss): without ``other`` it returns the
  unsummed ``mean^2 + var - 1 - logvar`` (no 0.5, as VA-VAE); with ``other`` the flag is ignored.

Differences, all deliberate:
- ``logvar`` (clamped to [-30, 20]), ``var`` and ``std`` are computed on first access and cached, so a
  trainer that only calls :meth:`ve` / :meth:`kl_loss` / :meth:`sample` never materializes them.
- On the fused path (CUDA tensors, or the interpreter) :meth:`sample` draws its noise inside the
  kernel (Philox, seed from ``generator`` / the default CPU generator): another stream than
  ``torch.randn``, as it must be; z is computed in fp32, rounded to the moments' dtype, then promoted
  to LDM's output dtype.
- :meth:`nll` refuses a ``sample`` whose shape is not the mean's (LDM broadcasts silently).
- New: :meth:`ve` (fused VE loss, one call) and :meth:`kl_loss` (fused, reduced KL), both reading
  ``moments`` in place and writing its gradient in one buffer.
"""
from __future__ import annotations

import math
from functools import cached_property

import torch

from ..ops._common import check_generator, check_same_device, check_tensor, triton_path
from ..ops.reparam import KLOutput, VEOutput, kl_loss_from_moments, ve_loss_from_moments

__all__ = ["DiagonalGaussianDistribution"]


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) from ``parameters`` = encoder moments (B, 2C, ...), halves along dim 1."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        check_tensor("parameters", parameters)
        if parameters.dim() < 2 or parameters.shape[1] % 2:
            raise ValueError("parameters must have an even size along dim 1 (mean, logvar), "
                             f"got shape {tuple(parameters.shape)}")
        if parameters.numel() == 0:
            raise ValueError(f"parameters must have at least one element, got shape {tuple(parameters.shape)}")
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

    @staticmethod
    def _zero() -> torch.Tensor:
        """LDM's ``torch.Tensor([0.])`` of a deterministic posterior's kl / nll (CPU float32)."""
        return torch.zeros(1)

    def _ldm_noise(self, generator: torch.Generator | None) -> torch.Tensor:
        """LDM's ``torch.randn(mean.shape).to(device)``: float32, drawn on the generator's device."""
        check_generator(generator)
        where = generator.device if generator is not None else torch.device("cpu")
        return torch.randn(self.mean.shape, generator=generator, device=where).to(device=self.parameters.device)

    def _check_summed_dims(self, method: str, dims) -> None:
        if any(d >= self.mean.dim() or d < -self.mean.dim() for d in dims):
            raise ValueError(f"{method}() sums dims {list(dims)} (LDM): parameters of shape "
                             f"{tuple(self.parameters.shape)} have only {self.mean.dim()} dims")

    def _check_noise(self, noise: torch.Tensor | None) -> None:
        """Name the distribution's own terms in errors about ``noise`` (the ops would say ``moments``)."""
        if noise is None:
            return
        check_tensor("noise", noise)
        check_same_device(parameters=self.parameters, noise=noise)
        if noise.shape != self.mean.shape:
            raise ValueError(f"noise must have the shape of the mean {tuple(self.mean.shape)} (half of parameters "
                             f"{tuple(self.parameters.shape)} along dim 1), got {tuple(noise.shape)}")

    # -- LDM methods ----------------------------------------------------------------------------
    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """``z = mean + std * eps``: LDM's formula and RNG stream on the eager path, the fused kernel with
        in-kernel noise from ``generator`` otherwise; the result has LDM's dtype (the moments' dtype
        promoted with float32)."""
        if self.deterministic or not triton_path("DiagonalGaussianDistribution.sample", self.parameters,
                                                 float64_in_kernel=True):
            return self.mean + self.std * self._ldm_noise(generator)
        z = kl_loss_from_moments(self.parameters, generator=generator).z
        return z.to(torch.promote_types(z.dtype, torch.float32))

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None, no_sum: bool = False) -> torch.Tensor:
        """Per-sample KL summed over dims [1, 2, 3] (LDM). ``.sum() / B`` equals
        ``self.kl_loss(reduction="sum").loss`` (the fused form). ``no_sum=True`` without ``other``:
        VA-VAE's unsummed ``mean^2 + var - 1 - logvar`` (no 0.5)."""
        if not isinstance(no_sum, bool):
            raise TypeError(f"no_sum must be a bool, got {type(no_sum).__name__}")
        if self.deterministic:
            return self._zero()
        summed = other is not None or not no_sum
        self._check_summed_dims("kl", (1, 2, 3) if summed else ())
        if other is None:
            if no_sum:
                return torch.pow(self.mean, 2) + self.var - 1.0 - self.logvar
            return 0.5 * torch.sum(torch.pow(self.mean, 2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(torch.pow(self.mean - other.mean, 2) / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar, dim=[1, 2, 3])

    def nll(self, sample: torch.Tensor, dims: list[int] | tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
        """Gaussian negative log-likelihood of ``sample`` (the mean's shape), summed over ``dims`` (LDM)."""
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"sample must be a torch.Tensor, got {type(sample).__name__}")
        if sample.shape != self.mean.shape:
            raise ValueError(f"sample must have the shape of the mean {tuple(self.mean.shape)}, got {tuple(sample.shape)}")
        if self.deterministic:
            return self._zero()
        self._check_summed_dims("nll", dims)
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + torch.pow(sample - self.mean, 2) / self.var,
                               dim=list(dims))

    # -- fused losses ---------------------------------------------------------------------------
    def ve(self, **kwargs) -> VEOutput:
        """Fused z and VE loss in one call: ``vefast.ve_loss`` on (mean, logvar); kwargs as there
        (``noise``, ``lambda_var``, ``lambda_reg``, ``tau``, ``delta``, ``reduction``, ``generator``)."""
        if self.deterministic:
            raise ValueError("ve() needs a stochastic posterior: this one has deterministic=True (var = 0)")
        self._check_noise(kwargs.get("noise"))
        return ve_loss_from_moments(self.parameters, **kwargs)

    def kl_loss(self, **kwargs) -> KLOutput:
        """Fused z and reduced KL: ``vefast.kl_loss`` on (mean, logvar); kwargs ``noise``,
        ``reduction``, ``generator``. ``reduction="sum"`` is LDM's ``kl().sum() / B``."""
        if self.deterministic:
            return KLOutput(self.mean, torch.zeros((), device=self.parameters.device,
                                                   dtype=torch.float64 if self.parameters.dtype == torch.float64
                                                   else torch.float32))
        self._check_noise(kwargs.get("noise"))
        return kl_loss_from_moments(self.parameters, **kwargs)
