// Tests of the emulator itself: each emulated instruction against the PTX ISA's tables, the scheduler,
// cp.async groups, the race and deadlock detectors and the launch checks. Run by tests/test_cuda_emu.py:
//   emu_selftest <case>          prints "PASS <case>" and exits 0, or prints the failure and exits 1
//   emu_selftest convert IN OUT  float32 values of IN -> their bf16 bits then their fp16 bits in OUT
//
// The fragment maps used here are written in the inverse direction of the emulator's (matrix element ->
// lane, register, half), from the ISA's figures for mma.m16n8k16 and ldmatrix, so that a transcription
// error in one of the two shows up as a mismatch. The ldmatrix + mma case uses the address patterns that
// CUTLASS and FlashAttention-2 use to feed mma.m16n8k16 (A by .x4, B by .x2 from a [n][k] tile, B by
// .x2.trans from a [k][n] tile): it checks that the two emulated instructions compose into a matrix product.
// The wgmma cases place A, C and B by the ISA's figures read in the inverse direction too (element -> thread,
// register) and B's core matrices by explicit loops over the "Shared Memory Matrix Layout" description,
// with leading / stride byte offsets that differ, so that swapping them fails.
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "cuda_emu.h"
#include "ptx.cuh"

namespace {

using vefast::ptx::launch;

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};
#define EXPECT(cond, ...)                                                 \
  do {                                                                    \
    if (!(cond)) {                                                        \
      char buf_[512];                                                     \
      snprintf(buf_, sizeof buf_, __VA_ARGS__);                           \
      throw Failure(std::string(#cond) + ": " + buf_);                    \
    }                                                                     \
  } while (0)

// Runs a kernel launch that must fail inside the emulator with a message containing `needle`.
template <typename F>
void expect_emu_error(F&& f, const char* needle) {
  try {
    f();
  } catch (const cuda_emu::Error& e) {
    EXPECT(std::string(e.what()).find(needle) != std::string::npos, "error '%s' lacks '%s'", e.what(), needle);
    printf("  (expected) %s\n", e.what());
    return;
  }
  throw Failure(std::string("no emulator error; expected one containing '") + needle + "'");
}

uint16_t to16(float f, int type) {
  return type == 0 ? cuda_emu::float_to_bf16_bits(f) : cuda_emu::float_to_half_bits(f);
}
float from16(uint16_t h, int type) {
  return type == 0 ? cuda_emu::bf16_bits_to_float(h) : cuda_emu::half_bits_to_float(h);
}
uint32_t pack2(uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16); }

// ---- mma.m16n8k16: inverse fragment maps from the ISA figures (element -> lane, register, half) ----
// A (16x16): element (r, c) sits in lane (r % 8) * 4 + (c % 8) / 2, register (c / 8) * 2 + r / 8, half c % 2.
// B (16x8):  element (k, n) sits in lane n * 4 + (k % 8) / 2, register k / 8, half k % 2.
// C (16x8):  element (r, n) sits in lane (r % 8) * 4 + n / 2, index (r / 8) * 2 + n % 2.
struct MmaCase {
  uint16_t A[16][16], B[16][8];
  float C[16][8], D[16][8];
  int type;
};

void mma_kernel(MmaCase* mc) {
  const int lane = threadIdx.x;
  uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float d[4];
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      if ((r % 8) * 4 + (c % 8) / 2 == lane)
        a[(c / 8) * 2 + r / 8] |= static_cast<uint32_t>(mc->A[r][c]) << (16 * (c % 2));
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 8; ++n)
      if (n * 4 + (k % 8) / 2 == lane) b[k / 8] |= static_cast<uint32_t>(mc->B[k][n]) << (16 * (k % 2));
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 8; ++n)
      if ((r % 8) * 4 + n / 2 == lane) d[(r / 8) * 2 + n % 2] = mc->C[r][n];
  if (mc->type == 0)
    vefast::ptx::mma_m16n8k16_bf16(d, a, b);
  else
    vefast::ptx::mma_m16n8k16_f16(d, a, b);
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 8; ++n)
      if ((r % 8) * 4 + n / 2 == lane) mc->D[r][n] = d[(r / 8) * 2 + n % 2];
}

void test_mma() {
  std::mt19937 gen(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int type = 0; type < 2; ++type) {
    for (int rep = 0; rep < 4; ++rep) {
      MmaCase mc{};
      mc.type = type;
      for (auto& row : mc.A)
        for (auto& x : row) x = to16(nd(gen), type);
      for (auto& row : mc.B)
        for (auto& x : row) x = to16(nd(gen), type);
      for (auto& row : mc.C)
        for (auto& x : row) x = nd(gen);
      EXPECT(launch(mma_kernel, dim3(1), dim3(32), 0, nullptr, &mc) == cudaSuccess, "launch");
      for (int r = 0; r < 16; ++r)
        for (int n = 0; n < 8; ++n) {
          double ref = mc.C[r][n];
          for (int k = 0; k < 16; ++k)
            ref += static_cast<double>(from16(mc.A[r][k], type)) * static_cast<double>(from16(mc.B[k][n], type));
          EXPECT(std::fabs(mc.D[r][n] - ref) <= 1e-6 * (1.0 + std::fabs(ref)), "type %d D[%d][%d] = %g, ref %g",
                 type, r, n, mc.D[r][n], ref);
        }
    }
  }
}

