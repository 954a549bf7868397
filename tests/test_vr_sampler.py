"""VR-sampling density and samplers (MATH.md §6; seed 004 §3.3, §4.3): closed forms, KS tests of every
sampler against its own CDF (the Triton sampling kernel under the interpreter), determinism, weights,
logit-normal fit, save/load, bad inputs."""
from __future__ import annotations

import json
import math

import pytest
import torch
from scipy import stats

import vefast
from vefast.ops import timestep_sample as ts
from vefast.sampling import LogitNormalSampler, UniformSampler, VRTimestepSampler

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
    """pi(t) = 2 / (pi (t^2 + (1-t)^2)) for N(0, I) data on the linear path (MATH §6)."""
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


def test_vr_kernel_samples_ks_and_open_interval(linear_gauss):
    x = linear_gauss.sample(N, generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and x.shape == (N,)
    assert float(x.min()) > 0 and float(x.max()) < 1
    assert ks_pvalue(linear_gauss, x) > 1e-3


def test_vr_eager_path_samples_ks(linear_gauss, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors then take the eager lookup
    x = linear_gauss.sample(N, generator=torch.Generator().manual_seed(1))
    assert ks_pvalue(linear_gauss, x) > 1e-3


def test_vr_sampling_of_a_peaked_density():
    """A data-like density (S from Gaussian data at d = 4096 with finite M) through the kernel."""
    r = torch.logspace(-3, 3, 400, dtype=torch.float64)
    s = torch.sigmoid(4 * (torch.log(r) + 3.2))  # sharp S transition at r ~ 0.04
    vr = VRTimestepSampler.from_separation(r, s, "linear")
    assert vr.table_error <= 1e-5
    x = vr.sample(N, generator=torch.Generator().manual_seed(2))
    assert ks_pvalue(vr, x) > 1e-3


def test_kernel_table_lookup_matches_reference_and_exact_icdf(linear_gauss):
    table = linear_gauss.table()
    u = ts.uniforms_reference(5000, generator=torch.Generator().manual_seed(3))
    got = ts._launch_sample(table, 5000, 0, u=u)
    ref = ts.timestep_sample_reference(table.double(), u.double())
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-7)
    # the table's distribution is within table_error (KS) of the exact one: F(sample) vs u
    assert float((linear_gauss.cdf(got.double()) - u.double()).abs().max()) <= linear_gauss.table_error + 1e-6


def test_determinism_by_seed(linear_gauss):
    a = linear_gauss.sample(5000, generator=torch.Generator().manual_seed(7))
    b = linear_gauss.sample(5000, generator=torch.Generator().manual_seed(7))
    c = linear_gauss.sample(5000, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    s = torch.tensor(123)
    assert torch.equal(ts.timestep_sample(linear_gauss.table(), 777, seed=s),
                       ts.timestep_sample(linear_gauss.table(), 777, seed=s))
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


def test_importance_weights(linear_gauss):
    t, w = linear_gauss.sample(N, generator=torch.Generator().manual_seed(5), return_weights=True)
    torch.testing.assert_close(w.double(), 1 / linear_gauss.pdf(t.double()), rtol=1e-6, atol=0)
    assert float(w.mean()) == pytest.approx(1.0, abs=0.01)           # E_pi[1 / pi] = 1
    assert float((w * t).mean()) == pytest.approx(0.5, abs=0.01)     # E_pi[w t] = E_uniform[t]
    _, w_u = UniformSampler().sample(10, return_weights=True)
    assert torch.equal(w_u, torch.ones(10))


def test_from_data_small_and_metadata():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(24, 2, 3, 3, generator=g, dtype=torch.float64)
    vr = VRTimestepSampler.from_data(x, "cosine", num_noise=12, num_t=30, generator=torch.Generator().manual_seed(3))
    assert vr.meta == {"M": 24, "K": 12, "d": 18, "seed": 3, "normalize": True}
    r = vefast.path("cosine").snr(vr.t[1:30])
    s = vefast.separation_function(x, r, num_noise=12, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(vr.S[1:30], s)
    assert 0 < vr.peak < 1 and torch.all(vr.density >= 0)


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


def test_timestep_sample_op_under_torch_compile(linear_gauss):
    table, seed = linear_gauss.table(), torch.tensor(5)
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
