"""Drop-in ``nn.Module`` s built on :mod:`vefast.ops`, and explicit module swaps (no monkey-patching)."""
from .._lazy import attach

_EXPORTS = {
    "DiagonalGaussianDistribution": ".distributions",
    "VFLoss": ".align", "ReaLSAlignHead": ".align", "REPAProjector": ".align",
    "patch_dit": ".patch", "patch_lightningdit": ".patch",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = attach(__name__, _EXPORTS)