// ---- ldmatrix: row addresses from lanes 8j..8j+7; inverse map from the ISA figure: element (row, col)
// of matrix j goes to lane row * 4 + col / 2, register j, half col % 2 (with .trans: element (row, col)
// goes to lane col * 4 + row / 2, half row % 2). ----
struct LdmCase {
  int num;
  bool trans;
  int perm[32];       // matrix j row r is stored at shared row perm[8j + r]
  uint32_t out[32][4];
};

uint16_t code(int j, int r, int c) { return static_cast<uint16_t>(1000 + j * 64 + r * 8 + c); }

void ldm_kernel(LdmCase* lc) {
  uint16_t* sm = reinterpret_cast<uint16_t*>(vefast::ptx::dynamic_smem());  // 32 rows of 8 elements
  const int lane = threadIdx.x;
  // lane l stores row l % 8 of matrix l / 8 (at its permuted place), then all read
  for (int c = 0; c < 8; ++c) vefast::ptx::st_shared(sm + lc->perm[lane] * 8 + c, code(lane / 8, lane % 8, c));
  __syncwarp();
  const void* p = sm + lc->perm[lane] * 8;
  uint32_t r[4] = {0, 0, 0, 0};
  using namespace vefast::ptx;
  if (lc->num == 1) lc->trans ? ldmatrix_x1_trans(r, p) : ldmatrix_x1(r, p);
  if (lc->num == 2) lc->trans ? ldmatrix_x2_trans(r, p) : ldmatrix_x2(r, p);
  if (lc->num == 4) lc->trans ? ldmatrix_x4_trans(r, p) : ldmatrix_x4(r, p);
  for (int j = 0; j < 4; ++j) lc->out[lane][j] = r[j];
}

void test_ldmatrix() {
  std::mt19937 gen(3);
  for (int num : {1, 2, 4}) {
    for (bool trans : {false, true}) {
      LdmCase lc{};
      lc.num = num;
      lc.trans = trans;
      std::vector<int> perm(32);
      for (int i = 0; i < 32; ++i) perm[i] = i;
      std::shuffle(perm.begin(), perm.end(), gen);
      for (int i = 0; i < 32; ++i) lc.perm[i] = perm[i];
      EXPECT(launch(ldm_kernel, dim3(1), dim3(32), 32 * 16, nullptr, &lc) == cudaSuccess, "launch");
      uint16_t expect[32][4][2] = {};
      for (int j = 0; j < num; ++j)
        for (int row = 0; row < 8; ++row)
          for (int col = 0; col < 8; ++col) {
            const int lane = trans ? col * 4 + row / 2 : row * 4 + col / 2;
            const int half = trans ? row % 2 : col % 2;
            expect[lane][j][half] = code(j, row, col);
          }
      for (int lane = 0; lane < 32; ++lane)
        for (int j = 0; j < num; ++j) {
          const uint32_t e = pack2(expect[lane][j][0], expect[lane][j][1]);
          EXPECT(lc.out[lane][j] == e, "x%d trans=%d lane %d reg %d: got %08x want %08x", num, trans, lane, j,
                 lc.out[lane][j], e);
        }
    }
  }
}

// ---- ldmatrix + mma compose into a product (CUTLASS / FlashAttention-2 address patterns) ----
// S = Q K^T with Q (16 x 16, [m][k]) and K (8 x 16, [n][k]); O = P V with P = Q (16 x 16) and V (16 x 8, [k][n]).
struct ComposeCase {
  uint16_t Q[16][16], K[8][16], V[16][8];
  float S[16][8], O[16][8];
  int type;
};

void compose_kernel(ComposeCase* cc) {
  using namespace vefast::ptx;
  uint16_t* sQ = reinterpret_cast<uint16_t*>(dynamic_smem());  // [16][16 + 8] (padded rows)
  uint16_t* sK = sQ + 16 * 24;                                  // [8][16 + 8]
  uint16_t* sV = sK + 8 * 24;                                   // [16][8 + 8]
  const int lane = threadIdx.x;
  for (int i = lane; i < 16 * 16; i += 32) st_shared(sQ + (i / 16) * 24 + i % 16, cc->Q[i / 16][i % 16]);
  for (int i = lane; i < 8 * 16; i += 32) st_shared(sK + (i / 16) * 24 + i % 16, cc->K[i / 16][i % 16]);
  for (int i = lane; i < 16 * 8; i += 32) st_shared(sV + (i / 8) * 16 + i % 8, cc->V[i / 8][i % 8]);
  __syncwarp();
  uint32_t a[4], bk[2], bv[2];
  ldmatrix_x4(a, sQ + (lane % 16) * 24 + (lane / 16) * 8);            // A: rows lane % 16, k half lane / 16
  ldmatrix_x2(bk, sK + (lane % 8) * 24 + ((lane / 8) % 2) * 8);       // B = K^T: rows n, k halves
  ldmatrix_x2_trans(bv, sV + (lane % 16) * 16);                        // B = V: rows k (lanes >= 16 ignored)
  float s[4] = {0, 0, 0, 0}, o[4] = {0, 0, 0, 0};
  if (cc->type == 0) {
    mma_m16n8k16_bf16(s, a, bk);
    mma_m16n8k16_bf16(o, a, bv);
  } else {
    mma_m16n8k16_f16(s, a, bk);
    mma_m16n8k16_f16(o, a, bv);
  }
  const int g = lane / 4, t = lane % 4;  // C layout: c0, c1 = (g, 2t..2t+1), c2, c3 = (g + 8, 2t..2t+1)
  for (int i = 0; i < 4; ++i) {
    cc->S[g + 8 * (i / 2)][2 * t + i % 2] = s[i];
    cc->O[g + 8 * (i / 2)][2 * t + i % 2] = o[i];
  }
}

