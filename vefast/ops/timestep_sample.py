"""Fused inverse-CDF timestep sampler ([VR] §3.3 step (3)-(4); docs/math.md §6).

``t = F^-1(u)``, ``u ~ U(0, 1)``, with ``F^-1`` given as a table on a uniform u-grid:
``table[m] = F^-1(m / U)`` for m = 0..U (U a power of two), and linear interpolation between
entries: ``x = u U``, ``m = floor(x)``, ``t = table[m] + (x - m) (table[m+1] - table[m])``.
One pass writes n timesteps: Philox uniforms (``tl.randint4x``, four draws per counter) + table
lookup + interpolation; nothing else touches memory.

Choices: u is built from 23 random bits, ``u = (b + 0.5) 2^-23`` (exact in fp32, symmetric, never 0
or 1); t is clamped to [2^-126, 1 - 2^-24] so that every sample lies in the open interval (0, 1)
whatever the table ends are. Counter ``c`` of program p draws samples ``4 BLOCK p + q BLOCK + c``
(q = 0..3) with ``BLOCK = 1024`` fixed, so a (seed, n) pair gives the same timesteps on every GPU.
The eager path (CPU) draws ``b`` with ``torch.randint(generator=...)`` and applies the same formula:
reproducible by generator state, but a different stream from the Philox one. Sampling is not
differentiable: no autograd.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import on_tensor_device

BLOCK = 1024
U_BITS = 23
T_LO = 2.0**-126
T_HI = 1.0 - 2.0**-24


def uniforms_reference(n: int, *, device: torch.device | str = "cpu",
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """``u = (b + 0.5) 2^-23`` with 23-bit ``b`` from ``generator``: float32 in [2^-24, 1 - 2^-24]."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    b = torch.randint(0, 2**U_BITS, (n,), generator=generator, device=gen_device)
    u = (b.to(torch.float32) + 0.5) * 2.0**-U_BITS
    return u.to(device, non_blocking=u.device.type == "cpu")  # a host->device copy without a stream sync


