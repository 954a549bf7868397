"""Official call sites that must work unchanged (issue 12 §1), written from what the official code does:

- LightningDiT's ``train.py`` builds its model with ``use_checkpoint=...`` (per-block activation
  checkpointing); accepted by vefast's LightningDiT, DiT and SiT with that meaning.
- LightningDiT's ``inference.py`` samples through ``forward_with_cfg(x, t, y, cfg_scale, cfg_interval=True,
  cfg_interval_start=s)``: guided output, except where ``t < s`` (then the conditional output). LightningDiT
  guides all latent channels, DiT / SiT only the first three.
- VA-VAE's ``DiagonalGaussianDistribution.kl(no_sum=True)``: ``mean^2 + var - 1 - logvar`` unsummed, no 0.5.
- LDM's ``sample()`` draws ``torch.randn(mean.shape)`` (float32, default CPU generator) and promotes; with
  ``deterministic=True`` it still draws, and ``kl()`` / ``nll()`` return a CPU float32 ``tensor([0.])``.
- REPA builds its projector as ``build_mlp(hidden_size, projector_dim, z_dim)`` and saves it under
  ``projectors.N.*``; its loss is ``-mean(cos)``.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import vefast
import vefast.models.dit as dit_module
from vefast.models.dit import DiT, SiT
from vefast.models.lightningdit import LightningDiT
from vefast.nn import DiagonalGaussianDistribution, REPAProjector

TINY = dict(input_size=8, patch_size=2, hidden_size=32, depth=3, num_heads=2, num_classes=10)
FAMILIES = {"DiT": (DiT, {"learn_sigma": False}), "SiT": (SiT, {"learn_sigma": False}),
            "LightningDiT": (LightningDiT, {"in_channels": 4, "use_qknorm": True})}


def _build(family: str, **extra) -> nn.Module:
    cls, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = cls(**TINY, **kwargs, **extra)
    # the official init zeroes adaLN and the output layer: randomize so the blocks matter
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def _inputs(B: int = 2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, 4, 8, 8, generator=g), torch.rand(B, generator=g),
            torch.randint(0, 10, (B,), generator=g))


# ------------------------------------------------------------------------------------------------
# use_checkpoint
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_use_checkpoint_recomputes_each_block_with_equal_results(family, monkeypatch):
    plain, ckpt = _build(family), _build(family, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    real = dit_module.checkpoint
    monkeypatch.setattr(dit_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, t, y = _inputs()
    outs, grads = [], []
    for model in (plain, ckpt):
        model.train()
        torch.manual_seed(5)  # label dropout draws
        out = model(x, t, y)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(calls) == TINY["depth"]  # one checkpoint per block, only for the use_checkpoint model
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    calls.clear()
    with torch.no_grad():
        ckpt(x, t, y)
    assert not calls  # nothing to recompute without autograd


def test_use_checkpoint_saves_less_for_backward():
    def saved_bytes(model):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        x, t, y = _inputs()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, t, y).sum()
        return total

    plain, ckpt = _build("LightningDiT"), _build("LightningDiT", use_checkpoint=True)
    assert saved_bytes(ckpt) < 0.5 * saved_bytes(plain)


def test_use_checkpoint_must_be_bool():
    with pytest.raises(TypeError, match="use_checkpoint must be a bool"):
        LightningDiT(**TINY, use_checkpoint="yes")


# ------------------------------------------------------------------------------------------------
# forward_with_cfg with the guidance interval
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("t_value", [0.05, 0.5])
def test_forward_with_cfg_guidance_interval(family, t_value):
    model = _build(family).eval()
    x, _, y = _inputs(2)
    null = torch.full_like(y, TINY["num_classes"])
    xx, yy = torch.cat([x, x]), torch.cat([y, null])
    tt = torch.full((4,), t_value)
    start, scale = 0.11, 4.0
    with torch.no_grad():
        out = model.forward_with_cfg(xx, tt, y=yy, cfg_scale=scale, cfg_interval=True, cfg_interval_start=start)
        cond, uncond = model(x, tt[:2], y), model(x, tt[:2], null)
    guided_channels = 4 if family == "LightningDiT" else 3
    expected = cond.clone()
    if t_value >= start:
        g = slice(0, guided_channels)
        expected[:, g] = uncond[:, g] + scale * (cond[:, g] - uncond[:, g])
    torch.testing.assert_close(out[:2], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[2:, :guided_channels], out[:2, :guided_channels], rtol=0, atol=0)  # both halves
    # without the interval: always guided (the positional call of DiT's sample.py)
    with torch.no_grad():
        always = model.forward_with_cfg(xx, tt, yy, scale)
    g = slice(0, guided_channels)
    torch.testing.assert_close(always[:2, g], uncond[:, g] + scale * (cond[:, g] - uncond[:, g]), rtol=1e-5, atol=1e-6)


def test_forward_with_cfg_interval_needs_its_start():
    model = _build("LightningDiT").eval()
    x, t, y = _inputs(2)
    with pytest.raises(ValueError, match="cfg_interval_start"):
        model.forward_with_cfg(x, t, y, 2.0, cfg_interval=True)


# ------------------------------------------------------------------------------------------------
# DiagonalGaussianDistribution: VA-VAE's kl(no_sum) and LDM's sampling semantics
# ------------------------------------------------------------------------------------------------
def _moments(dtype=torch.float32, shape=(2, 8, 3, 5)):
    g = torch.Generator().manual_seed(3)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def test_kl_no_sum_is_vavae_pp_style():
    p, q = _moments(torch.float64), _moments(torch.float64, (2, 8, 3, 5)).flip(0)
    post = DiagonalGaussianDistribution(p)
    mean, logvar = p.chunk(2, dim=1)
    logvar = logvar.clamp(-30, 20)
    expected = mean.pow(2) + logvar.exp() - 1.0 - logvar
    torch.testing.assert_close(post.kl(no_sum=True), expected, rtol=1e-14, atol=0)
    other = DiagonalGaussianDistribution(q)
    torch.testing.assert_close(post.kl(other, no_sum=True), post.kl(other), rtol=0, atol=0)  # ignored with other
    with pytest.raises(TypeError, match="no_sum must be a bool"):
        post.kl(no_sum=1)


@pytest.mark.expect_fallback("DiagonalGaussianDistribution.sample:cpu")
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float32], ids=str)
def test_eager_sample_is_ldms(dtype, monkeypatch):
    """LDM: ``mean + std * torch.randn(mean.shape).to(device)`` -- float32 noise, promoted result."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the eager CPU path
    p = _moments(dtype)
    post = DiagonalGaussianDistribution(p)
    torch.manual_seed(11)
    z = post.sample()
    after = torch.rand(3)
    torch.manual_seed(11)
    mean, logvar = p.chunk(2, dim=1)
    ldm = mean + torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0)) * torch.randn(mean.shape)
    assert z.dtype == ldm.dtype == torch.promote_types(dtype, torch.float32)
    torch.testing.assert_close(z, ldm, rtol=0, atol=0)
    torch.testing.assert_close(after, torch.rand(3), rtol=0, atol=0)  # same RNG consumption


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_deterministic_posterior_is_ldms(dtype):
    p = _moments(dtype)
    post = DiagonalGaussianDistribution(p, deterministic=True)
    torch.manual_seed(7)
    z = post.sample()
    after = torch.rand(2)
    torch.manual_seed(7)
    torch.randn(post.mean.shape)  # LDM's sample() draws even when deterministic
    torch.testing.assert_close(after, torch.rand(2), rtol=0, atol=0)
    assert z.dtype == torch.promote_types(dtype, torch.float32)
    torch.testing.assert_close(z, post.mean.to(z.dtype), rtol=0, atol=0)
    for value in (post.kl(), post.nll(post.mean)):
        assert value.dtype == torch.float32 and value.device.type == "cpu" and value.tolist() == [0.0]


