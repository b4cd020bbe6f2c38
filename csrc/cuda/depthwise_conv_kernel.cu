// CUDA kernel of the folded depthwise conv (torch-free; launched from ghost_ops.cpp).
//
//   y[b,c,oh,ow] = act(bias[c] + sum_{i<kh, j<kw} w[c, i*kw+j] * x[b, c, oh*s-kh/2+i, ow*s-kw/2+j])
//
// The op is bandwidth-bound (9 FMAs per 4 bytes moved for fp16 3x3 stride 1), so the kernels
// aim at few, wide, coalesced loads per output, input values reused from registers, weights held
// in fp32 registers (never re-read or re-converted per output), and many loads in flight per
// thread. Three kernels:
//
// * channels_last, tap shapes known at compile time (3x3 and 5x5 with stride 1 or 2, 1x5 and 5x1
//   with stride 1): a thread owns V consecutive channels (one vector access of V elements) x a
//   run of RW consecutive output pixels of a row x a strip of `rows` output rows it walks down.
//   Its V*kh*kw weights and V biases are loaded once into fp32 registers. For each output row
//   it loads the (RW-1)*s+kw input pixels of each tap row once and feeds them to all RW outputs
//   (3x3 stride 1, RW = 4: 18 vector loads for 4 outputs instead of 36); the loads are
//   branch-free (columns and rows outside the image are clamped into it, their values replaced
//   by 0), so ptxas issues a row step's loads back to back. The previous row's overlapping tap
//   rows are L1 hits for the same thread. Threads are ordered channel group fastest, then run,
//   strip, batch, so a warp's accesses cover pixels' contiguous channel vectors.
//   V is the widest of 16 bytes / 8 / 4 / 2 / 1 that divides C and the alignment of x and y,
//   capped so that the weights fit 50 registers: fp16/bf16 3x3 -> 4 channels (8-byte accesses;
//   8 channels would need 72 weight registers and ~140 in all), 1x5/5x1 -> 8 (16 bytes), 5x5 -> 2;
//   fp32 3x3 and 1x5 -> 4 (16 bytes), 5x5 -> 2. RW (4, 2 or 1) is the widest whose register
//   estimate (run_width) keeps the kernel under 128 registers: 2 blocks of 256 per SM.
// * NCHW, the same tap shapes: a thread owns one output column of one (b, c) plane x a strip of
//   `rows` output rows and slides a window of fp32 input values down the strip in registers.
//   A step computes R (4 for 3x3) output rows from a (kh + (R-1)*s) x kw window, of which only
//   R*s rows are new: 12 predicated scalar loads in flight per thread, 3 loads per output for
//   3x3 stride 1. Threads are ordered output column fastest (coalesced loads and stores), then
//   strip, plane, so small planes (Wo < 32) still fill warps.
// * every other case (1x1, 1x3, 3x5, ..., stride 2 for 1xN/Nx1, a vector width below half the
//   tiled kernel's cap, or tensors whose indices need 64 bits): a generic grid-stride kernel with
//   runtime taps and 64-bit indices, one output pixel x V channels (channels_last, vector
//   accesses up to 16 bytes) or one output element (NCHW) per thread.
//
// `rows` (the strip height, 1..16) is chosen at launch: the largest that still leaves at least
// half of the device's thread slots busy, so batch 1 (latency-bound) gets one row per thread and
// many threads, large batches long strips (weights loaded once per strip, rows reused); blocks
// shrink to 128 or 64 threads while the grid would not give every SM two blocks. Vector widths
// are chosen at run time from C and the alignment of x and y (the weights and the bias are read
// as scalars), so element-aligned tensor views fall back to narrower accesses. The tiled kernels
// use 32-bit index arithmetic (the launcher checks that every index fits).
#include "ghost_ops_kernel.h"

namespace ghostkernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;     // largest block; small launches use 128 or 64
constexpr int kMaxTaps = 5;       // kh, kw <= 5
constexpr int kMaxRows = 16;      // longest strip of output rows per thread
constexpr int kWeightRegs = 50;   // fp32 weight registers per thread (channels_last tiled)
constexpr int kAccRegs = 16;      // fp32 accumulators per thread (channels_last tiled)
constexpr int kRunRegs = 100;     // register estimate bound of run_width

