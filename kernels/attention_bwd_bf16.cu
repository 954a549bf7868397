// Backward instantiations (dQ pass + dK/dV pass), bf16 x padded head dim {64, 80, 96, 128}.
// One file per dtype so that the two halves of the backward compile in parallel.
#include "attention.cuh"

namespace vefast {
namespace attn {

cudaError_t launch_bwd_bf16(const Params& p, cudaStream_t stream) { return launch_bwd_dtype<__nv_bfloat16>(p, stream); }

}  // namespace attn
}  // namespace vefast
