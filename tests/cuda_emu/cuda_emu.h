// cuda_emu: run CUDA kernel sources on the CPU, compiled by the host C++ compiler (what TRITON_INTERPRET=1
// is for Triton). Build with -DVEFAST_CUDA_EMU -I tests/cuda_emu/shim -I tests/cuda_emu: the shim headers
// <cuda_runtime.h>, <cuda_bf16.h>, <cuda_fp16.h>, <cuda_runtime_api.h> all land here, and kernels/ptx.cuh
// includes ptx_emu.h instead of its inline PTX.
//
// Execution model (runtime in cuda_emu.cpp):
// - One fiber (a user-level thread with its own stack) per CUDA thread; the blocks of a grid run one after
//   another on the calling OS thread. A fiber runs until it reaches a synchronization point
//   (__syncthreads, a warp collective: shuffle, vote, __syncwarp, ldmatrix, mma); the scheduler then picks
//   the next fiber at random among the runnable ones (seeded: set_seed), so the order in which threads run
//   between two barriers changes from run to run and from seed to seed.
// - Warp collectives require all 32 lanes of the warp, with the same operation and the full mask
//   (partial masks are refused with an error); a lane waiting at a collective while another lane of its
//   warp waits at __syncthreads, or has exited, is reported as a deadlock naming the threads.
// - Shared memory: dynamic shared memory only (kernels obtain it through dynamic_smem() of kernels/ptx.cuh),
//   filled with 0xFF bytes (NaN in bf16, fp16 and fp32) before every block and followed by an inaccessible
//   page, so reading past the launch's dynamic size faults. Static `__shared__` variables are emulated as
//   `static thread_local` (one instance, shared by the threads of the block that runs) but are neither
//   poisoned nor race-checked: the kernels of this project use none.
// - Shared-memory race detector: every access made through the emulated instructions (ldmatrix, cp.async
//   issue and completion) and through ld_shared / st_shared of kernels/ptx.cuh is recorded per byte with the
//   barrier epoch and the warp's collective epoch; a read or write of a byte that another thread wrote (or,
//   for a write, read) in the same epoch is reported as a data race (threads of one warp are ordered by the
//   warp collectives between them). Plain C++ dereferences of shared memory are not seen by the detector.
// - Errors (races, deadlocks, misaligned or non-shared ldmatrix / cp.async addresses, bad launches) make
//   launch_kernel throw cuda_emu::Error with a message naming block, thread and operation.
//
// Numerics, and where they differ from the hardware:
// - __half / __nv_bfloat16 conversions from float round to nearest even (as __float2half_rn /
//   __float2bfloat16_rn), including subnormals and overflow to infinity; NaN converts to a quiet NaN.
// - mma.m16n8k16 with float32 accumulation: the exact products of the 16-bit inputs are summed in double
//   and added to C, then rounded once to float32. The tensor cores sum in an unspecified order with
//   truncation inside the adder tree, so hardware results differ in the last bits of float32.
// - exp2f, expf, logf, rsqrtf, __expf, __logf, __fdividef are the host libm functions (correctly rounded or
//   nearly). nvcc --use_fast_math turns them into the approximate MUFU instructions (ex2.approx.ftz,
//   lg2.approx.ftz, rsqrt.approx: about 2 ulp) and flushes float32 subnormals to zero; the emulator keeps
//   IEEE subnormals. The differences are far below the tolerances of the tests that use the emulator.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <stdexcept>
#include <tuple>
#include <type_traits>
#include <string>
#include <utility>

#ifndef VEFAST_CUDA_EMU
#define VEFAST_CUDA_EMU 1
#endif

// ------------------------------------------------------------------------------------------------
// Qualifiers.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __constant__
#define __shared__ static thread_local
#define __managed__