template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* src, float (&dst)[V]) {
  const Vec<T, V> p = *reinterpret_cast<const Vec<T, V>*>(src);
#pragma unroll
  for (int i = 0; i < V; ++i) dst[i] = to_float(p.v[i]);
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* dst, const float (&src)[V], bool relu) {
  Vec<T, V> p;
#pragma unroll
  for (int i = 0; i < V; ++i) p.v[i] = from_float<T>(activate(src[i], relu));
  *reinterpret_cast<Vec<T, V>*>(dst) = p;
}

// Channels per thread of the channels_last tiled kernel: at most 16 bytes, and at most
// kWeightRegs fp32 weights per thread.
template <typename T>
constexpr int max_vec(int taps) {
  int v = 16 / static_cast<int>(sizeof(T));
  while (v > 1 && v * taps > kWeightRegs) v /= 2;
  return v;
}

// Output pixels per thread-run of the channels_last tiled kernel: the widest of 4, 2, 1 whose
// estimated registers (fp32 weights and accumulators, the raw input vectors of one row step,
// which ptxas issues back to back, and the column offsets) stay within kRunRegs, so that two
// blocks of 256 threads fit an SM without spills.
template <typename T>
constexpr int run_width(int vec, int kh, int kw, int s) {
  const int vec_regs = (vec * static_cast<int>(sizeof(T)) + 3) / 4;
  for (int rw = 4; rw > 1; rw /= 2) {
    const int seg = (rw - 1) * s + kw;
    const int regs = kh * kw * vec + vec * rw + kh * seg * vec_regs + 2 * seg;
    if (vec * rw <= kAccRegs && regs <= kRunRegs) return rw;
  }
  return 1;
}

// Work split of the tiled kernels (all < 2^31: the launcher checks).
struct Tiling {
  int items;   // threads with work
  int groups;  // channels_last: C / V channel groups; NCHW: C (planes per image)
  int runs;    // channels_last: runs of RW output pixels per row; NCHW: Wo (one column each)
  int strips;  // strips of `rows` output rows per image
  int rows;
};

// The kernels' view of the arguments: typed pointers and sizes as I (int for the tiled kernels,
// whose launcher checks that every offset fits; int64_t for the generic ones).
template <typename T, typename I>
struct View {
  const T* x;
  const T* weight;
  const T* bias;
  T* y;
  I C, H, W, Ho, Wo;
};

template <typename T, typename I>
__device__ __forceinline__ View<T, I> view(const DepthwiseConvArgs& a) {
  return {static_cast<const T*>(a.x), static_cast<const T*>(a.weight),
          static_cast<const T*>(a.bias), static_cast<T*>(a.y), static_cast<I>(a.channels),
          static_cast<I>(a.height), static_cast<I>(a.width), static_cast<I>(a.out_height),
          static_cast<I>(a.out_width)};
}

// ------------------------------------------------------------------------------------------------
// channels_last, compile-time taps

