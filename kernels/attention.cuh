// Fused non-causal attention, FlashAttention-2 style, for sm_80 and sm_90 (mma.sync m16n8k16).
//
//   S = scale * Q K^T,  P = softmax(S) row-wise,  O = P V,  lse = logsumexp(S) per query row.
//   Backward (D = rowsum(dO * O)):  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - D),
//                                   dQ = scale * dS K,  dK = scale * dS^T Q.
//
// Structure (one CTA = 4 warps = 128 threads, tiles of 64 rows; each warp owns 16 rows of its tile):
//   fwd   : a CTA owns 64 query rows, loops over 64-key tiles with the online softmax (running max m,
//           running sum l in float32, exp2 with log2(e) folded into the scale), writes O and lse.
//   bwd dq: a CTA owns 64 query rows, loops over key tiles, recomputes P from lse, accumulates dQ.
//   bwd dk/dv: a CTA owns 64 key rows, loops over query tiles, recomputes P^T, accumulates dK, dV.
//   Two backward passes instead of float atomics on dQ: the backward is always deterministic.
//
// Tiles live in shared memory as [64][HDP + 8] (HDP = padded head dim: 64, 80, 96 or 128; the +8
// elements of row padding make the fragment loads below free of bank conflicts). Rows past N and
// columns past the real head_dim are stored as zeros, so padded columns add nothing to Q K^T and padded
// key rows are masked to -inf before the softmax (P = 0), padded query rows are never stored.
//
// The mma.sync.m16n8k16 fragment layout (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with
// g = lane / 4 and t = lane % 4; each 32-bit register holds two consecutive 16-bit elements, the
// lower column (A, C) or the lower k (B) in the low half:
//   A (16x16, row-major): a0 = A[g][2t..2t+1],   a1 = A[g+8][2t..2t+1],
//                         a2 = A[g][2t+8..2t+9], a3 = A[g+8][2t+8..2t+9]
//   B (16x8, "col"):      b0 = B[2t..2t+1][g],   b1 = B[2t+8..2t+9][g]
//   C (16x8, float32):    c0, c1 = C[g][2t..2t+1],  c2, c3 = C[g+8][2t..2t+1]
// Two adjacent C tiles (columns 0-7 and 8-15) hold exactly the elements of one A fragment of a 16x16
// block, so P (or dS) goes from the accumulators of one product to the A operand of the next without
// leaving registers (to_a_fragment below).
//
// Later optimizations, not done here: ldmatrix / cp.async pipelining, 128-row query tiles,
// wgmma + TMA on sm_90a (see docs/attention.md).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention_params.cuh"

