"""Alignment modules (docs/math.md §3): VA-VAE's VF loss with its projection, ReaLS' alignment heads and
REPA's projector, on the fused losses of :mod:`vefast.ops.vf_loss` and :mod:`vefast.ops.align_loss`.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..ops._common import check_int
from ..ops.align_loss import AlignOutput, align_loss, repa_loss
from ..ops.vf_loss import VFOutput, vf_loss


class VFLoss(nn.Module):
    """VA-VAE's ``linear_proj`` (``Conv2d(C, D', 1, bias=False)``, ``reverse_proj=True``) + VF loss.

    The parameter is ``linear_proj.weight`` (D', C, 1, 1), VA-VAE's key and shape, so
    ``load_state_dict`` takes VA-VAE's tensor as is; :meth:`load_vavae_state_dict` picks it out of
    a whole VA-VAE checkpoint. ``forward(z, features)`` -> :class:`vefast.VFOutput` (docs/math.md §3a).
    """

    def __init__(self, latent_dim: int, feature_dim: int, *, margin_cos: float = 0.5, margin_dms: float = 0.25,
                 weight_cos: float = 1.0, weight_dms: float = 1.0) -> None:
        super().__init__()
        for name, value in (("latent_dim", latent_dim), ("feature_dim", feature_dim)):
            check_int(name, value, min_value=1)
        self.linear_proj = nn.Conv2d(latent_dim, feature_dim, kernel_size=1, bias=False)
        self.margin_cos, self.margin_dms = margin_cos, margin_dms
        self.weight_cos, self.weight_dms = weight_cos, weight_dms

    def forward(self, z: torch.Tensor, features: torch.Tensor) -> VFOutput:
        c, d = self.linear_proj.in_channels, self.linear_proj.out_channels
        for name, t, dim, want in (("z", z, 1, c), ("features", features, 1, d)):
            if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[dim] != want:
                kind = "latent_dim" if name == "z" else "feature_dim"
                hint = "" if name == "z" else " (DINOv2 ViT-S/14 gives 384, B/14 768, L/14 1024, g/14 1536)"
                raise ValueError(f"VFLoss: {name} has {t.shape[dim]} channels (dim 1 of {tuple(t.shape)}) but this "
                                 f"VFLoss was built with {kind}={want}: VFLoss(latent_dim={c}, feature_dim={d}){hint}")
        return vf_loss(z, features, self.linear_proj.weight, margin_cos=self.margin_cos,
                       margin_dms=self.margin_dms, weight_cos=self.weight_cos, weight_dms=self.weight_dms)

    def load_vavae_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load ``linear_proj.weight`` from a VA-VAE ``AutoencoderKL`` checkpoint (the dict itself or
        ``{"state_dict": ...}`` as Lightning saves it); other keys are ignored."""
        if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
            state_dict = state_dict["state_dict"]
        if "linear_proj.bias" in state_dict:
            raise ValueError("this checkpoint's linear_proj has a bias: it was trained with reverse_proj=False "
                             "(features projected to the latent), which VFLoss does not implement")
        if "linear_proj.weight" not in state_dict:
            raise KeyError("no 'linear_proj.weight' in the state dict (was the VA-VAE trained with use_vf?)")
        self.load_state_dict({"linear_proj.weight": state_dict["linear_proj.weight"]})

    def extra_repr(self) -> str:
        return (f"margin_cos={self.margin_cos}, margin_dms={self.margin_dms}, weight_cos={self.weight_cos}, "
                f"weight_dms={self.weight_dms}")


def _mlp(latent_dim: int, hidden_dim: int, feature_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, feature_dim))


