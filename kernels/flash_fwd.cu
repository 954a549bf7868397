// Forward instantiations of the FlashAttention-2-class mma.sync kernel ({bf16, fp16} x padded head dim
// {64, 80, 96, 128}) and the forward dispatch: the sm_90a wgmma kernel (flash_fwd_sm90a.cu, compiled only
// when VEFAST_CUDA_ARCHS names 90a, which defines VEFAST_WITH_SM90A) on sm 90, this one everywhere else.
#include "flash_fwd.cuh"

namespace vefast {
namespace attn {

cudaError_t launch_flash_fwd_mma(const Params& p, DType dtype, cudaStream_t stream) {
  if (!flash_supported(p, false)) return cudaErrorInvalidValue;
  return dtype == DType::kBF16 ? flash::launch_flash_fwd_dtype<__nv_bfloat16>(p, stream)
                               : flash::launch_flash_fwd_dtype<__half>(p, stream);
}

#if !defined(VEFAST_WITH_SM90A)
bool sm90a_forward_built() { return false; }
cudaError_t launch_flash_fwd_sm90a(const Params&, DType, cudaStream_t) { return cudaErrorInvalidDeviceFunction; }
#endif

cudaError_t launch_flash_fwd(const Params& p, DType dtype, int sm, cudaStream_t stream) {
  return use_sm90a_forward(sm, sm90a_forward_built()) ? launch_flash_fwd_sm90a(p, dtype, stream)
                                                      : launch_flash_fwd_mma(p, dtype, stream);
}

}  // namespace attn
}  // namespace vefast