void test_ldmatrix_mma_compose() {
  std::mt19937 gen(11);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int type = 0; type < 2; ++type) {
    ComposeCase cc{};
    cc.type = type;
    for (auto& r : cc.Q)
      for (auto& x : r) x = to16(nd(gen), type);
    for (auto& r : cc.K)
      for (auto& x : r) x = to16(nd(gen), type);
    for (auto& r : cc.V)
      for (auto& x : r) x = to16(nd(gen), type);
    EXPECT(launch(compose_kernel, dim3(1), dim3(32), (16 * 24 + 8 * 24 + 16 * 16) * 2, nullptr, &cc) == cudaSuccess,
           "launch");
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 8; ++n) {
        double s = 0, o = 0;
        for (int k = 0; k < 16; ++k) {
          s += double(from16(cc.Q[m][k], type)) * double(from16(cc.K[n][k], type));
          o += double(from16(cc.Q[m][k], type)) * double(from16(cc.V[k][n], type));
        }
        EXPECT(std::fabs(cc.S[m][n] - s) <= 1e-5 * (1 + std::fabs(s)), "S[%d][%d] %g vs %g", m, n, cc.S[m][n], s);
        EXPECT(std::fabs(cc.O[m][n] - o) <= 1e-5 * (1 + std::fabs(o)), "O[%d][%d] %g vs %g", m, n, cc.O[m][n], o);
      }
  }
}

// ---- cp.async groups ----
struct CpCase {
  alignas(16) uint8_t src[4][16];
  uint8_t seen[8][16];
};

bool all_ff(const uint8_t* p) {
  for (int i = 0; i < 16; ++i)
    if (p[i] != 0xff) return false;
  return true;
}

void cp_kernel(CpCase* cc) {
  using namespace vefast::ptx;
  uint8_t* sm = dynamic_smem();
  auto snap = [&](int slot, int buf) { memcpy(cc->seen[slot], sm + 16 * buf, 16); };
  if (threadIdx.x != 0) return;
  cp_async_cg_16(sm, cc->src[0]);
  snap(0, 0);  // before any wait: poisoned
  cp_async_commit();
  cp_async_ca_16(sm + 16, cc->src[1], 6);  // 6 bytes copied, 10 zero-filled
  cp_async_commit();
  cp_async_wait<1>();  // group 0 done, group 1 pending
  snap(1, 0);
  snap(2, 1);
  cp_async_cg_16(sm + 32, cc->src[2]);  // not committed
  cp_async_wait<0>();                   // waits for committed groups only
  snap(3, 1);
  snap(4, 2);
  cp_async_commit();
  cp_async_wait<0>();
  snap(5, 2);
}

void test_cp_async() {
  CpCase cc{};
  for (int b = 0; b < 4; ++b)
    for (int i = 0; i < 16; ++i) cc.src[b][i] = static_cast<uint8_t>(16 * b + i + 1);
  EXPECT(launch(cp_kernel, dim3(1), dim3(32), 64, nullptr, &cc) == cudaSuccess, "launch");
  EXPECT(all_ff(cc.seen[0]), "destination must stay poisoned until wait_group");
  EXPECT(memcmp(cc.seen[1], cc.src[0], 16) == 0, "group 0 complete after wait_group 1");
  EXPECT(all_ff(cc.seen[2]), "group 1 still pending after wait_group 1");
  bool zfill = memcmp(cc.seen[3], cc.src[1], 6) == 0;
  for (int i = 6; i < 16; ++i) zfill = zfill && cc.seen[3][i] == 0;
  EXPECT(zfill, "src-size 6: 6 bytes copied, the rest zero");
  EXPECT(all_ff(cc.seen[4]), "an uncommitted copy is not completed by wait_group 0");
  EXPECT(memcmp(cc.seen[5], cc.src[2], 16) == 0, "completed once committed and waited for");
}

void cp_misaligned_kernel(CpCase* cc) {
  if (threadIdx.x == 0) vefast::ptx::cp_async_cg_16(vefast::ptx::dynamic_smem() + 8, cc->src[0]);
}
void test_cp_async_misaligned() {
  CpCase cc{};
  expect_emu_error([&] { launch(cp_misaligned_kernel, dim3(1), dim3(32), 64, nullptr, &cc); }, "16-byte aligned");
}

