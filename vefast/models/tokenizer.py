"""LDM / VA-VAE-style convolutional autoencoder and the NLayer PatchGAN discriminator.

Architecture follows LDM's ``Encoder`` / ``Decoder`` (ldm/modules/diffusionmodules/model.py), which
VA-VAE reuses: ResNet blocks (GroupNorm, SiLU, 3x3 conv), stride-2 downsampling with LDM's
asymmetric (0, 1, 0, 1) padding, nearest upsampling + conv, one single-head attention block in the
middle. The downsampling factor is ``2 ** (len(channel_mult) - 1)``: VA-VAE's f16d32 is
``channel_mult=(1, 1, 2, 2, 4)``, ``latent_channels=32``; LDM's f8 is ``(1, 2, 4, 4)``.

The encoder emits ``moments`` (B, 2C, h, w) — mean then logvar, the convention of
:class:`vefast.nn.DiagonalGaussianDistribution` (docs/math.md §1) — after LDM's 1x1 ``quant_conv``; the
decoder takes z (B, C, h, w) through ``post_quant_conv``. State-dict keys follow LDM
(``encoder.down.0.block.0.norm1.weight``, ``quant_conv.weight``, ...), so LDM / VA-VAE autoencoder
weights load with ``load_state_dict`` (:func:`ldm_config_from_state_dict` reads the architecture off them).

``use_checkpoint`` (the name the DiT models use): every ResNet block and the middle block recompute
their activations in the backward (non-reentrant ``torch.utils.checkpoint``) instead of keeping them.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    if channels % groups:
        raise ValueError(f"tokenizer: channels {channels} not divisible by norm_groups {groups}")
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """LDM's single-head spatial self-attention (1x1 q/k/v/proj convs), through SDPA."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(o)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _run(block: nn.Module, h: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """``block(h)``, recomputed in the backward when ``use_checkpoint`` and gradients are recorded."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(block, h, use_reentrant=False)
    return block(h)


