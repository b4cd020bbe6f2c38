// Torch-free interface between the host launcher (ghost_ops.cpp, which includes torch) and the
// CUDA kernels (ghost_conv_kernel.cu, depthwise_conv_kernel.cu, which compile without torch).
// Tensors cross as raw pointers to dense data in the stated layout.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace ghostkernels {
namespace cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

struct GhostConvArgs {
  const void* x;          // [B,Cin,H,W] (NCHW) or [B,H,W,Cin] (channels_last)
  const void* w_primary;  // [C1,Cin]
  const void* b_primary;  // [C1]
  const void* w_cheap;    // [C1,9], 3x3 row-major
  const void* b_cheap;    // [C1]
  // Optional fused extras (nullptr when absent): y = (...) * gate[.., h*Hg/H, w*Wg/W] + residual.
  const void* input_scale;  // [B,Cin]: x is read as x * input_scale[b, c]
  const void* gate;         // [B,Cout,Hg,Wg] in x's layout
  const void* residual;     // [B,Cout,H,W] in x's layout
  void* y;                  // [B,Cout,H,W] in x's layout
  int64_t batch, in_channels, height, width, primary_channels, out_channels;
  int64_t gate_height, gate_width;  // Hg, Wg (any >= 1 when gate is set)
  bool relu_primary, relu_cheap, channels_last;
};

struct DepthwiseConvArgs {
  const void* x;       // [B,C,H,W] (NCHW) or [B,H,W,C] (channels_last)
  const void* weight;  // [C,kh*kw], row-major taps
  const void* bias;    // [C]
  void* y;             // [B,C,Ho,Wo] in x's layout
  int64_t batch, channels, height, width, out_height, out_width;
  int kh, kw, stride;
  bool relu, channels_last;
};

// The Ghost kernel's fixed tiling (also used by the launcher to check grid limits): a block owns a
// kTileH x kTileW output tile x kChannelBlock primary channels. Shared memory does not depend on
// the channel counts (input channels are streamed in chunks), so any C1 and Cin are supported.
constexpr int kGhostTileH = 14;
constexpr int kGhostTileW = 14;
constexpr int kGhostChannelBlock = 32;

// Launch on `stream`; return the launch status (cudaGetLastError()).
cudaError_t launch_ghost_conv(const GhostConvArgs& args, DType dtype, cudaStream_t stream);
cudaError_t launch_depthwise_conv(const DepthwiseConvArgs& args, DType dtype,
                                  cudaStream_t stream);

}  // namespace cuda
}  // namespace ghostkernels

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace ghostkernels {
namespace cuda {

// Explicit conversions (torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends).
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// (b, c, h, w) of the flat index o of a [B, C, H, W] tensor stored NCHW or channels_last (NHWC).
template <bool kChannelsLast, typename index_t>
__device__ __forceinline__ void unflatten_bchw(index_t o, index_t C, index_t H, index_t W,
                                               index_t& b, index_t& c, index_t& h, index_t& w) {
  index_t rest;
  if (kChannelsLast) {
    c = o % C; rest = o / C;
    w = rest % W; rest /= W;
    h = rest % H; b = rest / H;
  } else {
    w = o % W; rest = o / W;
    h = rest % H; rest /= H;
    c = rest % C; b = rest / C;
  }
}

// f.template operator()<T>() with T the element type of `dtype`: the one dtype switch of the
// Ghost/DFC launchers, e.g. dispatch_dtype(dtype, [&]<typename T>() { return launch<T>(a); }).
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f.template operator()<float>();
    case DType::kFloat16: return f.template operator()<__half>();
    case DType::kBFloat16: return f.template operator()<__nv_bfloat16>();
  }
  return cudaErrorInvalidValue;
}

// ReLU that keeps NaN (like torch.relu).
__device__ __forceinline__ float activate(float v, bool relu) { return (relu && v < 0.f) ? 0.f : v; }

}  // namespace cuda
}  // namespace ghostkernels
#endif  // __CUDACC__
