"""The tree-shaped 2D Gaussian mixture of the toy example ([VE-supp] appendix C, docs/math.md §8).

Construction (our reading of "one branch split recursively 6 times, 8 anisotropic Gaussians per
segment, child weights scaled down and lengths/angles perturbed at each split", after Karras et
al. 2024, "Guiding a diffusion model with a bad version of itself"):

- a segment at depth ``d`` (0..6, so 1 + 2 + ... + 64 = 127 segments) starts at ``pos`` with
  direction ``angle``; its length is ``0.3 * 0.8**d * (1 + 0.2 n)``, ``n ~ N(0, 1)``;
- 8 components sit evenly along it (fractions 0.07 .. 0.93 of the length); each has weight
  ``length * 0.5**d`` (children get a smaller share), variance ``(0.06 length)**2`` along the
  segment and ``(0.012 * 0.8**d)**2`` across it (thin, anisotropic);
- two children start at its end, turned by ``±0.7**d * (1 + 0.2 n)`` radians;
- the root points at 45 degrees. 127 * 8 = 1016 components.

Then the coordinates are normalized **exactly** (closed-form mixture moments, not a sample) to zero
mean and standard deviation ``sigma_data = 0.5`` per axis: ``x' = (x - m) * 0.5 / s``, i.e.
``mu' = D (mu - m)``, ``Sigma' = D Sigma D`` with ``D = diag(0.5 / s)``.

Closed forms ([VE-supp] eqs. 20-23), with an optional isotropic smoothing ``sigma``
(``Sigma* = Sigma + sigma^2 I``):
``log p(x) = logsumexp_i [log phi_i + log N(x; mu_i, Sigma*_i)]`` and
``score(x) = sum_i w_i Sigma*_i^-1 (mu_i - x)`` with ``w_i`` the component posteriors.
All parameters are float64; evaluation runs in float64 and is chunked over the points.
Everything is deterministic given the seed (numpy ``default_rng`` for construction, a
``torch.Generator`` for sampling).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..ops._common import check_int

SIGMA_DATA = 0.5
DEPTH = 7            # segment depths 0..6: the main branch split recursively 6 times
PER_SEGMENT = 8      # Gaussians per segment
NUM_COMPONENTS = (2**DEPTH - 1) * PER_SEGMENT  # 1016


def _tree_components(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw (unnormalized) weights (K,), means (K, 2), covariances (K, 2, 2) of the tree."""
    rng = np.random.default_rng(seed)
    phis: list[float] = []
    mus: list[np.ndarray] = []
    sigmas: list[np.ndarray] = []

    def grow(depth: int, pos: np.ndarray, angle: float) -> None:
        if depth >= DEPTH:
            return
        direction = np.array([math.cos(angle), math.sin(angle)])
        length = 0.3 * 0.8**depth * (1.0 + 0.2 * rng.standard_normal())
        along = (0.06 * length) ** 2
        across = (0.012 * 0.8**depth) ** 2
        outer = np.outer(direction, direction)
        cov = along * outer + across * (np.eye(2) - outer)
        for frac in np.linspace(0.07, 0.93, PER_SEGMENT):
            phis.append(length * 0.5**depth)
            mus.append(pos + direction * length * frac)
            sigmas.append(cov)
        end = pos + direction * length
        for sign in (1.0, -1.0):
            grow(depth + 1, end, angle + sign * 0.7**depth * (1.0 + 0.2 * rng.standard_normal()))

    grow(0, np.zeros(2), math.pi / 4)
    phi = np.asarray(phis)
    return phi / phi.sum(), np.stack(mus), np.stack(sigmas)


