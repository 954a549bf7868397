"""Codegen gate: every Triton kernel of ``vefast.ops`` compiled for sm_90 and sm_80, no spills (issue 9 §3).

No GPU is needed: Triton 3.6 compiles for a named target (``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))``) and ptxas ships in the triton wheel.

1. **Capture.** Every case of :data:`CASES` calls vefast's public ops (forward and backward) at training
   sizes on ``meta`` tensors, which stand for CUDA tensors of one emulated GPU (:data:`GPUS`: an H100 for
   sm_90, an A100 for sm_80; :func:`emulated_gpu`): the ops take their Triton path, ``torch.cuda``'s device
   queries answer for that GPU (SM count, capability), custom ops run their real implementation
   (:class:`_RunCustomOps`), and every launch is recorded instead of run (``JITFunction.run``; an
   ``Autotuner`` records each of its configs). Each launch is then specialized as Triton's own launcher
   would on that GPU (its binder: pointer dtypes, 16-byte alignment of pointers from their storage
   offset on a 512-byte aligned allocation, integers divisible by 16 or equal to 1, ``do_not_specialize``).
2. **Compile** every distinct specialization (a *config*) for the GPU's target, in worker processes.
   Registers and spills from ptxas's ``-v`` log (``knobs.nvidia.dump_ptxas_log``, a cold cache so that
   ptxas runs; the metadata's ``n_regs`` / ``n_spills`` are only filled when a driver loads the
   binary), shared memory from the metadata.
3. **Verdict**: any spill, shared memory over the target's per-block limit, a compile error, or a
   kernel of ``vefast.ops`` with no captured config (:func:`discover_kernels`) fails the gate.

    python -m benchmarks.codegen [--full] [--json PATH] [--jobs N] [--kernel NAME]

Without ``--full`` the representative subset runs (``tests/test_codegen.py``, ``make test``): every
kernel is captured (coverage is always checked in full), and the configs of the cases marked ``quick``
are compiled. ``--full`` (``make codegen``) compiles every config and writes the committed table
``benchmarks/results/codegen_cpu.json`` with ``--json``. Run in a fresh process with
``TRITON_INTERPRET`` unset or 0 (a kernel binds to the interpreter when its module is imported).
Adding a kernel: docs/speed_checks.md, "Codegen gate".
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "0"  # compiled JITFunctions, not the interpreter (read at decoration)

import torch  # noqa: E402
import triton  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "codegen_cpu.json"
MAX_REGS = 255


@dataclasses.dataclass(frozen=True)
class Gpu:
    """An emulated GPU: the target it compiles for, what its launchers query, and its limits."""

    name: str
    cc: int                 # compute capability, e.g. 90
    sm_count: int           # streaming multiprocessors (launchers size grids by it)
    smem_per_block: int     # bytes of shared memory one block may use (dynamic, opt-in maximum)

    @property
    def target(self) -> str:
        return f"sm_{self.cc}"


GPUS = (Gpu("NVIDIA H100 80GB HBM3", 90, 132, 227 * 1024),
        Gpu("NVIDIA A100-SXM4-80GB", 80, 108, 163 * 1024))


# ----------------------------------------------------------------------------------------------------------
# kernel discovery
# ----------------------------------------------------------------------------------------------------------
def _jit_function(obj: Any):
    """The JITFunction behind ``obj`` (itself, or wrapped by an Autotuner / Heuristics), else None."""
    from triton.runtime.jit import JITFunction

    for _ in range(4):
        if isinstance(obj, JITFunction):
            return obj
        obj = getattr(obj, "fn", None)
        if obj is None:
            return None
    return None


def _called_names(fn) -> set[str]:
    """Names a jit function's body calls (``f(...)`` and ``mod.f(...)``: the attribute's last part)."""
    names = set()
    for node in ast.walk(ast.parse(fn.src)):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name):
                names.add(node.func.id)
            elif isinstance(node.func, ast.Attribute):
                names.add(node.func.attr)
    return names


def discover_kernels() -> dict[str, Any]:
    """Every launched Triton kernel of ``vefast.ops``: ``{"module.name": JITFunction}``. A jit function
    defined in a ``vefast.ops`` module is a kernel unless another jit function calls it (a helper)."""
    import vefast.ops

    found: dict[str, Any] = {}
    for info in pkgutil.iter_modules(vefast.ops.__path__):
        mod = importlib.import_module(f"vefast.ops.{info.name}")
        for obj in vars(mod).values():
            fn = _jit_function(obj)
            if fn is not None and fn.fn.__module__ == mod.__name__:
                found[kernel_id(fn)] = fn
    if not found:
        raise RuntimeError("no Triton JITFunction found in vefast.ops: run with TRITON_INTERPRET unset or 0 "
                           "(in a fresh process: kernels bind to the interpreter when their module is imported)")
    helpers = set()
    for fn in found.values():
        for name in _called_names(fn):
            callee = _jit_function(fn.fn.__globals__.get(name))
            if callee is not None:
                helpers.add(kernel_id(callee))
    return {k: v for k, v in sorted(found.items()) if k not in helpers}


def kernel_id(fn) -> str:
    """``"vf_loss._vf_fwd_kernel"``: the op module and the kernel's name."""
    return f"{fn.fn.__module__.rsplit('.', 1)[-1]}.{fn.fn.__name__}"


