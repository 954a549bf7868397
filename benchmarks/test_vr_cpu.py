"""CPU benchmark of the separation function ([VR] eq. 3.3): the direct estimator (eq. 3.3 as written,
chunked torch: x_il in d dims, distances, softmax, posterior mean) vs vefast's Gram path, M = 200,
K = 500, d in {4096, 16384}, on 2 SNR values in the dense region (r = 0.02, 0.05: no row is skipped,
the worst case for vefast). Both costs are linear in the number of such r values (direct: O(M K M d)
per r; vefast: two GEMMs O((M + K) M d) once, then O(M K M^2) per r, independent of d); r values
where every posterior is one-hot cost vefast ~nothing. Run with ``make bench-cpu``.
"""
from __future__ import annotations

import pytest
import torch

from vefast.ops import separation as sep
from vefast.sampling.separation import standardize

M, K = 200, 500
SNR = torch.tensor([0.02, 0.05], dtype=torch.float64)
_cache: dict = {}


def _data(d: int):
    if d not in _cache:
        g = torch.Generator().manual_seed(0)
        x = standardize(torch.randn(M, d, generator=g)).float()
        e = torch.randn(K, d, generator=g)
        _cache[d] = (x, e, {})
    return _cache[d]


def _direct(x, e):
    return sep.separation_reference(x, SNR, e, chunk_rows=2048).double()


def _gram(x, e):
    st = sep.gram_stats(x, e)
    c = sep.separation_complement_torch(x, st, SNR, dtype=torch.float32)
    return st["gdiag"].sum() / (M * x.shape[1]) - c / (M * K * x.shape[1])


@pytest.mark.parametrize("d", [4096, 16384])
@pytest.mark.parametrize("variant", ["direct", "vefast"])
def test_separation_cpu(benchmark, variant, d):
    x, e, results = _data(d)
    fn = _direct if variant == "direct" else _gram
    out = benchmark.pedantic(fn, args=(x, e), rounds=1, iterations=1, warmup_rounds=0)
    results[variant] = (out, benchmark.stats.stats.median if benchmark.stats else None)
    benchmark.extra_info.update({"M": M, "K": K, "d": d, "num_snr": SNR.numel()})
    if len(results) == 2:
        (a, ta), (b, tb) = results["direct"], results["vefast"]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        if ta and tb:
            benchmark.extra_info["speedup_vs_direct"] = ta / tb
            print(f"\nd={d}: direct {ta:.2f} s, vefast {tb:.2f} s, speedup {ta / tb:.1f}x")


# ---------------------------------------------------------------------------------------------------
# the whole table (issue 13 item 7): S at every timestep's SNR (exact mode) vs a 128-point log-SNR grid
# with PCHIP interpolation, paper configuration (M = 200, K = 500, d = 4x32x32, 1000 linear-path
# timesteps, Gaussian data), torch Gram path on the CPU.
_tables: dict = {}


@pytest.mark.parametrize("mode", ["exact", "grid"])
def test_vr_table_cpu(benchmark, mode, monkeypatch):
    from vefast.sampling import VRTimestepSampler

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the torch Gram path a CPU user runs
    x = torch.randn(M, 4, 32, 32, generator=torch.Generator().manual_seed(0))

    def build():
        return VRTimestepSampler.from_data(x, "linear", num_noise=K, num_t=1000, snr_points=None if mode == "exact" else 128,
                                           generator=torch.Generator().manual_seed(0))

    table = benchmark.pedantic(build, rounds=1, iterations=1, warmup_rounds=0)
    _tables[mode] = (table, benchmark.stats.stats.median if benchmark.stats else table.meta["seconds"])
    benchmark.extra_info.update({"M": M, "K": K, "d": 4096, "num_t": 1000, "snr_values": table.snr_grid.numel(),
                                 "quarter_mass": table.quarter_mass(), "m": table.fit_logit_normal()})
    if len(_tables) == 2:
        (ex, te), (gr, tg) = _tables["exact"], _tables["grid"]
        ks = gr.ks_distance(ex)
        benchmark.extra_info.update({"ks_grid_vs_exact": ks, "speedup_vs_exact": te / tg})
        print(f"\nVR table, paper size: exact {te:.1f} s ({ex.snr_grid.numel()} SNR values), grid {tg:.1f} s "
              f"({gr.snr_grid.numel()}), {te / tg:.1f}x; KS(grid, exact) = {ks:.2e}; m = {ex.fit_logit_normal()} / "
              f"{gr.fit_logit_normal()}")
        assert ks < 1e-3