// ------------------------------------------------------------------------------------------------
// Vector types and launch geometry.
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  dim3(const uint3& u) : x(u.x), y(u.y), z(u.z) {}  // NOLINT: implicit as in CUDA
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// ------------------------------------------------------------------------------------------------
// 16-bit floating-point types.
namespace cuda_emu {

inline uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// float -> bfloat16, round to nearest even; NaN -> quiet NaN with the sign kept.
inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// float -> IEEE binary16, round to nearest even, with subnormals and overflow to infinity.
inline uint16_t float_to_half_bits(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 (or inf): infinity
  if (a < 0x33000000u) return static_cast<uint16_t>(sign);             // < 2^-25: zero
  const uint32_t e = a >> 23;
  const uint32_t mant = a & 0x7fffffu;
  if (e < 113) {  // |f| < 2^-14: a half subnormal m * 2^-24 (or the smallest normal after rounding)
    const uint32_t m = mant | 0x800000u;
    const uint32_t s = 126 - e;  // 14 .. 24
    uint32_t r = m >> s;
    const uint32_t rem = m & ((1u << s) - 1u), half = 1u << (s - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t h = ((e - 112) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is correct
  return static_cast<uint16_t>(sign | h);
}
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float v = static_cast<float>(m) * 5.9604644775390625e-08f;  // m * 2^-24, exact
    return sign ? -v : v;
  }
  if (e == 31) return bits_float(sign | 0x7f800000u | (m << 13));
  return bits_float(sign | ((e + 112) << 23) | (m << 13));
}

}  // namespace cuda_emu

struct __nv_bfloat16 {
  uint16_t x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : x(cuda_emu::float_to_bf16_bits(f)) {}  // NOLINT: implicit as in CUDA
  operator float() const { return cuda_emu::bf16_bits_to_float(x); }
};
struct __half {
  uint16_t x;
  __half() = default;
  __half(float f) : x(cuda_emu::float_to_half_bits(f)) {}  // NOLINT: implicit as in CUDA
  operator float() const { return cuda_emu::half_bits_to_float(x); }
};
typedef __nv_bfloat16 nv_bfloat16;
typedef __half half;

inline float __bfloat162float(__nv_bfloat16 h) { return cuda_emu::bf16_bits_to_float(h.x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  __nv_bfloat16 r;
  r.x = cuda_emu::float_to_bf16_bits(f);
  return r;
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
  __nv_bfloat16 r;
  r.x = u;
  return r;
}
inline float __half2float(__half h) { return cuda_emu::half_bits_to_float(h.x); }
inline __half __float2half_rn(float f) {
  __half r;
  r.x = cuda_emu::float_to_half_bits(f);
  return r;
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __half __ushort_as_half(unsigned short u) {
  __half r;
  r.x = u;
  return r;
}

// ------------------------------------------------------------------------------------------------
// Math intrinsics (host libm; see the header comment for the differences to --use_fast_math).
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __exp2f(float x) { return exp2f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline int __float_as_int(float f) {
  int i;
  memcpy(&i, &f, 4);
  return i;
}
inline float __int_as_float(int i) {
  float f;
  memcpy(&f, &i, 4);
  return f;
}
inline unsigned __float_as_uint(float f) { return cuda_emu::float_bits(f); }
inline float __uint_as_float(unsigned u) { return cuda_emu::bits_float(u); }

// ------------------------------------------------------------------------------------------------
// Runtime API subset.
typedef struct cuda_emu_stream* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchFailure = 719,
};
typedef cudaError_t cudaError;
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();

namespace cuda_emu {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Per-thread state visible to the kernel (threadIdx) and the block/grid geometry.
struct ThreadState {
  uint3 tid;
  int linear = 0;  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
};
struct GridState {
  uint3 block_idx;
  uint3 block_dim;
  uint3 grid_dim;
};
ThreadState* current_thread();  // the running fiber's state; fails when called outside a kernel
extern GridState g_grid;

// Options (also settable from the environment: CUDA_EMU_SEED, CUDA_EMU_RACECHECK=0/1).
void set_seed(uint64_t seed);
void set_race_check(bool on);
void set_max_dynamic_smem(size_t bytes);  // the opt-in limit of the target (default: sm_80's 163 KiB)
struct Stats {
  uint64_t blocks = 0, threads = 0, switches = 0, barriers = 0, collectives = 0, mmas = 0, wgmmas = 0, ldmatrix = 0,
           cp_async = 0, shared_checked_bytes = 0;
};
Stats& stats();

// Function attributes (cudaFuncSetAttribute), keyed by the kernel's address.
cudaError_t set_func_attribute(const void* fn, cudaFuncAttribute attr, int value);
int func_max_dynamic_smem(const void* fn);
void set_last_error(cudaError_t err);

// Runs `body` once per thread of each block of `grid` (see the header comment); throws Error.
void run_grid(const void* fn, dim3 grid, dim3 block, size_t smem, void (*body)(void*), void* ctx);

template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t,
                          Args&&... args) {
  struct Ctx {
    void (*kernel)(Params...);
    std::tuple<typename std::decay<Params>::type...> args;
  };
  Ctx ctx{kernel, std::tuple<typename std::decay<Params>::type...>(std::forward<Args>(args)...)};
  run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem,
           [](void* p) {
             Ctx* c = static_cast<Ctx*>(p);
             auto local = c->args;  // each thread gets its own copy of the parameters
             std::apply(c->kernel, local);
           },
           &ctx);
  return cudaGetLastError();
}

// Dynamic shared memory of the running block.
unsigned char* dynamic_smem();
size_t dynamic_smem_bytes();

// Warp collectives (all 32 lanes, full mask).
enum class Op : int { kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSyncWarp, kLdmatrix, kMma };
struct LaneIO {
  uint64_t value = 0;        // shuffle operand / vote predicate
  int param = 0;             // lane / delta / lane mask, or the ldmatrix count and trans bit
  int width = 32;            // shuffle width
  const void* ptr = nullptr; // ldmatrix row address
  uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float c[4] = {0, 0, 0, 0};
  int mma_type = 0;          // 0: bf16, 1: fp16
  uint64_t out = 0;          // shuffle / vote result
  uint32_t r[4] = {0, 0, 0, 0};  // ldmatrix result
  float d[4] = {0, 0, 0, 0};     // mma result
};
void warp_collective(Op op, unsigned mask, LaneIO& io);
void syncthreads();

// Shared-memory access recording for the race detector (no-ops when it is off).
void shared_read(const void* p, size_t bytes, const char* what);
void shared_write(const void* p, size_t bytes, const char* what);
// Throws unless [p, p + bytes) lies in the block's dynamic shared memory, aligned to `align`.
void check_shared(const void* p, size_t bytes, size_t align, const char* what);

// wgmma (sm_90a warpgroup MMA; a warpgroup is 4 consecutive warps starting at a warp index multiple of 4).
// mma_async, commit_group and wait_group are collectives of the warpgroup's 128 threads (every thread
// reaches the same one, with the same descriptors and shape); fence and fence_proxy_async are per thread.
// Asynchrony is adversarial (cuda_emu.cpp): the accumulators read NaN from issue until wait_group retires
// the group, the shared-memory operands are read when the group retires (a write to them in between is
// reported), A registers and the old accumulators are taken at issue.
struct WgmmaIO {
  int n = 0;                 // N of m64nNk16 (a multiple of 8 in [8, 256])
  int type = 0;              // 0: bf16, 1: fp16
  uint32_t a[4] = {0, 0, 0, 0};  // A fragment (registers)
  uint64_t desc_b = 0;       // B's shared-memory matrix descriptor
  int scale_d = 1;           // 0: D = A B; otherwise D = A B + D
  int tnsp_b = 0;            // 0: B K-major, 1: B N-major
  float* d = nullptr;        // this thread's n / 2 accumulators
};
void wgmma_mma_async(WgmmaIO& io);
void wgmma_fence();
void wgmma_commit_group();
void wgmma_wait_group(int n);
void fence_proxy_async();

// cp.async (per thread): issue / commit / wait.
void cp_async(void* dst, const void* src, int bytes, int src_bytes, const char* what);
void cp_async_commit();
void cp_async_wait(int n);

[[noreturn]] void fail(const std::string& msg);

template <typename T>
inline uint64_t to_u64(T v) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 64 bits");
  uint64_t u = 0;
  memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
inline T from_u64(uint64_t u) {
  T v;
  memcpy(&v, &u, sizeof(T));
  return v;
}
template <typename T>
inline T shfl(Op op, unsigned mask, T var, int param, int width) {
  LaneIO io;
  io.value = to_u64(var);
  io.param = param;
  io.width = width;
  warp_collective(op, mask, io);
  return from_u64<T>(io.out);
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::current_thread()->tid)
#define blockIdx (::cuda_emu::g_grid.block_idx)
#define blockDim (::cuda_emu::g_grid.block_dim)
#define gridDim (::cuda_emu::g_grid.grid_dim)
constexpr int warpSize = 32;

inline void __syncthreads() { cuda_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  cuda_emu::LaneIO io;
  cuda_emu::warp_collective(cuda_emu::Op::kSyncWarp, mask, io);
}
inline void __threadfence_block() {}
inline void __threadfence() {}

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  return cuda_emu::shfl(cuda_emu::Op::kShflIdx, mask, var, src_lane, width);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return cuda_emu::shfl(cuda_emu::Op::kShflUp, mask, var, static_cast<int>(delta), width);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return cuda_emu::shfl(cuda_emu::Op::kShflDown, mask, var, static_cast<int>(delta), width);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  return cuda_emu::shfl(cuda_emu::Op::kShflXor, mask, var, lane_mask, width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(cuda_emu::shfl(cuda_emu::Op::kBallot, mask, pred != 0 ? 1 : 0, 0, 32));
}
inline int __any_sync(unsigned mask, int pred) {
  return cuda_emu::shfl(cuda_emu::Op::kAny, mask, pred != 0 ? 1 : 0, 0, 32);
}
inline int __all_sync(unsigned mask, int pred) {
  return cuda_emu::shfl(cuda_emu::Op::kAll, mask, pred != 0 ? 1 : 0, 0, 32);
}
inline unsigned __activemask() { return 0xffffffffu; }

template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* fn, cudaFuncAttribute attr, int value) {
  return cuda_emu::set_func_attribute(reinterpret_cast<const void*>(fn), attr, value);
}
