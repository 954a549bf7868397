"""Public separation function ``S_hat(r)`` ([VR], eq. 3.3; docs/math.md §5): argument checks,
standardization, common random numbers, dispatch to the Gram-form paths of
:mod:`vefast.ops.separation`."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..ops import _common
from ..ops import separation as _sep


# Beyond this SNR every posterior is one-hot in fp32 and float64 alike (a logit gap r^2/2 D_ij > 110 for any
# D_ij > 2.2e-28), so S is at its r -> infinity limit; larger r would overflow r^2 in fp32 (NaN softmax rows
# of the leave-one-out estimator). Larger values are computed at this one.
SNR_MAX = 1e15


def _as_snr(snr: torch.Tensor | Sequence[float] | float) -> torch.Tensor:
    if isinstance(snr, bool) or not isinstance(snr, (torch.Tensor, Sequence, int, float)):
        raise TypeError(f"snr must be a tensor, a sequence of numbers or a number, got {type(snr).__name__}")
    try:
        s = torch.as_tensor(snr, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"snr must hold real numbers: {e}") from None
    if s.numel() == 0:
        raise ValueError("snr must hold at least one value, got an empty input")
    bad = ~(torch.isfinite(s) & (s > 0))
    if bool(bad.any()):
        raise ValueError(f"snr values must be finite and > 0, got {s[bad][0].item()}")
    return s.clamp(max=SNR_MAX)


def _flatten_rows(name: str, t: torch.Tensor, *, rows: str, min_rows: int) -> torch.Tensor:
    """``t`` (rows, ...) as (rows, d): at least ``min_rows`` rows (called ``rows`` in the message),
    d >= 1, finite values."""
    _common.check_tensor(name, t)
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape (rows, ...) with at least 2 dims, got {tuple(t.shape)}")
    if t.shape[0] < min_rows:
        raise ValueError(f"{name} must have at least {rows} = {min_rows} rows, got shape {tuple(t.shape)}")
    if math.prod(t.shape[1:]) == 0:
        raise ValueError(f"{name} rows must have at least one element (d >= 1), got shape {tuple(t.shape)}")
    t = t.flatten(1)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite, got NaN or inf values")
    return t


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Zero mean and unit population std per dimension over the rows (docs/math.md §5: ``mean ||x||^2 / d = 1``),
    returned in float64 so that ``tr(G) / (M d) = 1`` to float64 rounding (it offsets ``1 - S_hat``)."""
    _common.check_not_meta("standardize", x=x)
    x64 = x.double()
    std = x64.std(dim=0, unbiased=False)
    const = int((std == 0).sum())
    if const:
        raise ValueError(f"x1 has {const} constant dimension(s) over its {x.shape[0]} rows; they cannot be "
                         "standardized (drop them or pass normalize=False)")
    return (x64 - x64.mean(dim=0)) / std


def draw_noise(k: int, d: int, *, dtype: torch.dtype, device: torch.device,
               generator: torch.Generator | None) -> torch.Tensor:
    """K standard normal rows of dimension d, drawn on the generator's device, then moved to ``device``."""
    _common.check_generator(generator)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(k, d, generator=generator, dtype=dtype, device=gen_device).to(device)