namespace vefast {
namespace attn {

constexpr int kRows = 64;     // rows of every tile (query tile and key tile)
constexpr int kWarps = 4;     // warps per CTA, 16 rows each
constexpr int kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int HDP>
struct Tile {
  static constexpr int ld = HDP + 8;          // row stride in elements of a shared-memory tile
  static constexpr int elems = kRows * ld;    // elements of one tile
};

// ---------------------------------------------------------------------------------------------
// Element conversions and the tensor-core instruction, per 16-bit type.
template <typename T> struct Elem;

template <> struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ uint16_t bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
  // D = A * B + D, float32 accumulators.
  static __device__ __forceinline__ void mma(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <> struct Elem<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ uint16_t bits(__half x) { return __half_as_ushort(x); }
  static __device__ __forceinline__ void mma(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

// Two elements into one register, `lo` in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack(T lo, T hi) {
  return static_cast<uint32_t>(Elem<T>::bits(lo)) | (static_cast<uint32_t>(Elem<T>::bits(hi)) << 16);
}
template <typename T>
__device__ __forceinline__ uint32_t pack_floats(float lo, float hi) {
  return pack<T>(Elem<T>::from_float(lo), Elem<T>::from_float(hi));
}

// ---------------------------------------------------------------------------------------------
// Fragment loads from a shared-memory tile `s` with row stride `ld` (elements).

// A fragment of the 16x16 block at rows r0.., columns c0.. of a row-major tile: A[r][c] = s[r*ld + c].
template <typename T>
__device__ __forceinline__ void load_a(uint32_t a[4], const T* s, int ld, int r0, int c0) {
  const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
  const T* p = s + (r0 + g) * ld + c0 + 2 * t;
  a[0] = *reinterpret_cast<const uint32_t*>(p);
  a[1] = *reinterpret_cast<const uint32_t*>(p + 8 * ld);
  a[2] = *reinterpret_cast<const uint32_t*>(p + 8);
  a[3] = *reinterpret_cast<const uint32_t*>(p + 8 * ld + 8);
}

// B fragment (16 k x 8 n at k0, n0) of B = X^T for a row-major tile X: B[k][n] = s[n*ld + k]
// (k runs along a row: the Q K^T and dO V^T products, k = head dim, n = key or query row).
template <typename T>
__device__ __forceinline__ void load_b_rows(uint32_t b[2], const T* s, int ld, int k0, int n0) {
  const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
  const T* p = s + (n0 + g) * ld + k0 + 2 * t;
  b[0] = *reinterpret_cast<const uint32_t*>(p);
  b[1] = *reinterpret_cast<const uint32_t*>(p + 8);
}

// B fragment (16 k x 8 n at k0, n0) of B = X for a row-major tile X: B[k][n] = s[k*ld + n]
// (k runs down a column: the P V, dS K, P^T dO and dS^T Q products, k = row, n = head dim).
template <typename T>
__device__ __forceinline__ void load_b_cols(uint32_t b[2], const T* s, int ld, int k0, int n0) {
  const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
  const T* p = s + (k0 + 2 * t) * ld + n0 + g;
  b[0] = pack<T>(p[0], p[ld]);
  b[1] = pack<T>(p[8 * ld], p[9 * ld]);
}

// The A fragment of columns 16*kk..16*kk+15 of a 16 x (8*NT) float32 accumulator block, rounded to T.
template <typename T, int NT>
__device__ __forceinline__ void to_a_fragment(uint32_t a[4], const float c[NT][4], int kk) {
  a[0] = pack_floats<T>(c[2 * kk][0], c[2 * kk][1]);
  a[1] = pack_floats<T>(c[2 * kk][2], c[2 * kk][3]);
  a[2] = pack_floats<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = pack_floats<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// acc (16 x 64, 8 tiles of 8 columns) = rows r0.. of tile `sa` (16 x HDP) times tile `sb`^T (64 x HDP)^T:
// the Q K^T-shaped product over the (padded) head dim.
template <typename T, int HDP>
__device__ __forceinline__ void rows_times_rows_t(float acc[8][4], const T* sa, int r0, const T* sb) {
  constexpr int ld = Tile<HDP>::ld;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
  }
#pragma unroll
  for (int kk = 0; kk < HDP / 16; ++kk) {
    uint32_t a[4];
    load_a(a, sa, ld, r0, 16 * kk);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      uint32_t b[2];
      load_b_rows(b, sb, ld, 16 * kk, 8 * nt);
      Elem<T>::mma(acc[nt], a, b);
    }
  }
}

// acc (16 x HDP) += P (16 x 64, float32 accumulators, rounded to T) times tile `sb` (64 x HDP):
// the P V-shaped product over the 64 rows of a tile.
template <typename T, int HDP>
__device__ __forceinline__ void probs_times_rows(float acc[HDP / 8][4], const float p[8][4], const T* sb) {
  constexpr int ld = Tile<HDP>::ld;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    uint32_t a[4];
    to_a_fragment<T, 8>(a, p, kk);
#pragma unroll
    for (int dt = 0; dt < HDP / 8; ++dt) {
      uint32_t b[2];
      load_b_cols(b, sb, ld, 16 * kk, 8 * dt);
      Elem<T>::mma(acc[dt], a, b);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tile loader with the optional RMSNorm + rotary prologue.
//
// Loads rows n0 .. n0+63 of one (b, h) slice of `x` into the shared tile `s` ([64][HDP+8]). One warp per
// row (rows warp, warp+4, ...), lane l holds the elements d = l + 32 j: the row's sum of squares is a
// warp reduction and the rotary partner d ^ 1 sits in lane l ^ 1 (same j), one shuffle away.
// Rows >= N and columns >= head_dim are written as zeros.
template <typename T, int HDP>
__device__ __forceinline__ void load_tile(T* s, const T* x, int64_t sn, int64_t sd, int n0, int N, int head_dim,
                                          const float* weight, const float* cos, const float* sin, float eps) {
  constexpr int ld = Tile<HDP>::ld;
  constexpr int J = (HDP + 31) / 32;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int r = warp; r < kRows; r += kWarps) {
    const int n = n0 + r;
    const bool valid = n < N;  // uniform across the warp: the shuffles below see all 32 lanes
    float v[J];
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int d = lane + 32 * j;
      v[j] = (valid && d < head_dim) ? Elem<T>::to_float(x[static_cast<int64_t>(n) * sn + d * sd]) : 0.f;
    }
    if (valid && weight != nullptr) {
      float ss = 0.f;
#pragma unroll
      for (int j = 0; j < J; ++j) ss += v[j] * v[j];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
      const float rinv = rsqrtf(ss / static_cast<float>(head_dim) + eps);
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const int d = lane + 32 * j;
        // LightningDiT's RMSNorm: normalize in float32, cast to the input dtype, then times the weight.
        const float normed = Elem<T>::to_float(Elem<T>::from_float(v[j] * rinv));
        v[j] = d < head_dim ? normed * weight[d] : 0.f;
      }
    }
    if (valid && cos != nullptr) {
      const float* c = cos + static_cast<int64_t>(n) * head_dim;
      const float* sr = sin + static_cast<int64_t>(n) * head_dim;
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const int d = lane + 32 * j;
        const float partner = __shfl_xor_sync(0xffffffffu, v[j], 1);  // element d ^ 1
        if (d < head_dim) {
          // rotate_half on interleaved pairs: (-x[2i+1], x[2i]).
          const float rot = (d & 1) ? partner : -partner;
          v[j] = v[j] * c[d] + rot * sr[d];
        }
      }
    }
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int d = lane + 32 * j;
      if (d < HDP) s[r * ld + d] = Elem<T>::from_float(v[j]);
    }
  }
}

