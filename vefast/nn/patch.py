"""Explicit module swaps: DiT / SiT / LightningDiT blocks -> fused blocks (docs/math.md §7).

``patch_dit(model)`` and ``patch_lightningdit(model)`` walk ``model`` and replace, in place, every
child recognized by its structure (attribute names and types of the official blocks, never by
importing :mod:`vefast.models`):

- an adaLN-Zero block (``norm1``, ``attn`` with a fused ``qkv`` Linear and ``proj``, ``norm2``,
  ``mlp``, ``adaLN_modulation = Sequential(SiLU, Linear(D, 6D))``) -> :class:`FusedDiTBlock`;
- a final layer (``norm_final``, ``linear``, ``adaLN_modulation = Sequential(SiLU, Linear(D, 2D))``)
  -> :class:`FusedFinalLayer`.

``patch_dit`` accepts non-affine LayerNorm blocks with plain attention or timm's LayerNorm q/k norm
(DiT, SiT, ``qk_norm=True``); ``patch_lightningdit`` also accepts RMSNorm norms, RMSNorm q/k norms,
shift-free adaLN (Linear(D, 4D)), the 2D RoPE passed as ``feat_rope`` and SwiGLU FFNs (``w12`` /
``w3``), which become :class:`FusedSwiGLUFFN`. ``backend`` ("auto" | "sdpa" | "cuda", see
:func:`vefast.ops.attention.attention`) chooses the attention core. Fused modules hold the original
children, so Parameter objects and ``state_dict`` keys are unchanged. A module that looks like a block
(has ``adaLN_modulation``) but is not of a supported form is left as is, and the reason is reported once.
"""
from __future__ import annotations

import torch.nn as nn

from vefast.ops._common import report_once

from .dit_modules import FusedDiTBlock, FusedFinalLayer, describe_block, describe_final_layer

__all__ = ["patch_dit", "patch_lightningdit"]


def _swap(module: nn.Module, lightning: bool, path: str, backend: str) -> nn.Module:
    """The fused replacement of ``module`` (or ``module`` itself, with its children swapped)."""
    if isinstance(module, (FusedDiTBlock, FusedFinalLayer)):
        return module
    if hasattr(module, "adaLN_modulation"):
        if hasattr(module, "norm_final"):
            reason = describe_final_layer(module, lightning=lightning)
            if reason is None:
                return FusedFinalLayer(module)
        else:
            reason = describe_block(module, lightning=lightning)
            if reason is None:
                return FusedDiTBlock(module, backend)
        report_once(f"patch:{type(module).__name__}:{reason}",
                    f"{'patch_lightningdit' if lightning else 'patch_dit'}: left {path or 'the model'} "
                    f"({type(module).__name__}) as is: {reason}")
        return module
    for name, child in list(module.named_children()):
        new = _swap(child, lightning, f"{path}.{name}" if path else name, backend)
        if new is not child:
            setattr(module, name, new)
    return module


def _check(model: object, backend: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from vefast.ops.attention import BACKENDS  # imported at call time, as dit_modules does

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def patch_dit(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Swap the DiT / SiT blocks and final layer of ``model`` for fused ones (in place); returns the model.

    Same parameters (shared objects), same ``state_dict`` keys, same outputs within tolerance.
    """
    _check(model, backend)
    return _swap(model, False, "", backend)


def patch_lightningdit(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Swap the LightningDiT (and DiT / SiT) blocks and final layer of ``model`` for fused ones (in place).

    Blocks use ``norm_modulate`` / ``gated_residual`` (RMSNorm or LayerNorm), attention with the q/k
    norm and 2D RoPE fused around SDPA in ``qk_norm_rope_attention``, and ``swiglu`` in the FFN.
    """
    _check(model, backend)
    return _swap(model, True, "", backend)
