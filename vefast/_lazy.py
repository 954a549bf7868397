"""Lazy re-exports (PEP 562): ``import vefast`` imports neither Triton nor any op module."""
from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any


def attach(package: str, exports: dict[str, str], submodules: Iterable[str] = ()):
    """Return ``(__getattr__, __dir__)`` resolving ``name`` from ``exports[name]`` on first use, and the
    subpackages in ``submodules`` (``vefast.nn`` after a plain ``import vefast``) by importing them."""
    submodules = frozenset(submodules)

    def __getattr__(name: str) -> Any:
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")  # the import binds it on the package
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        globals_ = importlib.import_module(package).__dict__
        globals_[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(importlib.import_module(package).__dict__) | set(exports) | submodules)

    return __getattr__, __dir__
