"""Run every GPU benchmark (``benchmarks/gpu_*.py``) and write ``benchmarks/results/<topic>.json``.

    python -m benchmarks.run_gpu [topic ...]
"""
from __future__ import annotations

import importlib
import sys
import traceback
from pathlib import Path

import torch

from .harness import hbm_bandwidth_gbps, matmul_tflops, write_results


def main(argv: list[str]) -> int:
    if not torch.cuda.is_available():
        print("benchmarks.run_gpu: no CUDA device; GPU benchmarks need one", file=sys.stderr)
        return 2
    topics = argv or sorted(p.stem[4:] for p in Path(__file__).parent.glob("gpu_*.py"))
    ceilings = {"hbm_copy_gbps": hbm_bandwidth_gbps(), "bf16_gemm_tflops": matmul_tflops()}
    print(f"ceilings: {ceilings}")
    failed = 0
    for topic in topics:
        try:
            rows = importlib.import_module(f"benchmarks.gpu_{topic}").run(ceilings)
        except Exception:  # report and go on with the other topics
            traceback.print_exc()
            failed += 1
            continue
        path = write_results(topic, rows, ceilings=ceilings)
        print(f"{topic}: {len(rows)} rows -> {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
