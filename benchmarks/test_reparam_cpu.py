"""CPU benchmark (pytest-benchmark, ``make bench-cpu``): the eager CPU path of ``ve_loss`` vs the LDM-style
eager formula, fwd+bwd on a VA-VAE-sized latent batch (8, 32, 16, 16) in float32.

The eager CPU path is what runs on CPU tensors outside TRITON_INTERPRET; it computes in float32
with the given dtype, so it should cost about what the plain formula costs.
"""
from __future__ import annotations

import os

import pytest
import torch

from benchmarks.gpu_reparam import eager_ve
from vefast.ops.reparam import ve_loss

SHAPE = (8, 64, 16, 16)


@pytest.fixture(autouse=True)
def _eager_lane(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU eager path, not the interpreter
    torch.manual_seed(0)


def _moments():
    return torch.randn(SHAPE, requires_grad=True)


def _step(fn, moments, dz):
    def run():
        moments.grad = None
        z, loss = fn(moments)
        torch.autograd.backward((z, loss), (dz, torch.ones_like(loss)))
    return run


def _vefast(moments):
    mean, logvar = moments.chunk(2, dim=1)
    out = ve_loss(mean, logvar)
    return out.z, out.loss


@pytest.mark.parametrize("variant", ["vefast_eager_path", "ldm_eager"])
def test_ve_loss_fwd_bwd_cpu(benchmark, variant):
    assert os.environ["TRITON_INTERPRET"] == "0"
    moments = _moments()
    dz = torch.randn(SHAPE[0], SHAPE[1] // 2, *SHAPE[2:])
    fn = _vefast if variant == "vefast_eager_path" else eager_ve
    benchmark(_step(fn, moments, dz))
    assert moments.grad is not None and torch.isfinite(moments.grad).all()
