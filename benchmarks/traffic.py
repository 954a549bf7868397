"""Bytes moved per fused op, against the op's minimal bytes (issue 9 §4); activation memory of a DiT block.

What is counted (``measure_traffic``), forward and backward separately:

- **Triton launches**: under ``TRITON_INTERPRET=1`` every ``tl.load`` / ``tl.store`` of a launch is recorded
  (address, mask, element size) and mapped to the storages of the launch's tensor arguments. A launch moves
  the *distinct* bytes it reads plus the distinct bytes it writes (``bytes``: a DRAM model where a value
  re-read by several programs of one launch comes from cache; a strided view counts the elements it
  addresses, a stride-0 input its distinct elements). The sum over all programs of every load and store is
  kept too (``accessed``: grid x tile bytes, what the programs pull through L2, re-reads included).
  Kernels with a tiling model (``KERNEL_MODELS``: the VF kernels, the separation kernel) are also
  predicted analytically; the model is checked against the recorded accesses at small sizes and then
  evaluated at the GPU launch configurations and at sizes the interpreter is too slow for
  (``execute=False`` records launches without running them: bytes then come from the model, from the
  argument slices of ``KERNEL_VIEWS``, or from the arguments' views). The gate and the table run the ops at
  realistic sizes that way; ``check_accounting`` compares both ways at tiny sizes.
- **aten ops** around the launches (a ``TorchDispatchMode``): inputs read plus outputs written of every
  outermost non-composite aten op (composite ops such as ``reshape`` / ``to`` / ``linear`` are expanded
  into what they run; views, allocations and metadata ops move 0 bytes; ``copy_`` / ``fill_`` do not read
  their destination). Custom ``vefast::`` ops are looked into. Ops inside a launch (the interpreter's own
  copies of the arguments) are not counted.
- **Attention core** (``core`` bytes, reported apart): the SDPA ops and the eager fallback of the attention
  math. For the attention ops the gated figure is what runs outside the core.

Minima (``Minimum`` of each ``OpCase``): the bytes an ideal implementation of the op must move (reads of
its inputs, writes of its outputs, once each; in-kernel noise is not read; scalars are left out), with a
one-line justification each. ``python -m benchmarks.traffic`` prints the table and writes
``benchmarks/results/traffic_cpu.json``; ``tests/test_traffic.py`` keeps every op within ``LIMIT`` of its
minimum. To add an op: append an ``OpCase`` to ``CASES`` (see the existing entries).
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # a script run: interpret the kernels (set before triton is imported); never on import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch._library.custom_ops import OPDEFS  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

LIMIT = 1.15  # every fused op within 1.15x of its minimal bytes, forward and backward
RESULTS = Path(__file__).resolve().parent / "results"


# ==============================================================================================
# bytes of a tensor view
# ==============================================================================================
def view_bytes(t: torch.Tensor) -> int:
    """Distinct bytes a view addresses: its elements, counting a stride-0 (broadcast) dim once."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


# ==============================================================================================
# records
# ==============================================================================================
@dataclasses.dataclass
class LaunchRecord:
    """One Triton launch: distinct bytes read / written, and every program's loads / stores summed."""

    kernel: str
    grid: tuple[int, ...]
    read: int = 0
    written: int = 0
    read_accessed: int = 0
    written_accessed: int = 0
    executed: bool = True
    core: bool = False
    per_arg: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # names -> [read, written]
    model: dict[str, int] | None = None  # a tiling model's prediction, when the kernel has one

    @property
    def bytes(self) -> int:
        return self.read + self.written

    @property
    def accessed(self) -> int:
        return self.read_accessed + self.written_accessed


@dataclasses.dataclass
class AtenRecord:
    op: str
    read: int
    written: int
    core: bool = False

    @property
    def bytes(self) -> int:
        return self.read + self.written


@dataclasses.dataclass
class Traffic:
    """Everything one measured call moved."""

    launches: list[LaunchRecord] = dataclasses.field(default_factory=list)
    aten: list[AtenRecord] = dataclasses.field(default_factory=list)

    @property
    def launch_bytes(self) -> int:
        return sum(r.bytes for r in self.launches if not r.core)

    @property
    def aten_bytes(self) -> int:
        return sum(r.bytes for r in self.aten if not r.core)

    @property
    def bytes(self) -> int:
        """Bytes moved outside the attention core: launches (distinct) + aten op I/O."""
        return self.launch_bytes + self.aten_bytes

    @property
    def core_bytes(self) -> int:
        return sum(r.bytes for r in self.aten if r.core) + sum(r.bytes for r in self.launches if r.core)

    @property
    def accessed(self) -> int:
        """As ``bytes`` with every program's loads and stores (re-reads inside a launch included)."""
        return sum(r.accessed for r in self.launches if not r.core) + self.aten_bytes

    def by_op(self, top: int = 8) -> list[tuple[str, int, int]]:
        """(name, count, bytes) of the heaviest aten ops and kernels, outside the core."""
        acc: dict[str, list[int]] = {}
        for r in self.aten:
            if not r.core and r.bytes:
                e = acc.setdefault(r.op, [0, 0])
                e[0] += 1
                e[1] += r.bytes
        for r in self.launches:
            if not r.core:
                e = acc.setdefault("triton:" + r.kernel, [0, 0])
                e[0] += 1
                e[1] += r.bytes
        rows = sorted(((k, c, b) for k, (c, b) in acc.items()), key=lambda x: -x[2])
        return rows[:top]

    def summary(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "launch_bytes": self.launch_bytes, "aten_bytes": self.aten_bytes,
                "accessed": self.accessed, "core_bytes": self.core_bytes,
                "launches": [{"kernel": r.kernel, "grid": list(r.grid), "read": r.read, "written": r.written,
                              "read_accessed": r.read_accessed, "written_accessed": r.written_accessed,
                              "executed": r.executed, **({"model": r.model} if r.model else {})}
                             for r in self.launches if not r.core],
                "aten_ops": sum(1 for r in self.aten if not r.core and r.bytes),
                "heaviest": [{"op": k, "count": c, "bytes": b} for k, c, b in self.by_op()]}


