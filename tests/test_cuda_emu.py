"""CPU emulation lane for the CUDA kernels (issue 11 §3): kernels/ compiled by the host C++ compiler against
tests/cuda_emu (a fiber per CUDA thread, randomized scheduling between barriers, warp and warpgroup collectives,
the PTX instructions emulated from the ISA tables, cp.async and wgmma completing only at their wait_group,
NaN-filled shared memory, a shared-memory race / proxy-fence detector, guard pages behind every buffer).

- The emulator's own tests (``emu_selftest``): each instruction against the ISA tables (mma.sync, ldmatrix,
  cp.async, wgmma fragments and descriptors), the scheduler, the race / deadlock / launch checks, the wgmma
  rules (fence, proxy fence, in-flight operands, groups), and the 16-bit conversions against torch's.
- The attention kernels (their real launchers, through ``attn_harness``) at tiny shapes (head dims
  64/72/80/96/128, N 1/17/65/130, q/k/v strided views of a packed qkv, with and without the RMSNorm/RoPE
  prologue): the mma.sync forward + the backward, and the sm_90a wgmma forward, against float64 with the
  flash-attn rule: error <= 2x the error of eager attention (SDPA on CPU) in the same dtype + a small floor.
- The host's layout rule (``attn::flash_copy_plan``, what csrc/attention.cpp applies): which tensors get
  copied for unaligned / strided / expanded layouts, the results after the copies, and the forward dispatch
  (wgmma only on sm 90).
- Mutation tests: the kernel sources with a barrier, a wait or a fence removed must be reported.

Binaries are built once per source hash under build/cuda_emu/ (about a minute of g++ on 2 cores when cold).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import err_bound

from vefast.ops.attention import attention_reference
from vefast.ops.qk_prologue import QKNorm, qk_norm_rope_reference

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"
KERNELS = ROOT / "kernels"
BUILD = ROOT / "build" / "cuda_emu"
CXX = os.environ.get("CXX", "g++")
CXXFLAGS = ["-std=c++17", "-O2", "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas", "-DVEFAST_CUDA_EMU",
            "-DVEFAST_WITH_SM90A"]
HARNESS_SOURCES = ["flash_fwd.cu", "flash_bwd.cu", "flash_fwd_sm90a.cu"]

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"no host C++ compiler ({CXX})")


# ---------------------------------------------------------------------------------------------------------
# Building: one object per translation unit, cached under build/cuda_emu/obj by the hash of every file it
# includes (g++ -MM), so that a mutant recompiles only what it changes; binaries cached by their objects.

def _digest(paths, extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for p in sorted(set(paths)):
        h.update(str(p.name).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _object(src: Path, kernel_dir: Path, flags: list[str]) -> Path:
    includes = ["-I", str(EMU / "shim"), "-I", str(EMU), "-I", str(kernel_dir)]
    lang = ["-x", "c++"] if src.suffix == ".cu" else []
    cmd = [CXX, *CXXFLAGS, *flags, *includes, *lang]
    deps = subprocess.run([*cmd, "-MM", str(src)], check=True, capture_output=True, text=True).stdout
    files = [Path(t) for t in deps.replace("\\\n", " ").split()[1:] if t != "\\"]
    # keyed by the contents of the files and the flags, not by where they are (mutants live in tmp dirs)
    obj = BUILD / "obj" / f"{src.stem}-{_digest(files, ' '.join([CXX, *CXXFLAGS, *flags, *lang]))}.o"
    if not obj.exists():
        obj.parent.mkdir(parents=True, exist_ok=True)
        tmp = obj.with_suffix(f".{os.getpid()}.tmp")
        r = subprocess.run([*cmd, "-c", str(src), "-o", str(tmp)], capture_output=True, text=True)
        assert r.returncode == 0, f"compiling {src} failed:\n{r.stderr[-4000:]}"
        os.replace(tmp, obj)
    return obj


def _build(name: str, sources: list[Path], kernel_dir: Path = KERNELS) -> Path:
    """Link the emulator runtime and ``sources`` (kernel .cu files compiled as C++) into build/cuda_emu/."""
    objs = [_object(src, kernel_dir, []) for src in [EMU / "cuda_emu.cpp", *sources]]
    out = BUILD / f"{name}-{_digest(objs, CXX)}"
    if not out.exists():
        for stale in BUILD.glob(f"{name}-*"):  # builds of older sources
            stale.unlink(missing_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        r = subprocess.run([CXX, *map(str, objs), "-o", str(tmp)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-4000:]
        os.replace(tmp, out)
    return out


@pytest.fixture(scope="module")
def selftest_bin() -> Path:
    return _build("emu_selftest", [EMU / "emu_selftest.cpp"])


@pytest.fixture(scope="module")
def harness_bin() -> Path:
    return _build("attn_harness", [EMU / "attn_harness.cpp", *(KERNELS / s for s in HARNESS_SOURCES)])


# ---------------------------------------------------------------------------------------------------------
# The emulator's own tests.

SELFTESTS = ["mma", "ldmatrix", "ldmatrix_mma_compose", "cp_async", "cp_async_misaligned", "cp_async_missing_wait",
             "inflight_and_uninitialized", "shuffles", "scheduling", "deadlock_detection", "race_detection",
             "launch_checks", "smem_poisoned", "wgmma", "wgmma_descriptor", "wgmma_rules", "wgmma_groups"]


@pytest.mark.parametrize("case", SELFTESTS)
def test_emulator_selftest(selftest_bin, case):
    r = subprocess.run([str(selftest_bin), case], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"PASS {case}" in r.stdout, r.stdout + r.stderr


def test_emulator_shared_memory_overrun_faults(selftest_bin):
    r = subprocess.run([str(selftest_bin), "smem_oob"], capture_output=True, text=True, timeout=60)
    assert r.returncode in (128 + 11, -11), (r.returncode, r.stdout, r.stderr)
    assert "invalid memory access" in r.stderr and "thread (0,0,0)" in r.stderr


def test_emulator_conversions_match_torch(selftest_bin, tmp_path):
    """float -> bf16 / fp16 round to nearest even like torch, ties, subnormals, overflow, inf and NaN included."""
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 65504.0, 65519.9, 65520.0, 1e6, -1e6, 6e-8, 2.98e-8, 2.9802322e-8,
                            5.96e-8, 6.1e-5, 6.0e-5, 1e-40, 3.4e38, float("inf"), float("-inf"), float("nan")])
    ties = (torch.arange(1, 2000, dtype=torch.float64) + 0.5).float() * 2.0 ** -12  # exact halfway cases
    vals = torch.cat([special, ties, torch.randn(20000, generator=g) * torch.logspace(-9, 6, 20000).float()])
    bits = torch.randint(0, 2**31 - 1, (20000,), generator=g, dtype=torch.int32).view(torch.float32)  # any pattern
    vals = torch.cat([vals, bits, -bits]).contiguous()
    (tmp_path / "in.bin").write_bytes(vals.numpy().tobytes())
    r = subprocess.run([str(selftest_bin), "convert", str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = torch.frombuffer(bytearray((tmp_path / "out.bin").read_bytes()), dtype=torch.int16)
    n = vals.numel()
    for got, dtype in ((out[:n], torch.bfloat16), (out[n:], torch.float16)):
        want = vals.to(dtype)
        got_t = got.view(dtype)
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got_t), nan), dtype
        mismatch = (got[~nan] != want.view(torch.int16)[~nan]).nonzero()
        assert mismatch.numel() == 0, (dtype, vals[~nan][mismatch[:5, 0]])


# ---------------------------------------------------------------------------------------------------------
# The host's layout rule, as attn::flash_copy_plan (kernels/attention_params.cuh) states it: a (B, N, H, hd)
# tensor is read / written by 16-byte accesses when its head-dim stride is 1, its base is 16-byte aligned and
# its other strides (those of size-1 dims are never used, hence ignored) are multiples of 8 elements.

def vectorizable(offset_elems: int, strides, sizes) -> bool:
    """The rule for a 16-bit tensor at ``offset_elems`` elements from a 16-byte aligned buffer."""
    rest = [0 if n == 1 else st for n, st in zip(sizes[:3], strides[:3])]
    return strides[3] == 1 and (2 * offset_elems) % 16 == 0 and all(st % 8 == 0 for st in rest)


# ---------------------------------------------------------------------------------------------------------
# The attention kernels under the emulator.

def _write_case(d: Path, *, dtype, B, N, H, hd, seed, q_weight, k_weight, rope, dout_stride, backward=True,
                forward="mma", sm=80, copies=True, qkv_offset=0, grad_stride=1, table_offset=0,
                dout_expanded=False):
    """Random inputs (q/k/v as views of a packed (B, N, 3, H, hd) qkv, ``qkv_offset`` elements into its
    buffer), written for attn_harness. Returns the tensors the reference needs and the harness's view
    parameters."""
    g = torch.Generator().manual_seed(seed)
    qkv_flat = torch.randn(qkv_offset + B * N * 3 * H * hd, generator=g).to(dtype)
    qkv = qkv_flat[qkv_offset:].view(B, N, 3, H, hd)
    dout_buf = torch.randn(B, N, H, hd * dout_stride, generator=g).to(dtype)
    dout = dout_buf[..., ::dout_stride]
    if dout_expanded:  # the gradient of a sum: one value, every stride 0
        dout_buf = dout_buf[:1, :1, :1, :1].contiguous()
        dout = dout_buf.expand(B, N, H, hd)
    qw = (1.0 + 0.2 * torch.randn(hd, generator=g)) if q_weight else None
    kw = (1.0 + 0.2 * torch.randn(hd, generator=g)) if k_weight else None
    cos = sin = None
    if rope:  # rotary tables: one random angle per interleaved pair (as rope_2d_freqs builds them)
        ang = (torch.rand(N, hd // 2, generator=g) * 6.3).repeat_interleave(2, dim=-1)
        cos, sin = ang.cos().contiguous(), ang.sin().contiguous()
    scale = hd ** -0.5
    st = qkv.stride()
    lines = [f"dtype {'bf16' if dtype == torch.bfloat16 else 'fp16'}", f"shape {B} {N} {H} {hd}",
             f"scale {scale!r}", "eps 1e-6", f"seed {seed}", f"backward {int(backward)}",
             f"q_weight {int(q_weight)}", f"k_weight {int(k_weight)}", f"rope {int(rope)}", f"forward {forward}",
             f"sm {sm}", f"copies {int(copies)}", f"grad_stride {grad_stride}", f"table_offset {table_offset}"]
    views = {}
    for i, name in enumerate("qkv"):
        views[name] = (qkv_offset + i * st[2], (st[0], st[1], st[3], st[4]))
        lines.append(f"{name} {views[name][0]} {' '.join(map(str, views[name][1]))}")
    ds = dout.stride()
    views["dout"] = (0, ds)
    lines.append(f"dout 0 {ds[0]} {ds[1]} {ds[2]} {ds[3]}")
    (d / "case.txt").write_text("\n".join(lines) + "\n")
    (d / "qkv.bin").write_bytes(qkv_flat.view(torch.int16).numpy().tobytes())
    (d / "dout.bin").write_bytes(dout_buf.contiguous().view(torch.int16).numpy().tobytes())
    for name, t in (("q_weight", qw), ("k_weight", kw), ("cos", cos), ("sin", sin)):
        if t is not None:
            (d / f"{name}.bin").write_bytes(t.float().contiguous().numpy().tobytes())
    return (qkv, dout, qw, kw, cos, sin, scale), views


def _expected_copies(views, sizes, *, grad_stride, table_offset, tables):
    """The names csrc's apply_copy_plan replaces, by the rule above: (forward, backward)."""
    fwd = [n for n in "qkv" if not vectorizable(*views[n], sizes)]
    bwd = fwd + (["dout"] if not vectorizable(*views["dout"], sizes) else [])
    if grad_stride != 1:
        bwd += ["dq", "dk", "dv"]
    if table_offset % 4:  # float32 tables: 16-byte aligned when the offset is a multiple of 4 floats
        fwd += tables
        bwd += tables
    return fwd, bwd


