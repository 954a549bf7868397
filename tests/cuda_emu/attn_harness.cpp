// Runs the attention kernels of kernels/ (their real launchers) under the CUDA emulator on one case written by
// tests/test_cuda_emu.py:
//   attn_harness DIR
// DIR/case.txt (one "key values..." per line):
//   dtype bf16|fp16        shape B N H hd        scale S        eps E        seed SEED
//   q|k|v OFFSET SB SN SH SD      (element offset into qkv.bin and element strides)
//   dout OFFSET SB SN SH SD       (into dout.bin)
//   q_weight 0|1   k_weight 0|1   rope 0|1      (q_weight.bin, k_weight.bin, cos.bin, sin.bin: float32)
//   table_offset F                (optional: the prologue tables / weights start F floats into their buffers)
//   grad_stride S                 (optional, default 1: head-dim stride of the dq, dk, dv outputs)
//   backward 0|1
//   forward mma|sm90a|dispatch    (launch_flash_fwd_mma, launch_flash_fwd_sm90a, or launch_flash_fwd(sm))
//   sm SM                         (compute capability for "dispatch", e.g. 80, 90)
//   copies 0|1                    (1: first apply attn::flash_copy_plan as csrc/attention.cpp does -- copies
//                                  of the inputs that break the layout rule, buffers copied back for the
//                                  outputs -- and print "copies: <names>"; 0: launch on the tensors as given)
// Writes DIR/o.bin (B, N, H, hd), lse.bin (B, H, N) float32; with backward dq.bin, dk.bin, dv.bin (B, N, H, hd,
// dense) and dsum.bin (B, H, N: the kernel's D = rowsum(dO * O)). Prints the forward kernel that ran
// ("forward: mma" / "forward: sm90a") and the emulator's counters.
// Every buffer ends at an inaccessible page (reads or writes past it fault) and outputs start as NaN.
// Exit codes: 0 ok, 2 bad case, 3 emulator error (message on stderr), 4 launch error.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "attention_params.cuh"
#include "cuda_emu.h"

namespace {

using vefast::attn::Params;
using vefast::attn::Tensor4;

// A buffer that ends exactly at a PROT_NONE page (start aligned to 16 bytes).
struct Guarded {
  unsigned char* data = nullptr;
  size_t bytes = 0;
};
Guarded alloc_guarded(size_t bytes) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t rounded = (bytes + 15) / 16 * 16;
  const size_t pages = (rounded + page - 1) / page;
  void* m = mmap(nullptr, (pages + 1) * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) {
    perror("mmap");
    exit(2);
  }
  unsigned char* base = static_cast<unsigned char*>(m);
  mprotect(base + pages * page, page, PROT_NONE);
  Guarded g;
  g.data = base + pages * page - rounded;
  g.bytes = bytes;
  return g;
}

Guarded read_file(const std::string& path, size_t expect) {
  FILE* f = fopen(path.c_str(), "rb");
  if (!f) {
    fprintf(stderr, "cannot open %s\n", path.c_str());
    exit(2);
  }
  fseek(f, 0, SEEK_END);
  const size_t n = static_cast<size_t>(ftell(f));
  fseek(f, 0, SEEK_SET);
  if (expect != 0 && n != expect) {
    fprintf(stderr, "%s: %zu bytes, expected %zu\n", path.c_str(), n, expect);
    exit(2);
  }
  Guarded g = alloc_guarded(n);
  if (fread(g.data, 1, n, f) != n) exit(2);
  fclose(f);
  return g;
}

void write_file(const std::string& path, const void* p, size_t n) {
  FILE* f = fopen(path.c_str(), "wb");
  if (!f || fwrite(p, 1, n, f) != n) {
    fprintf(stderr, "cannot write %s\n", path.c_str());
    exit(2);
  }
  fclose(f);
}

using vefast::attn::DType;

