// Python bindings of vefast._C. This file owns PYBIND11_MODULE; each op's host file
// (csrc/<op>.cpp) defines vefast::register_<op>(m), declared and called below.
#include <torch/extension.h>

#include <string>

#include "probe.cuh"
#include "vefast_build_info.h"

namespace vefast {
// Op registrations, one line each: void register_<op>(pybind11::module_& m);
void register_attention(pybind11::module_& m);
}  // namespace vefast

namespace {
pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = VEFAST_BUILD_TORCH_VERSION;
  info["cuda_version"] = VEFAST_BUILD_CUDA_VERSION;
  info["cuda_archs"] = VEFAST_BUILD_ARCHS;
  return info;
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vefast CUDA extension";
  m.def("build_info", &build_info, "torch/CUDA versions and SM list this binary was built with");
  m.def("probe_arch", &probe_arch, pybind11::arg("device"),
        "Runs a one-thread kernel on `device` and returns the __CUDA_ARCH__ of the code that ran");
  // Op registrations, one line each: vefast::register_<op>(m);
  vefast::register_attention(m);
}