def test_fused_sample_has_ldms_output_dtype():
    post = DiagonalGaussianDistribution(_moments(torch.bfloat16))
    z = post.sample(generator=torch.Generator().manual_seed(0))
    assert z.dtype == torch.float32 and z.shape == post.mean.shape


def test_nll_refuses_a_broadcastable_wrong_shape():
    post = DiagonalGaussianDistribution(_moments())
    for bad in (post.mean[:1], post.mean[:, :, :1]):
        with pytest.raises(ValueError, match="sample must have the shape of the mean"):
            post.nll(bad)


# ------------------------------------------------------------------------------------------------
# REPA: projector construction order, weights, loss
# ------------------------------------------------------------------------------------------------
def _repa_build_mlp(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """What REPA's build_mlp builds: Linear(hidden, proj) SiLU Linear(proj, proj) SiLU Linear(proj, z)."""
    return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                         nn.SiLU(), nn.Linear(projector_dim, z_dim))


def test_repa_projector_in_repas_order_loads_projectors_n():
    ours = REPAProjector.from_repa(32, 64, 16)
    theirs = [_repa_build_mlp(32, 64, 16) for _ in range(2)]
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs[0].state_dict().items()}
    sd = {f"projectors.{i}.{k}": v for i, m in enumerate(theirs) for k, v in m.state_dict().items()}
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(3)
    ours.load_repa_state_dict({"model": sd}, index=1)
    h = torch.randn(2, 5, 32)
    torch.testing.assert_close(ours(h), theirs[1](h), rtol=0, atol=0)
    ema = {k: v + 1 for k, v in sd.items()}
    ours.load_repa_state_dict({"model": sd, "ema": ema}, index=0)  # REPA's checkpoints: ema preferred
    torch.testing.assert_close(ours[0].weight, theirs[0][0].weight + 1, rtol=0, atol=0)
    with pytest.raises(KeyError, match=r"projectors\.2\."):
        ours.load_repa_state_dict(sd, index=2)