// Per-row float32 vector (lse or delta) of rows n0 .. n0+63 into shared memory, `fill` past N.
__device__ __forceinline__ void load_row_vector(float* s, const float* x, int n0, int N, float mul, float fill) {
  for (int r = threadIdx.x; r < kRows; r += kThreads) s[r] = (n0 + r < N) ? x[n0 + r] * mul : fill;
}

template <typename T>
__device__ __forceinline__ const T* slice(const Tensor4& t, int b, int h) {
  return static_cast<const T*>(t.ptr) + static_cast<int64_t>(b) * t.sb + static_cast<int64_t>(h) * t.sh;
}
template <typename T>
__device__ __forceinline__ T* slice_out(const Tensor4& t, int b, int h) {
  return static_cast<T*>(t.ptr) + static_cast<int64_t>(b) * t.sb + static_cast<int64_t>(h) * t.sh;
}

// Store a warp's 16 x HDP float32 accumulator block (rows r0.. of the tile starting at n0) times `mul`,
// rows < N and columns < head_dim only.
template <typename T, int HDP>
__device__ __forceinline__ void store_rows(const Tensor4& out, int b, int h, const float acc[HDP / 8][4],
                                           int row0, int N, int head_dim, float mul0, float mul1) {
  T* base = slice_out<T>(out, b, h);
  const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int n = row0 + g + 8 * half;
    if (n >= N) continue;
    const float mul = half ? mul1 : mul0;
    T* row = base + static_cast<int64_t>(n) * out.sn;
#pragma unroll
    for (int dt = 0; dt < HDP / 8; ++dt) {
      const int d = 8 * dt + 2 * t;  // head_dim is even: d < head_dim implies d + 1 < head_dim
      if (d < head_dim) {
        row[d * out.sd] = Elem<T>::from_float(acc[dt][2 * half] * mul);
        row[(d + 1) * out.sd] = Elem<T>::from_float(acc[dt][2 * half + 1] * mul);
      }
    }
  }
}

// Max and sum over the 4 lanes of a quad (the 4 threads t = 0..3 that share the rows g, g + 8).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Accumulator column of element e (0..3) of tile nt, relative to the tile's first column.
__device__ __forceinline__ int acc_col(int nt, int e) { return 8 * nt + 2 * (threadIdx.x & 3) + (e & 1); }

