"""DINOv2 features at the latent grid, the frozen targets of the alignment losses (docs/math.md §3).

- :func:`load_dinov2` builds a timm DINOv2 (``dynamic_img_size=True``), frozen and in eval mode.
  Offline-friendly: ``checkpoint=`` a local file (``.safetensors``, ``.pth``/``.bin``/``.pt``) or a
  directory holding ``model.safetensors`` / ``pytorch_model.bin`` (a Hugging Face snapshot, e.g.
  ``huggingface-cli download timm/vit_large_patch14_dinov2.lvd142m --local-dir DIR``) needs no
  network. ``pretrained=True`` without a checkpoint reads the weights from the local Hugging Face
  cache (``HF_HOME`` / ``HF_HUB_CACHE``) and never touches the network: where they are not cached
  the error says at once how to provide them. ``download=True`` lets timm fetch them.
- :func:`dinov2_features` returns ``(patch (B, D', h, w), cls (B, D'))`` at the latent grid:
  * ``resize="match_grid"`` (ReaLS §3.2, docs/math.md §3b): images resized to (h p, w p), p the patch size
    (14), so the patch grid is the latent grid at any resolution (224 px for a 16x16 grid).
  * ``resize="224"`` (VA-VAE, ``foundation_models.py``): images resized to 224x224 whatever their
    size; the grid must then be (224 / p, 224 / p) = (16, 16) for a /14 model (VA-VAE's f16 at
    256 px), otherwise a ValueError.
  * ``normalize=True`` maps images from [-1, 1] to [0, 1] and applies the ImageNet mean / std that
    DINOv2 was trained with. VA-VAE feeds its [-1, 1] images without any normalization: pass
    ``normalize=False`` to reproduce it.
  Resizing is bilinear with ``align_corners=False`` and no antialiasing (VA-VAE's call). The
  features are the final-norm tokens of ``forward_features``; register tokens (``*_reg4_*``
  models, as ReaLS' DINOv2-large-reg) are dropped with the cls token. Computed under
  ``torch.no_grad()``: they are targets.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("match_grid", "224")
_CHECKPOINT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def _how_to_get(name: str) -> str:
    return (f"get the weights once with network access, e.g. `huggingface-cli download timm/{name} "
            f"--local-dir DIR`, then call load_dinov2({name!r}, checkpoint='DIR') (or the .safetensors "
            f"file inside), or set HF_HOME to a cache that already holds them")


def _how_to_provide(name: str) -> str:
    return (f"no local weights for {name!r}: pass checkpoint='DIR' (a directory holding model.safetensors, "
            f"or the file itself), or put them in the Hugging Face cache, or allow a download with "
            f"load_dinov2({name!r}, download=True); " + _how_to_get(name))


def _cached_weights(name: str) -> Path | None:
    """The weights of timm model ``name`` in the local Hugging Face cache, without any network access."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    for filename in _CHECKPOINT_FILES:
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def _load_file(path: Path):
    """The object stored in a safetensors / torch checkpoint file; a clear error for anything else."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip, safetensors header errors: many types, one message
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"checkpoint {str(path)!r} is not a readable {'safetensors' if path.suffix == '.safetensors' else 'PyTorch'} "
                         f"checkpoint ({type(exc).__name__}: {first})") from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        found = [path / f for f in _CHECKPOINT_FILES if (path / f).is_file()]
        if not found:
            raise FileNotFoundError(f"checkpoint directory {str(path)!r} holds none of {_CHECKPOINT_FILES}")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    state = _load_file(path)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {str(path)!r} does not hold a state dict (got {type(state).__name__})")
    return state


def load_dinov2(name: str = "vit_large_patch14_dinov2.lvd142m", *, checkpoint: str | Path | None = None,
                pretrained: bool = True, download: bool = False, **timm_kwargs) -> nn.Module:
    """A frozen timm DINOv2 in eval mode (``dynamic_img_size=True``; ``timm_kwargs`` go to
    ``timm.create_model``). ``checkpoint`` loads local weights; ``pretrained`` without a checkpoint
    reads the local Hugging Face cache (no network; ``download=True`` lets timm fetch the weights);
    ``pretrained=False`` is a random initialization."""
    import timm

    if not isinstance(name, str) or not timm.is_model(name):
        raise ValueError(f"name must be a timm model name (e.g. 'vit_large_patch14_dinov2.lvd142m'), got {name!r}")
    kwargs = {"dynamic_img_size": True, **timm_kwargs}
    if checkpoint is None and pretrained and not download:
        checkpoint = _cached_weights(name)
        if checkpoint is None:
            raise FileNotFoundError(_how_to_provide(name))
    if checkpoint is not None:
        state = _read_state_dict(Path(checkpoint))
        model = timm.create_model(name, pretrained=False, **kwargs)
        if hasattr(model, "pos_embed") and "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
            from timm.models.vision_transformer import checkpoint_filter_fn

            state = checkpoint_filter_fn(state, model)       # resamples the position embedding
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint {str(checkpoint)!r} does not fit {name!r}: missing keys {missing[:5]}"
                             f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                             f"{'...' if len(unexpected) > 5 else ''}")
    elif pretrained:
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as exc:  # network / cache / hub errors of many types: re-raised with the remedy
            raise RuntimeError(f"could not load pretrained weights for {name!r} ({type(exc).__name__}: {exc}); "
                               + _how_to_get(name)) from exc
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
    model.requires_grad_(False)
    return model.eval()


def _patch_size(model: nn.Module) -> tuple[int, int]:
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "patch_size", None)
    if size is None or not hasattr(model, "forward_features"):
        raise TypeError(f"model must be a timm VisionTransformer (DINOv2), got {type(model).__name__}")
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def dinov2_features(model: nn.Module, images: torch.Tensor, grid: tuple[int, int], *, resize: str = "match_grid",
                    normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """DINOv2 ``(patch (B, D', h, w), cls (B, D'))`` for images (B, 3, H, W) in [-1, 1] at ``grid=(h, w)``.

    ``resize="match_grid"``: input resized to (h p, w p) (ReaLS); ``"224"``: to 224x224 (VA-VAE,
    grid must be (224/p, 224/p)). ``normalize``: ImageNet mean / std after mapping [-1, 1] -> [0, 1]
    (``False`` is VA-VAE's choice). Features come out in the model's dtype, without gradient.
    """
    ph, pw = _patch_size(model)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating tensor in [-1, 1], got dtype {images.dtype}")
    in_chans = model.patch_embed.proj.in_channels
    if images.dim() != 4 or images.shape[1] != in_chans:
        raise ValueError(f"images must be (B, {in_chans}, H, W), got shape {tuple(images.shape)}")
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"images must hold at least one non-empty image, got shape {tuple(images.shape)}")
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)):
        raise ValueError(f"grid must be a pair of positive ints (h, w), got {grid!r}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    param = next(model.parameters())
    if images.device != param.device:
        raise ValueError(f"images must be on the model's device ({param.device}), got {images.device}")
    h, w = int(grid[0]), int(grid[1])
    if resize == "224":
        size = (224, 224)
        if (224 // ph, 224 // pw) != (h, w):
            raise ValueError(f"resize='224' gives a {224 // ph}x{224 // pw} patch grid, which does not match grid "
                             f"{(h, w)}; use resize='match_grid'")
    else:
        size = (h * ph, w * pw)
    if not getattr(model, "dynamic_img_size", False):
        expected = tuple(getattr(model.patch_embed, "img_size", size) or size)
        if expected != size:
            raise ValueError(f"the model takes {expected} images only; build it with dynamic_img_size=True "
                             f"(load_dinov2 does) to feed {size}")
    with torch.no_grad():
        x = images.to(param.dtype)
        if normalize:
            mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            x = ((x + 1.0) * 0.5 - mean) / std
        if tuple(x.shape[2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        tokens = model.forward_features(x)                          # (B, prefix + N, D')
        prefix = int(getattr(model, "num_prefix_tokens", 1))
        patch = tokens[:, prefix:]
        if patch.shape[1] != h * w:
            raise ValueError(f"the model returned {patch.shape[1]} patch tokens, expected {h}x{w} = {h * w}")
        patch = patch.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
        return patch, tokens[:, 0]
