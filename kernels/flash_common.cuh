// Building blocks of the FlashAttention-2-class kernels (flash_fwd.cuh, flash_bwd.cuh, flash_fwd_sm90a.cuh):
// cp.async tile loads, the RMSNorm / RoPE prologue applied to a tile in shared memory, ldmatrix fragment
// loads, the mma.m16n8k16 products of a warp, and the 16-byte epilogue stores. Device primitives come from
// ptx.cuh.
//
// Shared-memory tiles have one of two layouts (a policy class: the byte offset of the 16-byte chunk c,
// elements 8c .. 8c+7, of row r, and which thread copies which chunk):
// - PaddedRows<HDP>: [rows][HDP + 8] 16-bit elements (mma.sync kernels). The 16-byte pad per row puts the
//   8 row addresses of every ldmatrix 8x8 matrix (row stride HDP + 8 = 72, 88, 104 or 136 elements = 36,
//   44, 52 or 68 words, i.e. 4, 12, 20 or 4 banks apart) on 8 distinct groups of 4 banks: ldmatrix is free
//   of bank conflicts without a swizzle, and every row start stays 16-byte aligned for cp.async.
// - CoreMatrices<ROWS>: chunk-major [HDP / 8][ROWS][8] (wgmma kernels): every 8 rows x 16 bytes "core
//   matrix" of the PTX ISA's no-swizzle canonical layouts is 128 contiguous bytes, so one tile serves as a
//   K-major operand (K of Q K^T: core matrices adjacent in K are ROWS * 16 bytes apart, in rows 128) and
//   as an MN-major one (V of P V: adjacent in K -- keys -- 128 bytes, in N -- head dim -- ROWS * 16).
//   Copies: two adjacent lanes take the two halves of a 32-byte sector of one row, consecutive lane pairs
//   consecutive rows, so a warp's 32 cp.async fill 4 contiguous 128-byte lines (no bank conflict).
//
// Global tensors must have a unit head-dim stride and 16-byte aligned rows (attn::vectorizable): q/k/v
// views of a packed qkv (B, N, 3, H, hd) with hd a multiple of 8 qualify. Rows >= N and the columns
// head_dim .. HDP-1 are zero-filled by cp.async (src-size 0), so they add nothing to any product.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "attention_params.cuh"
#include "ptx.cuh"

namespace vefast {
namespace flash {

using attn::Params;
using attn::Tensor4;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Row stride (elements) and size of a shared [ROWS][HDP + 8] tile.
template <int HDP>
struct Row {
  static constexpr int ld = HDP + 8;
  static constexpr int chunks = HDP / 8;  // 16-byte chunks of a row
};
template <int ROWS, int HDP>
constexpr int tile_elems() {
  return ROWS * Row<HDP>::ld;
}

template <int HDP>
struct PaddedRows {
  static constexpr int kChunks = HDP / 8;
  static __device__ __forceinline__ uint32_t chunk(int r, int c) {
    return static_cast<uint32_t>((r * Row<HDP>::ld + 8 * c) * 2);
  }
  // copy i of a tile: consecutive lanes take consecutive chunks of a row
  static __device__ __forceinline__ void copy_coord(int i, int& r, int& c) { r = i / kChunks, c = i % kChunks; }
};
template <int ROWS>
struct CoreMatrices {
  static __device__ __forceinline__ uint32_t chunk(int r, int c) { return static_cast<uint32_t>((c * ROWS + r) * 16); }
  // copy i of a tile: lanes 2j, 2j + 1 take chunks 2q, 2q + 1 of row j (one 32-byte sector), rows fastest
  static __device__ __forceinline__ void copy_coord(int i, int& r, int& c) {
    r = (i >> 1) % ROWS, c = 2 * ((i >> 1) / ROWS) + (i & 1);
  }
};
template <int ROWS, int HDP>
constexpr uint32_t core_tile_bytes() {
  return static_cast<uint32_t>(ROWS * HDP * 2);
}

template <typename T>
struct Elem;
template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ uint16_t bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
  static __device__ __forceinline__ __nv_bfloat16 of_bits(uint16_t b) { return __ushort_as_bfloat16(b); }
  static __device__ __forceinline__ void mma(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    ptx::mma_m16n8k16_bf16(d, a, b);
  }
};
template <>
struct Elem<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ uint16_t bits(__half x) { return __half_as_ushort(x); }
  static __device__ __forceinline__ __half of_bits(uint16_t b) { return __ushort_as_half(b); }
  static __device__ __forceinline__ void mma(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    ptx::mma_m16n8k16_f16(d, a, b);
  }
};

