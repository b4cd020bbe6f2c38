// Checks shared by the torch-side CUDA launchers (csrc/cuda/*.cpp): the kernel dtype of x and the
// status of a launch. Torch-side only (the .cu kernel files stay torch-free).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include "cuda/ghost_ops_kernel.h"  // cuda::DType

namespace ghostkernels {

// float32 / float16 / bfloat16 -> the kernels' dtype; anything else is an error naming `op`.
inline cuda::DType kernel_dtype(const at::Tensor& x, const char* op) {
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op,
              " (CUDA kernel): x must be float32, float16 or bfloat16, got ", t);
  return t == at::kFloat  ? cuda::DType::kFloat32
         : t == at::kHalf ? cuda::DType::kFloat16
                          : cuda::DType::kBFloat16;
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, " (CUDA kernel) failed to launch: ",
              cudaGetErrorString(err));
}

}  // namespace ghostkernels
