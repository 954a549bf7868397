// Operator library of the vefast CUDA extension (vefast/_C.abi3.so), loaded with torch.ops.load_library.
//
// No Python module init and no pybind11: the ops are registered with the dispatcher under the namespace
// vefast_cuda (torch.ops.vefast_cuda.*), so the binary depends on libtorch only, not on the Python
// version (the GPU machine runs 3.12, the CPU machine 3.11); it stays tied to the torch it was built
// against. The namespace differs from vefast::, which the Python torch.library.custom_op ops own.
//
// This file owns TORCH_LIBRARY(vefast_cuda) and its op-independent entries; each op's host file
// (csrc/<op>.cpp) adds its schemas with TORCH_LIBRARY_FRAGMENT(vefast_cuda) and its CUDA kernels with
// TORCH_LIBRARY_IMPL(vefast_cuda, CUDA).
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "probe.cuh"
#include "vefast_build_info.h"

namespace {
// (torch_version, cuda_version, cuda_archs) this binary was built with; vefast/_ext.py makes the dict.
std::tuple<std::string, std::string, std::string> build_info() {
  return {VEFAST_BUILD_TORCH_VERSION, VEFAST_BUILD_CUDA_VERSION, VEFAST_BUILD_ARCHS};
}

int64_t probe_arch(int64_t device) {
  std::string error;
  const int arch = vefast::probe_arch(static_cast<int>(device), &error);
  const bool missing_arch = error.find("no kernel image") != std::string::npos;
  TORCH_CHECK(arch >= 0, "vefast._C.probe_arch(device=", device, ") failed: ", error,
              missing_arch ? " (the extension was built for SM " VEFAST_BUILD_ARCHS
                             "; rebuild with VEFAST_CUDA_ARCHS naming this GPU's architecture)"
                           : "");
  return arch;
}
}  // namespace

// No tensor arguments: the kernels given with the schema are the catch-all (CompositeImplicitAutograd).
TORCH_LIBRARY(vefast_cuda, m) {
  m.def("build_info() -> (str torch_version, str cuda_version, str cuda_archs)", &build_info);
  // Runs a one-thread kernel on `device` and returns the __CUDA_ARCH__ of the code that ran (e.g. 900).
  m.def("probe_arch(int device) -> int", &probe_arch);
}
