#include <cuda_runtime.h>

#include "probe.cuh"

namespace vefast {
namespace {
__global__ void probe_arch_kernel(int* out) {
#ifdef __CUDA_ARCH__
  *out = __CUDA_ARCH__;
#endif
}

bool ok(cudaError_t status, std::string* error) {
  if (status == cudaSuccess) return true;
  *error = cudaGetErrorString(status);
  return false;
}
}  // namespace

int probe_arch(int device, std::string* error) {
  int previous = 0;
  int host = -1;
  int* dev = nullptr;
  if (!ok(cudaGetDevice(&previous), error) || !ok(cudaSetDevice(device), error)) return -1;
  if (ok(cudaMalloc(&dev, sizeof(int)), error)) {
    probe_arch_kernel<<<1, 1>>>(dev);
    if (ok(cudaGetLastError(), error) && ok(cudaMemcpy(&host, dev, sizeof(int), cudaMemcpyDeviceToHost), error)) {
      error->clear();
    } else {
      host = -1;
    }
    cudaFree(dev);
  }
  cudaSetDevice(previous);
  return host;
}
}  // namespace vefast
