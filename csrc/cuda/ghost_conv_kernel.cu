// CUDA-core kernel of the folded Ghost op, for float32 (torch-free; launched from ghost_ops.cpp;
// float16 and bfloat16 go to the tensor-core kernel of ghost_conv_mma_kernel.cu).
//
//   y[:, :C1]      = x1 = act_p(W1 (s x) + b1)                   (1x1 conv, C1 primary channels)
//   y[:, C1:C1+C2] = act_c(dw3x3(x1, pad 1) + b2)[:, :C2]        (C2 = out_channels - C1)
//   then, optionally, y = y * gate[b, c, h*Hg/H, w*Wg/W] + residual[b, c, h, w]
// with s the optional per-(image, input channel) scale, applied as x is loaded.
//
// One block owns a 14x14 output tile x 32 primary channels of one image (grid: tiles x channel
// blocks x batch) and 256 threads:
//   1. 1x1 phase, one thread per pixel of the 16x16 tile-plus-halo: input channels are streamed
//      in chunks of 32 through shared memory (x chunk [k][pixel], weights [k][channel]); each
//      thread keeps the 32 channel sums of its pixel in registers (the weights are read as
//      broadcast float4s, so shared-memory traffic is ~1/3 load per FMA).
//   2. bias + act; x1 of the whole halo tile goes to shared memory (zero outside the image: that
//      is the depthwise conv's zero padding), reusing the x-chunk buffer.
//   3. for each interior (pixel, channel): write x1 to y[:, c] and the 3x3 depthwise + bias +
//      act to y[:, C1 + c], each times its gate value plus its residual value when those are
//      given. The loop order follows the layout so that writes (and residual reads, which use
//      the same index) are coalesced (NCHW: pixel-fastest; channels_last: channel-fastest).
// Shared memory is fixed (~37 KB) whatever C1 and Cin are; large C1 uses more channel blocks.
// The halo costs (16*16)/(14*14) = 1.31x the 1x1 FLOPs; x is re-read once per channel block
// (mostly from L2).
#include "ghost_ops_kernel.h"

namespace ghostkernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kHaloH = kGhostTileH + 2;
constexpr int kHaloW = kGhostTileW + 2;
constexpr int kHalo = kHaloH * kHaloW;                    // pixels of the tile plus halo
constexpr int kTile = kGhostTileH * kGhostTileW;          // interior pixels
constexpr int kCB = kGhostChannelBlock;                   // primary channels per block
constexpr int kKC = 32;                                   // input channels per chunk
constexpr int kRowStride = kHalo + 1;                     // odd: channel-fastest access is conflict-free
constexpr int kTileRows = kKC > kCB ? kKC : kCB;          // rows of the shared tile buffer
static_assert(kHalo == kThreads, "the 1x1 phase maps one thread to one halo pixel");
static_assert(kCB % 4 == 0, "weights are read as float4");

