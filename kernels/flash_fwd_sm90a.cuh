// FlashAttention forward for sm_90a (Hopper): wgmma.mma_async with the accumulators in registers, cp.async
// tile loads, non-causal. Same math as flash_fwd.cuh: S = scale Q K^T, online softmax over 64-key tiles
// (float32 running max / sum, exp2 with log2 e folded into the scale), O = P V / l, lse = m ln 2 + ln l.
//
// CTA: 2 warpgroups (8 warps, 256 threads), 128 query rows (64 per warpgroup: warpgroup wg owns rows
// 64 wg .. 64 wg + 63, warp w rows 16 w .. 16 w + 15, the wgmma fragment rows); grid (ceil(N / 128), H, B).
// Shared memory, CoreMatrices layout (flash_common.cuh: the no-swizzle canonical wgmma layout, one 128-byte
// core matrix per 8 rows x 8 columns): Q [128 rows], K [2 stages][64 keys], V [2 stages][64 keys];
// (128 + 4 x 64) x HDP x 2 bytes = 48, 60, 72, 96 KiB at HDP 64, 80, 96, 128.
//
// Products (m64nNk16, A from registers, B by shared-memory descriptors):
//   S_j  = Q K_j^T: A = Q (ldmatrix'ed once into registers, HDP / 16 fragments), B = K_j, K-major
//          (core matrices adjacent in the head dim 64 x 16 bytes apart, adjacent in keys 128 bytes);
//          m64n64k16, HDP / 16 steps;
//   O   += P V_j:   A = P (the S accumulators after the softmax, rounded to T: the accumulator layout of
//          m64nN is the A layout of m64k16), B = V_j, N-major (adjacent in keys 128 bytes, in the head
//          dim 64 x 16 bytes); m64n{HDP}k16, 4 steps.
// Pipeline per key tile j (FlashAttention-3's intra-warpgroup overlap: the softmax of tile j runs while the
// tensor cores compute P_{j-1} V_{j-1}):
//   [prologue on K_j; fence.proxy.async; barrier]
//   issue S_j = Q K_j^T, commit; issue O += P_{j-1} V_{j-1}, commit; wait_group 1 (S_j done)
//   (the first tile, without a P V, is a separate copy of the loop body: no branch between a wgmma and
//   its wait, which would make ptxas serialize them)
//   softmax of S_j in registers: new max, P_j = exp2(S_j - m) in place, l, alpha = exp2(m_old - m)
//   wait_group 0 (P_{j-1} V_{j-1} done); O *= alpha; P_j -> 16-bit A fragments
//   cp.async wait (K_{j+1}, V_j landed); fence.proxy.async; barrier (every warpgroup done with K_j, V_{j-1})
//   issue cp.async K_{j+2} -> K stage j % 2, V_{j+1} -> V stage (j + 1) % 2, commit
// so every copy has a whole tile to land, and the last P V runs after the loop.
// Epilogue: O / l staged in the warp's own rows of sQ (CoreMatrices layout, conflict-free), 16-byte stores.
#pragma once

#include <type_traits>

#include "flash_common.cuh"

namespace vefast {
namespace flash {

struct Sm90aFwdConfig {
  static constexpr int kWarpGroups = 2;
  static constexpr int kThreads = 128 * kWarpGroups;
  static constexpr int kBlockM = 64 * kWarpGroups;  // query rows per CTA
  static constexpr int kBlockN = 64;                // keys per tile
  // CTAs per SM the register allocation targets (__launch_bounds__): 2 (<= 128 registers) at head dim 64,
  // where ptxas fits that without spilling; 1 above (hd 80 at 2 CTAs spills 80 bytes; 140-193 registers at 1).
  template <int HDP>
  static constexpr int min_blocks() {
    return HDP == 64 ? 2 : 1;
  }
};

template <int HDP>
constexpr size_t sm90a_fwd_smem_bytes() {
  using C = Sm90aFwdConfig;
  return static_cast<size_t>(core_tile_bytes<C::kBlockM, HDP>()) + 4 * core_tile_bytes<C::kBlockN, HDP>();
}

// The online-softmax update of one 16 x 64 score block of a warp (rows g, g + 8 of the lane, accumulator
// layout: s[4 nt + e] is column 8 nt + 2 (lane % 4) + e % 2, row + 8 (e / 2)): scales s into log2 units, masks
// keys >= N, updates the running max m and sum l, turns s into P = exp2(s - m) and returns in alpha the
// factors exp2(m_old - m) the output rows must be scaled by (not applied here: the output may be in flight).
__device__ __forceinline__ void softmax_tile(float (&s)[32], float m[2], float l[2], float alpha[2], float sl2, int n0,
                                             int N) {
  const bool ragged = n0 + Sm90aFwdConfig::kBlockN > N;
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float& x = s[4 * nt + e];
      x = (!ragged || n0 + acc_col(nt, e) < N) ? x * sl2 : -INFINITY;
      mx[e >> 1] = fmaxf(mx[e >> 1], x);
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float m_new = fmaxf(m[i], quad_max(mx[i]));  // finite: every tile holds a key < N
    alpha[i] = exp2f(m[i] - m_new);                    // 0 on the first tile (m = -inf)
    m[i] = m_new;
    l[i] *= alpha[i];
  }
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float& x = s[4 * nt + e];
      x = exp2f(x - m[e >> 1]);
      l[e >> 1] += x;
    }
  }
}

