// Multi-scale deformable attention CUDA kernels: the torch-free interface.
//
// The kernels (ms_deform_attn_kernel.cu) see raw device pointers, sizes and a stream only, so that
// file compiles with nvcc in seconds; csrc/cuda/ms_deform_attn.cpp checks the tensors, allocates the
// outputs and calls these launchers. Launches never synchronise with the host and read the level
// shapes from device memory, so the op can be captured in a CUDA graph.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ghostkernels {
namespace msda_cuda {

enum class ValueType { kFloat64, kFloat32, kFloat16, kBFloat16 };

// value [N,S,M,D]; sampling_locations [N,Lq,M,L,P,2]; attention_weights [N,Lq,M,L,P].
struct Sizes {
  int64_t N, S, M, D, Lq, L, P;
};

// All tensors contiguous device memory. spatial_shapes [L,2] and level_start_index [L] are int64;
// sampling_locations are double for kFloat64 values and float otherwise ("accumulation type");
// value, attention_weights and output ([N,Lq,M*D]) have the value type. Levels whose metadata are
// inconsistent with S (non-positive size, start outside value) are skipped, never read out of
// bounds. softmax: attention_weights holds logits, and the kernel uses the softmax over the L*P
// points of each (n, q, m), computed in the accumulation type. Returns the launch error,
// cudaSuccess when nothing had to run.
cudaError_t forward(ValueType type, const Sizes& sizes, const void* value,
                    const int64_t* spatial_shapes, const int64_t* level_start_index,
                    const void* sampling_locations, const void* attention_weights, bool softmax,
                    void* output, cudaStream_t stream);

// grad_output has the value type. grad_sampling_locations and grad_attention_weights are in the
// accumulation type and must be zero-filled by the caller (owner-only read-modify-write, no
// atomics); with softmax, grad_attention_weights is the gradient w.r.t. the logits.
// grad_value [N,S,M,D] must be zero-filled too; its type depends on fixed_point_scale:
//   nullptr: the accumulation type, added with float atomics (fast, order-dependent last bits);
//   a device pointer to one double (a power of two, read by the kernel, no host sync): int64,
//     each contribution c added as llrint(c * scale) with integer atomics, so the sum is
//     bitwise reproducible; the caller computes grad_value = sum / scale afterwards.
cudaError_t backward(ValueType type, const Sizes& sizes, const void* grad_output, const void* value,
                     const int64_t* spatial_shapes, const int64_t* level_start_index,
                     const void* sampling_locations, const void* attention_weights, bool softmax,
                     const double* fixed_point_scale, void* grad_value,
                     void* grad_sampling_locations, void* grad_attention_weights,
                     cudaStream_t stream);

}  // namespace msda_cuda
}  // namespace ghostkernels
