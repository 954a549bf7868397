"""Shared plumbing of the op files: dispatch between Triton and eager, argument checks, seeds.

Dispatch rule (every op, :func:`triton_path`): a CUDA tensor runs the Triton kernels; a CPU tensor
runs the eager reference, except under ``TRITON_INTERPRET=1`` where the Triton kernels run on CPU
tensors (the CPU test lane). Every eager fallback is reported once (:func:`report_once`) and, on
every call, to the fallback listeners (:func:`record_fallbacks`, :func:`add_fallback_listener`). The
environment is read at call time, never at import. Launchers run on their tensors' GPU
(:func:`on_tensor_device`).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
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
    """Run a kernel launcher with its first argument's GPU as the current device (leading optional
    arguments may be None: the first one given counts). Triton launches on the current device and its
    current stream, not on the tensors' device (``cuda:1`` tensors while ``cuda:0`` is current would be
    an illegal access)."""
    @functools.wraps(launch)
    def wrapper(*args, **kwargs):
        t = next((a for a in args if a is not None), None)
        if getattr(getattr(t, "device", None), "type", None) != "cuda":
            return launch(*args, **kwargs)
        with torch.cuda.device(t.device):
            return launch(*args, **kwargs)
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
        if present and present[0].device.type == "meta":  # shapes only (deferred init): the reference's shapes
            report_once(f"{op}:meta", f"{op}: meta tensors run the eager reference (no data, no kernel to launch)")
        else:
            report_once(f"{op}:cpu",
                        f"{op}: CPU tensors run the eager reference (Triton needs CUDA or TRITON_INTERPRET=1)")
        return False
    if not float64_in_kernel and any(t.dtype == torch.float64 for t in present):
        report_once(f"{op}:float64", f"{op}: float64 inputs run the eager reference (the kernels accumulate in fp32)")
        return False
    return True


@dataclass(frozen=True)
class FallbackEvent:
    """One call that ran an eager fallback instead of its fused path: the report key ``op:reason``
    split at its first colon (``op="vf_loss", reason="float64"``; ``reason`` is "" for a key without
    one) and the human-readable message."""
    op: str
    reason: str
    message: str

    @property
    def key(self) -> str:
        return f"{self.op}:{self.reason}" if self.reason else self.op


FallbackListener = Callable[[FallbackEvent], None]
_listeners: tuple[FallbackListener, ...] = ()  # replaced, never mutated: readers need no lock
_listeners_lock = threading.Lock()


def add_fallback_listener(callback: FallbackListener) -> Callable[[], None]:
    """Call ``callback(event)`` for every eager fallback from now on, on every call (unlike the
    once-per-process warning) and from whichever thread runs the op; returns a function that removes it.
    An exception raised by ``callback`` propagates out of the op call."""
    global _listeners
    if not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    with _listeners_lock:
        _listeners = (*_listeners, callback)

    def remove() -> None:
        global _listeners
        with _listeners_lock:
            rest = list(_listeners)
            if callback in rest:
                rest.remove(callback)
            _listeners = tuple(rest)
    return remove


@contextlib.contextmanager
def record_fallbacks() -> Iterator[list[FallbackEvent]]:
    """Collect the :class:`FallbackEvent` of every eager fallback while the block runs (all threads)::

        with record_fallbacks() as events:
            vefast.vf_loss(z.double(), f.double(), w.double())
        [e.key for e in events]  # -> ["vf_loss:float64"]

    Under ``torch.compile`` an op's fallback is recorded when it is traced, not on each run.
    """
    events: list[FallbackEvent] = []
    remove = add_fallback_listener(events.append)  # list.append is atomic: safe from several threads
    try:
        yield events
    finally:
        remove()


def report_once(key: str, message: str) -> None:
    """Report that a fused path is not taken (``key`` is ``"op:reason"``): every call goes to the
    fallback listeners (:func:`add_fallback_listener`), and a RuntimeWarning is issued once per ``key``
    per process; ``vefast.info()`` lists the keys. Under ``torch.compile`` it reports while tracing."""
    if torch.compiler.is_compiling():
        from torch._dynamo.comptime import comptime  # dynamo cannot trace warnings.warn or the listeners
        comptime(_report_while_tracing)
        return
    listeners = _listeners
    if listeners:
        op, _, reason = key.partition(":")
        event = FallbackEvent(op, reason, message)
        for callback in listeners:
            callback(event)
    if key not in _reported:
        _reported[key] = message
        warnings.warn(f"vefast: {message}", RuntimeWarning, stacklevel=_caller_stacklevel())


_LIBRARY_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (sys.modules[__name__.split(".")[0]], torch))


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued in :func:`report_once` point at the first frame outside
    vefast and torch (the user's call), however deep the op's own call chain is."""
    frame, level = sys._getframe(2), 2  # report_once's caller, and the level warnings.warn names it by
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 2


def _report_while_tracing(ctx) -> None:
    """Runs at trace time in :func:`report_once`'s frame (a comptime function may have no free variables)."""
    report_once(ctx.get_local("key").as_python_constant(), ctx.get_local("message").as_python_constant())


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


