"""vefast: fused Triton/CUDA kernels for training latent diffusion models.

Public API (imported on first use; ``import vefast`` does no CUDA work and imports no kernels):

- Tokenizer latents: :func:`ve_loss`, :func:`kl_loss` (docs/math.md §1-2)
- Alignment with DINOv2: :func:`vf_loss`, :func:`align_loss`, :func:`repa_loss`,
  :func:`load_dinov2`, :func:`dinov2_features` (docs/math.md §3)
- Timesteps: :func:`path`, :func:`separation_function`, :class:`VRTimestepSampler`,
  :class:`LogitNormalSampler`, :class:`UniformSampler` (docs/math.md §4-6)
- DiT ops: :func:`attention`, :func:`qk_norm_rope_attention`, :func:`norm_modulate`,
  :func:`gated_residual`, :func:`gated_residual_norm_modulate`, :func:`swiglu` (docs/math.md §7)
- Modules: :mod:`vefast.nn`; environment report: :func:`info`; every eager fallback, per call:
  :func:`record_fallbacks`, :func:`add_fallback_listener`

The subpackages ``vefast.nn``, ``vefast.sampling``, ``vefast.ops``, ``vefast.models`` and
``vefast.recipes`` resolve as attributes after ``import vefast`` (imported on first use).
"""
from ._lazy import attach
from ._version import __version__

_EXPORTS = {
    "info": "._info",
    "record_fallbacks": ".ops._common", "add_fallback_listener": ".ops._common", "FallbackEvent": ".ops._common",
    # reparameterization losses (issue: foundation)
    "ve_loss": ".ops.reparam", "kl_loss": ".ops.reparam", "VEOutput": ".ops.reparam", "KLOutput": ".ops.reparam",
    # DINOv2 alignment
    "vf_loss": ".ops.vf_loss", "VFOutput": ".ops.vf_loss",
    "align_loss": ".ops.align_loss", "repa_loss": ".ops.align_loss", "AlignOutput": ".ops.align_loss",
    "load_dinov2": ".dinov2", "dinov2_features": ".dinov2",
    # VR timestep sampling
    "path": ".sampling", "separation_function": ".sampling", "VRTimestepSampler": ".sampling",
    "LogitNormalSampler": ".sampling", "UniformSampler": ".sampling",
    # DiT attention and block ops
    "attention": ".ops.attention", "qk_norm_rope_attention": ".ops.attention",
    "norm_modulate": ".ops.norm_modulate", "gated_residual": ".ops.gated_residual",
    "gated_residual_norm_modulate": ".ops.gated_residual", "GatedResidualNormOutput": ".ops.gated_residual",
    "swiglu": ".ops.swiglu",
}
_SUBMODULES = ("nn", "sampling", "ops", "models", "recipes")
__all__ = ["__version__", *_EXPORTS]
__getattr__, __dir__ = attach(__name__, _EXPORTS, _SUBMODULES)
