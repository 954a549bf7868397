"""Drive every CUDA kernel of ``vefast._C`` once on small, ragged shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck python -m benchmarks.sanitize [--small]
"""
from __future__ import annotations

import sys

import torch


def main(argv: list[str]) -> int:
    from vefast import _ext

    ext = _ext.load()
    ext.probe_arch(torch.cuda.current_device())
    shapes = [(1, 17, 2, 72)] if "--small" in argv else [(2, 1, 2, 64), (1, 17, 2, 72), (2, 130, 3, 80), (1, 65, 1, 96), (1, 33, 2, 128)]
    import vefast

    for dtype in (torch.bfloat16, torch.float16):
        for b, n, h, hd in shapes:
            q, k, v = (torch.randn(b, n, h, hd, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
            for deterministic in (False, True):
                out = vefast.attention(q, k, v, deterministic=deterministic)
                out.float().square().sum().backward()
            qkv = torch.randn(b, n, 3, h, hd, device="cuda", dtype=dtype, requires_grad=True)
            w = torch.ones(hd, device="cuda", dtype=dtype, requires_grad=True)
            cos, sin = torch.rand(n, hd, device="cuda"), torch.rand(n, hd, device="cuda")
            vefast.qk_norm_rope_attention(qkv, w, w, (cos, sin)).float().sum().backward()
    torch.cuda.synchronize()
    print("sanitize: all kernels ran")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
