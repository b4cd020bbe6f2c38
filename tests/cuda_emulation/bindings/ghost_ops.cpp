// C entry points (ctypes) to the launchers of csrc/cuda/ghost_conv_kernel.cu and
// depthwise_conv_kernel.cu. The argument structs are filled field by field from plain arguments;
// every pointer is host memory; returns cudaError_t.
#include "ghost_ops_kernel.h"

namespace gk = ghostkernels::cuda;

extern "C" {

// dims = (batch, in_channels, height, width, primary_channels, out_channels, gate_h, gate_w);
// flags = (relu_primary, relu_cheap, channels_last).
int gk_ghost_conv(int dtype, const void* x, const void* w_primary, const void* b_primary,
                  const void* w_cheap, const void* b_cheap, const void* input_scale,
                  const void* gate, const void* residual, void* y, const int64_t* dims,
                  const int* flags) {
  gk::GhostConvArgs a{};
  a.x = x;
  a.w_primary = w_primary;
  a.b_primary = b_primary;
  a.w_cheap = w_cheap;
  a.b_cheap = b_cheap;
  a.input_scale = input_scale;
  a.gate = gate;
  a.residual = residual;
  a.y = y;
  a.batch = dims[0];
  a.in_channels = dims[1];
  a.height = dims[2];
  a.width = dims[3];
  a.primary_channels = dims[4];
  a.out_channels = dims[5];
  a.gate_height = dims[6];
  a.gate_width = dims[7];
  a.relu_primary = flags[0] != 0;
  a.relu_cheap = flags[1] != 0;
  a.channels_last = flags[2] != 0;
  return gk::launch_ghost_conv(a, static_cast<gk::DType>(dtype), nullptr);
}

// dims = (batch, channels, height, width, out_height, out_width, kh, kw, stride);
// flags = (relu, channels_last).
int gk_depthwise_conv(int dtype, const void* x, const void* weight, const void* bias, void* y,
                      const int64_t* dims, const int* flags) {
  gk::DepthwiseConvArgs a{};
  a.x = x;
  a.weight = weight;
  a.bias = bias;
  a.y = y;
  a.batch = dims[0];
  a.channels = dims[1];
  a.height = dims[2];
  a.width = dims[3];
  a.out_height = dims[4];
  a.out_width = dims[5];
  a.kh = static_cast<int>(dims[6]);
  a.kw = static_cast<int>(dims[7]);
  a.stride = static_cast<int>(dims[8]);
  a.relu = flags[0] != 0;
  a.channels_last = flags[1] != 0;
  return gk::launch_depthwise_conv(a, static_cast<gk::DType>(dtype), nullptr);
}

}  // extern "C"
