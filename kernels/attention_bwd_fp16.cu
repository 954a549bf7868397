// Backward instantiations (dQ pass + dK/dV pass), fp16 x padded head dim {64, 80, 96, 128}.
#include "attention.cuh"

namespace vefast {
namespace attn {

cudaError_t launch_bwd_fp16(const Params& p, cudaStream_t stream) { return launch_bwd_dtype<__half>(p, stream); }

}  // namespace attn
}  // namespace vefast
