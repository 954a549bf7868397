// Emulation shim: the CUDA header <cuda_runtime_api.h> resolves to cuda_emu.h in the CPU emulation lane.
#pragma once
#include "../cuda_emu.h"
