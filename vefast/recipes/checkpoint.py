"""Checkpoints without pickle: safetensors for every tensor, JSON for everything else.

Layout of one checkpoint ``RUN/checkpoints/step-00001000/``::

    <name>.safetensors   one file per tensor tree (model, ema, disc, optimizer tensors, ...)
    state.json           step, data position, RNG scheme, config, and the non-tensor parts of the
                         optimizer states (tensors are referenced by key into their safetensors file)

Writes are atomic: files go to a temporary directory beside the target, which is renamed into
place when complete; ``RUN/checkpoints/latest`` (a one-line text file) is replaced the same way.
A crash mid-write leaves the previous checkpoint untouched. Loading reads safetensors and JSON only
(never ``torch.load``), so a checkpoint cannot execute code.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"
LATEST = "latest"
FORMAT_VERSION = 1


def flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """Turn a nested structure of dicts/lists/tuples/scalars/tensors into JSON-safe data.

    Tensors are moved into ``tensors`` under a dotted key and replaced by ``{"__tensor__": key}``;
    dicts with non-string keys and tuples are tagged so that :func:`unflatten` restores them exactly.
    """
    if isinstance(obj, torch.Tensor):
        key = prefix or "tensor"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and "__tensor__" not in obj:
            return {k: flatten(v, tensors, f"{prefix}.{k}" if prefix else k) for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise TypeError(f"checkpoint: cannot store dict key {k!r} of type {type(k).__name__} at {prefix!r}")
            items.append([k, flatten(v, tensors, f"{prefix}.{k}" if prefix else str(k))])
        return {"__items__": items}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint: cannot store a {type(obj).__name__} at {prefix!r} (only tensors, numbers, strings, lists, dicts)")


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            key = obj["__tensor__"]
            if key not in tensors:
                raise ValueError(f"checkpoint: tensor {key!r} referenced by state.json is missing")
            return tensors[key]
        if set(obj) == {"__items__"}:
            return {k: unflatten(v, tensors) for k, v in obj["__items__"]}
        if set(obj) == {"__tuple__"}:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
        return {k: unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(run_dir: str | Path, step: int, *, tensors: dict[str, dict[str, torch.Tensor]],
                    states: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
                    keep: int = 0) -> Path:
    """Write checkpoint ``step`` atomically under ``run_dir/checkpoints`` and point ``latest`` at it.

    ``tensors``: name -> flat ``{key: tensor}`` (model / EMA state dicts), one safetensors file each.
    ``states``: name -> nested state with tensors inside (optimizer ``state_dict()``); tensors go to
    ``<name>.safetensors``, the rest to ``state.json``. ``meta``: JSON-safe extras (step, data position,
    config). ``keep > 0`` deletes all but the newest ``keep`` checkpoints after the write.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-step-{step:08d}-"))
    try:
        for name, sd in tensors.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp / f"{name}.safetensors"))
        state_json: dict[str, Any] = {"format": FORMAT_VERSION, "step": step, "meta": meta or {}, "states": {}}
        for name, st in (states or {}).items():
            flat: dict[str, torch.Tensor] = {}
            state_json["states"][name] = flatten(st, flat, "")
            save_file(flat, str(tmp / f"{name}.safetensors"))
        (tmp / STATE_FILE).write_text(json.dumps(state_json, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _atomic_write_text(root / LATEST, final.name + "\n")
    if keep > 0:
        for old in sorted(root.glob("step-*"))[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` points at, or None when the run has none."""
    root = Path(run_dir) / "checkpoints"
    marker = root / LATEST
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"checkpoint {str(path)!r} named by {str(marker)!r} is incomplete (no {STATE_FILE})")
    return path


class Checkpoint:
    """A loaded checkpoint: ``step``, ``meta``, ``tensors(name)`` and ``state(name)``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        state_file = self.path / STATE_FILE
        if not state_file.is_file():
            raise ValueError(f"{str(self.path)!r} is not a vefast checkpoint (no {STATE_FILE})")
        self._json = json.loads(state_file.read_text())
        if self._json.get("format") != FORMAT_VERSION:
            raise ValueError(f"checkpoint {str(self.path)!r}: format {self._json.get('format')!r}, expected {FORMAT_VERSION}")
        self.step: int = int(self._json["step"])
        self.meta: dict[str, Any] = self._json.get("meta", {})

    def has(self, name: str) -> bool:
        return (self.path / f"{name}.safetensors").is_file()

    def tensors(self, name: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        f = self.path / f"{name}.safetensors"
        if not f.is_file():
            raise ValueError(f"checkpoint {str(self.path)!r} has no {name!r} ({f.name} missing)")
        return load_file(str(f), device=str(device))

    def state(self, name: str) -> Any:
        if name not in self._json["states"]:
            raise ValueError(f"checkpoint {str(self.path)!r} has no state {name!r}")
        return unflatten(self._json["states"][name], self.tensors(name))


def load_checkpoint(path_or_run: str | Path) -> Checkpoint:
    """Open a checkpoint directory, or the latest checkpoint of a run directory."""
    p = Path(path_or_run)
    if (p / STATE_FILE).is_file():
        return Checkpoint(p)
    latest = latest_checkpoint(p)
    if latest is None:
        raise ValueError(f"{str(p)!r}: no checkpoint found (expected {p}/checkpoints/latest or {p}/{STATE_FILE})")
    return Checkpoint(latest)