// A consumer that reads a cp.async destination after the barrier although the producer never waited:
// the read is reported (a copy in flight), or, if the producer's wait ran first, the read is a race.
void cp_nowait_kernel(CpCase* cc) {
  using namespace vefast::ptx;
  uint8_t* sm = dynamic_smem();
  if (threadIdx.x == 0) {
    cp_async_cg_16(sm, cc->src[0]);
    cp_async_commit();
  }
  __syncthreads();
  if (threadIdx.x == 32) {
    uint4 v = ld_shared(reinterpret_cast<const uint4*>(sm));
    memcpy(cc->seen[0], &v, 16);
  }
  if (threadIdx.x == 0) cp_async_wait<0>();
}
void test_cp_async_missing_wait() {
  CpCase cc{};
  for (int i = 0; i < 16; ++i) cc.src[0][i] = static_cast<uint8_t>(i + 1);
  int poisoned = 0, races = 0;
  for (uint64_t seed = 1; seed <= 8; ++seed) {
    cuda_emu::set_seed(seed);
    try {
      launch(cp_nowait_kernel, dim3(1), dim3(64), 64, nullptr, &cc);
      poisoned += all_ff(cc.seen[0]);
    } catch (const cuda_emu::Error& e) {
      const std::string m = e.what();
      races += m.find("race") != std::string::npos || m.find("has not been waited for") != std::string::npos;
    }
  }
  printf("  missing wait_group over 8 seeds: %d poisoned reads, %d errors reported\n", poisoned, races);
  EXPECT(poisoned + races == 8, "every run must expose the missing wait (poisoned %d, races %d)", poisoned, races);
}

// ---- shuffles and votes ----
struct ShflCase {
  int out[8][32];
};
void shfl_kernel(ShflCase* sc) {
  const int l = threadIdx.x;
  sc->out[0][l] = __shfl_xor_sync(0xffffffffu, 100 + l, 5);
  sc->out[1][l] = __shfl_down_sync(0xffffffffu, 100 + l, 3, 16);
  sc->out[2][l] = __shfl_up_sync(0xffffffffu, 100 + l, 2, 8);
  sc->out[3][l] = __shfl_sync(0xffffffffu, 100 + l, 9, 8);
  sc->out[4][l] = static_cast<int>(__ballot_sync(0xffffffffu, l % 3 == 0));
  sc->out[5][l] = __any_sync(0xffffffffu, l == 17);
  sc->out[6][l] = __all_sync(0xffffffffu, l != 17);
  sc->out[7][l] = static_cast<int>(__shfl_xor_sync(0xffffffffu, 0.5f + l, 1) * 2.f);
}
void test_shuffles() {
  ShflCase sc{};
  EXPECT(launch(shfl_kernel, dim3(1), dim3(32), 0, nullptr, &sc) == cudaSuccess, "launch");
  unsigned ballot = 0;
  for (int l = 0; l < 32; l += 3) ballot |= 1u << l;
  for (int l = 0; l < 32; ++l) {
    EXPECT(sc.out[0][l] == 100 + (l ^ 5), "xor lane %d: %d", l, sc.out[0][l]);
    EXPECT(sc.out[1][l] == 100 + ((l % 16) + 3 < 16 ? l + 3 : l), "down lane %d: %d", l, sc.out[1][l]);
    EXPECT(sc.out[2][l] == 100 + ((l % 8) >= 2 ? l - 2 : l), "up lane %d: %d", l, sc.out[2][l]);
    EXPECT(sc.out[3][l] == 100 + (l / 8) * 8 + 1, "idx lane %d: %d", l, sc.out[3][l]);
    EXPECT(static_cast<unsigned>(sc.out[4][l]) == ballot, "ballot");
    EXPECT(sc.out[5][l] == 1 && sc.out[6][l] == 0, "any / all");
    EXPECT(sc.out[7][l] == static_cast<int>((0.5f + (l ^ 1)) * 2.f), "float xor");
  }
}

// ---- scheduling: the order of threads between barriers varies; barriers order phases ----
struct OrderCase {
  int log[3][256];
  int n[3];
  int bad;
};
void order_kernel(OrderCase* oc) {
  for (int phase = 0; phase < 3; ++phase) {
    oc->log[phase][oc->n[phase]++] = threadIdx.x;
    // every thread of the previous phase has logged before anyone logs in this one
    if (phase > 0 && oc->n[phase - 1] != 256) oc->bad = 1;
    __syncthreads();
  }
}
void test_scheduling() {
  std::set<std::vector<int>> orders;
  for (uint64_t seed = 1; seed <= 3; ++seed) {
    cuda_emu::set_seed(seed);
    OrderCase oc{};
    EXPECT(launch(order_kernel, dim3(1), dim3(256), 0, nullptr, &oc) == cudaSuccess, "launch");
    EXPECT(oc.bad == 0, "a thread ran ahead of a barrier");
    for (int phase = 0; phase < 3; ++phase) {
      EXPECT(oc.n[phase] == 256, "phase %d logged %d threads", phase, oc.n[phase]);
      orders.insert(std::vector<int>(oc.log[phase], oc.log[phase] + 256));
    }
  }
  EXPECT(orders.size() == 9, "thread orders must differ between phases and seeds: %zu distinct of 9", orders.size());
}

