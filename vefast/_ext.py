"""Loads the compiled CUDA extension (``vefast/_C.abi3.so``) and explains why it is absent.

The extension is a torch operator library, not a CPython module: csrc/ registers its ops with
``TORCH_LIBRARY(vefast_cuda, ...)`` and it has no ``PyInit_``, so ``torch.ops.load_library`` loads the
same file under any Python version (the GPU machine runs 3.12, the build machine 3.11). It stays tied
to the torch it was built against: like xformers, the build metadata (``vefast/_build_info.json``,
written by setup.py) is checked against the running torch *before* the library is loaded, since a
binary built against another torch fails with undefined symbols or crashes.

:func:`load` returns an object whose attributes are the ops, called with the argument order of their
schemas (``ext.attention_fwd(q, k, v, scale, ...)``); ``ext.build_info()`` gives a dict.
Nothing here runs at ``import vefast``; the first call of :func:`load` does the work, once.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
_INFO_PATH = _HERE / "_build_info.json"
# setup.py names it _C.abi3.so (py_limited_api); _C.so is what a manual or CMake build would name it.
_LIB_NAMES = ("_C.abi3.so", "_C.so")
NAMESPACE = "vefast_cuda"
_BUILD_HINT = ("it is optional (the Triton ops and SDPA run without it; a pure-Python install, e.g. the wheel or "
               "VEFAST_SKIP_CUDA_BUILD=1, has none); build it with nvcc on PATH (or CUDA_HOME set) against your "
               "torch: pip install --no-build-isolation --no-binary vefast vefast (from the sdist), or in a "
               "checkout pip install --no-build-isolation -e . (make install)")


class ExtensionUnavailable(RuntimeError):
    """The CUDA extension is not built, not loadable, or built for another torch."""


def build_info() -> dict[str, Any] | None:
    """The metadata recorded when the extension was built, or None if it never was."""
    if not _INFO_PATH.exists():
        return None
    return json.loads(_INFO_PATH.read_text())


def library_path() -> Path | None:
    """The extension's shared library in the package directory, or None if there is none."""
    for name in _LIB_NAMES:
        path = _HERE / name
        if path.is_file():
            return path
    return None


class Extension:
    """The loaded ops: ``ext.<op>(...)`` calls ``torch.ops.vefast_cuda.<op>.default(...)``.

    An op the library does not register is an ``AttributeError`` (``hasattr`` tells whether it was built).
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        import torch

        packet = getattr(getattr(torch.ops, NAMESPACE), name)  # AttributeError when not registered
        op = packet.default
        setattr(self, name, op)  # resolved once; later lookups skip __getattr__
        return op

    def build_info(self) -> dict[str, str]:
        """torch/CUDA versions and SM list compiled into the binary."""
        import torch

        torch_version, cuda_version, cuda_archs = getattr(torch.ops, NAMESPACE).build_info.default()
        return {"torch_version": torch_version, "cuda_version": cuda_version, "cuda_archs": cuda_archs}

    def __repr__(self) -> str:
        return f"<vefast CUDA extension torch.ops.{NAMESPACE} from {self.path}>"


def _torch_base(version: str) -> str:
    return version.split("+")[0]


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Extension | None, str]:
    import torch

    info = build_info()
    path = library_path()
    if info is None or path is None:
        what = "vefast/_build_info.json" if path is not None else "vefast/_C.abi3.so"
        stale = sorted(p.name for p in _HERE.glob("_C.cpython-*"))
        if stale:  # a CPython-module build from before the operator library
            return None, (f"the CUDA extension was not built ({what} is missing; {stale[0]} is an older build "
                          f"that is no longer loaded): reinstall vefast to rebuild it; {_BUILD_HINT}")
        return None, f"the CUDA extension was not built ({what} is missing): {_BUILD_HINT}"
    built = info.get("torch_version", "?")
    if _torch_base(built) != _torch_base(torch.__version__) or info.get("torch_cuda_version") != torch.version.cuda:
        return None, (f"the CUDA extension was built for torch {built} (CUDA {info.get('torch_cuda_version')}) but "
                      f"torch {torch.__version__} (CUDA {torch.version.cuda}) is running: reinstall vefast to "
                      "rebuild it")
    if not hasattr(getattr(torch.ops, NAMESPACE), "build_info"):  # not loaded yet in this process
        try:
            torch.ops.load_library(str(path))
        except (OSError, RuntimeError) as exc:
            return None, f"the CUDA extension {path.name} failed to load: {exc}"
    return Extension(path), ""


def load() -> Extension:
    """The extension's ops; raises :class:`ExtensionUnavailable` with the reason otherwise."""
    ext, reason = _load()
    if ext is None:
        raise ExtensionUnavailable(reason)
    return ext


def available() -> bool:
    return _load()[0] is not None


def unavailable_reason() -> str:
    """Empty when the extension loads, else why it does not."""
    return _load()[1]
