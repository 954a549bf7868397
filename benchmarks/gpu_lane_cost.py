"""The gpu lane's Triton compile bill, measured on a CPU machine (docs/speed_checks.md, "GPU lane").

A GPU run compiles every distinct specialization of every Triton kernel the lane launches (the JIT cache
key: constexpr values, argument dtypes, 16-byte alignment of pointers, width and ``% 16`` of integers,
num_warps / num_stages); the autotuned ``_vf_fwd_kernel`` / ``_vf_bwd_kernel`` compile each of their GPU configs per key.

1. record: ``pytest -m gpu_lane`` in the CPU lane (TRITON_INTERPRET=1, the GPU's hypothesis profile) with a launch hook
   (:class:`SpecializationCounter`, also ``pytest --count-specializations PATH``) -> JSON;
2. compile: a fresh process (no interpreter) compiles every recorded specialization for sm_90 with
   ``triton.compile`` (Triton 3.6 needs no GPU for that; ptxas ships in the wheel) and times each.

    python -m benchmarks.gpu_lane_cost [--out DIR] [--record-only] [-- PYTEST_ARGS...]

Not covered: specializations of the tests marked ``gpu`` (skipped on a CPU: their real sizes add
a few per test) and launcher choices that depend on the GPU (SM count, ``is_cuda``) beyond the
vf_loss autotuner.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# kernel -> (module, configs function, backward flag of that function)
AUTOTUNED = {"_vf_fwd_kernel": ("vefast.ops.vf_loss", "_gpu_configs", False),
             "_vf_bwd_kernel": ("vefast.ops.vf_loss", "_gpu_configs", True)}
_DTYPES = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float64": "fp64",
           "torch.int64": "i64", "torch.int32": "i32", "torch.int16": "i16", "torch.int8": "i8",
           "torch.uint8": "u8", "torch.bool": "i1"}


class SpecializationCounter:
    """pytest plugin: records every interpreted Triton launch; writes the distinct specializations, the
    test file that first launched each, and each file's CPU run time, to ``path`` (JSON)."""

    def __init__(self, path: str):
        from triton.runtime.interpreter import InterpretedFunction
        self.path, self.specs, self.seconds, self._t0 = path, {}, {}, 0.0
        self._file = self._nodeid = None
        self._gpu_marked = False
        counter, run = self, InterpretedFunction.run

        def recording_run(fn_self, *args, grid, warmup, **kwargs):
            counter.record(fn_self, args, kwargs)
            return run(fn_self, *args, grid=grid, warmup=warmup, **kwargs)
        InterpretedFunction.run = recording_run

    @staticmethod
    def _arg(value, constexpr: bool) -> list:
        import torch
        if constexpr:
            ok = value is None or isinstance(value, (bool, int, float, str))
            return ["constexpr", value if ok else {"repr": repr(value)}]
        if value is None:
            return ["constexpr", None]
        if isinstance(value, torch.Tensor):
            return ["*" + _DTYPES.get(str(value.dtype), str(value.dtype)), value.data_ptr() % 16 == 0]
        if isinstance(value, bool):
            return ["i1", False]
        if isinstance(value, int):
            return ["i32" if -2**31 <= value < 2**31 else "i64", value % 16 == 0]
        if isinstance(value, float):
            return ["fp32", False]
        return [type(value).__name__, False]

    def record(self, fn, args, kwargs) -> None:
        params = list(inspect.signature(fn.fn).parameters.values())
        bound = dict(zip([p.name for p in params], args)) | {k: v for k, v in kwargs.items() if k in fn.arg_names}
        sig = [[p.name, *self._arg(bound[p.name], "constexpr" in str(p.annotation))] for p in params if p.name in bound]
        spec = {"module": fn.fn.__module__, "kernel": fn.fn.__qualname__, "args": sig,
                "num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3)}
        key = json.dumps(spec, sort_keys=True, default=repr)
        if key not in self.specs:
            self.specs[key] = dict(spec, file=self._file, nodeid=self._nodeid, gpu_marked=self._gpu_marked)

    def pytest_runtest_protocol(self, item):
        self._file, self._t0 = item.nodeid.split("::")[0], time.perf_counter()
        self._nodeid, self._gpu_marked = item.nodeid, "gpu" in item.keywords

    def pytest_runtest_logfinish(self, nodeid, location):
        file = nodeid.split("::")[0]
        self.seconds[file] = self.seconds.get(file, 0.0) + time.perf_counter() - self._t0

    def pytest_sessionfinish(self, session):
        kernels: dict[str, int] = {}
        for s in self.specs.values():
            kernels[s["kernel"]] = kernels.get(s["kernel"], 0) + 1
        report = {"specializations": len(self.specs), "by_kernel": dict(sorted(kernels.items())),
                  "cpu_seconds_by_file": {k: round(v, 1) for k, v in sorted(self.seconds.items())},
                  "specs": list(self.specs.values())}
        Path(self.path).write_text(json.dumps(report, indent=1, default=repr))


def _variants(spec: dict) -> list[tuple[dict, int, int]]:
    """(constexpr overrides, num_warps, num_stages) a GPU compiles for one recorded specialization: every
    autotune config for a test marked ``gpu``, the one ``conftest.one_autotune_config`` pins otherwise."""
    if spec["kernel"] not in AUTOTUNED:
        return [({}, spec["num_warps"], spec["num_stages"])]
    module, configs, backward = AUTOTUNED[spec["kernel"]]
    fp32_features = any(arg[0] == "f_ptr" and arg[1] == "*fp32" for arg in spec["args"])  # its own configs
    cfgs = getattr(importlib.import_module(module), configs)(fp32_features, backward)
    if not spec["gpu_marked"]:
        sys.path.insert(0, str(ROOT / "tests"))
        from helpers import pinned_config
        cfgs = [cfgs[pinned_config(spec["nodeid"], len(cfgs))]]
    extra = {} if backward else {"DOT_F32": False}  # the forward's interpreter switch, off on a GPU
    return [(dict(cfg.kwargs, **extra), cfg.num_warps, cfg.num_stages) for cfg in cfgs]


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas): a compile's cost on an idle core."""
    import resource
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def _constexpr(value):
    """A recorded constexpr value: a ``{"repr": "triton.language.float64"}`` dtype is resolved."""
    if isinstance(value, dict) and value["repr"].startswith("triton.language."):
        import triton.language as tl
        return getattr(tl, value["repr"].removeprefix("triton.language."), value)
    return value