template <typename T, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    ghost_conv_kernel(GhostConvArgs a, int64_t tiles_w) {
  // x chunk [k][pixel] during the 1x1 phase, then x1 [channel][pixel].
  __shared__ float tile[kTileRows * kRowStride];
  __shared__ float4 w_chunk[kKC * kCB / 4];  // [k][channel]
  float* w_chunk_flat = reinterpret_cast<float*>(w_chunk);

  const T* x = static_cast<const T*>(a.x);
  const T* w1 = static_cast<const T*>(a.w_primary);
  const T* b1 = static_cast<const T*>(a.b_primary);
  const T* wc = static_cast<const T*>(a.w_cheap);
  const T* b2 = static_cast<const T*>(a.b_cheap);
  const T* scale = static_cast<const T*>(a.input_scale);  // nullptr: no input scale
  const T* gate = static_cast<const T*>(a.gate);          // nullptr: no gate
  const T* residual = static_cast<const T*>(a.residual);  // nullptr: no residual
  T* y = static_cast<T*>(a.y);
  const int64_t Cin = a.in_channels, H = a.height, W = a.width;
  const int64_t C1 = a.primary_channels, Cout = a.out_channels, C2 = Cout - C1;
  const int64_t Hg = a.gate_height, Wg = a.gate_width;
  const int64_t b = blockIdx.z;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kCB;
  const int64_t h0 = (blockIdx.x / tiles_w) * kGhostTileH;
  const int64_t w0 = (blockIdx.x % tiles_w) * kGhostTileW;
  const int tid = threadIdx.x;

  auto x_index = [&](int64_t c, int64_t h, int64_t w) {
    return kChannelsLast ? ((b * H + h) * W + w) * Cin + c : ((b * Cin + c) * H + h) * W + w;
  };
  auto y_index = [&](int64_t c, int64_t h, int64_t w) {
    return kChannelsLast ? ((b * H + h) * W + w) * Cout + c : ((b * Cout + c) * H + h) * W + w;
  };
  // The epilogue of output element (c, h, w): times the nearest gate value, plus the residual.
  auto finish = [&](float v, int64_t c, int64_t h, int64_t w) {
    if (gate) {
      const int64_t gh = h * Hg / H, gw = w * Wg / W;
      v *= to_float(gate[kChannelsLast ? ((b * Hg + gh) * Wg + gw) * Cout + c
                                       : ((b * Cout + c) * Hg + gh) * Wg + gw]);
    }
    if (residual) v += to_float(residual[y_index(c, h, w)]);
    return v;
  };

  // 1. 1x1 conv: thread tid owns halo pixel tid, all kCB channels of this block.
  float acc[kCB];
#pragma unroll
  for (int c = 0; c < kCB; ++c) acc[c] = 0.f;

  for (int64_t k0 = 0; k0 < Cin; k0 += kKC) {
    const int kn = static_cast<int>(Cin - k0 < kKC ? Cin - k0 : kKC);
    for (int idx = tid; idx < kKC * kHalo; idx += kThreads) {
      // Consecutive threads read consecutive addresses of x in either layout.
      const int k = kChannelsLast ? idx % kKC : idx / kHalo;
      const int p = kChannelsLast ? idx / kKC : idx % kHalo;
      const int64_t h = h0 - 1 + p / kHaloW, w = w0 - 1 + p % kHaloW;
      float v = 0.f;
      if (k < kn && h >= 0 && h < H && w >= 0 && w < W) {
        v = to_float(x[x_index(k0 + k, h, w)]);
        if (scale) v *= to_float(scale[b * Cin + k0 + k]);
      }
      tile[k * kRowStride + p] = v;
    }
    for (int idx = tid; idx < kKC * kCB; idx += kThreads) {
      const int k = idx / kCB, c = idx % kCB;
      float v = 0.f;
      if (k < kn && c0 + c < C1) v = to_float(w1[(c0 + c) * Cin + k0 + k]);
      w_chunk_flat[k * kCB + c] = v;
    }
    __syncthreads();
    for (int k = 0; k < kn; ++k) {
      const float xv = tile[k * kRowStride + tid];
#pragma unroll
      for (int j = 0; j < kCB / 4; ++j) {
        const float4 wv = w_chunk[k * (kCB / 4) + j];
        acc[4 * j + 0] += wv.x * xv;
        acc[4 * j + 1] += wv.y * xv;
        acc[4 * j + 2] += wv.z * xv;
        acc[4 * j + 3] += wv.w * xv;
      }
    }
    __syncthreads();  // the tile buffer is overwritten next (next chunk, or x1)
  }

  // 2. bias + act into shared memory; zero outside the image (depthwise zero padding).
  {
    const int64_t h = h0 - 1 + tid / kHaloW, w = w0 - 1 + tid % kHaloW;
    const bool inside = h >= 0 && h < H && w >= 0 && w < W;
#pragma unroll
    for (int c = 0; c < kCB; ++c) {
      float v = 0.f;
      if (inside && c0 + c < C1) v = activate(acc[c] + to_float(b1[c0 + c]), a.relu_primary);
      tile[c * kRowStride + tid] = v;
    }
  }
  __syncthreads();

  // 3. x1 -> y[:, c0 + c]; depthwise 3x3 + bias + act -> y[:, C1 + c0 + c].
  for (int idx = tid; idx < kCB * kTile; idx += kThreads) {
    const int c = kChannelsLast ? idx % kCB : idx / kTile;
    const int q = kChannelsLast ? idx / kCB : idx % kTile;
    const int ty = q / kGhostTileW, tx = q % kGhostTileW;
    const int64_t h = h0 + ty, w = w0 + tx, co = c0 + c;
    if (h >= H || w >= W || co >= C1) continue;
    const float* center = &tile[c * kRowStride + (ty + 1) * kHaloW + (tx + 1)];
    y[y_index(co, h, w)] = from_float<T>(finish(center[0], co, h, w));
    if (co < C2) {
      const T* k9 = wc + co * 9;
      float s = to_float(b2[co]);
#pragma unroll
      for (int dy = -1; dy <= 1; ++dy)
#pragma unroll
        for (int dx = -1; dx <= 1; ++dx)
          s += to_float(k9[(dy + 1) * 3 + (dx + 1)]) * center[dy * kHaloW + dx];
      const float x2 = activate(s, a.relu_cheap);
      y[y_index(C1 + co, h, w)] = from_float<T>(finish(x2, C1 + co, h, w));
    }
  }
}

template <typename T>
cudaError_t launch_typed(const GhostConvArgs& a, cudaStream_t stream) {
  const GhostConvGrid g = ghost_conv_grid(a, DType::kFloat32);
  const dim3 grid(static_cast<unsigned>(g.tiles), static_cast<unsigned>(g.channel_blocks),
                  static_cast<unsigned>(g.batch));
  if (a.channels_last)
    ghost_conv_kernel<T, true><<<grid, kThreads, 0, stream>>>(a, g.tiles_w);
  else
    ghost_conv_kernel<T, false><<<grid, kThreads, 0, stream>>>(a, g.tiles_w);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_ghost_conv(const GhostConvArgs& args, DType dtype, cudaStream_t stream) {
  if (dtype != DType::kFloat32) return launch_ghost_conv_mma(args, dtype, stream);
  return dispatch_dtype(dtype, [&]<typename T>() { return launch_typed<T>(args, stream); });
}

}  // namespace cuda
}  // namespace ghostkernels