# ----------------------------------------------------------------------------------------------------------
# capture
# ----------------------------------------------------------------------------------------------------------
ALLOC_ALIGN = 512  # bytes: CUDA caching allocator blocks are 512-byte aligned


class _Pointer:
    """A tensor argument as Triton's binder sees it: dtype and an address with the tensor's alignment."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._offset = t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return ALLOC_ALIGN * 1024 + self._offset

    def __repr__(self) -> str:
        return f"_Pointer({self.dtype}, +{self._offset})"


@dataclasses.dataclass
class Launch:
    """One recorded launch: the kernel, its arguments (tensors as :class:`_Pointer`), launch options."""

    kernel: str
    case: str
    gpu: Gpu
    args: tuple
    kwargs: dict
    grid: tuple[int, ...]
    autotuned: bool


_RECORDING: list[list[Launch]] = []   # the active capture's launches
_CASE: list[str] = []                 # the running case's name


def _grid(grid, fn, args, kwargs) -> tuple[int, ...]:
    if callable(grid):
        bound = dict(zip(fn.arg_names, args)) | kwargs
        grid = grid(bound)
    return tuple(int(g) for g in grid)


def _recording_run(self, *args, grid, warmup, **kwargs):
    """``JITFunction.run`` while capturing: record the launch, run nothing."""
    autotuned = kwargs.pop("_vefast_autotuned", False)
    conv = tuple(_Pointer(a) if isinstance(a, torch.Tensor) else a for a in args)
    kw = {k: _Pointer(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    _RECORDING[-1].append(Launch(kernel_id(self), _CASE[-1], _GPU[-1], conv, kw, _grid(grid, self, args, kwargs),
                                 autotuned))
    return None


def _recording_autotune(self, *args, **kwargs):
    """``Autotuner.run`` while capturing: every config it would benchmark is a launch (early pruning
    and the perf model applied as Triton would)."""
    self.nargs = dict(zip(self.arg_names, args))
    configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
    for config in configs:
        self.fn.run(*args, **kwargs, **config.all_kwargs(), _vefast_autotuned=True)
    self.nargs = None


_GPU: list[Gpu] = []


class _RunCustomOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Runs the implementation of every ``vefast::`` custom op on the meta tensors (their registered
    meta / fake kernels would skip the launchers); other ops run their meta kernels."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "vefast":
            from torch._library.custom_ops import OPDEFS  # torch's registry of torch.library.custom_op

            opdef = OPDEFS.get(func._schema.name)
            if opdef is None:
                raise RuntimeError(f"codegen capture: {func} is not a torch.library.custom_op")
            with self:
                return opdef._init_fn(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            raise RuntimeError("codegen capture: a value of a meta tensor is read on the host (.item(), bool(), "
                               "float()); give this case real CPU tensors (they take the Triton path too)")
        return func(*args, **kwargs)


@contextlib.contextmanager
def _patched(obj, name: str, value) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def emulated_gpu(gpu: Gpu) -> Iterator[list[Launch]]:
    """Meta tensors stand for CUDA tensors on ``gpu``: the ops' dispatch takes the Triton path
    (``_common.use_triton``), ``torch.cuda``'s device queries answer for ``gpu``, and Triton launches
    are recorded (yielded list), not run."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from vefast.ops import _common

    if _common.interpret_mode():
        raise RuntimeError("benchmarks.codegen captures compiled kernels: run it with TRITON_INTERPRET unset or 0")
    props = types.SimpleNamespace(name=gpu.name, major=gpu.cc // 10, minor=gpu.cc % 10,
                                  multi_processor_count=gpu.sm_count, total_memory=80 * 2**30,
                                  shared_memory_per_block_optin=gpu.smem_per_block)
    launches: list[Launch] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(_common, "use_triton", lambda *tensors: True))
        stack.enter_context(_patched(torch.cuda, "current_device", lambda: 0))
        stack.enter_context(_patched(torch.cuda, "device_count", lambda: 1))
        stack.enter_context(_patched(torch.cuda, "get_device_properties", lambda *a, **k: props))
        stack.enter_context(_patched(torch.cuda, "get_device_capability", lambda *a, **k: (props.major, props.minor)))
        stack.enter_context(_patched(torch.cuda, "get_device_name", lambda *a, **k: gpu.name))
        stack.enter_context(_patched(JITFunction, "run", _recording_run))
        stack.enter_context(_patched(Autotuner, "run", _recording_autotune))
        _RECORDING.append(launches)
        _GPU.append(gpu)
        try:
            with _RunCustomOps():
                yield launches
        finally:
            _RECORDING.pop()
            _GPU.pop()


