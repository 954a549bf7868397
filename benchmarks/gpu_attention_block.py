"""GPU benchmark: the LightningDiT-XL/1 attention sub-block, from the qkv Linear's output to the out-projection's
input (q/k RMSNorm + 2D RoPE + attention + the (B, N, C) reshape), forward, backward and both.

Cases: B in {32, 128, 256}, N in {256, 1024} (256 / 512 px), H = 16, hd = 72, bf16, RMSNorm weights in fp32 (as
under autocast). Variants (``variant`` of each row):
- ``vefast``: ``vefast.qk_norm_rope_attention`` with its defaults (backend "auto"; ``sdpa_backend`` records the
  SDPA kernel torch picks); ``vefast_sdpa_<b>``: the same inside ``sdpa_kernel(b)`` for b in cudnn, flash,
  efficient; ``vefast_cuda``: backend "cuda" (vefast's CUDA kernel), with ``validated`` / ``max_err_vs_sdpa``
  from a comparison of its output with the SDPA path on this GPU (``benchmarks.attention_table`` reads these);
- ``eager_<b>``: LightningDiT's eager code (its RMSNorm module, ``q * cos + rotate_half(q) * sin``, SDPA) inside
  ``sdpa_kernel(b)``; ``compile_<b>``: ``torch.compile`` of it, compiled inside ``sdpa_kernel(b)`` (Inductor fixes
  the SDPA kernel when it traces), batch dimension dynamic (one compile per N and backend;
  ``VEFAST_BENCH_ATTN_COMPILE=default`` compiles only with torch's default backend, ``none`` skips compiling);
- ``best_eager`` / ``best_compile``: the fastest of those per case, for ``speedup_vs_best_eager`` /
  ``speedup_vs_best_compile`` on the ``vefast`` rows.
Prologue rows (``name`` = ``prologue_fwd`` / ``prologue_bwd``): the Triton kernels alone, GB/s against their
minimal bytes (``vefast.ops.qk_prologue.minimal_bytes``) and ``frac_of_hbm`` of the measured copy bandwidth.

Goals (issue 10, H100/H200): vefast >= 1.3x eager, >= 1.0x compile (1.05x stretch), prologue forward and backward
>= 70% of the copy bandwidth. Run through ``python -m benchmarks.run_gpu attention_block``; a CPU dry run at tiny
sizes (``python -m benchmarks.gpu_attention_block --dry-run``) checks the script without a GPU.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.harness import add_ratios, autograd_steps, measure, script_main, sdpa_context

SDPA_BACKENDS = ("cudnn", "flash", "efficient")
GPU_CASES = [(B, N) for N in (256, 1024) for B in (32, 128, 256)]
H, HD, EPS = 16, 72, 1e-6


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """LightningDiT's RMSNorm.forward (models/rmsnorm.py)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).type_as(x) * w


def _eager_block(cos: torch.Tensor, sin: torch.Tensor) -> Callable[..., torch.Tensor]:
    """LightningDiT's Attention.forward from the qkv projection to the out-projection's input."""
    from vefast.ops.rope import rotate_half

    def block(qkv, qw, kw):
        B, N = qkv.shape[:2]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = _rms(q, qw), _rms(k, kw)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        q, k = q.to(v.dtype), k.to(v.dtype)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1)
    return block


def _vefast_block(cos: torch.Tensor, sin: torch.Tensor, backend: str = "auto") -> Callable[..., torch.Tensor]:
    from vefast.ops.attention import qk_norm_rope_attention

    def block(qkv, qw, kw):
        B, N = qkv.shape[:2]
        return qk_norm_rope_attention(qkv, qw, kw, (cos, sin), backend=backend).reshape(B, N, -1)
    return block


_REPEATS: dict[str, int] = {}  # measure()'s warmup / rep (the dry run sets the minimum)


