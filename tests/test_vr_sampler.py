"""VR-sampling density and samplers (docs/math.md §6; [VR] §3.3, §4.3): closed forms, KS tests of every
sampler against its own CDF (the Triton sampling kernel under the interpreter), determinism, weights,
logit-normal fit, save/load, bad inputs."""
from __future__ import annotations

import json
import math

import pytest
import torch
from scipy import stats

import vefast
from vefast.ops import separation as sep
from vefast.ops import timestep_sample as ts
from vefast.sampling import LogitNormalSampler, UniformSampler, VRTimestepSampler
from vefast.sampling.separation import standardize

R = torch.logspace(-4, 4, 1500, dtype=torch.float64)
S_GAUSS = R**2 / (1 + R**2)
T = torch.linspace(0.005, 0.995, 199, dtype=torch.float64)
N = 100_000


def ks_pvalue(sampler, x: torch.Tensor) -> float:
    return stats.kstest(x.double().cpu().numpy(), lambda q: sampler.cdf(torch.as_tensor(q)).numpy()).pvalue


@pytest.fixture(scope="module")
def linear_gauss():
    return VRTimestepSampler.from_separation(R, S_GAUSS, "linear")


def test_linear_path_gaussian_density_is_cosmap(linear_gauss):
    """pi(t) = 2 / (pi (t^2 + (1-t)^2)) for N(0, I) data on the linear path (docs/math.md §6)."""
    torch.testing.assert_close(linear_gauss.pdf(T), 2 / (math.pi * (T**2 + (1 - T) ** 2)), rtol=2e-4, atol=0)
    exact_cdf = 0.5 + 2 * torch.atan(2 * T - 1) / math.pi  # integral of the CosMap density
    torch.testing.assert_close(linear_gauss.cdf(T), exact_cdf, rtol=0, atol=2e-5)
    assert linear_gauss.fit_logit_normal() == 0.0


def test_cosine_path_gaussian_density_is_uniform():
    vr = VRTimestepSampler.from_separation(R, S_GAUSS, "cosine")
    torch.testing.assert_close(vr.pdf(T), torch.ones_like(T), rtol=0, atol=2e-4)
    torch.testing.assert_close(vr.cdf(T), T, rtol=0, atol=2e-5)


def test_density_is_normalized_and_held_constant_after_t_max():
    vr = VRTimestepSampler.from_separation(R, S_GAUSS, "vp", num_t=300, t_max=0.99)
    cells = 0.5 * (vr.density[1:] + vr.density[:-1]) * (vr.t[1:] - vr.t[:-1])
    assert float(cells.sum()) == pytest.approx(1.0, abs=1e-12)
    tail = vr.pdf(torch.tensor([0.99, 0.995, 1.0], dtype=torch.float64))
    assert torch.allclose(tail, tail[0].expand(3), rtol=1e-12)
    assert float(vr.cdf(1.0)) == 1.0 and float(vr.cdf(0.0)) == 0.0
    torch.testing.assert_close(vr.icdf(vr.cdf(T)), T, rtol=0, atol=1e-12)


def test_fit_logit_normal_recovers_m():
    """Build S so that the linear-path VR density is logit-normal(0.75, 1): the fit must return 0.75."""
    ln = LogitNormalSampler(0.75, 1.0)
    t = torch.linspace(1e-4, 1 - 1e-4, 4000, dtype=torch.float64)
    r = t / (1 - t)
    s = 1 - 0.05 * ln.pdf(t) * (1 - t) ** 2  # v = h^2 (1 - S) = 0.05 pdf, h = 1 / (1 - t)
    vr = VRTimestepSampler.from_separation(r, s, "linear", num_t=2000, t_max=1 - 1e-4)
    m, ks = vr.fit_logit_normal(return_ks=True)
    assert m == 0.75 and ks < 5e-3
    assert vr.fit_logit_normal(step=0.5) in (0.5, 1.0)