# ---- the capture cases: realistic training sizes, public API calls ------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    """``run()`` calls public ops (forward + backward) on meta tensors. Every case is captured by every run
    (coverage); ``quick`` cases are also compiled by the subset (``make test``), the others only by ``--full``."""

    name: str
    run: Callable[[], None]
    quick: bool = False


CASES: list[Case] = []


def case(name: str, run: Callable[[], None], *, quick: bool = False) -> None:
    """Register a capture case: the one entry a new kernel needs (docs/speed_checks.md, "Codegen gate")."""
    if any(c.name == name for c in CASES):
        raise ValueError(f"codegen capture case {name!r} is registered twice")
    CASES.append(Case(name, run, quick))


META = torch.device("meta")
DIT_B, DIT_N = 256, 256
HEADS = {1152: (16, 72), 4096: (32, 128), 8192: (64, 128)}  # width -> (heads, head dim): DiT-XL, two wider
LATENT = (256, 32, 16, 16)               # VA-VAE f16d32 latents of a 256 x 256 batch
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


def _t(*shape: int, dtype=BF16, grad: bool = False) -> torch.Tensor:
    return torch.empty(shape, device=META, dtype=dtype).requires_grad_(grad)


def _backward(*outputs: torch.Tensor) -> None:
    outs = [o for o in outputs if o.requires_grad]
    torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])


def _mlp_hidden(d: int) -> int:
    return int(2 * 4 * d / 3)  # LightningDiT's SwiGLU hidden width (mlp_ratio 4)


def _norm_modulate(widths, dtypes) -> Callable[[], None]:
    def run() -> None:
        from vefast.ops.norm_modulate import norm_modulate

        for d in widths:
            for dt in dtypes:
                x = _t(DIT_B, DIT_N, d, dtype=dt, grad=True)
                shift, scale, w = _t(DIT_B, d, dtype=dt, grad=True), _t(DIT_B, d, dtype=dt, grad=True), _t(d, dtype=dt, grad=True)
                _backward(norm_modulate(x, shift, scale, norm="layernorm"))
                _backward(norm_modulate(x, None, scale, norm="rmsnorm", weight=w))
    return run


def _gated_residual(widths, dtypes) -> Callable[[], None]:
    def run() -> None:
        from vefast.ops.gated_residual import gated_residual, gated_residual_norm_modulate

        for d in widths:
            for dt in dtypes:
                x, y = _t(DIT_B, DIT_N, d, dtype=dt, grad=True), _t(DIT_B, DIT_N, d, dtype=dt, grad=True)
                gate, shift, scale = (_t(DIT_B, d, dtype=dt, grad=True) for _ in range(3))
                w = _t(d, dtype=dt, grad=True)
                _backward(gated_residual(x, y, gate))
                _backward(*gated_residual_norm_modulate(x, y, gate, shift=shift, scale=scale, norm="layernorm"))
                _backward(*gated_residual_norm_modulate(x, y, gate, shift=None, scale=scale, norm="rmsnorm", weight=w))
                _backward(gated_residual_norm_modulate(x, y, gate, shift=shift, scale=scale, norm="rmsnorm",
                                                       weight=w).modulated)  # h unused
    return run


def _swiglu(widths, dtypes) -> Callable[[], None]:
    def run() -> None:
        from vefast.ops.swiglu import swiglu

        for d in widths:
            for dt in dtypes:
                _backward(swiglu(_t(DIT_B, DIT_N, 2 * _mlp_hidden(d), dtype=dt, grad=True)))
    return run


def _qk_norm_rope(widths, dtypes) -> Callable[[], None]:
    def run() -> None:
        from vefast.ops.attention import qk_norm_rope_attention
        from vefast.ops.qk_prologue import qk_norm_rope
        from vefast.ops.rope import rope_2d_freqs

        for d in widths:
            heads, hd = HEADS[d]
            rope = tuple(t.to(META) for t in rope_2d_freqs(hd, 16))
            for dt in dtypes:
                qkv = _t(DIT_B, DIT_N, 3, heads, hd, dtype=dt, grad=True)
                qw, kw, qb, kb = (_t(hd, dtype=dt, grad=True) for _ in range(4))
                _backward(*qk_norm_rope(qkv, norm="rms", q_weight=qw, k_weight=kw, rope=rope))
                _backward(*qk_norm_rope(qkv, norm="layer", q_weight=qw, k_weight=kw, q_bias=qb, k_bias=kb, rope=rope))
                _backward(qk_norm_rope_attention(qkv, qw, kw, rope, backend="sdpa"))  # the prologue + SDPA path
    return run


def _align_loss(widths, dtypes) -> Callable[[], None]:
    def run() -> None:
        from vefast.ops.align_loss import align_loss, repa_loss

        for d in widths:
            for dt in dtypes:
                pred, target = _t(DIT_B, DIT_N, d, dtype=dt, grad=True), _t(DIT_B, DIT_N, d, dtype=dt)
                _backward(align_loss(pred, target).loss)
                _backward(repa_loss(pred, target))
    return run


def _reparam(shapes, dtypes) -> Callable[[], None]:
    def run() -> None:
        from vefast.ops import reparam as r

        for shape in shapes:
            for dt in dtypes:
                mean, logvar = _t(*shape, dtype=dt, grad=True), _t(*shape, dtype=dt, grad=True)
                moments = _t(shape[0], 2 * shape[1], *shape[2:], dtype=dt, grad=True)
                ve = r.ve_loss(mean, logvar)
                _backward(ve.z, ve.loss)
                _backward(r.ve_loss(mean, logvar, _t(*shape, dtype=dt)).loss)
                kl = r.kl_loss(mean, logvar)
                _backward(kl.z, kl.loss)
                _backward(r.ve_loss_from_moments(moments).z)
                _backward(r.kl_loss_from_moments(moments).loss)
    return run


def _vf_loss(sides, dtypes, grads) -> Callable[[], None]:
    def run() -> None:
        from vefast.ops.vf_loss import vf_loss

        for side in sides:  # N = side^2 tokens
            z = _t(LATENT[0], LATENT[1], side, side, dtype=F32, grad=True)
            w = _t(1024, LATENT[1], dtype=F32, grad=True)
            for dt in dtypes:
                f = _t(LATENT[0], 1024, side, side, dtype=dt)
                for grad in grads:
                    with torch.set_grad_enabled(grad):
                        out = vf_loss(z, f, w)
                    if grad:
                        _backward(out.loss)
    return run


def _separation(settings) -> Callable[[], None]:
    def run() -> None:
        from vefast.sampling import separation_function

        # real CPU tensors (they take the Triton path here too): separation_function checks its data on the host
        g = torch.Generator().manual_seed(0)
        snr = torch.logspace(-2, 3, 64, dtype=F64)
        for m, d, leave_one_out in settings:
            x1 = torch.randn(m, d, generator=g)
            separation_function(x1, snr, num_noise=500, leave_one_out=leave_one_out, generator=g)
    return run


def _timestep_sample(table_bits, batches) -> Callable[[], None]:
    def run() -> None:
        from vefast.ops.timestep_sample import timestep_sample

        for bits in table_bits:
            for n in batches:
                timestep_sample(_t(2**bits + 1, dtype=F32), n)
    return run


# The subset (quick) takes the sizes and dtypes where registers run out first: the widest rows, fp32 (no
# packed 16-bit values), the largest tiles; the full set adds the rest of the training sizes.
case("norm_modulate D=8192 fp32", _norm_modulate([8192], [F32]), quick=True)
case("norm_modulate", _norm_modulate([1152, 4096, 8192], [F32, BF16]))
case("gated_residual D=8192 fp32", _gated_residual([8192], [F32]), quick=True)
case("gated_residual", _gated_residual([1152, 4096, 8192], [F32, BF16]))
case("swiglu D=8192", _swiglu([8192], [F32]), quick=True)
case("swiglu", _swiglu([1152, 4096, 8192], [F32, BF16]))
case("qk_norm_rope D=8192 fp32", _qk_norm_rope([8192], [F32]), quick=True)
case("qk_norm_rope", _qk_norm_rope([1152, 4096, 8192], [F32, BF16]))
case("align_loss D=1024 fp32", _align_loss([1024], [F32]), quick=True)
case("align_loss", _align_loss([768, 1024], [F32, BF16]))
case("reparam 256x32x32x32 fp32", _reparam([(256, 32, 32, 32)], [F32]), quick=True)
case("reparam", _reparam([LATENT, (256, 32, 32, 32), (8, 32, 16, 16)], [F32, BF16, F64]))
case("vf_loss N=1024 grad", _vf_loss([32], [F32, BF16], [True]), quick=True)
case("vf_loss", _vf_loss([16, 32], [F32, BF16, F16], [True, False]))
case("separation M=200", _separation([(200, 32 * 16 * 16, False)]), quick=True)
case("separation", _separation([(200, 32 * 16 * 16, True), (4096, 64, False)]))
case("timestep_sample", _timestep_sample([10, 16], [256, 4096]), quick=True)


def capture(gpu: Gpu, cases: list[Case] | None = None, fallbacks: set[str] | None = None) -> list[Launch]:
    """Run every case on ``gpu`` (emulated) and return the recorded launches; the keys of the eager
    fallbacks reported meanwhile go to ``fallbacks`` (e.g. SDPA's math backend: meta tensors are no GPU)."""
    from vefast.ops._common import record_fallbacks

    out: list[Launch] = []
    for c in cases if cases is not None else CASES:
        with emulated_gpu(gpu) as launches, record_fallbacks() as events, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the fallbacks are listed in the report instead
            _CASE.append(c.name)
            try:
                c.run()
            except Exception as e:
                raise RuntimeError(f"codegen capture case {c.name!r} failed on {gpu.target}: {e}") from e
            finally:
                _CASE.pop()
        out += launches
        if fallbacks is not None:
            fallbacks.update(f"{c.name}: {e.key}" for e in events)
    return out


# ----------------------------------------------------------------------------------------------------------
# specialization (Triton's binder for the target) and compilation
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Config:
    """One distinct compile: a kernel's specialization for a target, and the cases that launch it."""

    kernel: str
    target: str
    cc: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    cases: list[str]
    grids: list[tuple[int, ...]]
    autotuned: bool
    quick: bool

    def key(self) -> str:
        return repr((self.kernel, self.cc, sorted(self.signature.items()), sorted(self.constexprs.items()),
                     sorted(self.attrs.items()), self.options["num_warps"], self.options["num_stages"]))

    def describe(self) -> dict:
        """The config as JSON: constexpr values by name, pointer dtypes, specialized integers."""
        names = list(self.signature)
        constexprs = {names[p[0]]: _jsonable(v) for p, v in self.constexprs.items() if self.signature[names[p[0]]]
                      == "constexpr"}
        ptrs = {n: t for n, t in self.signature.items() if t.startswith("*")}
        div16 = [names[p[0]] for p, a in self.attrs.items() if any(x[0] == "tt.divisibility" for x in a)]
        return {"constexprs": constexprs, "pointers": ptrs, "divisible_by_16": div16}


def _jsonable(v: Any) -> Any:
    return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)


