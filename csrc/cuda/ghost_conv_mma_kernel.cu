// Tensor-core CUDA kernel of the folded Ghost op for float16 / bfloat16 (torch-free; launched
// through launch_ghost_conv, ghost_conv_kernel.cu, which keeps float32 on CUDA cores).
//
//   y[:, :C1]      = x1 = act_p(W1 (s x) + b1)                   (1x1 conv, C1 primary channels)
//   y[:, C1:C1+C2] = act_c(dw3x3(x1, pad 1) + b2)[:, :C2]        (C2 = out_channels - C1)
//   then, optionally, y = y * gate[b, c, h*Hg/H, w*Wg/W] + residual[b, c, h, w]
// with s the optional per-(image, input channel) scale, folded into the block's weight chunk
// (W1 diag(s_b), rounded to the dtype: one rounding per product, as `x * s` would have).
//
// A block owns an 8 x 14 output tile x 64 primary channels of one image (grid: tiles x channel
// blocks x batch) and 10 warps. The tile plus its one-pixel halo is 10 x 16 = 160 pixels, so halo
// row r is exactly the 16 rows of one wmma fragment, and warp r owns it:
//   1. 1x1 conv on tensor cores (wmma 16x16x16, float accumulators). Input channels stream through
//      shared memory in chunks of 64 (one chunk for Cin <= 64), x by 16-byte cp.async where the
//      layout, channel count and pointer allow; the accumulators start from the bias (a 16-row bias
//      tile loaded as an accumulator fragment). Warp r multiplies its 16 pixels by the 64-channel
//      weight chunk: one A fragment per k-step, reused by four B fragments.
//   2. act on the fragments, then x1 (float) of the whole halo tile to shared memory, reusing the
//      chunk buffers; border tiles zero the pixels outside the image (the depthwise padding).
//   3. for each interior (pixel, channel): x1 to y[:, c], and the 3x3 depthwise (weights and bias
//      staged once in shared memory) + bias + act to y[:, C1 + c], each times its gate value plus
//      its residual value when those are given. channels_last with even channel counts and
//      pointers: warp r sweeps output row r, each lane a channel pair (taps in registers, 4-byte
//      stores, each x1 pair read once per column) and, under 64 channels, a run of the row's
//      columns; otherwise one item per (pixel, channel), channel-fastest (channels_last) or
//      pixel-fastest (NCHW: coalesced along W).
// x1 is kept in float from the accumulator to the depthwise conv: one rounding per output, as in
// the other backends. The halo costs 160/112 = 1.43x the 1x1 work (cheap on tensor cores) and as
// much re-reading of x, mostly from L2. Static shared memory: 46 KB; 3 blocks (30 warps) per SM.
#include <cuda_pipeline.h>
#include <mma.h>

#include <type_traits>

#include "ghost_ops_kernel.h"