def compile_all(record: dict, arch: int = 90) -> dict:
    """Compile every recorded specialization (and autotune config) for ``sm_<arch>``; seconds per file."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    target = GPUTarget("cuda", arch, 32)
    by_file: dict[str, dict] = {}
    skipped: list[str] = []
    failed: list[str] = []
    for spec in record["specs"]:
        fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
        while not isinstance(fn, JITFunction):  # an Autotuner / Heuristics wraps the JITFunction
            fn = fn.fn
        for overrides, warps, stages in _variants(spec):
            signature, constexprs, attrs = {}, {}, {}
            resolvable = True
            for i, (name, kind, value) in enumerate(spec["args"]):
                if kind == "constexpr":
                    value = _constexpr(overrides.get(name, value))
                    resolvable = resolvable and not isinstance(value, dict)
                    signature[name], constexprs[name] = "constexpr", value
                else:
                    signature[name] = kind
                    if value:
                        attrs[(i,)] = [["tt.divisibility", 16]]
            if not resolvable:
                skipped.append(spec["kernel"])
                continue
            t0, c0 = time.perf_counter(), _cpu_seconds()
            try:
                triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                               options={"num_warps": warps, "num_stages": stages})
            except Exception as e:  # the kernel's source changed since the record, say
                failed.append(f"{spec['kernel']}: {type(e).__name__}: {str(e).splitlines()[-1][:200]}")
                continue
            row = by_file.setdefault(spec["file"], {"compiles": 0, "compile_s": 0.0, "compile_cpu_s": 0.0})
            row["compiles"] += 1
            row["compile_s"] += time.perf_counter() - t0
            row["compile_cpu_s"] += _cpu_seconds() - c0
    return {"by_file": by_file, "skipped": skipped, "failed": failed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_lane_cost", help="directory for record.json and cost.json")
    ap.add_argument("--record-only", action="store_true")
    ap.add_argument("--compile", metavar="RECORD", help=argparse.SUPPRESS)  # the compile process
    ap.add_argument("pytest_args", nargs="*", default=[])
    args = ap.parse_args(argv)
    if args.compile:
        record = json.loads(Path(args.compile).read_text())
        print(json.dumps(compile_all(record)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = out / "record.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.setdefault("HYPOTHESIS_PROFILE", "vefast-gpu")  # the examples the GPU draws (derandomized)
    t0 = time.perf_counter()
    rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu_lane",
                         "--continue-on-collection-errors", "--count-specializations", str(rec),
                         *(args.pytest_args or ["tests"])], cwd=ROOT, env=env).returncode
    print(f"recorded in {time.perf_counter() - t0:.0f} s" + (f" (pytest rc={rc}: see above)" if rc else ""))
    if args.record_only:
        return 0
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str((out / "triton_cache").resolve())  # cold cache: what a fresh GPU machine sees
    res = subprocess.run([sys.executable, "-m", "benchmarks.gpu_lane_cost", "--compile", str(rec)], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if res.returncode:
        print(res.stderr[-4000:])
        return res.returncode
    cost = json.loads(res.stdout.strip().splitlines()[-1])
    record = json.loads(rec.read_text())
    cost["cpu_seconds_by_file"] = record["cpu_seconds_by_file"]
    (out / "cost.json").write_text(json.dumps(cost, indent=1))
    print(f"{'file':40s} {'compiles':>8s} {'compile wall s':>15s} {'compile CPU s':>14s} {'CPU-lane run s':>15s}")
    for f, row in sorted(cost["by_file"].items()):
        print(f"{f:40s} {row['compiles']:8d} {row['compile_s']:15.1f} {row['compile_cpu_s']:14.1f} "
              f"{record['cpu_seconds_by_file'].get(f, 0):15.1f}")
    n = sum(r["compiles"] for r in cost["by_file"].values())
    s = sum(r["compile_s"] for r in cost["by_file"].values())
    c = sum(r["compile_cpu_s"] for r in cost["by_file"].values())
    print(f"{'total':40s} {n:8d} {s:15.1f} {c:14.1f}   (not compiled here: "
          f"{len(cost['skipped'])} unresolved constexprs, {len(cost['failed'])} failures)")
    for line in sorted(set(cost["failed"])):
        print("  failed:", line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