class GaussianMixture2D:
    """A 2D Gaussian mixture with closed-form log-density, score and exact sampling (float64)."""

    def __init__(self, phi: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> None:
        phi = torch.as_tensor(phi, dtype=torch.float64)
        mu = torch.as_tensor(mu, dtype=torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if phi.ndim != 1 or mu.shape != (phi.numel(), 2) or sigma.shape != (phi.numel(), 2, 2):
            raise ValueError(f"expected phi (K,), mu (K, 2), sigma (K, 2, 2); got {tuple(phi.shape)}, "
                             f"{tuple(mu.shape)}, {tuple(sigma.shape)}")
        if not bool((phi > 0).all()):
            raise ValueError("mixture weights phi must be positive")
        self.phi = phi / phi.sum()
        self.mu = mu
        self.sigma = sigma
        self._chol = torch.linalg.cholesky(sigma)  # raises on a non-positive-definite covariance

    @classmethod
    def tree(cls, seed: int = 0) -> "GaussianMixture2D":
        """The 1016-component tree, normalized to zero mean and std 0.5 per axis."""
        phi, mu, sigma = (torch.from_numpy(a) for a in _tree_components(seed))
        raw = cls(phi, mu, sigma)
        mean, cov = raw.moments()
        scale = SIGMA_DATA / cov.diagonal().sqrt()
        d = torch.diag(scale)
        return cls(phi, (mu - mean) * scale, d @ sigma @ d)

    @property
    def num_components(self) -> int:
        return self.phi.numel()

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact mean (2,) and covariance (2, 2): ``sum phi mu``, ``sum phi (Sigma + mu mu^T) - m m^T``."""
        mean = self.phi @ self.mu
        second = torch.einsum("k,kij->ij", self.phi, self.sigma + self.mu[:, :, None] * self.mu[:, None, :])
        return mean, second - torch.outer(mean, mean)

    def _terms(self, x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Direct per-component log(phi_i N(x; mu_i, Sigma*_i)) (N, K) and Sigma*_i^-1 (mu_i - x) (N, K, 2)."""
        cov = self.sigma + (sigma**2) * torch.eye(2, dtype=torch.float64)
        a, b, c = cov[:, 0, 0], cov[:, 0, 1], cov[:, 1, 1]
        det = a * c - b * b
        y = self.mu[None] - x[:, None, :]                      # (N, K, 2)
        z0 = (c * y[..., 0] - b * y[..., 1]) / det              # Sigma^-1 y, explicit 2x2 inverse
        z1 = (a * y[..., 1] - b * y[..., 0]) / det
        quad = y[..., 0] * z0 + y[..., 1] * z1
        logw = self.phi.log() - math.log(2 * math.pi) - 0.5 * det.log() - 0.5 * quad
        return logw, torch.stack((z0, z1), dim=-1)

    def _check_points(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[-1] != 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor of shape (N, 2), got {shape}")

    def log_prob(self, x: torch.Tensor, sigma: float = 0.0, chunk: int = 4096) -> torch.Tensor:
        """``log p(x; sigma)`` (N,) in float64 (eqs. 20-22); differentiable w.r.t. ``x``."""
        self._check_points(x)
        x64 = x.to(torch.float64)
        coef = self._quadratic_coefficients(sigma)
        out = []
        for xc in x64.split(chunk):
            x0, x1 = xc[:, 0], xc[:, 1]
            feats = torch.stack((x0 * x0, x0 * x1, x1 * x1, x0, x1, torch.ones_like(x0)), dim=1)
            out.append(torch.logsumexp(feats @ coef, dim=1))
        return torch.cat(out) if out else x64.new_empty(0)

    def _quadratic_coefficients(self, sigma: float) -> torch.Tensor:
        """(6, K) matrix C with ``[x0^2, x0 x1, x1^2, x0, x1, 1] @ C = log(phi_i N(x; mu_i, Sigma*_i))``.

        One float64 GEMM per chunk instead of (N, K, 2) temporaries; the cancellation in
        ``x^T P x - 2 mu^T P x + mu^T P mu`` costs about 5 of float64's 16 digits here.
        """
        cov = self.sigma + (sigma**2) * torch.eye(2, dtype=torch.float64)
        a, b, c = cov[:, 0, 0], cov[:, 0, 1], cov[:, 1, 1]
        det = a * c - b * b
        p00, p01, p11 = c / det, -b / det, a / det          # precision matrix entries
        m0, m1 = self.mu[:, 0], self.mu[:, 1]
        const = (self.phi.log() - math.log(2 * math.pi) - 0.5 * det.log()
                 - 0.5 * (p00 * m0 * m0 + 2 * p01 * m0 * m1 + p11 * m1 * m1))
        return torch.stack((-0.5 * p00, -p01, -0.5 * p11,
                            p00 * m0 + p01 * m1, p01 * m0 + p11 * m1, const))

    def score(self, x: torch.Tensor, sigma: float = 0.0, chunk: int = 4096) -> torch.Tensor:
        """``grad_x log p(x; sigma)`` (N, 2) in float64, closed form (eq. 23)."""
        self._check_points(x)
        out = []
        for xc in x.to(torch.float64).split(chunk):
            logw, z = self._terms(xc, sigma)
            w = torch.softmax(logw, dim=1)
            out.append(torch.einsum("nk,nkd->nd", w, z))
        return torch.cat(out) if out else x.new_empty(0, 2, dtype=torch.float64)

    def sample(self, n: int, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``n`` exact samples (n, 2): a component by weight, then ``mu_i + chol(Sigma_i) eps``."""
        check_int("n", n, min_value=0)
        idx = torch.multinomial(self.phi, n, replacement=True, generator=generator) if n else \
            torch.zeros(0, dtype=torch.long)
        eps = torch.randn(n, 2, 1, dtype=torch.float64, generator=generator)
        return (self.mu[idx] + (self._chol[idx] @ eps).squeeze(-1)).to(dtype)