// ---- deadlock and divergence detection ----
void divergent_barrier_kernel(int*) {
  if (threadIdx.x < 64) __syncthreads();
}
void divergent_warp_kernel(int*) {
  if (threadIdx.x == 0)
    __shfl_xor_sync(0xffffffffu, 1, 1);
  else
    __ballot_sync(0xffffffffu, 1);
}
void partial_mask_kernel(int*) { __shfl_xor_sync(0x0000ffffu, 1, 1); }
void test_deadlock_detection() {
  expect_emu_error([] { launch(divergent_barrier_kernel, dim3(1), dim3(128), 0, nullptr, nullptr); }, "deadlock");
  expect_emu_error([] { launch(divergent_warp_kernel, dim3(1), dim3(32), 0, nullptr, nullptr); }, "divergent warp");
  expect_emu_error([] { launch(partial_mask_kernel, dim3(1), dim3(32), 0, nullptr, nullptr); }, "full-warp masks");
}

// ---- race detector ----
struct RaceCase {
  int writer, reader;
  bool barrier, syncwarp;
};
void race_kernel(RaceCase* rc) {
  float* sm = reinterpret_cast<float*>(vefast::ptx::dynamic_smem());
  if (threadIdx.x == 63) vefast::ptx::st_shared(sm + 5, 0.f);  // initialized in an earlier interval
  __syncthreads();
  if (static_cast<int>(threadIdx.x) == rc->writer) vefast::ptx::st_shared(sm + 5, 1.f);
  if (rc->barrier) __syncthreads();
  if (rc->syncwarp && threadIdx.x < 32) __syncwarp();
  if (static_cast<int>(threadIdx.x) == rc->reader) (void)vefast::ptx::ld_shared(sm + 5);
}
void test_race_detection() {
  auto run = [](RaceCase rc) { launch(race_kernel, dim3(1), dim3(64), 64, nullptr, &rc); };
  expect_emu_error([&] { run({0, 40, false, false}); }, "race");  // other warp, no barrier
  expect_emu_error([&] { run({0, 1, false, false}); }, "race");   // same warp, no __syncwarp
  run({0, 40, true, false});                                       // barrier between: fine
  run({0, 1, false, true});                                        // __syncwarp between: fine
  run({3, 3, false, false});                                       // own write: fine
  expect_emu_error([&] { run({40, 0, false, false}); }, "race");  // read first or write first: both orders
}

// ---- launch checks ----
void empty_kernel(int*) {}
void test_launch_checks() {
  EXPECT(launch(empty_kernel, dim3(1), dim3(2048), 0, nullptr, nullptr) == cudaErrorInvalidConfiguration,
         "2048 threads per block must be refused");
  EXPECT(launch(empty_kernel, dim3(1), dim3(32), 64 * 1024, nullptr, nullptr) == cudaErrorInvalidValue,
         "64 KiB of dynamic shared memory without cudaFuncSetAttribute must be refused");
  EXPECT(cudaFuncSetAttribute(empty_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024) == cudaSuccess,
         "attribute");
  EXPECT(launch(empty_kernel, dim3(1), dim3(32), 64 * 1024, nullptr, nullptr) == cudaSuccess, "64 KiB after opt-in");
  EXPECT(cudaFuncSetAttribute(empty_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024) ==
             cudaErrorInvalidValue,
         "200 KiB is above sm_80's limit");
  (void)cudaGetLastError();
}

// ---- shared memory: poisoned before every block; reading past the dynamic size faults ----
struct PoisonCase {
  int poisoned[4];
};
void poison_kernel(PoisonCase* pc) {
  uint32_t* sm = reinterpret_cast<uint32_t*>(vefast::ptx::dynamic_smem());
  if (threadIdx.x == 0) {
    pc->poisoned[blockIdx.x] = *reinterpret_cast<volatile uint32_t*>(sm + 7) == 0xffffffffu;  // untracked read
    vefast::ptx::st_shared(sm + 7, 0u);  // the next block must not see this
  }
}
void test_smem_poisoned() {
  PoisonCase pc{};
  EXPECT(launch(poison_kernel, dim3(4), dim3(32), 64, nullptr, &pc) == cudaSuccess, "launch");
  for (int b = 0; b < 4; ++b) EXPECT(pc.poisoned[b] == 1, "block %d saw unpoisoned shared memory", b);
}
void oob_kernel(int* out) {
  volatile unsigned char* sm = vefast::ptx::dynamic_smem();
  if (threadIdx.x == 0) *out = sm[1000 + 4096];  // far past the 1000 bytes launched
}
void test_smem_oob() {  // must die by SIGSEGV (checked by the Python test)
  int out = 0;
  launch(oob_kernel, dim3(1), dim3(32), 1000, nullptr, &out);
  printf("no fault: %d\n", out);
}

// Reading a cp.async destination before its wait_group (own copy), overwriting a copy in flight, and reading
// shared memory no thread wrote: each reported.
void pending_read_kernel(CpCase* cc) {
  using namespace vefast::ptx;
  uint8_t* sm = dynamic_smem();
  if (threadIdx.x != 0) return;
  cp_async_cg_16(sm, cc->src[0]);
  cp_async_commit();
  (void)ld_shared(reinterpret_cast<const uint4*>(sm));
}
void pending_write_kernel(CpCase* cc) {
  using namespace vefast::ptx;
  uint8_t* sm = dynamic_smem();
  if (threadIdx.x != 0) return;
  cp_async_cg_16(sm, cc->src[0]);
  st_shared(reinterpret_cast<uint32_t*>(sm + 4), 0u);
}
void uninit_read_kernel(CpCase*) {
  using namespace vefast::ptx;
  uint32_t* sm = reinterpret_cast<uint32_t*>(dynamic_smem());
  if (threadIdx.x == 0) st_shared(sm, 1u);
  __syncthreads();
  (void)ld_shared(sm + (threadIdx.x == 5 ? 1 : 0));
}
void test_inflight_and_uninitialized() {
  CpCase cc{};
  expect_emu_error([&] { launch(pending_read_kernel, dim3(1), dim3(32), 64, nullptr, &cc); }, "not been waited for");
  expect_emu_error([&] { launch(pending_write_kernel, dim3(1), dim3(32), 64, nullptr, &cc); }, "has not been waited");
  expect_emu_error([&] { launch(uninit_read_kernel, dim3(1), dim3(64), 64, nullptr, &cc); }, "uninitialized");
}

