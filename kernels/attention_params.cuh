// Host-visible interface of the fused attention kernels (no device code: csrc/attention.cpp,
// compiled by the host compiler, includes this file; kernels/attention.cuh holds the kernels).
//
// Layout: every (B, N, H, head_dim) tensor is described by its data pointer and its four strides in
// elements, so q / k / v may be views into a fused (B, N, 3, H, head_dim) qkv tensor and gradients may
// arrive as expanded (stride-0) views. logsumexp and delta are (B, H, N) float32, contiguous.
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
  Tensor4 o;            // forward output; backward: the saved forward output (unused by the kernels)
  float* lse = nullptr; // (B, H, N): natural-log logsumexp of the scaled scores of each query row
  // backward only
  Tensor4 dout;              // dL/dO
  const float* delta = nullptr;  // (B, H, N): rowsum(dO * O), float32
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

// Launch on `stream`; return the launch error (cudaSuccess when the launch was accepted).
// Forward: writes p.o and p.lse. Backward: writes p.dq, p.dk, p.dv (deterministic: no atomics;
// dq comes from its own pass over the key tiles, dk/dv from a pass over the query tiles).
cudaError_t launch_fwd(const Params& p, DType dtype, cudaStream_t stream);
cudaError_t launch_bwd_bf16(const Params& p, cudaStream_t stream);
cudaError_t launch_bwd_fp16(const Params& p, cudaStream_t stream);

}  // namespace attn
}  // namespace vefast
