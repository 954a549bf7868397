// Backward instantiations of the FlashAttention-2-class kernels (dQ pass with D, then dK/dV pass):
// {bf16, fp16} x padded head dim {64, 80, 96, 128}.
#include "flash_bwd.cuh"

namespace vefast {
namespace attn {

cudaError_t launch_flash_bwd(const Params& p, DType dtype, cudaStream_t stream) {
  if (!flash_supported(p, true)) return cudaErrorInvalidValue;
  return dtype == DType::kBF16 ? flash::launch_flash_bwd_dtype<__nv_bfloat16>(p, stream)
                               : flash::launch_flash_bwd_dtype<__half>(p, stream);
}

}  // namespace attn
}  // namespace vefast
