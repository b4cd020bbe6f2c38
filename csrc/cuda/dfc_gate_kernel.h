// Torch-free interface between the host launcher (dfc_gate.cpp, which includes torch) and the
// CUDA kernels of the DFC attention gate (dfc_gate_kernel.cu, which compiles without torch).
// Tensors cross as raw pointers to dense data in the stated layout.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "ghost_ops_kernel.h"  // DType, and the float conversions for device code

namespace ghostkernels {
namespace cuda {

// gate = sigmoid(dw5x1(dw1x5(conv1x1(avgpool2x2(x)))) with a bias after each conv; Hp = H / 2,
// Wp = W / 2 (floor), H, W >= 2.
struct DfcGateArgs {
  const void* x;       // [B,Cin,H,W] (NCHW) or [B,H,W,Cin] (channels_last)
  const void* w_proj;  // [C,Cin]
  const void* b_proj;  // [C]
  const void* w_h;     // [C,5], the 1x5 taps left to right
  const void* b_h;     // [C]
  const void* w_v;     // [C,5], the 5x1 taps top to bottom
  const void* b_v;     // [C]
  void* gate;          // [B,C,Hp,Wp] in x's layout
  int64_t batch, in_channels, channels, height, width;
  bool channels_last;
};

// The kernel's grid: x = tiles of kDfcTile x kDfcTile gate pixels, y = blocks of kDfcChannelBlock
// channels (at most 65535), z = batch (at most 65535).
constexpr int kDfcTile = 12;
constexpr int kDfcChannelBlock = 32;

// One launch on `stream`; returns the launch status (cudaGetLastError()),
// cudaErrorInvalidConfiguration when the grid limits above are exceeded.
cudaError_t launch_dfc_gate(const DfcGateArgs& args, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace ghostkernels
