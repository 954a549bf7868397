"""Codegen gate (issue 9 §3): every Triton kernel compiles for sm_90 and sm_80 without spills and within
shared memory, at the launch configurations vefast's public ops pick at training sizes.

The gate runs in a subprocess (``python -m benchmarks.codegen``, the representative subset): the CPU lane
sets TRITON_INTERPRET=1, which binds every kernel to the interpreter when its module is imported, and the
gate needs compiled ``JITFunction`` objects. The other tests check, in this process, that the verdict
fails on each kind of violation and that the ptxas parsing sees real spills (a planted spilling kernel).
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks import codegen as C

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), extra.pop("PYTHONPATH", ""),
                                                      env.get("PYTHONPATH", "")]))
    return env | extra


@pytest.fixture(scope="module")
def gate(tmp_path_factory) -> dict:
    """The subset run's JSON report (and its printed table on failure)."""
    out = tmp_path_factory.mktemp("codegen") / "codegen.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.codegen", "--json", str(out)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=1500)
    if not out.exists():
        pytest.fail(f"benchmarks.codegen wrote no report (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-6000:]}")
    rep = json.loads(out.read_text())
    rep["_rc"], rep["_stdout"] = proc.returncode, proc.stdout
    return rep


def test_codegen_gate_subset(gate):
    """No spill, no shared memory over the limit, no compile error, every kernel captured on both targets."""
    assert gate["_rc"] == 0 and not gate["failures"], (
        "codegen gate failed:\n  " + "\n  ".join(gate["failures"]) + "\n\n" + gate["_stdout"][-6000:])
    targets = {r["target"] for r in gate["rows"]}
    assert targets == {"sm_90", "sm_80"}
    compiled = {(r["kernel"], r["target"]) for r in gate["rows"]}
    assert compiled == {(k, t) for k in gate["kernels"] for t in targets}, "the subset compiles every kernel on both"


def test_gate_covers_every_kernel_in_the_sources(gate):
    """Every ``@triton.jit`` function of vefast/ops that no other jit function calls is in the gate's kernel list
    (an independent reading of the sources, not the gate's own discovery)."""
    defined, called = set(), set()
    for path in sorted((ROOT / "vefast" / "ops").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and any("triton.jit" in ast.unparse(d) for d in node.decorator_list):
                defined.add(f"{path.stem}.{node.name}")
                called |= {n.func.id for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    kernels = {k for k in defined if k.split(".")[1] not in called}
    assert kernels and kernels == set(gate["kernels"])


def _row(**kw) -> dict:
    base = {"kernel": "m._k", "target": "sm_90", "config": {"constexprs": {"BLOCK": 64}, "pointers": {"x": "*fp32"}},
            "regs": 64, "spill_stores": 0, "spill_loads": 0, "smem": 1024, "warps": 4, "stages": 3}
    return base | kw


def test_verdict_fails_on_each_violation():
    kernels, captured = ["m._k"], {"sm_90": {"m._k"}, "sm_80": {"m._k"}}
    assert C.failures([_row()], kernels, captured, known={}) == ([], [])
    for bad, what in ((_row(spill_stores=8, spill_loads=8), "spills 8 B"),
                      (_row(smem=C.SMEM_LIMIT["sm_90"] + 1), "shared memory"),
                      (_row(target="sm_80", smem=C.SMEM_LIMIT["sm_80"] + 1), "sm_80 limit"),
                      ({"kernel": "m._k", "target": "sm_90", "config": _row()["config"], "error": "PTXASError: x"},
                       "compile failed")):
        fails, _ = C.failures([bad], kernels, captured, known={})
        assert len(fails) == 1 and what in fails[0], fails
    fails, _ = C.failures([_row()], kernels + ["m._new_kernel"], captured, known={})
    assert len(fails) == 2 and all("m._new_kernel" in f and "no captured launch config" in f for f in fails)


def test_known_violations_are_reported_and_strict():
    kernels, captured = ["m._k"], {"sm_90": {"m._k"}}
    fails, known = C.failures([_row(spill_stores=4, spill_loads=4)], kernels, captured, known={"m._k": "why, whose"})
    assert fails == [] and len(known) == 1 and "why, whose" in known[0]
    fails, _ = C.failures([_row()], kernels, captured, known={"m._k": "why, whose"}, full=True)
    assert len(fails) == 1 and "remove its entry" in fails[0]
    assert C.failures([_row()], kernels, captured, known={"m._k": "why"}, full=False) == ([], [])


def test_parse_ptxas_log():
    log = textwrap.dedent("""\
        ptxas info    : Compiling entry function '_k' for 'sm_90a'
        ptxas info    : Function properties for _k
            40 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
        ptxas info    : Used 255 registers, used 1 barriers, 40 bytes cumulative stack size
        """)
    assert C.parse_ptxas(log) == {"regs": 255, "stack": 40, "spill_stores": 8, "spill_loads": 12}
    with pytest.raises(ValueError, match="no ptxas resource usage"):
        C.parse_ptxas("")


SPILLY = '''
import triton
import triton.language as tl


@triton.jit
def _spilly_kernel(X, Y, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    tl.store(Y + offs, x * tl.sum(x, axis=0) + tl.max(x, axis=0))  # every value of x live across two reductions
'''


def test_compile_sees_a_planted_spill(tmp_path):
    """A kernel holding 16384 fp32 values in one warp spills; the same kernel at 1024 values in 4 warps does
    not: the gate's compile reads real ptxas output (cold cache), not a constant."""
    (tmp_path / "spilly.py").write_text(SPILLY)
    code = textwrap.dedent("""\
        import json
        from benchmarks import codegen as C
        sig = {"X": "*fp32", "Y": "*fp32", "BLOCK": "constexpr"}
        attrs = {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}
        print(json.dumps([C.compile_config("spilly", "_spilly_kernel", 90, sig, {(2,): block}, attrs,
                                           {"num_warps": warps, "num_stages": 1})
                          for block, warps in ((16384, 1), (1024, 4))]))
        """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=_env(PYTHONPATH=str(tmp_path), TRITON_CACHE_DIR=str(tmp_path / "cache")))
    assert proc.returncode == 0, proc.stderr[-4000:]
    spilly, clean = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" not in spilly and spilly["spill_stores"] > 1000 and spilly["spill_loads"] > 1000, spilly
    assert clean["spill_stores"] == clean["spill_loads"] == 0 and clean["regs"] < 64, clean
    assert C.violations(dict(_row(), **{k: spilly[k] for k in ("regs", "spill_stores", "spill_loads")}))
