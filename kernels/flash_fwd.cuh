// FlashAttention-2-class forward (sm_80+: cp.async, ldmatrix, mma.sync.m16n8k16), non-causal:
//   S = scale Q K^T, online softmax over 64-key tiles (float32 running max / sum, exp2 with log2 e folded
//   into the scale), O = P V / l, lse = m ln 2 + ln l per query row (natural log).
//
// CTA: 8 warps (256 threads), 128 query rows (16 per warp), grid (ceil(N / 128), H, B), query tiles
// fastest so that the CTAs of one head share its K / V tiles in L2.
// Shared memory: Q [128][HDP + 8], K [64][HDP + 8], V [64][HDP + 8] (16-bit); 52-68 KiB.
// Pipeline (FlashAttention-2's alternation of the K and V buffers, all copies cp.async 16 B):
//     issue Q, commit; issue K_0, commit; [prologue on Q]
//     for each key tile j:
//       wait_group 0; barrier          K_j landed; every warp is done with V_{j-1}
//       issue V_j, commit              (lands while S = Q K_j^T and the softmax run)
//       [prologue on K_j; barrier]
//       S = Q K_j^T (ldmatrix from sQ, sK); mask keys >= N; online softmax
//       wait_group 0; barrier          V_j landed; every warp is done with K_j
//       issue K_{j+1}, commit          (lands while O += P V_j runs)
//       O += P V_j (P from the S accumulators in registers, V by ldmatrix.trans)
//   epilogue: O / l staged in the warp's rows of sQ, 16-byte stores; lse.
#pragma once

#include "flash_common.cuh"

namespace vefast {
namespace flash {

struct FwdConfig {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;  // query rows per CTA
  static constexpr int kBlockN = 64;           // keys per tile
  // CTAs per SM the register allocation targets (__launch_bounds__): 2 (<= 128 registers) where that
  // spills nothing (head dims 64, 96: ptxas sm_80 / sm_90), else 1 (80: 147 registers, 128: 188).
  template <int HDP>
  static constexpr int min_blocks() {
    return (HDP == 64 || HDP == 96) ? 2 : 1;
  }
};

template <int HDP>
constexpr size_t fwd_smem_bytes() {
  return static_cast<size_t>(tile_elems<FwdConfig::kBlockM, HDP>() + 2 * tile_elems<FwdConfig::kBlockN, HDP>()) * 2;
}

// Online-softmax step for one 16 x 64 score block of a warp (rows g, g + 8 of the lane): scales s into log2
// units, masks keys >= N, updates the running max m and sum l, rescales o, and turns s into P (unnormalized).
template <int HDP>
__device__ __forceinline__ void softmax_step(float s[8][4], float o[HDP / 8][4], float m[2], float l[2], float sl2,
                                             int n0, int N) {
  const bool ragged = n0 + FwdConfig::kBlockN > N;
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[nt][e] = (!ragged || n0 + acc_col(nt, e) < N) ? s[nt][e] * sl2 : -INFINITY;
      mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float m_new = fmaxf(m[i], quad_max(mx[i]));  // finite: every tile holds a key < N
    const float alpha = exp2f(m[i] - m_new);           // 0 on the first tile (m = -inf)
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
}

template <typename T, int HDP>
__global__ void __launch_bounds__(FwdConfig::kThreads, FwdConfig::min_blocks<HDP>())
    flash_fwd_kernel(const Params p) {
  using C = FwdConfig;
  T* sQ = reinterpret_cast<T*>(ptx::dynamic_smem());
  T* sK = sQ + tile_elems<C::kBlockM, HDP>();
  T* sV = sK + tile_elems<C::kBlockN, HDP>();
  const uint32_t uQ = ptx::smem_u32(sQ), uK = ptx::smem_u32(sK), uV = ptx::smem_u32(sV);
  const int b = blockIdx.z, h = blockIdx.y;
  const int m0 = blockIdx.x * C::kBlockM;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int N = p.N, hd = p.head_dim;
  const float sl2 = p.scale * kLog2e;
  const T* q = slice<T>(p.q, b, h);
  const T* k = slice<T>(p.k, b, h);
  const T* v = slice<T>(p.v, b, h);
  const bool q_pro = p.pro.q_weight != nullptr || p.pro.cos != nullptr;
  const bool k_pro = p.pro.k_weight != nullptr || p.pro.cos != nullptr;

  issue_tile<T, C::kBlockM, HDP, C::kThreads>(uQ, q, p.q.sn, m0, N, hd);
  ptx::cp_async_commit();
  issue_tile<T, C::kBlockN, HDP, C::kThreads>(uK, k, p.k.sn, 0, N, hd);
  ptx::cp_async_commit();
  if (q_pro) {
    ptx::cp_async_wait<1>();  // Q landed (K_0 may still be in flight)
    __syncthreads();
    prologue_tile<T, C::kBlockM, HDP, C::kThreads>(sQ, m0, N, hd, p.pro.q_weight, p.pro.cos, p.pro.sin, p.pro.eps);
  }

  float o[HDP / 8][4];
  zero<HDP / 8>(o);
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.f, 0.f};  // this lane's columns only; quad-summed at the end

  for (int n0 = 0; n0 < N; n0 += C::kBlockN) {
    ptx::cp_async_wait<0>();
    __syncthreads();
    issue_tile<T, C::kBlockN, HDP, C::kThreads>(uV, v, p.v.sn, n0, N, hd);
    ptx::cp_async_commit();
    if (k_pro) {
      prologue_tile<T, C::kBlockN, HDP, C::kThreads>(sK, n0, N, hd, p.pro.k_weight, p.pro.cos, p.pro.sin, p.pro.eps);
      __syncthreads();
    }
    float s[8][4];
    gemm_rows_rows_t<T, HDP, 8>(s, uQ + 16 * warp * Row<HDP>::ld * 2, uK);
    softmax_step<HDP>(s, o, m, l, sl2, n0, N);
    ptx::cp_async_wait<0>();
    __syncthreads();
    if (n0 + C::kBlockN < N) {
      issue_tile<T, C::kBlockN, HDP, C::kThreads>(uK, k, p.k.sn, n0 + C::kBlockN, N, hd);
      ptx::cp_async_commit();
    }
    gemm_acc_rows<T, HDP, 4>(o, s, uV);
  }

  const float l0 = quad_sum(l[0]), l1 = quad_sum(l[1]);
  const int row0 = m0 + 16 * warp;
  // The warp's own 16 rows of sQ (read only by this warp) stage the output.
  store_acc_rows<T, HDP>(o, sQ, 16 * warp, slice_out<T>(p.o, b, h), p.o.sn, row0, N, hd, 1.f / l0,
                         1.f / l1);
  store_lse(p, b, h, row0, lane, m, l0, l1);
}

template <typename T>
cudaError_t launch_flash_fwd_dtype(const Params& p, cudaStream_t stream) {
  return dispatch_padded_head_dim(p.head_dim, [&](auto hdp) {
    constexpr int HDP = decltype(hdp)::value;
    return launch_row_tiles(flash_fwd_kernel<T, HDP>, FwdConfig::kBlockM, FwdConfig::kThreads,
                            fwd_smem_bytes<HDP>(), p, stream);
  });
}

}  // namespace flash
}  // namespace vefast
