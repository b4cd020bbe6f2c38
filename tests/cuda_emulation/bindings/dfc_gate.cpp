// C entry point (ctypes) to the launcher of csrc/cuda/dfc_gate_kernel.cu. The argument struct is
// filled field by field from plain arguments; every pointer is host memory; returns cudaError_t.
#include "dfc_gate_kernel.h"

namespace gk = ghostkernels::cuda;

extern "C" {

// dims = (batch, in_channels, channels, height, width); flags = (channels_last).
int gk_dfc_gate(int dtype, const void* x, const void* w_proj, const void* b_proj, const void* w_h,
                const void* b_h, const void* w_v, const void* b_v, void* gate,
                const int64_t* dims, const int* flags) {
  gk::DfcGateArgs a{};
  a.x = x;
  a.w_proj = w_proj;
  a.b_proj = b_proj;
  a.w_h = w_h;
  a.b_h = b_h;
  a.w_v = w_v;
  a.b_v = b_v;
  a.gate = gate;
  a.batch = dims[0];
  a.in_channels = dims[1];
  a.channels = dims[2];
  a.height = dims[3];
  a.width = dims[4];
  a.channels_last = flags[0] != 0;
  return gk::launch_dfc_gate(a, static_cast<gk::DType>(dtype), nullptr);
}

}  // extern "C"
