"""Static gate on the machine code of the attention kernels (issue 11 §4), read with cuobjdump (shipped in the
triton wheel), for every architecture in the binary and every instantiation ({bf16, fp16} x padded head dim
{64, 80, 96, 128}) of

- flash_fwd_kernel, flash_bwd_dq_kernel, flash_bwd_dkdv_kernel (mma.sync; every architecture): LDGSTS
  (cp.async), LDSM (ldmatrix) and HMMA (mma.sync) present;
- flash_fwd_sm90a_kernel (wgmma; sm_90a code only -- on other architectures it is a trap stub, never
  launched): LDGSTS, LDSM (the Q fragments) and HGMMA (wgmma) present, no HMMA;

and for all of them: no local memory (STACK 0, LOCAL 0, no LDL / STL: nothing spilled), registers within the
occupancy each kernel targets (256 threads; the mma.sync forward at head dims 64 and 96 and the wgmma forward
at 64 aim at 2 CTAs per SM, i.e. <= 128 registers, the others at 1 CTA, <= 255).

The binary is vefast/_C (what `make test` builds): it must hold every kernel above for the architectures it
was built for (sm_90a ones when its build list names 90a); the test fails, not skips, when it does not. Only
without an extension does it skip -- unless VEFAST_SASS_BUILD=1, which gates standalone cubins of
kernels/flash_*.cu built by nvcc into build/cuda_sass/ (cached by source hash; minutes on 2 cores) for the
architectures of VEFAST_CUDA_ARCHS (default 80;90a; flash_fwd_sm90a.cu only for 90a). The table of every
kernel is printed (pytest -s).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
FLASH_KERNELS = ("flash_fwd_kernel", "flash_bwd_dq_kernel", "flash_bwd_dkdv_kernel")  # mma.sync, every arch
SM90A_KERNELS = ("flash_fwd_sm90a_kernel",)  # wgmma, sm_90a only
DTYPES = ("13__nv_bfloat16", "6__half")
HEAD_DIMS = (64, 80, 96, 128)
THREADS = 256
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr", "-cubin"]


def _cuobjdump() -> Path | None:
    try:
        import triton
    except ImportError:
        return None
    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return p if p.exists() else None


def _run(tool: Path, *args: str) -> str:
    return subprocess.run([str(tool), *args], check=True, capture_output=True, text=True, timeout=600).stdout


def _res_usage(tool: Path, binary: Path) -> dict[tuple[str, str], dict[str, int]]:
    """(arch, mangled name) -> {"REG": .., "STACK": .., "LOCAL": .., ...} from cuobjdump -res-usage (a fatbin
    names the arch of each ELF; a cubin's arch comes from its file name, *_sm90.cubin). Archs are keyed
    without the "a" suffix (cuobjdump -sass prints sm_90 for sm_90a code; a build never holds both)."""
    m = re.search(r"_sm(\d+)a?\.cubin$", binary.name)
    out, arch, fn = {}, (f"sm_{m.group(1)}" if m else None), None
    for line in _run(tool, "-res-usage", str(binary)).splitlines():
        if m := re.match(r"\s*arch = sm_(\d+)", line):
            arch = f"sm_{m.group(1)}"
        elif m := re.match(r"\s*Function (\S+):", line):
            fn = m.group(1)
        elif fn and "REG:" in line:
            out[(arch, fn)] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            fn = None
    return out


def _sass_mix(tool: Path, binary: Path) -> dict[tuple[str, str], Counter]:
    """(arch, mangled name) -> opcode counts (base opcode, e.g. LDGSTS, LDSM, HMMA, LDL); archs as in _res_usage."""
    mix, arch, fn = defaultdict(Counter), None, None
    for line in _run(tool, "-sass", str(binary)).splitlines():
        if m := re.match(r"\s*code for sm_(\d+)", line):
            arch = f"sm_{m.group(1)}"
        elif m := re.match(r"\s*Function : (\S+)", line):
            fn = m.group(1)
        elif fn and (m := re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", line)):
            mix[(arch, fn)][m.group(1)] += 1
    return mix


def _reg_target(kernel: str, hdp: int) -> int:
    """Registers per thread for the CTAs per SM the kernel's __launch_bounds__ asks for (65536 per SM)."""
    two = (kernel == "flash_fwd_kernel" and hdp in (64, 96)) or (kernel == "flash_fwd_sm90a_kernel" and hdp == 64)
    return min(255, 65536 // (THREADS * (2 if two else 1)))


def _extension() -> Path | None:
    found = sorted((ROOT / "vefast").glob("_C*.so"))
    return found[0] if found else None


def _build_archs() -> list[str]:
    """The architectures vefast/_C was built for (vefast/_build_info.json, written by setup.py)."""
    info = ROOT / "vefast" / "_build_info.json"
    return json.loads(info.read_text()).get("cuda_archs", []) if info.exists() else []


def _standalone_archs() -> list[str]:
    """VEFAST_CUDA_ARCHS (default 80;90a) with setup.py's rule: 90a replaces 90."""
    archs = [a.strip() for a in os.environ.get("VEFAST_CUDA_ARCHS", "80;90a").replace(",", ";").split(";") if a.strip()]
    return [a for a in archs if not (a == "90" and "90a" in archs)]


def _standalone_cubins(tool: Path) -> list[Path]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc to build standalone cubins")
    archs = _standalone_archs()
    sources = [KERNELS / "flash_fwd.cu", KERNELS / "flash_bwd.cu", KERNELS / "flash_fwd_sm90a.cu"]
    h = hashlib.sha256(" ".join(NVCC_FLAGS + archs).encode())
    for p in sorted(KERNELS.glob("*.cuh")) + sources:
        h.update(p.read_bytes())
    out_dir = ROOT / "build" / "cuda_sass" / h.hexdigest()[:16]
    out_dir.mkdir(parents=True, exist_ok=True)
    cubins = []
    for arch in archs:
        for src in sources:
            if src.name.endswith("_sm90a.cu") and arch != "90a":
                continue
            cubin = out_dir / f"{src.stem}_sm{arch}.cubin"
            if not cubin.exists():
                tmp = cubin.with_suffix(f".{os.getpid()}.tmp")
                defines = ["-DVEFAST_WITH_SM90A"] if "90a" in archs else []
                subprocess.run([nvcc, *NVCC_FLAGS, *defines, f"-arch=sm_{arch}", "-I", str(KERNELS), str(src), "-o",
                                str(tmp)], check=True, capture_output=True, text=True)
                os.replace(tmp, cubin)
            cubins.append(cubin)
    return cubins


@pytest.fixture(scope="module")
def sass_tables():
    """(binaries, resource usage, SASS opcode mix, architectures whose sm_90a kernels must be present)."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump (triton wheel) not found")
    ext = _extension()
    if os.environ.get("VEFAST_SASS_BUILD", "0") == "1":
        binaries, archs = _standalone_cubins(tool), _standalone_archs()
    elif ext is not None:
        binaries, archs = [ext], _build_archs()
    else:
        pytest.skip("no vefast._C (built without nvcc?): set VEFAST_SASS_BUILD=1 to gate standalone nvcc cubins")
    usage, mix = {}, {}
    for b in binaries:
        usage.update(_res_usage(tool, b))
        mix.update(_sass_mix(tool, b))
    return binaries, usage, mix, {f"sm_{a[:-1]}" for a in archs if a.endswith("a")}


def _flash_rows(usage, mix, sm90a_archs: set[str]):
    """One row per kernel instantiation; "arch" gets its "a" back where the build made arch-specific code."""
    rows = []
    for (arch, fn), res in sorted(usage.items()):
        m = re.search(r"5flash\d+(flash_\w+?_kernel)I(\w+?)Li(\d+)E", fn)
        if not m:
            continue
        kernel, dtype, hdp = m.group(1), m.group(2), int(m.group(3))
        if kernel in SM90A_KERNELS and arch not in sm90a_archs:
            continue  # a trap stub (the code exists for sm_90a only)
        ops = mix.get((arch, fn), Counter())
        rows.append(dict(arch=arch + ("a" if arch in sm90a_archs else ""), kernel=kernel,
                         dtype="bf16" if "bfloat16" in dtype else "fp16", hdp=hdp,
                         reg=res["REG"], target=_reg_target(kernel, hdp), stack=res.get("STACK", 0),
                         local=res.get("LOCAL", 0), ldgsts=ops["LDGSTS"], ldsm=ops["LDSM"], hmma=ops["HMMA"],
                         hgmma=ops["HGMMA"], lmem=ops["LDL"] + ops["STL"]))
    return rows


def _table(rows) -> str:
    head = f"{'arch':7} {'kernel':22} {'dtype':5} {'hd':>3} {'regs':>4} {'max':>4} {'stack':>5} {'local':>5} " \
           f"{'LDGSTS':>6} {'LDSM':>5} {'HMMA':>5} {'HGMMA':>5} {'LDL/STL':>7}"
    lines = [head] + [f"{r['arch']:7} {r['kernel']:22} {r['dtype']:5} {r['hdp']:>3} {r['reg']:>4} {r['target']:>4} "
                      f"{r['stack']:>5} {r['local']:>5} {r['ldgsts']:>6} {r['ldsm']:>5} {r['hmma']:>5} "
                      f"{r['hgmma']:>5} {r['lmem']:>7}"
                      for r in rows]
    return "\n".join(lines)


def _check(rows, sm90a_archs: set[str]) -> None:
    archs = sorted({r["arch"] for r in rows})
    assert archs, "no attention kernels found in the binary"
    want = {(a, k, d, h) for a in archs for k in FLASH_KERNELS for d in ("bf16", "fp16") for h in HEAD_DIMS}
    want |= {(a + "a", k, d, h) for a in sorted(sm90a_archs) for k in SM90A_KERNELS for d in ("bf16", "fp16")
             for h in HEAD_DIMS}
    have = {(r["arch"], r["kernel"], r["dtype"], r["hdp"]) for r in rows}
    assert want <= have, f"missing instantiations: {sorted(want - have)}"
    mma = [r for r in rows if r["kernel"] in FLASH_KERNELS]
    bad = [r for r in mma if not (r["ldgsts"] and r["ldsm"] and r["hmma"])]
    assert not bad, "kernels without cp.async (LDGSTS), ldmatrix (LDSM) or mma (HMMA):\n" + _table(bad)
    bad = [r for r in rows if r["kernel"] in SM90A_KERNELS and not (r["ldgsts"] and r["ldsm"] and r["hgmma"])
           or r["kernel"] in SM90A_KERNELS and r["hmma"]]
    assert not bad, "sm_90a kernels without LDGSTS, LDSM or HGMMA (wgmma), or with HMMA:\n" + _table(bad)
    bad = [r for r in rows if r["stack"] or r["local"] or r["lmem"]]
    assert not bad, "kernels with local memory (spills / stack):\n" + _table(bad)
    bad = [r for r in rows if r["reg"] > r["target"]]
    assert not bad, "kernels above their register target:\n" + _table(bad)


def test_attention_kernels_sass_gate(sass_tables):
    binaries, usage, mix, sm90a_archs = sass_tables
    rows = _flash_rows(usage, mix, sm90a_archs)
    print(f"\nSASS of {', '.join(b.name for b in binaries)}:\n{_table(rows)}")
    _check(rows, sm90a_archs)


def test_gate_fails_on_planted_defects(sass_tables):
    """The gate's checks on the real table with one defect planted each: they must fail."""
    _, usage, mix, sm90a_archs = sass_tables
    rows = _flash_rows(usage, mix, sm90a_archs)
    plants = {
        "missing instantiation": lambda rs: rs[1:],
        "no LDGSTS": lambda rs: [dict(rs[0], ldgsts=0)] + rs[1:],
        "spill": lambda rs: [dict(rs[0], lmem=2)] + rs[1:],
        "registers": lambda rs: [dict(rs[0], reg=rs[0]["target"] + 1)] + rs[1:],
    }
    if sm90a_archs:
        i = next(i for i, r in enumerate(rows) if r["kernel"] in SM90A_KERNELS)
        plants["no HGMMA"] = lambda rs: rs[:i] + [dict(rs[i], hgmma=0)] + rs[i + 1:]
    for name, plant in plants.items():
        with pytest.raises(AssertionError):  # (pytest names the plant in the traceback when it is not caught)
            _check(plant([dict(r) for r in rows]), sm90a_archs)
