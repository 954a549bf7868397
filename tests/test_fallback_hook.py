"""The per-call fallback hook (``_common.record_fallbacks`` / ``add_fallback_listener``) and the autouse
fallback guard of conftest: every eager fallback of every public op goes through the hook, on every call,
and an undeclared fallback fails a test."""
from __future__ import annotations

import shutil
import textwrap
import threading
import warnings
from pathlib import Path

import pytest
import torch
from helpers import fallback_matches, undeclared_fallbacks

import vefast
from vefast.nn import DiagonalGaussianDistribution
from vefast.ops import _common
from vefast.ops.swiglu import swiglu_reference
from vefast.ops.timestep_sample import timestep_sample
from vefast.ops._common import FallbackEvent, add_fallback_listener, record_fallbacks, report_once

pytest_plugins = ["pytester"]
TESTS = Path(__file__).parent


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)


# One call per public op (tiny eager inputs). The dict value names the op as it reports itself.
OPS = {
    "ve_loss": lambda d: vefast.ve_loss(_x(2, 3, dtype=d), _x(2, 3, dtype=d), _x(2, 3, dtype=d)),
    "kl_loss": lambda d: vefast.kl_loss(_x(2, 3, dtype=d), _x(2, 3, dtype=d), _x(2, 3, dtype=d)),
    "vf_loss": lambda d: vefast.vf_loss(_x(2, 4, 2, 2, dtype=d), _x(2, 8, 2, 2, dtype=d), _x(8, 4, dtype=d)),
    "align_loss": lambda d: vefast.align_loss(_x(2, 3, 8, dtype=d), _x(2, 3, 8, dtype=d)),
    "repa_loss": lambda d: vefast.repa_loss(_x(2, 3, 8, dtype=d), _x(2, 3, 8, dtype=d)),
    "norm_modulate": lambda d: vefast.norm_modulate(_x(2, 3, 8, dtype=d), _x(2, 8, dtype=d), _x(2, 8, dtype=d)),
    "gated_residual": lambda d: vefast.gated_residual(_x(2, 3, 8, dtype=d), _x(2, 3, 8, dtype=d), _x(2, 8, dtype=d)),
    "swiglu": lambda d: vefast.swiglu(_x(2, 8, dtype=d)),
    "timestep_sample": lambda d: timestep_sample(torch.linspace(0.01, 0.99, 9, dtype=d), 5,
                                                 generator=torch.Generator().manual_seed(0)),
    "DiagonalGaussianDistribution.sample": lambda d: DiagonalGaussianDistribution(_x(2, 4, 2, 2, dtype=d)).sample(),
    "qk_norm_rope_attention": lambda d: vefast.qk_norm_rope_attention(
        _x(1, 4, 3, 2, 64, dtype=d), torch.ones(64, dtype=d), torch.ones(64, dtype=d), None),
}
FLOAT64_IN_KERNEL = {"ve_loss", "kl_loss", "DiagonalGaussianDistribution.sample"}  # no float64 fallback


