"""Fused drop-in modules for DiT / SiT / LightningDiT blocks (docs/math.md §7), used by :mod:`vefast.nn.patch`.

Each fused module is built from the module it replaces and keeps that module's children under the
same attribute names (``qkv``, ``proj``, ``q_norm``, ``norm1``, ``adaLN_modulation``, ``w12``, ...), so
the Parameter objects are shared and ``state_dict`` keys are unchanged. Only ``forward`` differs:

- :class:`FusedAttention`: qkv Linear -> (B, N, 3, H, hd) view -> ``vefast.ops.attention`` (no
  permutes; q/k RMSNorm or LayerNorm and 2D RoPE fused around SDPA by ``qk_norm_rope_attention`` when
  present) -> proj. ``backend`` ("auto" | "sdpa" | "cuda") is passed to the attention ops.
- :class:`FusedSwiGLUFFN`: ``w3(swiglu(w12(x)))``.
- :class:`FusedDiTBlock`: ``norm_modulate`` for norm1 + modulate, the attention residual fused with
  norm2 + modulate (``gated_residual_norm_modulate``), then the MLP gated residual (``gated_residual``).
- :class:`FusedFinalLayer`: ``linear(norm_modulate(x, shift, scale))``.

The ``describe_*`` helpers read a module's structure and return what the fused module needs, or a
reason string when the module is not of a supported form.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn as nn

from vefast.ops.gated_residual import gated_residual, gated_residual_norm_modulate
from vefast.ops.norm_modulate import norm_modulate
from vefast.ops.swiglu import swiglu


def _attention_ops():
    """The attention op module (vefast.ops.attention), imported at call time."""
    return importlib.import_module("vefast.ops.attention")


# --------------------------------------------------------------------------------------------
# structure checks
# --------------------------------------------------------------------------------------------
def describe_norm(norm: nn.Module, dim: int, *, allow_rms: bool = True) -> tuple[str, float] | str:
    """("layernorm" | "rmsnorm", eps) for a norm over the last axis of size ``dim`` that
    :func:`vefast.norm_modulate` computes (LayerNorm without bias; RMSNorm with optional weight),
    else the reason it is not supported."""
    if isinstance(norm, nn.LayerNorm):
        if tuple(norm.normalized_shape) != (dim,):
            return f"LayerNorm over {tuple(norm.normalized_shape)}, expected ({dim},)"
        if norm.bias is not None:
            return "LayerNorm with a bias (DiT norms are non-affine)"
        return "layernorm", float(norm.eps)
    rms_like = isinstance(norm, nn.RMSNorm) or type(norm).__name__.endswith("RMSNorm")
    if rms_like and allow_rms:
        weight = getattr(norm, "weight", None)
        eps = getattr(norm, "eps", None)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            return f"{type(norm).__name__} without a numeric eps"
        if weight is not None and (not isinstance(weight, nn.Parameter) or tuple(weight.shape) != (dim,)):
            return f"{type(norm).__name__} weight is not a ({dim},) Parameter"
        if getattr(norm, "bias", None) is not None:
            return f"{type(norm).__name__} with a bias"
        if isinstance(norm, nn.RMSNorm) and tuple(norm.normalized_shape) != (dim,):
            return f"RMSNorm over {tuple(norm.normalized_shape)}, expected ({dim},)"
        return "rmsnorm", float(eps)
    return f"unsupported norm {type(norm).__name__}"


def _norm_call(norm: nn.Module, spec: tuple[str, float]) -> dict:
    """Keyword arguments of norm_modulate for ``norm`` (described by ``spec``); the weight is read at call time."""
    return {"norm": spec[0], "weight": getattr(norm, "weight", None), "eps": spec[1]}


def describe_qk_norm(norm: nn.Module, head_dim: int) -> tuple[str, float] | str:
    """(kind, eps) of a q/k norm that ``qk_norm_rope_attention`` computes -- ("none", 0) for Identity,
    ("rms", eps) for an RMSNorm (optional weight, no bias), ("layer", eps) for ``nn.LayerNorm(head_dim)``
    (timm's qk_norm; optional weight and bias) -- else the reason it is not supported."""
    if isinstance(norm, nn.Identity):
        return "none", 0.0
    if isinstance(norm, nn.LayerNorm):
        if tuple(norm.normalized_shape) != (head_dim,):
            return f"LayerNorm over {tuple(norm.normalized_shape)}, expected ({head_dim},)"
        return "layer", float(norm.eps)
    spec = describe_norm(norm, head_dim)
    return spec if isinstance(spec, str) else ("rms", spec[1])


def _qk_params(norm: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return getattr(norm, "weight", None), getattr(norm, "bias", None)


def describe_attention(attn: nn.Module, *, allow_qk_norm: bool) -> str | None:
    """None when ``attn`` is a fused-qkv attention that :class:`FusedAttention` reproduces, else the reason."""
    qkv, proj = getattr(attn, "qkv", None), getattr(attn, "proj", None)
    heads = getattr(attn, "num_heads", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear) or not isinstance(heads, int):
        return "attention without qkv / proj Linears and an int num_heads"
    head_dim = getattr(attn, "head_dim", qkv.out_features // 3 // max(heads, 1))
    if qkv.out_features != 3 * heads * head_dim or proj.in_features != heads * head_dim:
        return "qkv / proj shapes do not match num_heads * head_dim"
    drop = getattr(attn, "attn_drop", None)
    if drop is not None and not (isinstance(drop, nn.Dropout) and drop.p == 0):
        return "attention dropout > 0"
    if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
        return "attention output norm (scale_norm)"
    if getattr(attn, "gate", None) is not None:
        return "gated attention"
    for name in ("q_norm", "k_norm"):
        m = getattr(attn, name, nn.Identity())
        if isinstance(m, nn.Identity):
            continue
        if not allow_qk_norm:
            return f"{name} (use patch_lightningdit for qk-norm)"
        if isinstance(describe_qk_norm(m, head_dim), str):
            return f"unsupported {name} {type(m).__name__}"
    return None


def describe_block(block: nn.Module, *, lightning: bool) -> str | None:
    """None when ``block`` is a DiT / SiT (or, with ``lightning``, LightningDiT) adaLN-Zero block, else the reason."""
    ada = getattr(block, "adaLN_modulation", None)
    if not (isinstance(ada, nn.Sequential) and len(ada) == 2 and isinstance(ada[0], nn.SiLU)
            and isinstance(ada[1], nn.Linear)):
        return "no adaLN_modulation = Sequential(SiLU, Linear)"
    D = ada[1].in_features
    if ada[1].out_features not in ((4 * D, 6 * D) if lightning else (6 * D,)):
        return f"adaLN_modulation gives {ada[1].out_features} features, expected 6 * {D}"
    for name in ("norm1", "norm2", "attn", "mlp"):
        if not isinstance(getattr(block, name, None), nn.Module):
            return f"no {name} module"
    for name in ("norm1", "norm2"):
        spec = describe_norm(getattr(block, name), D, allow_rms=lightning)
        if isinstance(spec, str):
            return f"{name}: {spec}"
    return describe_attention(block.attn, allow_qk_norm=True)  # every supported q/k norm fuses


def describe_final_layer(layer: nn.Module, *, lightning: bool) -> str | None:
    ada = getattr(layer, "adaLN_modulation", None)
    if not (isinstance(ada, nn.Sequential) and len(ada) == 2 and isinstance(ada[0], nn.SiLU)
            and isinstance(ada[1], nn.Linear) and ada[1].out_features == 2 * ada[1].in_features):
        return "no adaLN_modulation = Sequential(SiLU, Linear(D, 2D))"
    if not isinstance(getattr(layer, "linear", None), nn.Linear):
        return "no linear"
    norm = getattr(layer, "norm_final", None)
    if not isinstance(norm, nn.Module):
        return "no norm_final"
    spec = describe_norm(norm, ada[1].in_features, allow_rms=lightning)
    return spec if isinstance(spec, str) else None


def is_swiglu_ffn(mlp: nn.Module) -> bool:
    """An FFN ``w3(silu(x1) * x2)``, ``x1, x2 = w12(x).chunk(2, -1)`` (LightningDiT's SwiGLUFFN, by structure)."""
    w12, w3 = getattr(mlp, "w12", None), getattr(mlp, "w3", None)
    return (isinstance(w12, nn.Linear) and isinstance(w3, nn.Linear) and w12.out_features == 2 * w3.in_features
            and type(mlp).__name__.startswith("SwiGLUFFN") and set(dict(mlp.named_children())) == {"w12", "w3"})


# --------------------------------------------------------------------------------------------
# fused modules
# --------------------------------------------------------------------------------------------
def _adopt(new: nn.Module, old: nn.Module, **replace: nn.Module) -> None:
    """Register ``old``'s children on ``new`` under the same names and in the same order (so the
    Parameter objects and the ``state_dict`` keys and order are those of ``old``), some replaced."""
    for name, child in old.named_children():
        new.add_module(name, replace.get(name, child))


def _rope_tables(rope: object) -> tuple[torch.Tensor, torch.Tensor] | None:
    cos, sin = getattr(rope, "freqs_cos", None), getattr(rope, "freqs_sin", None)
    if isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor) and cos.dim() == 2 and cos.shape == sin.shape:
        return cos, sin
    return None


class FusedAttention(nn.Module):
    """Attention over the (B, N, 3, H, hd) qkv view with ``vefast.ops.attention`` (children shared with ``attn``).

    q/k norms of one kind (both Identity, both RMSNorm-like or both LayerNorm, one eps, the same affine
    parameters present) and RoPE modules with ``freqs_cos`` / ``freqs_sin`` tables run fused in
    ``qk_norm_rope_attention``; anything else runs the modules eagerly around ``vefast.attention``.
    """

    def __init__(self, attn: nn.Module, backend: str = "auto"):
        super().__init__()
        _adopt(self, attn)
        for name in ("q_norm", "k_norm", "proj_drop"):
            if not hasattr(self, name):
                setattr(self, name, nn.Identity())
        self.num_heads = attn.num_heads
        self.head_dim = getattr(attn, "head_dim", attn.qkv.out_features // 3 // attn.num_heads)
        self.scale = float(getattr(attn, "scale", self.head_dim ** -0.5))
        self.fused_attn = True
        self.backend = backend
        specs = [describe_qk_norm(m, self.head_dim) for m in (self.q_norm, self.k_norm)]
        present = [tuple(p is not None for p in _qk_params(m)) for m in (self.q_norm, self.k_norm)]
        fusable = isinstance(specs[0], tuple) and specs[0] == specs[1] and present[0] == present[1]
        self._qk = specs[0] if fusable else None  # (kind, eps) of the fused q/k norm, None: eager modules

    def forward(self, x: torch.Tensor, rope: nn.Module | None = None) -> torch.Tensor:
        B, N, C = x.shape
        ops = _attention_ops()
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        tables = _rope_tables(rope) if rope is not None else None
        if self._qk is not None and (rope is None or tables is not None):
            (qw, qb), (kw, kb) = _qk_params(self.q_norm), _qk_params(self.k_norm)
            out = ops.qk_norm_rope_attention(qkv, qw, kw, tables, norm=self._qk[0], q_norm_bias=qb, k_norm_bias=kb,
                                             eps=self._qk[1], scale=self.scale, backend=self.backend)
        else:
            q, k, v = qkv.unbind(2)
            q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:  # a rope module acts on (..., N, hd): apply it in the (B, H, N, hd) layout
                q, k = rope(q.transpose(1, 2)).transpose(1, 2), rope(k.transpose(1, 2)).transpose(1, 2)
            out = ops.attention(q.to(v.dtype), k.to(v.dtype), v, scale=self.scale, backend=self.backend)
        return self.proj_drop(self.proj(out.reshape(B, N, C)))


class FusedSwiGLUFFN(nn.Module):
    """``w3(vefast.swiglu(w12(x)))`` (children shared with the SwiGLUFFN it replaces)."""

    def __init__(self, ffn: nn.Module):
        super().__init__()
        _adopt(self, ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(swiglu(self.w12(x)))


class FusedDiTBlock(nn.Module):
    """An adaLN-Zero block (DiT / SiT / LightningDiT) on the fused ops; children shared with ``block``.

    forward(x, c, feat_rope=None):
        h      = norm_modulate(x, shift_msa, scale_msa)                  (norm1)
        x, h2  = gated_residual_norm_modulate(x, attn(h), gate_msa, shift=shift_mlp, scale=scale_mlp)   (norm2)
        return   gated_residual(x, mlp(h2), gate_mlp)
    """

    def __init__(self, block: nn.Module, backend: str = "auto"):
        super().__init__()
        attn = block.attn if isinstance(block.attn, FusedAttention) else FusedAttention(block.attn, backend)
        _adopt(self, block, attn=attn, mlp=FusedSwiGLUFFN(block.mlp) if is_swiglu_ffn(block.mlp) else block.mlp)
        D = self.adaLN_modulation[1].in_features
        self.wo_shift = self.adaLN_modulation[1].out_features == 4 * D
        self._specs = [describe_norm(n, D) for n in (self.norm1, self.norm2)]

    def forward(self, x: torch.Tensor, c: torch.Tensor, feat_rope: nn.Module | None = None) -> torch.Tensor:
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = norm_modulate(x, shift_msa, scale_msa, **_norm_call(self.norm1, self._specs[0]))
        a = self.attn(h, rope=feat_rope)
        x, h = gated_residual_norm_modulate(x, a, gate_msa, shift=shift_mlp, scale=scale_mlp,
                                            **_norm_call(self.norm2, self._specs[1]))
        return gated_residual(x, self.mlp(h), gate_mlp)


class FusedFinalLayer(nn.Module):
    """``linear(norm_modulate(x, shift, scale))`` with (shift, scale) = adaLN_modulation(c) (children shared)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        _adopt(self, layer)
        self._spec = describe_norm(self.norm_final, self.adaLN_modulation[1].in_features)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(norm_modulate(x, shift, scale, **_norm_call(self.norm_final, self._spec)))
