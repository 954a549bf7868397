"""DiT (Peebles & Xie 2023) and SiT (Ma et al. 2024) reference models (docs/math.md §7).

The architecture of facebookresearch/DiT ``models.py`` and willisma/SiT ``models.py``: patch
embedding + fixed 2D sin-cos positional embedding, timestep and label embedders (label dropout for
classifier-free guidance), ``depth`` adaLN-Zero blocks (non-affine LayerNorm eps 1e-6, timm-style
attention with a fused qkv Linear, GELU-tanh MLP), and the adaLN final layer. Module and parameter
names are those of the official code, so the official checkpoints load with ``load_state_dict``.

SiT is the same network; it differs only in its forward, which drops the sigma channels when
``learn_sigma`` is set. ``vefast.nn.patch_dit`` swaps the blocks for fused ones.

Official call sites kept working: ``use_checkpoint=True`` (LightningDiT's constructor argument,
accepted by DiT and SiT too) recomputes every block in the backward (activation checkpointing per
block); ``forward_with_cfg(x, t, y, cfg_scale, cfg_interval=True, cfg_interval_start=s)`` returns
the conditional output where ``t < s`` (LightningDiT's guidance interval).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` with (B, D) shift/scale broadcast over tokens (DiT's modulate)."""
    out = x * (1 + scale.unsqueeze(1))
    return out + shift.unsqueeze(1) if shift is not None else out


# --------------------------------------------------------------------------------------------
# layers (timm-style; same attribute names as timm's PatchEmbed / Attention / Mlp)
# --------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> tokens (B, (H/p)(W/p), D) with a stride-p convolution (timm's PatchEmbed)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv Linear (timm's ``Attention`` with ``qkv_bias``)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (timm's ``Mlp`` with ``act_layer=GELU(approximate="tanh")``, drop 0)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> sinusoidal features (GLIDE) -> MLP -> (B, D)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        """(B,) timesteps (may be fractional) -> (B, dim) ``[cos(t f), sin(t f)]``, f = max_period^(-i/half)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class labels -> (B, D); with probability ``dropout_prob`` in training a label becomes the
    extra "null" class ``num_classes`` (classifier-free guidance)."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """adaLN-Zero block: ``x += g1 * attn(modulate(norm1(x)))``; ``x += g2 * mlp(modulate(norm2(x)))``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


SiTBlock = DiTBlock


class FinalLayer(nn.Module):
    """``linear(modulate(norm_final(x), shift, scale))`` with adaLN shift/scale from c."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, norm_layer: nn.Module | None = None):
        super().__init__()
        self.norm_final = norm_layer if norm_layer is not None else nn.LayerNorm(hidden_size, elementwise_affine=False,
                                                                                 eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
class DiT(nn.Module):
    """Diffusion transformer (facebookresearch/DiT): (B, C, H, W), (B,) t, (B,) y -> (B, C_out, H, W).

    ``use_checkpoint``: recompute each block's activations in the backward instead of keeping them
    (``torch.utils.checkpoint`` per block, as LightningDiT's ``use_checkpoint``); an attribute, so it
    can be switched on after construction too.
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True, use_checkpoint: bool = False):
        super().__init__()
        self.use_checkpoint = _check_flag("use_checkpoint", use_checkpoint)
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official initialization: xavier Linears, sin-cos pos_embed, zero adaLN and output layers."""
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)
        if self.pos_embed.device.type != "meta":
            grid = int(self.x_embedder.num_patches ** 0.5)
            pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)
            self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, H, W)."""
        c = self.out_channels
        p = self.x_embedder.patch_size[0]
        h = w = int(x.shape[1] ** 0.5)
        if h * w != x.shape[1]:
            raise ValueError(f"unpatchify needs a square number of tokens, got {x.shape[1]}")
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, T, D) with positional embedding, and the conditioning c = t_emb + y_emb (B, D)."""
        tokens = self.x_embedder(x) + self.pos_embed
        return tokens, self.t_embedder(t) + self.y_embedder(y, self.training)

    def run_blocks(self, x: torch.Tensor, c: torch.Tensor, *extra: object) -> torch.Tensor:
        """``x = block(x, c, *extra)`` for every block, checkpointed per block when ``use_checkpoint``
        is set and gradients are recorded (non-reentrant ``torch.utils.checkpoint``: same values and
        gradients, works with ``torch.compile``)."""
        recompute = self.use_checkpoint and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, c, *extra, use_reentrant=False) if recompute else block(x, c, *extra)
        return x

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, c = self.embed(x, t, y)
        x = self.run_blocks(x, c)
        return self.unpatchify(self.final_layer(x, c))

    # channels the guidance applies to: DiT and SiT guide the first 3 (their official code, "for exact
    # reproducibility"), LightningDiT all of its input channels
    def _cfg_channels(self) -> int:
        return 3

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         cfg_interval: bool | None = None, cfg_interval_start: float | None = None) -> torch.Tensor:
        """Batched conditional / unconditional forward (first half of ``x`` conditional, ``y`` holding the
        labels then the null labels) with ``uncond + cfg_scale * (cond - uncond)`` on the guided channels.

        ``cfg_interval=True`` (LightningDiT's guidance interval): where ``t[0] < cfg_interval_start`` the
        conditional output is returned unguided (decided on the device, no host sync).
        """
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)
        n = self._cfg_channels()
        eps, rest = model_out[:, :n], model_out[:, n:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        if cfg_interval is True:
            if cfg_interval_start is None:
                raise ValueError("forward_with_cfg: cfg_interval=True needs cfg_interval_start")
            half_eps = torch.where(t[0] < cfg_interval_start, cond_eps, half_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


class SiT(DiT):
    """Scalable interpolant transformer (willisma/SiT): DiT's network; the forward drops the sigma
    channels when ``learn_sigma`` is set."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = super().forward(x, t, y)
        return out.chunk(2, dim=1)[0] if self.learn_sigma else out


# --------------------------------------------------------------------------------------------
# 2D sin-cos positional embedding (MAE's util/pos_embed.py, as in DiT)
# --------------------------------------------------------------------------------------------
def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False,
                            extra_tokens: int = 0) -> np.ndarray:
    """(grid_size**2, embed_dim) for tokens in row-major order; as in the official code the first half
    of the features encodes the column index (``meshgrid(w, h)[0]``), the second half the row index."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])  # w goes first
    pos = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token and extra_tokens > 0:
        pos = np.concatenate([np.zeros([extra_tokens, embed_dim]), pos], axis=0)
    return pos


def get_2d_sincos_pos_embed_from_grid(embed_dim: int, grid: np.ndarray) -> np.ndarray:
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim) ``[sin(pos w), cos(pos w)]``, w = 10000^(-2i/embed_dim)."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


# --------------------------------------------------------------------------------------------
# configs (the official names)
# --------------------------------------------------------------------------------------------
_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}


def _config(cls: type, depth: int, hidden_size: int, num_heads: int, patch_size: int):
    def build(**kwargs) -> DiT:
        return cls(depth=depth, hidden_size=hidden_size, patch_size=patch_size, num_heads=num_heads, **kwargs)
    build.__name__ = f"{cls.__name__}_{depth}x{hidden_size}_p{patch_size}"
    return build


DiT_models = {f"DiT-{size}/{p}": _config(DiT, *_SIZES[size], p) for size in _SIZES for p in (2, 4, 8)}
SiT_models = {f"SiT-{size}/{p}": _config(SiT, *_SIZES[size], p) for size in _SIZES for p in (2, 4, 8)}
