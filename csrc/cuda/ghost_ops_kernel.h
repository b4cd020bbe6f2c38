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

// The float32 Ghost kernel's fixed tiling: a block owns a kGhostTileH x kGhostTileW output tile x
// kGhostChannelBlock primary channels. Shared memory does not depend on the channel counts (input
// channels are streamed in chunks), so any C1 and Cin are supported (by both kernels).
constexpr int kGhostTileH = 14;
constexpr int kGhostTileW = 14;
constexpr int kGhostChannelBlock = 32;

// The tensor-core kernel that runs float16 and bfloat16 (ghost_conv_mma_kernel.cu): a block owns
// a kGhostMmaTileH x kGhostMmaTileW output tile x kGhostMmaChannelBlock primary channels.
constexpr int kGhostMmaTileH = 8;
constexpr int kGhostMmaTileW = 14;
constexpr int kGhostMmaChannelBlock = 64;

// The grid launch_ghost_conv uses for `args`: x = tiles (tiles_w per tile row), y = channel
// blocks, z = batch (the launcher checks it against CUDA's limits: tiles <= 2^31 - 1,
// channel_blocks and batch <= 65535).
struct GhostConvGrid {
  int64_t tiles, tiles_w, channel_blocks, batch;
};
inline GhostConvGrid ghost_conv_grid(const GhostConvArgs& args, DType dtype) {
  const bool mma = dtype != DType::kFloat32;
  const int64_t th = mma ? kGhostMmaTileH : kGhostTileH, tw = mma ? kGhostMmaTileW : kGhostTileW;
  const int64_t cb = mma ? kGhostMmaChannelBlock : kGhostChannelBlock;
  const int64_t tiles_w = (args.width + tw - 1) / tw;
  return {((args.height + th - 1) / th) * tiles_w, tiles_w,
          (args.primary_channels + cb - 1) / cb, args.batch};
}

// Whether `p` is a multiple of `bytes` (nullptr, an absent optional tensor, counts as aligned):
// the launchers' test for vector accesses.
inline bool aligned_to(const void* p, uintptr_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Launch on `stream`; return the launch status (cudaGetLastError()). launch_ghost_conv runs
// float32 on the CUDA-core kernel (ghost_conv_kernel.cu) and float16 / bfloat16 on
// launch_ghost_conv_mma.
cudaError_t launch_ghost_conv(const GhostConvArgs& args, DType dtype, cudaStream_t stream);
cudaError_t launch_ghost_conv_mma(const GhostConvArgs& args, DType dtype, cudaStream_t stream);
cudaError_t launch_depthwise_conv(const DepthwiseConvArgs& args, DType dtype,
                                  cudaStream_t stream);

}  // namespace cuda
}  // namespace ghostkernels

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace ghostkernels {
namespace cuda {

// V consecutive elements of T moved as one access (V * sizeof(T) bytes); callers guarantee the
// alignment.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

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
