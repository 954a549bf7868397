// FlashAttention-2-class backward (sm_80+), deterministic (no atomics), in two passes:
//   D = rowsum(dO * O) (float32, written to p.dsum by the dQ pass), P = exp2(S log2(e) - lse log2(e)),
//   dV = P^T dO, dP = dO V^T, dS = P (dP - D), dQ = scale dS K, dK = scale dS^T Q.
//
// dQ pass (flash_bwd_dq_kernel): a CTA of 8 warps owns 128 query rows (16 per warp); it computes D for its
//   rows from O (global, 16-byte loads) and dO (shared), then loops over 64-key tiles with K and V
//   double-buffered (the copies of tile j + 1 run during tile j): S = Q K^T, dP = dO V^T, dS, dQ += dS K.
// dK/dV pass (flash_bwd_dkdv_kernel): a CTA of 8 warps owns 128 keys (16 per warp) and loops over query
//   tiles of kBlockM rows (64; 32 at head dim 128, for registers) with Q, dO, lse and D double-buffered:
//   S^T = K Q^T, dP^T = V dO^T, P^T, dS^T, dV += P^T dO, dK += dS^T Q.
// The RMSNorm / RoPE prologue is applied in shared memory to every Q and K tile (after its copies land),
// as in the forward; dq and dk are the gradients w.r.t. the normalized, rotated q and k.
// The dQ pass must run before the dK/dV pass (same stream): the latter reads D from p.dsum.
#pragma once

#include "flash_common.cuh"

