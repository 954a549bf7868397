"""VR-sampling timestep density ([VR] §3.3, Lemma 3.1; docs/math.md §6).

``v(t) = h_t^2 (1 - S(r_t))``, held constant on [t_max, 1] (default t_max = 1 - 1e-3: as t -> 1,
h_t -> inf while a Monte Carlo 1 - S never quite reaches 0); ``pi = v / trapezoid integral``, CDF by
cumulative trapezoid, inverse CDF by linear interpolation, ``t = F^-1(u)``.

Choices left open by the paper (documented in docs/vr_sampling.md):
- knots: ``num_t`` points uniform on [0, t_max] plus t = 1; S is needed at r_t of each knot and is
  interpolated in log r (flat outside the given grid; r_0 = 0 takes the smallest r), linearly or with
  a monotone cubic (PCHIP, Fritsch-Carlson), so one S curve on a log-SNR grid serves every path.
  ``from_data`` estimates S on an adaptive log-SNR grid of ``snr_points`` values (default 128: a
  quarter uniform in log r, the rest at equal arc length of the curve, i.e. denser where S changes
  fastest) and interpolates with PCHIP; ``snr_points=None`` (exact mode) estimates it at every knot.
- ``mix_uniform = w``: the density ``(1 - w) pi_VR + w`` (a uniform floor, so no region of [0, 1] is
  starved); ``quarter_mass`` reports the mass of each quarter of [0, 1].
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
import time
from collections.abc import Sequence
from pathlib import Path as FilePath
from typing import Any

import torch

from .._version import __version__
from ..ops._common import check_finite_number, check_int, check_not_meta, check_tensor
from ..ops.timestep_sample import timestep_sample
from .paths import Path, _as_t, path as get_path
from .samplers import LogitNormalSampler, TimestepSampler, interp1d
from .separation import _flatten_rows, draw_noise, separation_function

FORMAT = "vefast.vr_table"
FORMAT_VERSION = 1
TABLE_TOL = 1e-5
SNR_POINTS = 128  # default log-SNR grid of from_data (docs/vr_sampling.md, "Cost: a log-SNR grid")
INTERPS = ("linear", "pchip")
_META_KEYS = ("M", "K", "d", "seed", "normalize", "estimator", "snr_points", "seconds")


def _check_t_max(t_max: float) -> None:
    check_finite_number("t_max", t_max)
    if not 0.0 < t_max < 1.0:
        raise ValueError(f"t_max must lie in (0, 1), got {t_max}")


def _trapezoid_cumulative(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    cells = 0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])
    return torch.cat([y.new_zeros(1), torch.cumsum(cells, 0)])


def _check_mix(mix_uniform: float) -> float:
    check_finite_number("mix_uniform", mix_uniform)
    if not 0.0 <= mix_uniform <= 1.0:
        raise ValueError(f"mix_uniform must lie in [0, 1] (a mixture weight), got {mix_uniform}")
    return float(mix_uniform)


def _pchip_slopes(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fritsch-Carlson derivatives of the monotone cubic through (x, y) (scipy's PchipInterpolator):
    weighted harmonic means of the secant slopes inside, 0 at local extrema, shape-preserving
    three-point formulas at the ends. x strictly increasing, float64, >= 2 points."""
    h = x[1:] - x[:-1]
    delta = (y[1:] - y[:-1]) / h
    n = x.numel()
    d = torch.zeros_like(y)
    if n == 2:
        return d + delta[0]
    w1, w2 = 2 * h[1:] + h[:-1], h[1:] + 2 * h[:-1]
    same = (delta[:-1] * delta[1:]) > 0
    safe0 = torch.where(same, delta[:-1], 1.0)
    safe1 = torch.where(same, delta[1:], 1.0)
    d[1:-1] = torch.where(same, (w1 + w2) / (w1 / safe0 + w2 / safe1), 0.0)
    for end, (h0, h1, d0, d1) in ((0, (h[0], h[1], delta[0], delta[1])), (-1, (h[-1], h[-2], delta[-1], delta[-2]))):
        v = ((2 * h0 + h1) * d0 - h0 * d1) / (h0 + h1)
        if torch.sign(v) != torch.sign(d0):
            v = torch.zeros_like(v)
        elif torch.sign(d0) != torch.sign(d1) and v.abs() > 3 * d0.abs():
            v = 3 * d0
        d[end] = v
    return d


