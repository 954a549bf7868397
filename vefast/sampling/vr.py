"""VR-sampling timestep density (seed 004 §3.3, Lemma 3.1; MATH.md §6).

``v(t) = h_t^2 (1 - S(r_t))``, held constant on [t_max, 1] (default t_max = 1 - 1e-3: as t -> 1,
h_t -> inf while a Monte Carlo 1 - S never quite reaches 0); ``pi = v / trapezoid integral``, CDF by
cumulative trapezoid, inverse CDF by linear interpolation, ``t = F^-1(u)``.

Choices left open by the paper (documented in docs/vr_sampling.md):
- knots: ``num_t`` points uniform on [0, t_max] plus t = 1; S is needed at r_t of each knot and is
  interpolated linearly in log r (flat outside the given grid; r_0 = 0 takes the smallest r), so one S
  curve on a log-SNR grid serves every path. ``from_data`` evaluates S exactly at the knots' SNRs.
- ``1 - S`` is clipped at 0 (a Monte Carlo S may exceed 1 by rounding).
- ``cdf`` is the exact distribution function of the samples (piecewise linear through the knots);
  ``pdf`` is the piecewise-linear pi(t) through the knots; the samples' density is its cell average
  (they differ by O(dt^2 pi'')).
- sampling uses a uniform-u inverse table (``table[m] = F^-1(m/U)``, U = 2^k with k = 10..16, the
  smallest whose sampled distribution is within 1e-5 of F in Kolmogorov-Smirnov distance, reported as
  ``table_error``); see :mod:`vefast.ops.timestep_sample`.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path as FilePath
from typing import Any

import torch

from .._version import __version__
from ..ops._common import check_finite_number, check_tensor
from ..ops.timestep_sample import timestep_sample
from .paths import Path, _as_t, path as get_path
from .samplers import LogitNormalSampler, TimestepSampler, interp1d
from .separation import separation_function

FORMAT = "vefast.vr_table"
FORMAT_VERSION = 1
TABLE_TOL = 1e-5


def _check_int(name: str, v: int, min_value: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < min_value:
        raise ValueError(f"{name} must be an int >= {min_value}, got {v!r}")


def _check_t_max(t_max: float) -> None:
    check_finite_number("t_max", t_max)
    if not 0.0 < t_max < 1.0:
        raise ValueError(f"t_max must lie in (0, 1), got {t_max}")


def _trapezoid_cumulative(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    cells = 0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])
    return torch.cat([y.new_zeros(1), torch.cumsum(cells, 0)])


class VRTimestepSampler(TimestepSampler):
    """Variance-reduction timestep sampler (seed 004). Build with :meth:`from_data`,
    :meth:`from_separation` or :meth:`load`; t = 1 is data."""

    def __init__(self, snr: torch.Tensor, S: torch.Tensor, path: Path, *, num_t: int, t_max: float,
                 meta: dict[str, Any] | None = None) -> None:
        self.path, self.num_t, self.t_max = path, num_t, float(t_max)
        order = torch.argsort(snr)
        self.snr_grid, self.S_grid = snr[order].double().cpu(), S[order].double().cpu()
        self.meta = dict(meta or {})
        knots = torch.linspace(0.0, self.t_max, num_t, dtype=torch.float64)
        r = path.snr(knots)
        s_knots = interp1d(torch.log(r), torch.log(self.snr_grid), self.S_grid)  # log 0 = -inf -> flat
        v = path.h(knots) ** 2 * (1.0 - s_knots).clamp_min(0.0)
        self.t = torch.cat([knots, knots.new_ones(1)])
        self.S = torch.cat([s_knots, s_knots[-1:]])
        self.v = torch.cat([v, v[-1:]])  # held constant on [t_max, 1]
        if not bool(torch.isfinite(self.v).all()):
            raise ValueError("h_t^2 (1 - S) is not finite on the grid; lower t_max")
        z = float(_trapezoid_cumulative(self.v, self.t)[-1])
        if not z > 0:
            raise ValueError("the VR density h_t^2 (1 - S) is zero everywhere: S = 1 at every knot")
        self.density = self.v / z
        cdf = _trapezoid_cumulative(self.density, self.t)
        self.cdf_knots = cdf / cdf[-1]
        self._tables: dict[torch.device, torch.Tensor] = {}
        self.table_bits, self.table_error = self._choose_table()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_separation(cls, snr: torch.Tensor | Sequence[float], S: torch.Tensor | Sequence[float],
                        path: str | Path = "linear", *, num_t: int = 1000, t_max: float = 1 - 1e-3,
                        meta: dict[str, Any] | None = None) -> VRTimestepSampler:
        """From S given at SNR values ``snr`` (any order, >= 2 distinct values > 0), interpolated in log r."""
        p = get_path(path)
        _check_int("num_t", num_t, 2)
        _check_t_max(t_max)
        snr_t = torch.as_tensor(snr, dtype=torch.float64).flatten()
        s_t = torch.as_tensor(S, dtype=torch.float64).flatten()
        if snr_t.numel() != s_t.numel():
            raise ValueError(f"snr and S must have the same number of values, got {snr_t.numel()} and {s_t.numel()}")
        if snr_t.numel() < 2 or torch.unique(snr_t).numel() != snr_t.numel():
            raise ValueError(f"snr must hold at least 2 distinct values, got {snr_t.tolist()[:5]}")
        if not bool((torch.isfinite(snr_t) & (snr_t > 0)).all()):
            raise ValueError("snr values must be finite and > 0")
        if not bool(torch.isfinite(s_t).all()):
            raise ValueError("S must be finite")
        return cls(snr_t, s_t, p, num_t=num_t, t_max=t_max, meta=meta)

    @classmethod
    def from_data(cls, x1: torch.Tensor, path: str | Path = "linear", *, num_noise: int = 500, num_t: int = 1000,
                  t_max: float = 1 - 1e-3, generator: torch.Generator | None = None, normalize: bool = True,
                  progress: bool = False) -> VRTimestepSampler:
        """Estimate S with :func:`separation_function` on ``x1`` (M, ...) at the SNR of every knot
        (common random numbers), then build the density. Records M, K, d and the generator's seed."""
        p = get_path(path)
        _check_int("num_t", num_t, 2)
        _check_t_max(t_max)
        check_tensor("x1", x1)
        knots = torch.linspace(0.0, t_max, num_t, dtype=torch.float64)
        r = p.snr(knots)
        r = r[r > 0]
        if r.numel() < 2:
            raise ValueError("num_t is too small: fewer than 2 knots with a positive SNR")
        s = separation_function(x1, r, num_noise=num_noise, normalize=normalize, generator=generator,
                                progress=progress)
        seed = generator.initial_seed() if generator is not None else torch.initial_seed()
        meta = {"M": int(x1.shape[0]), "K": int(num_noise), "d": int(x1[0].numel()), "seed": int(seed),
                "normalize": bool(normalize)}
        return cls(r, s.cpu(), p, num_t=num_t, t_max=t_max, meta=meta)

    # ------------------------------------------------------------------ distribution
    def pdf(self, t: torch.Tensor | float) -> torch.Tensor:
        """pi(t): piecewise linear through the knots (t in [0, 1])."""
        t = _as_t(t)
        return interp1d(t, self.t, self.density).to(t.dtype)

    def cdf(self, t: torch.Tensor | float) -> torch.Tensor:
        """F(t): the exact distribution function of the samples (piecewise linear through the knots)."""
        t = _as_t(t)
        return interp1d(t, self.t, self.cdf_knots).to(t.dtype)

    def icdf(self, u: torch.Tensor | float) -> torch.Tensor:
        """F^-1(u) = inf{t : F(t) >= u}, u in [0, 1]: the inverse of :meth:`cdf` (linear interpolation;
        the left end of any zero-density stretch)."""
        u = _as_t(u, "u")
        f = self.cdf_knots.to(u.device)
        t = self.t.to(u.device)
        ud = u.to(torch.float64)
        k = torch.searchsorted(f, ud, right=False).clamp_(1, f.numel() - 1)  # F[k-1] < u <= F[k]
        f0, f1, t0, t1 = f[k - 1], f[k], t[k - 1], t[k]
        den = f1 - f0
        frac = torch.where(den > 0, (ud - f0) / torch.where(den > 0, den, 1.0), 0.0).clamp_(0.0, 1.0)
        return (t0 + frac * (t1 - t0)).to(u.dtype)

    @property
    def peak(self) -> float:
        """The knot t where pi is largest."""
        return float(self.t[int(torch.argmax(self.density))])

    # ------------------------------------------------------------------ sampling
    def _choose_table(self) -> tuple[int, float]:
        """Smallest k in 10..16 whose table distribution is within TABLE_TOL of F in KS distance
        (``sup |F_table - F|``, attained at the knots: both CDFs are piecewise linear)."""
        for bits in range(10, 17):
            u = torch.linspace(0.0, 1.0, 2**bits + 1, dtype=torch.float64)
            table = self.icdf(u).float().double()  # the float32 values the kernel reads
            err = float((interp1d(self.t, table, u) - self.cdf_knots).abs().max())
            if err <= TABLE_TOL:
                break
        return bits, err

    def table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The float32 inverse-CDF table ``F^-1(m / 2^k)``, m = 0..2^k, on ``device`` (cached)."""
        device = torch.device(device)
        if device not in self._tables:
            u = torch.linspace(0.0, 1.0, 2**self.table_bits + 1, dtype=torch.float64)
            self._tables[device] = self.icdf(u).to(device=device, dtype=torch.float32)
        return self._tables[device]

    def _draw(self, n, device, generator):
        return timestep_sample(self.table(device), n, generator=generator)

    # ------------------------------------------------------------------ logit-normal fit
    def fit_logit_normal(self, s: float = 1.0, step: float = 0.25, *, m_range: tuple[float, float] = (-6.0, 6.0),
                         return_ks: bool = False) -> float | tuple[float, float]:
        """The m on the grid ``step * Z`` within ``m_range`` minimizing the KS distance
        ``sup_t |F_VR(t) - Phi((logit t - m) / s)|`` (seed 004 §4.3, MATH §6). t = 1 is data; for t = 1
        noise codebases use m' = -m. ``return_ks`` also returns the distance."""
        check_finite_number("s", s, min_value=0.0, strict=True)
        check_finite_number("step", step, min_value=0.0, strict=True)
        lo, hi = math.ceil(m_range[0] / step - 1e-9), math.floor(m_range[1] / step + 1e-9)
        if hi < lo:
            raise ValueError(f"m_range {m_range} holds no multiple of step {step}")
        best = min((self.ks_distance(LogitNormalSampler(j * step, s)), j * step) for j in range(lo, hi + 1))
        m = best[1] + 0.0  # -0.0 -> 0.0
        return (m, best[0]) if return_ks else m

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "vefast_version": __version__,
                "path": self.path.name, "num_t": self.num_t, "t_max": self.t_max, **self.meta,
                "snr": self.snr_grid.tolist(), "S": self.S_grid.tolist(),
                "t": self.t.tolist(), "pdf": self.density.tolist(), "cdf": self.cdf_knots.tolist()}

    def save(self, file: str | FilePath) -> None:
        """Write a JSON table (no pickle): path, M, K, d, seed, grid, t_max, library version, S, pdf, cdf."""
        FilePath(file).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, file: str | FilePath) -> VRTimestepSampler:
        """Read a table written by :meth:`save` (rebuilt from its (snr, S) grid, path, num_t and t_max)."""
        data = json.loads(FilePath(file).read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{file} is not a vefast VR table (format {FORMAT!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{file}: unsupported format_version {data.get('format_version')!r}")
        meta = {k: data[k] for k in ("M", "K", "d", "seed", "normalize") if k in data}
        return cls.from_separation(data["snr"], data["S"], data["path"], num_t=data["num_t"],
                                   t_max=data["t_max"], meta=meta)

    def __repr__(self) -> str:
        return (f"VRTimestepSampler(path={self.path.name!r}, num_t={self.num_t}, t_max={self.t_max}, "
                f"peak={self.peak:.4f}, meta={self.meta})")