// ---------------------------------------------------------------------------------------------
// Forward. grid = (B * H, ceil(N / 64)); dynamic shared memory: 3 tiles (Q, K, V).
template <typename T, int HDP>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const Params p) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + Tile<HDP>::elems;
  T* sV = sK + Tile<HDP>::elems;
  const int b = blockIdx.z, h = blockIdx.y;
  const int m0 = blockIdx.x * kRows;
  const int warp = threadIdx.x >> 5;
  const int g = (threadIdx.x & 31) >> 2;
  const float sl2 = p.scale * kLog2e;  // scores in log2 units: exp(scale * s) = exp2(sl2 * s)

  load_tile<T, HDP>(sQ, slice<T>(p.q, b, h), p.q.sn, p.q.sd, m0, p.N, p.head_dim, p.pro.q_weight, p.pro.cos,
                    p.pro.sin, p.pro.eps);

  float o[HDP / 8][4];
#pragma unroll
  for (int dt = 0; dt < HDP / 8; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[dt][e] = 0.f;
  }
  float m[2] = {-INFINITY, -INFINITY};  // running max (log2 units) of rows g and g + 8
  float l[2] = {0.f, 0.f};              // running sum of exp2, this thread's columns only (quad-summed at the end)

  for (int n0 = 0; n0 < p.N; n0 += kRows) {
    __syncthreads();  // every warp is done with the previous K / V tiles (and sQ is complete)
    load_tile<T, HDP>(sK, slice<T>(p.k, b, h), p.k.sn, p.k.sd, n0, p.N, p.head_dim, p.pro.k_weight, p.pro.cos,
                      p.pro.sin, p.pro.eps);
    load_tile<T, HDP>(sV, slice<T>(p.v, b, h), p.v.sn, p.v.sd, n0, p.N, p.head_dim, nullptr, nullptr, nullptr, 0.f);
    __syncthreads();

    float s[8][4];
    rows_times_rows_t<T, HDP>(s, sQ, 16 * warp, sK);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = (n0 + acc_col(nt, e) < p.N) ? s[nt][e] * sl2 : -INFINITY;  // mask keys past N
        mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      // Every key tile holds at least one key < N, so the new max is finite.
      const float m_new = fmaxf(m[i], quad_max(mx[i]));
      const float alpha = exp2f(m[i] - m_new);  // exp2(-inf) = 0 on the first tile
      m[i] = m_new;
      l[i] *= alpha;
#pragma unroll
      for (int dt = 0; dt < HDP / 8; ++dt) {
        o[dt][2 * i] *= alpha;
        o[dt][2 * i + 1] *= alpha;
      }
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] - m[e >> 1]);
        l[e >> 1] += s[nt][e];
      }
    }
    probs_times_rows<T, HDP>(o, s, sV);
  }

  const float l0 = quad_sum(l[0]), l1 = quad_sum(l[1]);
  const int row0 = m0 + 16 * warp;
  store_rows<T, HDP>(p.o, b, h, o, row0, p.N, p.head_dim, 1.f / l0, 1.f / l1);
  if ((threadIdx.x & 3) == 0) {
    float* lse = p.lse + (static_cast<int64_t>(b) * p.H + h) * p.N;
    if (row0 + g < p.N) lse[row0 + g] = m[0] * kLn2 + logf(l0);
    if (row0 + g + 8 < p.N) lse[row0 + g + 8] = m[1] * kLn2 + logf(l1);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, dQ pass. grid = (B * H, ceil(N / 64)); shared memory: 4 tiles (Q, dO, K, V) + lse, delta.
template <typename T, int HDP>
__global__ void __launch_bounds__(kThreads) bwd_dq_kernel(const Params p) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + Tile<HDP>::elems;
  T* sK = sdO + Tile<HDP>::elems;
  T* sV = sK + Tile<HDP>::elems;
  float* sL = reinterpret_cast<float*>(sV + Tile<HDP>::elems);  // lse * log2(e) of the 64 query rows
  float* sD = sL + kRows;                                        // delta of the 64 query rows
  const int b = blockIdx.z, h = blockIdx.y;
  const int m0 = blockIdx.x * kRows;
  const int warp = threadIdx.x >> 5;
  const int g = (threadIdx.x & 31) >> 2;
  const float sl2 = p.scale * kLog2e;
  const int64_t bh = (static_cast<int64_t>(b) * p.H + h) * p.N;

  load_tile<T, HDP>(sQ, slice<T>(p.q, b, h), p.q.sn, p.q.sd, m0, p.N, p.head_dim, p.pro.q_weight, p.pro.cos,
                    p.pro.sin, p.pro.eps);
  load_tile<T, HDP>(sdO, slice<T>(p.dout, b, h), p.dout.sn, p.dout.sd, m0, p.N, p.head_dim, nullptr, nullptr,
                    nullptr, 0.f);
  load_row_vector(sL, p.lse + bh, m0, p.N, kLog2e, 0.f);
  load_row_vector(sD, p.delta + bh, m0, p.N, 1.f, 0.f);
  __syncthreads();
  const float lse2[2] = {sL[16 * warp + g], sL[16 * warp + g + 8]};
  const float dlt[2] = {sD[16 * warp + g], sD[16 * warp + g + 8]};

  float dq[HDP / 8][4];
#pragma unroll
  for (int dt = 0; dt < HDP / 8; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[dt][e] = 0.f;
  }

  for (int n0 = 0; n0 < p.N; n0 += kRows) {
    __syncthreads();
    load_tile<T, HDP>(sK, slice<T>(p.k, b, h), p.k.sn, p.k.sd, n0, p.N, p.head_dim, p.pro.k_weight, p.pro.cos,
                      p.pro.sin, p.pro.eps);
    load_tile<T, HDP>(sV, slice<T>(p.v, b, h), p.v.sn, p.v.sd, n0, p.N, p.head_dim, nullptr, nullptr, nullptr, 0.f);
    __syncthreads();

    float s[8][4], dp[8][4];
    rows_times_rows_t<T, HDP>(s, sQ, 16 * warp, sK);    // Q K^T
    rows_times_rows_t<T, HDP>(dp, sdO, 16 * warp, sV);  // dO V^T
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e >> 1;
        const float pr = (n0 + acc_col(nt, e) < p.N) ? exp2f(s[nt][e] * sl2 - lse2[i]) : 0.f;
        s[nt][e] = pr * (dp[nt][e] - dlt[i]);  // dS
      }
    }
    probs_times_rows<T, HDP>(dq, s, sK);  // dQ += dS K
  }
  const int row0 = m0 + 16 * warp;
  store_rows<T, HDP>(p.dq, b, h, dq, row0, p.N, p.head_dim, p.scale, p.scale);
}

