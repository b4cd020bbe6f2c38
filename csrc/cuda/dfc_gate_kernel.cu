// CUDA kernels of the DFC attention gate (torch-free; launched from dfc_gate.cpp).
//
//   P[b,c,i,j]    = b_proj[c] + sum_k w_proj[c,k] * avg(x[b,k,2i:2i+2,2j:2j+2])
//   R[b,c,i,j]    = b_h[c] + sum_{t<5} w_h[c,t] * P[b,c,i,j+t-2]         (P zero outside the map)
//   gate[b,c,i,j] = sigmoid(b_v[c] + sum_{t<5} w_v[c,t] * R[b,c,i+t-2,j]) (R zero outside the map)
//
// Two launches instead of the five ops of the plain composition:
//   1. pool_project_kernel: a block owns 32 pooled pixels x 32 output channels of one image and
//      streams the input channels in chunks of 32 through shared memory: the 2x2 averages of the
//      chunk ([k][pixel], each computed once per block, as x is loaded) and the weights
//      ([channel][k]); each of the 256 threads accumulates 4 outputs in fp32 and writes P (fp32,
//      x's layout). The lane index runs along the contiguous dim of P (pixels in NCHW, channels in
//      channels_last) so the writes are coalesced; the shared rows are padded by one float, so
//      the strided shared reads are conflict-free.
//   2. stencil_sigmoid_kernel: one thread per gate element in the gate's memory order; the five
//      1x5 rows the 5x1 needs are recomputed from P (25 fp32 reads, served by L1: P is small)
//      and rows outside the map are skipped (the 5x1 zero-pads the 1x5 *result*, not its bias).
// 32-bit index arithmetic when every offset fits, 64-bit otherwise (image offsets of the first
// kernel are always 64-bit).
#include "dfc_gate_kernel.h"

namespace ghostkernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTP = kDfcPixelBlock;
constexpr int kTC = kDfcChannelBlock;
constexpr int kTK = 32;                            // input channels per chunk
constexpr int kRows = kThreads / 32;               // warps per block
constexpr int kPerThread = kTP * kTC / kThreads;   // outputs per thread of the 1x1 phase
constexpr int kTaps = 5;
static_assert(kTP == 32 && kTC == 32, "the lane index walks one 32-wide tile dim");
static_assert(kPerThread * kRows == 32, "each warp row covers the other tile dim");

template <typename T, bool kChannelsLast, typename index_t>
__global__ void __launch_bounds__(kThreads) pool_project_kernel(DfcGateArgs a) {
  __shared__ float pooled[kTK][kTP + 1];   // [k][pixel]
  __shared__ float weights[kTC][kTK + 1];  // [channel][k]
  const T* w = static_cast<const T*>(a.w_proj);
  const T* bias = static_cast<const T*>(a.b_proj);
  const index_t Cin = a.in_channels, C = a.channels, H = a.height, W = a.width;
  const index_t Wp = W / 2, NP = (H / 2) * Wp;
  const index_t p0 = static_cast<index_t>(blockIdx.x) * kTP;
  const index_t c0 = static_cast<index_t>(blockIdx.y) * kTC;
  const int64_t b = blockIdx.z;
  const T* x = static_cast<const T*>(a.x) + b * (a.in_channels * a.height * a.width);
  float* projected = a.projected + b * (a.channels * NP);
  // x steps to the right-hand and the lower pixel of a window
  const index_t dx = kChannelsLast ? Cin : 1, dy = W * dx;
  const int lane = threadIdx.x % 32, row = threadIdx.x / 32;

  float acc[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) acc[i] = 0.f;
  for (index_t k0 = 0; k0 < Cin; k0 += kTK) {
    // The chunk's 2x2 averages; consecutive threads take consecutive addresses of x.
    for (int e = threadIdx.x; e < kTK * kTP; e += kThreads) {
      const int kk = kChannelsLast ? e % kTK : e / kTP;
      const int pp = kChannelsLast ? e / kTK : e % kTP;
      const index_t k = k0 + kk, p = p0 + pp;
      float v = 0.f;
      if (k < Cin && p < NP) {
        const index_t ph = p / Wp, pw = p - ph * Wp;
        const index_t at = kChannelsLast ? (2 * ph * W + 2 * pw) * Cin + k
                                         : (k * H + 2 * ph) * W + 2 * pw;
        v = 0.25f * ((to_float(x[at]) + to_float(x[at + dx])) +
                     (to_float(x[at + dy]) + to_float(x[at + dy + dx])));
      }
      pooled[kk][pp] = v;
    }
    for (int e = threadIdx.x; e < kTC * kTK; e += kThreads) {
      const int kk = e % kTK, cc = e / kTK;  // w is [C, Cin]: k fastest
      const index_t k = k0 + kk, c = c0 + cc;
      weights[cc][kk] = (k < Cin && c < C) ? to_float(w[c * Cin + k]) : 0.f;
    }
    __syncthreads();
    const int chunk = static_cast<int>(Cin - k0 < kTK ? Cin - k0 : kTK);
    for (int kk = 0; kk < chunk; ++kk) {
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        const int pp = kChannelsLast ? row + kRows * i : lane;
        const int cc = kChannelsLast ? lane : row + kRows * i;
        acc[i] += pooled[kk][pp] * weights[cc][kk];
      }
    }
    __syncthreads();  // the next chunk overwrites both buffers
  }
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const index_t p = p0 + (kChannelsLast ? row + kRows * i : lane);
    const index_t c = c0 + (kChannelsLast ? lane : row + kRows * i);
    if (p < NP && c < C) {
      projected[kChannelsLast ? p * C + c : c * NP + p] = acc[i] + to_float(bias[c]);
    }
  }
}

