"""Separation function ([VR] eq. 3.3, docs/math.md §5): the Gram form against a naive float64 eq. 3.3 on
the same noise, the fused Triton kernel (interpreter on CPU) against float64, closed forms, errors.
float64 inputs run the float64 torch path by design (declared with ``FLOAT64_PATH``); fp32 / bf16 /
fp16 inputs reach the kernel with default arguments (a spy on its launcher checks it)."""
from __future__ import annotations

import pytest
import torch
from helpers import err_bound

import vefast
from vefast.ops import separation as sep
from vefast.sampling.separation import standardize

SNR = torch.tensor([0.02, 0.1, 0.3, 1.0, 3.0], dtype=torch.float64)
FLOAT64_PATH = pytest.mark.expect_fallback("separation_function:float64")  # float64 inputs: the torch path


@pytest.fixture
def launches(monkeypatch):
    """The shapes (M, M) of D at every call of the separation kernel's launcher (wrapped, still run)."""
    calls = []
    launch = sep._launch_separation

    def spy(dist, *args, **kwargs):
        calls.append(tuple(dist.shape))
        return launch(dist, *args, **kwargs)

    monkeypatch.setattr(sep, "_launch_separation", spy)
    return calls


def naive_eq33(x: torch.Tensor, e: torch.Tensor, snr: torch.Tensor, *, leave_one_out: bool = False) -> torch.Tensor:
    """Eq. 3.3 written out in float64: explicit differences, softmax over j (j = i included; with
    ``leave_one_out`` the row x_il was made from is left out of its posterior)."""
    m, d = x.shape
    out = []
    for r in snr.tolist():
        total = 0.0
        for i in range(m):
            others = torch.cat([x[:i], x[i + 1:]]) if leave_one_out else x
            xil = x[i] + e / r                                             # (K, d): every l at once
            dist = ((xil[:, None, :] - others[None, :, :]) ** 2).sum(-1)   # (K, M) or (K, M - 1)
            w = torch.softmax(-0.5 * r * r * dist, dim=-1)
            total += float(((w @ others) ** 2).sum())
        out.append(total / (m * e.shape[0] * d))
    return torch.tensor(out, dtype=torch.float64)


def data(m, k, d, seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, d, generator=g, dtype=dtype).to(device),
            torch.randn(k, d, generator=g, dtype=dtype).to(device))


@FLOAT64_PATH
@pytest.mark.parametrize("m,k,d", [(9, 7, 24), (13, 5, 4)])  # d > M (w^T D w) and d < M (posterior mean)
@pytest.mark.parametrize("normalize", [True, False])
def test_gram_form_equals_eq33_float64(m, k, d, normalize):
    x, e = data(m, k, d)
    x = x * torch.linspace(0.5, 2.0, d, dtype=torch.float64) + 0.3
    got = vefast.separation_function(x, SNR, noise=e, normalize=normalize)
    ref = naive_eq33(standardize(x) if normalize else x, e, SNR)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-13)
    direct = sep.separation_reference(standardize(x) if normalize else x, SNR, e, chunk_rows=10)
    torch.testing.assert_close(direct, ref, rtol=1e-12, atol=1e-13)


@FLOAT64_PATH
def test_shape_and_scale_invariance_with_normalize():
    x, e = data(8, 6, 12)
    a = vefast.separation_function(x.reshape(8, 3, 2, 2), [0.1, 1.0], noise=e.reshape(6, 3, 4))
    b = vefast.separation_function(3.0 * x - 7.0, [0.1, 1.0], noise=e)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@FLOAT64_PATH
def test_large_snr_is_one_and_complement_is_exact():
    """Rows skipped by the one-hot bound contribute exactly 0; the complement keeps tiny values."""
    x, e = data(10, 8, 30)
    s = vefast.separation_function(x, [1e-3, 30.0, 1e4], noise=e)
    ref = naive_eq33(standardize(x), e, torch.tensor([1e-3, 30.0, 1e4], dtype=torch.float64))
    torch.testing.assert_close(1 - s, 1 - ref, rtol=1e-9, atol=1e-15)
    assert abs(float(s[2]) - 1.0) < 1e-14