// ---------------------------------------------------------------------------------------------
// Backward, dK / dV pass. grid = (B * H, ceil(N / 64)); shared memory: 4 tiles (K, V, Q, dO) + lse, delta.
template <typename T, int HDP>
__global__ void __launch_bounds__(kThreads) bwd_dkdv_kernel(const Params p) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + Tile<HDP>::elems;
  T* sQ = sV + Tile<HDP>::elems;
  T* sdO = sQ + Tile<HDP>::elems;
  float* sL = reinterpret_cast<float*>(sdO + Tile<HDP>::elems);
  float* sD = sL + kRows;
  const int b = blockIdx.z, h = blockIdx.y;
  const int k0 = blockIdx.x * kRows;
  const int warp = threadIdx.x >> 5;
  const float sl2 = p.scale * kLog2e;
  const int64_t bh = (static_cast<int64_t>(b) * p.H + h) * p.N;

  load_tile<T, HDP>(sK, slice<T>(p.k, b, h), p.k.sn, p.k.sd, k0, p.N, p.head_dim, p.pro.k_weight, p.pro.cos,
                    p.pro.sin, p.pro.eps);
  load_tile<T, HDP>(sV, slice<T>(p.v, b, h), p.v.sn, p.v.sd, k0, p.N, p.head_dim, nullptr, nullptr, nullptr, 0.f);

  float dk[HDP / 8][4], dv[HDP / 8][4];