template <typename T, bool kChannelsLast, typename index_t>
__global__ void __launch_bounds__(kThreads) stencil_sigmoid_kernel(DfcGateArgs a, index_t total) {
  const float* P = a.projected;
  const T* w_h = static_cast<const T*>(a.w_h);
  const T* b_h = static_cast<const T*>(a.b_h);
  const T* w_v = static_cast<const T*>(a.w_v);
  const T* b_v = static_cast<const T*>(a.b_v);
  T* gate = static_cast<T*>(a.gate);
  const index_t C = a.channels, Hp = a.height / 2, Wp = a.width / 2;
  const index_t dx = kChannelsLast ? C : 1, dy = Wp * dx;  // P steps along a row / a column
  const index_t step = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t o = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; o < total;
       o += step) {
    index_t b, c, ph, pw;
    unflatten_bchw<kChannelsLast>(o, C, Hp, Wp, b, c, ph, pw);
    // P[b, c, 0, 0]
    const index_t origin = kChannelsLast ? b * Hp * Wp * C + c : (b * C + c) * Hp * Wp;
    const T* taps_h = w_h + c * kTaps;
    const T* taps_v = w_v + c * kTaps;
    const float bias_h = to_float(b_h[c]);
    float s = to_float(b_v[c]);
#pragma unroll
    for (int i = 0; i < kTaps; ++i) {
      const index_t r = ph + i - kTaps / 2;
      if (r < 0 || r >= Hp) continue;  // zero padding of the 1x5 result
      float across = bias_h;
#pragma unroll
      for (int j = 0; j < kTaps; ++j) {
        const index_t col = pw + j - kTaps / 2;
        if (col < 0 || col >= Wp) continue;  // zero padding of P
        across += to_float(taps_h[j]) * P[origin + r * dy + col * dx];
      }
      s += to_float(taps_v[i]) * across;
    }
    gate[o] = from_float<T>(1.f / (1.f + expf(-s)));
  }
}

template <typename T, bool kChannelsLast, typename index_t>
cudaError_t launch_layout(const DfcGateArgs& a, int64_t total, unsigned stencil_blocks,
                          const dim3& project_grid, cudaStream_t stream) {
  pool_project_kernel<T, kChannelsLast, index_t><<<project_grid, kThreads, 0, stream>>>(a);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  stencil_sigmoid_kernel<T, kChannelsLast, index_t>
      <<<stencil_blocks, kThreads, 0, stream>>>(a, static_cast<index_t>(total));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const DfcGateArgs& a, cudaStream_t stream) {
  const int64_t NP = (a.height / 2) * (a.width / 2);
  const int64_t total = a.batch * a.channels * NP;
  if (total == 0) return cudaSuccess;
  const int64_t pixel_blocks = (NP + kTP - 1) / kTP;
  const int64_t channel_blocks = (a.channels + kTC - 1) / kTC;
  if (pixel_blocks > 0x7fffffff || channel_blocks > 65535 || a.batch > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  const dim3 project_grid(static_cast<unsigned>(pixel_blocks),
                          static_cast<unsigned>(channel_blocks), static_cast<unsigned>(a.batch));
  const int64_t blocks_needed = (total + kThreads - 1) / kThreads;
  const unsigned stencil_blocks =
      static_cast<unsigned>(blocks_needed < (1 << 20) ? blocks_needed : (1 << 20));
  // Largest value any index takes (plus the grid-stride overshoot) must fit the index type.
  const int64_t image = a.in_channels * a.height * a.width;
  const int64_t weights = a.channels * a.in_channels;
  int64_t largest = total > image ? total : image;
  largest = (largest > weights ? largest : weights) + int64_t(kThreads) * (1 << 20);
  const bool small = largest < (int64_t(1) << 31);
  if (a.channels_last) {
    return small ? launch_layout<T, true, int32_t>(a, total, stencil_blocks, project_grid, stream)
                 : launch_layout<T, true, int64_t>(a, total, stencil_blocks, project_grid, stream);
  }
  return small ? launch_layout<T, false, int32_t>(a, total, stencil_blocks, project_grid, stream)
               : launch_layout<T, false, int64_t>(a, total, stencil_blocks, project_grid, stream);
}

}  // namespace

cudaError_t launch_dfc_gate(const DfcGateArgs& args, DType dtype, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&]<typename T>() { return launch_typed<T>(args, stream); });
}

}  // namespace cuda
}  // namespace ghostkernels