def test_vr_kernel_samples_ks_and_open_interval(linear_gauss, device):
    x = linear_gauss.sample(N, device=device, generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and x.shape == (N,)
    assert float(x.min()) > 0 and float(x.max()) < 1
    assert ks_pvalue(linear_gauss, x) > 1e-3


@pytest.mark.expect_fallback("timestep_sample:cpu")
def test_vr_eager_path_samples_ks(linear_gauss, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors then take the eager lookup
    x = linear_gauss.sample(N, generator=torch.Generator().manual_seed(1))
    assert ks_pvalue(linear_gauss, x) > 1e-3


def test_vr_sampling_of_a_peaked_density(device):
    """A data-like density (S from Gaussian data at d = 4096 with finite M) through the kernel."""
    r = torch.logspace(-3, 3, 400, dtype=torch.float64)
    s = torch.sigmoid(4 * (torch.log(r) + 3.2))  # sharp S transition at r ~ 0.04
    vr = VRTimestepSampler.from_separation(r, s, "linear")
    assert vr.table_error <= 1e-5
    x = vr.sample(N, device=device, generator=torch.Generator().manual_seed(2))
    assert ks_pvalue(vr, x) > 1e-3


def test_kernel_table_lookup_matches_reference_and_exact_icdf(linear_gauss, device):
    table = linear_gauss.table()
    u = ts.uniforms_reference(5000, generator=torch.Generator().manual_seed(3))
    got = ts._launch_sample(table.to(device), 5000, 0, u=u.to(device)).cpu()
    ref = ts.timestep_sample_reference(table.double(), u.double())
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-7)
    # the table's distribution is within table_error (KS) of the exact one: F(sample) vs u
    assert float((linear_gauss.cdf(got.double()) - u.double()).abs().max()) <= linear_gauss.table_error + 1e-6


def test_determinism_by_seed(linear_gauss, device):
    a = linear_gauss.sample(5000, device=device, generator=torch.Generator().manual_seed(7))
    b = linear_gauss.sample(5000, device=device, generator=torch.Generator().manual_seed(7))
    c = linear_gauss.sample(5000, device=device, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    s, table = torch.tensor(123), linear_gauss.table().to(device)
    assert torch.equal(ts.timestep_sample(table, 777, seed=s), ts.timestep_sample(table, 777, seed=s))
    for sampler in (UniformSampler(), LogitNormalSampler(0.5, 1.2)):
        a = sampler.sample(1000, generator=torch.Generator().manual_seed(7))
        b = sampler.sample(1000, generator=torch.Generator().manual_seed(7))
        assert torch.equal(a, b)


@pytest.mark.parametrize("sampler", [UniformSampler(), LogitNormalSampler(0.0, 1.0), LogitNormalSampler(-0.75, 1.5)],
                         ids=repr)
def test_simple_samplers_ks_and_closed_forms(sampler):
    x = sampler.sample(N, generator=torch.Generator().manual_seed(4))
    assert x.dtype == torch.float32 and float(x.min()) > 0 and float(x.max()) < 1
    assert ks_pvalue(sampler, x) > 1e-3
    # pdf integrates to the cdf, icdf inverts it
    t = torch.linspace(1e-4, 1 - 1e-4, 20001, dtype=torch.float64)
    cum = torch.cumulative_trapezoid(sampler.pdf(t), t)
    torch.testing.assert_close(cum, sampler.cdf(t[1:]) - sampler.cdf(t[:1]), rtol=0, atol=1e-6)
    torch.testing.assert_close(sampler.icdf(sampler.cdf(T)), T, rtol=0, atol=1e-10)


def test_logit_normal_pdf_formula():
    ln = LogitNormalSampler(0.3, 0.8)
    z = (torch.log(T / (1 - T)) - 0.3) / 0.8
    ref = torch.exp(-0.5 * z**2) / (0.8 * math.sqrt(2 * math.pi) * T * (1 - T))
    torch.testing.assert_close(ln.pdf(T), ref)


def test_importance_weights(linear_gauss, device):
    t, w = linear_gauss.sample(N, device=device, generator=torch.Generator().manual_seed(5), return_weights=True)
    t, w = t.cpu(), w.cpu()
    torch.testing.assert_close(w.double(), 1 / linear_gauss.pdf(t.double()), rtol=1e-6, atol=0)
    assert float(w.mean()) == pytest.approx(1.0, abs=0.01)           # E_pi[1 / pi] = 1
    assert float((w * t).mean()) == pytest.approx(0.5, abs=0.01)     # E_pi[w t] = E_uniform[t]
    _, w_u = UniformSampler().sample(10, return_weights=True)
    assert torch.equal(w_u, torch.ones(10))


@pytest.mark.expect_fallback("separation_function:float64")  # float64 data: the float64 torch path
def test_from_data_small_and_metadata():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(24, 2, 3, 3, generator=g, dtype=torch.float64)
    vr = VRTimestepSampler.from_data(x, "cosine", num_noise=12, num_t=30, generator=torch.Generator().manual_seed(3))
    seconds = vr.meta.pop("seconds")
    assert vr.meta == {"M": 24, "K": 12, "d": 18, "seed": 3, "normalize": True, "estimator": "paper",
                       "snr_points": "exact"}  # 29 knots: fewer than the default grid, so every knot
    assert seconds >= 0 and vr.interp == "linear"
    r = vefast.path("cosine").snr(vr.t[1:30])
    s = vefast.separation_function(x, r, num_noise=12, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(vr.S[1:30], s)
    assert 0 < vr.peak < 1 and torch.all(vr.density >= 0)


def test_from_data_reaches_the_separation_kernel(device, monkeypatch):
    """fp32 data with default arguments: S is estimated by the fused kernel (one launch for every knot)
    and matches eq. 3.3 in float64 on the same standardized data and noise."""
    calls = []
    launch = sep._launch_separation
    monkeypatch.setattr(sep, "_launch_separation", lambda *a, **k: calls.append(a[0].shape) or launch(*a, **k))
    x = torch.randn(12, 2, 2, 2, generator=torch.Generator().manual_seed(11)).to(device)
    vr = VRTimestepSampler.from_data(x, "linear", num_noise=6, num_t=12, generator=torch.Generator().manual_seed(3))
    assert calls == [(12, 12)]
    r = vefast.path("linear").snr(vr.t[1:12])
    e = torch.randn(6, 8, generator=torch.Generator().manual_seed(3)).double()  # the noise from_data drew
    ref = sep.separation_reference(standardize(x.double().cpu().flatten(1)), r, e)
    torch.testing.assert_close(vr.S[1:12], ref, rtol=0, atol=3e-6)


def test_save_load_round_trip(linear_gauss, tmp_path):
    vr = VRTimestepSampler.from_separation(R[::5], S_GAUSS[::5], "cosine", num_t=200, t_max=0.995,
                                           meta={"M": 200, "K": 500, "d": 4096, "seed": 0})
    f = tmp_path / "table.json"
    vr.save(f)
    raw = json.loads(f.read_text())
    assert raw["vefast_version"] == vefast.__version__ and raw["path"] == "cosine" and raw["K"] == 500
    assert raw["t_max"] == 0.995 and len(raw["t"]) == 201
    back = VRTimestepSampler.load(f)
    assert back.meta == vr.meta and back.path.name == "cosine" and back.num_t == 200
    assert torch.equal(back.density, vr.density) and torch.equal(back.cdf_knots, vr.cdf_knots)
    assert torch.equal(back.table(), vr.table())
    f.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a vefast VR table"):
        VRTimestepSampler.load(f)


def test_timestep_sample_op_under_torch_compile(linear_gauss, device):
    table, seed = linear_gauss.table().to(device), torch.tensor(5)
    eager = torch.ops.vefast.timestep_sample(table, seed, 3000)
    compiled = torch.compile(lambda tb, s: torch.ops.vefast.timestep_sample(tb, s, 3000), fullgraph=True)
    torch.testing.assert_close(compiled(table, seed), eager)


def test_bad_inputs(linear_gauss):
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        linear_gauss.pdf(torch.tensor([1.2]))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        UniformSampler().cdf(-0.1)
    with pytest.raises(ValueError, match=r"u must lie in \[0, 1\]"):
        linear_gauss.icdf(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        linear_gauss.sample(-1)
    with pytest.raises(ValueError, match="unknown path 'sigmoid'"):
        VRTimestepSampler.from_separation(R, S_GAUSS, "sigmoid")
    with pytest.raises(ValueError, match="same number of values"):
        VRTimestepSampler.from_separation(R, S_GAUSS[:-1])
    with pytest.raises(ValueError, match="snr values must be finite and > 0"):
        VRTimestepSampler.from_separation([-1.0, 1.0], [0.1, 0.5])
    with pytest.raises(ValueError, match="at least 2 distinct"):
        VRTimestepSampler.from_separation([1.0], [0.5])
    with pytest.raises(ValueError, match=r"t_max must lie in \(0, 1\)"):
        VRTimestepSampler.from_separation(R, S_GAUSS, t_max=1.0)
    with pytest.raises(ValueError, match="num_t must be an int >= 2"):
        VRTimestepSampler.from_separation(R, S_GAUSS, num_t=1)
    with pytest.raises(ValueError, match="zero everywhere"):
        VRTimestepSampler.from_separation(R, torch.ones_like(R))
    with pytest.raises(ValueError, match="s must be > 0"):
        LogitNormalSampler(0.0, 0.0)
    with pytest.raises(ValueError, match="2\\^k \\+ 1 entries"):
        ts.timestep_sample(torch.zeros(6), 4)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        UniformSampler().sample(3, generator="cuda")


@pytest.mark.gpu
def test_gpu_sampler_paper_size(linear_gauss):
    x = linear_gauss.sample(10_000_000, device="cuda", generator=torch.Generator().manual_seed(0))
    assert x.is_cuda and float(x.min()) > 0 and float(x.max()) < 1
    assert ks_pvalue(linear_gauss, x[:1_000_000]) > 1e-3
    y = linear_gauss.sample(10_000_000, device="cuda", generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------------
# issue 13 item 7: log-SNR grid + PCHIP, uniform floor, mass per quarter; issue 12: non-JSON tables

@pytest.mark.parametrize("shape", ["monotone", "bumpy", "two"])
def test_pchip_matches_scipy(shape):
    """vefast's PCHIP (Fritsch-Carlson) equals scipy's PchipInterpolator inside the knots, is flat
    outside, and never leaves the range of the two knots around a point."""
    from scipy.interpolate import PchipInterpolator

    from vefast.sampling.vr import pchip

    g = torch.Generator().manual_seed(7)
    n = 2 if shape == "two" else 23
    x = torch.sort(torch.rand(n, generator=g, dtype=torch.float64) * 10).values
    y = torch.rand(n, generator=g, dtype=torch.float64)
    y = torch.cumsum(y, 0) if shape == "monotone" else y
    xq = torch.linspace(float(x[0]), float(x[-1]), 997, dtype=torch.float64)
    want = torch.from_numpy(PchipInterpolator(x.numpy(), y.numpy())(xq.numpy()))
    torch.testing.assert_close(pchip(xq, x, y), want, rtol=1e-12, atol=1e-12)
    out = pchip(torch.tensor([-float("inf"), float(x[0]) - 1, float(x[-1]) + 1]), x, y)
    assert out.tolist() == [float(y[0]), float(y[0]), float(y[-1])]
    k = (torch.searchsorted(x, xq, right=True) - 1).clamp(0, n - 2)
    lo, hi = torch.minimum(y[k], y[k + 1]), torch.maximum(y[k], y[k + 1])
    v = pchip(xq, x, y)
    assert bool(((v >= lo - 1e-12) & (v <= hi + 1e-12)).all())
    if shape == "monotone":
        assert bool((torch.diff(v) >= 0).all())


@pytest.mark.expect_fallback("separation_function:cpu")  # the torch Gram path on CPU tensors, on purpose
def test_log_snr_grid_error_is_far_below_the_monte_carlo_error(monkeypatch):
    """S on a 128-point adaptive log-SNR grid, interpolated (PCHIP of log(1 - S)) to the 999 positive-SNR
    knots, against exact mode (S at every knot) with the same noise: the table's KS distance and the S
    error are far below the Monte Carlo error, i.e. the difference between two draws of the K noises."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(24, 96, generator=torch.Generator().manual_seed(0))

    def table(seed, points):
        return VRTimestepSampler.from_data(x, "linear", num_noise=16, num_t=1000, snr_points=points,
                                           generator=torch.Generator().manual_seed(seed))

    exact, grid, other = table(1, None), table(1, 128), table(2, None)
    assert grid.interp == "pchip" and grid.snr_grid.numel() == 128 and grid.meta["snr_points"] == 128
    assert exact.interp == "linear" and exact.snr_grid.numel() == 999 and exact.meta["snr_points"] == "exact"
    ks_interp, ks_mc = grid.ks_distance(exact), other.ks_distance(exact)
    assert ks_interp < ks_mc / 200, (ks_interp, ks_mc)  # measured 1/1200 (linear interpolation of S: 1/76)
    s_interp, s_mc = (grid.S - exact.S).abs(), (other.S - exact.S).abs()
    assert float(s_interp.mean()) < float(s_mc.mean()) / 100, (s_interp.mean(), s_mc.mean())  # 1/437 (1/65)
    assert float(s_interp.max()) < float(s_mc.max()) / 50, (s_interp.max(), s_mc.max())      # 1/156 (1/37)
    assert grid.fit_logit_normal() == exact.fit_logit_normal()
    # the grid's own values are exact-mode estimates at those SNRs (same noise, common random numbers)
    r = grid.snr_grid[::17]
    torch.testing.assert_close(grid.S_grid[::17], vefast.separation_function(
        x, r, num_noise=16, generator=torch.Generator().manual_seed(1)), rtol=0, atol=1e-12)


def test_mix_uniform_floor_and_quarter_mass(tmp_path):
    """density (1 - w) pi_VR + w: normalized, a floor of w everywhere, the CDF mixes the same way; the mass
    per quarter sums to 1 (uniform: 1/4 each); the floor survives save/load and load can replace it."""
    collapsed = torch.clamp((R / 0.1) ** 2, max=1.0)  # S = 1 above r = 0.1 (t ~ 0.09): like M rows in many dims
    peaked = VRTimestepSampler.from_separation(R, collapsed, "linear", num_t=500)
    q = peaked.quarter_mass()
    assert sum(q) == pytest.approx(1.0, abs=1e-12) and q[3] < 0.01
    w = 0.2
    mixed = peaked.with_mix_uniform(w)
    torch.testing.assert_close(mixed.pdf(T), (1 - w) * peaked.pdf(T) + w, rtol=1e-12, atol=0)
    torch.testing.assert_close(mixed.cdf(T), (1 - w) * peaked.cdf(T) + w * T, rtol=0, atol=1e-12)
    assert all(m >= w / 4 - 1e-12 for m in mixed.quarter_mass())
    cells = 0.5 * (mixed.density[1:] + mixed.density[:-1]) * torch.diff(mixed.t)
    assert float(cells.sum()) == pytest.approx(1.0, abs=1e-12)
    assert mixed.mass(0.0, 1.0) == pytest.approx(1.0) and mixed.mass(0.3, 0.3) == 0.0
    t = mixed.sample(200_000, generator=torch.Generator().manual_seed(0))
    assert ks_pvalue(mixed, t) > 1e-3
    uniform = peaked.with_mix_uniform(1.0)
    torch.testing.assert_close(uniform.cdf(T), T, rtol=0, atol=1e-12)
    f = tmp_path / "mixed.json"
    mixed.save(f)
    assert json.loads(f.read_text())["mix_uniform"] == w
    assert torch.equal(VRTimestepSampler.load(f).density, mixed.density)
    assert torch.equal(VRTimestepSampler.load(f, mix_uniform=0.0).density, peaked.density)
    with pytest.raises(ValueError, match=r"mix_uniform must lie in \[0, 1\]"):
        peaked.with_mix_uniform(1.5)
    with pytest.raises(ValueError, match="mix_uniform must be finite"):
        VRTimestepSampler.from_separation(R, S_GAUSS, mix_uniform=float("nan"))
    with pytest.raises(ValueError, match=r"mass: need 0 <= lo <= hi <= 1"):
        mixed.mass(0.5, 0.2)


def test_pchip_tables_round_trip(tmp_path):
    vr = VRTimestepSampler.from_separation(R[::40], S_GAUSS[::40], "linear", interp="pchip")
    f = tmp_path / "p.json"
    vr.save(f)
    back = VRTimestepSampler.load(f)
    assert back.interp == "pchip" and torch.equal(back.density, vr.density)
    # PCHIP through 38 points of the closed form is far closer to CosMap than linear interpolation
    lin = VRTimestepSampler.from_separation(R[::40], S_GAUSS[::40], "linear")
    cosmap = 2 / (math.pi * (T**2 + (1 - T) ** 2))
    assert float((vr.pdf(T) - cosmap).abs().max()) < float((lin.pdf(T) - cosmap).abs().max()) / 10
    with pytest.raises(ValueError, match="interp must be one of"):
        VRTimestepSampler.from_separation(R, S_GAUSS, interp="cubic")


def test_load_of_a_non_json_file_names_the_file(tmp_path):
    """Issue 12: VRTimestepSampler.load of a non-JSON file raised a bare JSONDecodeError."""
    for name, content in (("table.npy", b"\x93NUMPY\x01\x00garbage\xff\xfe"), ("table.json", b"{not json")):
        f = tmp_path / name
        f.write_bytes(content)
        with pytest.raises(ValueError, match=rf"{name} is not a vefast VR table: it is not JSON"):
            VRTimestepSampler.load(f)


def test_dit_config_vr_mix_uniform(tmp_path):
    """transport.vr_mix_uniform: checked at config time, applied to a loaded table (replacing its floor)."""
    from vefast.recipes.config import ConfigError, load_config
    from vefast.recipes.dit import DiTConfig, build_timestep_sampler

    with pytest.raises(ConfigError, match=r"transport.vr_mix_uniform must be in \[0, 1\]"):
        load_config(DiTConfig, "dit_tiny.yaml", ["transport.timesteps=vr", "transport.vr_mix_uniform=1.5"])
    f = tmp_path / "t.json"
    VRTimestepSampler.from_separation(R, S_GAUSS, "linear").save(f)
    cfg = load_config(DiTConfig, "dit_tiny.yaml", ["transport.timesteps=vr", f"transport.vr_table={f}",
                                                   "transport.vr_mix_uniform=0.25"])
    sampler = build_timestep_sampler(cfg, None, torch.device("cpu"))
    assert sampler.mix_uniform == 0.25


@pytest.mark.expect_fallback("separation_function:cpu")
def test_from_data_unstandardized_takes_s_in_units_of_the_data_scale(monkeypatch):
    """normalize=False: S tends to the data's mean square per dim, not 1, so the density h^2 (E||x||^2/d - S)
    uses S in those units: standardized data give the same table either way, and scaled data no longer pile
    their mass at t -> 1 (S < mean square: 1 - S never vanished) or lose it (S > 1 clipped). The torch path
    (the math, not the kernel: interpreted, 200 SNR values take minutes)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    g = torch.Generator().manual_seed(3)
    x = standardize(torch.randn(24, 6, generator=g, dtype=torch.float64)).float()
    kw = dict(num_noise=16, num_t=200, snr_points=None, generator=None)
    a = VRTimestepSampler.from_data(x, normalize=True, **kw | {"generator": torch.Generator().manual_seed(1)})
    b = VRTimestepSampler.from_data(x, normalize=False, **kw | {"generator": torch.Generator().manual_seed(1)})
    torch.testing.assert_close(b.density, a.density, rtol=1e-5, atol=1e-6)
    for scale in (0.5, 2.0):
        v = VRTimestepSampler.from_data(scale * x, normalize=False, **kw | {"generator": torch.Generator().manual_seed(1)})
        assert float(v.S_grid.max()) <= 1.0 + 1e-6 and v.mass(0.99, 1.0) < 0.01


def test_from_data_names_x1_when_it_has_no_rows():
    with pytest.raises(ValueError, match="x1 must have at least M = 2 rows"):
        VRTimestepSampler.from_data(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="x1 must have shape"):
        VRTimestepSampler.from_data(torch.tensor(1.0))