def _read(d: Path, name: str, shape, dtype) -> torch.Tensor:
    raw = bytearray((d / f"{name}.bin").read_bytes())
    if dtype == torch.float32:
        return torch.frombuffer(raw, dtype=torch.float32).reshape(shape)
    return torch.frombuffer(raw, dtype=torch.int16).view(dtype).reshape(shape)


def _run_harness(binary: Path, d: Path, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), str(d)], capture_output=True, text=True, timeout=timeout)


def _sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          scale=scale).transpose(1, 2)


def _check_attention(d: Path, dtype, B, N, H, hd, inputs, floor, backward=True):
    qkv, dout, qw, kw, cos, sin, scale = inputs
    v = qkv[:, :, 2]
    # What the kernels compute on: q and k after the prologue (kernels/attention_params.cuh: RMSNorm in
    # float32, rounded to the dtype, times the weight, then RoPE in float32, rounded), i.e. the eager
    # qk_norm_rope_reference; the gradients dq, dk are w.r.t. these.
    norm = QKNorm("rms", qw, kw, eps=1e-6) if qw is not None else QKNorm("none")
    qt, kt = qk_norm_rope_reference(qkv, norm, None if cos is None else (cos, sin))
    o = _read(d, "o", (B, N, H, hd), dtype)
    lse = _read(d, "lse", (B, H, N), torch.float32)

    ref_in = [t.detach().double().requires_grad_(True) for t in (qt, kt, v)]
    ref_out = attention_reference(*ref_in, scale=scale)
    ref_grads = torch.autograd.grad(ref_out, ref_in, dout.double())
    eager_in = [t.detach().clone().requires_grad_(True) for t in (qt, kt, v)]
    eager_out = _sdpa(*eager_in, scale)
    eager_grads = torch.autograd.grad(eager_out, eager_in, dout)

    errors = {"o": err_bound(o, eager_out, ref_out, floor=floor)}
    if backward:
        dq, dk, dv = (_read(d, n, (B, N, H, hd), dtype) for n in ("dq", "dk", "dv"))
        for name, got, e, r in zip(("dq", "dk", "dv"), (dq, dk, dv), eager_grads, ref_grads):
            errors[name] = err_bound(got, e, r, floor=floor)
        # the backward's D = rowsum(dO * O), from the forward output it was given, computed in the kernel
        dsum = _read(d, "dsum", (B, H, N), torch.float32)
        want = (dout.double() * o.double()).sum(-1).transpose(1, 2)
        derr = (dsum.double() - want).abs().max().item()
        assert derr <= 1e-5 * (1 + want.abs().max().item()), f"dsum error {derr:.2e}"
    ref_lse = torch.logsumexp(scale * ref_in[0].detach().transpose(1, 2) @ ref_in[1].detach().permute(0, 2, 3, 1), -1)
    lse_err = (lse.double() - ref_lse).abs().max().item()
    assert lse_err <= 1e-4 * (1 + ref_lse.abs().max().item()), f"lse error {lse_err:.2e}"
    return errors