class ReaLSAlignHead(nn.Module):
    """ReaLS' alignment network (ReaLS eq. 1-2, docs/math.md §3b): ``patch_mlp`` per latent token and
    ``cls_mlp`` on the spatially averaged latent, each ``Linear(C, H) GELU Linear(H, D')``
    (H = ``hidden_dim``, default D': not published, our choice).

    ``forward(z, patch_features, cls_feature)`` returns the :class:`vefast.AlignOutput` summed over
    the two branches; :meth:`project` gives the projected features for downstream heads (ReaLS §3.4).
    """

    def __init__(self, latent_dim: int, feature_dim: int, hidden_dim: int | None = None, *,
                 weight_cos: float = 0.9, weight_smooth: float = 0.1, beta: float = 1.0) -> None:
        super().__init__()
        hidden_dim = feature_dim if hidden_dim is None else hidden_dim
        for name, value in (("latent_dim", latent_dim), ("feature_dim", feature_dim), ("hidden_dim", hidden_dim)):
            check_int(name, value, min_value=1)
        self.patch_mlp = _mlp(latent_dim, hidden_dim, feature_dim)
        self.cls_mlp = _mlp(latent_dim, hidden_dim, feature_dim)
        self.weight_cos, self.weight_smooth, self.beta = weight_cos, weight_smooth, beta

    def project(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, C, h, w) -> (patch features (B, D', h, w), cls feature (B, D'))."""
        if not isinstance(z, torch.Tensor) or z.dim() != 4:
            raise ValueError(f"z must be a (B, C, h, w) tensor, got {getattr(z, 'shape', type(z).__name__)}")
        tokens = self.patch_mlp(z.flatten(2).transpose(1, 2))             # (B, N, D')
        patch = tokens.transpose(1, 2).unflatten(2, z.shape[2:])
        cls = self.cls_mlp(z.mean(dim=(2, 3)))
        return patch, cls

    def forward(self, z: torch.Tensor, patch_features: torch.Tensor, cls_feature: torch.Tensor, *,
                return_features: bool = False):
        """AlignOutput(patch branch + cls branch); with ``return_features`` also ``(patch, cls)``."""
        patch, cls = self.project(z)
        if tuple(patch_features.shape) != tuple(patch.shape):
            raise ValueError(f"patch_features must be (B, D', h, w) = {tuple(patch.shape)} (the latent grid), "
                             f"got {tuple(patch_features.shape)}")
        if tuple(cls_feature.shape) != tuple(cls.shape):
            raise ValueError(f"cls_feature must be (B, D') = {tuple(cls.shape)}, got {tuple(cls_feature.shape)}")
        knobs = {"weight_cos": self.weight_cos, "weight_smooth": self.weight_smooth, "beta": self.beta}
        lp = align_loss(patch.flatten(2).transpose(1, 2), patch_features.flatten(2).transpose(1, 2), **knobs)
        lc = align_loss(cls, cls_feature, **knobs)
        out = AlignOutput(lp.loss + lc.loss, lp.cos_loss + lc.cos_loss, lp.smooth_loss + lc.smooth_loss)
        return (out, (patch, cls)) if return_features else out


class REPAProjector(nn.Sequential):
    """REPA's projector (docs/math.md §3c): ``Linear(D, P) SiLU Linear(P, P) SiLU Linear(P, D')`` per token,
    P = ``proj_dim`` (2048). A ``Sequential`` like REPA's ``build_mlp``, so its state-dict keys
    (``0.weight`` ... ``4.bias``) match one entry of REPA's ``projectors``.

    Argument order: ``REPAProjector(hidden_dim, feature_dim, proj_dim)``; REPA's own order
    ``build_mlp(hidden_size, projector_dim, z_dim)`` is :meth:`from_repa`. A REPA SiT checkpoint's
    ``projectors.N.*`` weights load with :meth:`load_repa_state_dict`.
    """

    @classmethod
    def from_repa(cls, hidden_size: int, projector_dim: int, z_dim: int) -> REPAProjector:
        """The projector in REPA's argument order, ``build_mlp(hidden_size, projector_dim, z_dim)``:
        ``hidden_size`` = D (the SiT width), ``projector_dim`` = P (2048), ``z_dim`` = D' (the encoder's
        feature dim, e.g. 768 for DINOv2-B)."""
        return cls(hidden_size, z_dim, projector_dim)

    def load_repa_state_dict(self, state_dict: Mapping[str, torch.Tensor], index: int = 0) -> None:
        """Load ``projectors.{index}.*`` of a REPA SiT state dict (or of ``{"model": ...}`` / ``{"ema": ...}``
        as REPA saves it: ``ema`` is preferred when both are present)."""
        for key in ("ema", "model"):
            if key in state_dict and isinstance(state_dict[key], Mapping):
                state_dict = state_dict[key]
                break
        prefix = f"projectors.{index}."
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not own:
            found = sorted({k.split(".")[1] for k in state_dict if k.startswith("projectors.")})
            raise KeyError(f"no '{prefix}*' keys in the state dict (projectors present: {found or 'none'})")
        self.load_state_dict(own)

    def __init__(self, hidden_dim: int, feature_dim: int, proj_dim: int = 2048) -> None:
        for name, value in (("hidden_dim", hidden_dim), ("feature_dim", feature_dim), ("proj_dim", proj_dim)):
            check_int(name, value, min_value=1)
        super().__init__(nn.Linear(hidden_dim, proj_dim), nn.SiLU(), nn.Linear(proj_dim, proj_dim), nn.SiLU(),
                         nn.Linear(proj_dim, feature_dim))

    def loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``-mean cos(proj(hidden_n), target_n)`` (:func:`vefast.repa_loss`); hidden (..., D), target (..., D')."""
        return repa_loss(self(hidden), target)
