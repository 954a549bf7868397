"""Checkpoints without pickle: safetensors for every tensor, JSON for everything else.

Layout of one checkpoint ``RUN/checkpoints/step-00001000/``::

    <name>.safetensors   one file per tensor tree (model, ema, disc, optimizer tensors, ...)
    state.json           step, data position, RNG scheme, config, and the non-tensor parts of the
                         optimizer states (tensors are referenced by key into their safetensors file)

Writes are atomic and durable: files go to a temporary directory beside the target and are
fsynced, the directory is renamed into place when complete and its parent fsynced;
``RUN/checkpoints/latest`` (a one-line text file) is replaced the same way. A crash mid-write leaves
the previous checkpoint untouched; the temporaries a killed writer leaves behind are removed when
the run is opened again (:func:`load_checkpoint` of the run, :func:`save_checkpoint`).

Integrity: ``state.json`` records the SHA-256 of every tensor file (hashed right after writing, from
the page cache), and loading verifies it, so a bit flip or a truncated file is refused with the
file's name instead of loading wrong weights. ``latest`` may only name a ``step-*`` directory inside
the run's ``checkpoints/``. Loading reads safetensors and JSON only (never ``torch.load``), so a
checkpoint cannot execute code.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"
LATEST = "latest"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step-\d{8}")
_TMP_GLOBS = (".tmp-step-*", f".{LATEST}.*.tmp")


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


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_and_hash(path: Path) -> str:
    """fsync ``path`` and return its SHA-256 (read back from the page cache, in 8 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        for chunk in iter(lambda: f.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete what a killed writer left in ``run_dir/checkpoints`` (``.tmp-step-*`` directories, ``latest``
    temporaries); returns the removed paths. Called when a run is resumed and before each save."""
    root = Path(run_dir) / "checkpoints"
    removed = [p for pattern in _TMP_GLOBS for p in root.glob(pattern)] if root.is_dir() else []
    for p in removed:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return removed


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
    remove_stale_temporaries(run_dir)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-step-{step:08d}-"))
    try:
        state_json: dict[str, Any] = {"format": FORMAT_VERSION, "step": step, "meta": meta or {}, "states": {},
                                      "sha256": {}}

        def write(name: str, flat: dict[str, torch.Tensor]) -> None:
            f = tmp / f"{name}.safetensors"
            save_file({k: v.detach().cpu().contiguous() for k, v in flat.items()}, str(f))
            state_json["sha256"][f.name] = _sync_and_hash(f)

        for name, sd in tensors.items():
            write(name, sd)
        for name, st in (states or {}).items():
            flat: dict[str, torch.Tensor] = {}
            state_json["states"][name] = flatten(st, flat, "")
            write(name, flat)
        with open(tmp / STATE_FILE, "w") as f:
            f.write(json.dumps(state_json, indent=1))
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
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
    name = marker.read_text().strip()
    if not _STEP_DIR.fullmatch(name):
        raise ValueError(f"{str(marker)!r} names {name!r}, not a checkpoint of this run (expected step-NNNNNNNN "
                         f"inside {str(root)!r}); refusing to follow it")
    path = root / name
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
        try:
            self._json = json.loads(state_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"checkpoint file {str(state_file)!r} is corrupt (not JSON: {exc})") from None
        if not isinstance(self._json, dict) or "step" not in self._json:
            raise ValueError(f"checkpoint file {str(state_file)!r} is corrupt (no step)")
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
        expected = self._json.get("sha256", {}).get(f.name)
        if expected is not None and _file_hash(f) != expected:
            raise ValueError(f"checkpoint file {str(f)!r} is corrupt: its SHA-256 differs from the one recorded "
                             f"in {STATE_FILE} when it was written")
        try:
            return load_file(str(f), device=str(device))
        except Exception as exc:  # safetensors raises its own error types for truncated / bad headers
            raise ValueError(f"checkpoint file {str(f)!r} is unreadable ({type(exc).__name__}: {exc})") from None

    def state(self, name: str) -> Any:
        if name not in self._json["states"]:
            raise ValueError(f"checkpoint {str(self.path)!r} has no state {name!r}")
        return unflatten(self._json["states"][name], self.tensors(name))


def load_checkpoint(path_or_run: str | Path) -> Checkpoint:
    """Open a checkpoint directory, or the latest checkpoint of a run directory."""
    p = Path(path_or_run)
    if (p / STATE_FILE).is_file():
        return Checkpoint(p)
    remove_stale_temporaries(p)
    latest = latest_checkpoint(p)
    if latest is None:
        raise ValueError(f"{str(p)!r}: no checkpoint found (expected {p}/checkpoints/latest or {p}/{STATE_FILE})")
    return Checkpoint(latest)


# ----------------------------------------------------------------------------------------------
# run directories

RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "config.yaml", "latent_stats.json", "samples", "tensorboard")


def check_run_dir(out: str | Path, *, resume: bool, overwrite: bool, command: str) -> None:
    """Refuse to start a new run in a directory that holds one (unless ``overwrite``): starting over
    silently would move ``latest`` back, leave the old checkpoints beside the new ones and mix both
    runs in ``metrics.jsonl``. Every rank calls it before the process group forms, so before any write."""
    from .config import ConfigError

    if resume and overwrite:
        raise ConfigError(f"{command}: --resume and --overwrite contradict each other; give one")
    out = Path(out)
    if resume or not out.is_dir():
        return
    found = [name for name in RUN_OUTPUTS[:3] if (out / name).exists()]
    if found and not overwrite:
        raise ConfigError(f"{command}: --out {str(out)!r} already holds a run ({', '.join(found)}); "
                          "continue it with --resume, start it over with --overwrite (deletes its checkpoints, "
                          "metrics and samples), or choose another --out")


def clear_run_dir(out: str | Path) -> list[Path]:
    """Delete what a recipe wrote in ``out`` (``RUN_OUTPUTS``; other files stay); returns what went."""
    gone = [Path(out) / name for name in RUN_OUTPUTS if (Path(out) / name).exists()]
    for p in gone:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return gone


# ----------------------------------------------------------------------------------------------
# tokenizers

def load_tokenizer(run_or_ckpt: str | Path, device: torch.device | str = "cpu"):
    """(autoencoder in eval mode, its ``TokenizerConfig``, latent stats or None).

    ``run_or_ckpt``: a ``train-tokenizer`` run or checkpoint directory, or an LDM / VA-VAE autoencoder
    weights file (``.pt`` / ``.ckpt`` / ``.pth``, read weights-only; its architecture is read off the
    weights and it has no stored latent stats). Imports no trainer code.
    """
    from .config import build_config
    from .tokenizer_config import ARCHITECTURE_KEYS, TokenizerConfig, build_autoencoder

    p = Path(run_or_ckpt)
    if p.is_file():
        from .anchors import load_ldm_autoencoder

        ae, kwargs = load_ldm_autoencoder(p)
        if kwargs.pop("in_channels") != 3:
            raise ValueError(f"{str(p)!r}: an autoencoder of RGB images is expected (3 input channels)")
        cfg = build_config(TokenizerConfig, {"model": {k: kwargs[k] for k in ARCHITECTURE_KEYS if k in kwargs}})
        return ae.to(device).eval().requires_grad_(False), cfg, None
    ckpt = load_checkpoint(p)
    if ckpt.meta.get("kind") != "tokenizer":
        raise ValueError(f"{str(run_or_ckpt)!r} is not a train-tokenizer checkpoint (kind={ckpt.meta.get('kind')!r})")
    cfg = build_config(TokenizerConfig, ckpt.meta["config"], warn_renamed=False)
    ae = build_autoencoder(cfg.model)
    ae.load_state_dict(ckpt.tensors("model"))
    return ae.to(device).eval().requires_grad_(False), cfg, ckpt.meta.get("latent_stats")