def pchip(xq: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Monotone piecewise-cubic Hermite interpolation (PCHIP) of (x, y) at ``xq``, float64, flat outside
    [x[0], x[-1]] (-inf / +inf included). Between two knots the value stays within their values: no
    overshoot, monotone data stay monotone (an S in [0, 1] stays in [0, 1])."""
    check_not_meta("pchip", xq=xq, x=x, y=y)
    x, y = x.to(device=xq.device, dtype=torch.float64), y.to(device=xq.device, dtype=torch.float64)
    d = _pchip_slopes(x, y)
    xd = xq.to(torch.float64).clamp(x[0], x[-1])
    k = (torch.searchsorted(x, xd, right=True) - 1).clamp_(0, x.numel() - 2)
    h = x[k + 1] - x[k]
    s = (xd - x[k]) / h
    h00, h10 = (1 + 2 * s) * (1 - s) ** 2, s * (1 - s) ** 2
    h01, h11 = s * s * (3 - 2 * s), s * s * (s - 1)
    return h00 * y[k] + h10 * h * d[k] + h01 * y[k + 1] + h11 * h * d[k + 1]


COMPLEMENT_FLOOR = 1e-300  # 1 - S floored before its log (pchip): exact zeros (one-hot rows) stay ~0


def _mean_square(name: str, x: torch.Tensor) -> float:
    """E||x||^2 / d of the rows of ``x`` in float64 (a host read: one-off APIs); ValueError when it is 0."""
    value = float(x.detach().double().square().mean())
    if not value > 0:
        raise ValueError(f"{name} is all zeros: its separation function is undefined")
    return value


def _interp_log_snr(r: torch.Tensor, snr: torch.Tensor, S: torch.Tensor, interp: str) -> torch.Tensor:
    """S at SNR values ``r`` from the sorted grid (snr, S), in log r (r = 0 -> the smallest r's S).
    "pchip" interpolates ``log(1 - S)`` (1 - S floored at COMPLEMENT_FLOOR): the density is
    ``h^2 (1 - S)``, so its relative error is the error of log(1 - S), and 1 - S decays to exactly 0
    where the posterior collapses, which a cubic in S follows poorly."""
    if interp == "pchip":
        log_c = torch.log((1.0 - S).clamp_min(COMPLEMENT_FLOOR))
        return 1.0 - torch.exp(pchip(torch.log(r), torch.log(snr), log_c))
    return interp1d(torch.log(r), torch.log(snr), S)


def adaptive_log_snr_grid(r_lo: float, r_hi: float, num: int, estimate) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` SNR values on [r_lo, r_hi] and ``estimate(r)`` (S at those r, float64) there; two calls of
    ``estimate``. A quarter of them (at least 8) uniform in log r; the rest at equal arc length of that
    coarse curve (PCHIP of log(1 - S)) in the plane ``(log r / log-range, 2 S, 0.05 max(log(1 - S), -30))``,
    so that they crowd where S changes fastest and where 1 - S (hence the density h^2 (1 - S)) falls
    off by orders of magnitude towards the collapse. The weights were chosen on Gaussian data, M = 32..200,
    d = 16..1024 (docs/vr_sampling.md): the table's KS error against exact mode is 100-600x below the
    spread between two noise draws."""
    x_lo, x_hi = math.log(r_lo), math.log(r_hi)
    n0 = min(num, max(8, num // 4))
    x0 = torch.linspace(x_lo, x_hi, n0, dtype=torch.float64)
    s0 = estimate(torch.exp(x0)).double().cpu()
    if num <= n0:
        return torch.exp(x0), s0
    xf = torch.linspace(x_lo, x_hi, 64 * num, dtype=torch.float64)
    lf = pchip(xf, x0, torch.log((1.0 - s0).clamp_min(COMPLEMENT_FLOOR)).clamp_min(-30.0))
    sf = 1.0 - torch.exp(lf)
    seg = torch.sqrt((torch.diff(xf) / (x_hi - x_lo)) ** 2 + (2.0 * torch.diff(sf)) ** 2 + (0.05 * torch.diff(lf)) ** 2)
    arc = torch.cat([seg.new_zeros(1), torch.cumsum(seg, 0)])
    x1 = interp1d(torch.linspace(0.0, float(arc[-1]), num - n0 + 2, dtype=torch.float64)[1:-1], arc, xf)
    s1 = estimate(torch.exp(x1)).double().cpu()
    x, order = torch.sort(torch.cat([x0, x1]))
    s = torch.cat([s0, s1])[order]
    keep = torch.cat([torch.ones(1, dtype=torch.bool), torch.diff(x) > 0])  # drop a coincident point
    return torch.exp(x[keep]), s[keep]


class VRTimestepSampler(TimestepSampler):
    """Variance-reduction timestep sampler ([VR]). Build with :meth:`from_data`,
    :meth:`from_separation` or :meth:`load`; t = 1 is data. ``interp``: how S is interpolated in log r
    between the grid's SNR values ("linear" or "pchip"); ``mix_uniform``: weight w of a uniform floor,
    density ``(1 - w) pi_VR + w``."""

    def __init__(self, snr: torch.Tensor, S: torch.Tensor, path: Path, *, num_t: int, t_max: float,
                 meta: dict[str, Any] | None = None, interp: str = "linear", mix_uniform: float = 0.0) -> None:
        if interp not in INTERPS:
            raise ValueError(f"interp must be one of {INTERPS}, got {interp!r}")
        check_not_meta("VRTimestepSampler", snr=snr, S=S)
        self.path, self.num_t, self.t_max = path, num_t, float(t_max)
        self.interp, self.mix_uniform = interp, _check_mix(mix_uniform)
        order = torch.argsort(snr)
        self.snr_grid, self.S_grid = snr[order].double().cpu(), S[order].double().cpu()
        self.meta = dict(meta or {})
        knots = torch.linspace(0.0, self.t_max, num_t, dtype=torch.float64)
        r = path.snr(knots)
        s_knots = _interp_log_snr(r, self.snr_grid, self.S_grid, interp)  # log 0 = -inf -> flat
        v = path.h(knots) ** 2 * (1.0 - s_knots).clamp_min(0.0)
        self.t = torch.cat([knots, knots.new_ones(1)])
        self.S = torch.cat([s_knots, s_knots[-1:]])
        self.v = torch.cat([v, v[-1:]])  # held constant on [t_max, 1]
        if not bool(torch.isfinite(self.v).all()):
            raise ValueError("h_t^2 (1 - S) is not finite on the grid; lower t_max")
        z = float(_trapezoid_cumulative(self.v, self.t)[-1])
        if not z > 0:
            raise ValueError("the VR density h_t^2 (1 - S) is zero everywhere: S = 1 at every knot")
        self.density_vr = self.v / z
        self.density = (1.0 - self.mix_uniform) * self.density_vr + self.mix_uniform
        cdf = _trapezoid_cumulative(self.density, self.t)
        self.cdf_knots = cdf / cdf[-1]
        self._tables: dict[torch.device, torch.Tensor] = {}
        self.table_bits, self.table_error = self._choose_table()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_separation(cls, snr: torch.Tensor | Sequence[float], S: torch.Tensor | Sequence[float],
                        path: str | Path = "linear", *, num_t: int = 1000, t_max: float = 1 - 1e-3,
                        meta: dict[str, Any] | None = None, interp: str = "linear",
                        mix_uniform: float = 0.0) -> VRTimestepSampler:
        """From S given at SNR values ``snr`` (any order, >= 2 distinct values > 0), interpolated in log r
        (``interp``: "linear" or the monotone cubic "pchip"); ``mix_uniform``: uniform floor weight."""
        check_not_meta("VRTimestepSampler.from_separation", snr=snr, S=S)
        p = get_path(path)
        check_int("num_t", num_t, min_value=2)
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
        return cls(snr_t, s_t, p, num_t=num_t, t_max=t_max, meta=meta, interp=interp, mix_uniform=mix_uniform)

    @classmethod
    def from_data(cls, x1: torch.Tensor, path: str | Path = "linear", *, num_noise: int = 500, num_t: int = 1000,
                  t_max: float = 1 - 1e-3, generator: torch.Generator | None = None, normalize: bool = True,
                  progress: bool = False, snr_points: int | None = SNR_POINTS, leave_one_out: bool = False,
                  mix_uniform: float = 0.0) -> VRTimestepSampler:
        """Estimate S with :func:`separation_function` on ``x1`` (M, ...) (common random numbers: the K
        noise rows are drawn once), then build the density. Records M, K, d, the generator's seed, the
        estimator, the grid and the seconds spent.

        ``snr_points``: S is estimated on an adaptive log-SNR grid of that many values spanning the knots'
        SNRs (:func:`adaptive_log_snr_grid`) and interpolated to every knot with PCHIP in log r;
        ``None`` (exact mode), or a grid no smaller than the knots, estimates it at every knot's SNR.
        ``leave_one_out``: the leave-one-out estimator (softmax over j != i) instead of eq. 3.3's.
        fp32 / bf16 / fp16 ``x1`` on CUDA run the fused separation kernel (one launch per call);
        float64 ``x1`` the float64 torch path."""
        check_not_meta("VRTimestepSampler.from_data", x1=x1)
        p = get_path(path)
        check_int("num_t", num_t, min_value=2)
        _check_t_max(t_max)
        _check_mix(mix_uniform)
        check_tensor("x1", x1)
        if snr_points is not None:
            check_int("snr_points", snr_points, min_value=8)
        knots = torch.linspace(0.0, t_max, num_t, dtype=torch.float64)
        r = p.snr(knots)
        r = r[r > 0]
        if r.numel() < 2:
            raise ValueError("num_t is too small: fewer than 2 knots with a positive SNR")
        check_int("num_noise", num_noise, min_value=1)
        start = time.perf_counter()
        d = _flatten_rows("x1", x1, rows="M", min_rows=2).shape[1]
        work = torch.float64 if x1.dtype == torch.float64 else torch.float32
        noise = draw_noise(num_noise, d, dtype=work, device=x1.device, generator=generator)
        # The density is h^2 x the MMSE per dim, E||x||^2 / d - S: 1 - S for standardized data; unstandardized,
        # S is taken in units of the data's mean square per dim (a constant factor of the density)
        unit = 1.0 if normalize else _mean_square("x1", x1)

        def estimate(snr: torch.Tensor) -> torch.Tensor:
            return separation_function(x1, snr, noise=noise, normalize=normalize, progress=progress,
                                       leave_one_out=leave_one_out).cpu() / unit

        exact = snr_points is None or snr_points >= r.numel()
        if exact:
            snr, s, interp = r, estimate(r), "linear"
        else:
            snr, s = adaptive_log_snr_grid(float(r.min()), float(r.max()), snr_points, estimate)
            interp = "pchip"
        seed = generator.initial_seed() if generator is not None else torch.initial_seed()
        meta = {"M": int(x1.shape[0]), "K": int(num_noise), "d": d, "seed": int(seed),
                "normalize": bool(normalize), "estimator": "leave_one_out" if leave_one_out else "paper",
                "snr_points": "exact" if exact else int(snr.numel()),
                "seconds": round(time.perf_counter() - start, 3)}
        return cls(snr, s, p, num_t=num_t, t_max=t_max, meta=meta, interp=interp, mix_uniform=mix_uniform)

    def with_mix_uniform(self, mix_uniform: float) -> VRTimestepSampler:
        """The same table with the uniform floor weight ``mix_uniform`` (density ``(1 - w) pi_VR + w``)."""
        return type(self)(self.snr_grid, self.S_grid, self.path, num_t=self.num_t, t_max=self.t_max,
                          meta=self.meta, interp=self.interp, mix_uniform=mix_uniform)

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

    def mass(self, lo: float, hi: float) -> float:
        """Probability that a sample falls in [lo, hi] (0 <= lo <= hi <= 1)."""
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"mass: need 0 <= lo <= hi <= 1, got lo={lo}, hi={hi}")
        ends = self.cdf(torch.tensor([lo, hi], dtype=torch.float64))
        return float(ends[1] - ends[0])

    def quarter_mass(self) -> list[float]:
        """The mass of [0, 1/4], [1/4, 1/2], [1/2, 3/4], [3/4, 1] (uniform: 1/4 each)."""
        return [self.mass(q / 4, (q + 1) / 4) for q in range(4)]

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
        ``sup_t |F_VR(t) - Phi((logit t - m) / s)|`` ([VR] §4.3, docs/math.md §6). t = 1 is data; for t = 1
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
                "path": self.path.name, "num_t": self.num_t, "t_max": self.t_max, "interp": self.interp,
                "mix_uniform": self.mix_uniform, **self.meta,
                "snr": self.snr_grid.tolist(), "S": self.S_grid.tolist(),
                "t": self.t.tolist(), "pdf": self.density.tolist(), "cdf": self.cdf_knots.tolist()}

    def save(self, file: str | FilePath) -> None:
        """Write a JSON table (no pickle): path, M, K, d, seed, grid, t_max, library version, S, pdf, cdf."""
        FilePath(file).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, file: str | FilePath, *, mix_uniform: float | None = None) -> VRTimestepSampler:
        """Read a table written by :meth:`save` (rebuilt from its (snr, S) grid, path, num_t, t_max,
        interpolation and uniform floor; ``mix_uniform`` replaces the file's floor when given)."""
        try:
            data = json.loads(FilePath(file).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file} is not a vefast VR table: it is not JSON ({e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{file} is not a vefast VR table (format {FORMAT!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{file}: unsupported format_version {data.get('format_version')!r}")
        meta = {k: data[k] for k in _META_KEYS if k in data}
        mix = data.get("mix_uniform", 0.0) if mix_uniform is None else mix_uniform
        return cls.from_separation(data["snr"], data["S"], data["path"], num_t=data["num_t"],
                                   t_max=data["t_max"], meta=meta, interp=data.get("interp", "linear"),
                                   mix_uniform=mix)

    def __repr__(self) -> str:
        return (f"VRTimestepSampler(path={self.path.name!r}, num_t={self.num_t}, t_max={self.t_max}, "
                f"interp={self.interp!r}, mix_uniform={self.mix_uniform}, peak={self.peak:.4f}, meta={self.meta})")