// ---- wgmma.mma_async.m64nNk16 (RS: A in registers, B by a no-swizzle descriptor) ----
// Inverse maps from the ISA's figures (CUTLASS ALayout_64x16 / CLayout_64xN):
// A (64 x 16): element (r, c) is in thread 32 (r / 16) + 4 (r % 8) + (c % 8) / 2, element index
//   j = c % 2 + 2 ((r % 16) / 8) + 4 (c / 8) (register j / 2, half j % 2).
// D (64 x N): element (r, c) is in thread 32 (r / 16) + 4 (r % 8) + (c % 8) / 2,
//   index c % 2 + 2 ((r % 16) / 8) + 4 (c / 8).
int wg_thread(int r, int c) { return 32 * (r / 16) + 4 * (r % 8) + (c % 8) / 2; }
int wg_index(int r, int c) { return c % 2 + 2 * ((r % 16) / 8) + 4 * (c / 8); }

struct WgCase {
  int n, type, tnsp, scale_d;
  uint32_t lbo, sbo;           // byte offsets between B's core matrices adjacent in K / in N
  uint16_t A[2][64][16], B[2][16][128];  // two products accumulated in one group (chain) when nmma == 2
  float C[64][128], D[64][128];
  int nmma = 1;
  // async checks
  int nan_before_wait = 0, finite_after_wait = 0;
};

// Writes B (16 x n, 16-bit) into shared memory at `base` as core matrices of 8 rows x 16 bytes: K-major,
// each row holds the 8 K-consecutive elements k0..k0+7 of one n; N-major, the 8 N-consecutive elements
// n0..n0+7 of one k. Core matrix (k / 8, n / 8) starts at (k / 8) * lbo + (n / 8) * sbo.
void store_b(unsigned char* base, const uint16_t (*B)[128], int n, int tnsp, uint32_t lbo, uint32_t sbo) {
  for (int kc = 0; kc < 2; ++kc)
    for (int nc = 0; nc < n / 8; ++nc) {
      unsigned char* core = base + kc * lbo + nc * sbo;
      for (int row = 0; row < 8; ++row)
        for (int e = 0; e < 8; ++e) {
          const uint16_t v = tnsp ? B[8 * kc + row][8 * nc + e] : B[8 * kc + e][8 * nc + row];
          vefast::ptx::st_shared(reinterpret_cast<uint16_t*>(core + row * 16 + e * 2), v);
        }
    }
}

template <typename T, int N, int TB>
void wgmma_kernel(WgCase* wc) {
  using namespace vefast::ptx;
  unsigned char* sm = dynamic_smem();
  const int t = threadIdx.x;
  const uint32_t bbytes = 2 * 16 * 1024;  // room for both B matrices with any of the tested offsets
  if (t == 0)
    for (int m = 0; m < wc->nmma; ++m) store_b(sm + m * bbytes, wc->B[m], N, TB, wc->lbo, wc->sbo);
  fence_proxy_async();
  __syncthreads();
  uint32_t a[2][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
  float d[N / 2];
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < 16; ++c)
      if (wg_thread(r, c) == t) {
        const int j = wg_index(r, c);
        for (int m = 0; m < wc->nmma; ++m) a[m][j / 2] |= static_cast<uint32_t>(wc->A[m][r][c]) << (16 * (j % 2));
      }
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < N; ++c)
      if (wg_thread(r, c) == t) d[wg_index(r, c)] = wc->C[r][c];
  wgmma_fence();
  for (int m = 0; m < wc->nmma; ++m)
    wgmma_rs<T, N, TB>(d, a[m], smem_desc(smem_u32(sm + m * bbytes), wc->lbo, wc->sbo), m == 0 ? wc->scale_d : 1);
  wgmma_commit();
  if (t == 0) wc->nan_before_wait = std::isnan(d[0]) && std::isnan(d[N / 2 - 1]);
  wgmma_wait<0>();
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < N; ++c)
      if (wg_thread(r, c) == t) wc->D[r][c] = d[wg_index(r, c)];
}

