"""Loads the compiled extension ``vefast._C`` and explains why it is absent.

Like xformers, the build metadata (``vefast/_build_info.json``, written by setup.py) is checked
against the running torch *before* the binary is imported: a binary built against another torch
fails with undefined symbols or crashes, so a mismatch is reported instead of attempted.
Nothing here runs at ``import vefast``; the first call of :func:`load` does the work, once.
"""
from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

_INFO_PATH = Path(__file__).with_name("_build_info.json")


class ExtensionUnavailable(RuntimeError):
    """The CUDA extension is not built, not loadable, or built for another torch."""


def build_info() -> dict[str, Any] | None:
    """The metadata recorded when the extension was built, or None if it never was."""
    if not _INFO_PATH.exists():
        return None
    return json.loads(_INFO_PATH.read_text())


def _torch_base(version: str) -> str:
    return version.split("+")[0]


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ModuleType | None, str]:
    import torch

    info = build_info()
    if info is None:
        return None, ("vefast._C was not built: install with nvcc on PATH or CUDA_HOME set, and without "
                      "VEFAST_SKIP_CUDA_BUILD=1 (pip install --no-build-isolation -e .)")
    built = info.get("torch_version", "?")
    if _torch_base(built) != _torch_base(torch.__version__) or info.get("torch_cuda_version") != torch.version.cuda:
        return None, (f"vefast._C was built for torch {built} (CUDA {info.get('torch_cuda_version')}) but torch "
                      f"{torch.__version__} (CUDA {torch.version.cuda}) is running: reinstall vefast to rebuild it")
    try:
        module = importlib.import_module("vefast._C")
    except ImportError as exc:
        return None, f"vefast._C failed to import: {exc}"
    return module, ""


def load() -> ModuleType:
    """The extension module; raises :class:`ExtensionUnavailable` with the reason otherwise."""
    module, reason = _load()
    if module is None:
        raise ExtensionUnavailable(reason)
    return module


def available() -> bool:
    return _load()[0] is not None


def unavailable_reason() -> str:
    """Empty when the extension loads, else why it does not."""
    return _load()[1]
