// Device-side probe: reports the __CUDA_ARCH__ of the code that actually runs on a GPU.
#pragma once
#include <string>

namespace vefast {
// Launches one thread on `device` that writes __CUDA_ARCH__ (e.g. 900). Returns -1 and sets `error`
// when the launch fails, e.g. "no kernel image is available" for an architecture the build lacks.
int probe_arch(int device, std::string* error);
}  // namespace vefast
