"""Resumable, rank-count-independent output shards for the extraction commands (``extract-latents``).

The dataset is cut into shards by *global* index — shard k holds items ``[k S, (k + 1) S)`` — and rank r
of W writes shards ``r, r + W, r + 2W, ...``. What a shard holds depends only on the data and the
settings, never on the number of ranks, so one GPU and 64 GPUs write the same files, and an interrupted
run resumes with any number of ranks.

A shard is written to a temporary name, fsynced, hashed (SHA-256) and renamed into place; then its
completion marker ``shard-KKKKK.done.json`` records the file's size and hash, the settings'
fingerprint and the shard's float64 statistics (per-channel sum, sum of squares, count). A shard is
*finished* when its marker exists, matches the settings, and the file has the recorded size (and,
with ``verify=True``, hash); anything else is redone. Statistics are merged from the markers in shard
order, in float64, so they too are identical for any rank count.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

SETTINGS_FILE = "extract.json"


@dataclasses.dataclass(frozen=True)
class Shard:
    """Items ``[start, stop)`` of the dataset, written as ``shard-{index:05d}.safetensors``."""
    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"

    def __len__(self) -> int:
        return self.stop - self.start


def plan_shards(n: int, shard_size: int) -> list[Shard]:
    """Every shard of an ``n``-item dataset cut into ``shard_size``-item pieces (the last one shorter)."""
    if n < 1 or shard_size < 1:
        raise ValueError(f"plan_shards: need n >= 1 and shard_size >= 1, got n={n}, shard_size={shard_size}")
    return [Shard(k, s, min(n, s + shard_size)) for k, s in enumerate(range(0, n, shard_size))]


def rank_shards(shards: list[Shard], rank: int, world_size: int) -> list[Shard]:
    """The shards rank ``rank`` of ``world_size`` writes: every ``world_size``-th, starting at ``rank``."""
    return shards[rank::world_size]


def batches(shards: list[Shard], batch_size: int) -> list[list[int]]:
    """Index batches of ``batch_size`` within each shard (a batch never spans two shards, so a shard's
    batches are the same whatever rank writes it)."""
    return [list(range(b, min(b + batch_size, s.stop))) for s in shards for b in range(s.start, s.stop, batch_size)]


def fingerprint(settings: dict[str, Any]) -> str:
    """SHA-256 of the settings (JSON, sorted keys): what a finished shard must have been written with."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def shard_path(out: Path, shard: Shard) -> Path:
    return out / f"{shard.name}.safetensors"


def marker_path(out: Path, shard: Shard) -> Path:
    return out / f"{shard.name}.done.json"


def finished(out: Path, shard: Shard, fp: str, *, verify: bool = True) -> dict[str, Any] | None:
    """The marker of ``shard`` if it is finished under fingerprint ``fp`` (module docstring), else None."""
    from .checkpoint import _file_hash

    mk, f = marker_path(out, shard), shard_path(out, shard)
    if not mk.is_file() or not f.is_file():
        return None
    try:
        marker = json.loads(mk.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(marker, dict) or marker.get("fingerprint") != fp or marker.get("start") != shard.start \
            or marker.get("stop") != shard.stop or f.stat().st_size != marker.get("bytes"):
        return None
    if verify and _file_hash(f) != marker.get("sha256"):
        return None
    return marker


def write_shard(out: Path, shard: Shard, tensors: dict, *, fp: str, stats: dict[str, Any] | None = None,
                metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Write ``tensors`` as ``shard``'s safetensors file (temporary name, fsync, hash, rename), then its
    marker (atomic); returns the marker. ``stats``: JSON values kept in the marker (per-shard sums)."""
    from safetensors.torch import save_file

    from .checkpoint import _atomic_write_text, _fsync_dir, _sync_and_hash

    final = shard_path(out, shard)
    marker_path(out, shard).unlink(missing_ok=True)  # a stale marker never vouches for the new file
    tmp = out / f".{final.name}.{os.getpid()}.tmp"
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        digest = _sync_and_hash(tmp)
        size = tmp.stat().st_size
        os.replace(tmp, final)
        _fsync_dir(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    marker = {"shard": shard.index, "start": shard.start, "stop": shard.stop, "bytes": size, "sha256": digest,
              "fingerprint": fp, "stats": stats or {}}
    _atomic_write_text(marker_path(out, shard), json.dumps(marker))
    return marker


def remove_temporaries(out: Path) -> None:
    """Delete what a killed writer left (``.shard-*.tmp``)."""
    for p in out.glob(".shard-*.tmp"):
        p.unlink(missing_ok=True)


def check_settings(out: Path, settings: dict[str, Any], *, resume: bool) -> None:
    """Refuse to mix with another extraction: without ``resume`` the directory must hold no shard; with
    it, ``out/extract.json`` must hold the same settings. Raises ValueError naming the differing keys."""
    f = out / SETTINGS_FILE
    has_shards = out.is_dir() and any(out.glob("shard-*.safetensors"))
    if not resume:
        if has_shards or f.is_file():
            raise ValueError(f"--out {str(out)!r} already holds an extraction; pass --resume to continue it "
                             "(finished shards are kept), or choose an empty directory")
        return
    if not f.is_file():
        if has_shards:
            raise ValueError(f"--resume: {str(out)!r} has shards but no {SETTINGS_FILE} (not written by this "
                             "version of extract-latents): choose an empty directory")
        return
    saved = json.loads(f.read_text()).get("settings", {})
    diff = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if diff:
        raise ValueError(f"--resume: settings {diff} differ from those {str(out)!r} was extracted with "
                         f"(see {f}); resume with the same ones or choose an empty directory")


def write_settings(out: Path, settings: dict[str, Any]) -> None:
    from .checkpoint import _atomic_write_text

    _atomic_write_text(out / SETTINGS_FILE, json.dumps({"settings": settings, "fingerprint": fingerprint(settings)},
                                                        indent=1, sort_keys=True))
