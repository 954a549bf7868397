"""Reference models: DiT / SiT / LightningDiT build, forward shapes, official key names, parameter counts."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from vefast.models.dit import DiT, DiT_models, SiT, SiT_models, get_2d_sincos_pos_embed
from vefast.models.lightningdit import LightningDiT, LightningDiT_models

TINY = dict(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10)

# key names of facebookresearch/DiT models.py (DiT(...) with timm PatchEmbed / Attention / Mlp), depth 1
DIT_KEYS = {
    "pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
    "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
    "y_embedder.embedding_table.weight",
    "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias",
    "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias",
    "blocks.0.adaLN_modulation.1.weight", "blocks.0.adaLN_modulation.1.bias",
    "final_layer.linear.weight", "final_layer.linear.bias",
    "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
}
# key names of hustvl/LightningDiT models/lightningdit.py with the released flags (swiglu, rope, rmsnorm), depth 1
LIGHTNING_KEYS = (DIT_KEYS - {k for k in DIT_KEYS if ".mlp.fc" in k}) | {
    "feat_rope.freqs_cos", "feat_rope.freqs_sin",
    "blocks.0.norm1.weight", "blocks.0.norm2.weight",
    "blocks.0.mlp.w12.weight", "blocks.0.mlp.w12.bias", "blocks.0.mlp.w3.weight", "blocks.0.mlp.w3.bias",
    "final_layer.norm_final.weight",
}


def _inputs(model, B=2, C=4, size=8):
    g = torch.Generator().manual_seed(0)
    dev = next(model.parameters()).device
    data = (torch.randn(B, C, size, size, generator=g), torch.rand(B, generator=g) * 1000,
            torch.randint(0, 10, (B,), generator=g))
    return tuple(t.to(dev) for t in data)


def test_dit_sit_forward_shapes(device):
    dit, sit = DiT(**TINY).to(device), SiT(**TINY).to(device)
    x, t, y = _inputs(dit)
    assert dit(x, t, y).shape == (2, 8, 8, 8)  # learn_sigma: 2C channels
    assert sit(x, t, y).shape == (2, 4, 8, 8)  # SiT drops the sigma channels
    assert DiT(**TINY, learn_sigma=False).to(device)(x, t, y).shape == (2, 4, 8, 8)
    assert dit.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), 4.0).shape == (4, 8, 8, 8)


def test_lightningdit_forward_shapes(device):
    for flags in (dict(), dict(use_qknorm=True), dict(wo_shift=True), dict(use_swiglu=False, use_rope=False,
                                                                           use_rmsnorm=False)):
        m = LightningDiT(**TINY, in_channels=4, **flags).to(device)
        x, t, y = _inputs(m)
        assert m(x, t, y).shape == (2, 4, 8, 8)


def test_state_dict_keys_match_official():
    dit = DiT(**{**TINY, "depth": 1})
    assert set(dit.state_dict()) == DIT_KEYS
    assert set(SiT(**{**TINY, "depth": 1}).state_dict()) == DIT_KEYS
    ld = LightningDiT(**{**TINY, "depth": 1})
    assert set(ld.state_dict()) == LIGHTNING_KEYS
    qk = LightningDiT(**{**TINY, "depth": 1}, use_qknorm=True)
    assert set(qk.state_dict()) == LIGHTNING_KEYS | {"blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.weight"}
    shapes = {k: tuple(v.shape) for k, v in ld.state_dict().items()}
    D, hidden = 32, int(2 / 3 * 4 * 32)
    assert shapes["blocks.0.mlp.w12.weight"] == (2 * hidden, D) and shapes["blocks.0.mlp.w3.weight"] == (D, hidden)
    assert shapes["feat_rope.freqs_cos"] == (16, 16) and shapes["blocks.0.adaLN_modulation.1.weight"] == (6 * D, D)
    assert shapes["y_embedder.embedding_table.weight"] == (11, D)  # + the CFG null class


def test_blocks_equal_timm_official_layers():
    """Our Attention / Mlp compute what timm's (used by the official DiT code) compute with the same weights."""
    from timm.models.vision_transformer import Attention, Mlp

    block = DiT(**TINY).blocks[0]
    attn = Attention(32, num_heads=2, qkv_bias=True)
    mlp = Mlp(in_features=32, hidden_features=128, act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
    attn.load_state_dict(block.attn.state_dict())
    mlp.load_state_dict(block.mlp.state_dict())
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(block.attn(x), attn(x))
    torch.testing.assert_close(block.mlp(x), mlp(x))


def test_initialization_and_pos_embed():
    m = DiT(**TINY)
    assert torch.equal(m.pos_embed[0], torch.from_numpy(get_2d_sincos_pos_embed(32, 4)).float())
    assert not m.pos_embed.requires_grad
    for block in m.blocks:  # adaLN-Zero: the blocks start as the identity
        assert block.adaLN_modulation[1].weight.abs().sum() == 0
    assert m.final_layer.linear.weight.abs().sum() == 0
    pe = get_2d_sincos_pos_embed(8, 3)  # as in the official code: first half <- column (meshgrid(w, h)[0])
    assert pe.shape == (9, 8) and pe[1, 0] != 0.0 and pe[1, 4] == 0.0 and pe[3, 0] == 0.0 and pe[3, 4] != 0.0


def test_label_dropout():
    m = DiT(**TINY, class_dropout_prob=1.0)
    y = torch.tensor([1, 2, 3])
    table = m.y_embedder.embedding_table.weight
    assert torch.equal(m.y_embedder(y, train=True), table[[10, 10, 10]])
    assert torch.equal(m.y_embedder(y, train=False), table[[1, 2, 3]])
    assert torch.equal(m.y_embedder(y, train=False, force_drop_ids=torch.tensor([1, 0, 1])), table[[10, 2, 10]])


@pytest.mark.parametrize("name,millions", [("DiT-XL/2", 675.1), ("SiT-XL/2", 675.1), ("DiT-L/2", 458.1),
                                           ("DiT-B/2", 130.5), ("DiT-S/2", 33.0)])
def test_dit_parameter_counts(name, millions):
    """Published (DiT paper Table 4 / SiT Table 1): XL/2 675M, L/2 458M, B/2 130M, S/2 33M."""
    with torch.device("meta"):
        m = (DiT_models if name.startswith("DiT") else SiT_models)[name]()
    n = sum(p.numel() for p in m.parameters())
    assert round(n / 1e6, 1) == millions
    if name == "DiT-XL/2":
        assert n == 675_129_632  # the count printed by the official train.py


def test_lightningdit_parameter_count():
    """LightningDiT-XL/1 (released flags, 32 latent channels): 675M in the LightningDiT paper."""
    with torch.device("meta"):
        xl = LightningDiT_models["LightningDiT-XL/1"]()
        b = LightningDiT_models["LightningDiT-B/1"]()
    n = sum(p.numel() for p in xl.parameters())
    assert n == 675_256_736 and round(n / 1e6) == 675
    assert round(sum(p.numel() for p in b.parameters()) / 1e6) == 131
    assert xl.feat_rope.freqs_cos.shape == (256, 72) and len(xl.blocks) == 28
    assert {"LightningDiT-B/1", "LightningDiT-B/2", "LightningDiT-L/1", "LightningDiT-L/2", "LightningDiT-XL/1",
            "LightningDiT-XL/2"} <= set(LightningDiT_models)
    assert {"DiT-XL/2", "DiT-L/2", "DiT-B/2", "DiT-S/8"} <= set(DiT_models) and "SiT-XL/2" in SiT_models
