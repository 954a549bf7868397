"""vefast.nn.VFLoss / ReaLSAlignHead / REPAProjector: state dicts, forward against the references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_vf_loss import vavae_vf_loss
from torch import nn

import vefast
from vefast.nn import REPAProjector, ReaLSAlignHead, VFLoss
from vefast.ops.align_loss import align_loss_reference


class VAVAEProjHolder(nn.Module):
    """The part of VA-VAE's AutoencoderKL that VFLoss replaces (use_vf='dinov2', reverse_proj=True)."""

    def __init__(self, embed_dim, vf_feature_dim):
        super().__init__()
        self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, 1)
        self.linear_proj = nn.Conv2d(embed_dim, vf_feature_dim, kernel_size=1, bias=False)


def test_vfloss_loads_vavae_state_dict_and_matches(device):
    torch.manual_seed(0)
    vavae = VAVAEProjHolder(8, 24)
    mod = VFLoss(8, 24, margin_cos=0.1, margin_dms=0.05)
    assert list(mod.state_dict()) == ["linear_proj.weight"]
    mod.load_state_dict({"linear_proj.weight": vavae.linear_proj.weight.detach().clone()})   # direct
    mod2 = VFLoss(8, 24, margin_cos=0.1, margin_dms=0.05)
    mod2.load_vavae_state_dict({"state_dict": vavae.state_dict()})                           # full checkpoint
    assert torch.equal(mod.linear_proj.weight, vavae.linear_proj.weight)
    assert torch.equal(mod2.linear_proj.weight, vavae.linear_proj.weight)
    mod, vavae = mod.to(device), vavae.to(device).double()
    z = torch.randn(2, 8, 3, 4, device=device)
    f = torch.randn(2, 24, 3, 4, device=device)
    out = mod(z, f)
    out.loss.backward()
    z64 = z.double()
    ref = vavae_vf_loss(z64, f.double(), vavae.linear_proj.weight, 0.1, 0.05)
    ref[0].backward()
    torch.testing.assert_close(out.loss.double(), ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mod.linear_proj.weight.grad.double(), vavae.linear_proj.weight.grad,
                               rtol=1e-4, atol=1e-7)


def test_vfloss_bad_checkpoints():
    mod = VFLoss(4, 16)
    with pytest.raises(KeyError, match="linear_proj.weight"):
        mod.load_vavae_state_dict({"encoder.conv_in.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="reverse_proj=False"):
        mod.load_vavae_state_dict({"linear_proj.weight": torch.zeros(4, 16, 1, 1), "linear_proj.bias": torch.zeros(4)})
    with pytest.raises(RuntimeError, match="size mismatch"):
        mod.load_state_dict({"linear_proj.weight": torch.zeros(16, 5, 1, 1)})
    with pytest.raises(ValueError, match="latent_dim must be a positive int"):
        VFLoss(0, 16)


def test_reals_head_matches_reference(device):
    torch.manual_seed(1)
    head = ReaLSAlignHead(6, 20, hidden_dim=12).to(device)
    assert head.patch_mlp[0].weight.shape == (12, 6) and isinstance(head.patch_mlp[1], nn.GELU)
    assert ReaLSAlignHead(6, 20).cls_mlp[0].out_features == 20              # hidden default D'
    z = torch.randn(2, 6, 3, 5, device=device, requires_grad=True)
    pf = torch.randn(2, 20, 3, 5, device=device)
    cf = torch.randn(2, 20, device=device)
    out, (patch, cls) = head(z, pf, cf, return_features=True)
    assert patch.shape == (2, 20, 3, 5) and cls.shape == (2, 20)
    gz, = torch.autograd.grad(out.loss, z)
    # reference: the two MLPs written out per token, in float64
    z64 = z.detach().double().requires_grad_()
    hd = {k: v.double() for k, v in head.state_dict().items()}

    def mlp(x, pre):
        return F.linear(F.gelu(F.linear(x, hd[pre + "0.weight"], hd[pre + "0.bias"])), hd[pre + "2.weight"],
                        hd[pre + "2.bias"])

    tokens = mlp(z64.permute(0, 2, 3, 1), "patch_mlp.")                    # (B, h, w, D')
    lp = align_loss_reference(tokens, pf.double().permute(0, 2, 3, 1))
    lc = align_loss_reference(mlp(z64.mean((2, 3)), "cls_mlp."), cf.double())
    ref = lp.loss + lc.loss
    rg, = torch.autograd.grad(ref, z64)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.cos_loss.double(), lp.cos_loss + lc.cos_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gz.double(), rg, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(patch.double(), tokens.permute(0, 3, 1, 2), rtol=1e-5, atol=1e-6)
    p2, c2 = head.project(z)
    assert torch.equal(p2, patch) and torch.equal(c2, cls)


def test_reals_head_bad_inputs():
    head = ReaLSAlignHead(4, 8)
    z = torch.randn(1, 4, 2, 2)
    with pytest.raises(ValueError, match="patch_features must be"):
        head(z, torch.randn(1, 8, 3, 2), torch.randn(1, 8))
    with pytest.raises(ValueError, match="cls_feature must be"):
        head(z, torch.randn(1, 8, 2, 2), torch.randn(1, 9))
    with pytest.raises(ValueError, match="z must be a"):
        head.project(torch.randn(4, 2, 2))
    with pytest.raises(ValueError, match="hidden_dim must be a positive int"):
        ReaLSAlignHead(4, 8, hidden_dim=-1)


def build_mlp(hidden_size, projector_dim, z_dim):
    """REPA's models/sit.py build_mlp."""
    return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                         nn.SiLU(), nn.Linear(projector_dim, z_dim))


def test_repa_projector_state_dict_and_loss(device):
    torch.manual_seed(2)
    repa = build_mlp(16, 32, 12)
    proj = REPAProjector(16, 12, proj_dim=32)
    proj.load_state_dict(repa.state_dict())                               # same keys and shapes
    assert list(proj.state_dict()) == list(repa.state_dict())
    assert REPAProjector(16, 12)[0].out_features == 2048
    proj, repa = proj.to(device), repa.to(device)
    h = torch.randn(2, 10, 16, device=device)
    target = torch.randn(2, 10, 12, device=device)
    loss = proj.loss(h, target)
    z_tilde = repa(h)
    # REPA train.py: mean over tokens of -(normalize(z) * normalize(z_tilde)).sum(-1), then over batch
    ref = torch.stack([-(F.normalize(target[i], dim=-1) * F.normalize(z_tilde[i], dim=-1)).sum(-1).mean()
                       for i in range(2)]).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(proj(h), z_tilde)
    with pytest.raises(ValueError, match="proj_dim must be a positive int"):
        REPAProjector(16, 12, proj_dim=0)


def test_modules_are_exported():
    assert vefast.nn.VFLoss is VFLoss and vefast.VFOutput is not None and vefast.AlignOutput is not None
