"""Bytes moved per fused op within LIMIT (1.15x) of the op's minimal bytes, forward and backward (issue 9 §4).

The gate runs every case of ``benchmarks.traffic.CASES`` at realistic shapes with the Triton launches
recorded but not executed (their bytes from the arguments' views or the kernel's tiling model); the
accounting of those estimates is checked against executed runs at tiny shapes, where every load and
store of the interpreted kernels is recorded. Cases known to be above the limit carry the reason and
whose fix it is (``OpCase.over``) and are strict xfails: fixing one makes its test fail until the
reason is removed.
"""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from benchmarks import traffic as T

pytestmark = pytest.mark.skipif(not T.interpret_ok(), reason="needs TRITON_INTERPRET=1 (the CPU lane)")


def _params(cases):
    return [pytest.param(c, id=c.name, marks=[pytest.mark.xfail(strict=True, reason=c.over)] if c.over else [])
            for c in cases]


@pytest.mark.parametrize("case", _params(T.CASES))
def test_op_bytes_within_limit(case):
    row = T.run_case(case, "full")
    for d in ("fwd", "bwd"):
        if d in row:
            r = row[d]
            assert r["ratio"] <= T.LIMIT, (f"{case.name} {d}: {r['bytes']} B moved, minimum {r['min']} B "
                                           f"({r['why_min']}): {r['ratio']:.2f}x; heaviest: {r['heaviest']}")


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in T.CASES])
def test_estimates_match_executed_kernels(case):
    """At the tiny size: the launch bytes recorded from the interpreted kernels' loads and stores equal
    the estimate used at full size (a kernel that reads only part of an argument needs a KERNEL_VIEWS
    entry; a tiled kernel's model must reproduce its loads exactly), and the aten ops agree."""
    chk = T.check_accounting(case)
    for d in ("fwd", "bwd"):
        if d not in chk:
            continue
        c = chk[d]
        assert c["executed_launch_bytes"] == c["estimated_launch_bytes"], (d, c["per_launch"])
        assert c["aten_bytes"][0] == c["aten_bytes"][1], (d, c["aten_bytes"])
        for kernel, model, recorded in c["models"]:
            assert model == recorded, (d, kernel, model, recorded)


# ---- the counting itself ---------------------------------------------------------------------------
@triton.jit
def _probe_kernel(X, V, OUT, s_x, BLOCK: tl.constexpr):
    """Row r of OUT = X[r, ::s_x-strided columns] + V (V re-read by every program, twice)."""
    r = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    x = tl.load(X + r * BLOCK * s_x + cols * s_x)
    v = tl.load(V + cols) + tl.load(V + cols)
    tl.store(OUT + r * BLOCK + cols, x + v)


def test_launch_bytes_distinct_and_accessed():
    rows, block = 8, 16
    base = torch.randn(rows, 2 * block)
    x = base[:, ::2]  # a strided view: half of its storage
    v = torch.randn(block)
    out = torch.empty(rows, block)
    _, tr = T.measure_traffic(lambda: _probe_kernel[(rows,)](x, v, out, 2, BLOCK=block))
    (rec,) = tr.launches
    assert rec.read == 4 * (rows * block + block)  # x's addressed elements, v once
    assert rec.written == 4 * rows * block
    assert rec.read_accessed == 4 * rows * (block + 2 * block)  # every program's loads: x, v twice
    assert rec.written_accessed == rec.written
    assert tr.aten_bytes == 0  # the interpreter's own argument copies are not counted
    assert torch.equal(out, x + 2 * v)
    _, est = T.measure_traffic(lambda: _probe_kernel[(rows,)](x, v, out, 2, BLOCK=block), execute=False)
    (e,) = est.launches  # not executed: the arguments' views; out was not allocated inside, so it counts as read
    assert (e.bytes, e.read, e.written) == (rec.bytes, rec.bytes, 0)


def test_aten_counting_rules():
    a = torch.randn(64, 32)
    b = torch.randn(64, 32)
    _, t = T.measure_traffic(lambda: (a.t(), a.view(-1), a[:, :8], a.detach(), torch.empty(64, 32)))
    assert t.bytes == 0  # views and allocations move nothing
    _, t = T.measure_traffic(lambda: torch.empty(64, 32).copy_(a))
    assert t.bytes == 2 * a.numel() * 4  # copy_ reads the source only
    _, t = T.measure_traffic(lambda: a.add_(b))
    assert t.bytes == 3 * a.numel() * 4  # in place: reads a, b, writes a
    _, t = T.measure_traffic(lambda: a.t().reshape(-1))
    assert t.bytes == 2 * a.numel() * 4  # the composite reshape of a transposed view is a copy
    _, t = T.measure_traffic(lambda: a + torch.randn(32).expand(64, 32))
    assert t.aten_bytes == (2 * a.numel() + 32 + 32) * 4  # randn writes 32, the stride-0 input counts 32


def test_gate_catches_an_extra_copy():
    """A swiglu preceded by a copy of its input is flagged: the test above can fail."""
    from vefast.ops import swiglu as sw

    s = T.case("swiglu").make("full")
    _, t = T.measure_traffic(lambda: sw.swiglu(s.inputs["x12"].clone()), execute=False)
    assert t.bytes / s.minimum.fwd > T.LIMIT


def test_dit_block_saved_bytes():
    """Fused block saves fewer bytes than the eager one; checkpointing saves only the block inputs."""
    kw = dict(B=1, N=16, width=128, heads=2, execute=False)
    fused, eager, ckpt = (T.measure_block(v, **kw) for v in ("fused", "eager", "eager+checkpoint"))
    assert fused["saved_bytes_per_token"] < eager["saved_bytes_per_token"]
    assert ckpt["saved_bytes_per_token"] == (16 * 128 + 128) * 4 / 16  # x and c
    assert fused["total_bytes_per_token"] < eager["total_bytes_per_token"] < ckpt["total_bytes_per_token"]