template <typename T, int V, int KH, int KW, int S>
__global__ void __launch_bounds__(kThreads)
    depthwise_nhwc_tiled(DepthwiseConvArgs a, Tiling t) {
  constexpr int RW = run_width<T>(V, KH, KW, S);
  constexpr int SEG = (RW - 1) * S + KW;  // input pixels of one tap row of a run
  const int item = static_cast<int>(blockIdx.x) * static_cast<int>(blockDim.x) +
                   static_cast<int>(threadIdx.x);
  if (item >= t.items) return;
  const int cg = item % t.groups;
  int rest = item / t.groups;
  const int run = rest % t.runs;
  rest /= t.runs;
  const int strip = rest % t.strips;
  const int b = rest / t.strips;

  const auto [x, weight, bias, y, C, H, W, Ho, Wo] = view<T, int>(a);
  const int c0 = cg * V;

  float w[KH][KW][V];
  float b0[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    b0[v] = to_float(bias[c0 + v]);
#pragma unroll
    for (int i = 0; i < KH; ++i)
#pragma unroll
      for (int j = 0; j < KW; ++j) w[i][j][v] = to_float(weight[(c0 + v) * (KH * KW) + i * KW + j]);
  }

  // Input columns of the run: clamped into the image (so every load is in bounds and the loads
  // need no branches: all of a row step's loads are issued back to back) and zeroed by `col_ok`.
  const int ow0 = run * RW;
  const int iw0 = ow0 * S - KW / 2;
  int col[SEG];
  bool col_ok[SEG];
#pragma unroll
  for (int k = 0; k < SEG; ++k) {
    col_ok[k] = static_cast<unsigned>(iw0 + k) < static_cast<unsigned>(W);
    col[k] = min(max(iw0 + k, 0), W - 1) * C;
  }
  const T* xb = x + b * (H * W * C) + c0;
  T* yb = y + b * (Ho * Wo * C) + c0;
  const int oh_end = min(strip * t.rows + t.rows, Ho);
  for (int oh = strip * t.rows; oh < oh_end; ++oh) {
    float acc[RW][V];
#pragma unroll
    for (int u = 0; u < RW; ++u)
#pragma unroll
      for (int v = 0; v < V; ++v) acc[u][v] = b0[v];
#pragma unroll
    for (int i = 0; i < KH; ++i) {
      const int ih = oh * S - KH / 2 + i;
      const bool row_ok = static_cast<unsigned>(ih) < static_cast<unsigned>(H);
      const T* xr = xb + min(max(ih, 0), H - 1) * (W * C);
#pragma unroll
      for (int k = 0; k < SEG; ++k) {
        float xv[V];
        load_vec<T, V>(xr + col[k], xv);
        const bool ok = row_ok && col_ok[k];
#pragma unroll
        for (int v = 0; v < V; ++v) xv[v] = ok ? xv[v] : 0.f;  // a select, not 0 * x (NaN)
#pragma unroll
        for (int u = 0; u < RW; ++u) {
          const int j = k - u * S;  // compile-time after unrolling
          if (j < 0 || j >= KW) continue;
#pragma unroll
          for (int v = 0; v < V; ++v) acc[u][v] += w[i][j][v] * xv[v];
        }
      }
    }
    T* yr = yb + oh * (Wo * C);
#pragma unroll
    for (int u = 0; u < RW; ++u)
      if (ow0 + u < Wo) store_vec<T, V>(yr + (ow0 + u) * C, acc[u], a.relu);
  }
}

// ------------------------------------------------------------------------------------------------
// NCHW, compile-time taps

// Output rows per step of the NCHW tiled kernel: the most of 4, 2, 1 whose input window
// (KH + (R-1)*S rows x KW columns of fp32) stays within 36 registers.
constexpr int nchw_step_rows(int kh, int kw, int s) {
  for (int r = 4; r > 1; r /= 2)
    if ((kh + (r - 1) * s) * kw <= 36) return r;
  return 1;
}

// dst[j] = x[plane, ih, iw0 + j], 0 outside rows [0, ih_last] (the image rows the strip needs) or
// outside the image's columns.
template <typename T, int KW>
__device__ __forceinline__ void load_row(const T* xp, int ih, int ih_last, int W, int iw0,
                                         const bool (&col_ok)[KW], float (&dst)[KW]) {
  const bool row_ok = static_cast<unsigned>(ih) <= static_cast<unsigned>(ih_last);
  const int base = row_ok ? ih * W + iw0 : 0;
#pragma unroll
  for (int j = 0; j < KW; ++j) dst[j] = (row_ok && col_ok[j]) ? to_float(xp[base + j]) : 0.f;
}

