"""Test lanes and the fallback guard.

CPU lane (default, no GPU): TRITON_INTERPRET=1 is set here, before Triton is imported, so every
Triton kernel runs on CPU tensors against its float64 reference. Tests marked ``gpu`` run only where
CUDA is available and are skipped cleanly otherwise.

gpu lane (``pytest -m gpu_lane`` on a CUDA machine): the tests marked ``gpu`` plus every test that
takes the :func:`device` fixture (marked ``device`` here, at collection), so the Triton kernels run
compiled on CUDA tensors; hypothesis loads the ``vefast-gpu`` profile there (fewer examples: every new
shape or dtype is a Triton compile). ``docs/speed_checks.md`` ("GPU lane") gives its cost.

Fallback guard (autouse): a test fails when a fused op runs its eager fallback (any
``_common.report_once``, seen through ``record_fallbacks``) and the test did not declare it with
``@pytest.mark.expect_fallback(*patterns)`` (see ``helpers.undeclared_fallbacks``). In the CPU lane
the interpreter runs every Triton kernel on CPU tensors, so a fallback there is a CPU-path test
(TRITON_INTERPRET=0, the ``eager`` fixture) or a float64 input; on a GPU it is also any test that
still builds CPU tensors.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from pathlib import Path

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from helpers import pinned_config, undeclared_fallbacks  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import vefast.ops  # noqa: E402
from vefast.ops._common import record_fallbacks  # noqa: E402

# Import every op module now, while the lane's TRITON_INTERPRET is set: a Triton kernel binds to the
# interpreter when its module is imported, so a test that switches the interpreter off for an eager run
# before the first import would otherwise leave GPU-only kernels behind for the rest of the CPU lane.
for _mod in pkgutil.iter_modules(vefast.ops.__path__):
    importlib.import_module(f"vefast.ops.{_mod.name}")

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile("vefast", deadline=None, max_examples=12, derandomize=False, suppress_health_check=_HEALTH)
settings.register_profile("vefast-gpu", deadline=None, max_examples=3, derandomize=True, suppress_health_check=_HEALTH)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "vefast-gpu" if HAS_CUDA else "vefast"))

_FALLBACKS = pytest.StashKey[list]()


def pytest_addoption(parser):
    parser.addoption("--count-specializations", metavar="PATH", default=None,
                     help="CPU lane: write the distinct Triton kernel specializations the run launches (what a GPU "
                          "compiles) as JSON to PATH (benchmarks/gpu_lane_cost.py)")
    parser.addoption("--shard", metavar="I/N", default=None,
                     help="run every N-th selected test starting at I (0 <= I < N): N processes with I = 0..N-1 run "
                          "the selection once, their Triton compiles in parallel (gpu lane on a many-core host)")


def pytest_configure(config):
    path = config.getoption("--count-specializations")
    if path:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise pytest.UsageError("--count-specializations records interpreted launches: run it in the CPU lane")
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from benchmarks.gpu_lane_cost import SpecializationCounter
        config.pluginmanager.register(SpecializationCounter(path), "vefast-specializations")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        on_device = "device" in getattr(item, "fixturenames", ())
        if on_device:
            item.add_marker("device")
        if "gpu" in item.keywords:
            if not HAS_CUDA:
                item.add_marker(skip_gpu)
        if on_device or "gpu" in item.keywords:
            item.add_marker("gpu_lane")


@pytest.hookimpl(tryfirst=True)  # before the terminal lists what was collected
def pytest_collection_finish(session):
    """``--shard I/N``: keep every N-th test of the selection (after -m / -k), starting at I."""
    shard = session.config.getoption("--shard")
    if not shard:
        return
    try:
        i, n = (int(v) for v in shard.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise pytest.UsageError(f"--shard must be I/N with 0 <= I < N, got {shard!r}") from None
    session.config.hook.pytest_deselected(items=[it for k, it in enumerate(session.items) if k % n != i])
    session.items[:] = session.items[i::n]


@pytest.fixture(autouse=True)
def fallback_guard(request):
    """Record every eager fallback of the test (its function-scoped fixtures included); checked after
    the test body by :func:`pytest_runtest_call`, so an undeclared one fails the test itself."""
    with record_fallbacks() as events:
        request.node.stash[_FALLBACKS] = events
        yield events


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield  # a failing test raises here: its own failure is the one reported
    events = item.stash.get(_FALLBACKS, None)
    if events:
        check_fallbacks(item, events)
    return result


def declared_fallbacks(item) -> tuple[str, ...] | None:
    """The patterns of the test's ``expect_fallback`` markers (None: any fallback is declared)."""
    patterns: list[str] = []
    for mark in item.iter_markers("expect_fallback"):
        if not mark.args:
            return None
        patterns += mark.args
    return tuple(patterns)


def check_fallbacks(item, events) -> None:
    patterns = declared_fallbacks(item)
    if patterns is None:
        return
    bad = undeclared_fallbacks(events, patterns)
    if bad:
        lines = "\n".join(f"  {key} (x{n}): {msg}" for key, (n, msg) in bad.items())
        pytest.fail(f"fused op(s) fell back to the eager path where the test did not declare it:\n{lines}\n"
                    f"declare an intended fallback with @pytest.mark.expect_fallback({', '.join(map(repr, bad))})",
                    pytrace=False)


@pytest.fixture(autouse=True)
def one_autotune_config(request, monkeypatch):
    """gpu lane: a test not marked ``gpu`` (small shapes) runs each autotuned vf_loss kernel with one of its
    configs, picked by test id so that the lane covers each, instead of compiling and timing all of them
    for every shape (several seconds of compile each: docs/speed_checks.md, "GPU lane"). Tests marked
    ``gpu`` autotune as users do."""
    if HAS_CUDA and "gpu" not in request.keywords:
        from vefast.ops import vf_loss
        for fp32_features in (False, True):  # one autotuner per precision family and direction
            for backward in (False, True):
                tuner = vf_loss._tuned_kernel(fp32_features, backward)
                monkeypatch.setattr(tuner, "configs",
                                    [tuner.configs[pinned_config(request.node.nodeid, len(tuner.configs))]])
    yield


@pytest.fixture
def device() -> torch.device:
    """Where Triton kernels run in this lane: CUDA if present, else CPU under the interpreter. A test
    that takes it is part of the gpu lane (``-m gpu_lane``)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny runs: spinning OpenMP threads crawl on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def eager():
    """Run a module's ops on their eager reference paths (TRITON_INTERPRET=0) inside the CPU lane.
    Their fallbacks (``op:cpu``) must still be declared with ``expect_fallback``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        yield
