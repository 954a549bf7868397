// Host side of the fused attention kernels (kernels/attention.cuh): argument checks with messages that
// name the argument, output allocation, dispatch by dtype, launch on the current stream.
//
// Exposed on vefast._C (called by vefast/ops/attention.py inside its torch.library ops):
//   attention_fwd(q, k, v, scale, q_weight, k_weight, cos, sin, eps) -> (out, lse)
//   attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, scale, q_weight, k_weight, cos, sin, eps) -> None
// q, k, v, dout, dq, dk, dv: (B, N, H, head_dim) bf16/fp16 CUDA tensors with any strides (views into a
// fused qkv tensor are fine); dq, dk, dv must not overlap. out: (B, N, H, head_dim); lse: (B, H, N) float32.
// q_weight / k_weight: optional (head_dim,) float32 RMSNorm weights of q / k; cos / sin: optional
// (N, head_dim) float32 rotary tables (both or neither). With them, q and k are normalized and rotated
// while being loaded, and dq / dk are the gradients w.r.t. the normalized, rotated q and k.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

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
  TORCH_CHECK(q.size(1) <= INT32_MAX - 64, "vefast attention: N must be < 2^31 - 64, got ", q.size(1));
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

attn::Tensor4 view4(const Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// The RMSNorm / rotary prologue (checked; pointers null where absent).
attn::Prologue prologue(const Tensor& q, const OptTensor& q_weight, const OptTensor& k_weight, const OptTensor& cos,
                        const OptTensor& sin, double eps) {
  const int64_t N = q.size(1), hd = q.size(3);
  attn::Prologue pro;
  TORCH_CHECK(eps >= 0.0, "vefast attention: eps must be >= 0, got ", eps);
  pro.eps = static_cast<float>(eps);
  if (q_weight.has_value()) {
    check_f32("q_weight", *q_weight, {hd}, q);
    pro.q_weight = q_weight->data_ptr<float>();
  }
  if (k_weight.has_value()) {
    check_f32("k_weight", *k_weight, {hd}, q);
    pro.k_weight = k_weight->data_ptr<float>();
  }
  TORCH_CHECK(cos.has_value() == sin.has_value(), "vefast attention: cos and sin must be given together");
  if (cos.has_value()) {
    check_f32("cos", *cos, {N, hd}, q);
    check_f32("sin", *sin, {N, hd}, q);
    pro.cos = cos->data_ptr<float>();
    pro.sin = sin->data_ptr<float>();
  }
  return pro;
}

attn::Params base_params(const Tensor& q, const Tensor& k, const Tensor& v, double scale) {
  TORCH_CHECK(scale > 0.0 && std::isfinite(scale), "vefast attention: scale must be finite and > 0, got ", scale);
  attn::Params p;
  p.q = view4(q);
  p.k = view4(k);
  p.v = view4(v);
  p.B = static_cast<int>(q.size(0));
  p.N = static_cast<int>(q.size(1));
  p.H = static_cast<int>(q.size(2));
  p.head_dim = static_cast<int>(q.size(3));
  p.scale = static_cast<float>(scale);
  return p;
}

std::tuple<Tensor, Tensor> attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                                         const OptTensor& q_weight, const OptTensor& k_weight, const OptTensor& cos,
                                         const OptTensor& sin, double eps) {
  check_q(q);
  check_like_q("k", k, q);
  check_like_q("v", v, q);
  attn::Params p = base_params(q, k, v, scale);
  p.pro = prologue(q, q_weight, k_weight, cos, sin, eps);
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  p.o = view4(out);
  p.lse = lse.data_ptr<float>();
  const auto dtype = q.scalar_type() == at::kBFloat16 ? attn::DType::kBF16 : attn::DType::kFP16;
  const cudaError_t err = attn::launch_fwd(p, dtype, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "vefast attention: forward kernel launch failed: ", cudaGetErrorString(err));
  return {out, lse};
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
  attn::Params p = base_params(q, k, v, scale);
  p.pro = prologue(q, q_weight, k_weight, cos, sin, eps);
  const c10::cuda::CUDAGuard guard(q.device());
  // delta = rowsum(dO * O) in float32, (B, H, N): the softmax backward's per-row correction term.
  Tensor delta = (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1).permute({0, 2, 1}).contiguous();
  p.o = view4(out);
  p.lse = lse.data_ptr<float>();
  p.dout = view4(dout);
  p.delta = delta.data_ptr<float>();
  p.dq = view4(dq);
  p.dk = view4(dk);
  p.dv = view4(dv);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = q.scalar_type() == at::kBFloat16 ? attn::launch_bwd_bf16(p, stream)
                                                           : attn::launch_bwd_fp16(p, stream);
  TORCH_CHECK(err == cudaSuccess, "vefast attention: backward kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

void register_attention(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("attention_fwd", &attention_fwd, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"),
        py::arg("q_weight") = py::none(), py::arg("k_weight") = py::none(), py::arg("cos") = py::none(),
        py::arg("sin") = py::none(), py::arg("eps") = 1e-6,
        "Fused non-causal attention forward on (B, N, H, head_dim) bf16/fp16 CUDA tensors, with the optional "
        "q/k RMSNorm + rotary prologue; returns (out, lse (B, H, N) float32)");
  m.def("attention_bwd", &attention_bwd, py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("scale"),
        py::arg("q_weight") = py::none(), py::arg("k_weight") = py::none(), py::arg("cos") = py::none(),
        py::arg("sin") = py::none(), py::arg("eps") = 1e-6,
        "Fused attention backward (deterministic: no atomics); writes dq, dk, dv (gradients w.r.t. the "
        "normalized, rotated q and k when the prologue is given)");
}

}  // namespace vefast