_BINDERS: dict[tuple[str, int], Any] = {}


def specialize(launch: Launch, kernels: dict[str, Any], quick_cases: set[str]) -> Config:
    """The launch as Triton's launcher on ``launch.gpu`` would compile it (its binder and ``_pack_args``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = kernels[launch.kernel]
    cc = launch.gpu.cc
    backend = make_backend(GPUTarget("cuda", cc, 32))
    key = (launch.kernel, cc)
    if key not in _BINDERS:
        _BINDERS[key] = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs, debug=False)
    bound, spec, options = _BINDERS[key](*launch.args, **kwargs)
    opts, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return Config(launch.kernel, launch.gpu.target, cc, signature, constexprs, attrs, dict(opts.__dict__),
                  [launch.case], [launch.grid], launch.autotuned, launch.case in quick_cases)


def configs_of(launches: list[Launch], kernels: dict[str, Any], quick_cases: set[str]) -> list[Config]:
    """Distinct configs (cases and grids merged), in capture order."""
    seen: dict[str, Config] = {}
    for la in launches:
        c = specialize(la, kernels, quick_cases)
        k = c.key()
        if k in seen:
            s = seen[k]
            s.cases += [x for x in c.cases if x not in s.cases]
            s.grids += [g for g in c.grids if g not in s.grids]
            s.quick = s.quick or c.quick
        else:
            seen[k] = c
    return list(seen.values())


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> dict[str, int]:
    """Registers (max over functions), stack frame and spill bytes (summed) from a ``ptxas -v`` log."""
    regs = [int(m) for m in _PTXAS_REGS.findall(log)]
    spills = [tuple(map(int, m)) for m in _PTXAS_SPILL.findall(log)]
    if not regs or not spills:
        raise ValueError(f"no ptxas resource usage in the log:\n{log[-2000:]}")
    return {"regs": max(regs), "stack": sum(s[0] for s in spills), "spill_stores": sum(s[1] for s in spills),
            "spill_loads": sum(s[2] for s in spills)}


def compile_config(module: str, name: str, cc: int, signature: dict, constexprs: dict, attrs: dict,
                   options: dict) -> dict[str, Any]:
    """Compile one config for ``sm_<cc>`` (in this process): registers, spills, shared memory, seconds."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(module), name)
    knobs.nvidia.dump_ptxas_log = True
    buf = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(buf):
            k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32),
                               options=options)
        usage = parse_ptxas(buf.getvalue())
    except Exception as e:  # a compile failure is a gate failure, reported with its message
        msg = f"{type(e).__name__}: {e}"
        return {"error": msg[:4000], "seconds": round(time.perf_counter() - t0, 2)}
    return dict(usage, smem=int(k.metadata.shared), seconds=round(time.perf_counter() - t0, 2))