template <typename T, int N, int TB>
void run_wgmma_case(int type, int scale_d, int nmma, uint32_t lbo, uint32_t sbo, std::mt19937& gen) {
  std::normal_distribution<float> nd(0.f, 1.f);
  static WgCase wc;
  wc = WgCase{};
  wc.n = N, wc.type = type, wc.tnsp = TB, wc.scale_d = scale_d, wc.lbo = lbo, wc.sbo = sbo, wc.nmma = nmma;
  for (int m = 0; m < 2; ++m) {
    for (auto& row : wc.A[m])
      for (auto& x : row) x = to16(nd(gen), type);
    for (auto& row : wc.B[m])
      for (auto& x : row) x = to16(nd(gen), type);
  }
  for (auto& row : wc.C)
    for (auto& x : row) x = nd(gen);
  EXPECT(cudaFuncSetAttribute(wgmma_kernel<T, N, TB>, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024) ==
             cudaSuccess, "attribute");
  EXPECT(launch(wgmma_kernel<T, N, TB>, dim3(1), dim3(128), 64 * 1024, nullptr, &wc) == cudaSuccess, "launch");
  EXPECT(wc.nan_before_wait, "accumulators must read NaN between mma_async and wait_group");
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < N; ++c) {
      double ref = scale_d ? wc.C[r][c] : 0.0;
      for (int m = 0; m < nmma; ++m)
        for (int k = 0; k < 16; ++k)
          ref += static_cast<double>(from16(wc.A[m][r][k], type)) * static_cast<double>(from16(wc.B[m][k][c], type));
      EXPECT(std::fabs(wc.D[r][c] - ref) <= 2e-6 * (1.0 + std::fabs(ref)),
             "N %d type %d trans %d scale_d %d nmma %d lbo %u sbo %u: D[%d][%d] = %g, ref %g", N, type, TB, scale_d,
             nmma, lbo, sbo, r, c, wc.D[r][c], ref);
    }
}

template <int N, int TB>
void wgmma_shape(std::mt19937& gen) {
  // K-major: core matrices adjacent in K 128 B apart, in N 256 B; N-major: the transposed roles; then the
  // chunk-major tiles the kernels use (kernels/flash_common.cuh CoreMatrices<ROWS>).
  const uint32_t lbo = TB ? 128 * (N / 8) : 128, sbo = TB ? 128 : 256;
  run_wgmma_case<__nv_bfloat16, N, TB>(0, 1, 1, lbo, sbo, gen);
  run_wgmma_case<__half, N, TB>(1, 0, 1, lbo, sbo, gen);
  run_wgmma_case<__nv_bfloat16, N, TB>(0, 1, 2, lbo, sbo, gen);  // two operations chained in one group
  if (TB)
    run_wgmma_case<__half, N, TB>(1, 1, 1, 128, 16 * 16, gen);       // V of P V: keys (K) 128 B, head dim 16 rows
  else
    run_wgmma_case<__half, N, TB>(1, 1, 1, N * 16, 128, gen);        // K of Q K^T: head dim (K) N rows, keys 128 B
}

void test_wgmma() {
  std::mt19937 gen(11);
  wgmma_shape<64, 0>(gen);
  wgmma_shape<64, 1>(gen);
  wgmma_shape<80, 0>(gen);
  wgmma_shape<80, 1>(gen);
  wgmma_shape<96, 1>(gen);
  wgmma_shape<128, 0>(gen);
  wgmma_shape<128, 1>(gen);
}

void test_wgmma_descriptor() {
  using vefast::ptx::smem_desc;
  // PTX ISA "Matrix Descriptor Format": start >> 4 in bits 0-13, LBO >> 4 in 16-29, SBO >> 4 in 32-45.
  EXPECT(smem_desc(0x1230, 128, 1024) == 0x0000004000080123ull, "0x%llx",
         static_cast<unsigned long long>(smem_desc(0x1230, 128, 1024)));
  EXPECT(smem_desc(0x3FFF0, 0x3FFF0, 0x3FFF0) == 0x00003FFF3FFF3FFFull, "max fields");
  EXPECT(smem_desc(0x40010, 16, 16) == 0x0000000100010001ull, "addresses are taken modulo 2^18");
  EXPECT(smem_desc(0x100, 0, 0) + (256 >> 4) == smem_desc(0x200, 0, 0), "adding bytes >> 4 advances the start");
}

// Asynchrony and the rules around wgmma, each planted violation must be reported.
struct WgBad {
  int mode;
};
void wgmma_bad_kernel(WgBad* wb) {
  using namespace vefast::ptx;
  unsigned char* sm = dynamic_smem();
  const int t = threadIdx.x;
  const int mode = wb->mode;
  for (int i = t; i < 16 * 64; i += blockDim.x) st_shared(reinterpret_cast<uint16_t*>(sm) + i, uint16_t(0x3c00));
  if (mode != 1) fence_proxy_async();           // 1: no proxy fence after the generic writes
  if (mode != 2) __syncthreads();               // 2: no barrier between the writers and the wgmma
  uint64_t desc = smem_desc(smem_u32(sm), 128, 256);
  if (mode == 3) desc |= 1ull << 62;            // 3: a swizzle mode
  if (mode == 4) desc |= 1ull << 47;            // 4: a reserved bit
  const uint32_t a[4] = {0x3c003c00u, 0x3c003c00u, 0x3c003c00u, 0x3c003c00u};
  float d[32] = {};
  if (mode != 5) wgmma_fence();                 // 5: no wgmma.fence
  if (mode == 6 && t >= 96) return;             // 6: a warp of the warpgroup skips the wgmma
  wgmma_rs<__half, 64, 0>(d, a, desc, 1);
  wgmma_commit();
  if (mode == 7 && t == 5) st_shared(reinterpret_cast<uint16_t*>(sm), uint16_t(0));  // 7: operand overwritten
  if (mode == 8) return;                        // 8: no wait_group before the exit
  if (mode == 9) {                              // 9: only wait<1> with one group: nothing retired, then exit
    wgmma_wait<1>();
    return;
  }
  wgmma_wait<0>();
  if (t == 0 && d[0] != 16.f) wb->mode = -1;
}

