"""GPU benchmark harness: timing, peak memory, achieved bandwidth / FLOP rate, JSON results.

Each ``benchmarks/gpu_<topic>.py`` defines ``run(ceilings) -> list[dict]`` (one dict per case and
variant, from :func:`measure`); ``python -m benchmarks.run_gpu`` runs them in priority order, each within
its time budget, and writes ``benchmarks/results/<topic>.json`` with the device, versions and git commit.
While a topic runs, every row :func:`measure` returns is also written at once to that file by the
:class:`ResultSink` (``"complete": false``), so a topic stopped at its budget still leaves the rows it
measured; the final write (``"complete": true``) holds the rows ``run`` returned, ratios included.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict[str, Any]:
    import triton

    env: dict[str, Any] = {
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "triton": triton.__version__,
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    env["commit"] = os.environ.get("VEFAST_COMMIT") or None  # the GPU machine's copy has no .git
    if env["commit"] is None:
        try:
            env["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           cwd=RESULTS.parent).stdout.strip() or None
        except OSError:
            pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["device"] = p.name
        env["capability"] = f"{p.major}.{p.minor}"
        env["memory_gib"] = round(p.total_memory / 2**30, 1)
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return env


def measure(fn: Callable[[], Any], *, name: str, variant: str, bytes_moved: float | None = None,
            flops: float | None = None, warmup: int = 25, rep: int = 100, **case: Any) -> dict[str, Any]:
    """Median time of ``fn`` (CUDA: triton.testing.do_bench), peak memory above the baseline, and
    GB/s / TFLOP/s from the given minimal bytes / FLOPs."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        ms = do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    else:
        fn()
        times = []
        for _ in range(max(3, rep // 20)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        ms = sorted(times)[len(times) // 2] * 1e3
        peak = None
    row: dict[str, Any] = {"name": name, "variant": variant, **case, "ms": ms, "peak_mem_bytes": peak}
    if bytes_moved is not None:
        row["gbps"] = bytes_moved / (ms * 1e-3) / 1e9
    if flops is not None:
        row["tflops"] = flops / (ms * 1e-3) / 1e12
    if _SINK is not None:
        _SINK.add(row)
    return row


def autograd_steps(fn: Callable, inputs: list[torch.Tensor], dout: torch.Tensor,
                   context: Callable[[], Any] = contextlib.nullcontext) -> dict[str, Callable[[], Any]]:
    """``fn(*inputs)`` as the three timed steps: fwd (a training forward: the graph is built), bwd (backward of
    one retained graph, built here once), both; each forward runs inside ``context()``."""
    def fwd():
        with context():
            return fn(*inputs)

    def both():
        with context():
            out = fn(*inputs)
        return torch.autograd.grad(out, inputs, dout)

    with context():
        graph = fn(*inputs)

    def bwd():
        return torch.autograd.grad(graph, inputs, dout, retain_graph=True)
    return {"fwd": fwd, "bwd": bwd, "both": both}


def sdpa_context(name: str | None):
    """``sdpa_kernel`` restricted to one SDPA backend: flash, efficient, cudnn or math (None: torch's default)."""
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name])


@contextlib.contextmanager
def eager_cpu_path() -> Iterator[None]:
    """``TRITON_INTERPRET=0`` for a CPU dry run (the ops take their eager CPU path: the run checks a script's
    wiring, not the kernels); the previous value is restored on exit."""
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if prev is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = prev


def script_main(topic: str, dry_run: Callable[[], list[dict[str, Any]]], argv: list[str]) -> int:
    """The command line of a ``benchmarks/gpu_<topic>.py`` script: ``--dry-run`` runs ``dry_run()`` and reports
    its rows with ``error`` (exit 1 if any); without it, points to ``benchmarks.run_gpu`` (exit 2)."""
    if "--dry-run" in argv:
        rows = dry_run()
        errors = [r for r in rows if "error" in r]
        print(f"gpu_{topic} dry run: {len(rows)} rows, {len(errors)} errors")
        for r in errors:
            print(f"  {r['variant']} {r.get('mode')}: {r['error']}")
        return 1 if errors else 0
    print(f"use python -m benchmarks.run_gpu {topic} (GPU), or --dry-run", file=sys.stderr)
    return 2


def hbm_bandwidth_gbps(n_bytes: int = 2**30) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes / time), the roofline for memory-bound ops."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    row = measure(lambda: dst.copy_(src), name="copy", variant="torch", bytes_moved=2 * n_bytes)
    del src, dst
    return row["gbps"]


def matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured dense GEMM throughput, the ceiling for matrix-bound ops."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    return measure(lambda: a @ b, name="gemm", variant="torch", flops=2 * n**3)["tflops"]


def add_ratios(rows: list[dict[str, Any]], *, key: tuple[str, ...], reference: str, ours: str = "vefast") -> None:
    """Set ``speedup_vs_<reference>`` and ``mem_ratio_vs_<reference>`` on ``ours`` rows with equal ``key`` fields."""
    refs = {tuple(r.get(k) for k in key): r for r in rows if r["variant"] == reference}
    for r in rows:
        ref = refs.get(tuple(r.get(k) for k in key))
        if r["variant"] == ours and ref is not None:
            r[f"speedup_vs_{reference}"] = ref["ms"] / r["ms"]
            if r.get("peak_mem_bytes") and ref.get("peak_mem_bytes"):
                r[f"mem_ratio_vs_{reference}"] = r["peak_mem_bytes"] / ref["peak_mem_bytes"]


def write_results(topic: str, rows: list[dict[str, Any]], *, results_dir: Path | None = None,
                  **extra: Any) -> Path:
    """Write ``<results_dir>/<topic>.json`` (default ``benchmarks/results/``) atomically: the environment,
    ``extra`` (ceilings, complete, ...) and the rows."""
    folder = Path(results_dir) if results_dir is not None else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{topic}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"environment": environment(), **extra, "results": rows}, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


class ResultSink:
    """Writes a topic's rows to its JSON file as they are measured (``complete: false``).

    The environment is read once; :meth:`add` rewrites the file with every row so far, so whatever
    stops the topic (its budget, a crash) leaves the finished rows on disk.
    """

    def __init__(self, topic: str, results_dir: Path, **extra: Any) -> None:
        self.path = Path(results_dir) / f"{topic}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.head = {"environment": environment(), **extra}
        self.rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.write(complete=False)

    def write(self, *, complete: bool, rows: list[dict[str, Any]] | None = None, **extra: Any) -> Path:
        body = {**self.head, **extra, "complete": complete, "results": self.rows if rows is None else rows}
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(body, indent=1, default=str) + "\n")
        tmp.replace(self.path)
        return self.path


_SINK: ResultSink | None = None


def set_sink(sink: ResultSink | None) -> None:
    """Route every row :func:`measure` returns to ``sink`` as well (None: stop)."""
    global _SINK
    _SINK = sink