@FLOAT64_PATH
def test_closed_form_gaussian_small_d_large_m():
    """S(r) = r^2 / (1 + r^2) for N(0, I) data as M -> inf (docs/math.md §5); d = 1, with the data and the noise
    at stratified normal quantiles (plain draws at d = 1 leave a ~1/sqrt(K) error in E[e^2])."""
    def quantiles(n):
        return torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)[:, None]

    r = torch.tensor([0.25, 1.0, 3.0], dtype=torch.float64)
    s = vefast.separation_function(quantiles(1000), r, noise=quantiles(64))
    torch.testing.assert_close(s, r**2 / (1 + r**2), rtol=0, atol=0.01)


def test_common_random_numbers_and_determinism():
    x, _ = data(12, 4, 16, dtype=torch.float32)
    a = vefast.separation_function(x, SNR, num_noise=20, generator=torch.Generator().manual_seed(5))
    b = vefast.separation_function(x, SNR, num_noise=20, generator=torch.Generator().manual_seed(5))
    c = vefast.separation_function(x, SNR, num_noise=20, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # one r at a time with the same generator state gives the same values: the noise is shared
    one = vefast.separation_function(x, SNR[2:3], num_noise=20, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(one, a[2:3], rtol=1e-6, atol=1e-7)


def _stats32(m, k, d, seed, device="cpu"):
    x, e = data(m, k, d, seed, device=device)
    x = standardize(x)
    return x, e, sep.gram_stats(x, e)


@pytest.mark.parametrize("m,k,d,blocks", [(20, 18, 40, (16, 16)), (7, 5, 3, (16, 16)),  # tiles of 16
                                          (35, 5, 12, (16, 16)),                     # 3 j tiles
                                          (2, 3, 5, (None, None)), (17, 5, 9, (None, None))])  # default tiling
def test_triton_kernel_vs_float64(m, k, d, blocks, device):
    """Fused kernel (interpreter on CPU): M, K not multiples of the tiles, several r, fp32 vs float64;
    M = 35 in tiles of 16 (two off-diagonal j tiles for the last k tile); small M (one padded tile)
    with the launcher's own tiling."""
    x, e, st = _stats32(m, k, d, seed=m, device=device)
    r = torch.tensor([0.05, 0.4, 2.0], dtype=torch.float64, device=device)
    ref = sep.separation_complement_torch(x, st, r, dtype=torch.float64)
    eager = sep.separation_complement_torch(x, st, r, dtype=torch.float32)
    f = torch.float32
    fused = sep._launch_separation(st["D"].to(f), st["P"].to(f), st["gdiag"].to(f), st["min_dist"].to(f),
                                   st["pmax"].to(f), r.to(f), block_l=blocks[0], block_j=blocks[1])
    scale = m * k * d
    err_bound(fused / scale, eager / scale, ref / scale, factor=2.0, floor=2e-7)


def test_default_arguments_reach_the_kernel(device, launches):
    """``separation_function(x1, snr)`` as a user calls it (normalize=True, drawn noise) runs the fused
    kernel, once for all r, and matches eq. 3.3 in float64 on the same (standardized) data and noise."""
    x, _ = data(6, 5, 10, seed=3, dtype=torch.float32, device=device)
    r = torch.tensor([0.1, 1.0], dtype=torch.float64)
    got = vefast.separation_function(x, r, generator=torch.Generator().manual_seed(4))
    assert launches == [(6, 6)]
    e = torch.randn(500, 10, generator=torch.Generator().manual_seed(4)).to(device)  # the noise it drew
    ref = sep.separation_reference(standardize(x.double()), r.to(device), e.double())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=0, atol=3e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_reach_the_kernel(dtype, device, launches):
    """bf16 / fp16 data: float64 statistics of the given values, the kernel for the per-r work."""
    x, e = data(6, 5, 10, seed=3, device=device)
    xh, eh = x.to(dtype), e.to(dtype)
    got = vefast.separation_function(xh, [0.1, 1.0], noise=eh)
    assert launches == [(6, 6)]
    ref = sep.separation_reference(standardize(xh.double()), torch.tensor([0.1, 1.0], device=device), eh.double())
    torch.testing.assert_close(got, ref, rtol=0, atol=3e-6)


@FLOAT64_PATH
def test_float64_inputs_keep_the_float64_torch_path(launches, fallback_guard):
    """A float64 request keeps float64 per-r work (documented): no launch, one reported fallback."""
    x, e = data(6, 5, 10, seed=3)
    vefast.separation_function(x, [0.1, 1.0], noise=e)
    assert launches == []
    assert [ev.key for ev in fallback_guard] == ["separation_function:float64"]


@pytest.mark.parametrize("fused", [pytest.param(True, id="kernel"), pytest.param(
    False, id="torch", marks=pytest.mark.expect_fallback("separation_function:cpu"))])
def test_estimate_stays_in_unit_interval(fused, monkeypatch, launches):
    """S is a mean of squared norms (>= 0) of standardized data (<= 1): at r -> 0 the fp32 complement's
    rounding gave -2e-8 (issue 12); the estimate is clamped into [0, 1], still within 3e-8 of float64.
    Without normalization S is only >= 0 (scaled data: S -> mean ||x||^2 / d = 9 at large r)."""
    if not fused:
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # the torch Gram path on CPU tensors
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(8, 4, generator=g), torch.randn(5, 4, generator=g)
    r = [1e-5, 1e-4, 1e4]
    s = vefast.separation_function(x, r, noise=e)
    assert bool((s >= 0).all()) and bool((s <= 1).all()), s
    ref = sep.separation_reference(standardize(x.double()), torch.tensor(r, dtype=torch.float64), e.double())
    torch.testing.assert_close(s, ref.clamp(0, 1), rtol=0, atol=3e-8)
    big = vefast.separation_function(3 * x, [1e4], noise=e, normalize=False)
    assert float(big) == pytest.approx(9 * float((x.double() ** 2).mean()), rel=1e-6)
    assert len(launches) == (2 if fused else 0)


def test_custom_op_under_torch_compile(device):
    x, e, st = _stats32(6, 5, 8, seed=2, device=device)
    f = torch.float32
    args = [st[k].to(f) for k in ("D", "P", "gdiag", "min_dist", "pmax")] + [torch.tensor([0.3, 1.0], device=device)]
    eager = torch.ops.vefast.separation_complement(*args)
    compiled = torch.compile(lambda *a: torch.ops.vefast.separation_complement(*a), fullgraph=True)(*args)
    torch.testing.assert_close(compiled, eager)


@FLOAT64_PATH
def test_bad_inputs():
    x, e = data(5, 3, 4)
    with pytest.raises(ValueError, match="x1 must be finite"):
        vefast.separation_function(torch.where(x > 1, float("nan"), x), [1.0], noise=e)
    with pytest.raises(ValueError, match="at least M = 2 rows"):
        vefast.separation_function(x[:1], [1.0], noise=e)
    with pytest.raises(ValueError, match="noise rows must have d = 4"):
        vefast.separation_function(x, [1.0], noise=e[:, :3])
    with pytest.raises(ValueError, match="snr values must be finite and > 0"):
        vefast.separation_function(x, [1.0, 0.0])
    with pytest.raises(ValueError, match="snr values must be finite and > 0"):
        vefast.separation_function(x, [float("nan")])
    with pytest.raises(ValueError, match="at least one value"):
        vefast.separation_function(x, [])
    with pytest.raises(TypeError, match="x1 must be a torch.Tensor"):
        vefast.separation_function(x.numpy(), [1.0])
    with pytest.raises(TypeError, match="x1 must have dtype"):
        vefast.separation_function(x.long(), [1.0])
    with pytest.raises(ValueError, match="at least 2 dims"):
        vefast.separation_function(x[0], [1.0])
    with pytest.raises(ValueError, match="constant dimension"):
        vefast.separation_function(torch.cat([x, torch.ones(5, 1, dtype=x.dtype)], 1), [1.0], num_noise=2)
    with pytest.raises(ValueError, match="num_noise must be a positive int"):
        vefast.separation_function(x, [1.0], num_noise=0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        vefast.separation_function(x, [1.0], generator=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_without_elements_are_an_error(dtype):
    """Issue 12: x1 of shape (6, 0) returned NaN."""
    with pytest.raises(ValueError, match=r"x1 rows must have at least one element \(d >= 1\), got shape \(6, 0\)"):
        vefast.separation_function(torch.empty(6, 0, dtype=dtype), [1.0], num_noise=2)
    with pytest.raises(ValueError, match=r"x1 rows must have at least one element \(d >= 1\), got shape \(6, 2, 0\)"):
        vefast.separation_function(torch.empty(6, 2, 0, dtype=dtype), [1.0], num_noise=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_noise_or_data_is_a_clear_error(dtype):
    """Issue 12: noise of shape (0, 3) raised torch's reshape error instead of naming the argument."""
    x, _ = data(5, 3, 4, dtype=dtype)
    with pytest.raises(ValueError, match=r"noise must have at least K = 1 rows, got shape \(0, 3\)"):
        vefast.separation_function(x, [1.0], noise=torch.empty(0, 3, dtype=dtype))
    with pytest.raises(ValueError, match=r"x1 must have at least M = 2 rows, got shape \(0, 4\)"):
        vefast.separation_function(x[:0], [1.0], num_noise=2)


@pytest.mark.gpu
@FLOAT64_PATH
def test_gpu_paper_size_kernel_vs_float64(launches):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, 32, 32, generator=g)
    e = torch.randn(500, 4 * 32 * 32, generator=g)
    r = torch.logspace(-3, 1, 24, dtype=torch.float64)
    ref = vefast.separation_function(x.double().cuda(), r, noise=e.double().cuda())
    got = vefast.separation_function(x.cuda(), r, noise=e.cuda())
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(1 - got, 1 - ref, rtol=1e-4, atol=1e-9)
    assert launches == [(200, 200)]


@pytest.mark.gpu
@FLOAT64_PATH
def test_gpu_kernel_tiles_large_m(launches):
    """M = 4096 data rows (128 j tiles of the Triton kernel) against the float64 Gram path."""
    g = torch.Generator().manual_seed(1)
    x, e = torch.randn(4096, 64, generator=g), torch.randn(8, 64, generator=g)
    r = torch.tensor([0.05, 0.3, 1.0, 3.0], dtype=torch.float64)
    ref = vefast.separation_function(x.double().cuda(), r, noise=e.double().cuda())
    got = vefast.separation_function(x.cuda(), r, noise=e.cuda())
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)
    assert launches == [(4096, 4096)]


# ---------------------------------------------------------------------------------------------------
# leave-one-out estimator (issue 13 item 7): the softmax over j != i

@FLOAT64_PATH
@pytest.mark.parametrize("m,k,d", [(9, 7, 24), (13, 5, 4)])
def test_leave_one_out_equals_its_definition_float64(m, k, d):
    """The Gram form with w_ili = 0 (torch path, float64) and the direct reference against eq. 3.3 with
    j != i; at large r the posterior falls on the nearest other row, so S stays below 1 (unlike eq. 3.3)."""
    x, e = data(m, k, d)
    got = vefast.separation_function(x, SNR, noise=e, leave_one_out=True)
    want = naive_eq33(standardize(x), e, SNR, leave_one_out=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sep.separation_reference(standardize(x), SNR, e, leave_one_out=True), want,
                               rtol=1e-12, atol=1e-14)
    paper = vefast.separation_function(x, SNR, noise=e)
    assert float(paper[-1]) > 0.99 and float(got[-1]) < float(paper[-1])
    with pytest.raises(TypeError, match="leave_one_out must be a bool"):
        vefast.separation_function(x, SNR, noise=e, leave_one_out=1)


@pytest.mark.parametrize("m,k,d,blocks", [(20, 18, 24, (16, 16)), (35, 3, 12, (16, 16)), (17, 5, 9, (None, None))])
def test_triton_kernel_leave_one_out_vs_float64(m, k, d, blocks, device):
    """The kernel's LOO specialization (j = i masked, no program skipped) against the float64 torch path,
    at r where eq. 3.3's rows would all be skipped (one-hot on j = i) but LOO's are not."""
    x, e, st = _stats32(m, k, d, seed=m, device=device)
    r = torch.tensor([0.4, 50.0], dtype=torch.float64, device=device)
    ref = sep.separation_complement_torch(x, st, r, dtype=torch.float64, leave_one_out=True)
    eager = sep.separation_complement_torch(x, st, r, dtype=torch.float32, leave_one_out=True)
    f = torch.float32
    fused = sep._launch_separation(st["D"].to(f), st["P"].to(f), st["gdiag"].to(f), st["min_dist"].to(f),
                                   st["pmax"].to(f), r.to(f), block_l=blocks[0], block_j=blocks[1], leave_one_out=True)
    scale = m * k * d
    err_bound(fused / scale, eager / scale, ref / scale, factor=2.0, floor=2e-7)
    assert float(ref[-1]) > 1e-3 * scale  # r = 50: far from 0 (eq. 3.3's complement is exactly 0 there)


def test_leave_one_out_reaches_the_kernel(device, launches):
    x, _ = data(6, 5, 10, seed=3, dtype=torch.float32, device=device)
    got = vefast.separation_function(x, [0.1, 1.0], generator=torch.Generator().manual_seed(4), leave_one_out=True)
    assert launches == [(6, 6)]
    e = torch.randn(500, 10, generator=torch.Generator().manual_seed(4)).to(device)
    ref = sep.separation_reference(standardize(x.double()), torch.tensor([0.1, 1.0], device=device), e.double(),
                                   leave_one_out=True)
    torch.testing.assert_close(got, ref, rtol=0, atol=3e-6)


_PTXAS_SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vefast.ops import separation as sep
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
names = ["dist_ptr", "p_ptr", "gd_ptr", "mind_ptr", "pmax_ptr", "snr_ptr", "out_ptr", "K", "stride_d", "stride_p",
         "n_lblocks", "n_chunks"]
rows = []
for loo in (False, True):
    sig = {n: "*fp32" for n in names[:7]} | {n: "i32" for n in names[7:]}
    bl, bj = sep._block_sizes(200, 500)
    const = {"M": 200, "GAP": sep.ONEHOT_GAP, "BLOCK_L": bl, "BLOCK_J": bj, "LOO": loo}
    sig |= {k: "constexpr" for k in const}
    attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)}
    k = triton.compile(ASTSource(sep._separation_kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": sep._num_warps(bl, bj), "num_stages": sep.NUM_STAGES})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    log = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = [int(v) for v in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups()]
    rows.append({"loo": loo, "regs": regs, "spills": spills})
print(json.dumps(rows))
"""


def test_separation_kernel_spills_nothing_with_or_without_leave_one_out():
    """ptxas -v on the sm_90 code of both specializations at the paper's M = 200, K = 500 (compiled in a
    subprocess: this lane interprets kernels): no spill, and the default path stays within 128 registers."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", _PTXAS_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads(p.stdout.strip().splitlines()[-1])
    assert [r["spills"] for r in rows] == [[0, 0], [0, 0]], rows
    assert rows[0]["regs"] <= 128, rows


def test_torch_fp32_path_keeps_the_complement_accurate_near_collapse_when_d_below_m():
    """d < M: the torch path contracts with the posterior means centred at each row's own data point, so
    1 - S keeps its relative accuracy in fp32 where it is ~1e-12 (uncentred, two O(d) terms cancelled and
    left ~d eps per row: 1e-9, 700x off)."""
    g = torch.Generator().manual_seed(1)
    m, d, k = 40, 39, 8
    x = standardize(torch.randn(m, d, generator=g, dtype=torch.float64))
    e = torch.randn(k, d, generator=g, dtype=torch.float64)
    r = torch.tensor([0.8, 1.534], dtype=torch.float64)
    st = sep.gram_stats(x, e)
    c64 = sep.separation_complement_torch(x, st, r, dtype=torch.float64)
    c32 = sep.separation_complement_torch(x, st, r, dtype=torch.float32)
    assert 0 < float(c64[1]) / (m * k * d) < 1e-10  # deep in the collapse
    torch.testing.assert_close(c32, c64, rtol=1e-4, atol=0.0)


@pytest.mark.expect_fallback("separation_function:float64", "separation_function:cpu")
@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_huge_snr_is_the_collapsed_limit_not_nan(path, monkeypatch):
    """SNR values past SNR_MAX are computed there (every posterior one-hot in fp32 and float64): finite, and
    the same as float64, with the leave-one-out estimator too (r^2 would overflow fp32)."""
    if path == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(6, 5, generator=g), torch.randn(4, 5, generator=g)
    r = [1e3, 1e19, 1e30]
    for loo in (False, True):
        got = vefast.separation_function(x, r, noise=e, leave_one_out=loo)
        want = vefast.separation_function(x.double(), r, noise=e.double(), leave_one_out=loo)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