def _counter(stdout: str, name: str) -> int:
    return int(stdout.split(f" {name} ")[1].split()[0])


# (hd, N, dtype, prologue, dout_stride): every head dim at every N in one dtype or the other; the prologue
# (q/k RMSNorm and RoPE, or one of them) at a few; a non-unit head-dim stride of dout at some (the host
# copies it: the layout rule).
BF16, FP16 = torch.bfloat16, torch.float16
CASES = [
    (64, 1, BF16, "", 1), (64, 17, FP16, "norm+rope", 1), (64, 65, BF16, "", 2), (64, 130, BF16, "norm+rope", 1),
    (72, 1, FP16, "norm+rope", 1), (72, 17, BF16, "norm+rope", 2), (72, 65, FP16, "", 1),
    (72, 130, BF16, "norm+rope", 1),
    (80, 1, BF16, "", 1), (80, 17, BF16, "rope", 1), (80, 65, BF16, "norm", 1), (80, 130, FP16, "", 2),
    (96, 1, FP16, "", 1), (96, 17, FP16, "", 1), (96, 65, BF16, "norm+rope", 1), (96, 130, BF16, "", 1),
    (128, 1, BF16, "norm+rope", 2), (128, 17, BF16, "", 1), (128, 65, FP16, "norm+rope", 1), (128, 130, BF16, "", 1),
]
CASE_IDS = [f"hd{c[0]}-N{c[1]}-{str(c[2])[6:]}-{c[3] or 'plain'}-dos{c[4]}" for c in CASES]


