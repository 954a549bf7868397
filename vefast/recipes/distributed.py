"""torchrun DDP / FSDP2 for the recipes: NCCL on GPUs, gloo on CPU; rank 0 writes.

``torchrun --nproc_per_node=N -m vefast.cli train-dit ...`` sets RANK / WORLD_SIZE / LOCAL_RANK;
without them the run is a single process and nothing is initialized.

DDP runs without ``find_unused_parameters``: the recipes' modules use every parameter in every
forward they are called with (tested), so DDP skips the per-step graph traversal it would otherwise
make, and an unused parameter is an error at the next step instead of a silent cost. FSDP2
(``fully_shard`` per transformer block and at the root, ``train.parallel: fsdp``) keeps fp32 master
weights and optimizer state sharded over the ranks and computes in bf16 on CUDA.

Each entry point that forms a group is decorated with :func:`ends_process_group`: the group is destroyed
after the entry point's frame is gone and its reference cycles are collected, with every rank past a
final barrier, so no collective's work or tensors are left for interpreter shutdown to free.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import gc
import hashlib
import os
from typing import Callable

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: ``cuda:<local_rank>`` when CUDA is available, else CPU. ``cpu`` / ``cuda`` force one."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda', got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Initialize the process group from torchrun's environment (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup() -> None:
    """Wait for every rank, then destroy the process group (no-op without one)."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def ends_process_group(entry: Callable[..., int]) -> Callable[..., int]:
    """Decorate a recipe entry point that calls :func:`init_distributed`: when it returns, collect the
    reference cycles its frame left (FSDP2 / DDP state holds the group, its device mesh and the tensors of
    finished collectives), then :func:`cleanup`. Destroying the group while those still live leaves them
    to interpreter shutdown, where a gloo worker thread freeing a tensor can abort a process that trained
    successfully ("terminate called without an active exception"). An exception propagates untouched."""

    @functools.wraps(entry)
    def run(*args, **kwargs) -> int:
        rc = entry(*args, **kwargs)
        gc.collect()
        cleanup()
        return rc

    return run


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of ``t`` over ranks (a copy; ``t`` is unchanged)."""
    if not info.distributed:
        return t.clone()
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / info.world_size


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank (JSON-like values only in the recipes)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_ddp(model: torch.nn.Module, info: DistInfo, **kwargs) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` when distributed, else the model itself (no
    ``find_unused_parameters``: every parameter must take part in each forward's loss)."""
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids, **kwargs)


def fsdp_shard(module: torch.nn.Module, blocks, device: torch.device, precision: str) -> torch.nn.Module:
    """FSDP2 in place: ``fully_shard`` each of ``blocks`` (the transformer blocks), then ``module`` (the
    rest: embedders, final layer, projector). Parameters stay fp32 (the master weights, sharded over
    the ranks, as is the optimizer state); on CUDA with ``precision == "bf16"`` they are all-gathered
    in bf16 for compute and gradients are reduce-scattered in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from .config import ConfigError

    if device.type == "cpu" and not hasattr(torch.cpu.Stream, "record_event"):  # FSDP2 records CPU stream events
        raise ConfigError(f"train.parallel=fsdp on CPU (gloo) needs torch >= 2.7, this is torch {torch.__version__}: "
                          "use train.parallel=ddp on CPU, or CUDA devices")
    bf16 = device.type == "cuda" and precision == "bf16"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(module, mp_policy=mp)
    return module


def is_fsdp(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def grad_sync(module: torch.nn.Module, enabled: bool):
    """Gradient communication on (``enabled``) or off for the backward passes inside: off on the inner
    micro-steps of gradient accumulation (DDP ``no_sync``; FSDP2 ``set_requires_gradient_sync``), so
    only the last micro-step of an optimizer step communicates."""
    if enabled:
        yield
        return
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(module, DDP):
        with module.no_sync():
            yield
    elif is_fsdp(module):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view of its storage), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "placements") else t


def plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (e.g. the total gradient norm under FSDP2) as a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") and hasattr(t, "placements") else t


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, step, rank, stream): independent streams, stable across runs."""
    h = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def reseed(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """Seed the global RNGs for one training step and return a generator on ``device`` for its noise.

    Every random draw of a step is a function of (seed, step, rank), so a resumed run reproduces the
    uninterrupted one exactly without carrying RNG state between steps.
    """
    torch.manual_seed(derive_seed(seed, step, rank, 0))
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, step, rank, 1))
    return g


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA when ``precision == "bf16"``; a no-op context otherwise (CPU runs in fp32,
    which keeps CPU runs bitwise reproducible)."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision: expected 'bf16' or 'fp32', got {precision!r}")
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "bf16":
        from ..ops._common import report_once

        report_once("recipes-bf16-cpu", "precision 'bf16' applies on CUDA only: this CPU run computes in fp32")
    return contextlib.nullcontext()


@torch.no_grad()
def replica_divergence(module: torch.nn.Module, info: DistInfo) -> float:
    """max |p_rank - p_rank'| over every parameter and rank (0.0 when the replicas are identical, and
    for a single process). All ranks must call it; the recipes log it at every checkpoint."""
    if not info.distributed:
        return 0.0
    flat = torch.cat([p.detach().float().flatten() for p in module.parameters()])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).abs().max())