@pytest.mark.expect_fallback
@pytest.mark.parametrize("op", sorted(OPS))
def test_every_cpu_fallback_is_reported_per_call(op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with record_fallbacks() as events:
        OPS[op](torch.float32)
        OPS[op](torch.float32)
    mine = [e for e in events if e.op == op]
    assert len(mine) >= 2, events  # every call, not once per process
    assert mine[0].reason.startswith("cpu") and mine[0].message.startswith(op), mine[0]


@pytest.mark.expect_fallback
@pytest.mark.parametrize("op", sorted(set(OPS) - FLOAT64_IN_KERNEL - {"timestep_sample"}))  # its table is fp32
def test_every_float64_fallback_is_reported(op):
    with record_fallbacks() as events:
        OPS[op](torch.float64)
    assert [e.key for e in events] == [f"{op}:float64"]


def test_fused_paths_report_nothing(device):
    """The lane's fused paths (interpreter on CPU, compiled kernels on CUDA) take no fallback: the guard's premise."""
    x = torch.randn(2, 3, 8, device=device)
    with record_fallbacks() as events:
        vefast.swiglu(x)
        vefast.ve_loss(x, x, generator=torch.Generator(device=device).manual_seed(0))
        vefast.norm_modulate(x, x[:, 0], x[:, 1])
        timestep_sample(torch.linspace(0.01, 0.99, 9, device=device), 5, generator=torch.Generator().manual_seed(0))
    assert events == []


@pytest.mark.expect_fallback("hooktest")
def test_hook_warns_once_records_every_call_and_removes():
    seen: list[FallbackEvent] = []
    remove = add_fallback_listener(seen.append)
    try:
        with warnings.catch_warnings(record=True) as w, record_fallbacks() as events:
            warnings.simplefilter("always")
            for _ in range(3):
                report_once("hooktest:why", "hooktest: a message")
            report_once("hooktest", "hooktest: no reason")
    finally:
        remove()
    report_once("hooktest:why", "hooktest: a message")  # after removal: not seen
    assert [e.key for e in events] == ["hooktest:why"] * 3 + ["hooktest"]
    assert events[0] == FallbackEvent("hooktest", "why", "hooktest: a message") and events[-1].reason == ""
    assert seen == events
    assert [str(x.message) for x in w] == ["vefast: hooktest: a message", "vefast: hooktest: no reason"]
    assert "hooktest:why" in _common.reported_fallbacks()
    remove()  # idempotent
    with pytest.raises(TypeError, match="callback must be callable"):
        add_fallback_listener(3)


@pytest.mark.expect_fallback("hooktest")
def test_record_fallbacks_sees_other_threads_and_nests():
    with record_fallbacks() as outer:
        with record_fallbacks() as inner:
            threads = [threading.Thread(target=lambda: [report_once("hooktest:t", "m") for _ in range(50)])
                       for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        report_once("hooktest:after", "m")
    assert len(inner) == 200 and len(outer) == 201


@pytest.mark.expect_fallback("swiglu:float64")
def test_fallback_inside_torch_compile_fullgraph_is_reported_while_tracing():
    torch._dynamo.reset()
    f = torch.compile(lambda x: vefast.swiglu(x) * 2, fullgraph=True, backend="eager")
    x = _x(2, 8, dtype=torch.float64)
    with record_fallbacks() as events:
        out = f(x)
        f(x)
    torch.testing.assert_close(out, swiglu_reference(x) * 2)
    assert [e.key for e in events] == ["swiglu:float64"]  # once, at trace time


def test_marker_patterns():
    assert fallback_matches("vf_loss:float64", "vf_loss")
    assert fallback_matches("vf_loss:float64", "vf_loss:float64") and fallback_matches("vf_loss:float64", "*:float64")
    assert not fallback_matches("vf_loss:float64", "vf_loss:cpu") and not fallback_matches("vf_loss:float64", "vf")
    assert fallback_matches("patch", "patch") and fallback_matches("patch:Attention:why", "patch")
    events = [FallbackEvent("a", "cpu", "m1"), FallbackEvent("a", "cpu", "m1"), FallbackEvent("b", "float64", "m2")]
    assert undeclared_fallbacks(events, ["a"]) == {"b:float64": (1, "m2")}
    assert undeclared_fallbacks(events, ["*:cpu", "b:float64"]) == {}
    assert undeclared_fallbacks(events, []) == {"a:cpu": (2, "m1"), "b:float64": (1, "m2")}


def test_guard_fails_undeclared_fallbacks(pytester):
    """The real conftest in a fresh session: an undeclared fallback fails its test, a declared one passes,
    a wrong declaration fails, a test's own failure is reported as itself."""
    for name in ("conftest.py", "helpers.py"):
        shutil.copy(TESTS / name, pytester.path / name)
    pytester.makeini("[pytest]\nmarkers =\n    expect_fallback: x\n    gpu: x\n    device: x\n    gpu_lane: x\n")
    pytester.makepyfile(test_inner=textwrap.dedent("""
        import pytest, torch, vefast

        def _f64():
            return vefast.swiglu(torch.ones(2, 4, dtype=torch.float64))

        def test_undeclared():
            _f64()

        @pytest.mark.expect_fallback("swiglu:float64")
        def test_declared():
            _f64()

        @pytest.mark.expect_fallback("swiglu:cpu")
        def test_wrong_reason():
            _f64()

        @pytest.mark.expect_fallback
        def test_any():
            _f64()

        def test_own_failure():
            _f64()
            assert False, "own"

        def test_no_fallback():  # fused: the interpreter on CPU, the kernel on CUDA
            vefast.swiglu(torch.ones(2, 4, device="cuda" if torch.cuda.is_available() else "cpu"))
        """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=3, failed=3)
    out = result.stdout.str()
    assert "FAILED test_inner.py::test_undeclared" in out and "FAILED test_inner.py::test_wrong_reason" in out
    assert "swiglu:float64 (x1)" in out and "expect_fallback('swiglu:float64')" in out
    assert "AssertionError: own" in out


def test_shards_split_the_selection(pytester):
    """``--shard I/N`` runs every N-th selected test: the shards of one selection are disjoint and complete."""
    for name in ("conftest.py", "helpers.py"):
        shutil.copy(TESTS / name, pytester.path / name)
    pytester.makeini("[pytest]\nmarkers =\n    expect_fallback: x\n    gpu: x\n    device: x\n    gpu_lane: x\n")
    pytester.makepyfile(test_inner="import pytest\n" + "".join(
        f"def test_{k}(device):\n    pass\n" for k in range(5)) + "def test_cpu_only():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v", "-m", "gpu_lane", "--shard", "1/2")
    result.assert_outcomes(passed=2, deselected=4)
    out = result.stdout.str()
    assert "test_inner.py::test_1 PASSED" in out and "test_inner.py::test_3 PASSED" in out