template <typename T, int KH, int KW, int S>
__global__ void __launch_bounds__(kThreads)
    depthwise_nchw_tiled(DepthwiseConvArgs a, Tiling t) {
  constexpr int R = nchw_step_rows(KH, KW, S);  // output rows per step
  constexpr int WR = KH + (R - 1) * S;          // input rows of a step's window
  constexpr int KEEP = KH > S ? KH - S : 0;     // window rows the next step still needs
  const int item = static_cast<int>(blockIdx.x) * static_cast<int>(blockDim.x) +
                   static_cast<int>(threadIdx.x);
  if (item >= t.items) return;
  const int ow = item % t.runs;  // runs == Wo
  int rest = item / t.runs;
  const int strip = rest % t.strips;
  const int plane = rest / t.strips;  // b * C + c

  const auto [x, weight, bias, y, C, H, W, Ho, Wo] = view<T, int>(a);
  const int c = plane % C;

  float w[KH][KW];
#pragma unroll
  for (int i = 0; i < KH; ++i)
#pragma unroll
    for (int j = 0; j < KW; ++j) w[i][j] = to_float(weight[c * (KH * KW) + i * KW + j]);
  const float b0 = to_float(bias[c]);

  const T* xp = x + plane * (H * W);
  T* yp = y + plane * (Ho * Wo) + ow;
  const int iw0 = ow * S - KW / 2;
  bool col_ok[KW];
#pragma unroll
  for (int j = 0; j < KW; ++j)
    col_ok[j] = static_cast<unsigned>(iw0 + j) < static_cast<unsigned>(W);

  // A step computes output rows oh..oh+R-1 from the window win[i][j] = x[plane, base + i,
  // iw0 + j], base = oh * S - KH / 2; rows past the strip's last needed one load nothing, so a
  // strip shorter than R (batch 1) costs no extra memory traffic.
  const int oh_begin = strip * t.rows;
  const int oh_end = min(oh_begin + t.rows, Ho);
  const int ih_last = min(H - 1, (oh_end - 1) * S - KH / 2 + KH - 1);
  int base = oh_begin * S - KH / 2;
  float win[WR][KW];
#pragma unroll
  for (int i = 0; i < WR; ++i) load_row<T, KW>(xp, base + i, ih_last, W, iw0, col_ok, win[i]);
  for (int oh = oh_begin;;) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float acc = b0;
#pragma unroll
      for (int i = 0; i < KH; ++i)
#pragma unroll
        for (int j = 0; j < KW; ++j) acc += w[i][j] * win[r * S + i][j];
      if (r == 0 || oh + r < oh_end) yp[(oh + r) * Wo] = from_float<T>(activate(acc, a.relu));
    }
    oh += R;
    if (oh >= oh_end) break;
    base += R * S;
    // Slide the window down R*S rows: keep the KEEP rows still needed, load the rest.
#pragma unroll
    for (int i = 0; i < KEEP; ++i)
#pragma unroll
      for (int j = 0; j < KW; ++j) win[i][j] = win[i + R * S][j];
#pragma unroll
    for (int i = KEEP; i < WR; ++i) load_row<T, KW>(xp, base + i, ih_last, W, iw0, col_ok, win[i]);
  }
}

// ------------------------------------------------------------------------------------------------
// Generic: runtime taps, 64-bit indices, grid-stride

// tap(i, j, ih, iw) for every tap (i, j) of a kh x kw window whose top-left input pixel is
// (ih0, iw0) and that lies inside the H x W image (the zero padding skips the others).
template <typename F>
__device__ __forceinline__ void for_each_tap(int kh, int kw, int64_t ih0, int64_t iw0, int64_t H,
                                             int64_t W, F&& tap) {
#pragma unroll
  for (int i = 0; i < kMaxTaps; ++i) {
    if (i >= kh) break;
    const int64_t ih = ih0 + i;
    if (ih < 0 || ih >= H) continue;
#pragma unroll
    for (int j = 0; j < kMaxTaps; ++j) {
      if (j >= kw) break;
      const int64_t iw = iw0 + j;
      if (iw < 0 || iw >= W) continue;
      tap(i, j, ih, iw);
    }
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) depthwise_nhwc_generic(DepthwiseConvArgs a) {
  const auto [x, weight, bias, y, C, H, W, Ho, Wo] = view<T, int64_t>(a);
  const int kh = a.kh, kw = a.kw, taps = kh * kw;
  const int64_t stride = a.stride;
  const int64_t groups = C / V;
  const int64_t items = a.batch * Ho * Wo * groups;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; item < items;
       item += step) {
    const int64_t c0 = (item % groups) * V;
    const int64_t pixel = item / groups;  // (b * Ho + oh) * Wo + ow
    const int64_t ow = pixel % Wo, oh = (pixel / Wo) % Ho, b = pixel / (Wo * Ho);
    const T* wc = weight + c0 * taps;
    float acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = to_float(bias[c0 + v]);
    for_each_tap(kh, kw, oh * stride - kh / 2, ow * stride - kw / 2, H, W,
                 [&](int i, int j, int64_t ih, int64_t iw) {
                   float xv[V];
                   load_vec<T, V>(x + ((b * H + ih) * W + iw) * C + c0, xv);
#pragma unroll
                   for (int v = 0; v < V; ++v)
                     acc[v] += to_float(wc[v * taps + i * kw + j]) * xv[v];
                 });
    store_vec<T, V>(y + pixel * C + c0, acc, a.relu);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) depthwise_nchw_generic(DepthwiseConvArgs a) {
  const auto [x, weight, bias, y, C, H, W, Ho, Wo] = view<T, int64_t>(a);
  const int kh = a.kh, kw = a.kw;
  const int64_t stride = a.stride;
  const int64_t total = a.batch * C * Ho * Wo;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; o < total;
       o += step) {
    const int64_t ow = o % Wo, oh = (o / Wo) % Ho, plane = o / (Wo * Ho);
    const int64_t c = plane % C;
    const T* wk = weight + c * (kh * kw);
    const T* xp = x + plane * H * W;
    float s = to_float(bias[c]);
    for_each_tap(kh, kw, oh * stride - kh / 2, ow * stride - kw / 2, H, W,
                 [&](int i, int j, int64_t ih, int64_t iw) {
                   s += to_float(wk[i * kw + j]) * to_float(xp[ih * W + iw]);
                 });
    y[o] = from_float<T>(activate(s, a.relu));
  }
}

