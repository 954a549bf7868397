"""Test lanes.

CPU lane (default, no GPU): TRITON_INTERPRET=1 is set here, before Triton is imported, so every
Triton kernel runs on CPU tensors against its float64 reference. ``gpu`` lane: tests marked
``gpu`` run only where CUDA is available and are skipped cleanly otherwise.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "vefast", deadline=None, max_examples=12, derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "vefast"))

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    """Where Triton kernels run in this lane: CUDA if present, else CPU under the interpreter."""
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
    """Run a module's ops on their eager reference paths (TRITON_INTERPRET=0) inside the CPU lane."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        yield