def _nearly_orthogonal(r: int = 512, d: int = 64, mean_cos: float = 1e-4, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(r, d, generator=g, dtype=torch.float64)
    u = torch.randn(r, d, generator=g, dtype=torch.float64)
    t = t / t.norm(dim=-1, keepdim=True)
    u = u - (u * t).sum(-1, keepdim=True) * t
    u = u / u.norm(dim=-1, keepdim=True)
    c = mean_cos + 1e-5 * torch.randn(r, 1, generator=g, dtype=torch.float64)
    pred = c * t + (1 - c * c).sqrt() * u
    return pred.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)


@pytest.mark.parametrize("path", ["fused", pytest.param("eager", marks=pytest.mark.expect_fallback("repa_loss:cpu"))])
def test_repa_loss_keeps_relative_accuracy_near_zero(path, device, monkeypatch):
    """REPA computes -mean(cos); 'cos_loss - 1' cancels in fp32 (relative error ~1e-4 at a loss of 1e-4)."""
    if path == "eager":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        device = torch.device("cpu")
    pred, target = _nearly_orthogonal(device=device)
    ref = -torch.nn.functional.cosine_similarity(pred.double(), target.double(), dim=-1).mean()
    loss = vefast.repa_loss(pred, target)
    rel = abs(loss.double().item() - ref.item()) / abs(ref.item())
    assert rel < 1e-5, f"relative error {rel:.2e}"
    assert math.isclose(ref.item(), -1e-4, rel_tol=0.05)


def test_distribution_errors_name_parameters():
    with pytest.raises(TypeError, match="parameters must have dtype"):
        DiagonalGaussianDistribution(torch.zeros(2, 4, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="parameters must have at least one element"):
        DiagonalGaussianDistribution(torch.zeros(0, 4, 2, 2))
    post = DiagonalGaussianDistribution(torch.zeros(2, 4, 2, 2))
    with pytest.raises(ValueError, match=r"noise must have the shape of the mean \(2, 2, 2, 2\)"):
        post.ve(noise=torch.zeros(2, 2, 2, 3))
    with pytest.raises(ValueError, match="noise must be on the device of parameters"):
        post.kl_loss(noise=torch.zeros(2, 2, 2, 2, device="meta"))
    with pytest.raises(ValueError, match=r"kl\(\) sums dims \[1, 2, 3\]"):
        DiagonalGaussianDistribution(torch.zeros(2, 4, 2)).kl()
    assert DiagonalGaussianDistribution(torch.zeros(2, 4, 2)).kl(no_sum=True).shape == (2, 2, 2)