// ------------------------------------------------------------------------------------------------
// Host launchers

// Widest V <= 16 bytes with C % V == 0 and x, y aligned to V elements (the vector accesses).
template <typename T>
int pick_vec(const DepthwiseConvArgs& a) {
  for (int vec = 16 / static_cast<int>(sizeof(T)); vec > 1; vec /= 2) {
    const int bytes = vec * static_cast<int>(sizeof(T));
    if (a.channels % vec == 0 && aligned_to(a.x, bytes) && aligned_to(a.y, bytes)) return vec;
  }
  return 1;
}

struct Device {
  int sms = 0;            // multiprocessors (0: unknown)
  int64_t resident = 0;   // thread slots of the whole device (0: unknown)
};

Device query_device() {
  Device d;
  int device = 0, sms = 0, per_sm = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device) !=
          cudaSuccess) {
    cudaGetLastError();  // a failed query only changes the tiling, not the result
    return d;
  }
  d.sms = sms;
  d.resident = static_cast<int64_t>(sms) * per_sm;
  return d;
}

// Strip height: the longest (<= kMaxRows, <= the image) that keeps items >= half the device's
// thread slots; `lanes` = threads per output row of one image.
Tiling make_tiling(const DepthwiseConvArgs& a, const Device& d, int64_t groups, int64_t runs) {
  const int64_t lanes = groups * runs;
  auto items = [&](int64_t rows) { return a.batch * ((a.out_height + rows - 1) / rows) * lanes; };
  int64_t rows = 1;
  while (rows < kMaxRows && rows < a.out_height && items(rows * 2) >= d.resident / 2) rows *= 2;
  Tiling t;
  t.items = static_cast<int>(items(rows));
  t.groups = static_cast<int>(groups);
  t.runs = static_cast<int>(runs);
  t.strips = static_cast<int>((a.out_height + rows - 1) / rows);
  t.rows = static_cast<int>(rows);
  return t;
}

// Threads per block: 256, halved (down to 64) while the grid would not give every SM 2 blocks.
int block_size(int64_t items, const Device& d) {
  int threads = kThreads;
  while (threads > 64 && (items + threads - 1) / threads < 2 * static_cast<int64_t>(d.sms))
    threads /= 2;
  return threads;
}

template <typename T, int V, int KH, int KW, int S>
void launch_nhwc_tiled(const DepthwiseConvArgs& a, const Device& d, cudaStream_t stream) {
  constexpr int kRun = run_width<T>(V, KH, KW, S);
  const Tiling t = make_tiling(a, d, a.channels / V, (a.out_width + kRun - 1) / kRun);
  const int threads = block_size(t.items, d);
  const unsigned blocks = static_cast<unsigned>((t.items + threads - 1) / threads);
  depthwise_nhwc_tiled<T, V, KH, KW, S><<<blocks, threads, 0, stream>>>(a, t);
}

template <typename T, int KH, int KW, int S>
void launch_nchw_tiled(const DepthwiseConvArgs& a, const Device& d, cudaStream_t stream) {
  const Tiling t = make_tiling(a, d, a.channels, a.out_width);
  const int threads = block_size(t.items, d);
  const unsigned blocks = static_cast<unsigned>((t.items + threads - 1) / threads);
  depthwise_nchw_tiled<T, KH, KW, S><<<blocks, threads, 0, stream>>>(a, t);
}