namespace ghostkernels {
namespace cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kOutH = kGhostMmaTileH, kOutW = kGhostMmaTileW;
constexpr int kHaloH = kOutH + 2, kHaloW = kOutW + 2;
constexpr int kPix = kHaloH * kHaloW;    // halo-tile pixels = GEMM rows
constexpr int kOutPix = kOutH * kOutW;   // interior pixels
constexpr int kWarps = kHaloH;           // warp r: halo row r = GEMM rows 16r .. 16r+15
constexpr int kThreads = 32 * kWarps;
constexpr int kN = kGhostMmaChannelBlock;  // primary channels per block = GEMM columns
constexpr int kNFrags = kN / 16;
constexpr int kKC = 64;                  // input channels per chunk
// Shared-memory rows are padded (by 16 bytes) so that fragment loads and the output pass's
// channel-fastest (channels_last) or pixel-fastest (NCHW) accesses spread over the banks.
constexpr int kXRowCL = kKC + 8;         // x chunk, channels_last: [pixel][k]
constexpr int kXRowNCHW = kPix + 8;      // x chunk, NCHW: [k][pixel]
constexpr int kWRow = kKC + 8;           // weight chunk: [n][k] (a col-major B operand)
constexpr int kX1RowCL = kN + 4;         // x1, channels_last: [pixel][channel]
constexpr int kX1RowNCHW = kPix + 4;     // x1, NCHW: [channel][pixel]
constexpr int kBiasRow = kN + 4;         // bias tile: 16 identical rows of b1

constexpr int cmax(int a, int b) { return a > b ? a : b; }
constexpr int kXBytes = cmax(kPix * kXRowCL, kKC * kXRowNCHW) * 2;
constexpr int kWBytes = kN * kWRow * 2;
constexpr int kBiasOffset = kXBytes + kWBytes;  // the bias tile lives past the chunk buffers
constexpr int kBiasBytes = 16 * kBiasRow * 4;
constexpr int kX1Bytes = cmax(kPix * kX1RowCL, kN * kX1RowNCHW) * 4;
constexpr int kUnionBytes = cmax(kX1Bytes, kBiasOffset + kBiasBytes);
static_assert(kHaloW == 16, "a halo row is one 16-row wmma fragment");
static_assert(kN % 16 == 0 && kKC % 16 == 0, "whole fragments");
static_assert(kXBytes % 32 == 0 && kBiasOffset % 32 == 0, "wmma pointers are 32-byte aligned");

struct alignas(32) SharedBlock {  // 32-byte units: wmma needs 256-bit aligned pointers
  float v[8];
};

// Phase 1, one chunk: x[b, k0 : k0+kpad, halo tile] -> xs, zero outside the image and past Cin.
// kAsync (channels_last, Cin % 8 == 0, x 16-byte aligned): 8 channels per 16-byte cp.async,
// straight to shared memory, no registers in between. Otherwise element by element, kBatch
// loads in flight per thread before their shared-memory stores.
template <typename T, bool kCL, bool kAsync>
__device__ __forceinline__ void load_x_chunk(const GhostConvArgs& a, T* xs, int b, int h0, int w0,
                                             int k0, int kn, int kpad) {
  const T* x = static_cast<const T*>(a.x);
  const int Cin = static_cast<int>(a.in_channels), H = static_cast<int>(a.height);
  const int W = static_cast<int>(a.width);
  auto inside = [&](int p, int& h, int& w) {
    h = h0 - 1 + p / kHaloW;
    w = w0 - 1 + p % kHaloW;
    return h >= 0 && h < H && w >= 0 && w < W;
  };
  if constexpr (kAsync) {
    const int groups = kpad / 8;  // 8-channel groups per pixel
    for (int idx = threadIdx.x; idx < kPix * groups; idx += kThreads) {
      const int g = idx % groups, p = idx / groups;
      T* dst = xs + p * kXRowCL + g * 8;
      int h, w;
      if (g * 8 < kn && inside(p, h, w))
        __pipeline_memcpy_async(dst, x + ((int64_t(b) * H + h) * W + w) * Cin + k0 + g * 8, 16);
      else
        *reinterpret_cast<Vec<T, 8>*>(dst) = Vec<T, 8>{};
    }
    __pipeline_commit();
    __pipeline_wait_prior(0);
  } else {
    constexpr int kBatch = 4;
    const int items = kPix * kpad;
    for (int base = threadIdx.x; base < items; base += kThreads * kBatch) {
      T v[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const int idx = base + i * kThreads;
        const int k = kCL ? idx % kpad : idx / kPix, p = kCL ? idx / kpad : idx % kPix;
        int h, w;
        v[i] = from_float<T>(0.f);
        if (idx < items && k < kn && inside(p, h, w))
          v[i] = x[kCL ? ((int64_t(b) * H + h) * W + w) * Cin + k0 + k
                       : ((int64_t(b) * Cin + k0 + k) * H + h) * W + w];
      }
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const int idx = base + i * kThreads;
        if (idx >= items) break;
        const int k = kCL ? idx % kpad : idx / kPix, p = kCL ? idx / kpad : idx % kPix;
        xs[kCL ? p * kXRowCL + k : k * kXRowNCHW + p] = v[i];
      }
    }
  }
}

