"""Drive every kernel once on small, ragged shapes, for compute-sanitizer (stage 4 of gpu_check.sh).

    compute-sanitizer --tool memcheck python -m benchmarks.sanitize [--small] [--only cuda|triton]
    python -m benchmarks.sanitize --device cpu --small     # CPU check of the calls (TRITON_INTERPRET=1: kernels too)

The CUDA kernels of the extension (attention forward and backward, with and without the q/k RMSNorm +
RoPE prologue, bf16 and fp16) and every fused Triton op forward + backward (VE / KL loss, VF loss,
alignment losses, norm_modulate, gated_residual, swiglu, qk prologue, separation, VR sampler). Shapes are
ragged (not multiples of the tiles) so that the masked edges are exercised. ``--small`` keeps one shape
per kernel (racecheck is slow). A fused op falling back to its eager path is listed at the end and
fails the run: the sanitizer would then have checked nothing.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

Case = tuple[str, Callable[[torch.device], None]]


def _rand(*shape: int, device: torch.device, dtype: torch.dtype = torch.float32, grad: bool = True) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)


def _backward(out: torch.Tensor | tuple) -> None:
    outs = out if isinstance(out, tuple) else (out,)
    sum(o.float().square().sum() for o in outs if isinstance(o, torch.Tensor) and o.requires_grad).backward()


# --------------------------------------------------------------------------------------- CUDA extension
def attention_cases(small: bool) -> list[Case]:
    from vefast.ops import attention as attn

    shapes = [(1, 17, 2, 72)] if small else [(2, 1, 2, 64), (1, 17, 2, 72), (2, 130, 3, 80), (1, 65, 1, 96),
                                             (1, 33, 2, 128)]
    backend = {"backend": "cuda"} if "cuda" in getattr(attn, "BACKENDS", ()) else {}
    cases: list[Case] = []
    for dtype in (torch.bfloat16, torch.float16):
        for b, n, h, hd in shapes:
            def plain(device, b=b, n=n, h=h, hd=hd, dtype=dtype):
                import vefast

                q, k, v = (_rand(b, n, h, hd, device=device, dtype=dtype) for _ in range(3))
                _backward(vefast.attention(q, k, v, **backend))

            def prologue(device, b=b, n=n, h=h, hd=hd, dtype=dtype):
                import vefast

                qkv = _rand(b, n, 3, h, hd, device=device, dtype=dtype)
                w = _rand(hd, device=device, dtype=dtype)
                cos, sin = torch.rand(n, hd, device=device), torch.rand(n, hd, device=device)
                _backward(vefast.qk_norm_rope_attention(qkv, w, w, (cos, sin), **backend))

            tag = f"{str(dtype)[6:]} {b}x{n}x{h}x{hd}"
            cases += [(f"attention {tag}", plain), (f"qk_norm_rope_attention {tag}", prologue)]
    return cases


# ------------------------------------------------------------------------------------------ Triton ops
def triton_cases(small: bool) -> list[Case]:
    import vefast

    def reparam(device):
        for dtype in (torch.float32, torch.bfloat16):
            mean, logvar = _rand(2, 5, 3, 7, device=device, dtype=dtype), _rand(2, 5, 3, 7, device=device, dtype=dtype)
            out = vefast.ve_loss(mean, logvar)
            _backward((out.z, out.loss))
            out = vefast.kl_loss(mean, logvar)
            _backward((out.z, out.loss))

    def vf(device):
        z, f, w = _rand(2, 4, 3, 5, device=device), _rand(2, 24, 3, 5, device=device, grad=False), _rand(24, 4, device=device)
        _backward(vefast.vf_loss(z, f, w).loss)

    def align(device):
        p, t = _rand(2, 13, 40, device=device), _rand(2, 13, 40, device=device, grad=False)
        _backward(vefast.align_loss(p, t).loss)
        _backward(vefast.repa_loss(p, t))

    def block_ops(device):
        b, n, d = 2, 9, 40
        x, y = _rand(b, n, d, device=device), _rand(b, n, d, device=device)
        gate, shift, scale = (_rand(b, d, device=device) for _ in range(3))
        w = _rand(d, device=device)
        _backward(vefast.norm_modulate(x, shift, scale, norm="layernorm"))
        _backward(vefast.norm_modulate(x, shift, scale, norm="rmsnorm", weight=w))
        _backward(vefast.gated_residual(x, y, gate))
        _backward(tuple(vefast.gated_residual_norm_modulate(x, y, gate, shift=shift, scale=scale, norm="rmsnorm",
                                                            weight=w)))
        _backward(vefast.swiglu(_rand(b, n, 2 * 24, device=device)))

    def separation(device):
        x, e = torch.randn(7, 33, device=device), torch.randn(11, 33, device=device)
        vefast.separation_function(x, torch.tensor([0.01, 0.3, 3.0], device=device), noise=e)

    def sampler(device):
        r = torch.logspace(-3, 3, 50, dtype=torch.float64)
        vr = vefast.VRTimestepSampler.from_separation(r, torch.sigmoid(4 * (torch.log(r) + 3.2)), "linear")
        vr.sample(1000 if small else 100_003, device=device, generator=torch.Generator(device=device).manual_seed(0))

    return [("ve_loss + kl_loss", reparam), ("vf_loss", vf), ("align_loss + repa_loss", align),
            ("norm_modulate, gated_residual, swiglu", block_ops), ("separation_function", separation),
            ("VRTimestepSampler.sample", sampler)]


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sanitize", description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="one shape per kernel (racecheck)")
    ap.add_argument("--only", choices=("cuda", "triton"), help="only the extension's kernels or only Triton's")
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu with TRITON_INTERPRET=1 to check the calls")
    args = ap.parse_args(argv)
    device = torch.device(args.device)

    from vefast import _ext
    from vefast.ops._common import record_fallbacks

    cases: list[Case] = []
    if args.only != "triton":
        if device.type == "cuda":
            _ext.load().probe_arch(device.index or 0)  # raises with the reason when the kernels cannot run
        cases += attention_cases(args.small)
    if args.only != "cuda":
        cases += triton_cases(args.small)
    with record_fallbacks() as events:
        for name, case in cases:
            case(device)
            print(f"sanitize: {name}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    fell_back = sorted({e.key for e in events})
    if fell_back and device.type == "cuda":
        print(f"sanitize: these fused ops ran their eager fallback, so their kernels were not checked: {fell_back}")
        return 1
    print(f"sanitize: {len(cases)} cases ran" + (f" (CPU fallbacks: {fell_back})" if fell_back else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