# ==============================================================================================
# the launch window: storages of a launch's arguments, and its recorded loads / stores
# ==============================================================================================
class _LaunchStorages:
    """The storages a launch's tensor arguments live in, with per-byte read / write marks."""

    def __init__(self, named: list[tuple[str, torch.Tensor]]):
        self.entries: dict[int, dict[str, Any]] = {}
        for name, t in named:
            st = t.untyped_storage()
            e = self.entries.setdefault(st.data_ptr(), {"nbytes": st.nbytes(), "names": [], "r": None, "w": None,
                                                        "views": []})
            e["names"].append(name)
            e["views"].append(t)
        self.bases = np.array(sorted(self.entries), dtype=np.int64)
        self.unmapped = 0

    def access(self, addrs: np.ndarray, elsize: int, write: bool, rec: LaunchRecord) -> None:
        if addrs.size == 0:
            return
        a = addrs.astype(np.int64, copy=False).reshape(-1)
        if write:
            rec.written_accessed += a.size * elsize
        else:
            rec.read_accessed += a.size * elsize
        idx = np.searchsorted(self.bases, a, side="right") - 1
        lo, hi = int(idx.min()), int(idx.max())
        for i in ([lo] if lo == hi else np.unique(idx).tolist()):
            if i < 0:
                self.unmapped += int((idx == i).sum()) * elsize
                continue
            base = int(self.bases[i])
            e = self.entries[base]
            off = a - base if lo == hi else a[idx == i] - base
            ok = (off >= 0) & (off + elsize <= e["nbytes"])
            if not ok.all():
                self.unmapped += int((~ok).sum()) * elsize
                off = off[ok]
            key = "w" if write else "r"
            if e[key] is None:
                e[key] = np.zeros(e["nbytes"], dtype=bool)
            e[key][(off[:, None] + np.arange(elsize)[None, :]).reshape(-1)] = True

    def finish(self, rec: LaunchRecord) -> None:
        for e in self.entries.values():
            r = int(e["r"].sum()) if e["r"] is not None else 0
            w = int(e["w"].sum()) if e["w"] is not None else 0
            rec.read += r
            rec.written += w
            if r or w:
                rec.per_arg["+".join(e["names"])] = [r, w]
        if self.unmapped:
            raise RuntimeError(f"{rec.kernel}: {self.unmapped} bytes accessed outside every tensor argument")

    def estimate(self, rec: LaunchRecord, fresh: set[int]) -> None:
        """Without executing: the union of the argument views on each storage, written when the storage
        was allocated in this recording and no launch has used it yet, else read."""
        for key, e in self.entries.items():
            b = _union_bytes(e["nbytes"], e["views"])
            if key in fresh:
                rec.written += b
                rec.written_accessed += b
            else:
                rec.read += b
                rec.read_accessed += b
            if b:
                rec.per_arg["+".join(e["names"])] = [0, b] if key in fresh else [b, 0]


