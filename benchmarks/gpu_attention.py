"""GPU benchmark: vefast's CUDA attention kernels (backend "cuda": the mma.sync kernels; on sm_90 the wgmma
forward when the extension was built with 90a) against every SDPA backend and FlashAttention-2/3 when
importable; forward, backward and both, bf16.

Cases (issue 11): B in {32, 128, 256} x N in {256, 1024} x H in {12, 16} x hd in {64, 72}, highest priority
first (hd 72 at N 256, the DiT-XL/2 / LightningDiT-XL/1 shape, leads), q, k, v views of one packed
(B, N, 3, H, hd) tensor as a fused qkv Linear gives them; each case twice:
- ``qk_norm = "none"``: ``vefast.attention(q, k, v, backend="cuda")`` (variant ``vefast_cuda``) vs
  ``F.scaled_dot_product_attention`` inside ``sdpa_kernel(b)`` (``sdpa_<b>``, b in cudnn, flash, efficient),
  ``flash_attn.flash_attn_func`` (``flash_attn2``) and ``flash_attn_interface.flash_attn_func`` (``flash_attn3``);
- ``qk_norm = "rms"`` (the fused prologue: q/k RMSNorm + 2D RoPE): ``qk_norm_rope_attention(qkv, qw, kw, rope,
  backend="cuda")`` (``vefast_cuda``: the prologue in the kernel's tile loads) vs the same with backend "sdpa"
  inside ``sdpa_kernel(b)`` (``vefast_sdpa_<b>``: the Triton prologue, then SDPA).
``vefast_cuda`` rows carry ``validated`` (its output and gradients matched the SDPA path's on this GPU: within
2 bf16 ulps of the output's scale, 4 of each gradient's) and ``cuda_forward`` (``"sm90a"`` when the wgmma
forward ran, else ``"mma"``). FLOPs at the true head dim: 4 B H N^2 hd forward, 2.5x that backward
(FlashAttention's count), as ``tflops`` and ``frac_of_bf16_gemm``; ``best_sdpa`` rows are the fastest SDPA
variant per case and mode, ``speedup_vs_best_sdpa`` / ``speedup_vs_flash_attn{2,3}`` sit on the
``vefast_cuda`` rows.

The ranges where the CUDA kernel beats SDPA's best: one row ``name = "cuda_attention_table"`` holds, under
``table``, this run's rows turned into a backend table by ``benchmarks.attention_table`` (the
``vefast/_attention_table.json`` schema and decision rule: per (arch, hd, dtype, qk_norm), the N ranges where the
validated kernel is faster at every batch size). ``python -m benchmarks.attention_table`` builds the shipped table
from every ``attention*.json`` result the same way.

Run through ``python -m benchmarks.run_gpu attention`` (writes benchmarks/results/attention.json);
``python -m benchmarks.gpu_attention --dry-run`` runs it at tiny sizes on a CPU (SDPA variants only).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.harness import add_ratios, autograd_steps, environment, measure, script_main, sdpa_context

SDPA_BACKENDS = ("cudnn", "flash", "efficient")
CASES = [(hd, N, H, B) for N in (256, 1024) for hd in (72, 64) for H in (16, 12) for B in (32, 128, 256)]
NORMS = ("none", "rms")
FLOPS_PER_MODE = {"fwd": 4.0, "bwd": 10.0, "both": 14.0}  # x B H N^2 hd
EPS = 1e-6
_REPEATS = {"warmup": 10, "rep": 40}  # ms of do_bench warm-up / measurement per row (the matrix is large)


def _sdpa_bnhd(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _core_variants(device: str) -> dict[str, tuple[Callable, Callable | None]]:
    """qk_norm "none": name -> (function of the packed qkv, context factory)."""
    from vefast.ops.attention import attention

    out: dict[str, tuple[Callable, Callable | None]] = {}
    if device == "cuda":
        out["vefast_cuda"] = (lambda qkv: attention(*qkv.unbind(2), backend="cuda"), None)
    for b in (SDPA_BACKENDS if device == "cuda" else (None,)):
        out[f"sdpa_{b or 'default'}"] = (lambda qkv: _sdpa_bnhd(*qkv.unbind(2)), lambda b=b: sdpa_context(b))
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        from flash_attn import flash_attn_func as fa2

        out["flash_attn2"] = (lambda qkv: fa2(*qkv.unbind(2)), None)  # (B, N, H, hd) views, as ours
    if device == "cuda" and importlib.util.find_spec("flash_attn_interface") is not None:
        from flash_attn_interface import flash_attn_func as fa3

        def fa3_out(qkv):
            out = fa3(*qkv.unbind(2))
            return out[0] if isinstance(out, tuple) else out
        out["flash_attn3"] = (fa3_out, None)
    return out


def _prologue_variants(device: str, rope) -> dict[str, tuple[Callable, Callable | None]]:
    """qk_norm "rms" (RMSNorm + RoPE): name -> (function of (qkv, qw, kw), context factory)."""
    from vefast.ops.attention import qk_norm_rope_attention

    out: dict[str, tuple[Callable, Callable | None]] = {}
    if device == "cuda":
        out["vefast_cuda"] = (lambda qkv, qw, kw: qk_norm_rope_attention(qkv, qw, kw, rope, eps=EPS, backend="cuda"),
                              None)
    for b in (SDPA_BACKENDS if device == "cuda" else (None,)):
        out[f"vefast_sdpa_{b or 'default'}"] = (
            lambda qkv, qw, kw: qk_norm_rope_attention(qkv, qw, kw, rope, eps=EPS, backend="sdpa"),
            lambda b=b: sdpa_context(b))
    return out


def _measure_variant(rows: list[dict], fn, inputs, dout, context, variant: str, common: dict, **extra) -> None:
    """fwd / bwd / both rows of one variant; a variant that cannot run the case gets rows with ``error``."""
    try:
        steps = autograd_steps(fn, inputs, dout, context or contextlib.nullcontext)
    except Exception as exc:  # noqa: BLE001 - a backend refusing a case is a result, not a crash
        for mode in FLOPS_PER_MODE:
            rows.append({**common, **extra, "variant": variant, "mode": mode,
                         "error": f"{type(exc).__name__}: {exc}"[:300]})
        return
    for mode, step in steps.items():
        try:
            rows.append(measure(step, **_REPEATS, variant=variant, mode=mode, **common, **extra))
        except Exception as exc:  # noqa: BLE001
            rows.append({**common, **extra, "variant": variant, "mode": mode,
                         "error": f"{type(exc).__name__}: {exc}"[:300]})
    del steps
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _validate(cuda_fn, ref_fn, ref_context, inputs, dout) -> dict[str, Any]:
    """The CUDA kernel's output and gradients against the SDPA path's on this GPU (bf16 ulps of each scale)."""
    def run(fn, context):
        xs = [t.detach().clone().requires_grad_(True) for t in inputs]
        with context():
            out = fn(*xs)
        return [out.float(), *(g.float() for g in torch.autograd.grad(out, xs, dout))]

    got = run(cuda_fn, contextlib.nullcontext)
    want = run(ref_fn, ref_context or contextlib.nullcontext)
    errs = [(g - w).abs().max().item() for g, w in zip(got, want)]
    scales = [max(1.0, w.abs().max().item()) for w in want]
    ok = errs[0] <= 2 * 2.0**-8 * scales[0] and all(e <= 4 * 2.0**-8 * s for e, s in zip(errs[1:], scales[1:]))
    return {"validated": bool(ok), "max_err_vs_sdpa": errs[0], "max_grad_err_vs_sdpa": max(errs[1:])}


def _cuda_forward(device: str) -> str | None:
    """Which forward kernel backend "cuda" runs here: "sm90a" (wgmma) or "mma" (None without the extension)."""
    from vefast import _ext

    if device != "cuda" or not _ext.available():
        return None
    archs = (_ext.build_info() or {}).get("cuda_archs", [])
    built = "90a" in (archs.split(";") if isinstance(archs, str) else archs)
    return "sm90a" if built and torch.cuda.get_device_capability() == (9, 0) else "mma"


def _case_rows(device: str, cases, norms=NORMS) -> list[dict]:
    from vefast.ops.rope import rope_2d_freqs

    rows: list[dict] = []
    arch = ("sm_%d%d" % torch.cuda.get_device_capability()) if device == "cuda" else "cpu"
    dev_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    cuda_forward = _cuda_forward(device)
    for hd, N, H, B in cases:
        rope = tuple(t.to(device) for t in rope_2d_freqs(hd, int(round(N ** 0.5)), device=device))
        torch.manual_seed(0)
        qkv = torch.randn(B, N, 3, H, hd, device=device, dtype=torch.bfloat16, requires_grad=True)
        qw = (torch.rand(hd, device=device) + 0.5).requires_grad_(True)
        kw = (torch.rand(hd, device=device) + 0.5).requires_grad_(True)
        dout = torch.randn(B, N, H, hd, device=device, dtype=torch.bfloat16)
        for norm in norms:
            common = dict(name="attention", case=f"hd{hd}_N{N}_H{H}_B{B}_{norm}", B=B, N=N, H=H, hd=hd,
                          dtype="bfloat16", qk_norm=norm, arch=arch, device=dev_name)
            variants, inputs = ((_core_variants(device), [qkv]) if norm == "none"
                                else (_prologue_variants(device, rope), [qkv, qw, kw]))
            for variant, (fn, context) in variants.items():
                extra: dict[str, Any] = {}
                if variant == "vefast_cuda":
                    ref_name = next(v for v in variants if v != "vefast_cuda")
                    try:
                        extra = _validate(fn, variants[ref_name][0], variants[ref_name][1], inputs, dout)
                    except Exception as exc:  # noqa: BLE001 - no extension here: recorded, the rows say why
                        extra = {"validated": False, "error_validation": f"{type(exc).__name__}: {exc}"[:300]}
                    extra["cuda_forward"] = cuda_forward
                _measure_variant(rows, fn, inputs, dout, context, variant, common, **extra)
        del qkv, dout
    return rows


def _finish(rows: list[dict], ceilings: dict) -> list[dict]:
    """TFLOP/s, the best-SDPA rows, the speedups and the ranges table (one row)."""
    for r in rows:
        if "ms" in r:
            r["tflops"] = FLOPS_PER_MODE[r["mode"]] * r["B"] * r["H"] * r["N"] ** 2 * r["hd"] / (r["ms"] * 1e-3) / 1e12
            if ceilings.get("bf16_gemm_tflops"):
                r["frac_of_bf16_gemm"] = r["tflops"] / ceilings["bf16_gemm_tflops"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("name") == "attention" and "ms" in r and r["variant"].startswith(("sdpa_", "vefast_sdpa_")):
            groups.setdefault((r["case"], r["mode"]), []).append(r)
    for cands in groups.values():
        best = min(cands, key=lambda r: r["ms"])
        rows.append({**best, "variant": "best_sdpa", "best_variant": best["variant"]})
    for ref in ("best_sdpa", "flash_attn2", "flash_attn3"):
        add_ratios(rows, key=("name", "case", "mode"), reference=ref, ours="vefast_cuda")
    rows.append({"name": "cuda_attention_table", "variant": "table", "table": ranges_table(rows)})
    return rows


def ranges_table(rows: list[dict]) -> dict:
    """The rows as a backend table (vefast/_attention_table.json schema) by benchmarks.attention_table's rule."""
    from benchmarks.attention_table import build_table

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "attention.json").write_text(json.dumps({"environment": environment(), "results": rows},
                                                           default=str))
        return build_table(Path(d))


def run(ceilings: dict) -> list[dict]:
    """All rows on the GPU (harness protocol)."""
    return _finish(_case_rows("cuda", CASES), ceilings)


def dry_run() -> list[dict]:
    """The script at tiny sizes on the CPU: torch's default SDPA and vefast's SDPA path (the fused prologue in
    the interpreter when TRITON_INTERPRET=1), no CUDA kernel; checks it runs and the table builds."""
    _REPEATS.update(warmup=1, rep=1)
    try:
        rows = _finish(_case_rows("cpu", [(64, 16, 2, 2)]), {})
    finally:
        _REPEATS.update(warmup=10, rep=40)
    return rows


def main(argv: list[str]) -> int:
    return script_main("attention", dry_run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