// A dense (B, N, H, hd) buffer that ends at a guard page, NaN-filled, and its view with head-dim stride sd.
struct Out4 {
  Guarded g;
  Tensor4 t;
};
Out4 alloc_out4(int B, int N, int H, int hd, int sd) {
  Out4 o;
  const size_t elems = size_t(B) * N * H * hd * sd;
  o.g = alloc_guarded(2 * elems);
  memset(o.g.data, 0xff, 2 * elems);  // NaN: unwritten outputs show
  o.t.ptr = o.g.data;
  o.t.sd = sd;
  o.t.sh = int64_t(hd) * sd;
  o.t.sn = int64_t(H) * hd * sd;
  o.t.sb = int64_t(N) * H * hd * sd;
  return o;
}

// Element (b, n, h, d) of a 16-bit tensor view.
uint16_t& at16(const Tensor4& t, int b, int n, int h, int d) {
  return static_cast<uint16_t*>(t.ptr)[b * t.sb + n * t.sn + h * t.sh + d * t.sd];
}
// A contiguous copy of a view (what csrc's fresh_copy does).
Tensor4 copy_dense(const Tensor4& t, int B, int N, int H, int hd, std::vector<Out4>& keep) {
  keep.push_back(alloc_out4(B, N, H, hd, 1));
  const Tensor4 c = keep.back().t;
  for (int b = 0; b < B; ++b)
    for (int n = 0; n < N; ++n)
      for (int h = 0; h < H; ++h)
        for (int d = 0; d < hd; ++d) at16(c, b, n, h, d) = at16(t, b, n, h, d);
  return c;
}
const float* copy_floats(const float* p, size_t n, std::vector<Guarded>& keep) {
  keep.push_back(alloc_guarded(4 * n));
  memcpy(keep.back().data, p, 4 * n);
  return reinterpret_cast<const float*>(keep.back().data);
}

// csrc/attention.cpp's apply_copy_plan on host buffers: replaces what flash_copy_plan names; returns the
// names, and in `back` the (kernel buffer, caller tensor) pairs of outputs to copy back after the launch.
struct Copies {
  std::vector<Out4> tensors;
  std::vector<Guarded> tables;
  std::vector<std::pair<Tensor4, Tensor4>> back;
  std::string names;
};
void apply_copy_plan(Params& p, bool backward, Copies& cp) {
  const vefast::attn::CopyPlan plan = vefast::attn::flash_copy_plan(p, backward);
  const int B = p.B, N = p.N, H = p.H, hd = p.head_dim;
  const auto in = [&](bool c, Tensor4& t, const char* name) {
    if (c) t = copy_dense(t, B, N, H, hd, cp.tensors), cp.names += std::string(" ") + name;
  };
  const auto out = [&](bool c, Tensor4& t, const char* name) {
    if (!c) return;
    cp.tensors.push_back(alloc_out4(B, N, H, hd, 1));
    cp.back.emplace_back(cp.tensors.back().t, t);
    t = cp.tensors.back().t;
    cp.names += std::string(" ") + name;
  };
  const auto table = [&](bool c, const float*& f, size_t n, const char* name) {
    if (c) f = copy_floats(f, n, cp.tables), cp.names += std::string(" ") + name;
  };
  in(plan.q, p.q, "q");
  in(plan.k, p.k, "k");
  in(plan.v, p.v, "v");
  in(plan.o, p.o, "o");
  in(plan.dout, p.dout, "dout");
  out(plan.dq, p.dq, "dq");
  out(plan.dk, p.dk, "dk");
  out(plan.dv, p.dv, "dv");
  table(plan.q_weight, p.pro.q_weight, size_t(hd), "q_weight");
  table(plan.k_weight, p.pro.k_weight, size_t(hd), "k_weight");
  table(plan.cos, p.pro.cos, size_t(N) * hd, "cos");
  table(plan.sin, p.pro.sin, size_t(N) * hd, "sin");
}
void copy_back(const Copies& cp, const Params& p) {
  for (const auto& [from, to] : cp.back)
    for (int b = 0; b < p.B; ++b)
      for (int n = 0; n < p.N; ++n)
        for (int h = 0; h < p.H; ++h)
          for (int d = 0; d < p.head_dim; ++d) at16(to, b, n, h, d) = at16(from, b, n, h, d);
}

