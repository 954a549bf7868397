"""Shared plumbing of the op files: dispatch between Triton and eager, argument checks, seeds.

Dispatch rule (every op, :func:`triton_path`): a CUDA tensor runs the Triton kernels; a CPU tensor
runs the eager reference, except under ``TRITON_INTERPRET=1`` where the Triton kernels run on CPU
tensors (the CPU test lane). Every eager fallback is reported once (:func:`report_once`). The
environment is read at call time, never at import. Launchers run on their tensors' GPU
(:func:`on_tensor_device`).
"""
from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

REDUCTIONS = ("mean", "sum")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_reported: dict[str, str] = {}
_F = TypeVar("_F", bound=Callable)


GRID_YZ_MAX = 65535  # CUDA's limit on the 2nd and 3rd grid axes


def check_grid_axis(what: str, value: int) -> None:
    """A kernel puts ``value`` programs on its 2nd or 3rd grid axis: refuse more than CUDA allows."""
    if value > GRID_YZ_MAX:
        raise ValueError(f"{what} = {value} exceeds {GRID_YZ_MAX}, the CUDA grid limit of the fused kernel "
                         f"(split the call into parts of at most {GRID_YZ_MAX})")


def on_tensor_device(launch: _F) -> _F:
    """Run a kernel launcher with its first argument's GPU as the current device. Triton launches on
    the current device and its current stream, not on the tensors' device (``cuda:1`` tensors while
    ``cuda:0`` is current would be an illegal access)."""
    @functools.wraps(launch)
    def wrapper(t: torch.Tensor, *args, **kwargs):
        if t.device.type != "cuda":
            return launch(t, *args, **kwargs)
        with torch.cuda.device(t.device):
            return launch(t, *args, **kwargs)
    return wrapper  # type: ignore[return-value]


def interpret_mode() -> bool:
    """True when Triton kernels are interpreted on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton path runs for these tensors (all on one device, checked by the caller)."""
    device = tensors[0].device
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpret_mode()


def triton_path(op: str, *tensors: torch.Tensor | None, float64_in_kernel: bool = False) -> bool:
    """Whether ``op`` runs its Triton kernels on these tensors (None entries ignored). When it does not,
    the caller runs the eager reference, and the reason is reported once: CPU tensors outside the
    interpreter, or float64 inputs for kernels that compute in fp32 (``float64_in_kernel=False``)."""
    present = [t for t in tensors if t is not None]
    if not use_triton(*present):
        report_once(f"{op}:cpu", f"{op}: CPU tensors run the eager reference (Triton needs CUDA or TRITON_INTERPRET=1)")
        return False
    if not float64_in_kernel and any(t.dtype == torch.float64 for t in present):
        report_once(f"{op}:float64", f"{op}: float64 inputs run the eager reference (the kernels accumulate in fp32)")
        return False
    return True


def report_once(key: str, message: str) -> None:
    """Warn once per ``key`` that a fused path is not taken; ``vefast.info()`` lists these too."""
    if key not in _reported:
        _reported[key] = message
        warnings.warn(f"vefast: {message}", RuntimeWarning, stacklevel=3)


def reported_fallbacks() -> dict[str, str]:
    """The fallback reasons reported so far in this process."""
    return dict(_reported)


def check_tensor(name: str, t: object, *, floating: bool = True, dtypes: Iterable[torch.dtype] | None = None) -> None:
    """Raise TypeError unless ``t`` is a tensor of a floating (or one of ``dtypes``) dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    allowed = tuple(dtypes) if dtypes is not None else (FLOAT_DTYPES if floating else None)
    if allowed is not None and t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def check_same_shape(**tensors: torch.Tensor | None) -> None:
    """Raise ValueError unless every given (non-None) tensor has the shape of the first."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    ref_name, ref = items[0]
    for name, t in items[1:]:
        if t.shape != ref.shape:
            raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raise ValueError unless every given (non-None) tensor is on the device of the first."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    ref_name, ref = items[0]
    for name, t in items[1:]:
        if t.device != ref.device:
            raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_finite_number(name: str, value: float, *, min_value: float | None = None, strict: bool = False) -> None:
    """Raise ValueError unless ``value`` is a finite real (and >= / > ``min_value``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if min_value is not None and (value <= min_value if strict else value < min_value):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {min_value}, got {value}")


def draw_seed(generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw a 31-bit Philox seed as a 0-dim int64 CPU tensor from ``generator``.

    ``None`` uses torch's default CPU generator (seeded by ``torch.manual_seed``). Drawing the seed
    this way makes "same generator state -> same noise" hold for the in-kernel noise of every op,
    as for ``torch.randn(..., generator=g)``. Ops take the seed as a tensor argument and read it
    inside the custom op, so no ``.item()`` lands in a ``torch.compile`` graph.
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    device = generator.device if generator is not None else torch.device("cpu")
    seed = torch.randint(0, 2**31 - 1, (), generator=generator, device=device, dtype=torch.int64)
    return seed.cpu()


def reduction_scale(numel: int, batch: int, reduction: str) -> float:
    """Factor that turns an elementwise sum into the MATH.md §1 reduction: 1/N ("mean") or 1/B ("sum")."""
    return 1.0 / max(numel, 1) if reduction == "mean" else 1.0 / max(batch, 1)
