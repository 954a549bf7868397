// Host side of the fused attention kernels (kernels/flash_*.cuh): argument checks with messages that name
// the argument, output allocation, the copies the kernels' layout rule needs, dispatch, launch on the
// current stream.
//
// Registered as torch.ops.vefast_cuda.* (schemas at the end; called by vefast/ops/attention.py through
// vefast._ext inside its torch.library ops):
//   attention_fwd(q, k, v, scale, q_weight, k_weight, cos, sin, eps) -> (out, lse)
//   attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, scale, q_weight, k_weight, cos, sin, eps) -> ()
// q, k, v, dout, dq, dk, dv: (B, N, H, head_dim) bf16/fp16 CUDA tensors with any strides (views into a
// fused qkv tensor are fine); dq, dk, dv must not overlap. out: (B, N, H, head_dim); lse: (B, H, N) float32.
// q_weight / k_weight: optional (head_dim,) float32 RMSNorm weights of q / k; cos / sin: optional
// (N, head_dim) float32 rotary tables (both or neither). With them, q and k are normalized and rotated
// while being loaded, and dq / dk are the gradients w.r.t. the normalized, rotated q and k.
//
// Layout rule (attn::flash_copy_plan, kernels/attention_params.cuh): the kernels move rows with 16-byte
// accesses, so a (B, N, H, head_dim) tensor must have a unit head-dim stride, a 16-byte aligned base and
// strides that are multiples of 8 elements (views of a packed qkv always do). A tensor that breaks it is
// replaced by a contiguous copy (inputs) or a contiguous buffer copied back after the launch (dq, dk, dv):
// silently here -- the Python caller can apply the same rule and report it. Typical case: a gradient that
// arrives as an expanded (stride-0) view. No kernel reads a tensor that breaks the rule.
//
// Kernels: forward = the sm_90a wgmma kernel on sm 90 when this binary holds it (VEFAST_CUDA_ARCHS with
// 90a), else the mma.sync kernel; backward = the D = rowsum(dO * O) + dQ pass, then the dK / dV pass
// (deterministic, no atomics; D goes through a (B, H, N) float32 workspace allocated here).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "attention_params.cuh"