// Phase 3, one output: V adjacent channels from `oc` at (b, h, w), times the nearest gate value,
// plus the residual, to y (in x's layout).
template <typename T, bool kCL, int V>
__device__ __forceinline__ void store_output(const GhostConvArgs& a, const float* v, int b,
                                             int oc, int h, int w) {
  const T* gate = static_cast<const T*>(a.gate);
  const T* residual = static_cast<const T*>(a.residual);
  const int64_t H = a.height, W = a.width, Cout = a.out_channels;
  float out[V];
#pragma unroll
  for (int e = 0; e < V; ++e) out[e] = v[e];
  if (gate) {
    const int64_t Hg = a.gate_height, Wg = a.gate_width;
    const int64_t gh = h * Hg / H, gw = w * Wg / W;
    const int64_t gi = kCL ? ((b * Hg + gh) * Wg + gw) * Cout + oc
                           : ((b * Cout + oc) * Hg + gh) * Wg + gw;
    const Vec<T, V> g = *reinterpret_cast<const Vec<T, V>*>(gate + gi);
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] *= to_float(g.v[e]);
  }
  const int64_t yi = kCL ? ((b * H + h) * W + w) * Cout + oc : ((b * Cout + oc) * H + h) * W + w;
  static_assert(V == 1 || kCL, "channel pairs are adjacent in channels_last only");
  if (residual) {
    const Vec<T, V> r = *reinterpret_cast<const Vec<T, V>*>(residual + yi);
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] += to_float(r.v[e]);
  }
  Vec<T, V> o;
#pragma unroll
  for (int e = 0; e < V; ++e) o.v[e] = from_float<T>(out[e]);
  *reinterpret_cast<Vec<T, V>*>(static_cast<T*>(a.y) + yi) = o;
}

// Phase 3, the general path: x1 and the depthwise half of every interior (pixel, channel) of the
// block, one item per (pixel, channel), channel-fastest (channels_last) or pixel-fastest (NCHW).
template <typename T, bool kCL>
__device__ __forceinline__ void write_outputs(const GhostConvArgs& a, const float* x1s,
                                              const float* wd, const float* b2s, int b, int c0,
                                              int h0, int w0, int cn) {
  constexpr int kP = kCL ? kX1RowCL : 1;     // x1s stride between pixels
  constexpr int kC = kCL ? 1 : kX1RowNCHW;   // x1s stride between channels
  const int H = static_cast<int>(a.height), W = static_cast<int>(a.width);
  const int C1 = static_cast<int>(a.primary_channels), C2 = static_cast<int>(a.out_channels) - C1;
  const int items = kOutPix * cn;
  for (int idx = threadIdx.x; idx < items; idx += kThreads) {
    const int c = kCL ? idx % cn : idx / kOutPix;  // channel within the block
    const int q = kCL ? idx / cn : idx % kOutPix;
    const int ty = q / kOutW, tx = q % kOutW;
    const int h = h0 + ty, w = w0 + tx;
    if (h >= H || w >= W) continue;
    const int p = (ty + 1) * kHaloW + tx + 1;
    const float x1 = x1s[p * kP + c * kC];
    float x2 = b2s[c];
#pragma unroll
    for (int dy = -1; dy <= 1; ++dy)
#pragma unroll
      for (int dx = -1; dx <= 1; ++dx)
        x2 += wd[((dy + 1) * 3 + dx + 1) * kN + c] * x1s[(p + dy * kHaloW + dx) * kP + c * kC];
    x2 = activate(x2, a.relu_cheap);
    store_output<T, kCL, 1>(a, &x1, b, c0 + c, h, w);
    if (c0 + c < C2) store_output<T, kCL, 1>(a, &x2, b, C1 + c0 + c, h, w);
  }
}