def _compile_job(job: tuple) -> dict[str, Any]:
    return compile_config(*job)


def _job(c: Config, kernels: dict[str, Any]) -> tuple:
    fn = kernels[c.kernel]
    return (fn.fn.__module__, fn.fn.__name__, c.cc, c.signature, c.constexprs, c.attrs, c.options)


def compile_all(configs: list[Config], kernels: dict[str, Any], jobs: int) -> list[dict[str, Any]]:
    """Compile every config (``jobs`` worker processes, a cold Triton cache) -> result rows."""
    work = [_job(c, kernels) for c in configs]
    with tempfile.TemporaryDirectory(prefix="vefast-codegen-") as cache:
        env = {"TRITON_CACHE_DIR": cache, "TRITON_INTERPRET": "0"}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # workers inherit it; the cache is cold so that ptxas runs and logs
        try:
            if jobs <= 1:
                results = [_compile_job(j) for j in work]
            else:
                # long compiles first: the pool's makespan is then about the sum / jobs
                order = sorted(range(len(work)), key=lambda i: -_cost_guess(configs[i]))
                with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
                    done = dict(zip(order, pool.map(_compile_job, [work[i] for i in order])))
                results = [done[i] for i in range(len(work))]
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return [row_of(c, r) for c, r in zip(configs, results)]


