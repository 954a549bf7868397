// Instantiations of the sm_90a wgmma forward ({bf16, fp16} x padded head dim {64, 80, 96, 128}). setup.py
// compiles this file only when VEFAST_CUDA_ARCHS names 90a, and then defines VEFAST_WITH_SM90A for every
// file (flash_fwd.cu supplies the stubs otherwise); its kernels hold code for sm_90a only (a trap elsewhere:
// attn::use_sm90a_forward never picks them on another architecture).
#if defined(VEFAST_WITH_SM90A)
#include "flash_fwd_sm90a.cuh"

namespace vefast {
namespace attn {

bool sm90a_forward_built() { return true; }

cudaError_t launch_flash_fwd_sm90a(const Params& p, DType dtype, cudaStream_t stream) {
  if (!flash_supported(p, false)) return cudaErrorInvalidValue;
  return dtype == DType::kBF16 ? flash::launch_flash_fwd_sm90a_dtype<__nv_bfloat16>(p, stream)
                               : flash::launch_flash_fwd_sm90a_dtype<__half>(p, stream);
}

}  // namespace attn
}  // namespace vefast
#endif  // VEFAST_WITH_SM90A