#pragma unroll
  for (int dt = 0; dt < HDP / 8; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dt][e] = dv[dt][e] = 0.f;
  }

  for (int m0 = 0; m0 < p.N; m0 += kRows) {
    __syncthreads();
    load_tile<T, HDP>(sQ, slice<T>(p.q, b, h), p.q.sn, p.q.sd, m0, p.N, p.head_dim, p.pro.q_weight, p.pro.cos,
                      p.pro.sin, p.pro.eps);
    load_tile<T, HDP>(sdO, slice<T>(p.dout, b, h), p.dout.sn, p.dout.sd, m0, p.N, p.head_dim, nullptr, nullptr,
                      nullptr, 0.f);
    load_row_vector(sL, p.lse + bh, m0, p.N, kLog2e, 0.f);
    load_row_vector(sD, p.delta + bh, m0, p.N, 1.f, 0.f);
    __syncthreads();

    // Transposed scores: rows = this warp's 16 keys, columns = the 64 queries of the tile.
    float st[8][4], dpt[8][4];
    rows_times_rows_t<T, HDP>(st, sK, 16 * warp, sQ);    // K Q^T = S^T
    rows_times_rows_t<T, HDP>(dpt, sV, 16 * warp, sdO);  // V dO^T = dP^T
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = acc_col(nt, e);  // query row within the tile
        const float pr = (m0 + c < p.N) ? exp2f(st[nt][e] * sl2 - sL[c]) : 0.f;  // P^T, queries past N masked
        st[nt][e] = pr;
        dpt[nt][e] = pr * (dpt[nt][e] - sD[c]);  // dS^T
      }
    }
    probs_times_rows<T, HDP>(dv, st, sdO);  // dV += P^T dO
    probs_times_rows<T, HDP>(dk, dpt, sQ);  // dK += dS^T Q
  }
  const int row0 = k0 + 16 * warp;
  store_rows<T, HDP>(p.dk, b, h, dk, row0, p.N, p.head_dim, p.scale, p.scale);
  store_rows<T, HDP>(p.dv, b, h, dv, row0, p.N, p.head_dim, 1.f, 1.f);
}

// ---------------------------------------------------------------------------------------------
// Launchers (host).

template <int HDP>
constexpr size_t fwd_smem_bytes() { return 3 * Tile<HDP>::elems * 2; }
template <int HDP>
constexpr size_t bwd_smem_bytes() { return 4 * Tile<HDP>::elems * 2 + 2 * kRows * sizeof(float); }

// Row tiles fastest, then heads, then batch (as FlashAttention-2): the CTAs that read the same head's
// K and V run together, so K/V tiles are re-read from L2 rather than from HBM.
inline dim3 grid_of(const Params& p) {
  return dim3(static_cast<unsigned>((p.N + kRows - 1) / kRows), static_cast<unsigned>(p.H), static_cast<unsigned>(p.B));
}

template <typename T, int HDP>
cudaError_t launch_fwd_t(const Params& p, cudaStream_t stream) {
  constexpr size_t smem = fwd_smem_bytes<HDP>();
  cudaError_t err = cudaFuncSetAttribute(fwd_kernel<T, HDP>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  fwd_kernel<T, HDP><<<grid_of(p), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int HDP>
cudaError_t launch_bwd_t(const Params& p, cudaStream_t stream) {
  constexpr size_t smem = bwd_smem_bytes<HDP>();
  cudaError_t err = cudaFuncSetAttribute(bwd_dq_kernel<T, HDP>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(bwd_dkdv_kernel<T, HDP>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  bwd_dq_kernel<T, HDP><<<grid_of(p), kThreads, smem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  bwd_dkdv_kernel<T, HDP><<<grid_of(p), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// Dispatch over the padded head dim (the host side has checked head_dim).
template <typename T>
cudaError_t launch_fwd_dtype(const Params& p, cudaStream_t stream) {
  switch (padded_head_dim(p.head_dim)) {
    case 64: return launch_fwd_t<T, 64>(p, stream);
    case 80: return launch_fwd_t<T, 80>(p, stream);
    case 96: return launch_fwd_t<T, 96>(p, stream);
    case 128: return launch_fwd_t<T, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t launch_bwd_dtype(const Params& p, cudaStream_t stream) {
  switch (padded_head_dim(p.head_dim)) {
    case 64: return launch_bwd_t<T, 64>(p, stream);
    case 80: return launch_bwd_t<T, 80>(p, stream);
    case 96: return launch_bwd_t<T, 96>(p, stream);
    case 128: return launch_bwd_t<T, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace attn
}  // namespace vefast