def _union_bytes(nbytes: int, views: list[torch.Tensor]) -> int:
    """Distinct bytes of one storage that the given views address together."""
    if len(views) == 1:
        return view_bytes(views[0])
    marks = np.zeros(nbytes, dtype=bool)
    for v in views:
        if v.numel() == 0:
            continue
        e = v.element_size()
        if v.is_contiguous():
            marks[v.storage_offset() * e:(v.storage_offset() + v.numel()) * e] = True
            continue
        idx = torch.as_strided(torch.arange(nbytes // e), v.shape, v.stride(), v.storage_offset()).reshape(-1)
        off = idx.numpy() * e
        marks[(off[:, None] + np.arange(e)[None, :]).reshape(-1)] = True
    return int(marks.sum())


KernelModel = Callable[[dict[str, Any], tuple[int, ...]], dict[str, int]]
KERNEL_MODELS: dict[str, KernelModel] = {}  # kernel name -> tiling model (see the bottom of this section)
# kernel name -> {argument: the part of its view the kernel addresses}, for kernels that read a slice of an
# argument (the estimate of launches not executed uses these views instead of the arguments')
KERNEL_VIEWS: dict[str, Callable[[dict[str, Any]], dict[str, torch.Tensor]]] = {}

_ALLOC_OPS = {"empty", "empty_strided", "empty_permuted", "empty_like", "new_empty", "new_empty_strided"}
_ZERO_OPS = _ALLOC_OPS | {"set_", "resize_", "resize_as_", "sym_size", "sym_stride", "sym_numel",
                          "sym_storage_offset", "is_contiguous", "is_same_size", "record_stream"}
_NO_READ_OPS = {"zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "new_zeros", "new_ones",
                "new_full", "randn", "rand", "randint", "randn_like", "rand_like", "randint_like", "arange",
                "scalar_tensor", "eye", "linspace", "randperm", "lift_fresh_copy"}
_WRITE_ONLY_SELF = {"copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_",
                    "geometric_", "log_normal_", "cauchy_"}
_CORE_PREFIXES = ("_scaled_dot_product_", "_flash_attention", "_efficient_attention", "_cudnn_attention",
                  "scaled_dot_product_attention")


def _is_composite(func) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd")


class _Recorder(TorchDispatchMode):
    """Counts aten op I/O and Triton launch bytes while active (see the module docstring)."""

    def __init__(self, execute: bool = True):
        super().__init__()
        self.traffic = Traffic()
        self.execute = execute
        self.in_launch = 0
        self.core_depth = 0
        self.fresh: set[int] = set()  # storages allocated in this window and not yet used by a launch

    # ---- aten ops ------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.in_launch:
            return func(*args, **kwargs)
        if func.namespace not in ("aten", "prims", "prim"):
            opdef = OPDEFS.get(func._schema.name)
            if opdef is not None:  # a torch.library.custom_op: count what its implementation runs
                # (torch's private registry of custom ops; an op without one is counted by its I/O below)
                impl = opdef._backend_fns.get("cpu") or opdef._init_fn
                with self:
                    return impl(*args, **kwargs)
        elif _is_composite(func):
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        self._count(func, args, kwargs, out)
        return out

    def _count(self, func, args, kwargs, out) -> None:
        name = func._schema.name.split("::")[-1]
        outs = _tensors(out)
        if name in _ALLOC_OPS or name in _NO_READ_OPS:  # outputs a later launch will write (or read)
            self.fresh.update(_storage_key(o) for o in outs)
        if name in _ZERO_OPS:
            return
        write_only: set[int] = set()
        for i, a in enumerate(func._schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write and (a.kwarg_only or name in _WRITE_ONLY_SELF):
                v = kwargs.get(a.name, args[i] if i < len(args) and not a.kwarg_only else None)
                write_only.update(id(t) for t in _tensors(v))
        ins = [t for t in _tensors((args, kwargs)) if id(t) not in write_only]
        in_keys = {_storage_key(t) for t in ins}
        returns = func._schema.returns
        written, views = 0, 0
        for j, o in enumerate(outs):
            alias = returns[j].alias_info if j < len(returns) else None
            if _storage_key(o) in in_keys and (alias is None or not alias.is_write):
                views += 1  # a view of an input (view ops, _unsafe_view, detach, ...)
                continue
            written += view_bytes(o)
        if outs and views == len(outs):
            return
        read = 0 if name in _NO_READ_OPS or (not outs and name != "_local_scalar_dense") else \
            sum(view_bytes(t) for t in ins)
        self.traffic.aten.append(AtenRecord(str(func), read, written, core=self.core_depth > 0 or
                                            name.startswith(_CORE_PREFIXES)))

    # ---- Triton launches -------------------------------------------------------------------------
    @contextlib.contextmanager
    def launch(self, kernel: str, grid: tuple[int, ...], named: list[tuple[str, torch.Tensor]]):
        rec = LaunchRecord(kernel, grid, executed=self.execute, core=self.core_depth > 0)
        storages = _LaunchStorages(named)
        self.in_launch += 1
        try:
            yield rec, storages
        finally:
            self.in_launch -= 1
        if self.execute:
            storages.finish(rec)
        self.fresh.difference_update(storages.entries)
        self.traffic.launches.append(rec)

    @contextlib.contextmanager
    def core(self) -> Iterator[None]:
        """Everything inside is the attention core (reported apart from the op's own bytes)."""
        self.core_depth += 1
        try:
            yield
        finally:
            self.core_depth -= 1


_ACTIVE: list[_Recorder] = []


def _install_interpreter_hooks() -> Callable[[], None]:
    """Wrap the interpreter's grid executor and its load / store; returns the undo function."""
    from triton.runtime import interpreter as interp

    orig_call = interp.GridExecutor.__call__
    builder = interp.interpreter_builder
    orig_load, orig_store = builder.create_masked_load, builder.create_masked_store
    state: dict[str, Any] = {}

    def elsize(ptrs) -> int:
        return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)

    def addrs(ptrs, mask) -> np.ndarray:
        p = np.asarray(ptrs.data)
        m = np.broadcast_to(np.asarray(mask.data, dtype=bool), p.shape)
        return p[m]

    def load(ptrs, mask, other, *a, **k):
        if "cur" in state:
            state["st"].access(addrs(ptrs, mask), elsize(ptrs), False, state["cur"])
        return orig_load(ptrs, mask, other, *a, **k)

    def store(ptrs, value, mask, *a, **k):
        if "cur" in state:
            state["st"].access(addrs(ptrs, mask), elsize(ptrs), True, state["cur"])
        return orig_store(ptrs, value, mask, *a, **k)

    def call(self, *args_dev, **kwargs):
        if not _ACTIVE:
            return orig_call(self, *args_dev, **kwargs)
        recorder = _ACTIVE[-1]
        spec = inspect.getfullargspec(self.fn)
        bound = inspect.getcallargs(self.fn, *args_dev, **{k: v for k, v in kwargs.items() if k in spec.args})
        grid = self.grid(bound) if callable(self.grid) else self.grid
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        named = [(n, getattr(v, "base", v)) for n, v in bound.items()
                 if isinstance(getattr(v, "base", v), torch.Tensor)]
        if not recorder.execute and self.fn.__name__ in KERNEL_VIEWS:
            sliced = KERNEL_VIEWS[self.fn.__name__](bound)
            named = [(n, sliced.get(n, v)) for n, v in named]
        model = KERNEL_MODELS.get(self.fn.__name__)
        with recorder.launch(self.fn.__name__, grid, named) as (rec, storages):
            if model is not None:
                rec.model = model(bound, grid)
            if recorder.execute:
                state["cur"], state["st"] = rec, storages
                try:
                    return orig_call(self, *args_dev, **kwargs)
                finally:
                    state.pop("cur", None)
                    state.pop("st", None)
            elif rec.model is not None:
                rec.read = rec.model["read"]
                rec.written = rec.model["written"]
                rec.read_accessed = rec.model["read_accessed"]
                rec.written_accessed = rec.model["written_accessed"]
            else:
                storages.estimate(rec, recorder.fresh)

    interp.GridExecutor.__call__ = call
    builder.create_masked_load = load
    builder.create_masked_store = store

    def undo() -> None:
        interp.GridExecutor.__call__ = orig_call
        builder.create_masked_load = orig_load
        builder.create_masked_store = orig_store

    return undo


def interpret_ok() -> bool:
    """Whether Triton kernels are interpreted here (the only mode the recorder works in)."""
    from vefast.ops import _common

    return _common.interpret_mode()


@contextlib.contextmanager
def recording(execute: bool = True) -> Iterator[_Recorder]:
    """Record every aten op and Triton launch inside (one recording at a time)."""
    if _ACTIVE:
        raise RuntimeError("measure_traffic: recordings do not nest")
    from vefast.ops import _common

    if not _common.interpret_mode():
        raise RuntimeError("measure_traffic needs TRITON_INTERPRET=1 (set before triton is imported)")
    undo = _install_interpreter_hooks()
    rec = _Recorder(execute)
    _ACTIVE.append(rec)
    try:
        with rec:
            yield rec
    finally:
        _ACTIVE.pop()
        undo()


def measure_traffic(fn: Callable[..., Any], *args: Any, execute: bool = True, **kwargs: Any) -> tuple[Any, Traffic]:
    """Run ``fn(*args, **kwargs)`` and return (its result, the ``Traffic`` it made).

    ``execute=False`` records the Triton launches without running them (outputs stay uninitialized;
    bytes from the kernel's tiling model, else from its arguments' views)."""
    with recording(execute) as rec:
        out = fn(*args, **kwargs)
    return out, rec.traffic


@contextlib.contextmanager
def attention_core_marked() -> Iterator[None]:
    """Mark the eager attention math of ``vefast.ops.attention``'s fallback as the attention core."""
    from vefast.ops import attention as att

    saved = {}
    for name in ("_fallback_fwd", "_attention_bwd_math"):
        fn = getattr(att, name, None)
        if fn is None:
            continue
        saved[name] = fn

        def wrapped(*a, __fn=fn, **k):
            if not _ACTIVE:
                return __fn(*a, **k)
            with _ACTIVE[-1].core():
                return __fn(*a, **k)
        setattr(att, name, wrapped)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(att, name, fn)


# ==============================================================================================
# tiling models of the kernels that re-read tiles (grid x tile bytes, masks included)
# ==============================================================================================
def _spans(total: int, block: int) -> list[int]:
    """Valid lengths of the consecutive tiles of ``block`` covering ``total``."""
    return [min(block, total - s) for s in range(0, total, block)]


def vf_fwd_model(B: int, N: int, D: int, C: int, K: int, z_bytes: int, f_bytes: int, w_bytes: int, BM: int,
                 BN: int, BK: int, with_grad: bool) -> dict[str, int]:
    """``_vf_fwd_kernel``: program (i-tile, b) loads P (K, C) fp32 and z_i (BM, C) once; in the prologue, per
    k step, f_i (BM, BK) and W (BK, C); per j-tile z_j (BN, C) and per (j, k) step f_i and f_j (BK, BN) in the
    features' dtype. It stores two fp32 partials and, with the gradient, W^T f_i (BM, C), 1/||f_i|| and cos_i
    (BM,) and gu_i (BM, K) fp32. Distinct: z, f, W, P once, the partials and the saved tensors."""
    rd = wr = 0
    for m in _spans(N, BM):
        rd += K * C * 4 + m * C * z_bytes
        for k in _spans(D, BK):
            rd += m * k * f_bytes + k * C * w_bytes
        for n in _spans(N, BN):
            rd += n * C * z_bytes
            for k in _spans(D, BK):
                rd += (m * k + k * n) * f_bytes
        wr += 8 + (m * (C + 2 + K) * 4 if with_grad else 0)
    parts = math.ceil(N / BM)
    return {"read_accessed": B * rd, "written_accessed": B * wr,
            "read": B * N * (C * z_bytes + D * f_bytes) + D * C * w_bytes + K * C * 4,
            "written": B * parts * 8 + (B * N * (C + 2 + K) * 4 if with_grad else 0)}


def vf_bwd_model(B: int, N: int, D: int, C: int, K: int, z_bytes: int, f_bytes: int, BD: int, BT: int,
                 BPG: int) -> dict[str, int]:
    """``_vf_bwd_kernel``: program (d-tile, batch group) loads P (K, C) and the two upstream gradients once;
    per token tile of each of its BPG batch items z (BT, C), gu (BT, K), 1/||f|| and cos (BT,) fp32 and f
    (BD, BT); the d-tile 0 programs also W^T f (BT, C) fp32 and store dz (BT, C); at the end Q (BD, K) and
    the fp32 partial dW (BD, C). Distinct: every input once, dz and the partials."""
    groups = math.ceil(B / BPG)
    rd = wr = 0
    for di, dd in enumerate(_spans(D, BD)):
        for grp in range(groups):
            rd += K * C * 4 + 8 + dd * K * 4
            wr += dd * C * 4
            for b in range(grp * BPG, min(B, (grp + 1) * BPG)):
                for t in _spans(N, BT):
                    rd += t * (C * z_bytes + K * 4 + 8 + dd * f_bytes)
                    if di == 0:
                        rd += t * C * 4
                        wr += t * C * z_bytes
    return {"read_accessed": rd, "written_accessed": wr,
            "read": B * N * (C * z_bytes + K * 4 + 8 + D * f_bytes + C * 4) + K * C * 4 + 8 + D * K * 4,
            "written": B * N * C * z_bytes + groups * D * C * 4}


def _vf_fwd_from_args(a: dict[str, Any], grid: tuple[int, ...]) -> dict[str, int]:
    z, f, w = a["z_ptr"], a["f_ptr"], a["w_ptr"]
    B, C, N = z.shape
    return vf_fwd_model(B, N, int(a["D"]), C, int(a["KP"]), z.element_size(), f.element_size(), w.element_size(),
                        int(a["BLOCK_M"]), int(a["BLOCK_N"]), int(a["BLOCK_K"]), bool(a["WITH_GRAD"]))


def _vf_bwd_from_args(a: dict[str, Any], grid: tuple[int, ...]) -> dict[str, int]:
    z, f = a["z_ptr"], a["f_ptr"]
    B, C, N = z.shape
    return vf_bwd_model(B, N, int(a["D"]), C, int(a["KP"]), z.element_size(), f.element_size(), int(a["BLOCK_D"]),
                        int(a["BLOCK_T"]), int(a["BPG"]))


def separation_model(M: int, K: int, R: int, BL: int, BJ: int, chunks: int, active: float = 1.0) -> dict[str, int]:
    """``_separation_kernel``: program (chunk, r) loads r, then for each of its units (data row i, l-block)
    P[l-block, i], pmax[l-block], min_dist[i]; an active unit (a fraction ``active`` of them; 1 = no one-hot
    row skipped) then streams the logits tiles (D[i, j-tile] and P[l-block, j-tile]) once in pass 1; in
    pass 2, per k-tile: the logits tile, gd[k-tile], and for every j-tile j <= k the logits tile and the
    D[j-tile, k-tile] tile (the upper triangle of D, re-read by every unit), after gd[i]. Stores one fp32
    partial per program. Distinct: D, P and the vectors once, the partials."""
    jt = _spans(M, BJ)
    lblocks = _spans(K, BL)
    rd = 0.0
    for lb in lblocks:
        head = lb * 4 + lb * 4 + 4
        logits = [j + lb * j for j in jt]  # elements of one logits tile (a D row piece + a P tile)
        body = sum(logits) + 1  # pass 1, then gd[i]
        for ki, k in enumerate(jt):
            body += logits[ki] + k + sum(logits[ji] + jt[ji] * k for ji in range(ki + 1))
        rd += M * R * (head + active * body * 4)
    rd += R * chunks * 4  # r, once per program
    return {"read_accessed": int(rd), "written_accessed": R * chunks * 4,
            "read": (M * M + K * M + 2 * M + K) * 4 + R * 4, "written": R * chunks * 4}


def _separation_from_args(a: dict[str, Any], grid: tuple[int, ...]) -> dict[str, int]:
    M, K = int(a["M"]), int(a["K"])
    return separation_model(M, K, grid[1], int(a["BLOCK_L"]), int(a["BLOCK_J"]), grid[0])


KERNEL_MODELS["_vf_fwd_kernel"] = _vf_fwd_from_args
KERNEL_MODELS["_vf_bwd_kernel"] = _vf_bwd_from_args
KERNEL_MODELS["_separation_kernel"] = _separation_from_args


def _unused(a: dict[str, Any], flags: dict[str, bool]) -> dict[str, torch.Tensor]:
    """Empty views for the arguments whose flag is off (dummy pointers the kernel never dereferences)."""
    return {name: a[name][:0] for name, on in flags.items() if not on and isinstance(a.get(name), torch.Tensor)}


def _qk_views(a: dict[str, Any], backward: bool) -> dict[str, torch.Tensor]:
    """The q/k prologue (vefast.ops.qk_prologue) reads the q and k slots of the packed qkv, never v."""
    w, rope = bool(a["HAS_W"]), bool(a["HAS_ROPE"])
    flags = {"QW": w, "KW": w, "COS": rope, "SIN": rope}
    if backward:
        flags.update(DV=bool(a["HAS_DV"]), PART=int(a["NORM"]) != 0)
    else:
        flags.update(QB=bool(a["HAS_B"]), KB=bool(a["HAS_B"]))
    return {"QKV": a["QKV"][:, :, :2], **_unused(a, flags)}


KERNEL_VIEWS["_qk_fwd_kernel"] = lambda a: _qk_views(a, False)
KERNEL_VIEWS["_qk_bwd_kernel"] = lambda a: _qk_views(a, True)


# ==============================================================================================
# per-op cases and their minima
# ==============================================================================================
@dataclasses.dataclass
class Minimum:
    fwd: int
    bwd: int | None
    why_fwd: str
    why_bwd: str = ""


@dataclasses.dataclass
class Setup:
    """What one case runs: ``forward(**inputs)``; backward = ``autograd.grad`` of ``grads(out)``'s
    (output, gradient) pairs w.r.t. the inputs that require a gradient."""

    inputs: dict[str, Any]
    forward: Callable[..., Any]
    grads: Callable[[Any], list[tuple[torch.Tensor, torch.Tensor]]] | None
    minimum: Minimum
    shape: str


@dataclasses.dataclass
class OpCase:
    """One row of the table: ``make(size)`` builds the Setup for ``size``: "full" (realistic shapes; the
    gate and the table, launches recorded without executing) or "tiny" (executed under the interpreter,
    checking the launch accounting of the "full" runs)."""

    name: str
    make: Callable[[str], Setup]
    over: str = ""  # why the op is above LIMIT today (and whose fix it is); empty when it is within
    core: bool = False  # the op has an attention core, reported apart


def nb(*ts: torch.Tensor | None) -> int:
    """Sum of the view bytes of the given tensors (None ignored)."""
    return sum(view_bytes(t) for t in ts if t is not None)


def _randn(*shape: int, dtype=torch.float32, grad: bool = False, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(grad)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _scalar_grad(t: torch.Tensor) -> torch.Tensor:
    return torch.ones((), dtype=t.dtype)


# ---- reparameterization (VE / KL) and the distribution ------------------------------------------
def _latent_shape(size: str) -> tuple[int, ...]:
    return (2, 32, 8, 8) if size == "tiny" else (32, 32, 32, 32)


def _reparam_case(kind: str, *, noise: bool = False, moments: bool = False, dtype=torch.float32) -> Callable:
    def make(size: str) -> Setup:
        from vefast.ops import reparam

        g = _gen()
        shape = _latent_shape(size)
        if moments:
            x = _randn(shape[0], 2 * shape[1], *shape[2:], dtype=dtype, grad=True, gen=g)
            inputs = {"moments": x}
        else:
            inputs = {"mean": _randn(*shape, dtype=dtype, grad=True, gen=g),
                      "logvar": _randn(*shape, dtype=dtype, grad=True, gen=g)}
        if noise:
            inputs["noise"] = _randn(*shape, dtype=dtype, gen=g)
        fn = {("ve", False): reparam.ve_loss, ("kl", False): reparam.kl_loss,
              ("ve", True): reparam.ve_loss_from_moments, ("kl", True): reparam.kl_loss_from_moments}[kind, moments]
        dz = torch.randn(shape, generator=g, dtype=dtype)

        def grads(out):
            return [(out.z, dz), (out.loss, _scalar_grad(out.loss))]
        n, extra = nb(dz), int(noise)  # explicit noise: one more read each way
        src = "noise read" if noise else "noise regenerated in-kernel, not read"
        m = Minimum(n * (3 + extra), n * (5 + extra),
                    f"read mean, logvar, write z ({src})", f"read mean, logvar, dz, write dmean, dlogvar ({src})")
        return Setup(inputs, fn, grads, m, f"{tuple(shape)} {str(dtype)[6:]}")
    return make


def _distribution_case(method: str) -> Callable:
    def make(size: str) -> Setup:
        from vefast.nn import DiagonalGaussianDistribution

        g = _gen()
        shape = _latent_shape(size)
        moments = _randn(shape[0], 2 * shape[1], *shape[2:], grad=True, gen=g)
        dz = torch.randn(shape, generator=g)

        def forward(moments):
            post = DiagonalGaussianDistribution(moments)
            return post.sample() if method == "sample" else getattr(post, method)()

        def grads(out):
            if method == "sample":
                return [(out, dz)]
            return [(out.z, dz), (out.loss, _scalar_grad(out.loss))]
        n = nb(dz)
        m = Minimum(3 * n, 5 * n, "read moments (mean, logvar halves), write z (in-kernel noise)",
                    "read moments, dz, write d moments (one buffer)")
        return Setup({"moments": moments}, forward, grads, m, f"moments {(shape[0], 2 * shape[1], *shape[2:])}")
    return make


# ---- alignment losses ------------------------------------------------------------------------
def _align_case(repa: bool) -> Callable:
    def make(size: str) -> Setup:
        from vefast.ops import align_loss as al

        g = _gen()
        shape = (2, 16, 768) if size == "tiny" else (32, 256, 768)
        pred = _randn(*shape, grad=True, gen=g)
        target = _randn(*shape, gen=g)

        def forward(pred, target):
            return al.repa_loss(pred, target) if repa else al.align_loss(pred, target).loss

        def grads(out):
            return [(out, _scalar_grad(out))]
        n = nb(pred)
        m = Minimum(2 * n, 3 * n, "read pred, target (frozen features)", "read pred, target, write dpred")
        return Setup({"pred": pred, "target": target}, forward, grads, m, f"{shape} fp32")
    return make


def _vf_case(size: str) -> Setup:
    from vefast.ops import vf_loss as vf

    g = _gen()
    B, C, h, D = (2, 32, 4, 64) if size == "tiny" else (32, 32, 16, 1024)
    z = _randn(B, C, h, h, grad=True, gen=g)
    feats = _randn(B, D, h, h, gen=g)
    w = (0.1 * torch.randn(D, C, generator=g)).requires_grad_(True)

    def forward(z, features, w):
        return vf.vf_loss(z, features, w).loss

    def grads(out):
        return [(out, _scalar_grad(out))]
    m = Minimum(nb(z, feats, w), nb(feats) + 2 * nb(z, w),
                "read z, features, W once (the pair and cosine terms need only these)",
                "read features (dW of the cosine term is f times a (B, N, C) factor), z, W, write dz, dW")
    return Setup({"z": z, "features": feats, "w": w}, forward, grads, m, f"z {(B, C, h, h)}, f {(B, D, h, h)} fp32")


# ---- timestep sampler, separation ---------------------------------------------------------------
def _timestep_case(size: str) -> Setup:
    from vefast.ops import timestep_sample as ts

    n = 1 << 14 if size == "tiny" else 1 << 20
    table = torch.linspace(0.0, 1.0, 1025)
    seed = torch.tensor(1234)

    def forward(table, seed):
        return ts.timestep_sample(table, n, seed=seed)
    m = Minimum(4 * n, None, "write n fp32 timesteps (Philox uniforms in-kernel, the table read once)")
    m.fwd += nb(table)
    return Setup({"table": table, "seed": seed}, forward, None, m, f"n={n}, table 1025")


def _separation_case(size: str) -> Setup:
    from vefast.ops import separation as sep

    g = _gen()
    M, K, d, R = (40, 20, 16, 1) if size == "tiny" else (200, 500, 64, 64)  # tiny: 2 j-tiles, a masked l-block
    x = torch.randn(M, d, generator=g, dtype=torch.float64)
    e = torch.randn(K, d, generator=g, dtype=torch.float64)
    # the kernel's fp32 operands, built once per separation_function call from the float64 Gram statistics
    # (one cast-and-copy pass per tensor, O(M^2 + K M), shared by every r)
    ks = sep.kernel_stats(sep.gram_stats(x, e))
    # small SNRs: no unit takes the one-hot skip, so the tiling model (every unit active) is exact
    snr = torch.logspace(-1.5, -1, R, dtype=torch.float32)

    def forward(ks, snr):
        return sep.separation_complement_triton(sep.KernelStats(*ks), snr)
    m = Minimum(4 * (M * M + K * M + 2 * M + K) + 4 * R + 8 * R, None,
                "read D (M, M), P (K, M), diag(G), min_j D_ij, max_j P_lj and r once in fp32, write C(r) (R,) "
                "float64")
    return Setup({"ks": list(ks), "snr": snr}, forward, None, m, f"M={M}, K={K}, R={R} (fp32 kernel operands in)")


# ---- DiT block ops -------------------------------------------------------------------------------
def _dit_shape(size: str) -> tuple[int, int, int]:
    return (2, 16, 96) if size == "tiny" else (32, 256, 1152)


def _modulation(B: int, D: int, parts: int, g: torch.Generator) -> list[torch.Tensor]:
    """Chunks of one (B, parts * D) adaLN output, as the blocks pass them (strided views)."""
    ada = torch.randn(B, parts * D, generator=g).requires_grad_(True)
    return list(ada.chunk(parts, dim=1))


def _norm_modulate_case(norm: str, shift: bool, weight: bool) -> Callable:
    def make(size: str) -> Setup:
        from vefast.ops import norm_modulate as nm

        g = _gen()
        B, N, D = _dit_shape(size)
        x = _randn(B, N, D, grad=True, gen=g)
        sh, sc = _modulation(B, D, 2, g)
        w = torch.ones(D).requires_grad_(True) if weight else None
        dout = torch.randn(B, N, D, generator=g)

        def forward(x, shift, scale, weight):
            return nm.norm_modulate(x, shift, scale, norm=norm, weight=weight)

        def grads(out):
            return [(out, dout)]
        m = Minimum(2 * nb(x) + nb(sh if shift else None, sc, w), 3 * nb(x) + 2 * nb(sh if shift else None, sc, w),
                    "read x, write out (+ the modulation vectors once)",
                    "read dout, x, write dx (+ the vectors and their gradients once)")
        return Setup({"x": x, "shift": sh if shift else None, "scale": sc, "weight": w}, forward, grads, m,
                     f"{(B, N, D)} fp32")
    return make


def _gated_residual_case(fused_norm: str | None, *, shift: bool = True, weight: bool = False,
                         dh: bool = True) -> Callable:
    def make(size: str) -> Setup:
        from vefast.ops import gated_residual as gr

        g = _gen()
        B, N, D = _dit_shape(size)
        x = _randn(B, N, D, grad=True, gen=g)
        y = _randn(B, N, D, grad=True, gen=g)
        gate, sh, sc = _modulation(B, D, 3, g)
        w = torch.ones(D).requires_grad_(True) if weight else None
        g_h, g_out = torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g)
        vec = nb(gate)
        if fused_norm is None:
            def forward(x, y, gate):
                return gr.gated_residual(x, y, gate)

            def grads(out):
                return [(out, g_h)]
            m = Minimum(3 * nb(x) + vec, 3 * nb(x) + 2 * vec, "read x, y, write h (+ gate once)",
                        "read dh, y, write dy; dx = dh is passed through (+ gate, dgate)")
            return Setup({"x": x, "y": y, "gate": gate}, forward, grads, m, f"{(B, N, D)} fp32")

        def forward(x, y, gate, shift, scale, weight):
            return gr.gated_residual_norm_modulate(x, y, gate, shift=shift, scale=scale, norm=fused_norm, weight=weight)

        def grads(out):
            return ([(out.residual, g_h)] if dh else []) + [(out.modulated, g_out)]
        vecs = nb(gate, sh if shift else None, sc, w)
        m = Minimum(4 * nb(x) + vecs, (6 if dh else 5) * nb(x) + 2 * vecs,
                    "read x, y, write h, out (+ vectors once)",
                    f"read {'dh, ' if dh else ''}dout, h, y, write dx, dy (+ vectors and their gradients once)")
        return Setup({"x": x, "y": y, "gate": gate, "shift": sh if shift else None, "scale": sc, "weight": w},
                     forward, grads, m, f"{(B, N, D)} fp32")
    return make


def _swiglu_case(size: str) -> Setup:
    from vefast.ops import swiglu as sw

    g = _gen()
    B, N, H = (2, 16, 96) if size == "tiny" else (32, 256, 3072)
    x12 = _randn(B, N, 2 * H, grad=True, gen=g)
    dout = torch.randn(B, N, H, generator=g)

    def grads(out):
        return [(out, dout)]
    m = Minimum(nb(x12) + nb(dout), 2 * nb(x12) + nb(dout), "read x12, write out",
                "read dout, x12, write dx12 (one buffer)")
    return Setup({"x12": x12}, sw.swiglu, grads, m, f"x12 {tuple(x12.shape)} fp32")


def _attention_case(size: str) -> Setup:
    from vefast.ops import attention as att
    from vefast.ops.rope import rope_2d_freqs

    g = _gen()
    B, N, H, hd = (1, 16, 2, 72) if size == "tiny" else (8, 256, 16, 72)  # B = 8: the core runs on the CPU
    qkv = _randn(B, N, 3, H, hd, grad=True, gen=g)
    qw = torch.ones(hd).requires_grad_(True)
    kw = torch.ones(hd).requires_grad_(True)
    cos, sin = rope_2d_freqs(hd, int(math.isqrt(N)))
    dout = torch.randn(B, N, H, hd, generator=g)

    def forward(qkv, qw, kw):
        return att.qk_norm_rope_attention(qkv, qw, kw, (cos, sin))

    def grads(out):
        return [(out, dout)]
    unit = nb(dout)
    m = Minimum(4 * unit + nb(cos, sin), 8 * unit + nb(cos, sin),
                "outside the core: read q, k of qkv, write normalized + rotated q, k (v is read in place)",
                "outside the core: read dq, dk, dv, q, k, write dqkv (one buffer)")
    return Setup({"qkv": qkv, "qw": qw, "kw": kw}, forward, grads, m, f"qkv {(B, N, 3, H, hd)} fp32")


CASES: list[OpCase] = [
    OpCase("ve_loss", _reparam_case("ve")),
    OpCase("ve_loss(noise)", _reparam_case("ve", noise=True)),
    OpCase("ve_loss_from_moments", _reparam_case("ve", moments=True)),
    OpCase("kl_loss", _reparam_case("kl")),
    OpCase("kl_loss_from_moments", _reparam_case("kl", moments=True)),
    OpCase("DiagonalGaussian.sample", _distribution_case("sample")),
    OpCase("DiagonalGaussian.ve", _distribution_case("ve")),
    OpCase("DiagonalGaussian.kl_loss", _distribution_case("kl_loss")),
    OpCase("align_loss", _align_case(False)),
    OpCase("repa_loss", _align_case(True)),
    OpCase("vf_loss", _vf_case),
    OpCase("timestep_sample", _timestep_case),
    OpCase("separation(kernel part)", _separation_case),
    OpCase("norm_modulate(layernorm)", _norm_modulate_case("layernorm", True, False)),
    OpCase("norm_modulate(rmsnorm,weight)", _norm_modulate_case("rmsnorm", True, True)),
    OpCase("norm_modulate(rmsnorm,no shift)", _norm_modulate_case("rmsnorm", False, True)),
    OpCase("gated_residual", _gated_residual_case(None)),
    OpCase("gated_residual+layernorm", _gated_residual_case("layernorm")),
    OpCase("gated_residual+rmsnorm,weight", _gated_residual_case("rmsnorm", weight=True)),
    OpCase("gated_residual+rmsnorm,no shift", _gated_residual_case("rmsnorm", shift=False, weight=True)),
    OpCase("gated_residual+layernorm,no dh", _gated_residual_case("layernorm", dh=False)),
    OpCase("swiglu", _swiglu_case),
    OpCase("qk_norm_rope_attention", _attention_case, core=True),
]


def case(name: str) -> OpCase:
    for c in CASES:
        if c.name == name:
            return c
    raise KeyError(name)


def _wrt(inputs: dict[str, Any]) -> list[torch.Tensor]:
    """Leaf tensors that require a gradient (a chunk of one requires it through its base)."""
    out, seen = [], set()
    for v in _tensors(inputs):
        leaf = v if v.is_leaf else v._base
        if leaf is not None and leaf.requires_grad and id(leaf) not in seen:
            seen.add(id(leaf))
            out.append(leaf)
    return out


def _measure(s: Setup, execute: bool) -> tuple[Traffic, Traffic | None]:
    out, fwd = measure_traffic(lambda: s.forward(**s.inputs), execute=execute)
    if s.grads is None:
        return fwd, None
    pairs = s.grads(out)
    _, bwd = measure_traffic(lambda: torch.autograd.grad([o for o, _ in pairs], _wrt(s.inputs),
                                                         [g for _, g in pairs], allow_unused=True), execute=execute)
    return fwd, bwd


def run_case(c: OpCase, size: str = "full", execute: bool | None = None) -> dict[str, Any]:
    """Forward and backward traffic of one case against its minimum (``execute`` defaults to size == "tiny")."""
    s = c.make(size)
    with attention_core_marked() if c.core else contextlib.nullcontext():
        fwd, bwd = _measure(s, size == "tiny" if execute is None else execute)
    row: dict[str, Any] = {"op": c.name, "shape": s.shape, "over_reason": c.over,
                           "fwd": {**fwd.summary(), "min": s.minimum.fwd, "why_min": s.minimum.why_fwd,
                                   "ratio": fwd.bytes / s.minimum.fwd}}
    if bwd is not None:
        row["bwd"] = {**bwd.summary(), "min": s.minimum.bwd, "why_min": s.minimum.why_bwd,
                      "ratio": bwd.bytes / s.minimum.bwd}
    return row


def check_accounting(c: OpCase) -> dict[str, Any]:
    """The case at its "tiny" size, executed and not: launch bytes recorded from the kernels' loads and
    stores vs. the estimate (argument views or tiling model) that the "full" runs use."""
    s = c.make("tiny")
    res: dict[str, Any] = {"op": c.name, "shape": s.shape}
    with attention_core_marked() if c.core else contextlib.nullcontext():
        runs = [_measure(s, True), _measure(s, False)]
    for i, d in enumerate(("fwd", "bwd")):
        ran, est = runs[0][i], runs[1][i]
        if ran is None:
            continue
        res[d] = {"executed_launch_bytes": ran.launch_bytes, "estimated_launch_bytes": est.launch_bytes,
                  "executed_accessed": sum(r.accessed for r in ran.launches if not r.core),
                  "aten_bytes": [ran.aten_bytes, est.aten_bytes],
                  "per_launch": [[r.kernel, r.bytes, e.bytes] for r, e in zip(ran.launches, est.launches)],
                  "models": [[r.kernel, r.model, {"read": r.read, "written": r.written, "read_accessed":
                              r.read_accessed, "written_accessed": r.written_accessed}]
                             for r in ran.launches if r.model]}
    return res


# ==============================================================================================
# one LightningDiT-XL/1 block: bytes moved and bytes saved for backward
# ==============================================================================================
def _block(fused: bool, width: int, heads: int, grid: int):
    from vefast.models.lightningdit import LightningDiTBlock, VisionRotaryEmbeddingFast
    from vefast.nn.dit_modules import FusedDiTBlock

    torch.manual_seed(0)
    blk = LightningDiTBlock(width, heads, use_qknorm=True, use_swiglu=True, use_rmsnorm=True)
    for p in blk.parameters():  # adaLN-Zero is initialized to 0 in the model; give every path gradients
        torch.nn.init.normal_(p, std=0.02)
    rope = VisionRotaryEmbeddingFast(width // heads // 2, grid)
    return (FusedDiTBlock(blk) if fused else blk), rope


def saved_bytes(fn: Callable[[], Any], params: Sequence[torch.Tensor]) -> tuple[Any, int, int]:
    """(result, bytes, tensors) of the distinct storages autograd saves for backward while ``fn`` runs,
    parameters excluded."""
    pkeys = {_storage_key(p) for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        k = _storage_key(t)
        if k not in pkeys and t.device.type != "meta":
            seen[k] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values()), len(seen)


def measure_block(variant: str, *, B: int = 1, N: int = 256, width: int = 1152, heads: int = 16,
                  execute: bool = True) -> dict[str, Any]:
    """fwd + bwd bytes (launches + aten I/O, attention core apart) and saved bytes per token of one block.

    ``variant``: "fused" (vefast.nn.patch_lightningdit's FusedDiTBlock), "eager" (LightningDiTBlock), or
    "eager+checkpoint" (torch.utils.checkpoint, non-reentrant, as LightningDiT's ``use_checkpoint``).
    ``execute=False``: Triton launches recorded without running (estimated bytes)."""
    blk, rope = _block(variant == "fused", width, heads, int(math.isqrt(N)))
    g = _gen()
    x = torch.randn(B, N, width, generator=g).requires_grad_(True)
    c = torch.randn(B, width, generator=g).requires_grad_(True)
    dout = torch.randn(B, N, width, generator=g)
    params = list(blk.parameters())

    def forward():
        if variant == "eager+checkpoint":
            return torch.utils.checkpoint.checkpoint(blk, x, c, rope, use_reentrant=False)
        return blk(x, c, rope)

    with attention_core_marked():
        (out, n_saved, n_tensors), fwd = measure_traffic(lambda: saved_bytes(forward, params), execute=execute)
        _, bwd = measure_traffic(lambda: torch.autograd.backward([out], [dout]), execute=execute)
    tokens = B * N
    res = {"variant": variant, "B": B, "N": N, "width": width, "heads": heads,
           "saved_bytes_per_token": n_saved / tokens, "saved_tensors": n_tensors}
    for name, t in (("fwd", fwd), ("bwd", bwd)):
        gemm = sum(r.bytes for r in t.aten if not r.core and r.op.split(".")[1] in ("addmm", "mm", "bmm"))
        res[name] = {"bytes_per_token": t.bytes / tokens, "core_bytes_per_token": t.core_bytes / tokens,
                     "gemm_bytes_per_token": gemm / tokens, "launch_bytes_per_token": t.launch_bytes / tokens,
                     "launches": len(t.launches), "heaviest": [{"op": k, "count": n, "bytes": b}
                                                               for k, n, b in t.by_op(10)]}
    res["total_bytes_per_token"] = res["fwd"]["bytes_per_token"] + res["bwd"]["bytes_per_token"]
    res["total_with_core_per_token"] = res["total_bytes_per_token"] + (
        res["fwd"]["core_bytes_per_token"] + res["bwd"]["core_bytes_per_token"])
    return res


# ==============================================================================================
# the table
# ==============================================================================================
def _fmt(n: float) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= f:
            return f"{n / f:.2f} {unit}"
    return f"{n:.0f} B"


def print_table(rows: list[dict[str, Any]], file=sys.stdout) -> None:
    print(f"{'op':34s} {'shape':34s} {'fwd':>10s} {'min':>10s} {'x':>5s}  {'bwd':>10s} {'min':>10s} {'x':>5s}",
          file=file)
    for r in rows:
        f, b = r["fwd"], r.get("bwd")
        line = f"{r['op']:34s} {r['shape'][:34]:34s} {_fmt(f['bytes']):>10s} {_fmt(f['min']):>10s} {f['ratio']:5.2f}"
        if b:
            line += f"  {_fmt(b['bytes']):>10s} {_fmt(b['min']):>10s} {b['ratio']:5.2f}"
        if r["over_reason"]:
            line += "  (over: see over_reason)"
        print(line, file=file)


def gpu_model_predictions() -> dict[str, Any]:
    """The tiled kernels' re-reads at their GPU launch configurations (the interpreter runs other tiles)."""
    from vefast.ops import separation as sep
    from vefast.ops import vf_loss as vf

    out: dict[str, Any] = {"vf_fwd": [], "vf_bwd": [], "separation": []}
    for B, N, D in ((32, 256, 1024), (32, 1024, 1024)):  # bf16 features, fp32 z and W, C = k = 32
        shape = {"B": B, "N": N, "D'": D, "C": 32, "features": "bf16"}
        for cfg in vf._gpu_configs():
            kw = cfg.kwargs
            m = vf_fwd_model(B, N, D, 32, 32, 4, 2, 4, kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], True)
            out["vf_fwd"].append({**shape, **kw, "reread_factor": m["read_accessed"] / m["read"], **m})
        per = vf._bwd_grid_groups(B)[0]
        for cfg in vf._gpu_configs(backward=True):
            kw = cfg.kwargs
            m = vf_bwd_model(B, N, D, 32, 32, 4, 2, kw["BLOCK_D"], kw["BLOCK_T"], per)
            out["vf_bwd"].append({**shape, **kw, "batch_per_group": per,
                                  "reread_factor": m["read_accessed"] / m["read"], **m})
    for M, K, R in ((200, 500, 64), (1000, 500, 64)):
        bl, bj = sep._block_sizes(M, K)
        chunks = sep._chunks(M * -(-K // bl), R)
        m = separation_model(M, K, R, bl, bj, chunks)
        out["separation"].append({"M": M, "K": K, "R": R, "BLOCK_L": bl, "BLOCK_J": bj, "programs": chunks * R,
                                  "reread_factor": m["read_accessed"] / m["read"], **m})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from benchmarks.harness import environment

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=("full", "tiny"), default="full")
    ap.add_argument("--no-check", action="store_true", help="skip the executed tiny-size accounting checks")
    ap.add_argument("--only", nargs="*", help="case names to run")
    ap.add_argument("--no-block", action="store_true", help="skip the DiT block measurement")
    ap.add_argument("--out", default=str(RESULTS / "traffic_cpu.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    rows = []
    for c in CASES:
        if a.only and c.name not in a.only:
            continue
        rows.append(run_case(c, a.size))
        if not a.no_check:
            rows[-1]["accounting_check"] = check_accounting(c)
        print_table(rows[-1:])
        sys.stdout.flush()
    blocks = []
    if not a.no_block:
        for variant in ("fused", "eager", "eager+checkpoint"):
            blocks.append(measure_block(variant, B=2))
            r = blocks[-1]
            print(f"block {variant:17s} fwd+bwd {_fmt(r['total_bytes_per_token'])}/token outside the attention core "
                  f"(+{_fmt(r['total_with_core_per_token'] - r['total_bytes_per_token'])} core), saved for backward "
                  f"{_fmt(r['saved_bytes_per_token'])}/token")
    print()
    print_table(rows)
    doc = {"environment": environment(), "limit": LIMIT, "size": a.size, "ops": rows,
           "gpu_tiling_models": gpu_model_predictions(),
           "dit_block": {"model": "LightningDiT-XL/1 block (width 1152, 16 heads, SwiGLU, RMSNorm, qk-norm, RoPE), "
                                  "B=2, 256 tokens, fp32 on CPU, forward + backward (upstream gradient given), "
                                  "Triton kernels interpreted (executed); bytes outside the attention core "
                                  "(SDPA) unless named core; GEMM bytes include the weights",
                         "variants": blocks}}
    if not a.only:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