def separation_function(x1: torch.Tensor, snr: torch.Tensor | Sequence[float] | float, *, num_noise: int = 500,
                        noise: torch.Tensor | None = None, normalize: bool = True,
                        generator: torch.Generator | None = None, progress: bool = False,
                        leave_one_out: bool = False) -> torch.Tensor:
    """Monte Carlo separation function of [VR] eq. 3.3 (docs/math.md §5), exact Gram form.

    ``S_hat(r) = 1/(M K d) sum_il || sum_j softmax_j(-r^2 ||x1_i + e_l / r - x1_j||^2 / 2) x1_j ||^2``
    (j = i included) for every r in ``snr``, with the same K noise rows for every r (common random
    numbers, a smooth curve).

    Args:
        x1: (M, ...) data rows, flattened to d >= 1; float32 / bf16 / fp16 (fused kernel) or float64
            (float64 torch path). M >= 2.
        snr: SNR values r = alpha_t / sigma_t > 0 (any shape, flattened).
        num_noise: K, noise rows drawn from ``generator`` when ``noise`` is None.
        noise: explicit (K, ...) noise rows flattening to d (exact tests); ``num_noise`` is then unused.
        normalize: standardize each dimension over the M rows (zero mean, population std 1).
        generator: source of the noise (drawn on its device; torch's default CPU generator if None).
        progress: show a tqdm bar over the r values (torch path; the kernel does every r in one launch).
        leave_one_out: the softmax over ``j != i`` instead of eq. 3.3's ``j = i`` included: the row a
            noisy point was made from is not in its own posterior (docs/vr_sampling.md, "Leave-one-out").
            Not the paper's estimator; every r then costs the dense price (no one-hot row to skip).

    Returns:
        float64 tensor of S_hat, one per r, in [0, 1] with ``normalize=True`` (in [0, inf) without).
        ``1 - S_hat`` is accurate even where S_hat -> 1 (the complement is accumulated directly); where
        S_hat -> 0 (r -> 0) its absolute error is that of the fp32 complement (~1e-8), and the clamp
        keeps rounding from leaving [0, 1].

    Precision: the statistics are float64 for every input dtype (standardization, ``G``, ``P``, ``D``,
    the trace, the final ``tr(G)/(M d) - C/(M K d)``); the per-r work (softmax weights, ``C(r)``) runs
    in fp32 with fp32 accumulation, per-program partials summed in float64.

    Dispatch (:func:`vefast.ops._common.triton_path` on ``x1``): float32 / bf16 / fp16 on CUDA (or
    under TRITON_INTERPRET=1) -> the fused Triton kernel; on CPU -> the torch Gram path in fp32; float64
    ``x1`` -> the torch Gram path in float64 on any device (a float64 request keeps float64 per-r work;
    reported once as a fallback).
    """
    _common.check_not_meta("separation_function", x1=x1, snr=snr, noise=noise)
    x = _flatten_rows("x1", x1, rows="M", min_rows=2)
    m, d = x.shape
    r = _as_snr(snr)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    if noise is None:
        _common.check_int("num_noise", num_noise, min_value=1)
        e = draw_noise(num_noise, d, dtype=work, device=x.device, generator=generator)
    else:
        e = _flatten_rows("noise", noise, rows="K", min_rows=1)
        if e.shape[1] != d:
            raise ValueError(f"noise rows must have d = {d} elements like x1's, got {e.shape[1]}")
        _common.check_same_device(x1=x, noise=e)
    xs = standardize(x) if normalize else x  # float64 when standardized
    st = _sep.gram_stats(xs, e)
    k = e.shape[0]
    r = r.to(x.device)
    if not isinstance(leave_one_out, bool):
        raise TypeError(f"leave_one_out must be a bool, got {type(leave_one_out).__name__}")
    if _common.triton_path("separation_function", x):  # the input's dtype decides, not the float64 stats'
        comp = _sep.separation_complement_triton(_sep.kernel_stats(st), r, leave_one_out=leave_one_out)
    else:
        comp = _complement_torch(xs, st, r, dtype=work, progress=progress, leave_one_out=leave_one_out)
    s_hat = (st["gdiag"].sum() / (m * d) - comp / (m * k * d)).clamp_(min=0.0)
    return s_hat.clamp_(max=1.0) if normalize else s_hat


def _complement_torch(x: torch.Tensor, st: dict[str, torch.Tensor], r: torch.Tensor, *, dtype: torch.dtype,
                      progress: bool, leave_one_out: bool = False) -> torch.Tensor:
    """``C(r)`` by the torch Gram path, with an optional tqdm bar over the r values."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=r.numel(), desc="separation S(r)", unit="snr")
    try:
        return _sep.separation_complement_torch(x, st, r, dtype=dtype, leave_one_out=leave_one_out,
                                                progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
