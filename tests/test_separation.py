"""Separation function (seed 004 eq. 3.3, MATH.md §5): the Gram form against a naive float64 eq. 3.3 on
the same noise, the fused Triton kernel (interpreter on CPU) against float64, closed forms, errors."""
from __future__ import annotations

import pytest
import torch
from helpers import err_bound

import vefast
from vefast.ops import separation as sep
from vefast.sampling.separation import standardize

SNR = torch.tensor([0.02, 0.1, 0.3, 1.0, 3.0], dtype=torch.float64)


def naive_eq33(x: torch.Tensor, e: torch.Tensor, snr: torch.Tensor) -> torch.Tensor:
    """Eq. 3.3 written out in float64: explicit differences, softmax over j (j = i included)."""
    m, d = x.shape
    out = []
    for r in snr.tolist():
        total = 0.0
        for i in range(m):
            xil = x[i] + e / r                                          # (K, d): every l at once
            dist = ((xil[:, None, :] - x[None, :, :]) ** 2).sum(-1)     # (K, M)
            w = torch.softmax(-0.5 * r * r * dist, dim=-1)
            total += float(((w @ x) ** 2).sum())
        out.append(total / (m * e.shape[0] * d))
    return torch.tensor(out, dtype=torch.float64)


def data(m, k, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=g, dtype=dtype), torch.randn(k, d, generator=g, dtype=dtype)


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


def test_shape_and_scale_invariance_with_normalize():
    x, e = data(8, 6, 12)
    a = vefast.separation_function(x.reshape(8, 3, 2, 2), [0.1, 1.0], noise=e.reshape(6, 3, 4))
    b = vefast.separation_function(3.0 * x - 7.0, [0.1, 1.0], noise=e)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_large_snr_is_one_and_complement_is_exact():
    """Rows skipped by the one-hot bound contribute exactly 0; the complement keeps tiny values."""
    x, e = data(10, 8, 30)
    s = vefast.separation_function(x, [1e-3, 30.0, 1e4], noise=e)
    ref = naive_eq33(standardize(x), e, torch.tensor([1e-3, 30.0, 1e4], dtype=torch.float64))
    torch.testing.assert_close(1 - s, 1 - ref, rtol=1e-9, atol=1e-15)
    assert abs(float(s[2]) - 1.0) < 1e-14


def test_closed_form_gaussian_small_d_large_m():
    """S(r) = r^2 / (1 + r^2) for N(0, I) data as M -> inf (MATH §5); d = 1, with the data and the noise
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


def _stats32(m, k, d, seed):
    x, e = data(m, k, d, seed)
    x = standardize(x)
    return x, e, sep.gram_stats(x, e)


@pytest.mark.parametrize("m,k,d,blocks", [(20, 18, 40, (16, 16)), (7, 5, 3, (16, 16))])
def test_triton_kernel_vs_float64(m, k, d, blocks):
    """Fused kernel (interpreter on CPU): M, K not multiples of the tiles, several r, fp32 vs float64."""
    x, e, st = _stats32(m, k, d, seed=m)
    r = torch.tensor([0.05, 0.4, 2.0], dtype=torch.float64)
    ref = sep.separation_complement_torch(x, st, r, dtype=torch.float64)
    eager = sep.separation_complement_torch(x, st, r, dtype=torch.float32)
    f = torch.float32
    fused = sep._launch_separation(st["D"].to(f), st["P"].to(f), st["gdiag"].to(f), st["min_dist"].to(f),
                                   st["pmax"].to(f), r.to(f), block_l=blocks[0], block_j=blocks[1])
    scale = m * k * d
    err_bound(fused / scale, eager / scale, ref / scale, factor=2.0, floor=2e-7)


def test_public_fp32_dispatch_uses_kernel_and_matches_float64():
    x, e = data(6, 5, 10, seed=3)
    got = vefast.separation_function(x.float(), [0.1, 1.0], noise=e.float())
    ref = vefast.separation_function(x, [0.1, 1.0], noise=e)
    torch.testing.assert_close(got, ref, rtol=0, atol=3e-6)


def test_custom_op_under_torch_compile():
    x, e, st = _stats32(6, 5, 8, seed=2)
    f = torch.float32
    args = [st[k].to(f) for k in ("D", "P", "gdiag", "min_dist", "pmax")] + [torch.tensor([0.3, 1.0])]
    eager = torch.ops.vefast.separation_complement(*args)
    compiled = torch.compile(lambda *a: torch.ops.vefast.separation_complement(*a), fullgraph=True)(*args)
    torch.testing.assert_close(compiled, eager)


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
    with pytest.raises(ValueError, match="num_noise must be an int >= 1"):
        vefast.separation_function(x, [1.0], num_noise=0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        vefast.separation_function(x, [1.0], generator=3)


@pytest.mark.gpu
def test_gpu_paper_size_kernel_vs_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, 32, 32, generator=g)
    e = torch.randn(500, 4 * 32 * 32, generator=g)
    r = torch.logspace(-3, 1, 24, dtype=torch.float64)
    ref = vefast.separation_function(x.double().cuda(), r, noise=e.double().cuda())
    got = vefast.separation_function(x.cuda(), r, noise=e.cuda())
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(1 - got, 1 - ref, rtol=1e-4, atol=1e-9)


@pytest.mark.gpu
def test_gpu_kernel_tiles_large_m():
    """M = 4096 data rows (64 j tiles of the Triton kernel) against the float64 Gram path."""
    g = torch.Generator().manual_seed(1)
    x, e = torch.randn(4096, 64, generator=g), torch.randn(8, 64, generator=g)
    r = torch.tensor([0.05, 0.3, 1.0, 3.0], dtype=torch.float64)
    ref = vefast.separation_function(x.double().cuda(), r, noise=e.double().cuda())
    got = vefast.separation_function(x.cuda(), r, noise=e.cuda())
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)