def check_not_meta(op: str, **tensors: object) -> None:
    """Raise ValueError for any given tensor on the meta device (deferred / FSDP init: shapes, no data).
    For one-off APIs that read values on the host; costs no sync (a device attribute). A list / tuple is
    searched one level deep (a sequence of 0-dim tensors); other values and None are skipped (the type
    checks report them)."""
    for name, value in tensors.items():
        items = value if isinstance(value, (list, tuple)) else (value,)
        if any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in items):
            raise ValueError(f"{op}: {name} is on the meta device (no data): pass a tensor with values (CPU or CUDA)")


def check_generator(generator: object) -> None:
    """TypeError unless ``generator`` is a ``torch.Generator`` or None."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def check_int(name: str, value: object, *, min_value: int | None = None) -> None:
    """TypeError unless ``value`` is an int (a bool is not); ValueError when it is below ``min_value``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if min_value is not None and value < min_value:
        what = "a positive int" if min_value == 1 else f"an int >= {min_value}"
        raise ValueError(f"{name} must be {what}, got {value!r}")


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


_HOST_TENSORS: dict[int, weakref.ref] = {}


def host_tensor(t: torch.Tensor) -> torch.Tensor:
    """Mark ``t`` as a host-side tensor by design and return it: a CPU tensor whose value vefast reads
    on the host (a Philox seed, the verdict of a check on a CPU input), so reading it never waits for
    a GPU. The sync-count test (tests/test_host_syncs.py) does not count reads of marked tensors.
    Refuses non-CPU tensors: a read there would stall the device queue."""
    if t.device.type != "cpu":
        raise ValueError(f"host_tensor: expected a CPU tensor, got one on {t.device} (reading it would stall the GPU)")
    if not torch.compiler.is_compiling():
        key = id(t)

        def forget(ref: weakref.ref, key: int = key) -> None:
            if _HOST_TENSORS.get(key) is ref:
                del _HOST_TENSORS[key]

        _HOST_TENSORS[key] = weakref.ref(t, forget)
    return t


def is_host_tensor(t: object) -> bool:
    """Whether ``t`` was marked by :func:`host_tensor` (and is still alive)."""
    ref = _HOST_TENSORS.get(id(t))
    return ref is not None and ref() is t


def host_item(t: torch.Tensor) -> int | float | bool:
    """``t.item()`` of a host-side tensor by design (a seed): marks it (:func:`host_tensor`), refuses
    device tensors."""
    return host_tensor(t).item()


SEED_MAX = 2**31 - 1  # seeds are drawn in [0, SEED_MAX)


def draw_seed(generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw a 31-bit Philox seed as a 0-dim int64 CPU tensor from ``generator``, without device work.

    ``None`` uses torch's default CPU generator (seeded by ``torch.manual_seed``); a CPU generator
    gives ``torch.randint`` on the host. A CUDA generator keeps its state on the host too (initial seed
    and Philox offset, ``get_state``): the seed is a hash of that state and the offset advances by 4,
    as a one-value draw would, so there is no kernel and no device->host copy (a synchronization that
    would stall every training step). Either way "same generator state -> same noise" holds for the
    in-kernel noise of every op, as for ``torch.randn(..., generator=g)``, and consecutive draws
    differ. Ops take the seed as a tensor argument and read it inside the custom op
    (:func:`host_item`), so no ``.item()`` lands in a ``torch.compile`` graph.
    """
    check_generator(generator)
    if generator is None or generator.device.type == "cpu":
        seed = torch.randint(0, SEED_MAX, (), generator=generator, dtype=torch.int64)
    else:
        seed = torch.tensor(_seed_from_device_state(generator), dtype=torch.int64)
    return host_tensor(seed)


def _seed_from_device_state(generator: torch.Generator) -> int:
    """A seed from a device generator's host-side (seed, offset) state, advancing the offset by 4."""
    state = generator.get_state()  # a CPU uint8 tensor; CUDA: int64 seed, int64 Philox offset
    if state.numel() != 16:
        report_once(f"draw_seed:{generator.device.type}",
                    f"draw_seed: {generator.device.type} generators have no (seed, offset) state; the seed "
                    "is drawn on the device and copied to the host (a synchronization per draw)")
        return int(torch.randint(0, SEED_MAX, (), generator=generator, device=generator.device).item())
    seed, offset = host_tensor(state.view(torch.int64)).tolist()
    generator.set_state(torch.tensor([seed, offset + 4], dtype=torch.int64).view(torch.uint8))
    digest = hashlib.blake2b(f"vefast-seed,{seed},{offset}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % SEED_MAX


def reduction_scale(numel: int, batch: int, reduction: str) -> float:
    """Factor that turns an elementwise sum into the docs/math.md §1 reduction: 1/N ("mean") or 1/B ("sum")."""
    return 1.0 / max(numel, 1) if reduction == "mean" else 1.0 / max(batch, 1)