// S (the warpgroup's 64 x 64 block) = Q K^T over the padded head dim: HDP / 16 wgmma steps into s.
template <typename T, int HDP>
__device__ __forceinline__ void issue_qk(float (&s)[32], const uint32_t qf[HDP / 16][4], uint32_t uK) {
  using C = Sm90aFwdConfig;
  constexpr uint32_t kChunkCol = C::kBlockN * 16;  // bytes between 8-column chunks of a K tile (= LBO)
#pragma unroll
  for (int kk = 0; kk < HDP / 16; ++kk) {
    ptx::wgmma_rs<T, 64, 0>(s, qf[kk],
                            ptx::smem_desc(uK + 2 * kk * kChunkCol, kChunkCol, 128), kk > 0 ? 1 : 0);
  }
}

// O (the warpgroup's 64 x HDP block) += P V over the tile's 64 keys: 4 wgmma steps.
template <typename T, int HDP>
__device__ __forceinline__ void issue_pv(float (&o)[HDP / 2], const uint32_t pf[4][4], uint32_t uV) {
  using C = Sm90aFwdConfig;
  constexpr uint32_t kChunkCol = C::kBlockN * 16;  // bytes between 8-column chunks of a V tile (= SBO)
#pragma unroll
  for (int kk = 0; kk < C::kBlockN / 16; ++kk) {
    ptx::wgmma_rs<T, HDP, 1>(o, pf[kk],
                             ptx::smem_desc(uV + kk * 16 * 16, 128, kChunkCol), 1);
  }
}

