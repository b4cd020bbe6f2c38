// C entry points (ctypes) to the launchers of csrc/cuda/ms_deform_attn_kernel.cu, one line each:
// sizes as int64[7] = (N, S, M, D, Lq, L, P); every pointer is host memory; returns cudaError_t.
#include "ms_deform_attn_kernel.h"

namespace msda = ghostkernels::msda_cuda;

namespace {
msda::Sizes sizes_of(const int64_t* s) { return {s[0], s[1], s[2], s[3], s[4], s[5], s[6]}; }
}  // namespace

extern "C" {

int gk_msda_forward(int value_type, const int64_t* sizes, const void* value, const int64_t* shapes,
                    const int64_t* starts, const void* loc, const void* attn, int softmax,
                    void* out) {
  return msda::forward(static_cast<msda::ValueType>(value_type), sizes_of(sizes), value, shapes,
                       starts, loc, attn, softmax != 0, out, nullptr);
}

int gk_msda_backward(int value_type, const int64_t* sizes, const void* grad_out, const void* value,
                     const int64_t* shapes, const int64_t* starts, const void* loc,
                     const void* attn, int softmax, const double* fixed_point_scale,
                     void* grad_value, void* grad_loc, void* grad_attn) {
  return msda::backward(static_cast<msda::ValueType>(value_type), sizes_of(sizes), grad_out, value,
                        shapes, starts, loc, attn, softmax != 0, fixed_point_scale, grad_value,
                        grad_loc, grad_attn, nullptr);
}

}  // extern "C"
