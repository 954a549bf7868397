"""Helpers shared by the tests (imported as ``from helpers import ...``; tests/ is on sys.path)."""
from __future__ import annotations

import os

import pytest
import torch

# Triton picks its driver at import: the interpreter can only be switched on for a whole process
# (conftest does so in the CPU lane); eager runs inside it switch the ops to their reference paths.
INTERPRETER_LANE = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and not torch.cuda.is_available()
needs_interpreter = pytest.mark.skipif(not INTERPRETER_LANE, reason="needs a process started with TRITON_INTERPRET=1")


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN (or a sentinel for integers) so unwritten outputs are caught."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2**31))


def err_bound(fused: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor, *, factor: float = 2.0,
              floor: float = 0.0) -> tuple[float, float]:
    """The flash-attn rule: max |fused - ref64| must be <= factor * max |eager - ref64| + floor.

    ``eager`` is the same computation done by eager PyTorch in the input dtype. Returns both errors.
    """
    e_fused = (fused.double() - ref64).abs().max().item()
    e_eager = (eager.double() - ref64).abs().max().item()
    assert e_fused <= factor * e_eager + floor, f"fused error {e_fused:.3e} > {factor} x eager error {e_eager:.3e} + {floor:.1e}"
    return e_fused, e_eager


def strided(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view holding the values of ``t`` (every other element of a wider buffer)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    view.copy_(t)
    return view