template <typename T>
__device__ __forceinline__ uint32_t pack_floats(float lo, float hi) {
  return static_cast<uint32_t>(Elem<T>::bits(Elem<T>::from_float(lo))) |
         (static_cast<uint32_t>(Elem<T>::bits(Elem<T>::from_float(hi))) << 16);
}
template <typename T>
__device__ __forceinline__ float lo_float(uint32_t w) {
  return Elem<T>::to_float(Elem<T>::of_bits(static_cast<uint16_t>(w & 0xffffu)));
}
template <typename T>
__device__ __forceinline__ float hi_float(uint32_t w) {
  return Elem<T>::to_float(Elem<T>::of_bits(static_cast<uint16_t>(w >> 16)));
}

template <typename T>
__device__ __forceinline__ const T* slice(const Tensor4& t, int b, int h) {
  return static_cast<const T*>(t.ptr) + static_cast<int64_t>(b) * t.sb + static_cast<int64_t>(h) * t.sh;
}
template <typename T>
__device__ __forceinline__ T* slice_out(const Tensor4& t, int b, int h) {
  return static_cast<T*>(t.ptr) + static_cast<int64_t>(b) * t.sb + static_cast<int64_t>(h) * t.sh;
}

// ---------------------------------------------------------------------------------------------
// Global -> shared: cp.async of rows n0 .. n0 + ROWS - 1 of one (b, h) slice (row stride sn elements),
// 16 bytes per copy, spread over THREADS threads. Rows >= N and chunks past head_dim are zero-filled
// (src-size 0, the source address then being the slice's first row: always valid).
// `s` is the tile's shared-space address (ptx::smem_u32); L its layout (PaddedRows<HDP> or CoreMatrices<ROWS>).
template <typename T, int ROWS, int HDP, int THREADS, class L = PaddedRows<HDP>>
__device__ __forceinline__ void issue_tile(uint32_t s, const T* x, int64_t sn, int n0, int N, int head_dim) {
  constexpr int CH = Row<HDP>::chunks;
#pragma unroll
  for (int i0 = 0; i0 < ROWS * CH; i0 += THREADS) {
    const int i = i0 + static_cast<int>(threadIdx.x);
    if (ROWS * CH % THREADS == 0 || i < ROWS * CH) {
      int r, c;
      L::copy_coord(i, r, c);
      const bool ok = n0 + r < N && 8 * c < head_dim;
      const T* src = ok ? x + static_cast<int64_t>(n0 + r) * sn + 8 * c : x;
      ptx::cp_async_cg_16(s + L::chunk(r, c), src, ok ? 16 : 0);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The RMSNorm + RoPE prologue (attention_params.cuh: Prologue), applied in place to the rows of a tile
// that cp.async has brought into shared memory (after the copies are waited for and a barrier; a barrier
// must follow before the tile is read). TPR = THREADS / ROWS consecutive lanes share a row, each taking
// every TPR-th 16-byte chunk; the row's sum of squares is a shuffle reduction over those lanes. The
// rotary partner of element 2i is 2i + 1, in the same chunk. Float32 math as the reference:
//   y = round(x * rsqrt(mean(x^2) + eps)) * weight;  out = round(y * cos + rotate_half(y) * sin).
template <typename T, int ROWS, int HDP, int THREADS, class L = PaddedRows<HDP>>
__device__ __forceinline__ void prologue_tile(T* s, int n0, int N, int head_dim, const float* weight, const float* cos,
                                              const float* sin, float eps) {
  constexpr int TPR = THREADS / ROWS;
  static_assert(TPR >= 1 && TPR <= 32 && (TPR & (TPR - 1)) == 0 && THREADS % ROWS == 0, "threads per row");
  const int r = static_cast<int>(threadIdx.x) / TPR, sub = static_cast<int>(threadIdx.x) % TPR;
  const int n = n0 + r;
  const int valid_chunks = head_dim / 8;
  unsigned char* base = reinterpret_cast<unsigned char*>(s);
  const auto chunk = [&](int c) { return reinterpret_cast<uint4*>(base + L::chunk(r, c)); };
  float rinv = 1.f;
  if (weight != nullptr) {  // uniform: every lane reaches the shuffles
    float ss = 0.f;
    for (int c = sub; c < valid_chunks; c += TPR) {
      const uint4 w = ptx::ld_shared(chunk(c));
      const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float a = lo_float<T>(u[j]), b = hi_float<T>(u[j]);
        ss += a * a + b * b;
      }
    }
#pragma unroll
    for (int off = TPR / 2; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    rinv = rsqrtf(ss / static_cast<float>(head_dim) + eps);
  }
  if (n >= N) return;  // zero rows stay zero (no shuffles below)
  for (int c = sub; c < valid_chunks; c += TPR) {
    const uint4 w = ptx::ld_shared(chunk(c));
    const uint32_t u[4] = {w.x, w.y, w.z, w.w};
    float v[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) v[2 * j] = lo_float<T>(u[j]), v[2 * j + 1] = hi_float<T>(u[j]);
    const int d0 = 8 * c;
    if (weight != nullptr) {
      const float4 w0 = *reinterpret_cast<const float4*>(weight + d0);
      const float4 w1 = *reinterpret_cast<const float4*>(weight + d0 + 4);
      const float wt[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = Elem<T>::to_float(Elem<T>::from_float(v[j] * rinv)) * wt[j];
    }
    if (cos != nullptr) {
      const float* cr = cos + static_cast<int64_t>(n) * head_dim + d0;
      const float* sr = sin + static_cast<int64_t>(n) * head_dim + d0;
      const float4 c0 = *reinterpret_cast<const float4*>(cr), c1 = *reinterpret_cast<const float4*>(cr + 4);
      const float4 s0 = *reinterpret_cast<const float4*>(sr), s1 = *reinterpret_cast<const float4*>(sr + 4);
      const float cc[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
      const float sn[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
#pragma unroll
      for (int j = 0; j < 8; j += 2) {
        const float a = v[j], b = v[j + 1];  // rotate_half on interleaved pairs: (-b, a)
        v[j] = a * cc[j] - b * sn[j];
        v[j + 1] = b * cc[j + 1] + a * sn[j + 1];
      }
    }
    const uint4 o = {pack_floats<T>(v[0], v[1]), pack_floats<T>(v[2], v[3]), pack_floats<T>(v[4], v[5]),
                     pack_floats<T>(v[6], v[7])};
    ptx::st_shared(chunk(c), o);
  }
}

// ---------------------------------------------------------------------------------------------
// Fragments (PTX ISA mma.m16n8k16 layouts) through ldmatrix, from [rows][HDP + 8] tiles addressed by their
// 32-bit shared-space address: each lane's row address is a per-lane offset (computed once) plus
// compile-time offsets, which the compiler folds into the LDSM immediates.

// A (16 x 16): matrices (rows 0-7 | 8-15) x (columns 0-7 | 8-15); lanes 0-15 give the rows of the left
// half, lanes 16-31 those of the right half. Byte offset of this lane's row.
template <int LD>
__device__ __forceinline__ uint32_t lane_off_a() {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  return static_cast<uint32_t>(((lane & 15) * LD + (lane >> 4) * 8) * 2);
}
// B fragments of two adjacent n-tiles for B = X^T, X row-major [n][k] (the K of Q K^T, the V of dO V^T):
// matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) -> b[0..1] of n-tile 0,
// b[2..3] of n-tile 1.
template <int LD>
__device__ __forceinline__ uint32_t lane_off_bt() {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  return static_cast<uint32_t>(((lane & 7) + ((lane >> 4) << 3)) * LD * 2 + ((lane >> 3) & 1) * 16);
}
// B fragments of two adjacent n-tiles for B = X, X row-major [k][n] (the V of P V, the K of dS K, the Q and
// dO of dS^T Q and P^T dO), by ldmatrix .trans: matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15),
// (k 8-15, n 8-15).
template <int LD>
__device__ __forceinline__ uint32_t lane_off_b() {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  return static_cast<uint32_t>(((lane & 7) + ((lane >> 3) & 1) * 8) * LD * 2 + (lane >> 4) * 16);
}

// The A fragment of columns 16 kk .. 16 kk + 15 of a 16 x (8 NT) float32 accumulator block, rounded to T:
// two adjacent C tiles hold exactly the elements of one A fragment.
template <typename T, int NT>
__device__ __forceinline__ void acc_to_a(uint32_t a[4], const float c[NT][4], int kk) {
  a[0] = pack_floats<T>(c[2 * kk][0], c[2 * kk][1]);
  a[1] = pack_floats<T>(c[2 * kk][2], c[2 * kk][3]);
  a[2] = pack_floats<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = pack_floats<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

template <int NT>
__device__ __forceinline__ void zero(float c[NT][4]) {
#pragma unroll
  for (int i = 0; i < NT; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.f;
}

// acc (16 x 8 NT) = the 16 rows at shared address a (16 x HDP) times the 8 NT rows at b (8 NT x HDP)^T,
// over the padded head dim.
template <typename T, int HDP, int NT>
__device__ __forceinline__ void gemm_rows_rows_t(float acc[NT][4], uint32_t a, uint32_t b) {
  constexpr int LD = Row<HDP>::ld;
  static_assert(NT % 2 == 0, "n-tiles come in pairs");
  const uint32_t pa = a + lane_off_a<LD>(), pb = b + lane_off_bt<LD>();
  zero<NT>(acc);
#pragma unroll
  for (int kk = 0; kk < HDP / 16; ++kk) {
    uint32_t af[4];
    ptx::ldmatrix_x4(af, pa + kk * 32);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t bf[4];
      ptx::ldmatrix_x4(bf, pb + np * 16 * LD * 2 + kk * 32);
      Elem<T>::mma(acc[2 * np], af, bf);
      Elem<T>::mma(acc[2 * np + 1], af, bf + 2);
    }
  }
}

// acc (16 x HDP) += P (16 x 16 KT, float32 accumulators rounded to T) times the 16 KT rows at b (16 KT x HDP).
template <typename T, int HDP, int KT>
__device__ __forceinline__ void gemm_acc_rows(float acc[HDP / 8][4], const float p[2 * KT][4], uint32_t b) {
  constexpr int LD = Row<HDP>::ld;
  const uint32_t pb = b + lane_off_b<LD>();
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    uint32_t af[4];
    acc_to_a<T, 2 * KT>(af, p, kk);
#pragma unroll
    for (int dp = 0; dp < HDP / 16; ++dp) {
      uint32_t bf[4];
      ptx::ldmatrix_x4_trans(bf, pb + kk * 16 * LD * 2 + dp * 32);
      Elem<T>::mma(acc[2 * dp], af, bf);
      Elem<T>::mma(acc[2 * dp + 1], af, bf + 2);
    }
  }
}

// Max and sum over the 4 lanes of a quad (the lanes that share the accumulator rows g, g + 8).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
// Accumulator column of element e (0..3) of n-tile nt.
__device__ __forceinline__ int acc_col(int nt, int e) {
  return 8 * nt + 2 * (static_cast<int>(threadIdx.x) & 3) + (e & 1);
}

// ---------------------------------------------------------------------------------------------
// Epilogue: a warp's 16 x HDP float32 block (rows row0.., times mul0 for rows g, mul1 for rows g + 8),
// staged in rows srow .. srow + 15 of a shared tile of layout L that only this warp uses (st.shared of
// element pairs, then __syncwarp), then written with 16-byte stores: rows < N, chunks < head_dim.
template <typename T, int HDP, class L = PaddedRows<HDP>>
__device__ __forceinline__ void store_acc_rows(const float acc[HDP / 8][4], T* tile, int srow, T* out, int64_t sn,
                                               int row0, int N, int head_dim, float mul0, float mul1) {
  constexpr int CH = Row<HDP>::chunks;
  unsigned char* base = reinterpret_cast<unsigned char*>(tile);
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int dt = 0; dt < HDP / 8; ++dt) {
    ptx::st_shared(reinterpret_cast<uint32_t*>(base + L::chunk(srow + g, dt) + 4 * t),
                   pack_floats<T>(acc[dt][0] * mul0, acc[dt][1] * mul0));
    ptx::st_shared(reinterpret_cast<uint32_t*>(base + L::chunk(srow + g + 8, dt) + 4 * t),
                   pack_floats<T>(acc[dt][2] * mul1, acc[dt][3] * mul1));
  }
  __syncwarp();
#pragma unroll
  for (int i0 = 0; i0 < 16 * CH; i0 += 32) {
    const int i = i0 + lane;
    if (16 * CH % 32 == 0 || i < 16 * CH) {
      const int r = i / CH, c = i % CH;
      const uint4 v = ptx::ld_shared(reinterpret_cast<const uint4*>(base + L::chunk(srow + r, c)));
      if (row0 + r < N && 8 * c < head_dim)
        *reinterpret_cast<uint4*>(out + static_cast<int64_t>(row0 + r) * sn + 8 * c) = v;
    }
  }
}

// The log-sum-exp of a warp's 16 rows (rows row0 + g and row0 + g + 8 of lane quad g), in natural log:
// m is the running max in log2 units, l the full row sum of exp2(s - m).
__device__ __forceinline__ void store_lse(const Params& p, int b, int h, int row0, int lane, const float m[2],
                                          float l0, float l1) {
  if ((lane & 3) != 0) return;
  float* lse = p.lse + (static_cast<int64_t>(b) * p.H + h) * p.N;
  const int g = lane >> 2;
  if (row0 + g < p.N) lse[row0 + g] = m[0] * kLn2 + logf(l0);
  if (row0 + g + 8 < p.N) lse[row0 + g + 8] = m[1] * kLn2 + logf(l1);
}

// ---- host side: launches ----
// One CTA of `threads` per (`tile_rows` rows of the sequence, head, batch item), with `smem` bytes of dynamic
// shared memory (allowed first: above 48 KiB a launch needs the attribute).
template <typename Kernel>
inline cudaError_t launch_row_tiles(Kernel kernel, int tile_rows, int threads, size_t smem, const Params& p,
                                    cudaStream_t stream) {
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((p.N + tile_rows - 1) / tile_rows), static_cast<unsigned>(p.H),
                  static_cast<unsigned>(p.B));
  return ptx::launch(kernel, grid, dim3(threads), smem, stream, p);
}

// `launch(std::integral_constant<int, HDP>{})` at the head dim the kernels compute at (attn::padded_head_dim:
// 72 runs as 80); cudaErrorInvalidValue for any other head dim.
template <typename Launch>
inline cudaError_t dispatch_padded_head_dim(int head_dim, Launch&& launch) {
  switch (attn::padded_head_dim(head_dim)) {
    case 64: return launch(std::integral_constant<int, 64>{});
    case 80: return launch(std::integral_constant<int, 80>{});
    case 96: return launch(std::integral_constant<int, 96>{});
    case 128: return launch(std::integral_constant<int, 128>{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace flash
}  // namespace vefast