namespace vefast {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

bool supported_head_dim(int64_t d) { return d == 64 || d == 72 || d == 80 || d == 96 || d == 128; }

// q itself: CUDA, bf16/fp16, (B, N, H, head_dim) with a supported head_dim, sizes within the grid limits.
void check_q(const Tensor& q) {
  TORCH_CHECK(q.defined(), "vefast attention: q is undefined");
  TORCH_CHECK(q.is_cuda(), "vefast attention: q must be a CUDA tensor, got device ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "vefast attention: q must be bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(q.dim() == 4, "vefast attention: q must have shape (B, N, H, head_dim), got ", q.sizes());
  TORCH_CHECK(supported_head_dim(q.size(3)), "vefast attention: head_dim must be one of 64, 72, 80, 96, 128, got ",
              q.size(3));
  TORCH_CHECK(q.size(0) >= 1 && q.size(1) >= 1 && q.size(2) >= 1,
              "vefast attention: B, N and H must be >= 1, got shape ", q.sizes());
  // grid (row tiles of N, H, B): y and z are limited to 65535; N, row indices are int
  TORCH_CHECK(q.size(0) <= 65535 && q.size(2) <= 65535, "vefast attention: B and H must be <= 65535, got B = ",
              q.size(0), ", H = ", q.size(2));
  TORCH_CHECK(q.size(1) <= INT32_MAX - 128, "vefast attention: N must be < 2^31 - 128, got ", q.size(1));
}

// An output the kernels write: every element once, so no two elements may share memory.
void check_writable(const char* name, const Tensor& t) {
  TORCH_CHECK(t.is_non_overlapping_and_dense(), "vefast attention: ", name,
              " must be a non-overlapping dense tensor, got strides ", t.strides());
}

// Another (B, N, H, head_dim) tensor: same sizes, dtype and device as q.
void check_like_q(const char* name, const Tensor& t, const Tensor& q) {
  TORCH_CHECK(t.defined(), "vefast attention: ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), "vefast attention: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == q.device(), "vefast attention: ", name, " must be on the device of q (", q.device(),
              "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "vefast attention: ", name, " must have the dtype of q (",
              q.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == q.sizes(), "vefast attention: ", name, " must have the shape of q ", q.sizes(), ", got ",
              t.sizes());
}

// A float32 CUDA tensor of the given sizes, contiguous, on q's device.
void check_f32(const char* name, const Tensor& t, at::IntArrayRef sizes, const Tensor& q) {
  TORCH_CHECK(t.defined(), "vefast attention: ", name, " is undefined");
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), "vefast attention: ", name,
              " must be a CUDA tensor on the device of q (", q.device(), "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "vefast attention: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == sizes, "vefast attention: ", name, " must have shape ", sizes, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "vefast attention: ", name, " must be contiguous");
}

// The kernels' view of a (B, N, H, hd) tensor; the stride of a size-1 dim is never used (its index is 0),
// so it is recorded as 0 and does not break the layout rule.
attn::Tensor4 view4(const Tensor& t) {
  const auto st = [&](int i) { return t.size(i) == 1 ? int64_t{0} : t.stride(i); };
  return {t.data_ptr(), st(0), st(1), st(2), t.stride(3)};
}

// A contiguous copy with a fresh (aligned) allocation: .contiguous() would keep a contiguous view whose
// base is not 16-byte aligned.
Tensor fresh_copy(const Tensor& t) { return t.clone(at::MemoryFormat::Contiguous); }

// The tensors a launch reads or writes, after the copies the layout rule needs (kept alive here until the
// launch has been enqueued; the caching allocator keeps their memory until the stream is done with it).
struct Operands {
  Tensor q, k, v, out, dout, q_weight, k_weight, cos, sin;
  Tensor dq, dk, dv;                // what the kernel writes (buffers when the caller's break the rule)
  bool dq_copy = false, dk_copy = false, dv_copy = false;
};

// The RMSNorm / rotary prologue: checks its tensors and records them in ops (apply_copy_plan points the
// kernels' parameters at them); returns the parameters without pointers.
attn::Prologue prologue(const Tensor& q, Operands& ops, const OptTensor& q_weight, const OptTensor& k_weight,
                        const OptTensor& cos, const OptTensor& sin, double eps) {
  const int64_t N = q.size(1), hd = q.size(3);
  attn::Prologue pro;
  TORCH_CHECK(eps >= 0.0, "vefast attention: eps must be >= 0, got ", eps);
  pro.eps = static_cast<float>(eps);
  if (q_weight.has_value()) {
    check_f32("q_weight", *q_weight, {hd}, q);
    ops.q_weight = *q_weight;
  }
  if (k_weight.has_value()) {
    check_f32("k_weight", *k_weight, {hd}, q);
    ops.k_weight = *k_weight;
  }
  TORCH_CHECK(cos.has_value() == sin.has_value(), "vefast attention: cos and sin must be given together");
  if (cos.has_value()) {
    check_f32("cos", *cos, {N, hd}, q);
    check_f32("sin", *sin, {N, hd}, q);
    ops.cos = *cos;
    ops.sin = *sin;
  }
  return pro;
}

attn::Params base_params(const Tensor& q, double scale) {
  TORCH_CHECK(scale > 0.0 && std::isfinite(scale), "vefast attention: scale must be finite and > 0, got ", scale);
  attn::Params p;
  p.B = static_cast<int>(q.size(0));
  p.N = static_cast<int>(q.size(1));
  p.H = static_cast<int>(q.size(2));
  p.head_dim = static_cast<int>(q.size(3));
  p.scale = static_cast<float>(scale);
  return p;
}

// Applies the layout rule: copies what attn::flash_copy_plan names, points p at the operands.
void apply_copy_plan(attn::Params& p, Operands& ops, bool backward) {
  const auto bind = [&p, &ops] {
    p.q = view4(ops.q);
    p.k = view4(ops.k);
    p.v = view4(ops.v);
    if (ops.out.defined()) p.o = view4(ops.out);
    if (ops.dout.defined()) p.dout = view4(ops.dout);
    if (ops.dq.defined()) p.dq = view4(ops.dq), p.dk = view4(ops.dk), p.dv = view4(ops.dv);
    const auto ptr = [](const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
    p.pro.q_weight = ptr(ops.q_weight);
    p.pro.k_weight = ptr(ops.k_weight);
    p.pro.cos = ptr(ops.cos);
    p.pro.sin = ptr(ops.sin);
  };
  bind();
  const attn::CopyPlan plan = attn::flash_copy_plan(p, backward);
  if (plan.any()) {
    const auto copy_if = [](bool c, Tensor& t) {
      if (c) t = fresh_copy(t);
    };
    copy_if(plan.q, ops.q);
    copy_if(plan.k, ops.k);
    copy_if(plan.v, ops.v);
    copy_if(plan.o, ops.out);
    copy_if(plan.dout, ops.dout);
    copy_if(plan.q_weight, ops.q_weight);
    copy_if(plan.k_weight, ops.k_weight);
    copy_if(plan.cos, ops.cos);
    copy_if(plan.sin, ops.sin);
    const auto buffer_if = [](bool c, Tensor& t, bool& flag) {
      if (c) t = at::empty(t.sizes(), t.options()), flag = true;
    };
    buffer_if(plan.dq, ops.dq, ops.dq_copy);
    buffer_if(plan.dk, ops.dk, ops.dk_copy);
    buffer_if(plan.dv, ops.dv, ops.dv_copy);
    bind();
  }
  TORCH_CHECK(attn::flash_supported(p, backward),
              "vefast attention: internal error: the operands break the kernels' layout rule after the copies");
}

// The compute capability of q's device as major * 10 + minor (the forward dispatch's input).
int compute_capability(const Tensor& q) {
  int major = 0, minor = 0;
  const int dev = q.device().index();
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  return major * 10 + minor;
}

attn::DType dtype_of(const Tensor& q) {
  return q.scalar_type() == at::kBFloat16 ? attn::DType::kBF16 : attn::DType::kFP16;
}

std::tuple<Tensor, Tensor> attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                                         const OptTensor& q_weight, const OptTensor& k_weight, const OptTensor& cos,
                                         const OptTensor& sin, double eps) {
  check_q(q);
  check_like_q("k", k, q);
  check_like_q("v", v, q);
  attn::Params p = base_params(q, scale);
  Operands ops;
  ops.q = q, ops.k = k, ops.v = v;
  p.pro = prologue(q, ops, q_weight, k_weight, cos, sin, eps);
  const c10::cuda::CUDAGuard guard(q.device());
  ops.out = at::empty(q.sizes(), q.options());
  Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  p.lse = lse.data_ptr<float>();
  apply_copy_plan(p, ops, /*backward=*/false);
  const cudaError_t err = attn::launch_flash_fwd(p, dtype_of(q), compute_capability(q),
                                                 c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "vefast attention: forward kernel launch failed: ", cudaGetErrorString(err));
  return {ops.out, lse};
}

void attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                   const Tensor& lse, const Tensor& dq, const Tensor& dk, const Tensor& dv, double scale,
                   const OptTensor& q_weight, const OptTensor& k_weight, const OptTensor& cos, const OptTensor& sin,
                   double eps) {
  check_q(q);
  check_like_q("k", k, q);
  check_like_q("v", v, q);
  check_like_q("dout", dout, q);
  check_like_q("out", out, q);
  check_like_q("dq", dq, q);
  check_like_q("dk", dk, q);
  check_like_q("dv", dv, q);
  check_writable("dq", dq);
  check_writable("dk", dk);
  check_writable("dv", dv);
  check_f32("lse", lse, {q.size(0), q.size(2), q.size(1)}, q);
  attn::Params p = base_params(q, scale);
  Operands ops;
  ops.q = q, ops.k = k, ops.v = v, ops.out = out, ops.dout = dout, ops.dq = dq, ops.dk = dk, ops.dv = dv;
  p.pro = prologue(q, ops, q_weight, k_weight, cos, sin, eps);
  const c10::cuda::CUDAGuard guard(q.device());
  // D = rowsum(dO * O), (B, H, N) float32: written by the dQ pass, read by the dK / dV pass.
  Tensor dsum = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  p.lse = lse.data_ptr<float>();
  p.dsum = dsum.data_ptr<float>();
  apply_copy_plan(p, ops, /*backward=*/true);
  const cudaError_t err = attn::launch_flash_bwd(p, dtype_of(q), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "vefast attention: backward kernel launch failed: ", cudaGetErrorString(err));
  if (ops.dq_copy) const_cast<Tensor&>(dq).copy_(ops.dq);
  if (ops.dk_copy) const_cast<Tensor&>(dk).copy_(ops.dk);
  if (ops.dv_copy) const_cast<Tensor&>(dv).copy_(ops.dv);
}

}  // namespace

}  // namespace vefast