// Phase 3, channels_last with even channel counts: warp r < kOutH owns output row r. The block's
// channel pairs (cn / 2 of them, rounded up to a power of two P) take lanes 0 .. P-1 of each of
// the 32 / P lane groups, and group g sweeps its own run of the row's columns (one run for 64
// channels, seven runs of two columns for 8), so small channel counts keep the lanes busy. A lane
// keeps its pair's taps in registers and sweeps its run one halo column at a time (three x1
// pairs, conflict-free 8-byte reads: a third of what a per-pixel stencil reads); each column adds
// its share to the three outputs that use it, and the oldest is complete.
template <typename T>
__device__ __forceinline__ void write_outputs_by_rows(const GhostConvArgs& a, const float* x1s,
                                                      const float* wd, const float* b2s, int b,
                                                      int c0, int h0, int w0, int cn) {
  const int row = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int h = h0 + row;
  int pairs_pow2 = 1;  // P: the block's channel pairs, rounded up to a power of two (<= 32)
  while (pairs_pow2 * 2 < cn) pairs_pow2 *= 2;
  const int c = 2 * (lane % pairs_pow2), group = lane / pairs_pow2;
  const int groups = 32 / pairs_pow2;
  const int cols = a.width - w0 < kOutW ? static_cast<int>(a.width - w0) : kOutW;
  const int run = (cols + groups - 1) / groups;
  const int first = group * run;                    // this group's output columns:
  const int last = first + run < cols ? first + run : cols;  // first .. last - 1
  if (row >= kOutH || c >= cn || h >= a.height || first >= last) return;  // nothing follows
  const int C1 = static_cast<int>(a.primary_channels), C2 = static_cast<int>(a.out_channels) - C1;
  const bool cheap = c0 + c < C2;  // this pair has a depthwise half
  auto pair = [&](const float* base, int i) { return *reinterpret_cast<const float2*>(base + i); };
  float2 taps[9];
#pragma unroll
  for (int t = 0; t < 9; ++t) taps[t] = pair(wd, t * kN + c);
  // Output column j reads halo columns j .. j + 2. When halo column k is read: the sums of
  // outputs k - 1 and k - 2 so far, and the x1 of halo column k - 1 (the centre of output k - 2).
  float2 sum1 = {0.f, 0.f}, sum2 = {0.f, 0.f}, centre = {0.f, 0.f};
  const float* column = x1s + (row * kHaloW + first) * kX1RowCL + c;  // halo column k = first
  const int steps = last - first + 2;
  for (int i = 0; i < steps; ++i, column += kX1RowCL) {  // halo column k = first + i
    float2 sum0 = pair(b2s, c);
    float2 v[3];
#pragma unroll
    for (int dy = 0; dy < 3; ++dy) {
      v[dy] = pair(column, dy * kHaloW * kX1RowCL);
      sum0.x += taps[dy * 3].x * v[dy].x;
      sum0.y += taps[dy * 3].y * v[dy].y;
      sum1.x += taps[dy * 3 + 1].x * v[dy].x;
      sum1.y += taps[dy * 3 + 1].y * v[dy].y;
      sum2.x += taps[dy * 3 + 2].x * v[dy].x;
      sum2.y += taps[dy * 3 + 2].y * v[dy].y;
    }
    if (i >= 2) {  // output column k - 2 is complete
      const int w = w0 + first + i - 2;
      const float x1[2] = {centre.x, centre.y};
      const float x2[2] = {activate(sum2.x, a.relu_cheap), activate(sum2.y, a.relu_cheap)};
      store_output<T, true, 2>(a, x1, b, c0 + c, h, w);
      if (cheap) store_output<T, true, 2>(a, x2, b, C1 + c0 + c, h, w);
    }
    sum2 = sum1;
    sum1 = sum0;
    centre = v[1];
  }
}