namespace vefast {
namespace flash {

struct DqConfig {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;  // query rows per CTA
  static constexpr int kBlockN = 64;           // keys per tile
};

template <int HDP>
struct DkdvConfig {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockN = 16 * kWarps;          // keys per CTA
  static constexpr int kBlockM = HDP >= 128 ? 32 : 64;  // queries per tile
};

template <int HDP>
constexpr size_t dq_smem_bytes() {
  using C = DqConfig;
  return static_cast<size_t>(2 * tile_elems<C::kBlockM, HDP>() + 4 * tile_elems<C::kBlockN, HDP>()) * 2 +
         2 * C::kBlockM * sizeof(float);
}
template <int HDP>
constexpr size_t dkdv_smem_bytes() {
  using C = DkdvConfig<HDP>;
  return static_cast<size_t>(2 * tile_elems<C::kBlockN, HDP>() + 4 * tile_elems<C::kBlockM, HDP>()) * 2 +
         4 * C::kBlockM * sizeof(float);
}

__device__ __forceinline__ bool has_q_prologue(const Params& p) {
  return p.pro.q_weight != nullptr || p.pro.cos != nullptr;
}
__device__ __forceinline__ bool has_k_prologue(const Params& p) {
  return p.pro.k_weight != nullptr || p.pro.cos != nullptr;
}

// D = rowsum(dO * O) for the 16 rows row0.. of a warp (dO from the warp's rows of the shared tile sdo, O from
// global memory): lanes 2r, 2r + 1 share row r. Returns D of row lane / 2 (0 past N) in both lanes.
template <typename T, int HDP>
__device__ __forceinline__ float warp_rowsum_do_o(const T* sdo, const T* o, int64_t o_sn, int row0, int N,
                                                  int head_dim) {
  constexpr int LD = Row<HDP>::ld;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int r = lane >> 1;
  float acc = 0.f;
  if (row0 + r < N) {
    const T* orow = o + static_cast<int64_t>(row0 + r) * o_sn;
    for (int c = lane & 1; c < head_dim / 8; c += 2) {
      const uint4 a = ptx::ld_shared(reinterpret_cast<const uint4*>(sdo + r * LD + 8 * c));
      const uint4 b = *reinterpret_cast<const uint4*>(orow + 8 * c);
      const uint32_t ua[4] = {a.x, a.y, a.z, a.w}, ub[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        acc += lo_float<T>(ua[j]) * lo_float<T>(ub[j]) + hi_float<T>(ua[j]) * hi_float<T>(ub[j]);
      }
    }
  }
  return acc + __shfl_xor_sync(0xffffffffu, acc, 1);
}

// ---------------------------------------------------------------------------------------------
// dQ pass (and D).
template <typename T, int HDP>
__global__ void __launch_bounds__(DqConfig::kThreads, 1) flash_bwd_dq_kernel(const Params p) {
  using C = DqConfig;
  constexpr int LD = Row<HDP>::ld;
  T* sQ = reinterpret_cast<T*>(ptx::dynamic_smem());
  T* sdO = sQ + tile_elems<C::kBlockM, HDP>();
  T* sK0 = sdO + tile_elems<C::kBlockM, HDP>();  // stages: sK0 + s * tile, sV0 + s * tile
  T* sV0 = sK0 + 2 * tile_elems<C::kBlockN, HDP>();
  float* sD = reinterpret_cast<float*>(sV0 + 2 * tile_elems<C::kBlockN, HDP>());
  float* sL = sD + C::kBlockM;
  constexpr uint32_t kTileN = tile_elems<C::kBlockN, HDP>() * 2;  // bytes of a K or V stage
  const uint32_t uQ = ptx::smem_u32(sQ), udO = ptx::smem_u32(sdO), uK0 = ptx::smem_u32(sK0),
                 uV0 = ptx::smem_u32(sV0);
  const int b = blockIdx.z, h = blockIdx.y;
  const int m0 = blockIdx.x * C::kBlockM;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int N = p.N, hd = p.head_dim;
  const float sl2 = p.scale * kLog2e;
  const T* k = slice<T>(p.k, b, h);
  const T* v = slice<T>(p.v, b, h);
  const int64_t bh = (static_cast<int64_t>(b) * p.H + h) * N;

  issue_tile<T, C::kBlockM, HDP, C::kThreads>(uQ, slice<T>(p.q, b, h), p.q.sn, m0, N, hd);
  issue_tile<T, C::kBlockM, HDP, C::kThreads>(udO, slice<T>(p.dout, b, h), p.dout.sn, m0, N, hd);
  ptx::cp_async_commit();
  issue_tile<T, C::kBlockN, HDP, C::kThreads>(uK0, k, p.k.sn, 0, N, hd);
  issue_tile<T, C::kBlockN, HDP, C::kThreads>(uV0, v, p.v.sn, 0, N, hd);
  ptx::cp_async_commit();
  for (int r = threadIdx.x; r < C::kBlockM; r += C::kThreads)
    ptx::st_shared(sL + r, m0 + r < N ? p.lse[bh + m0 + r] * kLog2e : 0.f);
  ptx::cp_async_wait<1>();  // Q and dO landed
  __syncthreads();
  if (has_q_prologue(p)) {
    prologue_tile<T, C::kBlockM, HDP, C::kThreads>(sQ, m0, N, hd, p.pro.q_weight, p.pro.cos, p.pro.sin, p.pro.eps);
  }
  // D of the warp's rows: into sD (its own rows: read back after __syncwarp) and p.dsum for the dK/dV pass.
  const int row0 = m0 + 16 * warp;
  {
    const float d = warp_rowsum_do_o<T, HDP>(sdO + 16 * warp * LD, slice<T>(p.o, b, h), p.o.sn, row0, N, hd);
    if ((lane & 1) == 0) {
      ptx::st_shared(sD + 16 * warp + (lane >> 1), d);
      if (row0 + (lane >> 1) < N) p.dsum[bh + row0 + (lane >> 1)] = d;
    }
  }
  __syncwarp();
  const float dlt[2] = {ptx::ld_shared(sD + 16 * warp + g), ptx::ld_shared(sD + 16 * warp + g + 8)};
  const float lse2[2] = {ptx::ld_shared(sL + 16 * warp + g), ptx::ld_shared(sL + 16 * warp + g + 8)};

  float dq[HDP / 8][4];
  zero<HDP / 8>(dq);
  const bool k_pro = has_k_prologue(p);
  for (int n0 = 0, stage = 0; n0 < N; n0 += C::kBlockN, stage ^= 1) {
    T* sK = sK0 + stage * tile_elems<C::kBlockN, HDP>();
    const uint32_t uK = uK0 + stage * kTileN, uV = uV0 + stage * kTileN;
    ptx::cp_async_wait<0>();  // tile n0 landed
    __syncthreads();          // ... for every thread; every warp is done with the other stage
    if (n0 + C::kBlockN < N) {
      issue_tile<T, C::kBlockN, HDP, C::kThreads>(uK0 + (stage ^ 1) * kTileN, k, p.k.sn, n0 + C::kBlockN, N, hd);
      issue_tile<T, C::kBlockN, HDP, C::kThreads>(uV0 + (stage ^ 1) * kTileN, v, p.v.sn, n0 + C::kBlockN, N, hd);
      ptx::cp_async_commit();
    }
    if (k_pro) {
      prologue_tile<T, C::kBlockN, HDP, C::kThreads>(sK, n0, N, hd, p.pro.k_weight, p.pro.cos, p.pro.sin, p.pro.eps);
      __syncthreads();
    }
    float s[8][4], dp[8][4];
    const uint32_t wrow = 16 * warp * LD * 2;  // the warp's 16 rows
    gemm_rows_rows_t<T, HDP, 8>(s, uQ + wrow, uK);    // Q K^T
    gemm_rows_rows_t<T, HDP, 8>(dp, udO + wrow, uV);  // dO V^T
    const bool ragged = n0 + C::kBlockN > N;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e >> 1;
        const float pr = (!ragged || n0 + acc_col(nt, e) < N) ? exp2f(s[nt][e] * sl2 - lse2[i]) : 0.f;
        s[nt][e] = pr * (dp[nt][e] - dlt[i]);  // dS
      }
    }
    gemm_acc_rows<T, HDP, 4>(dq, s, uK);  // dQ += dS K
  }
  store_acc_rows<T, HDP>(dq, sQ, 16 * warp, slice_out<T>(p.dq, b, h), p.dq.sn, row0, N, hd, p.scale, p.scale);
}