def _cost_guess(c: Config) -> int:
    names = list(c.signature)
    ce = {names[p[0]]: v for p, v in c.constexprs.items()}
    return int(c.autotuned) * 10**6 + sum(v for v in ce.values() if isinstance(v, int) and not isinstance(v, bool))


def row_of(c: Config, r: dict[str, Any]) -> dict[str, Any]:
    return {"kernel": c.kernel, "target": c.target, "config": c.describe(), "cases": c.cases,
            "grids": [list(g) for g in c.grids[:4]], "autotuned": c.autotuned, "quick": c.quick,
            "warps": c.options["num_warps"], "stages": c.options["num_stages"], **r}


# ----------------------------------------------------------------------------------------------------------
# verdict and report
# ----------------------------------------------------------------------------------------------------------
SMEM_LIMIT = {g.target: g.smem_per_block for g in GPUS}

# Kernels known to violate today (spills), each with why and whose fix it is: their violations are reported,
# not failed; a --full run fails once an entry has nothing left to excuse (remove it). Keep this short.
KNOWN: dict[str, str] = {}


def violations(r: dict[str, Any]) -> list[str]:
    """What is wrong with one compiled config (empty: nothing)."""
    if "error" in r:
        return [f"compile failed: {r['error'].splitlines()[0][:300] if r['error'] else '?'}"]
    out = []
    if r["spill_stores"] or r["spill_loads"]:
        out.append(f"spills {r['spill_stores']} B stores + {r['spill_loads']} B loads ({r['regs']} registers)")
    if r["smem"] > SMEM_LIMIT[r["target"]]:
        out.append(f"{r['smem']} B shared memory > the {r['target']} limit {SMEM_LIMIT[r['target']]} B")
    if r["regs"] > MAX_REGS:
        out.append(f"{r['regs']} registers > {MAX_REGS}")
    return out


