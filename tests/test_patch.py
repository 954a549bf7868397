"""Module swaps: patched DiT / SiT / LightningDiT give the unpatched outputs and gradients, share parameters."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from vefast.models.dit import DiT, SiT
from vefast.models.lightningdit import LightningDiT
from vefast.nn import patch_dit, patch_lightningdit
from vefast.nn.dit_modules import FusedAttention, FusedDiTBlock, FusedFinalLayer, FusedSwiGLUFFN
from vefast.ops import _common

TINY = dict(input_size=4, patch_size=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights (the official init zeroes adaLN and the output layer: blocks would be identities)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if name.endswith("norm1.weight") else 0.0))
    return model


def _data(C=4, B=2, device="cpu"):
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(B, C, 4, 4, generator=g), torch.rand(B, generator=g) * 1000,
            torch.randint(0, 10, (B,), generator=g))
    return tuple(t.to(device) for t in data)


def _out_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.device)
    (out * w).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_swap(model: nn.Module, patch, C=4, atol=2e-4, device="cpu"):
    model = _randomize(model).train(False).to(device)
    params_before = dict(model.named_parameters())
    keys_before = list(model.state_dict())
    inputs = _data(C, device=device)
    ref_out, ref_grads = _out_and_grads(model, inputs)
    patched = patch(model)
    assert patched is model
    assert list(patched.state_dict()) == keys_before
    after = dict(patched.named_parameters())
    assert after.keys() == params_before.keys() and all(after[k] is params_before[k] for k in after)
    assert all(isinstance(b, FusedDiTBlock) for b in patched.blocks)
    assert isinstance(patched.final_layer, FusedFinalLayer)
    out, grads = _out_and_grads(patched, inputs)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=atol, rtol=1e-3, msg=k)
    return patched


@pytest.mark.parametrize("cls", [DiT, SiT])
def test_patch_dit(cls, device):
    _check_swap(cls(**TINY), patch_dit, device=device)


@pytest.mark.parametrize("flags", [dict(), dict(use_qknorm=True), dict(wo_shift=True),
                                   dict(use_qknorm=True, use_rmsnorm=False, use_swiglu=False)])
def test_patch_lightningdit(flags, device):
    patched = _check_swap(LightningDiT(**TINY, in_channels=4, **flags), patch_lightningdit, device=device)
    if flags.get("use_swiglu", True):
        assert isinstance(patched.blocks[0].mlp, FusedSwiGLUFFN)
    assert isinstance(patched.blocks[0].attn, FusedAttention)


@pytest.mark.expect_fallback("*:cpu*")
def test_eager_fallback_path(monkeypatch):
    """Without the interpreter, CPU tensors run the eager references: same outputs and grads."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _check_swap(LightningDiT(**TINY, in_channels=4, use_qknorm=True), patch_lightningdit, atol=1e-5)


def test_timm_built_block_is_recognized(device):
    """A DiT block assembled from timm's Attention / Mlp, as the official DiT code does."""
    from timm.models.vision_transformer import Attention, Mlp

    class Block(nn.Module):
        def __init__(self, D=32, H=2):
            super().__init__()
            self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
            self.attn = Attention(D, num_heads=H, qkv_bias=True)
            self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(in_features=D, hidden_features=4 * D, act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D, bias=True))

        def forward(self, x, c):
            sm, cm, gm, sf, cf, gf = self.adaLN_modulation(c).chunk(6, dim=1)
            x = x + gm.unsqueeze(1) * self.attn(self.norm1(x) * (1 + cm.unsqueeze(1)) + sm.unsqueeze(1))
            return x + gf.unsqueeze(1) * self.mlp(self.norm2(x) * (1 + cf.unsqueeze(1)) + sf.unsqueeze(1))

    model = nn.Sequential()
    model.add_module("block", _randomize(Block()).to(device))
    x, c = torch.randn(2, 16, 32, device=device), torch.randn(2, 32, device=device)
    ref = model.block(x, c)
    patch_dit(model)
    assert isinstance(model.block, FusedDiTBlock)
    torch.testing.assert_close(model.block(x, c), ref, atol=2e-4, rtol=1e-4)