template <typename T, bool kCL>
__global__ void __launch_bounds__(kThreads, 3)
    ghost_conv_mma_kernel(GhostConvArgs a, int tiles_w, bool x_async, bool y_vec2) {
  __shared__ SharedBlock smem[kUnionBytes / 32];
  __shared__ float wd[9 * kN];  // depthwise taps [tap][channel]
  __shared__ float b2s[kN];
  unsigned char* raw = reinterpret_cast<unsigned char*>(smem);
  T* xs = reinterpret_cast<T*>(raw);
  T* ws = reinterpret_cast<T*>(raw + kXBytes);
  float* bias_tile = reinterpret_cast<float*>(raw + kBiasOffset);
  float* x1s = reinterpret_cast<float*>(raw);

  const T* w1 = static_cast<const T*>(a.w_primary);
  const T* b1 = static_cast<const T*>(a.b_primary);
  const T* wc = static_cast<const T*>(a.w_cheap);
  const T* b2 = static_cast<const T*>(a.b_cheap);
  const T* scale = static_cast<const T*>(a.input_scale);  // nullptr: no input scale
  const int Cin = static_cast<int>(a.in_channels), H = static_cast<int>(a.height);
  const int W = static_cast<int>(a.width), C1 = static_cast<int>(a.primary_channels);
  const int b = blockIdx.z, c0 = blockIdx.y * kN;
  const int h0 = (blockIdx.x / tiles_w) * kOutH, w0 = (blockIdx.x % tiles_w) * kOutW;
  const int cn = C1 - c0 < kN ? C1 - c0 : kN;  // channels of this block
  const int nfrags = (cn + 15) / 16;
  const int tid = threadIdx.x, warp = tid / 32;

  // Per-block constants: the bias tile, the depthwise taps and biases (zero past C1).
  for (int i = tid; i < 16 * kN; i += kThreads) {
    const int n = i % kN;
    bias_tile[(i / kN) * kBiasRow + n] = n < cn ? to_float(b1[c0 + n]) : 0.f;
  }
  for (int i = tid; i < 9 * kN; i += kThreads) {
    const int n = i % kN, t = i / kN;
    wd[i] = n < cn ? to_float(wc[int64_t(c0 + n) * 9 + t]) : 0.f;
  }
  for (int n = tid; n < kN; n += kThreads) b2s[n] = n < cn ? to_float(b2[c0 + n]) : 0.f;

  // 1. 1x1 conv: warp `warp` computes GEMM rows 16*warp .. +15 (its halo row) x all columns.
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kNFrags];
  using ALayout = typename std::conditional<kCL, wmma::row_major, wmma::col_major>::type;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
  __syncthreads();  // the bias tile is complete
#pragma unroll
  for (int j = 0; j < kNFrags; ++j)
    if (j < nfrags)
      wmma::load_matrix_sync(acc[j], bias_tile + j * 16, kBiasRow, wmma::mem_row_major);
  for (int k0 = 0; k0 < Cin; k0 += kKC) {
    const int kn = Cin - k0 < kKC ? Cin - k0 : kKC;
    const int kpad = (kn + 15) / 16 * 16;
    if constexpr (kCL) {
      if (x_async)
        load_x_chunk<T, true, true>(a, xs, b, h0, w0, k0, kn, kpad);
      else
        load_x_chunk<T, true, false>(a, xs, b, h0, w0, k0, kn, kpad);
    } else {
      load_x_chunk<T, false, false>(a, xs, b, h0, w0, k0, kn, kpad);
    }
    for (int i = tid; i < kN * kpad; i += kThreads) {  // ws[n][k] = W1[c0 + n, k0 + k] s[b, k]
      const int n = i / kpad, k = i % kpad;
      T v = from_float<T>(0.f);
      if (n < cn && k < kn) {
        v = w1[int64_t(c0 + n) * Cin + k0 + k];
        if (scale) v = from_float<T>(to_float(v) * to_float(scale[int64_t(b) * Cin + k0 + k]));
      }
      ws[n * kWRow + k] = v;
    }
    __syncthreads();
    for (int s = 0; s < kpad / 16; ++s) {
      const T* pa = kCL ? xs + warp * 16 * kXRowCL + s * 16 : xs + s * 16 * kXRowNCHW + warp * 16;
      wmma::load_matrix_sync(fa, pa, kCL ? kXRowCL : kXRowNCHW);
#pragma unroll
      for (int j = 0; j < kNFrags; ++j) {
        if (j < nfrags) {
          wmma::load_matrix_sync(fb, ws + j * 16 * kWRow + s * 16,
                                 kWRow);
          wmma::mma_sync(acc[j], fa, fb, acc[j]);
        }
      }
    }
    __syncthreads();  // the chunk buffers are overwritten next (next chunk, or x1)
  }

  // 2. act, x1 of the halo tile to shared memory; zero outside the image (depthwise padding).
