"""Fused non-causal attention (CUDA extension) and the LightningDiT q/k RMSNorm + 2D RoPE + attention op.

Formulas (MATH.md §7; FlashAttention-2, Dao 2023, Alg. 1-2):
  ``S = scale * Q K^T``, ``P = softmax(S)`` per query row, ``O = P V``, ``lse = logsumexp(S)`` (saved);
  backward with ``D = rowsum(dO * O)``: ``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - D)``,
  ``dQ = scale * dS K``, ``dK = scale * dS^T Q``.
LightningDiT attention (hustvl/LightningDiT ``models/lightningdit.py``): ``qkv = Linear(x)`` reshaped to
(B, N, 3, H, hd); ``q = RMSNorm(q)``, ``k = RMSNorm(k)`` per head (``x * rsqrt(mean(x^2) + eps)`` in
float32, cast back to the input dtype, times the weight; eps = 1e-6); ``q = rope(q)``, ``k = rope(k)`` with
the 2D EVA-style tables of :mod:`vefast.ops.rope`; ``q, k`` cast to v's dtype; SDPA.

Paths (decided inside the torch.library ops, at run time, so that ``torch.compile(fullgraph=True)`` sees one
opaque op with a fake implementation whatever the path):
- fused: CUDA bf16/fp16 tensors, head_dim in {64, 72, 80, 96, 128}, extension ``vefast._C`` loadable. The
  kernels (``kernels/attention.cuh``) run on padded head dims {64, 80, 96, 128}, loads and stores masked to
  the real head_dim (72 runs on the 80 kernel, not 96). The RMSNorm + rotary embedding of the fused op are
  applied while the q / k tiles are loaded (forward and both backward passes recompute them; nothing extra is
  stored). The backward is always deterministic (no atomics: dQ has its own pass over the key tiles), so
  ``deterministic=True`` costs nothing extra; the flag is kept for API compatibility with future faster
  non-deterministic kernels. The norm / rope backward (``d q_raw`` from ``d q_rotated``, d weights) is the
  explicit :func:`_norm_rope_bwd` in float32 (deterministic torch reductions).
- fallback (reported once with the reason through ``report_once``): CPU tensors, float32/float64, other head
  dims, or the extension missing -> ``F.scaled_dot_product_attention`` in the input dtype, plus the eager
  :func:`_norm_rope` computing exactly what the kernel prologue computes. Its ``lse`` is computed
  explicitly (float32 logsumexp of the scores: memory B * H * N^2), its backward is the explicit
  :func:`_attention_bwd_math` (the formulas above) plus :func:`_norm_rope_bwd`.
``lse`` is an internal output (for the backward) and is not differentiable.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _ext
from ._common import check_finite_number, check_same_device, check_tensor, report_once
from .rope import apply_rope, rotate_half

__all__ = ["attention", "qk_norm_rope_attention", "attention_reference", "qk_norm_rope_attention_reference",
           "SUPPORTED_HEAD_DIMS", "FUSED_DTYPES"]

SUPPORTED_HEAD_DIMS = (64, 72, 80, 96, 128)
FUSED_DTYPES = (torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------------
# Eager references (any float dtype; float64 in the tests).

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``softmax(scale * Q K^T) V`` per (batch, head) for (B, N, H, hd) inputs, in float32 (float64 for
    float64 inputs), returned in the input dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    c = _compute_dtype(q.dtype)
    qh, kh, vh = (t.to(c).transpose(1, 2) for t in (q, k, v))
    p = torch.softmax(scale * qh @ kh.transpose(-1, -2), dim=-1)
    return (p @ vh).transpose(1, 2).to(q.dtype)


def _norm_rope(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """What the kernel prologue computes on a (B, N, H, hd) q or k: LightningDiT's RMSNorm
    (``(x * rsqrt(mean(x^2) + eps)).to(x.dtype) * weight``, float32 math) then the rotary embedding in
    float32, rounded to ``x.dtype`` (float64 throughout for float64 inputs)."""
    c = _compute_dtype(x.dtype)
    y = x.to(c)
    if weight is not None:
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype).to(c) * weight.to(c)
    if cos is not None:
        # apply_rope takes (..., N, hd): move the head axis in front of N.
        y = apply_rope(y.transpose(1, 2), cos.to(c), sin.to(c)).transpose(1, 2)
    return y.to(x.dtype)


def qk_norm_rope_attention_reference(qkv: torch.Tensor, q_norm_weight: torch.Tensor | None,
                                     k_norm_weight: torch.Tensor | None,
                                     rope: tuple[torch.Tensor, torch.Tensor] | None, *, eps: float = 1e-6,
                                     scale: float | None = None) -> torch.Tensor:
    """LightningDiT's attention core on qkv (B, N, 3, H, hd): per-head RMSNorm of q and k, 2D RoPE, attention."""
    cos, sin = rope if rope is not None else (None, None)
    q, k, v = qkv.unbind(2)
    q = _norm_rope(q, q_norm_weight, cos, sin, eps)
    k = _norm_rope(k, k_norm_weight, cos, sin, eps)
    return attention_reference(q, k, v, scale)


