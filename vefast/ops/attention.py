"""DiT attention: SDPA core with the fused Triton q/k prologue, and a measured backend choice (docs/math.md §7).

Formulas (docs/math.md §7; FlashAttention-2, Dao 2023, Alg. 1-2):
  ``S = scale * Q K^T``, ``P = softmax(S)`` per query row, ``O = P V``, ``lse = logsumexp(S)``;
  backward with ``D = rowsum(dO * O)``: ``dV = P^T dO``, ``dS = P * (dO V^T - D)``, ``dQ = scale dS K``,
  ``dK = scale dS^T Q``.
LightningDiT / DiT / SiT attention on a fused qkv Linear's output (B, N, 3, H, hd): per-head RMSNorm
(LightningDiT) or LayerNorm (timm ``qk_norm=True``) of q and k, 2D RoPE (:mod:`vefast.ops.rope`), attention
(:mod:`vefast.ops.qk_prologue` has the norm / rope formulas).

Backends (``backend=`` of :func:`attention`, :func:`qk_norm_rope_attention` and the module swaps):
- ``"sdpa"``: the kernels ``F.scaled_dot_product_attention`` dispatches to (cuDNN, FlashAttention-2,
  memory-efficient, math; torch's own choice, which honours ``torch.nn.attention.sdpa_kernel``). For
  :func:`qk_norm_rope_attention` the Triton prologue writes q and k once, in the (B, N, H, hd) memory
  order the fused backends read as (B, H, N, hd) views; v is read in place from qkv; the SDPA kernels are
  called explicitly (``torch.ops.aten._scaled_dot_product_*``) inside one ``torch.library`` op pair, so
  that the backward goes from dq, dk, dv to the gradient of the packed qkv in one Triton pass (dv copied
  through, no stack / cat) and the weight gradients come from deterministic partials.
- ``"cuda"``: vefast's own CUDA kernel (``vefast._C``: ``attention_fwd`` / ``attention_bwd``, RMSNorm +
  RoPE fused in its tile loads), bf16 / fp16 CUDA tensors with hd in :data:`SUPPORTED_HEAD_DIMS`.
- ``"auto"`` (default): ``"cuda"`` only where ``vefast/_attention_table.json`` holds a validated
  measurement saying it is faster than SDPA's best backend for (GPU arch, hd, dtype, q/k norm kind, N);
  otherwise ``"sdpa"``. The table ships empty until a GPU run fills it: today "auto" means SDPA.
``deterministic=True``: the backward is bitwise repeatable (see :func:`_sdpa_backward`): torch's choice
when ``torch.use_deterministic_algorithms(True)`` is on (torch then makes flash / memory-efficient
deterministic and skips cuDNN), else the memory-efficient kernel with one key split, else the explicit
math backward (reported). The CUDA kernel's backward is always deterministic.

Fallbacks (reported once, ``_common.report_once``): CPU tensors outside ``TRITON_INTERPRET=1`` and float64
run the eager reference prologue + SDPA; ``backend="cuda"`` where the kernel cannot run runs SDPA.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .. import _ext
from . import qk_prologue as qp
from ._common import check_finite_number, check_same_device, check_tensor, report_once, triton_path
from .qk_prologue import NORMS, QKNorm, check_qk_args, qk_norm_rope_reference

__all__ = ["attention", "qk_norm_rope_attention", "attention_reference", "qk_norm_rope_attention_reference",
           "attention_backends", "attention_table", "SUPPORTED_HEAD_DIMS", "FUSED_DTYPES", "BACKENDS"]

SUPPORTED_HEAD_DIMS = (64, 72, 80, 96, 128)  # of the CUDA kernel
FUSED_DTYPES = (torch.bfloat16, torch.float16)  # of the CUDA kernel
BACKENDS = ("auto", "sdpa", "cuda")
aten = torch.ops.aten


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


def qk_norm_rope_attention_reference(qkv: torch.Tensor, q_norm_weight: torch.Tensor | None,
                                     k_norm_weight: torch.Tensor | None,
                                     rope: tuple[torch.Tensor, torch.Tensor] | None, *, eps: float = 1e-6,
                                     scale: float | None = None, norm: str | None = None,
                                     q_norm_bias: torch.Tensor | None = None,
                                     k_norm_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The module sequence on qkv (B, N, 3, H, hd): per-head norm of q and k, 2D RoPE, attention."""
    spec = QKNorm(_norm_kind(norm, q_norm_weight, q_norm_bias), q_norm_weight, k_norm_weight, q_norm_bias,
                  k_norm_bias, eps)
    q, k = qk_norm_rope_reference(qkv, spec, rope)
    return attention_reference(q, k, qkv[:, :, 2], scale)


# ---------------------------------------------------------------------------------------------------------
# The SDPA core, called explicitly. Tensors here are (B, H, N, hd) views ("_t") whose memory is (B, N, H, hd):
# the layout torch's fused kernels read without copies (unit stride along hd, any other strides).

