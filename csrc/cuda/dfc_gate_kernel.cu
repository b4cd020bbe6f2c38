// CUDA kernel of the DFC attention gate (torch-free; launched from dfc_gate.cpp).
//
//   P[b,c,i,j]    = b_proj[c] + sum_k w_proj[c,k] * avg(x[b,k,2i:2i+2,2j:2j+2])
//   R[b,c,i,j]    = b_h[c] + sum_{t<5} w_h[c,t] * P[b,c,i,j+t-2]         (P zero outside the map)
//   gate[b,c,i,j] = sigmoid(b_v[c] + sum_{t<5} w_v[c,t] * R[b,c,i+t-2,j]) (R zero outside the map)
//
// One launch (the five ops of the plain composition, and the two launches with an fp32 P round
// trip through memory that this file held before): a block owns a 12 x 12 tile of gate pixels x
// 32 channels of one image. The separable 5 x 5 stencil reaches two pooled pixels past the tile,
// so the block computes P on the 16 x 16 region around it:
//   1. only the part of that region inside the map is computed (for a small map, a fraction of
//      it): the input channels stream through shared memory in chunks of 32, the 2x2 averages
//      of the region's pixels ([pixel][k], each computed once, as x is loaded) and the 1x1
//      weights ([channel][k]); each of the 256 threads accumulates up to 32 pixels of one
//      channel (its lane) in fp32, four input channels per float4 step (the pooled reads are
//      warp broadcasts, the weight rows conflict-free);
//   2. P (+ bias; zero outside the map: the 1x5 pads P with zeros) goes to shared memory, fp32;
//   3. each thread takes 18 gate values: the five 1x5 rows the 5x1 needs are summed from P
//      (rows outside the map skipped: the 5x1 pads the 1x5 *result*, bias included, with zeros),
//      then the sigmoid; lanes run along the gate's contiguous dim (channels in channels_last,
//      pixels in NCHW), so the stores are coalesced and the P reads conflict-free.
// An interior tile's region costs (16 x 16) / (12 x 12) = 1.8x its 1x1 work (x re-read from
// L2); P never leaves the chip. 32-bit offsets within an image when they fit, 64-bit otherwise.
#include "dfc_gate_kernel.h"

#include <algorithm>

namespace ghostkernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = kDfcTile;                 // gate pixels per tile side
constexpr int kTaps = 5, kReach = kTaps / 2;    // the 1x5 / 5x1 stencils
constexpr int kSide = kTile + 2 * kReach;       // P region side
constexpr int kRegion = kSide * kSide;          // P region pixels
constexpr int kTC = kDfcChannelBlock;           // channels per block
constexpr int kTK = 32;                         // input channels per chunk
constexpr int kWarps = kThreads / 32;
constexpr int kPerWarp = kRegion / kWarps;      // region pixels a warp (each of its lanes) owns
constexpr int kOutPerThread = kTile * kTile * kTC / kThreads;  // gate values a thread writes
constexpr int kKRow = kTK + 4;                  // pooled / weight rows: 16-byte aligned
static_assert(kTC == 32, "the lane index is the channel of the 1x1 phase");
static_assert(kRegion % kWarps == 0 && (kTile * kTile * kTC) % kThreads == 0, "even split");
static_assert(kTK % 4 == 0 && kKRow % 4 == 0, "float4 reads along the input channels");

// Shared memory: the chunk buffers (pooled [pixel][k], weights [channel][k]) are reused for P
// ([region pixel][channel], rows padded by one float) once the last chunk is done.
constexpr int kPooledFloats = kRegion * kKRow;
constexpr int kWeightFloats = kTC * kKRow;
constexpr int kPFloats = kRegion * (kTC + 1);
constexpr int kUnionFloats = kPooledFloats + kWeightFloats > kPFloats
                                 ? kPooledFloats + kWeightFloats : kPFloats;