def _shape(N):
    return (2, 2) if N <= 65 else (1, 2)  # (B, H): tiny, two heads to exercise the head strides


@pytest.mark.parametrize("hd,N,dtype,prologue,dout_stride", CASES, ids=CASE_IDS)
def test_flash_kernels_emulated(harness_bin, tmp_path, hd, N, dtype, prologue, dout_stride):
    """The mma.sync forward (kernels/flash_fwd.cuh) and the backward (kernels/flash_bwd.cuh: D and dQ, then
    dK / dV), through the host's copy plan: a dout with head-dim stride 2 is copied, nothing else."""
    B, H = _shape(N)
    inputs, views = _write_case(tmp_path, dtype=dtype, B=B, N=N, H=H, hd=hd, seed=1000 * hd + N,
                                q_weight="norm" in prologue, k_weight="norm" in prologue, rope="rope" in prologue,
                                dout_stride=dout_stride, forward="mma")
    r = _run_harness(harness_bin, tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "forward: mma" in r.stdout and _counter(r.stdout, "mma") > 0 and _counter(r.stdout, "wgmma") == 0
    assert "copies forward:\n" in r.stdout
    assert ("copies backward: dout\n" if dout_stride != 1 else "copies backward:\n") in r.stdout, r.stdout
    _check_attention(tmp_path, dtype, B, N, H, hd, inputs, floor=2e-3 if prologue else 1e-3)


@pytest.mark.parametrize("hd,N,dtype,prologue,dout_stride", CASES, ids=CASE_IDS)
def test_sm90a_forward_emulated(harness_bin, tmp_path, hd, N, dtype, prologue, dout_stride):
    """The sm_90a forward (kernels/flash_fwd_sm90a.cuh: wgmma, no mma.sync), forward only (the backward is
    the same kernel on every architecture), at the same shapes."""
    B, H = _shape(N)
    inputs, _ = _write_case(tmp_path, dtype=dtype, B=B, N=N, H=H, hd=hd, seed=2000 * hd + N,
                            q_weight="norm" in prologue, k_weight="norm" in prologue, rope="rope" in prologue,
                            dout_stride=1, backward=False, forward="sm90a")
    r = _run_harness(harness_bin, tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "forward: sm90a" in r.stdout and _counter(r.stdout, "wgmma") > 0 and _counter(r.stdout, "mma") == 0
    _check_attention(tmp_path, dtype, B, N, H, hd, inputs, floor=2e-3 if prologue else 1e-3, backward=False)


@pytest.mark.parametrize("sm,kernel", [(80, "mma"), (86, "mma"), (89, "mma"), (90, "sm90a"), (100, "mma"),
                                       (120, "mma")])
def test_forward_dispatch(harness_bin, tmp_path, sm, kernel):
    """launch_flash_fwd picks the wgmma kernel on sm 90 only (when built, as here), the mma.sync one elsewhere."""
    inputs, _ = _write_case(tmp_path, dtype=BF16, B=1, N=17, H=1, hd=72, seed=sm, q_weight=False, k_weight=False,
                            rope=False, dout_stride=1, backward=False, forward="dispatch", sm=sm)
    r = _run_harness(harness_bin, tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    assert f"forward: {kernel}" in r.stdout
    assert (_counter(r.stdout, "wgmma") > 0) == (kernel == "sm90a")
    _check_attention(tmp_path, BF16, 1, 17, 1, 72, inputs, floor=1e-3, backward=False)


# Layouts that break the rule, each repaired by the host's copies: (id, kwargs of _write_case, prologue tables).
LAYOUTS = [
    ("qkv-misaligned", dict(qkv_offset=4), False),                # every q, k, v base 8 bytes off
    ("qkv-aligned-offset", dict(qkv_offset=8), False),            # 16 bytes off: no copy
    ("dout-expanded", dict(dout_expanded=True), False),           # stride 0 everywhere, hd included
    ("grads-strided", dict(grad_stride=2), False),                # dq, dk, dv with head-dim stride 2
    ("tables-misaligned", dict(table_offset=1), True),            # weights, cos, sin 4 bytes off
    ("everything", dict(qkv_offset=2, dout_stride=2, grad_stride=3, table_offset=2), True),
]


@pytest.mark.parametrize("forward", ["mma", "sm90a"])
@pytest.mark.parametrize("name,kwargs,tables", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_layout_rule_copies(harness_bin, tmp_path, name, kwargs, tables, forward):
    """attn::flash_copy_plan copies exactly what the rule names (the Python predicate above, which
    vefast/ops/attention.py can use to report the copies), and the results stay exact after the copies."""
    B, N, H, hd = 2, 17, 2, 72
    kw = {"dout_stride": 1, **kwargs}
    inputs, views = _write_case(tmp_path, dtype=BF16, B=B, N=N, H=H, hd=hd, seed=77, q_weight=tables,
                                k_weight=tables, rope=tables, forward=forward, **kw)
    r = _run_harness(harness_bin, tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    names = ["q_weight", "k_weight", "cos", "sin"] if tables else []
    fwd, bwd = _expected_copies(views, (B, N, H, hd), grad_stride=kw.get("grad_stride", 1),
                                table_offset=kw.get("table_offset", 0), tables=names)
    got_fwd = r.stdout.split("copies forward:")[1].split("\n")[0].split()
    got_bwd = r.stdout.split("copies backward:")[1].split("\n")[0].split()
    assert sorted(got_fwd) == sorted(fwd) and sorted(got_bwd) == sorted(bwd), (got_fwd, got_bwd, fwd, bwd)
    if name == "qkv-aligned-offset":
        assert not got_fwd and not got_bwd
    _check_attention(tmp_path, BF16, B, N, H, hd, inputs, floor=2e-3 if tables else 1e-3)


def test_kernels_refuse_layouts_that_break_the_rule(harness_bin, tmp_path):
    """Without the host's copies, a dout with head-dim stride 2 is refused at launch (never read wrongly)."""
    _write_case(tmp_path, dtype=BF16, B=1, N=17, H=1, hd=64, seed=3, q_weight=False, k_weight=False, rope=False,
                dout_stride=2, copies=False)
    r = _run_harness(harness_bin, tmp_path)
    assert r.returncode == 4 and "backward launch failed: invalid argument" in r.stderr, (r.returncode, r.stderr)
    for forward in ("mma", "sm90a"):
        _write_case(tmp_path, dtype=BF16, B=1, N=17, H=1, hd=64, seed=3, q_weight=False, k_weight=False, rope=False,
                    dout_stride=1, copies=False, qkv_offset=4, forward=forward)
        r = _run_harness(harness_bin, tmp_path)
        assert r.returncode == 4 and "forward launch failed: invalid argument" in r.stderr, (r.returncode, r.stderr)


# ---------------------------------------------------------------------------------------------------------
# Mutation tests: the emulator must catch a missing barrier, wait or fence in the real kernels.

def _mutant(tmp_root: Path, file: str, old: str, new: str) -> Path:
    """kernels/ copied with the one occurrence of ``old`` in ``file`` replaced by ``new``."""
    src = (KERNELS / file).read_text()
    assert src.count(old) == 1, f"mutation anchor not unique or missing in {file}: {old!r}"
    kdir = tmp_root / "kernels"
    shutil.copytree(KERNELS, kdir)
    (kdir / file).write_text(src.replace(old, new))
    return kdir


# name: (file, anchor whose first line is removed, forward kernel, backward, what the emulator must report)
MUTANTS = {
    # flash forward: K_j read before its cp.async group is waited for
    "flash_fwd_no_wait_for_k": (
        "flash_fwd.cuh",
        "    ptx::cp_async_wait<0>();\n    __syncthreads();\n    issue_tile<T, C::kBlockN, HDP, C::kThreads>(uV",
        "mma", False, "has not been waited for"),
    # flash forward: K_{j+1} copied into sK while other warps still read K_j
    "flash_fwd_no_barrier_before_next_k": (
        "flash_fwd.cuh",
        "    __syncthreads();\n    if (n0 + C::kBlockN < N) {\n      issue_tile",
        "mma", False, "shared-memory race"),
    # flash dK/dV: the next Q/dO stage issued while other warps still read it, its copies not waited for
    "flash_dkdv_no_barrier": (
        "flash_bwd.cuh",
        "    __syncthreads();  // tile m0 (and its row stats) complete; every warp is done with the other stage\n",
        "mma", True, "cuda_emu: "),
    # sm90a: O rescaled while P_{j-1} V_{j-1} still runs; then V_{j+1} lands on the V stage it reads
    "sm90a_no_wgmma_wait_before_rescale": (
        "flash_fwd_sm90a.cuh", "      ptx::wgmma_wait<0>();\n      ptx::fence_operands(o);\n#pragma unroll",
        "sm90a", False, "in-flight wgmma.mma_async"),
    # sm90a: tiles landed by cp.async read by wgmma without fence.proxy.async
    "sm90a_no_proxy_fence": (
        "flash_fwd_sm90a.cuh", "    ptx::fence_proxy_async();\n    __syncthreads();          // ... for every thread",
        "sm90a", False, "no fence.proxy.async"),
    # sm90a: the P V batch issued without wgmma.fence after the S batch's commit
    "sm90a_no_wgmma_fence_before_pv": (
        "flash_fwd_sm90a.cuh", "      ptx::wgmma_fence();\n      issue_pv<T, HDP>(o, pf, uV0 + ((j - 1) & 1)",
        "sm90a", False, "has not executed wgmma.fence"),
    # sm90a: the next K / V tiles issued while the other warpgroup's wgmma may still read the stages
    "sm90a_no_barrier_before_next_tiles": (
        "flash_fwd_sm90a.cuh",
        "    __syncthreads();          // ... for every thread; every warpgroup is done with K_j and V_{j-1}\n",
        "sm90a", False, "cuda_emu: "),
}


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_emulator_catches_planted_bug(tmp_path_factory, name):
    file, old, forward, backward, expect = MUTANTS[name]
    root = tmp_path_factory.mktemp(name)
    kdir = _mutant(root, file, old, old.split("\n", 1)[1] if "\n" in old else "")  # drop its first line
    binary = _build(f"attn_harness_{name}", [EMU / "attn_harness.cpp", *(kdir / s for s in HARNESS_SOURCES)],
                    kernel_dir=kdir)
    case = root / "case"
    case.mkdir()
    _write_case(case, dtype=BF16, B=1, N=130, H=1, hd=64, seed=5, q_weight=False, k_weight=False, rope=False,
                dout_stride=1, backward=backward, forward=forward)
    r = _run_harness(binary, case)
    assert r.returncode == 3 and expect in r.stderr, (r.returncode, r.stderr, r.stdout)