// The channels_last tiled kernel at the widest of max_vec (the weight-register cap) and `vec`
// (alignment); false when `vec` is below half the cap (the generic kernel is then as good).
template <typename T, int KH, int KW, int S>
bool launch_nhwc_tiled_vec(const DepthwiseConvArgs& a, const Device& d, int vec,
                           cudaStream_t stream) {
  constexpr int kCap = max_vec<T>(KH * KW);
  if (vec >= kCap) {
    launch_nhwc_tiled<T, kCap, KH, KW, S>(a, d, stream);
    return true;
  }
  if constexpr (kCap > 1) {
    if (vec >= kCap / 2) {
      launch_nhwc_tiled<T, kCap / 2, KH, KW, S>(a, d, stream);
      return true;
    }
  }
  return false;
}

// The tiled kernels for the tap shapes GhostNet uses; false for any other shape.
template <typename T, int KH, int KW, int S>
bool launch_tiled_shape(const DepthwiseConvArgs& a, const Device& d, int vec,
                        cudaStream_t stream) {
  if (a.kh != KH || a.kw != KW || a.stride != S) return false;
  if (!a.channels_last) {
    launch_nchw_tiled<T, KH, KW, S>(a, d, stream);
    return true;
  }
  return launch_nhwc_tiled_vec<T, KH, KW, S>(a, d, vec, stream);
}

template <typename T>
bool launch_tiled(const DepthwiseConvArgs& a, const Device& d, int vec, cudaStream_t stream) {
  return launch_tiled_shape<T, 3, 3, 1>(a, d, vec, stream) ||
         launch_tiled_shape<T, 3, 3, 2>(a, d, vec, stream) ||
         launch_tiled_shape<T, 5, 5, 1>(a, d, vec, stream) ||
         launch_tiled_shape<T, 5, 5, 2>(a, d, vec, stream) ||
         launch_tiled_shape<T, 1, 5, 1>(a, d, vec, stream) ||
         launch_tiled_shape<T, 5, 1, 1>(a, d, vec, stream);
}

template <typename T, int V>
void launch_nhwc_generic(const DepthwiseConvArgs& a, int64_t items, cudaStream_t stream) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  depthwise_nhwc_generic<T, V>
      <<<static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20)), kThreads, 0, stream>>>(a);
}

template <typename T>
void launch_generic(const DepthwiseConvArgs& a, int vec, cudaStream_t stream) {
  const int64_t pixels = a.batch * a.out_height * a.out_width;
  if (!a.channels_last) {
    const int64_t blocks = (pixels * a.channels + kThreads - 1) / kThreads;
    depthwise_nchw_generic<T>
        <<<static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20)), kThreads, 0, stream>>>(
            a);
    return;
  }
  const int64_t items = pixels * (a.channels / vec);
  switch (vec) {
    case 8: if constexpr (sizeof(T) <= 2) launch_nhwc_generic<T, 8>(a, items, stream); break;
    case 4: launch_nhwc_generic<T, 4>(a, items, stream); break;
    case 2: launch_nhwc_generic<T, 2>(a, items, stream); break;
    default: launch_nhwc_generic<T, 1>(a, items, stream); break;
  }
}

template <typename T>
cudaError_t launch_typed(const DepthwiseConvArgs& a, cudaStream_t stream) {
  const int64_t x_numel = a.batch * a.channels * a.height * a.width;
  const int64_t y_numel = a.batch * a.channels * a.out_height * a.out_width;
  if (y_numel == 0) return cudaSuccess;
  const int vec = a.channels_last ? pick_vec<T>(a) : 1;
  // 32-bit index arithmetic of the tiled kernels: every element offset, weight offset and the
  // item count (<= y_numel) must fit, with room for the halo offsets and the runs' overshoot.
  constexpr int64_t kLimit = (int64_t(1) << 31) - 4096;
  const bool small = x_numel < kLimit && y_numel < kLimit &&
                     a.channels * kMaxTaps * kMaxTaps < kLimit;
  if (!small || !launch_tiled<T>(a, query_device(), vec, stream)) launch_generic<T>(a, vec, stream);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_depthwise_conv(const DepthwiseConvArgs& args, DType dtype,
                                  cudaStream_t stream) {
  return dispatch_dtype(dtype, [&]<typename T>() { return launch_typed<T>(args, stream); });
}

}  // namespace cuda
}  // namespace ghostkernels