template <typename T, bool kChannelsLast, typename index_t>
__global__ void __launch_bounds__(kThreads, 4) dfc_gate_kernel(DfcGateArgs a, int tiles_w) {
  __shared__ __align__(16) float buffer[kUnionFloats];
  __shared__ float taps_h[kTaps][kTC];  // [tap][channel]
  __shared__ float taps_v[kTaps][kTC];
  __shared__ float bias_h[kTC];
  __shared__ float bias_v[kTC];
  float* pooled = buffer;                   // [kRegion][kKRow]: the rectangle's pixels, then k
  float* weights = buffer + kPooledFloats;  // [kTC][kKRow]
  float* P = buffer;                        // [kRegion][kTC + 1], after the last chunk

  const T* w = static_cast<const T*>(a.w_proj);
  const index_t Cin = a.in_channels, C = a.channels, H = a.height, W = a.width;
  const index_t Hp = H / 2, Wp = W / 2;
  const int c0 = blockIdx.y * kTC;
  const int cn = C - c0 < kTC ? static_cast<int>(C - c0) : kTC;  // channels of this block
  const index_t i0 = static_cast<index_t>(blockIdx.x / tiles_w) * kTile;  // tile origin
  const index_t j0 = static_cast<index_t>(blockIdx.x % tiles_w) * kTile;
  const int64_t b = blockIdx.z;
  const T* x = static_cast<const T*>(a.x) + b * (a.in_channels * a.height * a.width);
  const index_t dx = kChannelsLast ? Cin : 1, dy = W * dx;  // x: right-hand / lower pixel
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  // P is needed on the region (the tile and kReach pixels around it) inside the map: a
  // rectangle of rows ri0 .. ri0 + rh - 1, columns rj0 .. rj0 + rw - 1, listed row by row.
  const index_t ri0 = i0 - kReach > 0 ? i0 - kReach : 0;
  const index_t rj0 = j0 - kReach > 0 ? j0 - kReach : 0;
  const int rh = static_cast<int>((i0 + kTile + kReach < Hp ? i0 + kTile + kReach : Hp) - ri0);
  const int rw = static_cast<int>((j0 + kTile + kReach < Wp ? j0 + kTile + kReach : Wp) - rj0);
  const int count = rh * rw;  // <= kRegion

  for (int e = tid; e < kTaps * kTC; e += kThreads) {
    const int t = e / kTC, cc = e % kTC;
    const bool ok = cc < cn;
    taps_h[t][cc] = ok ? to_float(static_cast<const T*>(a.w_h)[(c0 + cc) * kTaps + t]) : 0.f;
    taps_v[t][cc] = ok ? to_float(static_cast<const T*>(a.w_v)[(c0 + cc) * kTaps + t]) : 0.f;
  }
  for (int cc = tid; cc < kTC; cc += kThreads) {
    bias_h[cc] = cc < cn ? to_float(static_cast<const T*>(a.b_h)[c0 + cc]) : 0.f;
    bias_v[cc] = cc < cn ? to_float(static_cast<const T*>(a.b_v)[c0 + cc]) : 0.f;
  }

  // 1. P of the rectangle, accumulated over the input chunks. Thread: channel `lane`, list
  //    entries warp * kPerWarp + i (a warp skips the entries past `count` together); four input
  //    channels per step, as float4 reads (the pooled read is a warp broadcast).
  float acc[kPerWarp];
#pragma unroll
  for (int i = 0; i < kPerWarp; ++i) acc[i] = 0.f;
  const int first = warp * kPerWarp;
  for (index_t k0 = 0; k0 < Cin; k0 += kTK) {
    // the chunk's 2x2 averages (zero past Cin); consecutive threads take consecutive addresses
    // of x (channels in channels_last, columns in NCHW)
    for (int e = tid; e < kTK * count; e += kThreads) {
      const int kk = kChannelsLast ? e % kTK : e / count;
      const int r = kChannelsLast ? e / kTK : e % count;
      const index_t k = k0 + kk, pi = ri0 + r / rw, pj = rj0 + r % rw;
      float v = 0.f;
      if (k < Cin) {
        const index_t at = kChannelsLast ? (2 * pi * W + 2 * pj) * Cin + k
                                         : (k * H + 2 * pi) * W + 2 * pj;
        v = 0.25f * ((to_float(x[at]) + to_float(x[at + dx])) +
                     (to_float(x[at + dy]) + to_float(x[at + dy + dx])));
      }
      pooled[r * kKRow + kk] = v;
    }
    for (int e = tid; e < kTC * kTK; e += kThreads) {
      const int kk = e % kTK, cc = e / kTK;  // w is [C, Cin]: k fastest
      const index_t k = k0 + kk;
      weights[cc * kKRow + kk] = (k < Cin && cc < cn) ? to_float(w[(c0 + cc) * Cin + k]) : 0.f;
    }
    __syncthreads();
    const int steps = static_cast<int>((Cin - k0 < kTK ? Cin - k0 : kTK) + 3) / 4;
    for (int s = 0; s < steps; ++s) {
      const float4 wk = *reinterpret_cast<const float4*>(weights + lane * kKRow + 4 * s);
#pragma unroll
      for (int i = 0; i < kPerWarp; ++i) {
        if (first + i < count) {  // the same for the whole warp
          const float4 p =
              *reinterpret_cast<const float4*>(pooled + (first + i) * kKRow + 4 * s);
          acc[i] += p.x * wk.x + p.y * wk.y + p.z * wk.z + p.w * wk.w;
        }
      }
    }
    __syncthreads();  // the next chunk (or P) overwrites the buffers
  }

  // 2. P + bias to shared memory on the whole region, zero outside the map (the 1x5 pads P
  //    with zeros).
  for (int e = tid; e < kRegion * (kTC + 1); e += kThreads) P[e] = 0.f;
  __syncthreads();
  const float bias = lane < cn ? to_float(static_cast<const T*>(a.b_proj)[c0 + lane]) : 0.f;
#pragma unroll
  for (int i = 0; i < kPerWarp; ++i) {
    const int r = first + i;
    if (r < count) {
      const index_t rr = ri0 + r / rw - (i0 - kReach), rc = rj0 + r % rw - (j0 - kReach);
      P[(rr * kSide + rc) * (kTC + 1) + lane] = acc[i] + bias;
    }
  }
  __syncthreads();

  // 3. the separable stencil and the sigmoid, kOutPerThread gate values per thread.
  T* gate = static_cast<T*>(a.gate) + b * (a.channels * Hp * Wp);
#pragma unroll 2
  for (int n = 0; n < kOutPerThread; ++n) {
    const int e = tid + kThreads * n;
    // channels_last: channel fastest (lane = channel); NCHW: tile pixel fastest
    const int cc = kChannelsLast ? e % kTC : e / (kTile * kTile);
    const int q = kChannelsLast ? e / kTC : e % (kTile * kTile);
    const int ty = q / kTile, tx = q % kTile;
    const index_t i = i0 + ty, j = j0 + tx;
    if (cc >= cn || i >= Hp || j >= Wp) continue;
    float s = bias_v[cc];
#pragma unroll
    for (int t = 0; t < kTaps; ++t) {
      const index_t row = i + t - kReach;
      if (row < 0 || row >= Hp) continue;  // the 5x1 pads the 1x5 result with zeros
      const float* p = P + ((ty + t) * kSide + tx) * (kTC + 1) + cc;
      float across = bias_h[cc];
#pragma unroll
      for (int u = 0; u < kTaps; ++u) across += taps_h[u][cc] * p[u * (kTC + 1)];
      s += taps_v[t][cc] * across;
    }
    const index_t at = kChannelsLast ? (i * Wp + j) * C + c0 + cc : ((c0 + cc) * Hp + i) * Wp + j;
    gate[at] = from_float<T>(1.f / (1.f + expf(-s)));
  }
}

