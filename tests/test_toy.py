"""The 2D toy demo: the tree mixture (closed forms vs independent checks), the models, `vefast toy`."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

import vefast
from vefast.cli import main as cli_main
from vefast.models.toy import ToyTokenizer, ToyVelocity, mlp
from vefast.recipes import toy
from vefast.recipes.toy_mixture import NUM_COMPONENTS, GaussianMixture2D


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tree() -> GaussianMixture2D:
    return GaussianMixture2D.tree(0)


# ---------------------------------------------------------------------------------------------- mixture

def test_tree_has_1016_components(tree):
    assert NUM_COMPONENTS == 1016 == tree.num_components
    assert tree.mu.shape == (1016, 2) and tree.sigma.shape == (1016, 2, 2)
    assert torch.allclose(tree.phi.sum(), torch.tensor(1.0, dtype=torch.float64))
    # anisotropic: longer along the segment than across (std ratio 1.5 for a segment of mean length)
    eig = torch.linalg.eigvalsh(tree.sigma)
    ratio = eig[:, 1] / eig[:, 0]
    assert ratio.median() > 2 and ratio.max() > 4 and bool((eig[:, 0] > 0).all())
    # children get smaller weights: the 8 root components outweigh the 8 of any leaf segment
    assert tree.phi[:8].sum() > 10 * tree.phi[-8:].sum()


def test_tree_is_deterministic_and_seeded():
    a, b, c = GaussianMixture2D.tree(0), GaussianMixture2D.tree(0), GaussianMixture2D.tree(1)
    assert torch.equal(a.mu, b.mu) and torch.equal(a.sigma, b.sigma)
    assert not torch.allclose(a.mu, c.mu)


def test_normalization_zero_mean_half_std(tree):
    mean, cov = tree.moments()
    assert mean.abs().max() < 1e-12
    assert torch.allclose(cov.diagonal(), torch.full((2,), 0.25, dtype=torch.float64), atol=1e-12)
    x = tree.sample(400_000, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert x.mean(0).abs().max() < 3e-3                     # std of the estimate ~8e-4
    assert (x.std(0) - 0.5).abs().max() < 3e-3


def test_log_prob_matches_torch_distributions(tree):
    # an independent evaluation: torch.distributions' batched MultivariateNormal (Cholesky based)
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([tree.sample(16, gen, dtype=torch.float64),
                   torch.rand(8, 2, generator=gen, dtype=torch.float64) * 3 - 1.5])
    for sigma in (0.0, 0.07):
        comps = torch.distributions.MultivariateNormal(
            tree.mu, covariance_matrix=tree.sigma + sigma**2 * torch.eye(2, dtype=torch.float64))
        ref = torch.logsumexp(comps.log_prob(x[:, None, :]) + tree.phi.log(), dim=1)
        torch.testing.assert_close(tree.log_prob(x, sigma=sigma), ref, rtol=1e-9, atol=1e-8)
        # the direct (N, K, 2) path that score() uses agrees as well
        direct = torch.logsumexp(tree._terms(x, sigma)[0], dim=1)
        torch.testing.assert_close(direct, ref, rtol=1e-9, atol=1e-8)


def test_density_integrates_to_one_on_a_grid(tree):
    # the raw components are ~1e-3 thin: smoothing by sigma = 0.05 (eq. 22) makes a 0.0125 grid exact
    h, sigma = 0.0125, 0.05
    g = torch.arange(-2.0, 2.0, h, dtype=torch.float64) + h / 2
    gx, gy = torch.meshgrid(g, g, indexing="xy")
    p = tree.log_prob(torch.stack((gx.reshape(-1), gy.reshape(-1)), 1), sigma=sigma).exp()
    assert abs(float(p.sum() * h * h) - 1.0) < 2e-3


def test_samples_follow_the_density(tree):
    # histogram of smoothed samples (x + sigma n) vs the cell integrals of p(x; sigma)
    sigma, n, h, cell = 0.05, 200_000, 0.02, 0.2
    gen = torch.Generator().manual_seed(2)
    x = tree.sample(n, gen, dtype=torch.float64) + sigma * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    edges = torch.arange(-2.0, 2.0 + 1e-9, cell, dtype=torch.float64)
    counts = torch.histogramdd(x, bins=[edges, edges]).hist
    g = torch.arange(-2.0, 2.0, h, dtype=torch.float64) + h / 2
    gx, gy = torch.meshgrid(g, g, indexing="ij")
    p = tree.log_prob(torch.stack((gx.reshape(-1), gy.reshape(-1)), 1), sigma=sigma).exp().reshape(len(g), len(g))
    k = round(cell / h)
    expected = p.reshape(len(edges) - 1, k, len(edges) - 1, k).sum((1, 3)) * h * h * n
    big = expected > 200
    z = (counts[big] - expected[big]) / expected[big].sqrt()
    assert big.sum() > 30
    assert z.abs().max() < 6 and z.square().mean() < 3     # chi-square per cell ~ 1 when right


@pytest.mark.parametrize("sigma", [0.0, 0.02, 0.2])
def test_score_is_gradient_of_log_prob(tree, sigma):
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([tree.sample(64, gen, dtype=torch.float64),
                   torch.rand(16, 2, generator=gen, dtype=torch.float64) * 2 - 1]).requires_grad_(True)
    (grad,) = torch.autograd.grad(tree.log_prob(x, sigma=sigma).sum(), x)
    score = tree.score(x.detach(), sigma=sigma)
    torch.testing.assert_close(score, grad, rtol=1e-6, atol=1e-6 * float(grad.abs().max()))


def test_mixture_bad_inputs(tree):
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \(N, 2\)"):
        tree.log_prob(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \(N, 2\)"):
        tree.score(torch.zeros(4))
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        tree.sample(-1)
    with pytest.raises(ValueError, match="expected phi"):
        GaussianMixture2D(torch.ones(3), torch.zeros(3, 2), torch.eye(2).expand(2, 2, 2))
    with pytest.raises(ValueError, match="must be positive"):
        GaussianMixture2D(torch.tensor([1.0, 0.0]), torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2))


# ---------------------------------------------------------------------------------------------- models

def test_models_shapes_and_bad_arguments():
    tok = ToyTokenizer(width=16, depth=3)
    mean, logvar = tok.encode(torch.randn(5, 2))
    assert mean.shape == logvar.shape == (5, 2) and tok.decode(mean).shape == (5, 2)
    assert sum(isinstance(m, torch.nn.Linear) for m in tok.encoder) == 3
    v = ToyVelocity(width=16, depth=4, act="silu", time_features=6)
    assert v(torch.randn(5, 2), torch.rand(5)).shape == (5, 2)
    assert v.time_embedding(torch.rand(5)).shape == (5, 7)
    with pytest.raises(ValueError, match="act must be one of"):
        mlp(2, 2, 8, 3, act="tanhh")
    with pytest.raises(ValueError, match=r"depth \(Linear layers\) must be an int >= 2"):
        mlp(2, 2, 8, 1)
    with pytest.raises(ValueError, match="width must be a positive int"):
        mlp(2, 2, 0, 3)
    with pytest.raises(ValueError, match="time_features must be an even int"):
        ToyVelocity(time_features=3)


def test_lr_schedules():
    cfg = replace(toy.PRESETS["default"], lr=1e-3, warmup=10)
    lrs = [toy.lr_at(i, 100, cfg) for i in range(100)]
    assert lrs[9] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-4) and lrs[-1] < 1e-5
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    rs = replace(cfg, schedule="rsqrt", warmup=512)
    assert toy.lr_at(100, 10**5, rs) == 1e-3 and toy.lr_at(2048, 10**5, rs) == pytest.approx(5e-4)


# ---------------------------------------------------------------------------------------------- the command

@pytest.fixture
def eager_ops(monkeypatch):
    """Run the reparameterization ops on their eager CPU path, as `vefast toy` does on a CPU.

    The test lane sets TRITON_INTERPRET=1, under which the interpreted Triton kernels take about a
    second per call; their values are tested in test_reparam.py. The environment is read per call.
    """
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.expect_fallback("ve_loss:cpu", "kl_loss:cpu")
def test_quick_run_writes_png_json_and_table(tmp_path, capsys, monkeypatch, eager_ops):
    calls = {"kl": 0, "ve": 0}
    kl, ve = vefast.kl_loss, vefast.ve_loss

    def counting(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(vefast, "kl_loss", counting("kl", kl))
    monkeypatch.setattr(vefast, "ve_loss", counting("ve", ve))
    assert cli_main(["toy", "--quick", "--threads", "1", "--out", str(tmp_path), "--no-progress"]) == 0
    assert torch.get_num_threads() == 1                  # restored
    out = capsys.readouterr().out
    for word in ("variant", "rec MSE", "latent std", "sample log-lik", "off data", "real data"):
        assert word in out
    assert any(line.startswith("kl ") for line in out.splitlines())
    assert any(line.startswith("ve ") for line in out.splitlines())
    png = (tmp_path / "toy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    report = json.loads((tmp_path / "toy.json").read_text())
    assert report["preset"] == "quick" and report["config"]["euler_steps"] == 20
    for v in ("kl", "ve"):
        m = report["metrics"][v]
        assert set(m) >= {"rec_mse", "latent_std", "sample_loglik", "off_data"}
        assert all(math.isfinite(x) for x in m.values())
        assert 0.0 <= m["off_data"] <= 1.0
    assert 0.0 <= report["real"]["off_data"] < 0.05
    # the library ops did the work: each tokenizer step, each flow batch and the evaluation
    steps = toy.PRESETS["quick"].tok_steps + toy.PRESETS["quick"].flow_steps + 1
    assert calls == {"kl": steps, "ve": steps}


@pytest.mark.expect_fallback("ve_loss:cpu", "kl_loss:cpu")
def test_same_seed_same_numbers(eager_ops):
    cfg = replace(toy.PRESETS["quick"], tok_steps=15, flow_steps=15, samples=500, real_samples=1000, pool=2048)
    a = toy.run(cfg, 5, torch.device("cpu"), progress=False, log=lambda *_: None)
    b = toy.run(cfg, 5, torch.device("cpu"), progress=False, log=lambda *_: None)
    c = toy.run(cfg, 6, torch.device("cpu"), progress=False, log=lambda *_: None)
    assert a["metrics"] == b["metrics"] and a["curves"] == b["curves"]
    assert torch.equal(a["arrays"]["ve"]["samples"], b["arrays"]["ve"]["samples"])
    assert a["metrics"] != c["metrics"]


@pytest.mark.parametrize("argv, match", [
    (["--steps", "0"], "positive integer"),
    (["--steps", "abc"], "positive integer"),
    (["--lr", "-1"], "positive finite number"),
    (["--full", "--quick"], "not allowed with"),
    (["--batch", "1.5"], "positive integer"),
])
def test_bad_arguments_exit_with_usage(argv, match, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli_main(["toy", "--out", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def test_bad_argument_values_raise(tmp_path):
    with pytest.raises(ValueError, match="--depth must be >= 2"):
        cli_main(["toy", "--quick", "--depth", "1", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--device must name a torch device"):
        cli_main(["toy", "--quick", "--device", "gpu0", "--out", str(tmp_path)])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            cli_main(["toy", "--quick", "--device", "cuda", "--out", str(tmp_path)])