def _try(rows: list[dict], fn: Callable[[], Any], **kw: Any) -> None:
    """Measure, or record why a variant cannot run this case (a backend refusing it, no extension)."""
    try:
        rows.append(measure(fn, **_REPEATS, **kw))
    except Exception as exc:  # noqa: BLE001 - a variant's failure is a result, not a crash
        rows.append({k: v for k, v in kw.items() if k not in ("bytes_moved", "flops")}
                    | {"error": f"{type(exc).__name__}: {exc}"[:300]})
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _measure_variant(rows, fn, inputs, dout, context, variant, common, **extra) -> None:
    try:
        steps = autograd_steps(fn, inputs, dout, context)
    except Exception as exc:  # noqa: BLE001
        for mode in ("fwd", "bwd", "both"):
            rows.append({**common, **extra, "variant": variant, "mode": mode,
                         "error": f"{type(exc).__name__}: {exc}"[:300]})
        return
    for mode, step in steps.items():
        _try(rows, step, variant=variant, mode=mode, **common, **extra)
    del steps


def _validate_cuda(vefast_fn, cuda_fn, inputs) -> dict[str, Any]:
    """The CUDA kernel's output against the SDPA path's on this GPU (bf16: within 2 ulp of the output scale)."""
    with torch.no_grad():
        ref = vefast_fn(*inputs).float()
        got = cuda_fn(*inputs).float()
    err = (got - ref).abs().max().item()
    return {"max_err_vs_sdpa": err, "validated": bool(err <= 2 * 2.0**-8 * max(1.0, ref.abs().max().item()))}


def _compile_backends() -> tuple[str | None, ...]:
    mode = os.environ.get("VEFAST_BENCH_ATTN_COMPILE", "all")
    return {"all": SDPA_BACKENDS, "default": (None,), "none": ()}.get(mode, SDPA_BACKENDS)


def _sdpa_choice(qkv: torch.Tensor) -> str:
    """The SDPA kernel torch picks for the vefast default path's (B, H, N, hd) views."""
    from vefast.ops import attention as att

    q = torch.empty_permuted((qkv.shape[0], qkv.shape[3], qkv.shape[1], qkv.shape[4]), (0, 2, 1, 3),
                             dtype=qkv.dtype, device=qkv.device)
    return att._choose(q, q, att._v_view(qkv.detach()), HD ** -0.5, att.sdp_enabled_mask())


def _block_rows(cases, device: str, dtype: torch.dtype, *, backends, compile_backends, ceilings,
                heads: int = H) -> list[dict]:
    from vefast.ops.rope import rope_2d_freqs

    rows: list[dict] = []
    arch = ("sm_%d%d" % torch.cuda.get_device_capability()) if device == "cuda" else "cpu"
    dev_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    for N in sorted({n for _, n in cases}):
        cos, sin = rope_2d_freqs(HD, int(N ** 0.5), device=device)
        vefast, cuda, eager = _vefast_block(cos, sin), _vefast_block(cos, sin, backend="cuda"), _eager_block(cos, sin)
        compiled = {b: torch.compile(eager) for b in compile_backends}  # one per N and backend: batch is dynamic
        for B in [b for b, n in cases if n == N]:
            torch.manual_seed(0)
            qkv = torch.randn(B, N, 3, heads, HD, device=device, dtype=dtype, requires_grad=True)
            torch._dynamo.mark_dynamic(qkv, 0)
            qw = (torch.rand(HD, device=device) + 0.5).requires_grad_(True)
            kw = (torch.rand(HD, device=device) + 0.5).requires_grad_(True)
            dout = torch.randn(B, N, heads * HD, device=device, dtype=dtype)
            inputs = [qkv, qw, kw]
            common = dict(name="attention_block", case=f"B{B}_N{N}", B=B, N=N, H=heads, hd=HD, dtype=str(dtype)[6:],
                          qk_norm="rms", arch=arch, device=dev_name)
            _measure_variant(rows, vefast, inputs, dout, contextlib.nullcontext, "vefast", common,
                             sdpa_backend=_sdpa_choice(qkv))
            for b in backends:
                _measure_variant(rows, vefast, inputs, dout, lambda b=b: sdpa_context(b), f"vefast_sdpa_{b}", common)
            if device == "cuda":
                try:
                    check = _validate_cuda(vefast, cuda, inputs)
                except Exception as exc:  # noqa: BLE001 - e.g. no extension on this machine
                    check = {"validated": False, "error_validation": f"{type(exc).__name__}: {exc}"[:300]}
                _measure_variant(rows, cuda, inputs, dout, contextlib.nullcontext, "vefast_cuda", common, **check)
            for b in backends or (None,):
                _measure_variant(rows, eager, inputs, dout, lambda b=b: sdpa_context(b), f"eager_{b or 'default'}",
                                 common)
            for b, fn in compiled.items():  # compiled inside sdpa_kernel(b): Inductor fixes the kernel when tracing
                _measure_variant(rows, fn, inputs, dout, lambda b=b: sdpa_context(b), f"compile_{b or 'default'}",
                                 common)
            rows += _prologue_rows(qkv, qw, kw, (cos, sin), common, ceilings)
            del qkv, dout, inputs
    for prefix in ("eager_", "compile_"):
        _best(rows, prefix, f"best_{prefix[:-1]}")
    for ref in ("best_eager", "best_compile"):
        add_ratios(rows, key=("name", "case", "mode"), reference=ref)
    return rows