// Reads a strided output view into a dense buffer for writing.
std::vector<uint16_t> dense_of(const Tensor4& t, const Params& p) {
  std::vector<uint16_t> v;
  v.reserve(size_t(p.B) * p.N * p.H * p.head_dim);
  for (int b = 0; b < p.B; ++b)
    for (int n = 0; n < p.N; ++n)
      for (int h = 0; h < p.H; ++h)
        for (int d = 0; d < p.head_dim; ++d) v.push_back(at16(t, b, n, h, d));
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: attn_harness DIR\n");
    return 2;
  }
  const std::string dir = argv[1];
  std::ifstream in(dir + "/case.txt");
  std::map<std::string, std::vector<std::string>> kv;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string key, v;
    ls >> key;
    while (ls >> v) kv[key].push_back(v);
  }
  auto num = [&](const std::string& k, size_t i = 0) -> double {
    if (!kv.count(k) || kv[k].size() <= i) {
      fprintf(stderr, "case.txt: missing %s[%zu]\n", k.c_str(), i);
      exit(2);
    }
    return atof(kv[k][i].c_str());
  };
  const bool bf16 = kv["dtype"].at(0) == "bf16";
  const int B = int(num("shape", 0)), N = int(num("shape", 1)), H = int(num("shape", 2)), hd = int(num("shape", 3));
  cuda_emu::set_seed(static_cast<uint64_t>(num("seed")));

  Guarded qkv = read_file(dir + "/qkv.bin", 0);
  // As csrc/attention.cpp's view4: the stride of a size-1 dim is recorded as 0 (its index is always 0).
  auto view = [&](const std::string& k, Guarded& buf) {
    Tensor4 t;
    t.ptr = buf.data + 2 * static_cast<size_t>(num(k, 0));
    t.sb = B == 1 ? 0 : int64_t(num(k, 1));
    t.sn = N == 1 ? 0 : int64_t(num(k, 2));
    t.sh = H == 1 ? 0 : int64_t(num(k, 3));
    t.sd = int64_t(num(k, 4));
    return t;
  };
  Params p;
  p.q = view("q", qkv);
  p.k = view("k", qkv);
  p.v = view("v", qkv);
  p.B = B;
  p.N = N;
  p.H = H;
  p.head_dim = hd;
  p.scale = float(num("scale"));
  p.pro.eps = float(num("eps"));
  const size_t toff = kv.count("table_offset") ? size_t(num("table_offset")) : 0;
  auto read_table = [&](const char* name, size_t n) {
    Guarded raw = read_file(dir + "/" + name + ".bin", 4 * n);
    Guarded g = alloc_guarded(4 * (n + toff));
    memcpy(g.data + 4 * toff, raw.data, 4 * n);
    return reinterpret_cast<const float*>(g.data + 4 * toff);
  };
  if (num("q_weight") != 0) p.pro.q_weight = read_table("q_weight", size_t(hd));
  if (num("k_weight") != 0) p.pro.k_weight = read_table("k_weight", size_t(hd));
  if (num("rope") != 0) {
    p.pro.cos = read_table("cos", size_t(N) * hd);
    p.pro.sin = read_table("sin", size_t(N) * hd);
  }
  Out4 o = alloc_out4(B, N, H, hd, 1);
  p.o = o.t;
  Guarded lse = alloc_guarded(4 * size_t(B) * H * N);
  memset(lse.data, 0xff, lse.bytes);
  p.lse = reinterpret_cast<float*>(lse.data);

  const DType dtype = bf16 ? DType::kBF16 : DType::kFP16;
  const std::string forward = kv.count("forward") ? kv["forward"].at(0) : "mma";
  const int sm = kv.count("sm") ? int(num("sm")) : 80;
  const bool copies = kv.count("copies") && num("copies") != 0;
  const bool backward = num("backward") != 0;
  try {
    const Params given = p;  // each call starts from the caller's tensors (csrc: separate forward / backward)
    Copies cf;
    if (copies) apply_copy_plan(p, false, cf);
    cudaError_t err;
    if (forward == "sm90a") {
      err = vefast::attn::launch_flash_fwd_sm90a(p, dtype, nullptr);
    } else if (forward == "dispatch") {
      err = vefast::attn::launch_flash_fwd(p, dtype, sm, nullptr);
    } else {
      err = vefast::attn::launch_flash_fwd_mma(p, dtype, nullptr);
    }
    const bool sm90a = forward == "sm90a" || (forward == "dispatch" && vefast::attn::use_sm90a_forward(
                                                                          sm, vefast::attn::sm90a_forward_built()));
    if (err != cudaSuccess) {
      fprintf(stderr, "forward launch failed: %s\n", cudaGetErrorString(err));
      return 4;
    }
    printf("forward: %s\n", sm90a ? "sm90a" : "mma");
    write_file(dir + "/o.bin", o.g.data, o.g.bytes);
    write_file(dir + "/lse.bin", lse.data, lse.bytes);
    if (backward) {
      const Tensor4 o_view = p.o;
      p = given;
      p.o = o_view;
      Guarded dout = read_file(dir + "/dout.bin", 0);
      p.dout = view("dout", dout);
      const int gs = kv.count("grad_stride") ? int(num("grad_stride")) : 1;
      Out4 dq = alloc_out4(B, N, H, hd, gs), dk = alloc_out4(B, N, H, hd, gs), dv = alloc_out4(B, N, H, hd, gs);
      p.dq = dq.t;
      p.dk = dk.t;
      p.dv = dv.t;
      Guarded dsum = alloc_guarded(4 * size_t(B) * H * N);
      memset(dsum.data, 0xff, dsum.bytes);
      p.dsum = reinterpret_cast<float*>(dsum.data);
      Copies cb;
      if (copies) apply_copy_plan(p, true, cb);
      err = vefast::attn::launch_flash_bwd(p, dtype, nullptr);
      if (err != cudaSuccess) {
        fprintf(stderr, "backward launch failed: %s\n", cudaGetErrorString(err));
        return 4;
      }
      copy_back(cb, p);
      if (copies) printf("copies backward:%s\n", cb.names.c_str());
      for (const auto& [name, t] : {std::pair<const char*, Tensor4>{"dq", dq.t}, {"dk", dk.t}, {"dv", dv.t}}) {
        const std::vector<uint16_t> v = dense_of(t, p);
        write_file(dir + "/" + name + ".bin", v.data(), 2 * v.size());
      }
      write_file(dir + "/dsum.bin", dsum.data, dsum.bytes);
    }
    if (copies) printf("copies forward:%s\n", cf.names.c_str());
  } catch (const cuda_emu::Error& e) {
    fprintf(stderr, "%s\n", e.what());
    return 3;
  }
  const cuda_emu::Stats& s = cuda_emu::stats();
  printf("blocks %llu threads %llu switches %llu barriers %llu collectives %llu mma %llu wgmma %llu ldmatrix %llu "
         "cp_async %llu shared_checked_bytes %llu\n",
         (unsigned long long)s.blocks, (unsigned long long)s.threads, (unsigned long long)s.switches,
         (unsigned long long)s.barriers, (unsigned long long)s.collectives, (unsigned long long)s.mmas,
         (unsigned long long)s.wgmmas, (unsigned long long)s.ldmatrix, (unsigned long long)s.cp_async,
         (unsigned long long)s.shared_checked_bytes);
  return 0;
}