@pytest.mark.expect_fallback("patch")
def test_unrecognized_modules_are_left_as_is():
    model = DiT(**{**TINY, "depth": 2})
    biased = model.blocks[1]
    biased.norm1 = nn.LayerNorm(32, eps=1e-6)  # affine LayerNorm with a bias: not DiT's norm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch_dit(model)
    assert isinstance(model.blocks[0], FusedDiTBlock) and model.blocks[1] is biased
    assert any("LayerNorm with a bias" in v for v in _common.reported_fallbacks().values())
    light = LightningDiT(**TINY, in_channels=4)  # RMSNorm blocks: patch_dit does not take them
    blocks = list(light.blocks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch_dit(light)
    assert all(a is b for a, b in zip(light.blocks, blocks))
    plain = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    layers = list(plain)
    assert patch_lightningdit(plain) is plain and all(a is b for a, b in zip(plain, layers))


def test_patch_is_idempotent_and_checks_input():
    model = patch_lightningdit(LightningDiT(**TINY, in_channels=4))
    blocks = list(model.blocks)
    patch_lightningdit(model)
    assert all(a is b for a, b in zip(model.blocks, blocks))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        patch_dit("DiT-XL/2")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_gpu_full_model_swap(dtype):
    """LightningDiT-B/1-sized model (real widths, depth 2): patched vs unpatched under autocast."""
    torch.manual_seed(0)
    model = _randomize(LightningDiT(input_size=16, patch_size=1, hidden_size=1152, depth=2, num_heads=16)).cuda()
    inputs = [t.cuda() for t in (torch.randn(8, 32, 16, 16), torch.rand(8) * 1000, torch.randint(0, 1000, (8,)))]
    with torch.autocast("cuda", dtype=dtype):
        ref = model(*inputs).float()
        patch_lightningdit(model)
        out = model(*inputs).float()
    assert (out - ref).abs().max().item() <= 0.05 * ref.abs().max().item()


# ---- the attention inside the swapped blocks (q/k norms, RoPE, backend) ---------------------------------
def _spy_prologue(monkeypatch) -> dict:
    """Count the fused q/k prologue's launches (vefast.ops.qk_prologue)."""
    from vefast.ops import qk_prologue as qp

    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = qp.launch_fwd, qp.launch_bwd

    def count(kind, fn):
        def wrapped(*a, **k):
            calls[kind] += 1
            return fn(*a, **k)
        return wrapped
    monkeypatch.setattr(qp, "launch_fwd", count("fwd", fwd))
    monkeypatch.setattr(qp, "launch_bwd", count("bwd", bwd))
    return calls


@pytest.mark.parametrize("flags,kind", [(dict(), "none"), (dict(use_qknorm=True), "rms"),
                                        (dict(use_qknorm=True, use_rmsnorm=False), "layer")])
def test_lightningdit_attention_runs_the_fused_prologue(flags, kind, device, monkeypatch):
    """RoPE alone, RMSNorm q/k norm + RoPE, LayerNorm q/k norm + RoPE: one prologue launch each way (the outputs
    and gradients are test_patch_lightningdit's)."""
    patched = patch_lightningdit(_randomize(LightningDiT(**TINY, in_channels=4, **flags)).to(device))
    calls = _spy_prologue(monkeypatch)
    _out_and_grads(patched, _data(device=device))
    assert patched.blocks[0].attn._qk[0] == kind
    assert calls == {"fwd": 1, "bwd": 1}


def test_dit_with_timm_qk_norm(device, monkeypatch):
    """DiT / SiT with timm's qk_norm=True (nn.LayerNorm(head_dim), eps 1e-5, weight and bias) swap with patch_dit
    and run the LayerNorm prologue."""
    model = DiT(**TINY)
    for block in model.blocks:
        hd = block.attn.head_dim
        block.attn.q_norm, block.attn.k_norm = nn.LayerNorm(hd), nn.LayerNorm(hd)
    calls = _spy_prologue(monkeypatch)
    patched = _check_swap(model, patch_dit, device=device)
    assert patched.blocks[0].attn._qk == ("layer", 1e-5) and calls == {"fwd": 1, "bwd": 1}


def test_mixed_qk_norms_run_the_modules(device, monkeypatch):
    """q and k normalized differently: the norm modules run eagerly around vefast.attention, same results."""
    model = LightningDiT(**TINY, in_channels=4, use_qknorm=True)
    attn = model.blocks[0].attn
    attn.k_norm = nn.LayerNorm(attn.head_dim)
    calls = _spy_prologue(monkeypatch)
    patched = _check_swap(model, patch_lightningdit, device=device)
    assert patched.blocks[0].attn._qk is None and calls["fwd"] == 0


def test_backend_is_passed_to_the_attention():
    model = patch_lightningdit(LightningDiT(**TINY, in_channels=4), backend="sdpa")
    assert model.blocks[0].attn.backend == "sdpa"
    assert patch_dit(DiT(**TINY)).blocks[0].attn.backend == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        patch_dit(DiT(**TINY), backend="flash")