_BIT = {"math": 1, "flash": 2, "efficient": 4, "cudnn": 8}
_ENUM = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn"}  # torch.nn.attention.SDPBackend values
_CUDNN_LSE_DIMS = [4]  # rank of cuDNN's logsumexp in this torch ((B, H, N, 1) in 2.11), seen at each forward
_PLACEHOLDERS: dict[torch.device, torch.Tensor] = {}


@torch.compiler.assume_constant_result  # torch 2.6's dynamo cannot trace the getters (2.11's folds them)
def sdp_enabled_mask() -> int:
    """The SDPA backends enabled now (``torch.backends.cuda.*_sdp_enabled``, i.e. ``sdpa_kernel``), as bits
    (under torch.compile: those enabled while tracing)."""
    c = torch._C  # the raw getters: torch.backends.cuda's wrappers break the graph
    return (_BIT["math"] * c._get_math_sdp_enabled() | _BIT["flash"] * c._get_flash_sdp_enabled()
            | _BIT["efficient"] * c._get_mem_efficient_sdp_enabled() | _BIT["cudnn"] * c._get_cudnn_sdp_enabled())


def _placeholder(device: torch.device) -> torch.Tensor:
    """An int64 scalar standing for the dropout seed / offset the backward kernels ignore at dropout 0."""
    t = _PLACEHOLDERS.get(device)
    if t is None:
        t = _PLACEHOLDERS[device] = torch.zeros((), dtype=torch.int64, device=device)
    return t


def _bhnd_empty(B: int, N: int, H: int, hd: int, like: torch.Tensor) -> torch.Tensor:
    """A (B, H, N, hd) tensor with (B, N, H, hd) memory."""
    return torch.empty_permuted((B, H, N, hd), (0, 2, 1, 3), dtype=like.dtype, device=like.device)


def _lse_empty(B: int, H: int, N: int, device: torch.device) -> torch.Tensor:
    """(B, H, N) float32 logsumexp in the layout the backend writes: torch's CPU flash kernel stores (B, N, H)."""
    if device.type == "cpu":
        return torch.empty_permuted((B, H, N), (0, 2, 1), dtype=torch.float32, device=device)
    return torch.empty((B, H, N), dtype=torch.float32, device=device)