template <typename T>
cudaError_t launch_typed(const DfcGateArgs& a, cudaStream_t stream) {
  const int64_t Hp = a.height / 2, Wp = a.width / 2;
  if (a.batch * a.channels * Hp * Wp == 0) return cudaSuccess;
  const int64_t tiles_h = (Hp + kTile - 1) / kTile, tiles_w = (Wp + kTile - 1) / kTile;
  const int64_t channel_blocks = (a.channels + kTC - 1) / kTC;
  if (tiles_h * tiles_w > 0x7fffffff || channel_blocks > 65535 || a.batch > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  const dim3 grid(static_cast<unsigned>(tiles_h * tiles_w), static_cast<unsigned>(channel_blocks),
                  static_cast<unsigned>(a.batch));
  // Every offset within one image (x, gate) and into the weights must fit the index type.
  const int64_t image = a.in_channels * a.height * a.width, gate = a.channels * Hp * Wp;
  const int64_t weights = a.channels * a.in_channels;
  const int64_t largest = std::max({image, gate, weights});
  const bool small = largest < (int64_t(1) << 31);
  const int tw = static_cast<int>(tiles_w);
  if (a.channels_last) {
    if (small) dfc_gate_kernel<T, true, int32_t><<<grid, kThreads, 0, stream>>>(a, tw);
    else dfc_gate_kernel<T, true, int64_t><<<grid, kThreads, 0, stream>>>(a, tw);
  } else {
    if (small) dfc_gate_kernel<T, false, int32_t><<<grid, kThreads, 0, stream>>>(a, tw);
    else dfc_gate_kernel<T, false, int64_t><<<grid, kThreads, 0, stream>>>(a, tw);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_dfc_gate(const DfcGateArgs& args, DType dtype, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&]<typename T>() { return launch_typed<T>(args, stream); });
}

}  // namespace cuda
}  // namespace ghostkernels
