"""GPU benchmark: fused attention (vefast._C) vs every available baseline, forward + backward, bf16.

Cases (MATH.md §7): LightningDiT-XL/1 (N=256, H=16, hd=72, B in {32, 256}), hd 64 and 128 at N=256, and
N=1024 (512 px). Variants: vefast, SDPA with each backend (flash, efficient, cudnn; via
torch.nn.attention.sdpa_kernel), xformers and flash-attn when importable, eager math ("eager"), and
torch.compile of eager. Then the fused q/k RMSNorm + 2D RoPE + attention against eager norm + rope + the best
SDPA backend, and against its torch.compile. FLOPs: 4 * B * H * N^2 * hd forward, 2.5x that for the backward
(FlashAttention's count, recomputation not counted), 14 * B * H * N^2 * hd in all; reported as ``tflops``
and as the fraction of the measured bf16 GEMM ceiling (``frac_of_bf16_gemm``).

Run through ``python -m benchmarks.run_gpu`` (writes benchmarks/results/attention.json).
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.harness import add_ratios, measure

CASES = [  # (label, B, N, H, hd)
    ("lightningdit_xl1_b32", 32, 256, 16, 72),
    ("lightningdit_xl1_b256", 256, 256, 16, 72),
    ("hd64_n256", 128, 256, 16, 64),
    ("hd128_n256", 128, 256, 8, 128),
    ("n1024_hd72", 32, 1024, 16, 72),
    ("n1024_hd64", 32, 1024, 16, 64),
    ("n1024_hd128", 32, 1024, 8, 128),
]
SDPA_BACKENDS = ("flash", "efficient", "cudnn")


def _flops(B: int, N: int, H: int, hd: int) -> float:
    """Forward 2 matmuls (4 B H N^2 hd) + backward 5 matmuls (10 B H N^2 hd)."""
    return 14.0 * B * H * N * N * hd


def _fwd_bwd(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], dout: torch.Tensor) -> Callable[[], Any]:
    def step():
        out = fn(*inputs)
        return torch.autograd.grad(out, inputs, dout)
    return step


def _sdpa_bnhd(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _eager_bnhd(q, k, v):
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    p = torch.softmax((qh @ kh.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
    return (p @ vh).transpose(1, 2)


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION}[name]

    def fn(q, k, v):
        with sdpa_kernel(backend):
            return _sdpa_bnhd(q, k, v)
    return fn


def _baselines() -> dict[str, Callable[..., torch.Tensor]]:
    out: dict[str, Callable[..., torch.Tensor]] = {f"sdpa_{b}": _sdpa_backend(b) for b in SDPA_BACKENDS}
    out["eager"] = _eager_bnhd
    out["compile"] = torch.compile(_eager_bnhd)
    if importlib.util.find_spec("xformers") is not None:
        import xformers.ops as xops

        out["xformers"] = lambda q, k, v: xops.memory_efficient_attention(q, k, v)  # (B, N, H, hd) layout
    if importlib.util.find_spec("flash_attn") is not None:
        from flash_attn import flash_attn_func

        out["flash_attn"] = lambda q, k, v: flash_attn_func(q, k, v)  # (B, N, H, hd) layout
    return out


def _try_measure(rows: list[dict], fn: Callable[[], Any], **kw: Any) -> None:
    """Measure, or record why a baseline cannot run this case (e.g. a backend rejecting hd 72)."""
    try:
        rows.append(measure(fn, **kw))
    except Exception as exc:  # noqa: BLE001 - a baseline's failure is a result, not a crash
        rows.append({"name": kw["name"], "variant": kw["variant"], "error": f"{type(exc).__name__}: {exc}"[:300],
                     **{k: v for k, v in kw.items() if k not in ("name", "variant", "flops", "bytes_moved")}})
    torch.cuda.empty_cache()


def _annotate(rows: list[dict], ceilings: dict) -> None:
    peak = ceilings.get("bf16_gemm_tflops")
    for r in rows:
        if peak and r.get("tflops"):
            r["frac_of_bf16_gemm"] = r["tflops"] / peak


def _best_sdpa(rows: list[dict], case: str) -> None:
    """Add a 'best_sdpa' row per case (the fastest SDPA backend that ran) for the speedup ratio."""
    cands = [r for r in rows if r.get("case") == case and r["variant"].startswith("sdpa_") and "ms" in r]
    if cands:
        best = min(cands, key=lambda r: r["ms"])
        rows.append({**best, "variant": "best_sdpa", "best_backend": best["variant"]})


def _attention_rows(ceilings: dict) -> list[dict]:
    from vefast.ops.attention import attention

    rows: list[dict] = []
    baselines = _baselines()
    for case, B, N, H, hd in CASES:
        torch.manual_seed(0)
        qkv = torch.randn(B, N, 3, H, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        q, k, v = qkv.unbind(2)
        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))  # strided views, as in a model
        dout = torch.randn(B, N, H, hd, device="cuda", dtype=torch.bfloat16)
        common = dict(name="attention_fwd_bwd", case=case, B=B, N=N, H=H, hd=hd, flops=_flops(B, N, H, hd))
        _try_measure(rows, _fwd_bwd(lambda a, b, c: attention(a, b, c), [q, k, v], dout), variant="vefast", **common)
        for variant, fn in baselines.items():
            inputs = [q, k, v]
            if variant in ("xformers", "flash_attn", "eager", "compile"):
                inputs = [t.detach().contiguous().requires_grad_(True) for t in (q, k, v)]
            _try_measure(rows, _fwd_bwd(fn, inputs, dout), variant=variant, **common)
        _best_sdpa(rows, case)
        del qkv, q, k, v, dout
    for ref in ("best_sdpa", "eager", "compile"):
        add_ratios(rows, key=("name", "case"), reference=ref)
    return rows


def _qk_norm_rope_rows(ceilings: dict) -> list[dict]:
    from vefast.ops.attention import _norm_rope, qk_norm_rope_attention
    from vefast.ops.rope import rope_2d_freqs

    rows: list[dict] = []
    for case, B, grid, H, hd in (("lightningdit_xl1_b32", 32, 16, 16, 72), ("lightningdit_xl1_b256", 256, 16, 16, 72),
                                 ("n1024_hd72", 32, 32, 16, 72)):
        N = grid * grid
        torch.manual_seed(0)
        qkv = torch.randn(B, N, 3, H, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        qw = torch.ones(hd, device="cuda", requires_grad=True)
        kw = torch.ones(hd, device="cuda", requires_grad=True)
        cos, sin = rope_2d_freqs(hd, grid, device="cuda")
        dout = torch.randn(B, N, H, hd, device="cuda", dtype=torch.bfloat16)
        common = dict(name="qk_norm_rope_attention_fwd_bwd", case=case, B=B, N=N, H=H, hd=hd,
                      flops=_flops(B, N, H, hd))
        _try_measure(rows, _fwd_bwd(lambda x, a, b: qk_norm_rope_attention(x, a, b, (cos, sin)), [qkv, qw, kw], dout),
                     variant="vefast", **common)
        for backend in SDPA_BACKENDS:
            sdpa = _sdpa_backend(backend)

            def eager(x, a, b, sdpa=sdpa):
                q, k, v = x.unbind(2)
                return sdpa(_norm_rope(q, a, cos, sin, 1e-6), _norm_rope(k, b, cos, sin, 1e-6), v)

            _try_measure(rows, _fwd_bwd(eager, [qkv, qw, kw], dout), variant=f"eager_norm_rope+sdpa_{backend}",
                         **common)
            _try_measure(rows, _fwd_bwd(torch.compile(eager), [qkv, qw, kw], dout),
                         variant=f"compile_norm_rope+sdpa_{backend}", **common)
        cands = [r for r in rows if r.get("case") == case and r["name"] == common["name"]
                 and r["variant"].startswith("eager_norm_rope") and "ms" in r]
        if cands:
            best = min(cands, key=lambda r: r["ms"])
            rows.append({**best, "variant": "best_eager", "best_backend": best["variant"]})
        ccands = [r for r in rows if r.get("case") == case and r["name"] == common["name"]
                  and r["variant"].startswith("compile_norm_rope") and "ms" in r]
        if ccands:
            best = min(ccands, key=lambda r: r["ms"])
            rows.append({**best, "variant": "best_compile", "best_backend": best["variant"]})
        del qkv, dout
    for ref in ("best_eager", "best_compile"):
        add_ratios(rows, key=("name", "case"), reference=ref)
    return rows


def run(ceilings: dict) -> list[dict]:
    """All rows: attention fwd+bwd, then the fused q/k-norm + rope + attention; TFLOP/s vs the GEMM ceiling."""
    rows = _attention_rows(ceilings) + _qk_norm_rope_rows(ceilings)
    _annotate(rows, ceilings)
    return rows
