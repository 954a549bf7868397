"""Checkpoint faults (issue 12 §3): leftovers of a killed writer, a ``latest`` pointing out of the run,
durability (fsync before and after the rename), bit flips and truncation, corrupt state.json."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from vefast.recipes import checkpoint as ck


def _save(run, step=1, **kw):
    m = torch.nn.Linear(4, 3)
    return ck.save_checkpoint(run, step, tensors={"model": m.state_dict()}, **kw), m


def test_resume_removes_a_killed_writers_temporaries(tmp_path):
    _save(tmp_path)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-00000002-abcd").mkdir()  # what a SIGKILL mid-write leaves
    (root / ".tmp-step-00000002-abcd" / "model.safetensors").write_bytes(b"partial")
    (root / ".latest.x1y2.tmp").write_text("step-00000002\n")
    assert ck.load_checkpoint(tmp_path).step == 1
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001"]


def test_latest_may_not_point_outside_the_run(tmp_path):
    other, _ = _save(tmp_path / "other")
    _save(tmp_path / "run")
    marker = tmp_path / "run" / "checkpoints" / "latest"
    for target in (os.path.relpath(other, marker.parent), str(other), "../step-00000001", "step-1"):
        marker.write_text(target + "\n")
        with pytest.raises(ValueError, match="refusing to follow it"):
            ck.load_checkpoint(tmp_path / "run")


def test_files_and_directories_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "fsync", fsync)
    monkeypatch.setattr(ck.os, "replace", replace)
    final, _ = _save(tmp_path, states={"opt": {"step": torch.tensor(3.0)}})
    rename = events.index(("replace", str(final)))
    synced_before = {os.path.basename(p) for kind, p in events[:rename] if kind == "fsync"}
    assert {"model.safetensors", "opt.safetensors", "state.json"} <= synced_before
    assert any(p.startswith(str(tmp_path / "checkpoints" / ".tmp-step-")) for kind, p in events[:rename])  # the dir
    after = [p for kind, p in events[rename + 1:] if kind == "fsync"]
    assert str(tmp_path / "checkpoints") in after  # the rename itself is made durable


def test_a_bit_flip_in_a_tensor_file_is_detected(tmp_path):
    final, m = _save(tmp_path)
    f = final / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x10  # inside the tensor payload: safetensors alone would load it silently
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors' is corrupt: its SHA-256 differs"):
        ck.load_checkpoint(tmp_path).tensors("model")


def test_truncated_and_garbled_files_are_named(tmp_path):
    final, _ = _save(tmp_path)
    shutil.copy(final / "model.safetensors", tmp_path / "backup")
    (final / "model.safetensors").write_bytes(b"\x01\x00")
    c = ck.load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"model\.safetensors' is corrupt"):
        c.tensors("model")
    (final / "state.json").write_text('{"format": 1, "st')
    with pytest.raises(ValueError, match=r"state\.json' is corrupt \(not JSON"):
        ck.load_checkpoint(tmp_path)


def test_checkpoints_without_checksums_still_load(tmp_path):
    """Checkpoints written before checksums existed (no 'sha256' in state.json) load unverified."""
    import json

    final, m = _save(tmp_path)
    meta = json.loads((final / "state.json").read_text())
    del meta["sha256"]
    (final / "state.json").write_text(json.dumps(meta))
    got = ck.load_checkpoint(tmp_path).tensors("model")
    assert torch.equal(got["weight"], m.weight.detach())
