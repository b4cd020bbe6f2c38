// Shadows the CUDA toolkit header of this name for the CPU emulation (tests/cuda_emulation).
#pragma once
#include "cuda_emulation.h"