def failures(rows: list[dict[str, Any]], kernels: list[str], captured: dict[str, set[str]], *,
             known: dict[str, str] | None = None, full: bool = True) -> tuple[list[str], list[str]]:
    """(failures, known violations): the gate passes when the first is empty. ``captured``: target -> kernels
    with a captured config; ``known``: :data:`KNOWN` (kernel -> reason)."""
    known = KNOWN if known is None else known
    out, excused = [], []
    for target, have in sorted(captured.items()):
        for k in kernels:
            if k not in have:
                out.append(f"{k} [{target}]: no captured launch config (add a capture case to "
                           "benchmarks/codegen.py: docs/speed_checks.md, 'Codegen gate')")
    still = set()
    for r in rows:
        for v in violations(r):
            line = f"{r['kernel']} [{r['target']}] {_short(r['config'])}: {v}"
            if r["kernel"] in known and not v.startswith("compile failed"):
                excused.append(f"{line} (known: {known[r['kernel']]})")
                still.add(r["kernel"])
            else:
                out.append(line)
    if full:
        out += [f"{k}: listed in KNOWN but nothing to excuse any more: remove its entry" for k in known
                if k not in still]
    return out, excused


def _short(cfg: dict) -> str:
    ce = " ".join(f"{k}={v}" for k, v in cfg["constexprs"].items() if v is not None)
    ptr = ",".join(sorted({t[1:] for t in cfg["pointers"].values()}))
    return f"{ce} [{ptr}]"


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'kernel':34s} {'target':6s} {'regs':>4s} {'spill B':>9s} {'smem KB':>7s} {'warps':>5s} {'stg':>3s} " \
           f"{'s':>5s}  config"
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["target"])):
        if "error" in r:
            lines.append(f"{r['kernel']:34s} {r['target']:6s} {'ERROR':>4s} {'':>9s} {'':>7s} {r['warps']:5d} "
                         f"{r['stages']:3d} {r['seconds']:5.1f}  {_short(r['config'])}")
            continue
        spill = f"{r['spill_stores']}+{r['spill_loads']}"
        lines.append(f"{r['kernel']:34s} {r['target']:6s} {r['regs']:4d} {spill:>9s} {r['smem'] / 1024:7.1f} "
                     f"{r['warps']:5d} {r['stages']:3d} {r['seconds']:5.1f}  {_short(r['config'])}")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = os.environ.get("VEFAST_COMMIT") or git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"triton": triton.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "commit": commit + ("-dirty" if dirty and commit and not commit.endswith("-dirty") else ""),
            "machine": "CPU only (no GPU): triton.compile for GPUTarget('cuda', cc, 32), ptxas from the triton wheel",
            "gpus": [dataclasses.asdict(g) for g in GPUS]}