class _Level(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    def __init__(self, channels: int, groups: int, dropout: float, attn: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, dropout)
        self.attn_1 = AttnBlock(channels, groups) if attn else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, groups, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, *, in_channels: int, base_channels: int, channel_mult: tuple[int, ...], num_res_blocks: int,
                 out_channels: int, groups: int, dropout: float, mid_attn: bool):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        ch = base_channels
        for i, mult in enumerate(channel_mult):
            level = _Level()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(ch, base_channels * mult, groups, dropout))
                ch = base_channels * mult
            if i != len(channel_mult) - 1:
                level.downsample = Downsample(ch)
            self.down.append(level)
        self.mid = _Mid(ch, groups, dropout, mid_attn)
        self.norm_out = _norm(ch, groups)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        self.use_checkpoint = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = _run(block, h, self.use_checkpoint)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = _run(self.mid, h, self.use_checkpoint)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, *, out_channels: int, base_channels: int, channel_mult: tuple[int, ...], num_res_blocks: int,
                 latent_channels: int, groups: int, dropout: float, mid_attn: bool):
        super().__init__()
        ch = base_channels * channel_mult[-1]
        self.conv_in = nn.Conv2d(latent_channels, ch, 3, padding=1)
        self.mid = _Mid(ch, groups, dropout, mid_attn)
        up = []
        for i in reversed(range(len(channel_mult))):
            level = _Level()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(ch, base_channels * channel_mult[i], groups, dropout))
                ch = base_channels * channel_mult[i]
            if i != 0:
                level.upsample = Upsample(ch)
            up.insert(0, level)  # LDM's key order: up.0 is the finest level
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(ch, groups)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        self.use_checkpoint = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run(self.mid, self.conv_in(z), self.use_checkpoint)
        for level in reversed(self.up):
            for block in level.block:
                h = _run(block, h, self.use_checkpoint)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """Conv autoencoder with a diagonal-Gaussian posterior (LDM's AutoencoderKL layout).

    ``encode(x)`` -> moments (B, 2C, h, w); ``decode(z)`` -> images (B, 3, H, W) in [-1, 1] (unclamped);
    ``posterior(x)`` -> :class:`vefast.nn.DiagonalGaussianDistribution`.
    """

    def __init__(self, *, in_channels: int = 3, base_channels: int = 128, channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, latent_channels: int = 32, norm_groups: int = 32, dropout: float = 0.0,
                 mid_attn: bool = True, use_checkpoint: bool = False):
        super().__init__()
        if not isinstance(use_checkpoint, bool):
            raise TypeError(f"use_checkpoint must be a bool, got {type(use_checkpoint).__name__}")
        if len(channel_mult) < 1:
            raise ValueError("tokenizer: channel_mult must have at least one entry")
        self.latent_channels = latent_channels
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        common = dict(base_channels=base_channels, channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks,
                      groups=norm_groups, dropout=dropout, mid_attn=mid_attn)
        self.encoder = Encoder(in_channels=in_channels, out_channels=2 * latent_channels, **common)
        self.decoder = Decoder(out_channels=in_channels, latent_channels=latent_channels, **common)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.use_checkpoint = use_checkpoint

    @property
    def use_checkpoint(self) -> bool:
        return self.encoder.use_checkpoint

    @use_checkpoint.setter
    def use_checkpoint(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"use_checkpoint must be a bool, got {type(value).__name__}")
        self.encoder.use_checkpoint = self.decoder.use_checkpoint = value

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def posterior(self, x: torch.Tensor):
        from ..nn import DiagonalGaussianDistribution

        return DiagonalGaussianDistribution(self.encode(x))

    def encoder_last_layer(self) -> torch.Tensor:
        """The weight the VF adaptive weight differentiates against (VA-VAE: the encoder's ``conv_out``)."""
        return self.encoder.conv_out.weight

    def decoder_last_layer(self) -> torch.Tensor:
        """The weight the GAN adaptive weight differentiates against (LDM: the decoder's ``conv_out``)."""
        return self.decoder.conv_out.weight


def ldm_config_from_state_dict(sd: dict[str, torch.Tensor]) -> dict:
    """The :class:`AutoencoderKL` arguments of an LDM / VA-VAE autoencoder state dict (keys ``encoder.*``,
    ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``). GroupNorm's group count cannot be read off
    the weights: LDM's 32 is assumed. Raises ``ValueError`` naming what does not fit."""
    need = ("encoder.conv_in.weight", "post_quant_conv.weight", "quant_conv.weight", "decoder.conv_in.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"not an LDM autoencoder state dict: no {', '.join(missing)}")
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if not levels:
        raise ValueError("not an LDM autoencoder state dict: no encoder.down.* keys")
    if any(k.startswith(f"encoder.down.{i}.attn.") for i in levels for k in sd):
        raise ValueError("the autoencoder has attention inside its resolution levels (LDM attn_resolutions); "
                         "vefast's AutoencoderKL has attention in the middle block only")
    base = sd["encoder.conv_in.weight"].shape[0]
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    mult = [sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // base for i in levels]
    return dict(in_channels=sd["encoder.conv_in.weight"].shape[1], base_channels=base, channel_mult=tuple(mult),
                num_res_blocks=len(blocks), latent_channels=sd["post_quant_conv.weight"].shape[0], norm_groups=32,
                mid_attn="encoder.mid.attn_1.q.weight" in sd)


class NLayerDiscriminator(nn.Module):
    """pix2pix / LDM PatchGAN: 4x4 convs, stride 2 for the first ``n_layers``, LeakyReLU(0.2),
    normalization after all but the first conv, a 1-channel patch logit map. Weights N(0, 0.02)
    (convs) and N(1, 0.02) (norm scales) as in taming's ``weights_init``."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"discriminator norm: expected 'batch' or 'group', got {norm!r}")

        def norm_layer(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(min(32, c // 2), c)

        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                       norm_layer(channels * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)
