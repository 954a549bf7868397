"""GPU benchmark harness: timing, peak memory, achieved bandwidth / FLOP rate, JSON results.

Each ``benchmarks/gpu_<topic>.py`` defines ``run(ceilings) -> list[dict]`` (one dict per case and
variant, from :func:`measure`); ``python -m benchmarks.run_gpu`` runs them all and writes
``benchmarks/results/<topic>.json`` with the device, versions and git commit.
"""
from __future__ import annotations

import json
import platform
import subprocess
import time
from collections.abc import Callable
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
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                       cwd=RESULTS.parent).stdout.strip() or None
    except OSError:
        env["commit"] = None
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
    return row


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


def write_results(topic: str, rows: list[dict[str, Any]], **extra: Any) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{topic}.json"
    path.write_text(json.dumps({"environment": environment(), **extra, "results": rows}, indent=1) + "\n")
    return path