template <typename T, int HDP>
__global__ void __launch_bounds__(Sm90aFwdConfig::kThreads, Sm90aFwdConfig::min_blocks<HDP>())
    flash_fwd_sm90a_kernel(const Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(VEFAST_CUDA_EMU)
  using C = Sm90aFwdConfig;
  using LQ = CoreMatrices<C::kBlockM>;
  using LKV = CoreMatrices<C::kBlockN>;
  constexpr uint32_t kQBytes = core_tile_bytes<C::kBlockM, HDP>();
  constexpr uint32_t kKVBytes = core_tile_bytes<C::kBlockN, HDP>();
  unsigned char* smem = ptx::dynamic_smem();
  T* sQ = reinterpret_cast<T*>(smem);
  const uint32_t uQ = ptx::smem_u32(smem), uK0 = uQ + kQBytes, uV0 = uK0 + 2 * kKVBytes;
  const int b = blockIdx.z, h = blockIdx.y;
  const int m0 = blockIdx.x * C::kBlockM;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int N = p.N, hd = p.head_dim;
  const int ntiles = (N + C::kBlockN - 1) / C::kBlockN;
  const float sl2 = p.scale * kLog2e;
  const T* q = slice<T>(p.q, b, h);
  const T* k = slice<T>(p.k, b, h);
  const T* v = slice<T>(p.v, b, h);
  const bool q_pro = p.pro.q_weight != nullptr || p.pro.cos != nullptr;
  const bool k_pro = p.pro.k_weight != nullptr || p.pro.cos != nullptr;

  // Copies: {Q, K_0}, then {K_1, V_0}.
  issue_tile<T, C::kBlockM, HDP, C::kThreads, LQ>(uQ, q, p.q.sn, m0, N, hd);
  issue_tile<T, C::kBlockN, HDP, C::kThreads, LKV>(uK0, k, p.k.sn, 0, N, hd);
  ptx::cp_async_commit();
  if (ntiles > 1) issue_tile<T, C::kBlockN, HDP, C::kThreads, LKV>(uK0 + kKVBytes, k, p.k.sn, C::kBlockN, N, hd);
  issue_tile<T, C::kBlockN, HDP, C::kThreads, LKV>(uV0, v, p.v.sn, 0, N, hd);
  ptx::cp_async_commit();
  ptx::cp_async_wait<1>();  // Q and K_0 landed
  ptx::fence_proxy_async();
  __syncthreads();
  if (q_pro) {
    prologue_tile<T, C::kBlockM, HDP, C::kThreads, LQ>(sQ, m0, N, hd, p.pro.q_weight, p.pro.cos, p.pro.sin,
                                                       p.pro.eps);
    __syncthreads();
  }
  // Q fragments of the warp's 16 rows (ldmatrix x4: rows 0-7 | 8-15 of chunks 2 kk | 2 kk + 1).
  uint32_t qf[HDP / 16][4];
#pragma unroll
  for (int kk = 0; kk < HDP / 16; ++kk)
    ptx::ldmatrix_x4(qf[kk], uQ + LQ::chunk(16 * warp + (lane & 15), 2 * kk + (lane >> 4)));

  float o[HDP / 2];
#pragma unroll
  for (int i = 0; i < HDP / 2; ++i) o[i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.f, 0.f};  // this lane's columns only; quad-summed at the end
  float s[32];
  uint32_t pf[4][4];        // P_{j-1} as A fragments (keys 16 kk .. 16 kk + 15)

  // One key tile. The first has no P V to overlap; it is peeled off (a branch between the issue of P V and
  // its wait_group would make ptxas serialize the wgmma of every tile: C7514).
  const auto tile = [&](auto first, int j) {
    constexpr bool kFirst = decltype(first)::value;
    const int n0 = j * C::kBlockN;
    const uint32_t uK = uK0 + (j & 1) * kKVBytes;
    if (k_pro) {
      prologue_tile<T, C::kBlockN, HDP, C::kThreads, LKV>(reinterpret_cast<T*>(smem + kQBytes + (j & 1) * kKVBytes),
                                                          n0, N, hd, p.pro.k_weight, p.pro.cos, p.pro.sin,
                                                          p.pro.eps);
      ptx::fence_proxy_async();
      __syncthreads();
    }
    ptx::fence_operands(s);
    ptx::wgmma_fence();
    issue_qk<T, HDP>(s, qf, uK);
    ptx::wgmma_commit();
    if constexpr (kFirst) {
      ptx::wgmma_wait<0>();
    } else {
      ptx::fence_operands(o);
      ptx::wgmma_fence();
      issue_pv<T, HDP>(o, pf, uV0 + ((j - 1) & 1) * kKVBytes);
      ptx::wgmma_commit();
      ptx::wgmma_wait<1>();  // S_j (P_{j-1} V_{j-1} may still run)
    }
    ptx::fence_operands(s);
    float alpha[2];
    softmax_tile(s, m, l, alpha, sl2, n0, N);
    if constexpr (!kFirst) {  // (on the first tile O is zero)
      ptx::wgmma_wait<0>();
      ptx::fence_operands(o);
#pragma unroll
      for (int dt = 0; dt < HDP / 8; ++dt) {
        o[4 * dt] *= alpha[0];
        o[4 * dt + 1] *= alpha[0];
        o[4 * dt + 2] *= alpha[1];
        o[4 * dt + 3] *= alpha[1];
      }
    }
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) acc_to_a<T, 8>(pf[kk], reinterpret_cast<const float(*)[4]>(s), kk);
    ptx::cp_async_wait<0>();  // K_{j+1}, V_j landed
    ptx::fence_proxy_async();
    __syncthreads();          // ... for every thread; every warpgroup is done with K_j and V_{j-1}
    if (j + 2 < ntiles) issue_tile<T, C::kBlockN, HDP, C::kThreads, LKV>(uK, k, p.k.sn, n0 + 2 * C::kBlockN, N, hd);
    if (j + 1 < ntiles) {
      issue_tile<T, C::kBlockN, HDP, C::kThreads, LKV>(uV0 + ((j + 1) & 1) * kKVBytes, v, p.v.sn, n0 + C::kBlockN, N,
                                                       hd);
    }
    ptx::cp_async_commit();
  };
  tile(std::true_type(), 0);
  for (int j = 1; j < ntiles; ++j) tile(std::false_type(), j);
  ptx::fence_operands(o);
  ptx::wgmma_fence();
  issue_pv<T, HDP>(o, pf, uV0 + ((ntiles - 1) & 1) * kKVBytes);
  ptx::wgmma_commit();
  ptx::wgmma_wait<0>();
  ptx::fence_operands(o);

  const float l0 = quad_sum(l[0]), l1 = quad_sum(l[1]);
  const int row0 = m0 + 16 * warp;
  // The warp's own 16 rows of sQ (read only by this warp since the barriers above) stage the output.
  store_acc_rows<T, HDP, LQ>(reinterpret_cast<const float(*)[4]>(o), sQ, 16 * warp, slice_out<T>(p.o, b, h), p.o.sn,
                             row0, N, hd, 1.f / l0, 1.f / l1);
  store_lse(p, b, h, row0, lane, m, l0, l1);
#else
  __trap();  // compiled for another architecture than sm_90a: never launched (attn::use_sm90a_forward)
#endif
}

template <typename T>
cudaError_t launch_flash_fwd_sm90a_dtype(const Params& p, cudaStream_t stream) {
  return dispatch_padded_head_dim(p.head_dim, [&](auto hdp) {
    constexpr int HDP = decltype(hdp)::value;
    return launch_row_tiles(flash_fwd_sm90a_kernel<T, HDP>, Sm90aFwdConfig::kBlockM, Sm90aFwdConfig::kThreads,
                            sm90a_fwd_smem_bytes<HDP>(), p, stream);
  });
}

}  // namespace flash
}  // namespace vefast