// Optional tensors are `Tensor?`, defaulting to None as in the Python signature of attention.py's calls.
TORCH_LIBRARY_FRAGMENT(vefast_cuda, m) {
  // Fused non-causal attention forward on (B, N, H, head_dim) bf16/fp16 CUDA tensors, with the optional
  // q/k RMSNorm + rotary prologue; returns (out, lse (B, H, N) float32).
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, float scale, Tensor? q_weight=None, Tensor? k_weight=None, "
        "Tensor? cos=None, Tensor? sin=None, float eps=1e-06) -> (Tensor out, Tensor lse)");
  // Fused attention backward (deterministic: no atomics); writes dq, dk, dv (gradients w.r.t. the
  // normalized, rotated q and k when the prologue is given).
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor(a!) dq, "
        "Tensor(b!) dk, Tensor(c!) dv, float scale, Tensor? q_weight=None, Tensor? k_weight=None, "
        "Tensor? cos=None, Tensor? sin=None, float eps=1e-06) -> ()");
}

TORCH_LIBRARY_IMPL(vefast_cuda, CUDA, m) {
  m.impl("attention_fwd", &vefast::attention_fwd);
  m.impl("attention_bwd", &vefast::attention_bwd);
}

// CPU tensors reach the same host functions, whose first check refuses them with a message naming the
// argument (instead of the dispatcher's "Could not run ... with arguments from the 'CPU' backend").
TORCH_LIBRARY_IMPL(vefast_cuda, CPU, m) {
  m.impl("attention_fwd", &vefast::attention_fwd);
  m.impl("attention_bwd", &vefast::attention_bwd);
}