def _canonical(t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` if it has the canonical layout (that of ``like``, or (B, N, H, hd) memory), else a copy with it."""
    want = like.stride() if like is not None else _bhnd_stride(*t.shape)
    if t.stride() == want:
        return t
    out = torch.empty_strided(t.shape, want, dtype=t.dtype, device=t.device)
    return out.copy_(t)


def _bhnd_stride(B: int, H: int, N: int, hd: int) -> tuple[int, int, int, int]:
    return N * H * hd, hd, H * hd, 1


def _v_view(qkv: torch.Tensor) -> torch.Tensor:
    """v of qkv (B, N, 3, H, hd) as a (B, H, N, hd) view (one op)."""
    B, N, _three, H, hd = qkv.shape
    s_b, s_n, s_w, s_h, s_d = qkv.stride()
    return qkv.as_strided((B, H, N, hd), (s_b, s_h, s_n, s_d), qkv.storage_offset() + 2 * s_w)


def _torch_deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()


def _probe(t: torch.Tensor) -> torch.Tensor:
    """``t`` as torch's checks should see it in training: their answer depends on requires_grad only for head
    dims > 128 (flash on sm86/89/120, cuDNN's backward), where a detached view requiring grad stands in."""
    return t.detach().requires_grad_(True) if t.shape[-1] > 128 else t


def _choose(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, scale: float, mask: int) -> str:
    """The SDPA backend for these (B, H, N, hd) views: torch's own choice (``torch._fused_sdp_choice``, the
    dispatch of ``F.scaled_dot_product_attention``) restricted to the backends of ``mask`` (the ones enabled
    when the forward ran, so that a backward outside an ``sdpa_kernel`` block keeps the same set)."""
    with torch.enable_grad():  # inside a custom op grad mode is off; torch's checks read requires_grad
        q, k, v = (_probe(t) for t in (q_t, k_t, v_t))
        choice = _ENUM.get(int(torch._fused_sdp_choice(q, k, v, scale=scale)), "math")
        if q_t.device.type != "cuda":
            return "flash" if choice == "flash" and mask & _BIT["flash"] else "math"
        if _BIT[choice] & mask:
            return choice
        params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False, False)
        can_use = {"flash": torch.backends.cuda.can_use_flash_attention,
                   "efficient": torch.backends.cuda.can_use_efficient_attention,
                   "cudnn": torch.backends.cuda.can_use_cudnn_attention}
        for b in torch._C._get_sdp_priority_order():
            name = _ENUM.get(int(b))
            if name in can_use and _BIT[name] & mask and can_use[name](params):
                return name
    return "math"


def _math_report(op: str) -> None:
    report_once(f"{op}:sdpa-math", f"{op}: SDPA's math backend runs (no enabled fused SDPA backend takes these "
                                   "inputs): float32 scores of size B * H * N^2 are materialized")


def _fallback_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's math (explicit, (B, N, H, hd) inputs): (out (B, N, H, hd) contiguous, lse (B, H, N) float32)."""
    c = _compute_dtype(q.dtype)
    s = scale * (q.to(c).transpose(1, 2) @ k.to(c).permute(0, 2, 3, 1))
    lse = torch.logsumexp(s, dim=-1)
    out = (torch.exp(s - lse[..., None]) @ v.to(c).transpose(1, 2)).transpose(1, 2).to(q.dtype).contiguous()
    return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def _attention_bwd_math(dout, q, k, v, out, lse, scale):
    """The FlashAttention-2 backward in eager torch on (B, N, H, hd) tensors, float32 (float64 for float64):
    P = exp(S - lse), D = rowsum(dO * O), dV = P^T dO, dS = P * (dO V^T - D), dQ = scale dS K, dK = scale dS^T Q."""
    c = _compute_dtype(q.dtype)
    qh, kh, vh, doh, oh = (t.to(c).transpose(1, 2) for t in (q, k, v, dout, out))
    p = torch.exp(scale * (qh @ kh.transpose(-1, -2)) - lse.to(c)[..., None])
    dv = p.transpose(-1, -2) @ doh
    ds = p * (doh @ vh.transpose(-1, -2) - (doh * oh).sum(-1, keepdim=True))
    dq = scale * (ds @ kh)
    dk = scale * (ds.transpose(-1, -2) @ qh)
    return tuple(t.transpose(1, 2).to(q.dtype).contiguous() for t in (dq, dk, dv))


def _sdpa_forward(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, scale: float, mask: int, op: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out_t, lse): out_t (B, H, N, hd) with (B, N, H, hd) memory, lse (B, H, N) float32 (layout of
    :func:`_lse_empty`), whichever backend ran: every backend's (out, lse) serves every backend's backward."""
    B, H, N, hd = q_t.shape
    name = _choose(q_t, k_t, v_t, scale, mask)
    if name == "math":
        if not mask & _BIT["math"]:
            raise RuntimeError(f"{op}: no enabled SDPA backend takes these inputs (enable the math backend)")
        _math_report(op)
        out, lse = _fallback_fwd(q_t.transpose(1, 2), k_t.transpose(1, 2), v_t.transpose(1, 2), scale)
        return out.transpose(1, 2), _canonical(lse, _lse_empty(B, H, N, q_t.device))
    if q_t.device.type != "cuda":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q_t, k_t, v_t, 0.0, False, scale=scale)
    elif name == "cudnn":
        out, lse = aten._scaled_dot_product_cudnn_attention(q_t, k_t, v_t, None, True, 0.0, False, False,
                                                            scale=scale)[:2]
        _CUDNN_LSE_DIMS[0] = lse.dim()
        lse = lse.view(B, H, N) if lse.dim() == 4 else lse
    elif name == "flash":
        out, lse = aten._scaled_dot_product_flash_attention(q_t, k_t, v_t, 0.0, False, False, scale=scale)[:2]
    else:
        out, lse = aten._scaled_dot_product_efficient_attention(q_t, k_t, v_t, None, True, 0.0, False,
                                                                scale=scale)[:2]
        lse = lse if lse.shape[-1] == N else lse[..., :N].contiguous()  # padded to a multiple of 32
    return _canonical(out), lse


def deterministic_backward(efficient_ok: bool) -> tuple[str, int | None]:
    """(backend, num_splits_key) of a CUDA backward that must be deterministic while torch's deterministic mode is
    off (with it on, torch's own choice is deterministic: flash and memory-efficient switch to their
    deterministic variants, cuDNN is skipped). FlashAttention-2 and cuDNN accumulate dQ with atomics then; the
    memory-efficient kernel with one key split does not. Otherwise the explicit math backward."""
    return ("efficient", 1) if efficient_ok else ("math", None)


def _sdpa_backward(dout_t: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor,
                   out_t: torch.Tensor, lse: torch.Tensor, scale: float, mask: int, deterministic: bool, op: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq_t, dk_t, dv_t), (B, H, N, hd) views. The backend is chosen again (restricted to the forward's
    ``mask``). ``deterministic``: when torch's deterministic mode is off, the memory-efficient kernel with
    ``num_splits_key=1`` (no atomics; FlashAttention-2's and cuDNN's backwards accumulate dQ with atomics),
    else the explicit math backward (reported); on the CPU torch's flash backward is sequential per (b, h)."""
    B, H, N, hd = q_t.shape
    name, splits = _choose(q_t, k_t, v_t, scale, mask), None
    if deterministic and q_t.device.type == "cuda" and not _torch_deterministic():
        params = torch.backends.cuda.SDPAParams(q_t, k_t, v_t, None, 0.0, False, False)
        efficient_ok = bool(mask & _BIT["efficient"]) and torch.backends.cuda.can_use_efficient_attention(params)
        name, splits = deterministic_backward(efficient_ok)
        if name == "math":
            report_once(f"{op}:deterministic-math",
                        f"{op}: deterministic=True and no deterministic fused SDPA backward takes these inputs "
                        "(memory-efficient attention is disabled or refuses them): the explicit math backward runs")
    dev = q_t.device
    if name == "math":
        grads = _attention_bwd_math(*(t.transpose(1, 2) for t in (dout_t, q_t, k_t, v_t, out_t)), lse, scale)
        return tuple(g.transpose(1, 2) for g in grads)
    if dev.type != "cuda":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(dout_t, q_t, k_t, v_t, out_t, lse, 0.0,
                                                                         False, scale=scale)
    ph = _placeholder(dev)
    if name == "cudnn":
        lse4 = lse.view(B, H, N, 1) if _CUDNN_LSE_DIMS[0] == 4 else lse
        return aten._scaled_dot_product_cudnn_attention_backward(_canonical(dout_t, out_t), q_t, k_t, v_t, out_t,
                                                                 lse4, ph, ph, None, None, None, N, N, 0.0, False,
                                                                 scale=scale)
    if name == "flash":
        return aten._scaled_dot_product_flash_attention_backward(dout_t, q_t, k_t, v_t, out_t, lse, None, None, N, N,
                                                                 0.0, False, ph, ph, scale=scale)
    lse_p = lse if N % 32 == 0 else F.pad(lse, (0, (-N) % 32))  # the kernel's logsumexp rows are 32-aligned
    dq, dk, dv, _ = aten._efficient_attention_backward(
        dout_t.transpose(1, 2), q_t.transpose(1, 2), k_t.transpose(1, 2), v_t.transpose(1, 2), None,
        out_t.transpose(1, 2), None, None, N, N, lse_p, 0.0, ph, ph, 0, False, scale=scale, num_splits_key=splits)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------
# torch.library ops, backend "sdpa": plain attention (used with deterministic=True on CUDA; otherwise
# F.scaled_dot_product_attention runs directly) and the fused q/k prologue + SDPA.

@torch.library.custom_op("vefast::sdpa", mutates_args=())
def _sdpa_op(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, scale: float, mask: int,
             deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _sdpa_forward(q_t, k_t, v_t, scale, mask, "attention")


@_sdpa_op.register_fake
def _(q_t, k_t, v_t, scale, mask, deterministic):
    B, H, N, hd = q_t.shape
    return _bhnd_empty(B, N, H, hd, q_t), _lse_empty(B, H, N, q_t.device)


@torch.library.custom_op("vefast::sdpa_backward", mutates_args=())
def _sdpa_bwd_op(dout_t: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, out_t: torch.Tensor,
                 lse: torch.Tensor, scale: float, mask: int, deterministic: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _sdpa_backward(dout_t, q_t, k_t, v_t, out_t, lse, scale, mask, deterministic, "attention")
    return tuple(_canonical(g) for g in grads)


@_sdpa_bwd_op.register_fake
def _(dout_t, q_t, k_t, v_t, out_t, lse, scale, mask, deterministic):
    B, H, N, hd = q_t.shape
    return tuple(_bhnd_empty(B, N, H, hd, q_t) for _ in range(3))


def _sdpa_setup(ctx, inputs, output):
    q_t, k_t, v_t, scale, mask, deterministic = inputs
    out_t, lse = output
    ctx.save_for_backward(q_t, k_t, v_t, out_t, lse)
    ctx.scale, ctx.mask, ctx.deterministic = scale, mask, deterministic
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _sdpa_autograd(ctx, dout_t, _dlse):
    q_t, k_t, v_t, out_t, lse = ctx.saved_tensors
    return (*_sdpa_bwd_op(dout_t, q_t, k_t, v_t, out_t, lse, ctx.scale, ctx.mask, ctx.deterministic),
            None, None, None)


_sdpa_op.register_autograd(_sdpa_autograd, setup_context=_sdpa_setup)


@torch.library.custom_op("vefast::qk_norm_rope_sdpa", mutates_args=())
def _qnr_sdpa_op(qkv: torch.Tensor, q_weight: Optional[torch.Tensor], q_bias: Optional[torch.Tensor],
                 k_weight: Optional[torch.Tensor], k_bias: Optional[torch.Tensor], cos: Optional[torch.Tensor],
                 sin: Optional[torch.Tensor], kind: str, eps: float, scale: float, mask: int, deterministic: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out_t, q_t, k_t, lse): the Triton prologue writes q_t, k_t; SDPA reads them and v in place."""
    B, N, _three, H, hd = qkv.shape
    q_t, k_t = _bhnd_empty(B, N, H, hd, qkv), _bhnd_empty(B, N, H, hd, qkv)
    qp.launch_fwd(qkv, QKNorm(kind, q_weight, k_weight, q_bias, k_bias, eps), _rope(cos, sin), q_t, k_t)
    out_t, lse = _sdpa_forward(q_t, k_t, _v_view(qkv), scale, mask, "qk_norm_rope_attention")
    return out_t, q_t, k_t, lse


@_qnr_sdpa_op.register_fake
def _(qkv, q_weight, q_bias, k_weight, k_bias, cos, sin, kind, eps, scale, mask, deterministic):
    B, N, _three, H, hd = qkv.shape
    return (_bhnd_empty(B, N, H, hd, qkv), _bhnd_empty(B, N, H, hd, qkv), _bhnd_empty(B, N, H, hd, qkv),
            _lse_empty(B, H, N, qkv.device))


@torch.library.custom_op("vefast::qk_norm_rope_sdpa_backward", mutates_args=())
def _qnr_sdpa_bwd_op(dout_t: torch.Tensor, qkv: torch.Tensor, q_weight: Optional[torch.Tensor],
                     q_bias: Optional[torch.Tensor], k_weight: Optional[torch.Tensor], k_bias: Optional[torch.Tensor],
                     cos: Optional[torch.Tensor], sin: Optional[torch.Tensor], out_t: torch.Tensor, q_t: torch.Tensor,
                     k_t: torch.Tensor, lse: torch.Tensor, kind: str, eps: float, scale: float, mask: int,
                     deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dqkv, partials): SDPA's backward, then the prologue's backward writing all three slices of dqkv."""
    dq_t, dk_t, dv_t = _sdpa_backward(dout_t, q_t, k_t, _v_view(qkv), out_t, lse, scale, mask, deterministic,
                                      "qk_norm_rope_attention")
    norm = QKNorm(kind, q_weight, k_weight, q_bias, k_bias, eps)
    dqkv, part = qp.alloc_bwd(qkv, norm)
    qp.launch_bwd(dq_t, dk_t, dv_t, qkv, norm, _rope(cos, sin), dqkv, part, heads_first=True)
    return dqkv, part


@_qnr_sdpa_bwd_op.register_fake
def _(dout_t, qkv, q_weight, q_bias, k_weight, k_bias, cos, sin, out_t, q_t, k_t, lse, kind, eps, scale, mask,
      deterministic):
    norm = QKNorm(kind, q_weight, k_weight, q_bias, k_bias, eps)
    return qp.alloc_bwd(qkv, norm)


def _qnr_setup(ctx, inputs, output):
    qkv, q_weight, q_bias, k_weight, k_bias, cos, sin, kind, eps, scale, mask, deterministic = inputs
    out_t, q_t, k_t, lse = output
    ctx.save_for_backward(qkv, q_weight, q_bias, k_weight, k_bias, cos, sin, out_t, q_t, k_t, lse)
    ctx.args = (kind, eps, scale, mask, deterministic)
    ctx.mark_non_differentiable(q_t, k_t, lse)
    ctx.set_materialize_grads(False)  # no zero gradients for the non-differentiable outputs


def _qnr_autograd(ctx, dout_t, _dq, _dk, _dlse):
    qkv, q_weight, q_bias, k_weight, k_bias, cos, sin, out_t, q_t, k_t, lse = ctx.saved_tensors
    dqkv, part = _qnr_sdpa_bwd_op(dout_t, qkv, q_weight, q_bias, k_weight, k_bias, cos, sin, out_t, q_t, k_t, lse,
                                  *ctx.args)
    kind, eps = ctx.args[:2]
    dqw, dqb, dkw, dkb = qp.finish_param_grads(part, QKNorm(kind, q_weight, k_weight, q_bias, k_bias, eps))
    return dqkv, dqw, dqb, dkw, dkb, None, None, None, None, None, None, None


_qnr_sdpa_op.register_autograd(_qnr_autograd, setup_context=_qnr_setup)


def _rope(cos: torch.Tensor | None, sin: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    return None if cos is None else (cos, sin)


# ---------------------------------------------------------------------------------------------------------
# torch.library ops, backend "cuda": the extension's kernels (calling convention of csrc/attention.cpp).

def _f32(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.detach().to(device=device, dtype=torch.float32).contiguous()


def _require_extension(t: torch.Tensor) -> None:
    reason = _cuda_unavailable(t.device.type, t.device.index, t.dtype, t.shape[-1], "rms")
    if reason:
        raise RuntimeError(f"vefast attention (backend 'cuda'): the CUDA kernel cannot run here: {reason}")


@torch.library.custom_op("vefast::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _require_extension(q)
    out, lse = _ext.load().attention_fwd(q, k, v, scale)
    return out, lse


@_attention_fwd.register_fake
def _(q, k, v, scale, deterministic):
    B, N, H, _hd = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("vefast::attention_bwd", mutates_args=())
def _attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, scale: float, deterministic: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _require_extension(q)
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


@torch.library.custom_op("vefast::qk_norm_rope_attention_fwd", mutates_args=())
def _qnra_fwd(qkv: torch.Tensor, q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor],
              cos: Optional[torch.Tensor], sin: Optional[torch.Tensor], eps: float, scale: float,
              deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The CUDA kernel with RMSNorm (weights given; None: no norm) and RoPE applied in its tile loads."""
    _require_extension(qkv)
    q, k, v = qkv.unbind(2)
    dev = qkv.device
    out, lse = _ext.load().attention_fwd(q, k, v, scale, _f32(q_weight, dev), _f32(k_weight, dev), _f32(cos, dev),
                                         _f32(sin, dev), eps)
    return out, lse


@_qnra_fwd.register_fake
def _(qkv, q_weight, k_weight, cos, sin, eps, scale, deterministic):
    B, N, _three, H, hd = qkv.shape
    return qkv.new_empty((B, N, H, hd)), qkv.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("vefast::qk_norm_rope_attention_bwd", mutates_args=())
def _qnra_bwd(dout: torch.Tensor, qkv: torch.Tensor, q_weight: Optional[torch.Tensor],
              k_weight: Optional[torch.Tensor], cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
              out: torch.Tensor, lse: torch.Tensor, eps: float, scale: float,
              deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels return the gradients w.r.t. the normalized, rotated q / k (they recompute them in their
    prologue); the Triton prologue backward maps those, and dv, into the packed dqkv in one pass."""
    _require_extension(qkv)
    q_raw, k_raw, v = qkv.unbind(2)
    dev = qkv.device
    dq, dk, dv = (torch.empty(q_raw.shape, dtype=qkv.dtype, device=dev) for _ in range(3))
    _ext.load().attention_bwd(dout, q_raw, k_raw, v, out, lse, dq, dk, dv, scale, _f32(q_weight, dev),
                              _f32(k_weight, dev), _f32(cos, dev), _f32(sin, dev), eps)
    norm = QKNorm("rms" if q_weight is not None else "none", q_weight, k_weight, eps=eps)
    dqkv, part = qp.alloc_bwd(qkv, norm)
    qp.launch_bwd(dq, dk, dv, qkv, norm, _rope(cos, sin), dqkv, part)
    dqw, _, dkw, _ = qp.finish_param_grads(part, norm)
    # A weight that is None gets an empty placeholder (custom ops return tensors); autograd maps it to None.
    return dqkv, dqw if dqw is not None else torch.empty(0), dkw if dkw is not None else torch.empty(0)


@_qnra_bwd.register_fake
def _(dout, qkv, q_weight, k_weight, cos, sin, out, lse, eps, scale, deterministic):
    def grad(w):
        return w.new_empty(w.shape) if w is not None else qkv.new_empty(0, device="cpu", dtype=torch.float32)
    return qkv.new_empty(qkv.shape), grad(q_weight), grad(k_weight)


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
# Backend choice: the measurement table and "auto".

TABLE_PATH = Path(__file__).resolve().parents[1] / "_attention_table.json"
TABLE_SCHEMA = 1
_TABLE_KEYS = ("arch", "head_dim", "dtype", "qk_norm", "seq_min", "seq_max", "backend", "validated")
_table_cache: dict[str, Any] = {}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_table(table: object, source: str = "table") -> dict:
    """Validate a backend table (schema in docs/attention.md); raises ValueError naming the problem."""
    if not isinstance(table, dict) or table.get("schema") != TABLE_SCHEMA:
        raise ValueError(f"{source}: expected a dict with schema {TABLE_SCHEMA}")
    entries = table.get("entries")
    if not isinstance(entries, list):
        raise ValueError(f"{source}: 'entries' must be a list")
    for i, e in enumerate(entries):
        missing = [k for k in _TABLE_KEYS if k not in e] if isinstance(e, dict) else list(_TABLE_KEYS)
        if missing:
            raise ValueError(f"{source}: entry {i} lacks {missing}")
        if e["backend"] not in ("sdpa", "cuda") or e["qk_norm"] not in NORMS or not e["seq_min"] <= e["seq_max"]:
            raise ValueError(f"{source}: entry {i} has a bad backend, qk_norm or sequence range: {e}")
    return table


def attention_table() -> dict:
    """The shipped backend table ``vefast/_attention_table.json`` (read once per process)."""
    if "table" not in _table_cache:
        _table_cache["table"] = parse_table(json.loads(TABLE_PATH.read_text()), str(TABLE_PATH))
    return _table_cache["table"]


def _arch(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def table_choice(arch: str, head_dim: int, dtype: torch.dtype, qk_norm: str, n: int) -> tuple[str, str]:
    """(backend, why) from the table for one case; "sdpa" where no validated measurement favours "cuda"."""
    key = (arch, head_dim, _dtype_name(dtype), qk_norm)
    for e in attention_table()["entries"]:
        if (e["arch"], e["head_dim"], e["dtype"], e["qk_norm"]) == key and e["seq_min"] <= n <= e["seq_max"]:
            span = f"N {e['seq_min']}-{e['seq_max']}, B {e.get('batch')}, H {e.get('heads')}"
            if e["backend"] == "cuda" and e["validated"]:
                return "cuda", (f"measured {e.get('speedup_vs_best_sdpa', float('nan')):.2f}x faster than SDPA "
                                f"({e.get('best_sdpa_backend')}) at {span} ({e.get('device')})")
            return "sdpa", (f"measured: SDPA ({e.get('best_sdpa_backend')}) at least as fast at {span} "
                            f"({e.get('device')})")
    return "sdpa", (f"no measurement for {arch}, hd {head_dim}, {_dtype_name(dtype)}, q/k norm {qk_norm}, N {n} "
                    f"in vefast/_attention_table.json")


def cuda_validated(arch: str) -> bool:
    """Whether the table holds a validated CUDA-kernel measurement on this GPU architecture."""
    return any(e["arch"] == arch and e["validated"] for e in attention_table()["entries"])


def _cuda_unavailable(device_type: str, index: int | None, dtype: torch.dtype, head_dim: int, qk_norm: str) -> str:
    """Empty when the CUDA kernel can run such a call, else the reason."""
    if device_type != "cuda":
        return f"{device_type} tensors (the CUDA kernel is CUDA-only)"
    if dtype not in FUSED_DTYPES:
        return f"dtype {_dtype_name(dtype)} (the CUDA kernel takes bfloat16 and float16)"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} (the CUDA kernel takes {SUPPORTED_HEAD_DIMS})"
    if qk_norm == "layer":
        return "LayerNorm q/k norm (the CUDA kernel fuses RMSNorm only)"
    if not _ext.available():
        return f"the CUDA extension is unavailable: {_ext.unavailable_reason()}"
    if not hasattr(_ext.load(), "attention_fwd"):
        return "vefast._C was built without the attention kernels: reinstall vefast to rebuild it"
    return _device_unsupported(index if index is not None else torch.cuda.current_device())


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


@torch.compiler.assume_constant_result
def _resolve_backend(requested: str, device_type: str, index: int, head_dim: int, dtype: torch.dtype, qk_norm: str,
                     n: int, op: str) -> str:
    """"sdpa" or "cuda" for a call (under torch.compile evaluated once, while tracing)."""
    if requested == "sdpa":
        return "sdpa"
    reason = _cuda_unavailable(device_type, None if index < 0 else index, dtype, head_dim, qk_norm)
    if requested == "cuda":
        if reason:
            report_once(f"{op}:cuda:{reason}", f"{op}: backend='cuda' cannot run ({reason}): running SDPA")
            return "sdpa"
        arch = _arch(index if index >= 0 else torch.cuda.current_device())
        if not cuda_validated(arch):
            report_once(f"{op}:cuda-unvalidated:{arch}",
                        f"{op}: backend='cuda' was never validated on {arch} (no validated entry in "
                        "vefast/_attention_table.json); its results are not checked on this GPU")
        return "cuda"
    if reason:
        return "sdpa"
    return table_choice(_arch(index if index >= 0 else torch.cuda.current_device()), head_dim, dtype, qk_norm, n)[0]


def attention_backends(device: torch.device | str | None = None, *, dtype: torch.dtype = torch.bfloat16,
                       qk_norm: str = "rms", n: int = 256) -> list[dict[str, Any]]:
    """What ``backend="auto"`` picks per head dim on ``device`` (default: the current CUDA device, else CPU),
    and why (``vefast.info()`` prints it)."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for hd in SUPPORTED_HEAD_DIMS:
        if dev.type != "cuda":
            rows.append({"head_dim": hd, "backend": "sdpa", "reason": "CPU: torch's CPU SDPA; the q/k prologue runs "
                         "in Triton under TRITON_INTERPRET=1, else the eager reference (reported)"})
            continue
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        reason = _cuda_unavailable("cuda", index, dtype, hd, qk_norm)
        if reason:
            rows.append({"head_dim": hd, "backend": "sdpa", "reason": f"CUDA kernel unavailable: {reason}"})
            continue
        backend, why = table_choice(_arch(index), hd, dtype, qk_norm, n)
        rows.append({"head_dim": hd, "backend": backend, "reason": why})
    return rows


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


def _check_backend(backend: object) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _norm_kind(norm: str | None, weight: torch.Tensor | None, bias: torch.Tensor | None) -> str:
    """``norm`` as given, or (None) "rms" when weights are given and "none" when not (the original API)."""
    if norm is not None:
        return norm
    return "layer" if bias is not None else "rms" if weight is not None else "none"


def _index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else -1


def _sdpa_native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on (B, N, H, hd) tensors (views into qkv are fine): (B, N, H, hd)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2).contiguous()


ATTENTION_LAYOUTS = ("bnhd", "bhnd")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              deterministic: bool = False, backend: str = "auto", layout: str = "bnhd") -> torch.Tensor:
    """Non-causal attention ``softmax(scale * Q K^T) V`` on (B, N, H, head_dim) tensors -> (B, N, H, head_dim).

    ``layout``: "bnhd" (default: vefast's and flash-attn's (B, N, H, head_dim), what a fused qkv Linear
    reshapes to) or "bhnd" (SDPA's (B, H, N, head_dim); the result then has that layout too). The sizes
    alone cannot tell the two apart, so SDPA-layout callers must say so.

    ``backend`` "sdpa": ``F.scaled_dot_product_attention`` (views into a fused qkv tensor need no copy);
    "cuda": vefast's CUDA kernel (bf16 / fp16 CUDA, head_dim in {64, 72, 80, 96, 128}; elsewhere SDPA runs,
    reported); "auto": "cuda" only where the shipped table measured it faster, else SDPA. ``scale`` defaults
    to ``head_dim ** -0.5``. ``deterministic=True`` makes the backward bitwise repeatable (module docstring).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
    if layout not in ATTENTION_LAYOUTS:
        raise ValueError(f"layout must be one of {ATTENTION_LAYOUTS} ('bnhd': (B, N, H, head_dim), 'bhnd': SDPA's "
                         f"(B, H, N, head_dim)), got {layout!r}")
    if layout == "bhnd":
        if q.dim() != 4:
            raise ValueError(f"q must have shape (B, H, N, head_dim) (layout='bhnd'), got {tuple(q.shape)}")
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale,
                        deterministic=deterministic, backend=backend)
        return out.transpose(1, 2)
    if q.dim() != 4:
        raise ValueError(f"q must have shape (B, N, H, head_dim) (layout='bnhd'; pass layout='bhnd' for SDPA's "
                         f"(B, H, N, head_dim)), got {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    check_same_device(q=q, k=k, v=v)
    if min(q.shape) < 1:
        raise ValueError(f"q must have B, N, H, head_dim >= 1, got shape {tuple(q.shape)}")
    _check_bool("deterministic", deterministic)
    _check_backend(backend)
    s = _check_scale(scale, q.shape[-1])
    B, N, H, hd = q.shape
    if _resolve_backend(backend, q.device.type, _index(q), hd, q.dtype, "none", N, "attention") == "cuda":
        return torch.ops.vefast.attention_fwd(q, k, v, s, deterministic)[0]
    if deterministic and q.device.type == "cuda":
        out_t, _lse = _sdpa_op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), s, sdp_enabled_mask(), True)
        return out_t.transpose(1, 2)
    return _sdpa_native(q, k, v, s)


def qk_norm_rope_attention(qkv: torch.Tensor, q_norm_weight: torch.Tensor | None = None,
                           k_norm_weight: torch.Tensor | None = None,
                           rope: tuple[torch.Tensor, torch.Tensor] | None = None, *, norm: str | None = None,
                           q_norm_bias: torch.Tensor | None = None, k_norm_bias: torch.Tensor | None = None,
                           eps: float = 1e-6, scale: float | None = None, deterministic: bool = False,
                           backend: str = "auto") -> torch.Tensor:
    """DiT attention on the fused qkv projection (B, N, 3, H, head_dim) -> (B, N, H, head_dim).

    q and k get a per-head ``norm``: "rms" (LightningDiT's RMSNorm: ``x * rsqrt(mean(x^2) + eps)`` rounded to
    the input dtype, times the weight), "layer" (timm LayerNorm, weight and bias) or "none"; the default
    (None) is "rms" when weights are given, else "none". Weights / biases are (head_dim,) and optional
    (both q and k or neither). Then the 2D rotary embedding ``rope = (cos, sin)``, each (N, head_dim)
    (:func:`vefast.ops.rope.rope_2d_freqs`; None skips it), then attention. ``backend``, ``scale``,
    ``deterministic`` as for :func:`attention`; the SDPA path runs the fused Triton prologue (module docstring).
    """
    kind = _norm_kind(norm, q_norm_weight, q_norm_bias)
    spec = QKNorm(kind, q_norm_weight, k_norm_weight, q_norm_bias, k_norm_bias, eps)
    check_qk_args(qkv, spec, rope)
    _check_bool("deterministic", deterministic)
    _check_backend(backend)
    B, N, _three, H, hd = qkv.shape
    s = _check_scale(scale, hd)
    if kind == "none" and rope is None:  # nothing to fuse: plain attention on the views
        q, k, v = qkv.unbind(2)
        return attention(q, k, v, scale=s, deterministic=deterministic, backend=backend)
    op = "qk_norm_rope_attention"
    if _resolve_backend(backend, qkv.device.type, _index(qkv), hd, qkv.dtype, kind, N, op) == "cuda":
        if kind == "rms" and q_norm_weight is None:  # the kernel normalizes exactly where a weight is given
            q_norm_weight = k_norm_weight = torch.ones(hd, device=qkv.device)
        cos, sin = rope if rope is not None else (None, None)
        return torch.ops.vefast.qk_norm_rope_attention_fwd(qkv, q_norm_weight, k_norm_weight, cos, sin, float(eps),
                                                           s, deterministic)[0]
    if not triton_path("qk_norm_rope_attention", qkv, *spec.params(), *(rope or ())):
        q, k = qk_norm_rope_reference(qkv, spec, rope)
        return _sdpa_native(q, k, qkv[:, :, 2], s)
    cos, sin = rope if rope is not None else (None, None)
    out_t = _qnr_sdpa_op(qkv, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, cos, sin, kind, float(eps), s,
                         sdp_enabled_mask(), deterministic)[0]
    return out_t.transpose(1, 2)
