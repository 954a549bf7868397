// Forward instantiations of the fused attention kernel: {bf16, fp16} x padded head dim {64, 80, 96, 128}.
#include "attention.cuh"

namespace vefast {
namespace attn {

cudaError_t launch_fwd(const Params& p, DType dtype, cudaStream_t stream) {
  return dtype == DType::kBF16 ? launch_fwd_dtype<__nv_bfloat16>(p, stream) : launch_fwd_dtype<__half>(p, stream);
}

}  // namespace attn
}  // namespace vefast