# ---------------------------------------------------------------------------------------------------------
# Path selection and the fallback.

def _fused_unavailable(t: torch.Tensor) -> str:
    """Empty when the fused CUDA kernels can run on (B, N, H, hd) tensors like ``t``, else the reason."""
    if t.device.type != "cuda":
        return f"{t.device.type} tensors (the fused attention kernels are CUDA-only)"
    if t.dtype not in FUSED_DTYPES:
        return f"dtype {str(t.dtype).replace('torch.', '')} (the fused kernels take bfloat16 and float16)"
    if t.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {t.shape[-1]} (the fused kernels take {SUPPORTED_HEAD_DIMS})"
    if not _ext.available():
        return f"the CUDA extension is unavailable: {_ext.unavailable_reason()}"
    if not hasattr(_ext.load(), "attention_fwd"):
        return "vefast._C was built without the attention kernels: reinstall vefast to rebuild it"
    return _device_unsupported(t.device.index if t.device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _device_unsupported(index: int) -> str:
    """Empty when GPU ``index`` can run the kernels: sm_80+ (bf16 mma.sync) and an image for it in vefast._C
    (probed once per device by launching the extension's probe kernel)."""
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        return f"compute capability {major}.{minor} (the fused kernels need sm_80 or newer)"
    try:
        _ext.load().probe_arch(index)
    except RuntimeError as e:
        return f"vefast._C has no kernel image for this GPU (sm_{major}{minor}; rebuild with VEFAST_CUDA_ARCHS): {e}"
    return ""


def _report(op: str, reason: str) -> None:
    report_once(f"{op}:{reason}", f"{op}: running F.scaled_dot_product_attention (eager fallback) instead of "
                                  f"the fused CUDA kernel: {reason}")


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA on (B, N, H, hd) tensors in their dtype, contiguous (B, N, H, hd) result."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2).contiguous()


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """lse is float32 (float64 for float64 inputs, so that the float64 fallback stays exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lse(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, H, N) logsumexp of the scaled scores (the fused forward's second output)."""
    c = _compute_dtype(q.dtype)
    s = scale * (q.to(c).transpose(1, 2) @ k.to(c).permute(0, 2, 3, 1))
    return torch.logsumexp(s, dim=-1).to(_lse_dtype(q.dtype))


def _fallback_fwd(q, k, v, scale):
    return _sdpa(q, k, v, scale), _lse(q, k, scale)


def _attention_bwd_math(dout, q, k, v, out, lse, scale):
    """The FlashAttention-2 backward in eager torch (what the kernels compute, without tiling), in float32
    (float64 for float64 inputs): P = exp(S - lse), D = rowsum(dO * O), dV = P^T dO, dS = P * (dO V^T - D),
    dQ = scale * dS K, dK = scale * dS^T Q. Autograd does not record inside a custom op, hence explicit."""
    c = _compute_dtype(q.dtype)
    qh, kh, vh, doh, oh = (t.to(c).transpose(1, 2) for t in (q, k, v, dout, out))
    p = torch.exp(scale * (qh @ kh.transpose(-1, -2)) - lse.to(c)[..., None])
    dv = p.transpose(-1, -2) @ doh
    ds = p * (doh @ vh.transpose(-1, -2) - (doh * oh).sum(-1, keepdim=True))
    dq = scale * (ds @ kh)
    dk = scale * (ds.transpose(-1, -2) @ qh)
    return tuple(t.transpose(1, 2).to(q.dtype).contiguous() for t in (dq, dk, dv))


def _norm_rope_bwd(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor | None,
                   sin: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx, dweight) of :func:`_norm_rope` at x (B, N, H, hd) for the output gradient g.

    rope^T: ``dz = g * cos - rotate_half(g * sin)``; RMSNorm (r = rsqrt(mean(x^2) + eps), the rounding to
    x.dtype passes the gradient through): ``dweight = sum_rows dz * round(x r)``, ``dy = dz * weight``,
    ``dx = r dy - x r^3 mean(dy x)``. Float32 math (float64 for float64 x); deterministic torch sums.
    """
    c = _compute_dtype(x.dtype)
    g = g.to(c)
    if cos is not None:
        cc, ss = cos.to(c)[:, None, :], sin.to(c)[:, None, :]  # (N, 1, hd): broadcast over heads
        g = g * cc - rotate_half(g * ss)
    if weight is None:
        return g.to(x.dtype), None
    xf = x.to(c)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = (xf * r).to(x.dtype).to(c)
    dw = (g * y).sum(dim=(0, 1, 2))
    dy = g * weight.to(c)
    dx = r * dy - xf * r.pow(3) * (dy * xf).mean(-1, keepdim=True)
    return dx.to(x.dtype), dw.to(weight.dtype)


def _prologue_fwd(qkv, q_weight, k_weight, cos, sin, eps):
    """q, k (normalized, rotated) and v of the fallback."""
    q, k, v = qkv.unbind(2)
    return _norm_rope(q, q_weight, cos, sin, eps), _norm_rope(k, k_weight, cos, sin, eps), v


def _f32(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.detach().to(device=device, dtype=torch.float32).contiguous()


# ---------------------------------------------------------------------------------------------------------
# torch.library ops: plain attention.

@torch.library.custom_op("vefast::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    reason = _fused_unavailable(q)
    if reason:
        _report("vefast.attention", reason)
        return _fallback_fwd(q, k, v, scale)
    out, lse = _ext.load().attention_fwd(q, k, v, scale)
    return out, lse


@_attention_fwd.register_fake
def _(q, k, v, scale, deterministic):
    B, N, H, _hd = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, N), dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("vefast::attention_bwd", mutates_args=())
def _attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, scale: float, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _fused_unavailable(q):
        return _attention_bwd_math(dout, q, k, v, out, lse, scale)
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    _ext.load().attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, scale)
    return dq, dk, dv


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, scale, deterministic):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _attention_setup(ctx, inputs, output):
    q, k, v, scale, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.deterministic = scale, deterministic
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.vefast.attention_bwd(dout, q, k, v, out, lse, ctx.scale, ctx.deterministic)
    return dq, dk, dv, None, None


torch.library.register_autograd("vefast::attention_fwd", _attention_backward, setup_context=_attention_setup)


# ---------------------------------------------------------------------------------------------------------
# torch.library ops: q/k RMSNorm + RoPE + attention on a fused qkv tensor.

@torch.library.custom_op("vefast::qk_norm_rope_attention_fwd", mutates_args=())
def _qnra_fwd(qkv: torch.Tensor, q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor],
              cos: Optional[torch.Tensor], sin: Optional[torch.Tensor], eps: float, scale: float,
              deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    reason = _fused_unavailable(qkv)
    if reason:
        _report("vefast.qk_norm_rope_attention", reason)
        q, k, v = _prologue_fwd(qkv, q_weight, k_weight, cos, sin, eps)
        return _fallback_fwd(q, k, v, scale)
    q, k, v = qkv.unbind(2)
    dev = qkv.device
    out, lse = _ext.load().attention_fwd(q, k, v, scale, _f32(q_weight, dev), _f32(k_weight, dev), _f32(cos, dev),
                                         _f32(sin, dev), eps)
    return out, lse


@_qnra_fwd.register_fake
def _(qkv, q_weight, k_weight, cos, sin, eps, scale, deterministic):
    B, N, _three, H, hd = qkv.shape
    return qkv.new_empty((B, N, H, hd)), qkv.new_empty((B, H, N), dtype=_lse_dtype(qkv.dtype))


@torch.library.custom_op("vefast::qk_norm_rope_attention_bwd", mutates_args=())
def _qnra_bwd(dout: torch.Tensor, qkv: torch.Tensor, q_weight: Optional[torch.Tensor],
              k_weight: Optional[torch.Tensor], cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
              out: torch.Tensor, lse: torch.Tensor, eps: float, scale: float,
              deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q_raw, k_raw, v = qkv.unbind(2)
    if _fused_unavailable(qkv):
        q, k, _ = _prologue_fwd(qkv, q_weight, k_weight, cos, sin, eps)
        dq, dk, dv = _attention_bwd_math(dout, q, k, v, out, lse, scale)
    else:
        # The kernels recompute the normalized, rotated q / k in their prologue and return the gradients
        # w.r.t. them; the RMSNorm / rope backward below maps those to the raw q / k and the weights.
        dev = qkv.device
        dq, dk, dv = (torch.empty(q_raw.shape, dtype=qkv.dtype, device=dev) for _ in range(3))
        _ext.load().attention_bwd(dout, q_raw, k_raw, v, out, lse, dq, dk, dv, scale, _f32(q_weight, dev),
                                  _f32(k_weight, dev), _f32(cos, dev), _f32(sin, dev), eps)
    dq_raw, dqw = _norm_rope_bwd(dq, q_raw, q_weight, cos, sin, eps)
    dk_raw, dkw = _norm_rope_bwd(dk, k_raw, k_weight, cos, sin, eps)
    dqkv = torch.stack((dq_raw, dk_raw, dv), dim=2)
    # A weight that is None gets an empty placeholder (custom ops return tensors); autograd maps it to None.
    return dqkv, dqw if dqw is not None else torch.empty(0), dkw if dkw is not None else torch.empty(0)


@_qnra_bwd.register_fake
def _(dout, qkv, q_weight, k_weight, cos, sin, out, lse, eps, scale, deterministic):
    dqw = q_weight.new_empty(q_weight.shape) if q_weight is not None else qkv.new_empty(0, device="cpu", dtype=torch.float32)
    dkw = k_weight.new_empty(k_weight.shape) if k_weight is not None else qkv.new_empty(0, device="cpu", dtype=torch.float32)
    return qkv.new_empty(qkv.shape), dqw, dkw


def _qnra_setup(ctx, inputs, output):
    qkv, q_weight, k_weight, cos, sin, eps, scale, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(qkv, q_weight, k_weight, cos, sin, out, lse)
    ctx.eps, ctx.scale, ctx.deterministic = eps, scale, deterministic
    ctx.mark_non_differentiable(lse)


def _qnra_backward(ctx, dout, _dlse):
    qkv, q_weight, k_weight, cos, sin, out, lse = ctx.saved_tensors
    dqkv, dqw, dkw = torch.ops.vefast.qk_norm_rope_attention_bwd(dout, qkv, q_weight, k_weight, cos, sin, out, lse,
                                                                 ctx.eps, ctx.scale, ctx.deterministic)
    return (dqkv, dqw if q_weight is not None else None, dkw if k_weight is not None else None,
            None, None, None, None, None)


torch.library.register_autograd("vefast::qk_norm_rope_attention_fwd", _qnra_backward, setup_context=_qnra_setup)


# ---------------------------------------------------------------------------------------------------------
# Public API.

def _check_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    check_finite_number("scale", scale, min_value=0.0, strict=True)
    return float(scale)


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              deterministic: bool = False) -> torch.Tensor:
    """Non-causal attention ``softmax(scale * Q K^T) V`` on (B, N, H, head_dim) tensors (FlashAttention-2).

    Fused CUDA kernel for bf16/fp16 CUDA tensors with head_dim in {64, 72, 80, 96, 128} (any N >= 1, any
    strides); otherwise ``F.scaled_dot_product_attention``, reported once. ``scale`` defaults to
    ``head_dim ** -0.5``. The fused backward is deterministic whatever ``deterministic`` says.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
    if q.dim() != 4:
        raise ValueError(f"q must have shape (B, N, H, head_dim), got {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    check_same_device(q=q, k=k, v=v)
    if min(q.shape) < 1:
        raise ValueError(f"q must have B, N, H, head_dim >= 1, got shape {tuple(q.shape)}")
    _check_bool("deterministic", deterministic)
    s = _check_scale(scale, q.shape[-1])
    out, _lse = torch.ops.vefast.attention_fwd(q, k, v, s, deterministic)
    return out


def qk_norm_rope_attention(qkv: torch.Tensor, q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None,
                           rope: tuple[torch.Tensor, torch.Tensor] | None, *, eps: float = 1e-6,
                           scale: float | None = None, deterministic: bool = False) -> torch.Tensor:
    """LightningDiT's attention core on the fused qkv projection (B, N, 3, H, head_dim) -> (B, N, H, head_dim).

    ``q = RMSNorm(q) * q_norm_weight`` and ``k = RMSNorm(k) * k_norm_weight`` per head (a None weight skips
    that norm), then the 2D rotary embedding ``rope = (cos, sin)``, each (N, head_dim) float32 from
    :func:`vefast.ops.rope.rope_2d_freqs` (None skips it), then attention. Fused: the norm and rotation run
    in the attention kernels' tile loads. Fallback as for :func:`attention`.
    """
    check_tensor("qkv", qkv)
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape (B, N, 3, H, head_dim), got {tuple(qkv.shape)}")
    if min(qkv.shape) < 1:
        raise ValueError(f"qkv must have B, N, H, head_dim >= 1, got shape {tuple(qkv.shape)}")
    B, N, _three, H, hd = qkv.shape
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is None:
            continue
        check_tensor(name, w)
        if tuple(w.shape) != (hd,):
            raise ValueError(f"{name} must have shape (head_dim,) = ({hd},), got {tuple(w.shape)}")
        check_same_device(qkv=qkv, **{name: w})
    cos = sin = None
    if rope is not None:
        if not isinstance(rope, (tuple, list)) or len(rope) != 2:
            raise TypeError(f"rope must be a (cos, sin) pair of tensors or None, got {type(rope).__name__}")
        cos, sin = rope
        for name, t in (("rope cos", cos), ("rope sin", sin)):
            check_tensor(name, t)
            if tuple(t.shape) != (N, hd):
                raise ValueError(f"{name} must have shape (N, head_dim) = ({N}, {hd}), got {tuple(t.shape)}")
        check_same_device(qkv=qkv, cos=cos, sin=sin)
        if hd % 2 != 0:
            raise ValueError(f"head_dim must be even for the rotary embedding, got {hd}")
    check_finite_number("eps", eps, min_value=0.0)
    _check_bool("deterministic", deterministic)
    s = _check_scale(scale, hd)
    out, _lse = torch.ops.vefast.qk_norm_rope_attention_fwd(qkv, q_norm_weight, k_norm_weight, cos, sin, float(eps),
                                                            s, deterministic)
    return out
