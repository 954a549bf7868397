"""GPU benchmark of VR-sampling (issue 3): separation function at the paper configuration and the
timestep sampler at n = 1e8.

Rows:
- ``separation_paper``: M = 200, K = 500, d = 4x32x32, the 999 positive-SNR knots of 1000 timesteps on
  the linear path; vefast end to end with default arguments on fp32 data (float64 standardization and
  GEMMs, the fused kernel for the per-r work; ``kernel_launches`` counts the kernel's launcher calls per
  call, 1 when the fused path ran). Goal <= 2 s on an H100; docs/vr_sampling.md estimates tens of ms.
- ``separation_dense10``: 10 dense-region SNR values (no row skipped): direct eq. 3.3 (chunked torch,
  fp32), its torch.compile, the torch Gram path (eager, fp32) and vefast (the kernel), side by side; the direct
  estimator's full-configuration time is extrapolated (linear in the number of r) in
  ``direct_full_s_extrapolated``.
- ``sampler``: n = 1e8 timesteps from a VR table: vefast's fused kernel vs eager torch (uniforms +
  lookup) vs its torch.compile, and torch's own logit-normal (randn + sigmoid) for scale. ``gbps``
  counts the 4n bytes written; ``frac_of_copy_bw`` divides by the measured copy bandwidth
  (``hbm_copy_gbps``, read + write), the goal being >= 0.5.
"""
from __future__ import annotations

import torch

from benchmarks.harness import add_ratios, measure
from vefast.ops import separation as sep
from vefast.ops import timestep_sample as ts
from vefast.sampling import VRTimestepSampler, path, separation_function
from vefast.sampling.separation import standardize

M, K, D, NUM_T = 200, 500, 4 * 32 * 32, 1000


def _kernel_launches(fn) -> int:
    """How many times one call of ``fn`` calls the separation kernel's launcher."""
    calls = []
    launch = sep._launch_separation
    sep._launch_separation = lambda *a, **k: calls.append(1) or launch(*a, **k)
    try:
        fn()
    finally:
        sep._launch_separation = launch
    return len(calls)


def _separation_rows() -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, D, device="cuda", generator=g)
    e = torch.randn(K, D, device="cuda", generator=g)
    knots = torch.linspace(0.0, 1 - 1e-3, NUM_T, dtype=torch.float64)
    r_all = path("linear").snr(knots)
    r_all = r_all[r_all > 0].cuda()
    paper = lambda: separation_function(x, r_all, noise=e)  # noqa: E731
    rows = [measure(paper, name="separation_paper", variant="vefast", M=M, K=K, d=D, num_r=r_all.numel(),
                    warmup=1, rep=1)]
    rows[0]["kernel_launches"] = _kernel_launches(paper)
    r10 = torch.logspace(-2.5, -1, 10, dtype=torch.float64, device="cuda")
    xs = standardize(x).float()
    direct = lambda: sep.separation_reference(xs, r10, e, chunk_rows=8192)  # noqa: E731
    compiled = torch.compile(sep.separation_reference)
    st = sep.gram_stats(xs, e)
    case = dict(name="separation_dense10", M=M, K=K, d=D, num_r=10, warmup=1, rep=1)
    rows += [
        measure(direct, variant="eager", **case),
        measure(lambda: compiled(xs, r10, e, chunk_rows=8192), variant="compile", **case),
        measure(lambda: sep.separation_complement_torch(xs, st, r10, dtype=torch.float32), variant="gram-torch", **case),
        measure(lambda: separation_function(x, r10, noise=e), variant="vefast", **case),
    ]
    ref = separation_function(x.double(), r10, noise=e.double())
    rows[-1]["max_abs_err_vs_float64"] = float((separation_function(x, r10, noise=e) - ref).abs().max())
    rows[-1]["kernel_launches"] = _kernel_launches(lambda: separation_function(x, r10, noise=e))
    per_r = rows[1]["ms"] / 10
    rows[1]["direct_full_s_extrapolated"] = per_r * r_all.numel() / 1e3
    add_ratios(rows, key=("name",), reference="eager")
    return rows


def _sampler_rows(ceilings: dict) -> list[dict]:
    n = 100_000_000
    r = torch.logspace(-3, 3, 400, dtype=torch.float64)
    vr = VRTimestepSampler.from_separation(r, torch.sigmoid(4 * (torch.log(r) + 3.2)), "linear")
    table = vr.table("cuda")
    seed = torch.tensor(1234)

    def eager():
        u = (torch.randint(0, 2**23, (n,), device="cuda").float() + 0.5) * 2.0**-23
        return ts.timestep_sample_reference(table, u)

    compiled = torch.compile(eager)
    case = dict(name="sampler", n=n, table_entries=table.numel(), bytes_moved=4 * n)
    rows = [
        measure(lambda: ts.timestep_sample(table, n, seed=seed), variant="vefast", **case),
        measure(eager, variant="eager", **case),
        measure(compiled, variant="compile", **case),
        measure(lambda: torch.sigmoid(torch.randn(n, device="cuda")), variant="torch-logit-normal", **case),
    ]
    for row in rows:
        row["frac_of_copy_bw"] = row["gbps"] / ceilings["hbm_copy_gbps"]
    add_ratios(rows, key=("name",), reference="eager")
    return rows


def run(ceilings: dict) -> list[dict]:
    return _separation_rows() + _sampler_rows(ceilings)
