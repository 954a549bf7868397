"""Flow-matching paths ([VR], Table 1; SiT's transport/path.py; docs/math.md §4).

Time convention: t = 0 is noise, t = 1 is data, ``x_t = alpha_t x1 + sigma_t eps`` (docs/math.md writes
a_t, m_t). ``h_t = alpha'_t - alpha_t sigma'_t / sigma_t`` and the SNR ``r_t = alpha_t / sigma_t``.
For codebases where t = 1 is noise (diffusers, some SiT variants) evaluate at ``1 - t``.

| path   | alpha_t                                               | sigma_t              |
| linear | t                                                     | 1 - t                |
| cosine | sin(pi t / 2)                                         | cos(pi t / 2)        |
| vp     | exp(-1/4 (1-t)^2 (bmax - bmin) - 1/2 (1-t) bmin)      | sqrt(1 - alpha_t^2)  |

with SiT's bmin = 0.1, bmax = 20. Every function takes t in [0, 1] (a tensor, or a number) and works
elementwise in the dtype of t (float32 / float64; integers become the default float dtype). At t = 1,
``snr`` and ``h`` are +inf (sigma_1 = 0).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from ..ops._common import host_item

PATHS = ("linear", "cosine", "vp")
VP_BETA_MIN = 0.1
VP_BETA_MAX = 20.0


def _as_t(t: torch.Tensor | float, name: str = "t") -> torch.Tensor:
    """``t`` as a floating tensor. Values are checked where that is free: a number, or a CPU tensor
    (one host-side reduction). Device (CUDA) tensors are not value-checked: reading a verdict back
    would stall the GPU queue on every training step (a device-side ``torch._assert_async`` would not
    stall, but a failure kills the CUDA context with an opaque error, and it costs kernels per call).
    The samplers' t lie in (0, 1) by construction; t outside [0, 1] gives meaningless coefficients."""
    if isinstance(t, bool) or not isinstance(t, (torch.Tensor, int, float)):
        raise TypeError(f"{name} must be a tensor or a real number, got {type(t).__name__}")
    if not isinstance(t, torch.Tensor) and not 0.0 <= t <= 1.0:  # NaN fails both comparisons
        raise ValueError(f"{name} must lie in [0, 1] (t = 0 noise, t = 1 data), got {t}")
    t = torch.as_tensor(t)
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    if t.device.type == "cpu" and t.numel() and not torch.compiler.is_compiling():
        inside = (t >= 0) & (t <= 1)  # NaN compares False
        if not host_item(inside.all()):
            raise ValueError(f"{name} must lie in [0, 1] (t = 0 noise, t = 1 data), got {t[~inside].flatten()[0].item()}")
    return t


class Path(ABC):
    """A flow-matching path ``x_t = alpha_t x1 + sigma_t eps`` (t = 1 is data); see the module doc."""

    name: str = ""

    @abstractmethod
    def _alpha(self, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _sigma(self, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _d_alpha(self, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _d_sigma(self, t: torch.Tensor) -> torch.Tensor: ...

    def alpha(self, t: torch.Tensor | float) -> torch.Tensor:
        """alpha_t, the data coefficient."""
        return self._alpha(_as_t(t))

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """sigma_t, the noise coefficient."""
        return self._sigma(_as_t(t))

    def d_alpha(self, t: torch.Tensor | float) -> torch.Tensor:
        """d alpha_t / dt."""
        return self._d_alpha(_as_t(t))

    def d_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """d sigma_t / dt."""
        return self._d_sigma(_as_t(t))

    def snr(self, t: torch.Tensor | float) -> torch.Tensor:
        """r_t = alpha_t / sigma_t (+inf at t = 1)."""
        t = _as_t(t)
        return self._alpha(t) / self._sigma(t)

    def h(self, t: torch.Tensor | float) -> torch.Tensor:
        """h_t = alpha'_t - alpha_t sigma'_t / sigma_t ([VR], Lemma 3.1; +inf at t = 1)."""
        t = _as_t(t)
        return self._d_alpha(t) - self._alpha(t) * self._d_sigma(t) / self._sigma(t)

    def __repr__(self) -> str:
        return f"vefast.path({self.name!r})"


class LinearPath(Path):
    name = "linear"

    def _alpha(self, t):
        return t.clone()

    def _sigma(self, t):
        return 1.0 - t

    def _d_alpha(self, t):
        return torch.ones_like(t)

    def _d_sigma(self, t):
        return -torch.ones_like(t)


class CosinePath(Path):
    name = "cosine"

    def _alpha(self, t):
        return torch.sin(0.5 * math.pi * t)

    def _sigma(self, t):
        return torch.cos(0.5 * math.pi * t).clamp_min(0.0)

    def _d_alpha(self, t):
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)

    def _d_sigma(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)


class VPPath(Path):
    """SiT's VPCPlan: log alpha_t = -1/4 (1-t)^2 (bmax - bmin) - 1/2 (1-t) bmin."""

    name = "vp"

    @staticmethod
    def _log_mean(t):
        s = 1.0 - t
        return -0.25 * s * s * (VP_BETA_MAX - VP_BETA_MIN) - 0.5 * s * VP_BETA_MIN

    @staticmethod
    def _d_log_mean(t):
        return 0.5 * (1.0 - t) * (VP_BETA_MAX - VP_BETA_MIN) + 0.5 * VP_BETA_MIN

    def _alpha(self, t):
        return torch.exp(self._log_mean(t))

    def _sigma(self, t):
        return torch.sqrt(-torch.expm1(2.0 * self._log_mean(t)))  # 1 - alpha^2 without cancellation

    def _d_alpha(self, t):
        return self._alpha(t) * self._d_log_mean(t)

    def _d_sigma(self, t):
        a2 = torch.exp(2.0 * self._log_mean(t))
        return -a2 * self._d_log_mean(t) / self._sigma(t)


_PATHS = {"linear": LinearPath, "cosine": CosinePath, "vp": VPPath}


def path(name: str | Path) -> Path:
    """The flow-matching path ``name`` in ("linear", "cosine", "vp") (docs/math.md §4); t = 1 is data."""
    if isinstance(name, Path):
        return name
    if not isinstance(name, str):
        raise TypeError(f"path must be a name in {PATHS} or a vefast path, got {type(name).__name__}")
    if name not in _PATHS:
        raise ValueError(f"unknown path {name!r}; expected one of {PATHS}")
    return _PATHS[name]()
