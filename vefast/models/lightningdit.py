"""LightningDiT (Yao et al. 2025, "Reconstruction vs. Generation", hustvl/LightningDiT) reference model.

DiT's network (docs/math.md §7) with the LightningDiT options: RMSNorm instead of LayerNorm (with a
weight, eps 1e-6), optional per-head q/k RMSNorm, 2D EVA-style rotary embedding of q and k,
SwiGLU FFN (hidden ``int(2/3 * 4 D)``, fused ``w12``), optional shift-free adaLN (``wo_shift``).
Module, parameter and buffer names are those of hustvl/LightningDiT ``models/lightningdit.py``
(``feat_rope.freqs_cos`` / ``freqs_sin`` included), so its checkpoints load with ``load_state_dict``.

Choice: the flags default to the released LightningDiT-XL/1 checkpoint's configuration
(``use_qknorm=False, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False``, 32 latent
channels, no learned sigma); the official constructor defaults them all to False. The rotary tables
come from :func:`vefast.ops.rope.rope_2d_freqs`. ``vefast.nn.patch_lightningdit`` swaps the blocks
for fused ones.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dit import DiT, FinalLayer, LabelEmbedder, Mlp, PatchEmbed, TimestepEmbedder, _check_flag, modulate


class RMSNorm(nn.Module):
    """``(x / sqrt(mean(x^2) + eps)).type_as(x) * weight`` with fp32 statistics (LightningDiT's RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x.float()).type_as(x) * self.weight


class SwiGLUFFN(nn.Module):
    """``w3(silu(x1) * x2)`` with ``x1, x2 = w12(x).chunk(2, -1)`` (LightningDiT's SwiGLUFFN)."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 bias: bool = True):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class VisionRotaryEmbeddingFast(nn.Module):
    """2D EVA rotary embedding over a ``pt_seq_len`` x ``pt_seq_len`` token grid; ``dim`` is half the
    head dimension (LightningDiT's constructor convention). ``forward(t)`` rotates t (..., N, 2 dim)."""

    def __init__(self, dim: int, pt_seq_len: int = 16, theta: float = 10000.0):
        super().__init__()
        from vefast.ops.rope import rope_2d_freqs

        cos, sin = rope_2d_freqs(2 * dim, pt_seq_len, theta=theta)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        from vefast.ops.rope import apply_rope

        return apply_rope(t, self.freqs_cos, self.freqs_sin)


class Attention(nn.Module):
    """Fused-qkv attention with optional q/k norm and rotary embedding (LightningDiT's Attention)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, use_rmsnorm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = True
        norm_layer = RMSNorm if use_rmsnorm else nn.LayerNorm
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, rope: nn.Module | None = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class LightningDiTBlock(nn.Module):
    """adaLN-Zero block with the LightningDiT options (RoPE, qk-norm, RMSNorm, SwiGLU, no-shift adaLN)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, use_qknorm: bool = False,
                 use_swiglu: bool = False, use_rmsnorm: bool = False, wo_shift: bool = False):
        super().__init__()
        if use_rmsnorm:
            self.norm1, self.norm2 = RMSNorm(hidden_size), RMSNorm(hidden_size)
        else:
            self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=use_qknorm,
                              use_rmsnorm=use_rmsnorm)
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.mlp = SwiGLUFFN(hidden_size, int(2 / 3 * mlp_hidden_dim)) if use_swiglu else Mlp(hidden_size,
                                                                                             mlp_hidden_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (4 if wo_shift else 6) * hidden_size,
                                                                   bias=True))
        self.wo_shift = wo_shift

    def forward(self, x: torch.Tensor, c: torch.Tensor, feat_rope: nn.Module | None = None) -> torch.Tensor:
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=feat_rope)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class LightningDiT(DiT):
    """LightningDiT: (B, C, H, W) latents, (B,) t, (B,) y -> (B, C, H, W) velocity."""

    def __init__(self, input_size: int = 16, patch_size: int = 1, in_channels: int = 32, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = False, use_qknorm: bool = False,
                 use_swiglu: bool = True, use_rope: bool = True, use_rmsnorm: bool = True, wo_shift: bool = False,
                 use_checkpoint: bool = False):
        nn.Module.__init__(self)
        self.use_checkpoint = _check_flag("use_checkpoint", use_checkpoint)
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.use_rope = use_rope
        self.use_rmsnorm = use_rmsnorm
        self.depth = depth
        self.hidden_size = hidden_size
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.feat_rope = (VisionRotaryEmbeddingFast(dim=hidden_size // num_heads // 2, pt_seq_len=input_size // patch_size)
                          if use_rope else None)
        self.blocks = nn.ModuleList([
            LightningDiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, use_qknorm=use_qknorm, use_swiglu=use_swiglu,
                              use_rmsnorm=use_rmsnorm, wo_shift=wo_shift) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels,
                                      norm_layer=RMSNorm(hidden_size) if use_rmsnorm else None)
        self.initialize_weights()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, c = self.embed(x, t, y)
        x = self.run_blocks(x, c, self.feat_rope)
        out = self.unpatchify(self.final_layer(x, c))
        return out.chunk(2, dim=1)[0] if self.learn_sigma else out

    def _cfg_channels(self) -> int:
        return self.in_channels  # LightningDiT guides every latent channel


_SIZES = {"B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16), "1p0B": (24, 1536, 24),
          "1p6B": (28, 1792, 28)}


def _config(depth: int, hidden_size: int, num_heads: int, patch_size: int):
    def build(**kwargs) -> LightningDiT:
        return LightningDiT(depth=depth, hidden_size=hidden_size, patch_size=patch_size, num_heads=num_heads, **kwargs)
    build.__name__ = f"LightningDiT_{depth}x{hidden_size}_p{patch_size}"
    return build


LightningDiT_models = {f"LightningDiT-{size}/{p}": _config(*_SIZES[size], p) for size in _SIZES for p in (1, 2)}