@dataclasses.dataclass
class GateResult:
    rows: list[dict[str, Any]]
    failures: list[str]
    known: list[str]
    kernels: list[str]
    captured_s: float
    compile_s: float
    n_configs: int
    fallbacks: list[str]


def run_gate(*, full: bool, jobs: int = 2, kernel: str | None = None) -> GateResult:
    """Capture every case on every emulated GPU, compile the subset (or ``full``), judge."""
    kernels = discover_kernels()
    quick = {c.name for c in CASES if c.quick}
    t0 = time.perf_counter()
    configs: list[Config] = []
    captured: dict[str, set[str]] = {}
    fallbacks: set[str] = set()
    for gpu in GPUS:
        cs = configs_of(capture(gpu, fallbacks=fallbacks), kernels, quick)
        captured[gpu.target] = {c.kernel for c in cs}
        configs += cs
    captured_s = time.perf_counter() - t0
    todo = [c for c in configs if (full or c.quick) and (kernel is None or kernel in c.kernel)]
    t0 = time.perf_counter()
    rows = compile_all(todo, kernels, jobs)
    fails, known = failures(rows, list(kernels), captured, full=full and kernel is None)
    return GateResult(rows, fails, known, list(kernels), captured_s, time.perf_counter() - t0, len(configs),
                      sorted(fallbacks))


def report(res: GateResult, full: bool) -> dict[str, Any]:
    spilling = [r for r in res.rows if r.get("spill_stores") or r.get("spill_loads")]
    return {"environment": environment(), "mode": "full" if full else "subset",
            "summary": {"kernels": len(res.kernels), "configs_captured": res.n_configs, "compiles": len(res.rows),
                        "spilling": len(spilling), "errors": sum("error" in r for r in res.rows),
                        "failures": len(res.failures), "known": len(res.known), "capture_s": round(res.captured_s, 1),
                        "compile_s": round(res.compile_s, 1)},
            "limits": {"smem_per_block": SMEM_LIMIT, "max_regs": MAX_REGS},
            "kernels": res.kernels, "capture_fallbacks": res.fallbacks, "failures": res.failures,
            "known": res.known, "known_reasons": dict(KNOWN), "rows": res.rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="compile every captured config (default: the subset)")
    ap.add_argument("--json", metavar="PATH", help=f"write the table as JSON (the committed one: {RESULT.relative_to(ROOT)})")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes (default 2)")
    ap.add_argument("--kernel", help="compile only kernels whose id contains this (coverage is still checked)")
    args = ap.parse_args(argv)
    res = run_gate(full=args.full, jobs=args.jobs, kernel=args.kernel)
    rep = report(res, args.full)
    print(table(res.rows))
    s = rep["summary"]
    print(f"\n{s['kernels']} kernels, {s['configs_captured']} configs captured on {len(GPUS)} targets in "
          f"{s['capture_s']} s; {s['compiles']} compiled in {s['compile_s']} s ({args.jobs} processes); "
          f"{s['spilling']} spill, {s['errors']} errors")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rep, indent=1) + "\n")
    if res.known:
        print(f"\nknown violations ({len(res.known)}, KNOWN in benchmarks/codegen.py):\n  " + "\n  ".join(res.known))
    if res.fallbacks:
        print("\neager fallbacks while capturing (meta tensors are no GPU): " + ", ".join(res.fallbacks))
    if res.failures:
        print(f"\nCODEGEN GATE FAILED ({len(res.failures)}):\n  " + "\n  ".join(res.failures))
        return 1
    print("codegen gate passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