def _best(rows: list[dict], prefix: str, label: str, name: str = "attention_block") -> None:
    """A ``label`` row per (case, mode) of rows named ``name``: the fastest variant starting with ``prefix``."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("name") == name and r["variant"].startswith(prefix) and "ms" in r:
            groups.setdefault((r["case"], r["mode"]), []).append(r)
    for cands in groups.values():
        best = min(cands, key=lambda r: r["ms"])
        rows.append({**best, "variant": label, "best_variant": best["variant"]})


def _prologue_rows(qkv, qw, kw, rope, common, ceilings) -> list[dict]:
    """The Triton prologue alone: forward and backward GB/s against their minimal bytes."""
    from vefast.ops import qk_prologue as qp
    from vefast.ops._common import use_triton

    x = qkv.detach()
    if not use_triton(x):  # the CPU dry run outside the interpreter: no kernel to launch
        return []
    norm = qp.QKNorm("rms", qw.detach(), kw.detach(), eps=EPS)
    B, N, _three, heads, hd = x.shape
    q, k = (torch.empty(B, N, heads, hd, device=x.device, dtype=x.dtype) for _ in range(2))
    grads = [torch.randn(B, N, heads, hd, device=x.device, dtype=x.dtype) for _ in range(3)]
    dqkv, part = qp.alloc_bwd(x, norm)
    fwd_bytes, bwd_bytes = qp.minimal_bytes(x, norm, rope)
    rows: list[dict] = []
    base = {k: v for k, v in common.items() if k != "name"}
    _try(rows, lambda: qp.launch_fwd(x, norm, rope, q, k), name="prologue_fwd", variant="vefast", mode="fwd",
         bytes_moved=fwd_bytes, **base)
    _try(rows, lambda: qp.launch_bwd(*grads, x, norm, rope, dqkv, part), name="prologue_bwd", variant="vefast",
         mode="bwd", bytes_moved=bwd_bytes, **base)
    hbm = ceilings.get("hbm_copy_gbps")
    for r in rows:
        if hbm and r.get("gbps"):
            r["frac_of_hbm"] = r["gbps"] / hbm
    return rows


def run(ceilings: dict) -> list[dict]:
    """All rows on the GPU (harness protocol)."""
    return _block_rows(GPU_CASES, "cuda", torch.bfloat16, backends=SDPA_BACKENDS,
                       compile_backends=_compile_backends(), ceilings=ceilings)


def dry_run() -> list[dict]:
    """The same script at tiny sizes on the CPU (torch's default SDPA, no compile): checks it runs, measures
    nothing worth reporting. The fused prologue runs in the interpreter when TRITON_INTERPRET=1 is set."""
    _REPEATS.update(warmup=1, rep=1)
    try:
        return _block_rows([(2, 16)], "cpu", torch.bfloat16, backends=(), compile_backends=(), ceilings={}, heads=2)
    finally:
        _REPEATS.clear()


def main(argv: list[str]) -> int:
    return script_main("attention_block", dry_run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
