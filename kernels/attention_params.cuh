// Host-visible interface of the fused attention kernels (no device code: csrc/attention.cpp, compiled by the
// host compiler, includes this file; kernels/flash_*.cuh hold the kernels).
//
// Layout: every (B, N, H, head_dim) tensor is described by its data pointer and its four strides in
// elements, so q / k / v may be views into a fused (B, N, 3, H, head_dim) qkv tensor. The kernels read and
// write rows with 16-byte accesses, so every such tensor must be `vectorizable` (below); the host copies
// the ones that are not (flash_copy_plan) -- a gradient that arrives as an expanded (stride-0) view, say.
// logsumexp and the backward's rowsum(dO * O) workspace are (B, H, N) float32, contiguous.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace vefast {
namespace attn {

enum class DType { kBF16, kFP16 };

// A (B, N, H, head_dim) tensor: base pointer and element strides.
struct Tensor4 {
  void* ptr = nullptr;
  int64_t sb = 0, sn = 0, sh = 0, sd = 0;
};

// Optional per-head RMSNorm and 2D rotary embedding applied to q and k rows as they are loaded
// (the "prologue"), in float32:
//   y = round_to_dtype(x * rsqrt(mean(x^2) + eps)) * weight[d]      (when weight != nullptr)
//   out[2i]   = y[2i]   * cos[n, 2i]   - y[2i+1] * sin[n, 2i]        (when cos != nullptr)
//   out[2i+1] = y[2i+1] * cos[n, 2i+1] + y[2i]   * sin[n, 2i+1]
// then rounded to the input dtype for the tensor cores (LightningDiT: RMSNorm -> rope -> q.to(v.dtype)).
struct Prologue {
  const float* q_weight = nullptr;  // (head_dim,) float32 or nullptr: no RMSNorm on q
  const float* k_weight = nullptr;  // (head_dim,) float32 or nullptr: no RMSNorm on k
  const float* cos = nullptr;       // (N, head_dim) float32 contiguous, or nullptr: no rotary embedding
  const float* sin = nullptr;       // (N, head_dim) float32 contiguous (set together with cos)
  float eps = 1e-6f;
};

struct Params {
  Tensor4 q, k, v;      // inputs (raw q / k: the prologue, if any, is applied on load)
  Tensor4 o;            // forward output; backward: the saved forward output (the dQ pass reads it for D)
  float* lse = nullptr; // (B, H, N): natural-log logsumexp of the scaled scores of each query row
  // backward only
  Tensor4 dout;              // dL/dO
  float* dsum = nullptr;     // (B, H, N) float32 workspace the backward fills with D = rowsum(dO * O)
  Tensor4 dq, dk, dv;        // outputs: gradients w.r.t. the (transformed) q, k and v
  int B = 0, H = 0, N = 0, head_dim = 0;
  float scale = 1.0f;        // softmax scale (1/sqrt(head_dim) by default)
  Prologue pro;
};

// The head dims the kernels are instantiated for; a real head_dim runs on the smallest one that holds
// it (72 -> 80: loads and stores are masked to the real head_dim, the padding columns are zeros).
inline int padded_head_dim(int head_dim) {
  if (head_dim <= 0 || head_dim % 8 != 0) return -1;
  if (head_dim <= 64) return 64;
  if (head_dim <= 80) return 80;
  if (head_dim <= 96) return 96;
  if (head_dim <= 128) return 128;
  return -1;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether a (B, N, H, hd) tensor can be read / written by 16-byte accesses: unit head-dim stride, base
// 16-byte aligned, row / head / batch strides multiples of 8 elements (16 bytes). Views of a packed
// (B, N, 3, H, hd) qkv with hd a multiple of 8 qualify; an expanded (stride-0) gradient does not.
inline bool vectorizable(const Tensor4& t) {
  const auto ok = [](int64_t s) { return s % 8 == 0; };
  return t.ptr != nullptr && t.sd == 1 && aligned16(t.ptr) && ok(t.sn) && ok(t.sh) && ok(t.sb);
}

// What the host must replace before the kernels can run (flash_supported holds afterwards): the
// (B, N, H, hd) tensors that are not vectorizable -- inputs by contiguous copies, outputs (dq, dk, dv) by
// contiguous buffers copied back after the launch -- and prologue tables / weights that are not 16-byte
// aligned (by aligned copies). Forward: q, k, v (o is the host's own contiguous allocation).
struct CopyPlan {
  bool q = false, k = false, v = false, o = false, dout = false, dq = false, dk = false, dv = false;
  bool q_weight = false, k_weight = false, cos = false, sin = false;
  bool any() const {
    return q || k || v || o || dout || dq || dk || dv || q_weight || k_weight || cos || sin;
  }
};
inline CopyPlan flash_copy_plan(const Params& p, bool backward) {
  CopyPlan c;
  c.q = !vectorizable(p.q);
  c.k = !vectorizable(p.k);
  c.v = !vectorizable(p.v);
  c.q_weight = !aligned16(p.pro.q_weight);
  c.k_weight = !aligned16(p.pro.k_weight);
  c.cos = !aligned16(p.pro.cos);
  c.sin = !aligned16(p.pro.sin);
  if (backward) {
    c.o = !vectorizable(p.o);
    c.dout = !vectorizable(p.dout);
    c.dq = !vectorizable(p.dq);
    c.dk = !vectorizable(p.dk);
    c.dv = !vectorizable(p.dv);
  }
  return c;
}
// The kernels' requirements: a supported head dim, nothing left to copy, the backward's D workspace.
inline bool flash_supported(const Params& p, bool backward) {
  return padded_head_dim(p.head_dim) > 0 && !flash_copy_plan(p, backward).any() &&
         (!backward || p.dsum != nullptr) && (backward || vectorizable(p.o));
}

// Launch on `stream`; return the launch error (cudaSuccess when the launch was accepted;
// cudaErrorInvalidValue when flash_supported fails).
// Forward: writes p.o and p.lse. `sm` is the device's compute capability (major * 10 + minor): on sm 90,
// when the extension was built with the sm_90a kernels (sm90a_forward_built), the wgmma forward
// (kernels/flash_fwd_sm90a.cuh) runs; everywhere else the mma.sync forward (kernels/flash_fwd.cuh).
// Backward: D = rowsum(dO * O) into p.dsum and dq (one pass over the key tiles), then dk, dv (a pass over
// the query tiles): deterministic, no atomics (kernels/flash_bwd.cuh, every sm >= 80).
cudaError_t launch_flash_fwd(const Params& p, DType dtype, int sm, cudaStream_t stream);
cudaError_t launch_flash_bwd(const Params& p, DType dtype, cudaStream_t stream);
// The mma.sync forward alone, and the wgmma forward alone (sm_90a builds; cudaErrorInvalidDeviceFunction
// when the extension holds no sm_90a kernels).
cudaError_t launch_flash_fwd_mma(const Params& p, DType dtype, cudaStream_t stream);
cudaError_t launch_flash_fwd_sm90a(const Params& p, DType dtype, cudaStream_t stream);
// Whether this binary holds the sm_90a wgmma forward (built with VEFAST_CUDA_ARCHS naming 90a).
bool sm90a_forward_built();
// Which forward launch_flash_fwd runs for compute capability `sm`: true = the wgmma kernel.
inline bool use_sm90a_forward(int sm, bool built) { return built && sm == 90; }

}  // namespace attn
}  // namespace vefast