def timestep_sample_reference(table: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Table lookup + linear interpolation of ``u`` (any float dtype; float64 for a reference)."""
    size = table.numel() - 1
    x = u.to(table.dtype) * size
    m = x.floor().clamp_(0, size - 1)
    frac = x - m
    m = m.long()
    lo, hi = table[m], table[m + 1]
    return (lo + frac * (hi - lo)).clamp_(T_LO, T_HI)


@triton.jit
def _lookup_store(table_ptr, out_ptr, u, idx, n, U: tl.constexpr):
    x = u * U
    m = tl.maximum(tl.minimum(x.to(tl.int32), U - 1), 0)  # u > 0: truncation is floor; clamped for u <= 0
    frac = x - m.to(tl.float32)
    lo = tl.load(table_ptr + m)
    hi = tl.load(table_ptr + m + 1)
    t = lo + frac * (hi - lo)
    t = tl.minimum(tl.maximum(t, 1.1754943508222875e-38), 0.99999994039535522)
    tl.store(out_ptr + idx, t, mask=idx < n)


@triton.jit(do_not_specialize=["seed"])
def _sample_kernel(table_ptr, u_ptr, out_ptr, n, seed, U: tl.constexpr, BLOCK: tl.constexpr,
                   FROM_U: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    base = pid * (4 * BLOCK) + offs
    if FROM_U:  # test hook: explicit uniforms instead of Philox
        for q in tl.static_range(4):
            idx = base + q * BLOCK
            u = tl.load(u_ptr + idx, mask=idx < n, other=0.5)
            _lookup_store(table_ptr, out_ptr, u, idx, n, U)
    else:
        # uint32 counters: Triton <= 3.2 runs a 64-bit Philox on int64 offsets (64-bit draws, whose >> 9 is no
        # 23-bit value); 32-bit counters give the same 32-bit stream on every Triton (n < 2^34 samples).
        r0, r1, r2, r3 = tl.randint4x(seed, (pid * BLOCK + offs).to(tl.uint32))
        scale = 1.0 / 8388608.0  # 2^-23
        _lookup_store(table_ptr, out_ptr, ((r0 >> 9).to(tl.float32) + 0.5) * scale, base, n, U)
        _lookup_store(table_ptr, out_ptr, ((r1 >> 9).to(tl.float32) + 0.5) * scale, base + BLOCK, n, U)
        _lookup_store(table_ptr, out_ptr, ((r2 >> 9).to(tl.float32) + 0.5) * scale, base + 2 * BLOCK, n, U)
        _lookup_store(table_ptr, out_ptr, ((r3 >> 9).to(tl.float32) + 0.5) * scale, base + 3 * BLOCK, n, U)


@on_tensor_device
def _launch_sample(table: torch.Tensor, n: int, seed: int, u: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.empty(n, dtype=torch.float32, device=table.device)
    if n == 0:
        return out
    grid = (triton.cdiv(n, 4 * BLOCK),)
    _sample_kernel[grid](table, u if u is not None else out, out, n, seed, U=table.numel() - 1, BLOCK=BLOCK,
                         FROM_U=u is not None, num_warps=4)
    return out


@torch.library.custom_op("vefast::timestep_sample", mutates_args=())
def _timestep_sample_op(table: torch.Tensor, seed: torch.Tensor, n: int) -> torch.Tensor:
    """n timesteps from the inverse-CDF ``table`` (float32, U + 1 entries), Philox stream ``seed``
    (a CPU tensor: reading it does not wait for the GPU)."""
    return _launch_sample(table.contiguous(), n, int(_common.host_item(seed)))


@_timestep_sample_op.register_fake
def _(table, seed, n):
    return table.new_empty((n,), dtype=torch.float32)


def check_table(table: torch.Tensor) -> None:
    """Raise unless ``table`` is a 1-D float32 tensor of 2^k + 1 entries (k >= 1)."""
    _common.check_tensor("table", table, dtypes=(torch.float32,))
    size = table.numel() - 1
    if table.dim() != 1 or size < 2 or size & (size - 1):
        raise ValueError(f"table must be 1-D with 2^k + 1 entries (k >= 1), got shape {tuple(table.shape)}")


def check_seed(seed: torch.Tensor) -> None:
    """Raise unless ``seed`` is a 0-dim integer CPU tensor (as :func:`vefast.ops._common.draw_seed` returns):
    the op reads it on the host, so a device tensor would stall the GPU queue."""
    if not isinstance(seed, torch.Tensor) or seed.dim() != 0 or seed.is_floating_point() or seed.is_complex() \
            or seed.dtype == torch.bool:
        raise TypeError(f"seed must be a 0-dim integer tensor, got {seed!r}")
    if seed.device.type != "cpu":
        raise ValueError(f"seed must be a CPU tensor (it is read on the host), got one on {seed.device}")


def timestep_sample(table: torch.Tensor, n: int, *, seed: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """n float32 timesteps ``t = F^-1(u)`` in (0, 1) from an inverse-CDF table (module docstring).

    ``table``: float32 (2^k + 1,), ``table[m] = F^-1(m / 2^k)``, on the device the samples go to.
    CUDA (or TRITON_INTERPRET=1): the fused Triton kernel, Philox stream from ``seed`` (a 0-dim int64
    CPU tensor) or from ``generator`` via ``draw_seed`` (host-side, no device sync). CPU: uniforms from
    ``generator`` and the eager lookup. Same seed or generator state -> same samples.
    """
    check_table(table)
    _common.check_int("n", n, min_value=0)
    if seed is not None:
        check_seed(seed)
    if _common.triton_path("timestep_sample", table, float64_in_kernel=True):
        if seed is None:
            seed = _common.draw_seed(generator)
        return _timestep_sample_op(table, seed, n)
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(int(_common.host_item(seed)))
    u = uniforms_reference(n, device=table.device, generator=generator)
    return timestep_sample_reference(table, u)
