"""Weights from the anchors' released checkpoints: DiT, SiT, LightningDiT and REPA ``.pt`` files (for
``train-dit``'s ``model.init_from``, fine-tuning and sampling) and LDM / VA-VAE autoencoders (as
``sample.tokenizer`` / ``extract-latents --tokenizer``).

Files are read with ``torch.load(weights_only=True)`` (no code runs; ``argparse.Namespace``, which
DiT / SiT / REPA store their arguments in, is the one extra type allowed). What the releases hold:

- DiT ``DiT-XL-2-256x256.pt``, SiT ``SiT-XL-2-256x256.pt``: the EMA state dict itself;
- LightningDiT, REPA, and DiT / SiT training checkpoints: ``{"model": ..., "ema": ..., "opt": ..., "args" | "config": ...}``
  (REPA's SiT state dict carries its projectors as ``projectors.N.*``);
- LDM / VA-VAE autoencoders: ``{"state_dict": {"encoder.*", "decoder.*", "quant_conv.*", "post_quant_conv.*",
  "loss.*" ...}}`` or the bare state dict.

Key mapping: vefast's models use the official module names, so the only rewriting is dropping the
wrappers' prefixes (``module.`` from DDP, ``_orig_mod.`` from ``torch.compile``). Every key is checked:
missing, unexpected and wrongly shaped tensors are reported together, by name, before anything loads.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from .config import ConfigError

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# buffers a model recomputes from its config: a checkpoint without them still initializes the model fully
RECOMPUTED_BUFFERS = ("feat_rope.freqs_cos", "feat_rope.freqs_sin")
AE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def torch_load_weights(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with a clear error for what it refuses."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{str(p)!r}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors have many types; name the file and the cause
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{str(p)!r} is not loadable as weights (torch.load(weights_only=True): "
                          f"{type(e).__name__}: {first[:300]}). Re-save its state dict with torch.save(model.state_dict()) "
                          "if it holds objects other than tensors, numbers, strings and argparse.Namespace") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                          for k, v in obj.items())


def strip_prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``module.`` / ``_orig_mod.`` wrapper prefixes (repeatedly, in any order)."""
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def pick_state_dict(obj: Any, which: str, where: str) -> tuple[dict[str, torch.Tensor], str]:
    """The ``which`` ("ema" | "model") weights of a loaded checkpoint, and a word on what was taken.
    A bare state dict (DiT / SiT releases: EMA weights) is taken as is."""
    if _is_state_dict(obj):
        return strip_prefixes(obj), "the file's state dict"
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{where}: expected a state dict or a dict holding one, got {type(obj).__name__}")
    if which in obj and _is_state_dict(obj[which]):
        return strip_prefixes(obj[which]), f"its {which!r} weights"
    sub = sorted(k for k, v in obj.items() if _is_state_dict(v))
    raise ConfigError(f"{where}: no {which!r} state dict in the checkpoint (top-level keys: {sorted(map(str, obj))}; "
                      f"state dicts among them: {sub or 'none'}); set model.init_weights to one of {sub or ['ema', 'model']}")


def _report(label: str, keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
    return f"{label} ({len(keys)}): {shown}"


def load_checked(module: nn.Module, sd: Mapping[str, torch.Tensor], where: str, *,
                 ignore_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Load ``sd`` into ``module`` after checking every key: raises :class:`ConfigError` listing the
    missing, unexpected and wrongly shaped tensors (all of them at once). Keys under ``ignore_prefixes``
    are skipped; buffers the model recomputes (``RECOMPUTED_BUFFERS``) may be absent. Returns the
    skipped keys."""
    own = module.state_dict()
    ignored = sorted(k for k in sd if k.startswith(ignore_prefixes)) if ignore_prefixes else []
    given = {k: v for k, v in sd.items() if k not in set(ignored)}
    missing = sorted(k for k in own if k not in given and k not in RECOMPUTED_BUFFERS)
    unexpected = sorted(k for k in given if k not in own)
    shapes = sorted(f"{k} {tuple(given[k].shape)} vs {tuple(own[k].shape)}" for k in given
                    if k in own and tuple(given[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        parts = [_report(label, keys) for label, keys in (("missing", missing), ("unexpected", unexpected),
                                                           ("shape mismatch (checkpoint vs model)", shapes)) if keys]
        raise ConfigError(f"{where} does not fit {type(module).__name__}: " + "; ".join(parts)
                          + ". Check model.name / model.kwargs (and num_classes) against the checkpoint's model")
    module.load_state_dict({k: v for k, v in given.items()}, strict=False)
    return ignored


def load_ldm_autoencoder(path: str | Path):
    """(AutoencoderKL, its arguments) from an LDM / VA-VAE autoencoder weights file."""
    from ..models.tokenizer import AutoencoderKL, ldm_config_from_state_dict

    obj = torch_load_weights(path)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{str(path)!r}: expected an autoencoder state dict, got {type(obj).__name__}")
    sd = {k: v for k, v in strip_prefixes({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}).items()
          if k.startswith(AE_PREFIXES)}
    try:
        kwargs = ldm_config_from_state_dict(sd)
    except ValueError as e:
        raise ConfigError(f"{str(path)!r}: {e}") from None
    ae = AutoencoderKL(**kwargs)
    load_checked(ae, sd, f"autoencoder {str(path)!r}")
    return ae, kwargs