void test_wgmma_rules() {
  const auto run = [](int mode, int threads = 128) {
    WgBad wb{mode};
    launch(wgmma_bad_kernel, dim3(1), dim3(threads), 4096, nullptr, &wb);
    return wb.mode;
  };
  EXPECT(run(0) == 0, "the correct kernel computes 16 (ones times ones over k = 16)");
  EXPECT(run(0, 256) == 0, "two warpgroups");
  expect_emu_error([&] { run(1); }, "no fence.proxy.async");
  expect_emu_error([&] { run(2); }, "race");
  expect_emu_error([&] { run(3); }, "swizzle mode 1 is not emulated");
  expect_emu_error([&] { run(4); }, "reserved bits");
  expect_emu_error([&] { run(5); }, "has not executed wgmma.fence");
  expect_emu_error([&] { run(6); }, "warpgroup");
  expect_emu_error([&] { run(7); }, "in-flight wgmma.mma_async");
  expect_emu_error([&] { run(8); }, "in flight (no wgmma.wait_group");
  expect_emu_error([&] { run(9); }, "in flight (no wgmma.wait_group");
  expect_emu_error([&] { run(0, 96); }, "incomplete");
}

// wait_group N retires all but the newest N groups, oldest first.
void wgmma_groups_kernel(int* out) {
  using namespace vefast::ptx;
  unsigned char* sm = dynamic_smem();
  const int t = threadIdx.x;
  for (int i = t; i < 16 * 64; i += 128) st_shared(reinterpret_cast<uint16_t*>(sm) + i, uint16_t(0x3c00));
  fence_proxy_async();
  __syncthreads();
  const uint32_t a[4] = {0x3c003c00u, 0x3c003c00u, 0x3c003c00u, 0x3c003c00u};
  float d1[32], d2[32];
  const uint64_t desc = smem_desc(smem_u32(sm), 128, 256);
  wgmma_fence();
  wgmma_rs<__half, 64, 0>(d1, a, desc, 0);
  wgmma_commit();
  wgmma_fence();
  wgmma_rs<__half, 64, 0>(d2, a, desc, 0);
  wgmma_commit();
  wgmma_wait<1>();
  if (t == 0) out[0] = d1[0] == 16.f && std::isnan(d2[0]);
  wgmma_wait<0>();
  if (t == 0) out[1] = d2[0] == 16.f;
}

void test_wgmma_groups() {
  int out[2] = {0, 0};
  EXPECT(launch(wgmma_groups_kernel, dim3(1), dim3(128), 4096, nullptr, out) == cudaSuccess, "launch");
  EXPECT(out[0] == 1, "wait_group 1 retires the older group only");
  EXPECT(out[1] == 1, "wait_group 0 retires the rest");
}

int convert(const char* in, const char* out) {
  FILE* f = fopen(in, "rb");
  if (!f) return 2;
  std::vector<float> v;
  float x;
  while (fread(&x, 4, 1, f) == 1) v.push_back(x);
  fclose(f);
  std::vector<uint16_t> o;
  for (float y : v) o.push_back(__bfloat16_as_ushort(__float2bfloat16_rn(y)));
  for (float y : v) o.push_back(__half_as_ushort(__float2half_rn(y)));
  f = fopen(out, "wb");
  fwrite(o.data(), 2, o.size(), f);
  fclose(f);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::string(argv[1]) == "convert") return convert(argv[2], argv[3]);
  const std::map<std::string, std::function<void()>> cases = {
      {"mma", test_mma},
      {"ldmatrix", test_ldmatrix},
      {"ldmatrix_mma_compose", test_ldmatrix_mma_compose},
      {"cp_async", test_cp_async},
      {"cp_async_misaligned", test_cp_async_misaligned},
      {"cp_async_missing_wait", test_cp_async_missing_wait},
      {"inflight_and_uninitialized", test_inflight_and_uninitialized},
      {"shuffles", test_shuffles},
      {"scheduling", test_scheduling},
      {"deadlock_detection", test_deadlock_detection},
      {"race_detection", test_race_detection},
      {"launch_checks", test_launch_checks},
      {"smem_poisoned", test_smem_poisoned},
      {"smem_oob", test_smem_oob},
      {"wgmma", test_wgmma},
      {"wgmma_descriptor", test_wgmma_descriptor},
      {"wgmma_rules", test_wgmma_rules},
      {"wgmma_groups", test_wgmma_groups},
  };
  if (argc != 2 || !cases.count(argv[1])) {
    fprintf(stderr, "usage: emu_selftest <case> | convert IN OUT; cases:");
    for (const auto& c : cases) fprintf(stderr, " %s", c.first.c_str());
    fprintf(stderr, "\n");
    return 2;
  }
  try {
    cases.at(argv[1])();
  } catch (const std::exception& e) {
    printf("FAIL %s: %s\n", argv[1], e.what());
    return 1;
  }
  printf("PASS %s\n", argv[1]);
  return 0;
}
