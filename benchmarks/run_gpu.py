"""Run the GPU benchmarks (``benchmarks/gpu_<topic>.py``) in priority order, each within a time budget.

    python -m benchmarks.run_gpu [topic ...] [--budget S] [--results-dir DIR] [--ceilings FILE]
    python -m benchmarks.run_gpu --measure-ceilings FILE     # stage 0 of benchmarks/gpu_check.sh
    python -m benchmarks.run_gpu --list | --dry-run          # no GPU needed

Each topic runs in its own process (a hang or a crash costs that topic only) under
``min(its budget, what is left of --budget)``: at its budget the topic is interrupted and the rows it
measured so far stay in ``<results-dir>/<topic>.json`` (``"complete": false``, written row by row by
:class:`benchmarks.harness.ResultSink`); a finished topic's file says ``"complete": true``.
``<results-dir>/run_gpu_summary.json`` gets one line per topic (status, rows, seconds) as each ends.

A new benchmark plugs in with one entry in :data:`TOPICS`: a file ``benchmarks/gpu_<topic>.py`` with a
top-level ``run(ceilings: dict) -> list[dict]`` (a ``gpu_*.py`` without one is a helper script, not a topic) (rows from :func:`benchmarks.harness.measure`), and optionally
``dry_run() -> list[dict]``, the same script at tiny sizes on the CPU (rows with an ``"error"`` key fail).
``--dry-run`` (CPU) imports every topic module, checks that it is listed and has ``run``, calls its
``dry_run`` if any, counts the module-level case lists (``CASES``, ``*_CASES``) and round-trips the
JSON writer.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# (topic, budget in seconds), highest priority first: benchmarks/gpu_<topic>.py.
TOPICS: list[tuple[str, int]] = [
    ("attention_block", 80),  # LightningDiT-XL attention sub-block: fills the backend="auto" table
    ("attention", 60),    # vefast's CUDA kernel and the fused q/k prologue vs every SDPA backend
    ("dit_blocks", 60),   # one LightningDiT-XL block and each fused block op vs eager / compile
    ("reparam", 25),      # reparameterization + VE loss
    ("align", 40),        # VF loss and alignment losses
    ("vr", 40),           # separation function, VR timestep sampler
    ("training", 90),     # full training steps (DiT B/1, XL/1, tokenizer)
    ("sample", 40),       # sampling img/s per GPU (guided ODE step, decoder), FID Inception img/s, sqrtm
]
DEFAULT_BUDGET_S = 245      # the whole benchmark stage of gpu_check.sh
MIN_TOPIC_S = 10            # a topic gets at least this much, or is skipped
KILL_GRACE_S = 20           # past its budget, the topic process is killed (it was interrupted at the budget)


class TopicTimeout(BaseException):
    """The topic's budget ran out (SIGALRM in the topic process); a BaseException, so that a benchmark's
    ``except Exception`` around one case does not swallow it."""


def topic_module(topic: str) -> str:
    """``benchmarks.gpu_<topic>``; a dotted name is a module path itself (the runner's own tests use one)."""
    return topic if "." in topic else f"benchmarks.gpu_{topic}"


def _result_name(topic: str) -> str:
    return topic.rsplit(".", 1)[-1]


def topic_names() -> list[str]:
    return [name for name, _ in TOPICS]


def _defines_run(path: Path) -> bool:
    """Whether the file defines a top-level ``run`` (read, not imported: helper scripts named gpu_* are not topics)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return any(isinstance(node, ast.FunctionDef) and node.name == "run" for node in tree.body)


def found_topics() -> list[str]:
    """The benchmark files: ``benchmarks/gpu_<topic>.py`` that define ``run(ceilings)``."""
    return sorted(p.stem[4:] for p in HERE.glob("gpu_*.py") if _defines_run(p))


# ---------------------------------------------------------------------------------------------- ceilings
def measure_ceilings() -> dict[str, float]:
    """Device copy GB/s (read + write) and bf16 GEMM TFLOP/s, measured now (benchmarks.harness)."""
    import torch

    from .harness import hbm_bandwidth_gbps, matmul_tflops

    ceilings = {"hbm_copy_gbps": hbm_bandwidth_gbps(), "bf16_gemm_tflops": matmul_tflops()}
    torch.cuda.empty_cache()
    return ceilings


def write_ceilings(path: Path) -> dict[str, Any]:
    from .harness import environment

    body = {"environment": environment(), "ceilings": measure_ceilings()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=1) + "\n")
    return body


def read_ceilings(path: Path) -> dict[str, float]:
    body = json.loads(Path(path).read_text())
    return body.get("ceilings", body)


# ---------------------------------------------------------------------------------------- one topic
def _on_alarm(signum, frame):  # noqa: ARG001
    raise TopicTimeout


def run_topic(topic: str, budget_s: float, ceilings: dict[str, float], results_dir: Path) -> int:
    """In the topic's own process: run ``benchmarks.gpu_<topic>.run`` with rows streamed to its JSON.

    Exit codes: 0 done, 1 failed (traceback printed; rows so far kept), 3 budget reached.
    """
    from . import harness

    sink = harness.ResultSink(_result_name(topic), results_dir, ceilings=ceilings, budget_s=budget_s)
    harness.set_sink(sink)
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(max(1, int(budget_s)))
    t0 = time.monotonic()
    try:
        rows = importlib.import_module(topic_module(topic)).run(ceilings)
    except TopicTimeout:
        sink.write(complete=False, stopped=f"budget of {budget_s:.0f} s reached", wall_s=time.monotonic() - t0)
        print(f"{topic}: budget of {budget_s:.0f} s reached after {len(sink.rows)} rows -> {sink.path}")
        return 3
    except Exception as exc:  # report, keep the rows measured so far
        traceback.print_exc()
        sink.write(complete=False, stopped=f"failed: {type(exc).__name__}: {exc}", wall_s=time.monotonic() - t0)
        return 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        harness.set_sink(None)
    sink.write(complete=True, rows=rows, wall_s=time.monotonic() - t0)
    print(f"{topic}: {len(rows)} rows in {time.monotonic() - t0:.0f} s -> {sink.path}")
    return 0


# ------------------------------------------------------------------------------------------ the stage
def _status(rc: int | None) -> str:
    return {0: "ok", 1: "failed", 3: "budget"}.get(rc, "killed" if rc is None else f"rc={rc}")


def _write_summary(path: Path, lines: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(lines, indent=1) + "\n")
    tmp.replace(path)


def _rows_in(path: Path) -> int:
    try:
        return len(json.loads(path.read_text())["results"])
    except (OSError, ValueError, KeyError):
        return 0


def run_all(topics: list[str], budget_s: float, ceilings_path: Path, results_dir: Path) -> int:
    """Each topic in its own process, in the given order, within ``budget_s`` in all.

    Returns 0 when every topic finished, 3 when some were stopped at their budget or skipped (and none
    failed), 1 when one failed or was killed."""
    results_dir.mkdir(parents=True, exist_ok=True)
    budgets = dict(TOPICS)
    deadline = time.monotonic() + budget_s
    summary: list[dict[str, Any]] = []
    failed = partial = 0
    for topic in topics:
        left = deadline - time.monotonic()
        own = budgets.get(topic, 60)
        budget = min(own, left)
        if budget < min(own, MIN_TOPIC_S):  # too little left to be worth starting
            summary.append({"topic": topic, "status": "skipped", "reason": f"{left:.0f} s left of the stage"})
            print(f"{topic}: skipped ({left:.0f} s left of the stage budget)")
            _write_summary(results_dir / "run_gpu_summary.json", summary)
            partial += 1
            continue
        cmd = [sys.executable, "-m", "benchmarks.run_gpu", "--child", topic, "--budget", f"{budget:.0f}",
               "--ceilings", str(ceilings_path), "--results-dir", str(results_dir)]
        print(f"== {topic}: budget {budget:.0f} s", flush=True)
        t0 = time.monotonic()
        try:
            rc: int | None = subprocess.run(cmd, cwd=HERE.parent, timeout=budget + KILL_GRACE_S).returncode
        except subprocess.TimeoutExpired:
            rc = None
        wall = time.monotonic() - t0
        line = {"topic": topic, "status": _status(rc), "rows": _rows_in(results_dir / f"{_result_name(topic)}.json"),
                "wall_s": round(wall, 1), "budget_s": round(budget)}
        summary.append(line)
        _write_summary(results_dir / "run_gpu_summary.json", summary)
        print(f"== {topic}: {line['status']}, {line['rows']} rows, {wall:.0f} s", flush=True)
        failed += rc not in (0, 3)
        partial += rc == 3
    return 1 if failed else 3 if partial else 0


# ------------------------------------------------------------------------------------------- dry run
def _case_lists(module) -> dict[str, int]:
    """Module-level case lists (``CASES``, ``*_CASES``) and their lengths."""
    return {name: len(value) for name, value in vars(module).items()
            if (name == "CASES" or name.endswith("_CASES")) and isinstance(value, (list, tuple))}


def dry_run(results_dir: Path) -> int:
    """Everything up to the device: every topic imports and is listed, the JSON writer round-trips."""
    from . import harness

    problems = []
    listed, found = topic_names(), found_topics()
    if len(set(listed)) != len(listed):
        problems.append(f"TOPICS lists a topic twice: {listed}")
    for topic in sorted(set(found) - set(listed)):
        problems.append(f"benchmarks/gpu_{topic}.py is not in run_gpu.TOPICS: add ('{topic}', budget_s) "
                        "where its priority is")
    for topic in sorted(set(listed) - set(found)):
        problems.append(f"run_gpu.TOPICS lists {topic!r} but benchmarks/gpu_{topic}.py does not exist")
    for topic, budget in TOPICS:
        if topic not in found:
            continue
        try:
            module = importlib.import_module(f"benchmarks.gpu_{topic}")
        except Exception as exc:  # report every broken module, not only the first
            problems.append(f"benchmarks/gpu_{topic}.py does not import: {type(exc).__name__}: {exc}")
            continue
        fn = getattr(module, "run", None)
        if not callable(fn) or len(inspect.signature(fn).parameters) != 1:
            problems.append(f"benchmarks/gpu_{topic}.py must define run(ceilings) -> list[dict]")
            continue
        cases = ", ".join(f"{k}: {v}" for k, v in _case_lists(module).items()) or "cases built in run()"
        hook = getattr(module, "dry_run", None)
        if callable(hook):  # the topic's own CPU run at tiny sizes
            try:
                rows = hook()
            except Exception as exc:  # noqa: BLE001 - reported as a problem of that topic
                problems.append(f"benchmarks/gpu_{topic}.py dry_run() raised {type(exc).__name__}: {exc}")
                rows = []
            bad = [r for r in rows if "error" in r]
            if bad:
                problems.append(f"benchmarks/gpu_{topic}.py dry_run(): {len(bad)} rows with errors: {bad[:3]}")
            cases += f"; dry_run(): {len(rows)} rows"
        print(f"  {topic:<16} budget {budget:>3} s  ({cases})")
    total = sum(b for _, b in TOPICS)
    print(f"  topics' budgets add up to {total} s (stage default {DEFAULT_BUDGET_S} s: the last ones get what is left)")

    sink = harness.ResultSink("dry_run", results_dir, ceilings={"hbm_copy_gbps": 1.0})
    row = {"name": "dry", "variant": "none", "ms": 1.0, "peak_mem_bytes": None}
    sink.add(row)
    partial = json.loads(sink.path.read_text())
    sink.write(complete=True, rows=[row], wall_s=0.0)
    final = json.loads(sink.path.read_text())
    if partial["complete"] or len(partial["results"]) != 1 or not final["complete"] or \
            final["results"] != [row] or "device" not in final["environment"]:
        problems.append(f"the JSON writer did not round-trip: {partial} / {final}")
    sink.path.unlink()
    for p in problems:
        print(f"run_gpu --dry-run: {p}", file=sys.stderr)
    print(f"run_gpu --dry-run: {len(TOPICS)} topics, {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


# ---------------------------------------------------------------------------------------------- main
def _parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run_gpu", description=__doc__.split("\n")[0])
    ap.add_argument("topics", nargs="*", help=f"topics to run, in this order (default, by priority: {topic_names()})")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all topics together")
    ap.add_argument("--results-dir", type=Path, default=HERE / "results")
    ap.add_argument("--ceilings", type=Path, help="JSON from --measure-ceilings (default: measure now)")
    ap.add_argument("--measure-ceilings", type=Path, metavar="FILE", help="measure the ceilings into FILE, then exit")
    ap.add_argument("--list", action="store_true", help="print the topics and budgets, then exit")
    ap.add_argument("--dry-run", action="store_true", help="CPU check of everything up to the device")
    ap.add_argument("--child", metavar="TOPIC", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str]) -> int:
    args = _parse(argv)
    if args.list:
        for topic, budget in TOPICS:
            print(f"{topic}\t{budget}")
        return 0
    if args.dry_run:
        return dry_run(args.results_dir)
    unknown = [t for t in args.topics if t not in found_topics() and "." not in t]
    if unknown:
        print(f"benchmarks.run_gpu: unknown topic(s) {unknown}; known: {found_topics()}", file=sys.stderr)
        return 2
    if args.child:  # the parent checked the device
        return run_topic(args.child, args.budget, read_ceilings(args.ceilings), args.results_dir)
    import torch

    if not torch.cuda.is_available():
        print("benchmarks.run_gpu: no CUDA device; GPU benchmarks need one (--dry-run checks the rest)",
              file=sys.stderr)
        return 2
    if args.measure_ceilings:
        body = write_ceilings(args.measure_ceilings)
        print(f"ceilings: {body['ceilings']}")
        return 0
    ceilings_path = args.ceilings
    if ceilings_path is None:
        ceilings_path = Path(tempfile.mkdtemp(prefix="vefast_ceilings_")) / "ceilings.json"
        write_ceilings(ceilings_path)
    print(f"ceilings: {read_ceilings(ceilings_path)}")
    topics = args.topics or topic_names() + [t for t in found_topics() if t not in topic_names()]
    return run_all(topics, args.budget, ceilings_path, args.results_dir)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(sys.argv[1:]))
