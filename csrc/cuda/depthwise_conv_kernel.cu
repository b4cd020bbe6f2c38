// CUDA kernel of the folded depthwise conv (torch-free; launched from ghost_ops.cpp).
//
//   y[b,c,oh,ow] = act(bias[c] + sum_{i<kh, j<kw} w[c, i*kw+j] * x[b, c, oh*s-kh/2+i, ow*s-kw/2+j])
//
// One thread per output element, in y's memory order (so y's writes and, for channels_last,
// x's reads are coalesced; neighbouring taps hit L1). The tap loops are unrolled to the largest
// kernel (5) with early exits, so one instantiation serves kh, kw in {1, 3, 5}. 32-bit index
// arithmetic when every offset fits, 64-bit otherwise.
#include "ghost_ops_kernel.h"

namespace ghostkernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxTaps = 5;

template <typename T, bool kChannelsLast, typename index_t>
__global__ void __launch_bounds__(kThreads)
    depthwise_conv_kernel(DepthwiseConvArgs a, index_t total) {
  const T* x = static_cast<const T*>(a.x);
  const T* weight = static_cast<const T*>(a.weight);
  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
  const index_t C = a.channels, H = a.height, W = a.width, Ho = a.out_height, Wo = a.out_width;
  const int kh = a.kh, kw = a.kw;
  const index_t stride = a.stride;
  const index_t step = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t o = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; o < total;
       o += step) {
    index_t b, c, oh, ow;
    unflatten_bchw<kChannelsLast>(o, C, Ho, Wo, b, c, oh, ow);
    const T* wk = weight + c * (kh * kw);
    const index_t ih0 = oh * stride - kh / 2, iw0 = ow * stride - kw / 2;
    float s = to_float(bias[c]);
#pragma unroll
    for (int i = 0; i < kMaxTaps; ++i) {
      if (i >= kh) break;
      const index_t ih = ih0 + i;
      if (ih < 0 || ih >= H) continue;
#pragma unroll
      for (int j = 0; j < kMaxTaps; ++j) {
        if (j >= kw) break;
        const index_t iw = iw0 + j;
        if (iw < 0 || iw >= W) continue;
        const index_t xi = kChannelsLast ? ((b * H + ih) * W + iw) * C + c
                                         : ((b * C + c) * H + ih) * W + iw;
        s += to_float(wk[i * kw + j]) * to_float(x[xi]);
      }
    }
    y[o] = from_float<T>(activate(s, a.relu));
  }
}

template <typename T, bool kChannelsLast, typename index_t>
void launch_layout(const DepthwiseConvArgs& a, int64_t total, cudaStream_t stream) {
  const int64_t blocks_needed = (total + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(blocks_needed < (1 << 20) ? blocks_needed : (1 << 20));
  depthwise_conv_kernel<T, kChannelsLast, index_t>
      <<<blocks, kThreads, 0, stream>>>(a, static_cast<index_t>(total));
}

template <typename T>
cudaError_t launch_typed(const DepthwiseConvArgs& a, cudaStream_t stream) {
  const int64_t total = a.batch * a.channels * a.out_height * a.out_width;
  const int64_t x_numel = a.batch * a.channels * a.height * a.width;
  // Largest value any index takes (plus the grid-stride overshoot) must fit the index type.
  const int64_t largest = (total > x_numel ? total : x_numel) + int64_t(kThreads) * (1 << 20);
  const bool small = largest < (int64_t(1) << 31);
  if (a.channels_last) {
    if (small) launch_layout<T, true, int32_t>(a, total, stream);
    else launch_layout<T, true, int64_t>(a, total, stream);
  } else {
    if (small) launch_layout<T, false, int32_t>(a, total, stream);
    else launch_layout<T, false, int64_t>(a, total, stream);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_depthwise_conv(const DepthwiseConvArgs& args, DType dtype,
                                  cudaStream_t stream) {
  return dispatch_dtype(dtype, [&]<typename T>() { return launch_typed<T>(args, stream); });
}

}  // namespace cuda
}  // namespace ghostkernels