// ---------------------------------------------------------------------------------------------
// dK / dV pass.

// lse * log2(e) and D of query rows m0 .. m0 + BM - 1 into shared memory (0 past N).
template <int BM, int THREADS>
__device__ __forceinline__ void load_row_stats(float* sl, float* sd, const float* lse, const float* dsum, int m0,
                                               int N) {
  for (int r = threadIdx.x; r < BM; r += THREADS) {
    const bool ok = m0 + r < N;
    ptx::st_shared(sl + r, ok ? lse[m0 + r] * kLog2e : 0.f);
    ptx::st_shared(sd + r, ok ? dsum[m0 + r] : 0.f);
  }
}

template <typename T, int HDP>
__global__ void __launch_bounds__(DkdvConfig<HDP>::kThreads, 1) flash_bwd_dkdv_kernel(const Params p) {
  using C = DkdvConfig<HDP>;
  constexpr int BM = C::kBlockM;
  constexpr int NT = BM / 8;  // n-tiles of the transposed score block (16 keys x BM queries)
  constexpr int LD = Row<HDP>::ld;
  T* sK = reinterpret_cast<T*>(ptx::dynamic_smem());
  T* sV = sK + tile_elems<C::kBlockN, HDP>();
  T* sQ0 = sV + tile_elems<C::kBlockN, HDP>();   // stages: sQ0 + s * tile, sdO0 + s * tile
  T* sdO0 = sQ0 + 2 * tile_elems<BM, HDP>();
  float* sL0 = reinterpret_cast<float*>(sdO0 + 2 * tile_elems<BM, HDP>());  // stages: sL0 + s * BM
  float* sD0 = sL0 + 2 * BM;
  constexpr uint32_t kTileM = tile_elems<BM, HDP>() * 2;  // bytes of a Q or dO stage
  const uint32_t uK = ptx::smem_u32(sK), uV = ptx::smem_u32(sV), uQ0 = ptx::smem_u32(sQ0),
                 udO0 = ptx::smem_u32(sdO0);
  const int b = blockIdx.z, h = blockIdx.y;
  const int k0 = blockIdx.x * C::kBlockN;
  const int warp = threadIdx.x >> 5;
  const int N = p.N, hd = p.head_dim;
  const float sl2 = p.scale * kLog2e;
  const T* q = slice<T>(p.q, b, h);
  const T* dout = slice<T>(p.dout, b, h);
  const int64_t bh = (static_cast<int64_t>(b) * p.H + h) * N;

  issue_tile<T, C::kBlockN, HDP, C::kThreads>(uK, slice<T>(p.k, b, h), p.k.sn, k0, N, hd);
  issue_tile<T, C::kBlockN, HDP, C::kThreads>(uV, slice<T>(p.v, b, h), p.v.sn, k0, N, hd);
  ptx::cp_async_commit();
  issue_tile<T, BM, HDP, C::kThreads>(uQ0, q, p.q.sn, 0, N, hd);
  issue_tile<T, BM, HDP, C::kThreads>(udO0, dout, p.dout.sn, 0, N, hd);
  ptx::cp_async_commit();
  load_row_stats<BM, C::kThreads>(sL0, sD0, p.lse + bh, p.dsum + bh, 0, N);
  if (has_k_prologue(p)) {
    ptx::cp_async_wait<1>();  // K and V landed
    __syncthreads();
    prologue_tile<T, C::kBlockN, HDP, C::kThreads>(sK, k0, N, hd, p.pro.k_weight, p.pro.cos, p.pro.sin, p.pro.eps);
  }

  float dk[HDP / 8][4], dv[HDP / 8][4];
  zero<HDP / 8>(dk);
  zero<HDP / 8>(dv);
  const bool q_pro = has_q_prologue(p);
  for (int m0 = 0, stage = 0; m0 < N; m0 += BM, stage ^= 1) {
    T* sQ = sQ0 + stage * tile_elems<BM, HDP>();
    const uint32_t uQ = uQ0 + stage * kTileM, udO = udO0 + stage * kTileM;
    const float* sL = sL0 + stage * BM;
    const float* sD = sD0 + stage * BM;
    ptx::cp_async_wait<0>();
    __syncthreads();  // tile m0 (and its row stats) complete; every warp is done with the other stage
    if (m0 + BM < N) {
      const int s1 = stage ^ 1;
      issue_tile<T, BM, HDP, C::kThreads>(uQ0 + s1 * kTileM, q, p.q.sn, m0 + BM, N, hd);
      issue_tile<T, BM, HDP, C::kThreads>(udO0 + s1 * kTileM, dout, p.dout.sn, m0 + BM, N, hd);
      ptx::cp_async_commit();
      load_row_stats<BM, C::kThreads>(sL0 + s1 * BM, sD0 + s1 * BM, p.lse + bh, p.dsum + bh, m0 + BM, N);
    }
    if (q_pro) {
      prologue_tile<T, BM, HDP, C::kThreads>(sQ, m0, N, hd, p.pro.q_weight, p.pro.cos, p.pro.sin, p.pro.eps);
      __syncthreads();
    }
    float st[NT][4], dpt[NT][4];
    const uint32_t wrow = 16 * warp * LD * 2;  // the warp's 16 keys
    gemm_rows_rows_t<T, HDP, NT>(st, uK + wrow, uQ);    // K Q^T = S^T
    gemm_rows_rows_t<T, HDP, NT>(dpt, uV + wrow, udO);  // V dO^T = dP^T
    const bool ragged = m0 + BM > N;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int c = acc_col(nt, 0);  // query of elements 0, 2 (c + 1: elements 1, 3)
      const float2 l2 = {ptx::ld_shared(sL + c), ptx::ld_shared(sL + c + 1)};
      const float2 d2 = {ptx::ld_shared(sD + c), ptx::ld_shared(sD + c + 1)};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool ok = !ragged || m0 + c + (e & 1) < N;
        const float pr = ok ? exp2f(st[nt][e] * sl2 - ((e & 1) ? l2.y : l2.x)) : 0.f;  // P^T
        st[nt][e] = pr;
        dpt[nt][e] = pr * (dpt[nt][e] - ((e & 1) ? d2.y : d2.x));  // dS^T
      }
    }
    gemm_acc_rows<T, HDP, BM / 16>(dv, st, udO);  // dV += P^T dO
    gemm_acc_rows<T, HDP, BM / 16>(dk, dpt, uQ);  // dK += dS^T Q
  }
  const int row0 = k0 + 16 * warp;  // the warp's own rows of sK / sV stage the results
  store_acc_rows<T, HDP>(dk, sK, 16 * warp, slice_out<T>(p.dk, b, h), p.dk.sn, row0, N, hd, p.scale, p.scale);
  store_acc_rows<T, HDP>(dv, sV, 16 * warp, slice_out<T>(p.dv, b, h), p.dv.sn, row0, N, hd, 1.f, 1.f);
}

// ---------------------------------------------------------------------------------------------
// Launchers.
// dQ (with D = rowsum(dO o O)) per Q tile, then dK / dV per K tile, on one stream.
template <typename T>
cudaError_t launch_flash_bwd_dtype(const Params& p, cudaStream_t stream) {
  return dispatch_padded_head_dim(p.head_dim, [&](auto hdp) {
    constexpr int HDP = decltype(hdp)::value;
    using KV = DkdvConfig<HDP>;
    const cudaError_t err = launch_row_tiles(flash_bwd_dq_kernel<T, HDP>, DqConfig::kBlockM, DqConfig::kThreads,
                                             dq_smem_bytes<HDP>(), p, stream);
    if (err != cudaSuccess) return err;
    return launch_row_tiles(flash_bwd_dkdv_kernel<T, HDP>, KV::kBlockN, KV::kThreads, dkdv_smem_bytes<HDP>(), p,
                            stream);
  });
}

}  // namespace flash
}  // namespace vefast
