// The emulated counterparts of kernels/ptx.cuh (same names and signatures), built on the cuda_emu runtime.
// Included by kernels/ptx.cuh when VEFAST_CUDA_EMU is defined.
#pragma once

#include <stdint.h>
#include <string.h>

#include <type_traits>
#include <utility>

#include "cuda_emu.h"

namespace vefast {
namespace ptx {

inline unsigned char* dynamic_smem() { return ::cuda_emu::dynamic_smem(); }
// Shared-space addresses are offsets into the block's dynamic shared memory.
inline uint32_t smem_u32(const void* p) {
  ::cuda_emu::check_shared(p, 0, 1, "smem_u32");
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - ::cuda_emu::dynamic_smem());
}
inline const void* smem_ptr(uint32_t a) { return ::cuda_emu::dynamic_smem() + a; }

namespace detail {
inline void mma(float d[4], const uint32_t a[4], const uint32_t b[2], int type) {
  ::cuda_emu::LaneIO io;
  for (int i = 0; i < 4; ++i) io.a[i] = a[i], io.c[i] = d[i];
  io.b[0] = b[0];
  io.b[1] = b[1];
  io.mma_type = type;
  ::cuda_emu::warp_collective(::cuda_emu::Op::kMma, 0xffffffffu, io);
  for (int i = 0; i < 4; ++i) d[i] = io.d[i];
}
inline void ldmatrix(uint32_t* r, const void* p, int num, bool trans) {
  ::cuda_emu::LaneIO io;
  io.ptr = p;
  io.param = num | (trans ? 8 : 0);
  ::cuda_emu::warp_collective(::cuda_emu::Op::kLdmatrix, 0xffffffffu, io);
  for (int i = 0; i < num; ++i) r[i] = io.r[i];
}
}  // namespace detail

inline void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2]) { detail::mma(d, a, b, 0); }
inline void mma_m16n8k16_f16(float d[4], const uint32_t a[4], const uint32_t b[2]) { detail::mma(d, a, b, 1); }

inline void ldmatrix_x1(uint32_t r[1], const void* p) { detail::ldmatrix(r, p, 1, false); }
inline void ldmatrix_x2(uint32_t r[2], const void* p) { detail::ldmatrix(r, p, 2, false); }
inline void ldmatrix_x4(uint32_t r[4], const void* p) { detail::ldmatrix(r, p, 4, false); }
inline void ldmatrix_x1_trans(uint32_t r[1], const void* p) { detail::ldmatrix(r, p, 1, true); }
inline void ldmatrix_x2_trans(uint32_t r[2], const void* p) { detail::ldmatrix(r, p, 2, true); }
inline void ldmatrix_x4_trans(uint32_t r[4], const void* p) { detail::ldmatrix(r, p, 4, true); }

inline void ldmatrix_x4(uint32_t r[4], uint32_t a) { detail::ldmatrix(r, smem_ptr(a), 4, false); }
inline void ldmatrix_x4_trans(uint32_t r[4], uint32_t a) { detail::ldmatrix(r, smem_ptr(a), 4, true); }

inline void cp_async_cg_16(uint32_t dst, const void* src, int src_bytes = 16) {
  ::cuda_emu::cp_async(const_cast<void*>(smem_ptr(dst)), src, 16, src_bytes, "cp.async.cg");
}
inline void cp_async_cg_16(void* dst, const void* src, int src_bytes = 16) {
  ::cuda_emu::cp_async(dst, src, 16, src_bytes, "cp.async.cg");
}
inline void cp_async_ca_16(void* dst, const void* src, int src_bytes = 16) {
  ::cuda_emu::cp_async(dst, src, 16, src_bytes, "cp.async.ca");
}
inline void cp_async_commit() { ::cuda_emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  ::cuda_emu::cp_async_wait(N);
}

template <typename T, int N, int kTransB>
inline void wgmma_rs(float (&d)[N / 2], const uint32_t a[4], uint64_t desc_b, int scale_d) {
  static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value, "wgmma: bf16 or fp16");
  ::cuda_emu::WgmmaIO io;
  io.n = N;
  io.type = std::is_same<T, __half>::value ? 1 : 0;
  for (int i = 0; i < 4; ++i) io.a[i] = a[i];
  io.desc_b = desc_b;
  io.scale_d = scale_d;
  io.tnsp_b = kTransB;
  io.d = d;
  ::cuda_emu::wgmma_mma_async(io);
}
inline void wgmma_fence() { ::cuda_emu::wgmma_fence(); }
inline void wgmma_commit() { ::cuda_emu::wgmma_commit_group(); }
template <int N>
inline void wgmma_wait() {
  ::cuda_emu::wgmma_wait_group(N);
}
template <int M>
inline void fence_operands(float (&)[M]) {}
inline void fence_proxy_async() { ::cuda_emu::fence_proxy_async(); }

template <typename T>
inline T ld_shared(const T* p) {
  ::cuda_emu::shared_read(p, sizeof(T), "ld_shared");
  T v;
  memcpy(&v, p, sizeof(T));
  return v;
}
template <typename T>
inline void st_shared(T* p, T v) {
  ::cuda_emu::shared_write(p, sizeof(T), "st_shared");
  memcpy(p, &v, sizeof(T));
}

template <typename... Params, typename... Args>
inline cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args&&... args) {
  return ::cuda_emu::launch_kernel(kernel, grid, block, smem, stream, std::forward<Args>(args)...);
}

}  // namespace ptx
}  // namespace vefast