#pragma unroll
  for (int j = 0; j < kNFrags; ++j) {
    if (j < nfrags) {
      if (a.relu_primary) {
        for (int e = 0; e < acc[j].num_elements; ++e) acc[j].x[e] = activate(acc[j].x[e], true);
      }
      if (kCL)
        wmma::store_matrix_sync(x1s + warp * 16 * kX1RowCL + j * 16, acc[j], kX1RowCL,
                                wmma::mem_row_major);
      else
        wmma::store_matrix_sync(x1s + j * 16 * kX1RowNCHW + warp * 16, acc[j], kX1RowNCHW,
                                wmma::mem_col_major);
    }
  }
  __syncthreads();
  if (h0 == 0 || w0 == 0 || h0 + kOutH >= H || w0 + kOutW >= W) {  // the halo leaves the image
    for (int i = tid; i < kPix * cn; i += kThreads) {
      const int p = kCL ? i / cn : i % kPix, c = kCL ? i % cn : i / kPix;
      const int64_t h = h0 - 1 + p / kHaloW, w = w0 - 1 + p % kHaloW;
      if (h < 0 || h >= H || w < 0 || w >= W)
        x1s[kCL ? p * kX1RowCL + c : c * kX1RowNCHW + p] = 0.f;
    }
    __syncthreads();
  }

  // 3. x1 and the depthwise half to y.
  if (kCL && y_vec2)
    write_outputs_by_rows<T>(a, x1s, wd, b2s, b, c0, h0, w0, cn);
  else
    write_outputs<T, kCL>(a, x1s, wd, b2s, b, c0, h0, w0, cn);
}

template <typename T>
cudaError_t launch_typed(const GhostConvArgs& a, cudaStream_t stream) {
  const GhostConvGrid g = ghost_conv_grid(a, DType::kFloat16);
  const int tiles_w = static_cast<int>(g.tiles_w);
  // 16-byte cp.async of x: whole 8-channel groups at 16-byte aligned addresses.
  const bool x_async = a.channels_last && a.in_channels % 8 == 0 && aligned_to(a.x, 16);
  // Channel pairs: every channel offset even, every pointer 4-byte aligned.
  const bool y_vec2 = a.out_channels % 2 == 0 && a.primary_channels % 2 == 0 &&
                      aligned_to(a.y, 4) && aligned_to(a.gate, 4) && aligned_to(a.residual, 4);
  const dim3 grid(static_cast<unsigned>(g.tiles), static_cast<unsigned>(g.channel_blocks),
                  static_cast<unsigned>(g.batch));
  if (a.channels_last)
    ghost_conv_mma_kernel<T, true><<<grid, kThreads, 0, stream>>>(a, tiles_w, x_async, y_vec2);
  else
    ghost_conv_mma_kernel<T, false><<<grid, kThreads, 0, stream>>>(a, tiles_w, x_async, y_vec2);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_ghost_conv_mma(const GhostConvArgs& args, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16: return launch_typed<__half>(args, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(args, stream);
    case DType::kFloat32: break;  // tensor cores would round the inputs to tf32
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace ghostkernels
