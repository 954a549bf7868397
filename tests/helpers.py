"""Helpers shared by the tests (imported as ``from helpers import ...``; tests/ is on sys.path)."""
from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import zlib
from collections.abc import Iterable

import pytest
import torch
from hypothesis import settings

# Triton picks its driver at import: the interpreter can only be switched on for a whole process
# (conftest does so in the CPU lane); eager runs inside it switch the ops to their reference paths.
INTERPRETER_LANE = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and not torch.cuda.is_available()
needs_interpreter = pytest.mark.skipif(not INTERPRETER_LANE, reason="needs a process started with TRITON_INTERPRET=1")


def examples(n: int) -> int:
    """A hypothesis test's example count: ``n`` in the CPU lane, at most the loaded profile's (``vefast-gpu``
    on a GPU, where every new shape is a Triton compile)."""
    return min(n, settings.default.max_examples)


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


def fallback_matches(key: str, pattern: str) -> bool:
    """Whether a fallback key ``op:reason`` is declared by ``pattern``: an op name alone
    (``"vf_loss"``) declares all its reasons, else an fnmatch pattern on the key (``"*:float64"``)."""
    return fnmatch.fnmatchcase(key, pattern if ":" in pattern or "*" in pattern else f"{pattern}:*") or key == pattern


def undeclared_fallbacks(events: Iterable, patterns: Iterable[str]) -> dict[str, tuple[int, str]]:
    """The fallback events (``_common.FallbackEvent``) that no pattern declares: key -> (count, message)."""
    patterns = tuple(patterns)
    bad: dict[str, tuple[int, str]] = {}
    for e in events:
        if not any(fallback_matches(e.key, p) for p in patterns):
            n, _ = bad.get(e.key, (0, ""))
            bad[e.key] = (n + 1, e.message)
    return bad



def pinned_config(nodeid: str, n: int) -> int:
    """The autotune config (of ``n``) a gpu-lane test not marked ``gpu`` runs (conftest.one_autotune_config)."""
    return zlib.crc32(nodeid.encode()) % n


def train_tiny_tokenizer(out, *, steps: int = 2) -> None:
    """The tiny tokenizer the recipe tests build their latents with: ``steps`` steps on 16 synthetic
    images, no alignment / LPIPS / GAN (random weights, nothing downloaded), written to ``out``."""
    from vefast.recipes.config import load_config
    from vefast.recipes.tokenizer import TokenizerConfig, train

    cfg = load_config(TokenizerConfig, "tokenizer_tiny.yaml",
                      ["loss.align=none", "loss.lpips_weight=0", "loss.gan_weight=0", f"train.steps={steps}",
                       "train.stats_images=8", "train.val_images=4"])
    if train(cfg, out=out, synthetic=16, progress=False) != 0:
        raise RuntimeError(f"the tiny tokenizer did not train into {out}")


def launch_report(proc: subprocess.CompletedProcess, tail: int = 3000) -> str:
    """A failed (torchrun) launch's stderr for an assertion message: each rank's exception line first
    (torchrun prints the root-cause rank's traceback far above its own summary), then the tail."""
    errors = [line for line in proc.stderr.splitlines()
              if re.match(r"\[rank\d+\]: [\w.]*(Error|Exception|Interrupt)\b", line)]
    return "\n".join(errors + ["...", proc.stderr[-tail:]])
