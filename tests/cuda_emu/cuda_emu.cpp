// cuda_emu runtime: fibers, the randomized scheduler, barriers, warp and warpgroup collectives, the emulated
// PTX instructions (written from the PTX ISA's fragment tables, independently of the kernels), cp.async with
// delayed completion, wgmma with delayed completion, the shared-memory race / proxy-fence detector and the
// guard pages. See cuda_emu.h.
#include "cuda_emu.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <sstream>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace cuda_emu {

GridState g_grid;

namespace {

// ------------------------------------------------------------------------------------------------
// Fibers. On x86-64 a minimal context switch (callee-saved registers, MXCSR and the x87 control word);
// elsewhere ucontext.
#if defined(__x86_64__)
extern "C" void cuda_emu_switch(void** save_sp, void* new_sp);
extern "C" void cuda_emu_trampoline();
asm(R"(
  .text
  .globl cuda_emu_switch
  .type cuda_emu_switch,@function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  fldcw (%rsp)
  ldmxcsr 8(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch, .-cuda_emu_switch

  .globl cuda_emu_trampoline
  .type cuda_emu_trampoline,@function
cuda_emu_trampoline:
  movq %rbx, %rdi
  callq *%r12
  ud2
  .size cuda_emu_trampoline, .-cuda_emu_trampoline
)");
#endif

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kPoisonedStackBytes = 48 * 1024;  // the top of every fiber stack, NaN-filled at its start

struct Copy {
  void* dst;
  const void* src;
  int bytes, src_bytes;
  int group;  // -1: not committed yet
};

struct Fiber {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  ThreadState ts;
  int warp = 0, lane = 0;
  enum State { kRunnable, kBarrier, kCollective, kDone } state = kRunnable;
  const char* waiting = "";
  std::vector<Copy> copies;
  int committed = 0;
  std::string error;
  bool wg_fenced = false;      // a wgmma.fence since this thread's last wgmma.commit_group (or its start)
  uint32_t proxy_fences = 0;   // fence.proxy.async executed so far
};

struct Warp {
  uint32_t full = 0, arrived = 0;
  Op op = Op::kSyncWarp;
  int key = 0;
  LaneIO* io[32] = {};
  uint64_t epoch = 0;
};

// One byte of shared memory, as seen by the race detector.
struct Shadow {
  uint64_t w_epoch = 0, w_wepoch = 0, r_epoch = 0, r_wepoch = 0;
  int32_t w_tid = -1;
  uint32_t r_warps = 0, r_lanes = 0;
  int32_t r_lane_warp = -1;
  const char* w_what = "";
  int32_t pending = 0;         // cp.async copies in flight to this byte
  int32_t pending_tid = -1;    // the thread that issued the latest of them
  int32_t wg_pending = 0;      // wgmma.mma_async operations in flight that read this byte
  uint32_t w_fence = 0;        // the writer's fence.proxy.async count when it wrote
};

// One wgmma.mma_async of a warpgroup, in flight until wait_group retires its group.
struct WgOp {
  WgmmaIO io;                       // shape, descriptor, flags (uniform over the warpgroup)
  uint32_t a[128][4];               // the A fragments, taken at issue
  float* d[128];                    // each thread's accumulators
  std::vector<float> c;             // the accumulators at issue (128 x n / 2), unless chained
  bool chained = false;             // accumulates onto an earlier operation in flight: C is its result
  int group = -1;                   // -1 until committed
  std::vector<uint32_t> b_offsets;  // shared byte offsets of B's elements, [k][n]
};

enum class WgKind : int { kMma, kCommit, kWait };
struct WarpGroup {
  int arrived = 0;
  WgKind kind = WgKind::kMma;
  int param = 0;
  WgmmaIO* io[128] = {};
  std::vector<WgOp> ops;  // in flight, in issue order
  int committed = 0;      // groups committed so far
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<WarpGroup> wgroups;
  std::vector<int> runnable;
  int nthreads = 0, barrier_arrived = 0, done = 0;
  uint64_t epoch = 0, start_epoch = 0;  // writes before start_epoch belong to earlier blocks
  bool failed = false;
  std::string error;
};

struct Runtime {
  bool init = false;
  uint64_t seed = 0x5eed;
  uint64_t rng = 0;
  bool race_check = true;
  size_t max_dynamic_smem = 166912;  // sm_80 opt-in limit per block (163 KiB)
  cudaError_t last_error = cudaSuccess;
  std::map<const void*, int> max_smem_attr;
  Stats stats;
  uint64_t epoch_counter = 0;
  // stacks
  std::vector<unsigned char*> stacks;
  // shared memory with a guard page behind it
  unsigned char* smem_region = nullptr;
  size_t smem_region_bytes = 0;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::vector<Shadow> shadow;
  // scheduling
  Block block;
  Fiber* cur = nullptr;
#if defined(__x86_64__)
  void* sched_sp = nullptr;
#else
  ucontext_t sched_uc;
#endif
  void (*body)(void*) = nullptr;
  void* body_ctx = nullptr;
  bool in_grid = false;
};

Runtime& rt() {
  static Runtime r;
  if (!r.init) {
    r.init = true;
    if (const char* s = getenv("CUDA_EMU_SEED")) r.seed = strtoull(s, nullptr, 0);
    if (const char* s = getenv("CUDA_EMU_RACECHECK")) r.race_check = atoi(s) != 0;
  }
  return r;
}

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

size_t page_size() {
  static size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}

std::string fmt3(uint3 v) {
  std::ostringstream s;
  s << "(" << v.x << "," << v.y << "," << v.z << ")";
  return s.str();
}

std::string who(const Fiber& f) {
  std::ostringstream s;
  s << "block " << fmt3(g_grid.block_idx) << " thread " << fmt3(f.ts.tid) << " (warp " << f.warp << " lane "
    << f.lane << ")";
  return s.str();
}

std::string who_tid(int linear) {
  Runtime& r = rt();
  if (linear < 0 || linear >= static_cast<int>(r.block.fibers.size())) return "thread ?";
  return who(r.block.fibers[linear]);
}

// --- signals: report where an out-of-bounds access (guard page) or a stack overflow happened ---
void segv_handler(int sig) {
  Runtime& r = rt();
  char buf[512];
  int n;
  if (r.in_grid && r.cur != nullptr) {
    n = snprintf(buf, sizeof buf,
                 "cuda_emu: signal %d (invalid memory access: past the end of a buffer, of dynamic shared memory, "
                 "or a fiber stack overflow) in block (%u,%u,%u) thread (%u,%u,%u)\n",
                 sig, g_grid.block_idx.x, g_grid.block_idx.y, g_grid.block_idx.z, r.cur->ts.tid.x, r.cur->ts.tid.y,
                 r.cur->ts.tid.z);
  } else {
    n = snprintf(buf, sizeof buf, "cuda_emu: signal %d outside a kernel\n", sig);
  }
  if (n > 0) {
    ssize_t ignored = write(2, buf, static_cast<size_t>(n));
    (void)ignored;
  }
  _exit(128 + sig);
}

void install_signal_handlers() {
  static bool done = false;
  if (done) return;
  done = true;
  static std::vector<unsigned char> alt(1 << 16);
  stack_t ss{};
  ss.ss_sp = alt.data();
  ss.ss_size = alt.size();
  sigaltstack(&ss, nullptr);
  struct sigaction sa{};
  sa.sa_handler = segv_handler;
  sa.sa_flags = SA_ONSTACK;
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
}

unsigned char* stack_of(int i) {
  Runtime& r = rt();
  while (static_cast<int>(r.stacks.size()) <= i) {
    const size_t page = page_size();
    void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw Error("cuda_emu: cannot allocate a fiber stack");
    mprotect(m, page, PROT_NONE);  // stack overflow faults instead of corrupting a neighbour
    r.stacks.push_back(static_cast<unsigned char*>(m));
  }
  return r.stacks[i];
}

void fiber_main(void* arg);

void switch_to_scheduler() {
  Runtime& r = rt();
  Fiber* f = r.cur;
#if defined(__x86_64__)
  cuda_emu_switch(&f->sp, r.sched_sp);
#else
  swapcontext(&f->uc, &r.sched_uc);
#endif
}

void run_fiber(Fiber* f) {
  Runtime& r = rt();
  r.cur = f;
  ++r.stats.switches;
#if defined(__x86_64__)
  cuda_emu_switch(&r.sched_sp, f->sp);
#else
  swapcontext(&r.sched_uc, &f->uc);
#endif
  r.cur = nullptr;
}

#if !defined(__x86_64__)
void fiber_entry_uc(unsigned lo, unsigned hi) {
  fiber_main(reinterpret_cast<void*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
#endif

void init_fiber(Fiber& f, int index) {
  unsigned char* base = stack_of(index);
  unsigned char* top = base + page_size() + kStackBytes;  // page-aligned, hence 16-byte aligned
  // Uninitialized locals of the kernel read 0xFF bytes (NaN) rather than what an earlier fiber left there.
  memset(top - kPoisonedStackBytes, 0xff, kPoisonedStackBytes);
#if defined(__x86_64__)
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 88);  // sp = 8 (mod 16): see cuda_emu_switch
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  sp[0] = fpucw;
  sp[1] = mxcsr;
  sp[2] = 0;                                              // r15
  sp[3] = 0;                                              // r14
  sp[4] = 0;                                              // r13
  sp[5] = reinterpret_cast<uint64_t>(&fiber_main);        // r12: entry
  sp[6] = reinterpret_cast<uint64_t>(&f);                 // rbx: its argument
  sp[7] = 0;                                              // rbp
  sp[8] = reinterpret_cast<uint64_t>(&cuda_emu_trampoline);  // return address
  f.sp = sp;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = base + page_size();
  f.uc.uc_stack.ss_size = kStackBytes;
  f.uc.uc_link = nullptr;
  const uintptr_t p = reinterpret_cast<uintptr_t>(&f);
  makecontext(&f.uc, reinterpret_cast<void (*)()>(&fiber_entry_uc), 2, static_cast<unsigned>(p),
              static_cast<unsigned>(p >> 32));
#endif
}

void make_runnable(int linear) {
  Runtime& r = rt();
  r.block.fibers[linear].state = Fiber::kRunnable;
  r.block.runnable.push_back(linear);
}

void fiber_main(void* arg) {
  Fiber* f = static_cast<Fiber*>(arg);
  Runtime& r = rt();
  try {
    r.body(r.body_ctx);
  } catch (const std::exception& e) {
    f->error = e.what();
    r.block.failed = true;
    if (r.block.error.empty()) r.block.error = e.what();
  }
  f->state = Fiber::kDone;
  f->waiting = "exited";
  ++r.block.done;
  switch_to_scheduler();
  abort();  // never resumed
}

Fiber& cur_fiber(const char* what) {
  Runtime& r = rt();
  if (r.cur == nullptr) throw Error(std::string("cuda_emu: ") + what + " called outside a kernel");
  return *r.cur;
}

// --- race detector ---
// kind: 0 read, 1 write, 2 cp.async issue, 3 cp.async completion.
void record_access(const void* p, size_t bytes, const Fiber& f, int kind, const char* what);
void record(const void* p, size_t bytes, const Fiber& f, bool is_write, const char* what) {
  record_access(p, bytes, f, is_write ? 1 : 0, what);
}
void record_access(const void* p, size_t bytes, const Fiber& f, int kind, const char* what) {
  const bool is_write = kind != 0;
  Runtime& r = rt();
  if (!r.race_check || bytes == 0) return;
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (c < r.smem || c + bytes > r.smem + r.smem_bytes) return;  // not dynamic shared memory
  r.stats.shared_checked_bytes += bytes;
  const size_t off0 = static_cast<size_t>(c - r.smem);
  const uint64_t ep = r.block.epoch;
  const uint64_t wep = r.block.warps[f.warp].epoch;
  const int tid = f.ts.linear;
  const uint32_t wbit = 1u << f.warp, lbit = 1u << f.lane;
  for (size_t i = 0; i < bytes; ++i) {
    Shadow& s = r.shadow[off0 + i];
    if (is_write && s.wg_pending > 0) {
      std::ostringstream m;
      m << "cuda_emu: " << who(f) << " writes shared byte " << (off0 + i) << " (" << what
        << ") that an in-flight wgmma.mma_async reads (missing wgmma.wait_group, or a barrier missing after it)";
      fail(m.str());
    }
    if (kind == 3) {  // the copy lands: no longer in flight
      --s.pending;
    } else if (s.pending > 0) {
      std::ostringstream m;
      m << "cuda_emu: " << who(f) << " " << (is_write ? "writes" : "reads") << " shared byte " << (off0 + i) << " ("
        << what << ") while a cp.async to it, issued by " << who_tid(s.pending_tid)
        << ", has not been waited for (missing cp.async.wait_group, or a barrier missing after it)";
      fail(m.str());
    } else if (kind == 0 && s.w_epoch < r.block.start_epoch) {
      std::ostringstream m;
      m << "cuda_emu: " << who(f) << " reads shared byte " << (off0 + i) << " (" << what
        << ") that no thread of this block has written (uninitialized shared memory)";
      fail(m.str());
    }
    if (kind == 2) {
      ++s.pending;
      s.pending_tid = tid;
    }
    if (s.w_epoch == ep && s.w_tid != tid) {
      const int wwarp = r.block.fibers[s.w_tid].warp;
      if (wwarp != f.warp || s.w_wepoch == wep) {
        std::ostringstream m;
        m << "cuda_emu: shared-memory race: " << who(f) << " " << (is_write ? "writes" : "reads") << " byte "
          << (off0 + i) << " (" << what << ") that " << who_tid(s.w_tid) << " wrote (" << s.w_what
          << ") with no barrier between (same __syncthreads interval"
          << (wwarp == f.warp ? ", no warp synchronization between" : "") << ")";
        fail(m.str());
      }
    }
    if (is_write) {
      if (s.r_epoch == ep) {
        const bool other_warp = (s.r_warps & ~wbit) != 0;
        const bool other_lane = s.r_lane_warp == f.warp && s.r_wepoch == wep && (s.r_lanes & ~lbit) != 0;
        if (other_warp || other_lane) {
          std::ostringstream m;
          m << "cuda_emu: shared-memory race: " << who(f) << " writes byte " << (off0 + i) << " (" << what
            << ") that another thread (warps mask 0x" << std::hex << s.r_warps << std::dec
            << ") read in the same __syncthreads interval";
          fail(m.str());
        }
      }
      s.w_epoch = ep;
      s.w_wepoch = wep;
      s.w_tid = tid;
      s.w_what = what;
      s.w_fence = f.proxy_fences;
    } else {
      if (s.r_epoch != ep) {
        s.r_epoch = ep;
        s.r_warps = 0;
        s.r_lanes = 0;
        s.r_lane_warp = -1;
      }
      s.r_warps |= wbit;
      if (s.r_lane_warp != f.warp || s.r_wepoch != wep) {
        s.r_lane_warp = f.warp;
        s.r_wepoch = wep;
        s.r_lanes = 0;
      }
      s.r_lanes |= lbit;
    }
  }
}

// --- PTX ISA 9.7.14.5.8, "Matrix Fragments for mma.m16n8k16 with floating point type" ---
// groupID = laneid >> 2, threadID_in_group = laneid % 4; element i of a fragment lives in register i / 2,
// the even element in the low 16 bits ("Elements (low to high)").
void mma_a_pos(int lane, int i, int& row, int& col) {
  const int group = lane >> 2, tig = lane % 4;
  row = ((0 <= i && i < 2) || (4 <= i && i < 6)) ? group : group + 8;
  col = (tig * 2) + (i & 0x1) + (i >= 4 ? 8 : 0);
}
void mma_b_pos(int lane, int i, int& row, int& col) {
  const int group = lane >> 2, tig = lane % 4;
  row = (tig * 2) + (i & 0x1) + (i >= 2 ? 8 : 0);
  col = group;
}
void mma_c_pos(int lane, int i, int& row, int& col) {
  const int group = lane >> 2, tig = lane % 4;
  row = i < 2 ? group : group + 8;
  col = (tig * 2) + (i & 0x1);
}

double elem16(uint32_t reg, int half, int type) {
  const uint16_t h = static_cast<uint16_t>(half ? (reg >> 16) : (reg & 0xffffu));
  return type == 0 ? static_cast<double>(bf16_bits_to_float(h)) : static_cast<double>(half_bits_to_float(h));
}

void exec_mma(Warp& w) {
  Runtime& r = rt();
  ++r.stats.mmas;
  double A[16][16], B[16][8], C[16][8];
  const int type = w.io[0]->mma_type;
  for (int lane = 0; lane < 32; ++lane) {
    const LaneIO& io = *w.io[lane];
    for (int i = 0; i < 8; ++i) {
      int row, col;
      mma_a_pos(lane, i, row, col);
      A[row][col] = elem16(io.a[i / 2], i & 1, type);
    }
    for (int i = 0; i < 4; ++i) {
      int row, col;
      mma_b_pos(lane, i, row, col);
      B[row][col] = elem16(io.b[i / 2], i & 1, type);
    }
    for (int i = 0; i < 4; ++i) {
      int row, col;
      mma_c_pos(lane, i, row, col);
      C[row][col] = static_cast<double>(io.c[i]);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    LaneIO& io = *w.io[lane];
    for (int i = 0; i < 4; ++i) {
      int row, col;
      mma_c_pos(lane, i, row, col);
      double acc = 0.0;
      for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
      io.d[i] = static_cast<float>(C[row][col] + acc);
    }
  }
}

// --- PTX ISA 9.7.15 (wgmma), written from its tables independently of kernels/ ---
// Matrix descriptor ("Matrix Descriptor Format"): bits 0-13 start address, 16-29 leading-dimension byte offset,
// 32-45 stride-dimension byte offset (each encoded as (x & 0x3FFFF) >> 4), 49-51 base offset, 62-63 swizzle.
struct SmemDesc {
  uint32_t start = 0, lbo = 0, sbo = 0;
};
SmemDesc decode_desc(uint64_t d) {
  const uint64_t fields = 0x3FFFull | (0x3FFFull << 16) | (0x3FFFull << 32) | (0x7ull << 49) | (0x3ull << 62);
  std::ostringstream m;
  m << "cuda_emu: wgmma descriptor 0x" << std::hex << d << std::dec << ": ";
  if (d & ~fields) fail(m.str() + "reserved bits set");
  if ((d >> 62) & 3)
    fail(m.str() + "swizzle mode " + std::to_string((d >> 62) & 3) + " is not emulated (no-swizzle only)");
  if ((d >> 49) & 7) fail(m.str() + "base offset must be 0 (no-swizzle mode)");
  SmemDesc s;
  s.start = static_cast<uint32_t>(d & 0x3FFF) << 4;
  s.lbo = static_cast<uint32_t>((d >> 16) & 0x3FFF) << 4;
  s.sbo = static_cast<uint32_t>((d >> 32) & 0x3FFF) << 4;
  return s;
}
// "Shared Memory Matrix Layout", no swizzle: the matrix is made of core matrices of 8 rows x 16 bytes, each
// contiguous (128 bytes). K-major: a row holds 8 K-consecutive elements of one M/N index; MN-major: a row
// holds 8 M/N-consecutive elements of one K index. Core matrices adjacent in K are LBO bytes apart, adjacent
// in M/N SBO bytes apart. Byte offset of element (k, mn) of a 16-bit operand:
uint32_t operand_offset(const SmemDesc& s, bool mn_major, int k, int mn) {
  const uint32_t in_core = mn_major ? (k % 8) * 16 + (mn % 8) * 2 : (mn % 8) * 16 + (k % 8) * 2;
  return s.start + (mn / 8) * s.sbo + (k / 8) * s.lbo + in_core;
}
// "Register Fragments", wgmma .m64nNk16 (A: four 32-bit registers of two 16-bit elements, low half first;
// D: N / 2 float32): thread t of the warpgroup is lane l = t % 32 of warp w = t / 32; with g = l / 4 and
// q = l % 4, A element j is at row 16 w + g + 8 ((j / 2) % 2), column 2 q + j % 2 + 8 (j / 4), and D element
// i at row 16 w + g + 8 ((i / 2) % 2), column 2 q + i % 2 + 8 (i / 4).
void wg_pos(int t, int i, int& row, int& col) {
  const int w = t / 32, l = t % 32, g = l / 4, q = l % 4;
  row = 16 * w + g + 8 * ((i / 2) % 2);
  col = 2 * q + i % 2 + 8 * (i / 4);
}

Fiber& wg_fiber(int wg, int t) { return rt().block.fibers[wg * 128 + t]; }

void exec_wgmma_issue(WarpGroup& G, int wg) {
  Runtime& r = rt();
  Block& B = r.block;
  const WgmmaIO& io = *G.io[0];
  std::ostringstream where;
  where << "wgmma.mma_async (m64n" << io.n << "k16) of warpgroup " << wg << " in block " << fmt3(g_grid.block_idx);
  if (io.n < 8 || io.n > 256 || io.n % 8 != 0)
    fail("cuda_emu: " + where.str() + ": N must be a multiple of 8 in [8, 256]");
  for (int t = 0; t < 128; ++t) {
    const WgmmaIO& o = *G.io[t];
    if (o.n != io.n || o.type != io.type || o.desc_b != io.desc_b || o.scale_d != io.scale_d || o.tnsp_b != io.tnsp_b)
      fail("cuda_emu: " + where.str() + ": " + who(wg_fiber(wg, t)) +
           " gives another shape, type, descriptor, scale-d or transpose than thread 0 (they must be uniform)");
    if (o.d == nullptr) fail("cuda_emu: " + where.str() + ": no accumulators");
    if (!wg_fiber(wg, t).wg_fenced)
      fail("cuda_emu: " + where.str() + ": " + who(wg_fiber(wg, t)) +
           " has not executed wgmma.fence since its last wgmma.commit_group (or its start): the registers it "
           "accessed may not be visible to the wgmma");
  }
  WgOp op;
  op.io = io;
  const SmemDesc sd = decode_desc(io.desc_b);
  op.b_offsets.resize(16 * static_cast<size_t>(io.n));
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < io.n; ++n) {
      const uint32_t off = operand_offset(sd, io.tnsp_b != 0, k, n);
      if (static_cast<size_t>(off) + 2 > r.smem_bytes)
        fail("cuda_emu: " + where.str() + ": B element (k " + std::to_string(k) + ", n " + std::to_string(n) +
             ") at shared offset " + std::to_string(off) + " is outside the block's dynamic shared memory (" +
             std::to_string(r.smem_bytes) + " bytes)");
      op.b_offsets[static_cast<size_t>(k) * io.n + n] = off;
    }
  // Reads at issue for the race detector (attributed to each of the warpgroup's 4 warps), the proxy rule
  // (every byte's last writer executed fence.proxy.async after writing it), then in-flight marks.
  for (uint32_t off : op.b_offsets) {
    for (int w = 0; w < 4; ++w) record(r.smem + off, 2, wg_fiber(wg, 32 * w), false, "wgmma.mma_async (B operand)");
    if (!r.race_check) continue;
    for (uint32_t j = off; j < off + 2; ++j) {
      const Shadow& sh = r.shadow[j];
      if (sh.w_tid >= 0 && sh.w_epoch >= B.start_epoch && B.fibers[sh.w_tid].proxy_fences <= sh.w_fence) {
        std::ostringstream m;
        m << "cuda_emu: " << where.str() << " reads shared byte " << j << " that " << who_tid(sh.w_tid) << " wrote ("
          << sh.w_what << ") with no fence.proxy.async after the write (generic-proxy writes are not visible to "
          << "wgmma's async proxy without it)";
        fail(m.str());
      }
    }
  }
  if (r.race_check)
    for (uint32_t off : op.b_offsets) ++r.shadow[off].wg_pending, ++r.shadow[off + 1].wg_pending;
  const int nd = io.n / 2;
  bool chained = false;
  for (const WgOp& o : G.ops) chained = chained || o.d[0] == G.io[0]->d;
  for (int t = 0; t < 128; ++t) {
    bool ct = false;
    for (const WgOp& o : G.ops) ct = ct || o.d[t] == G.io[t]->d;
    if (ct != chained)
      fail("cuda_emu: " + where.str() + ": some threads accumulate onto an operation in flight, others not");
    for (int i = 0; i < 4; ++i) op.a[t][i] = G.io[t]->a[i];
    op.d[t] = G.io[t]->d;
  }
  op.chained = chained;
  if (chained) {
    for (const WgOp& o : G.ops)
      if (o.d[0] == op.d[0] && o.io.n != io.n) fail("cuda_emu: " + where.str() + ": chained onto a different shape");
  } else {
    op.c.resize(128 * static_cast<size_t>(nd));
    for (int t = 0; t < 128; ++t) memcpy(&op.c[static_cast<size_t>(t) * nd], op.d[t], sizeof(float) * nd);
  }
  for (int t = 0; t < 128; ++t) memset(op.d[t], 0xff, sizeof(float) * nd);  // NaN until retired
  ++r.stats.wgmmas;
  G.ops.push_back(std::move(op));
}

// The operation lands: B read from shared memory now, D = A B (+ C), products exact, sums in double, one
// rounding to float32 (the tensor cores round differently in the last bits).
void retire_wgmma(WgOp& op) {
  Runtime& r = rt();
  const int n = op.io.n, nd = n / 2;
  std::vector<double> A(64 * 16), Bm(16 * static_cast<size_t>(n));
  for (int t = 0; t < 128; ++t)
    for (int j = 0; j < 8; ++j) {
      int row, col;
      wg_pos(t, j, row, col);
      A[row * 16 + col] = elem16(op.a[t][j / 2], j & 1, op.io.type);
    }
  for (int k = 0; k < 16; ++k)
    for (int c = 0; c < n; ++c) {
      uint16_t h;
      memcpy(&h, r.smem + op.b_offsets[static_cast<size_t>(k) * n + c], 2);
      Bm[static_cast<size_t>(k) * n + c] = op.io.type == 0 ? bf16_bits_to_float(h) : half_bits_to_float(h);
    }
  for (int t = 0; t < 128; ++t)
    for (int i = 0; i < nd; ++i) {
      int row, col;
      wg_pos(t, i, row, col);
      double acc = 0.0;
      for (int k = 0; k < 16; ++k) acc += A[row * 16 + k] * Bm[static_cast<size_t>(k) * n + col];
      const double c = op.chained ? op.d[t][i] : op.c[static_cast<size_t>(t) * nd + i];
      op.d[t][i] = static_cast<float>(op.io.scale_d ? c + acc : acc);
    }
  if (r.race_check)
    for (uint32_t off : op.b_offsets) --r.shadow[off].wg_pending, --r.shadow[off + 1].wg_pending;
}

void exec_warpgroup(WarpGroup& G, int wg) {
  switch (G.kind) {
    case WgKind::kMma: exec_wgmma_issue(G, wg); break;
    case WgKind::kCommit:
      for (WgOp& o : G.ops)
        if (o.group < 0) o.group = G.committed;
      ++G.committed;  // empty groups are groups too
      for (int t = 0; t < 128; ++t) wg_fiber(wg, t).wg_fenced = false;
      break;
    case WgKind::kWait: {
      const int limit = G.committed - G.param;  // groups < limit must be complete
      size_t done = 0;
      while (done < G.ops.size() && G.ops[done].group >= 0 && G.ops[done].group < limit) retire_wgmma(G.ops[done++]);
      G.ops.erase(G.ops.begin(), G.ops.begin() + static_cast<std::ptrdiff_t>(done));
      break;
    }
  }
}

// --- PTX ISA, ldmatrix (m8n8, .b16): threads 8j .. 8j+7 give the row addresses of matrix j; thread i
// receives, in register j, elements (i / 4, 2 (i % 4)) and (i / 4, 2 (i % 4) + 1) of matrix j (low half
// first); with .trans, elements (2 (i % 4), i / 4) and (2 (i % 4) + 1, i / 4). Rows are 16 bytes, aligned.
void exec_ldmatrix(Warp& w) {
  Runtime& r = rt();
  ++r.stats.ldmatrix;
  const int num = w.key & 7;
  const bool trans = (w.key >> 3) & 1;
  uint16_t M[4][8][8];
  for (int j = 0; j < num; ++j) {
    for (int row = 0; row < 8; ++row) {
      const int lane = 8 * j + row;
      const void* p = w.io[lane]->ptr;
      check_shared(p, 16, 16, "ldmatrix row address");
      record(p, 16, r.block.fibers[r.cur->ts.linear - r.cur->lane + lane], false, "ldmatrix");
      memcpy(M[j][row], p, 16);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    LaneIO& io = *w.io[lane];
    for (int j = 0; j < num; ++j) {
      uint16_t lo, hi;
      if (!trans) {
        lo = M[j][lane / 4][2 * (lane % 4)];
        hi = M[j][lane / 4][2 * (lane % 4) + 1];
      } else {
        lo = M[j][2 * (lane % 4)][lane / 4];
        hi = M[j][2 * (lane % 4) + 1][lane / 4];
      }
      io.r[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
}

void exec_shuffle_or_vote(Warp& w) {
  uint64_t vals[32];
  for (int l = 0; l < 32; ++l) vals[l] = w.io[l]->value;
  if (w.op == Op::kBallot || w.op == Op::kAny || w.op == Op::kAll) {
    uint32_t bits = 0;
    for (int l = 0; l < 32; ++l) bits |= (vals[l] ? 1u : 0u) << l;
    const uint64_t out = w.op == Op::kBallot ? bits : w.op == Op::kAny ? (bits != 0) : (bits == 0xffffffffu);
    for (int l = 0; l < 32; ++l) w.io[l]->out = out;
    return;
  }
  for (int l = 0; l < 32; ++l) {
    LaneIO& io = *w.io[l];
    const int width = io.width;
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
      fail("cuda_emu: shuffle width must be a power of 2 <= 32, got " + std::to_string(width));
    const int seg = (l / width) * width;
    int src = l;
    switch (w.op) {
      case Op::kShflIdx: src = seg + (((io.param % width) + width) % width); break;
      case Op::kShflUp: src = (l - io.param >= seg) ? l - io.param : l; break;
      case Op::kShflDown: src = (l + io.param < seg + width) ? l + io.param : l; break;
      case Op::kShflXor: {
        const int x = l ^ io.param;
        src = (x >= 0 && x < 32 && x / width <= l / width) ? x : l;
        break;
      }
      default: break;
    }
    io.out = vals[src];
  }
}

const char* op_name(Op op) {
  switch (op) {
    case Op::kShflIdx: return "__shfl_sync";
    case Op::kShflUp: return "__shfl_up_sync";
    case Op::kShflDown: return "__shfl_down_sync";
    case Op::kShflXor: return "__shfl_xor_sync";
    case Op::kBallot: return "__ballot_sync";
    case Op::kAny: return "__any_sync";
    case Op::kAll: return "__all_sync";
    case Op::kSyncWarp: return "__syncwarp";
    case Op::kLdmatrix: return "ldmatrix";
    case Op::kMma: return "mma.sync";
  }
  return "?";
}

void deadlock() {
  Runtime& r = rt();
  std::ostringstream m;
  m << "cuda_emu: deadlock in block " << fmt3(g_grid.block_idx) << ": " << r.block.done << " of " << r.block.nthreads
    << " threads exited, " << r.block.barrier_arrived << " wait at __syncthreads";
  int shown = 0;
  for (const Warp& w : r.block.warps) {
    if (w.arrived != 0 && shown < 4) {
      m << "; warp " << (&w - r.block.warps.data()) << " lanes 0x" << std::hex << w.arrived << std::dec << " wait at "
        << op_name(w.op) << " (lanes 0x" << std::hex << (w.full & ~w.arrived) << std::dec << " never arrived)";
      ++shown;
    }
  }
  for (size_t g = 0; g < r.block.wgroups.size(); ++g) {
    const WarpGroup& G = r.block.wgroups[g];
    if (G.arrived != 0)
      m << "; warpgroup " << g << ": " << G.arrived << " of 128 threads wait at a wgmma "
        << (G.kind == WgKind::kMma ? "mma_async" : G.kind == WgKind::kCommit ? "commit_group" : "wait_group");
  }
  m << " (a barrier or warp / warpgroup collective not reached by every thread: divergent control flow or an "
       "early exit)";
  throw Error(m.str());
}

void run_block(uint3 block_idx) {
  Runtime& r = rt();
  Block& B = r.block;
  g_grid.block_idx = block_idx;
  const uint3 bd = g_grid.block_dim;
  B.nthreads = static_cast<int>(bd.x * bd.y * bd.z);
  B.fibers.assign(B.nthreads, Fiber());
  B.warps.assign((B.nthreads + 31) / 32, Warp());
  B.wgroups.assign((B.nthreads + 127) / 128, WarpGroup());
  B.runnable.clear();
  B.barrier_arrived = B.done = 0;
  B.failed = false;
  B.error.clear();
  B.epoch = B.start_epoch = ++r.epoch_counter;
  for (size_t w = 0; w < B.warps.size(); ++w) {
    const int lanes = std::min(32, B.nthreads - static_cast<int>(w) * 32);
    B.warps[w].full = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    B.warps[w].epoch = ++r.epoch_counter;
  }
  for (int i = 0; i < B.nthreads; ++i) {
    Fiber& f = B.fibers[i];
    f.ts.linear = i;
    f.ts.tid = uint3{static_cast<unsigned>(i % bd.x), static_cast<unsigned>((i / bd.x) % bd.y),
                     static_cast<unsigned>(i / (bd.x * bd.y))};
    f.warp = i / 32;
    f.lane = i % 32;
    init_fiber(f, i);
    B.runnable.push_back(i);
  }
  memset(r.smem, 0xff, r.smem_bytes);  // NaN in bf16, fp16 and fp32
  ++r.stats.blocks;
  r.stats.threads += static_cast<uint64_t>(B.nthreads);
  while (!B.runnable.empty()) {
    const size_t k = static_cast<size_t>(splitmix(r.rng) % B.runnable.size());
    const int i = B.runnable[k];
    B.runnable[k] = B.runnable.back();
    B.runnable.pop_back();
    run_fiber(&B.fibers[i]);
    if (B.failed) throw Error(B.error);
  }
  if (B.done != B.nthreads) deadlock();
  for (size_t g = 0; g < B.wgroups.size(); ++g)
    if (!B.wgroups[g].ops.empty())
      throw Error("cuda_emu: block " + fmt3(g_grid.block_idx) + " exits with " +
                  std::to_string(B.wgroups[g].ops.size()) + " wgmma.mma_async of warpgroup " + std::to_string(g) +
                  " in flight (no wgmma.wait_group retired them)");
  if (r.race_check) {  // copies never waited for die with the block
    for (Fiber& f : B.fibers) {
      for (const Copy& c : f.copies) {
        const size_t off = static_cast<size_t>(static_cast<unsigned char*>(c.dst) - r.smem);
        for (int i = 0; i < c.bytes; ++i) --r.shadow[off + i].pending;
      }
    }
  }
}

void setup_smem(size_t bytes) {
  Runtime& r = rt();
  const size_t page = page_size();
  const size_t want = ((bytes + page - 1) / page) * page;
  if (r.smem_region == nullptr || r.smem_region_bytes < want + page) {
    if (r.smem_region != nullptr) munmap(r.smem_region, r.smem_region_bytes);
    r.smem_region_bytes = want + page;
    void* m = mmap(nullptr, r.smem_region_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw Error("cuda_emu: cannot allocate shared memory");
    r.smem_region = static_cast<unsigned char*>(m);
    mprotect(r.smem_region + want, page, PROT_NONE);
  }
  unsigned char* guard = r.smem_region + (r.smem_region_bytes - page);
  const size_t rounded = (bytes + 127) / 128 * 128;  // 128-byte aligned start, ends within 127 B of the guard
  r.smem = guard - rounded;
  r.smem_bytes = bytes;
  if (r.shadow.size() < bytes) r.shadow.resize(bytes);
  for (size_t i = 0; i < bytes; ++i) r.shadow[i] = Shadow();
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Public API.

ThreadState* current_thread() { return &cur_fiber("threadIdx").ts; }

void set_seed(uint64_t seed) { rt().seed = seed; }
void set_race_check(bool on) { rt().race_check = on; }
void set_max_dynamic_smem(size_t bytes) { rt().max_dynamic_smem = bytes; }
Stats& stats() { return rt().stats; }

void fail(const std::string& msg) { throw Error(msg); }

cudaError_t set_func_attribute(const void* fn, cudaFuncAttribute attr, int value) {
  Runtime& r = rt();
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > r.max_dynamic_smem) {
      r.last_error = cudaErrorInvalidValue;
      return cudaErrorInvalidValue;
    }
    r.max_smem_attr[fn] = value;
  }
  return cudaSuccess;
}
int func_max_dynamic_smem(const void* fn) {
  auto it = rt().max_smem_attr.find(fn);
  return it == rt().max_smem_attr.end() ? 48 * 1024 : it->second;
}
void set_last_error(cudaError_t err) { rt().last_error = err; }

void run_grid(const void* fn, dim3 grid, dim3 block, size_t smem, void (*body)(void*), void* ctx) {
  Runtime& r = rt();
  install_signal_handlers();
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) {
    r.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (smem > static_cast<size_t>(func_max_dynamic_smem(fn))) {
    r.last_error = cudaErrorInvalidValue;  // as CUDA: above 48 KiB needs cudaFuncSetAttribute first
    return;
  }
  setup_smem(smem);
  g_grid.block_dim = uint3{block.x, block.y, block.z};
  g_grid.grid_dim = uint3{grid.x, grid.y, grid.z};
  r.body = body;
  r.body_ctx = ctx;
  // Blocks in a random order as well (they may run in any order on a GPU).
  std::vector<uint3> order;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) order.push_back(uint3{x, y, z});
  r.rng = r.seed ^ (0x9e3779b97f4a7c15ull * (r.stats.blocks + 1));
  for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[splitmix(r.rng) % i]);
  r.in_grid = true;
  try {
    for (const uint3& b : order) run_block(b);
  } catch (...) {
    r.in_grid = false;
    r.cur = nullptr;
    throw;
  }
  r.in_grid = false;
}

unsigned char* dynamic_smem() {
  cur_fiber("dynamic_smem");
  return rt().smem;
}
size_t dynamic_smem_bytes() { return rt().smem_bytes; }

void syncthreads() {
  Runtime& r = rt();
  Fiber& f = cur_fiber("__syncthreads");
  ++r.stats.barriers;
  f.state = Fiber::kBarrier;
  f.waiting = "__syncthreads";
  Block& B = r.block;
  if (++B.barrier_arrived == B.nthreads) {
    B.barrier_arrived = 0;
    B.epoch = ++r.epoch_counter;
    for (int i = 0; i < B.nthreads; ++i) make_runnable(i);
  }
  switch_to_scheduler();
}

void warp_collective(Op op, unsigned mask, LaneIO& io) {
  Runtime& r = rt();
  Fiber& f = cur_fiber(op_name(op));
  Warp& w = r.block.warps[f.warp];
  if (mask != 0xffffffffu && mask != w.full) {
    std::ostringstream m;
    m << "cuda_emu: " << op_name(op) << " with mask 0x" << std::hex << mask << std::dec << " at " << who(f)
      << ": only full-warp masks are emulated";
    fail(m.str());
  }
  const int key = op == Op::kLdmatrix ? io.param : op == Op::kMma ? io.mma_type : 0;
  if (w.arrived == 0) {
    w.op = op;
    w.key = key;
  } else if (w.op != op || w.key != key) {
    fail(std::string("cuda_emu: divergent warp: ") + who(f) + " reaches " + op_name(op) +
         " while other lanes of its warp wait at " + op_name(w.op) + " (or the same with other qualifiers)");
  }
  w.io[f.lane] = &io;
  w.arrived |= 1u << f.lane;
  f.state = Fiber::kCollective;
  f.waiting = op_name(op);
  if (w.arrived == w.full) {
    ++r.stats.collectives;
    if (w.full != 0xffffffffu && (op == Op::kLdmatrix || op == Op::kMma))
      fail(std::string("cuda_emu: ") + op_name(op) + " in a partial warp");
    switch (op) {
      case Op::kMma: exec_mma(w); break;
      case Op::kLdmatrix: exec_ldmatrix(w); break;
      case Op::kSyncWarp: break;
      default: exec_shuffle_or_vote(w); break;
    }
    w.arrived = 0;
    w.epoch = ++r.epoch_counter;
    const int base = f.warp * 32;
    for (int l = 0; l < 32; ++l)
      if (w.full & (1u << l)) make_runnable(base + l);
  }
  switch_to_scheduler();
}

void check_shared(const void* p, size_t bytes, size_t align, const char* what) {
  Runtime& r = rt();
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (c < r.smem || c + bytes > r.smem + r.smem_bytes) {
    std::ostringstream m;
    m << "cuda_emu: " << what << " " << p << " (" << bytes << " bytes) is not inside the block's dynamic shared "
      << "memory [" << static_cast<const void*>(r.smem) << ", +" << r.smem_bytes << ")";
    if (r.cur) m << " at " << who(*r.cur);
    fail(m.str());
  }
  if (reinterpret_cast<uintptr_t>(p) % align != 0) {
    std::ostringstream m;
    m << "cuda_emu: " << what << " at shared offset " << (c - r.smem) << " is not " << align << "-byte aligned";
    if (r.cur) m << " at " << who(*r.cur);
    fail(m.str());
  }
}

void shared_read(const void* p, size_t bytes, const char* what) {
  Fiber& f = cur_fiber(what);
  check_shared(p, bytes, 1, what);
  record(p, bytes, f, false, what);
}
void shared_write(const void* p, size_t bytes, const char* what) {
  Fiber& f = cur_fiber(what);
  check_shared(p, bytes, 1, what);
  record(p, bytes, f, true, what);
}

void cp_async(void* dst, const void* src, int bytes, int src_bytes, const char* what) {
  Runtime& r = rt();
  Fiber& f = cur_fiber(what);
  ++r.stats.cp_async;
  if (bytes != 4 && bytes != 8 && bytes != 16) fail(std::string("cuda_emu: ") + what + ": cp-size must be 4, 8 or 16");
  if (src_bytes < 0 || src_bytes > bytes) fail(std::string("cuda_emu: ") + what + ": src-size outside [0, cp-size]");
  check_shared(dst, static_cast<size_t>(bytes), static_cast<size_t>(bytes), what);
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % static_cast<uintptr_t>(bytes) != 0)
    fail(std::string("cuda_emu: ") + what + ": global source not aligned to the copy size at " + who(f));
  // The destination holds garbage (NaN) until the copy's group is waited for; the issue counts as a
  // write for the race detector (the copy may land at any time until then).
  record_access(dst, static_cast<size_t>(bytes), f, 2, what);
  memset(dst, 0xff, static_cast<size_t>(bytes));
  f.copies.push_back(Copy{dst, src, bytes, src_bytes, -1});
}

void cp_async_commit() {
  Fiber& f = cur_fiber("cp.async.commit_group");
  for (Copy& c : f.copies)
    if (c.group < 0) c.group = f.committed;
  ++f.committed;  // empty groups are groups too
}

void cp_async_wait(int n) {
  Runtime& r = rt();
  Fiber& f = cur_fiber("cp.async.wait_group");
  if (n < 0) fail("cuda_emu: cp.async.wait_group with a negative count");
  const int limit = f.committed - n;  // groups < limit must be complete
  std::vector<Copy> keep;
  std::vector<Copy> done;
  for (const Copy& c : f.copies) (c.group >= 0 && c.group < limit ? done : keep).push_back(c);
  for (size_t i = done.size(); i > 1; --i) std::swap(done[i - 1], done[splitmix(r.rng) % i]);
  for (const Copy& c : done) {
    unsigned char* d = static_cast<unsigned char*>(c.dst);
    if (c.src_bytes > 0) memcpy(d, c.src, static_cast<size_t>(c.src_bytes));
    memset(d + c.src_bytes, 0, static_cast<size_t>(c.bytes - c.src_bytes));
    record_access(d, static_cast<size_t>(c.bytes), f, 3, "cp.async completion (wait_group)");
  }
  f.copies.swap(keep);
}

namespace {
const char* wg_name(WgKind k) {
  return k == WgKind::kMma ? "wgmma.mma_async" : k == WgKind::kCommit ? "wgmma.commit_group" : "wgmma.wait_group";
}
// A collective of the 128 threads of the calling thread's warpgroup (same operation, same parameter).
void warpgroup_collective(WgKind kind, int param, WgmmaIO* io) {
  Runtime& r = rt();
  const char* name = wg_name(kind);
  Fiber& f = cur_fiber(name);
  Block& B = r.block;
  const int wg = f.warp / 4;
  if ((wg + 1) * 128 > B.nthreads)
    fail(std::string("cuda_emu: ") + name + " at " + who(f) + ": its warpgroup (warps " + std::to_string(4 * wg) +
         ".." + std::to_string(4 * wg + 3) + ") is incomplete in a block of " + std::to_string(B.nthreads) +
         " threads");
  WarpGroup& G = B.wgroups[wg];
  if (G.arrived == 0) {
    G.kind = kind;
    G.param = param;
  } else if (G.kind != kind || G.param != param) {
    fail(std::string("cuda_emu: divergent warpgroup: ") + who(f) + " reaches " + name + " while other threads of " +
         "its warpgroup wait at " + wg_name(G.kind) + " (or the same with another count)");
  }
  G.io[f.ts.linear - 128 * wg] = io;
  ++G.arrived;
  f.state = Fiber::kCollective;
  f.waiting = name;
  if (G.arrived == 128) {
    ++r.stats.collectives;
    G.arrived = 0;
    exec_warpgroup(G, wg);
    for (int w = 4 * wg; w < 4 * wg + 4; ++w) B.warps[w].epoch = ++r.epoch_counter;
    for (int t = 0; t < 128; ++t) make_runnable(128 * wg + t);
  }
  switch_to_scheduler();
}
}  // namespace

void wgmma_mma_async(WgmmaIO& io) { warpgroup_collective(WgKind::kMma, 0, &io); }
void wgmma_commit_group() { warpgroup_collective(WgKind::kCommit, 0, nullptr); }
void wgmma_wait_group(int n) {
  if (n < 0 || n > 7) fail("cuda_emu: wgmma.wait_group N must be in [0, 7]");
  warpgroup_collective(WgKind::kWait, n, nullptr);
}
void wgmma_fence() { cur_fiber("wgmma.fence").wg_fenced = true; }
void fence_proxy_async() { ++cur_fiber("fence.proxy.async").proxy_fences; }

}  // namespace cuda_emu

// ------------------------------------------------------------------------------------------------
// Runtime API.
const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}
cudaError_t cudaGetLastError() {
  cudaError_t e = cuda_emu::rt().last_error;
  cuda_emu::rt().last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return cuda_emu::rt().last_error; }
