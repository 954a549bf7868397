"""Lazy re-exports (PEP 562): ``import vefast`` imports neither Triton nor any op module."""
from __future__ import annotations

import importlib
from typing import Any


def attach(package: str, exports: dict[str, str]):
    """Return ``(__getattr__, __dir__)`` resolving ``name`` from ``exports[name]`` on first use."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        globals_ = importlib.import_module(package).__dict__
        globals_[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(importlib.import_module(package).__dict__) | set(exports))

    return __getattr__, __dir__
