// Multi-scale deformable attention CUDA kernels (forward and backward), torch-free.
//
// Work mapping. One "group" of `lanes` consecutive threads (a power of two <= 32, so a group never
// straddles a warp) owns one (n, q, head m). Each lane owns VEC contiguous channels ("a chunk") of
// that head and loads/stores them with one vector access (up to 16 bytes); when D has more chunks
// than the group has lanes, the group loops over chunk iterations.
//
// Per-point work is done once per group: in each round, lane j of the group loads the location and
// attention weight of point j of the round, does the bilinear set-up (pixel coordinate, floor,
// fractions, corner row, in-map mask) and the group reads it with shuffles. All loops that contain
// shuffles have trip counts that are uniform across the warp (threads without work still take part).
//
// Bilinear semantics = grid_sample(bilinear, zeros, align_corners=False): x = loc_x * W - 0.5,
// corners outside the map read as zero. Accumulation in float (double for float64 values);
// 64-bit offsets throughout. Backward: grad_loc/grad_attn are reduced over the group's lanes with
// xor-shuffles and written by the point's owner lane (no atomics); grad_value is accumulated with
// atomicAdd into a float (double) buffer, vector atomics on sm_90 -- or, in the deterministic mode,
// into an int64 fixed-point buffer with integer atomics (see FixedPointAdd).
//
// Softmax fusion (softmax = true, a template parameter of the kernels so that the plain path
// compiles as before; attention_weights holds logits). Forward and backward start each
// group with a pre-pass over its L*P logits: every lane reads a strided subset, the group reduces the
// max and then the sum of exp(logit - max) with xor-shuffles; the owner lane of a point then uses
// the weight w = exp(logit - max) * (1 / sum). The backward first accumulates g (the gradient w.r.t. w)
// into grad_attn exactly as without softmax, then, after all chunk iterations, a post-pass in which
// each owner lane re-reads its own points' g (written by the same thread, so visible), the group
// reduces dot = sum_k w_k g_k and the owner writes w * (g - dot).
#include "ms_deform_attn_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace ghostkernels {
namespace msda_cuda {
namespace {

constexpr int kThreads = 128;
constexpr unsigned kFullMask = 0xffffffffu;

// ------------------------------------------------------------------------------------------------
// Types: accumulation type, conversions and vector access

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void from_acc(float v, float& dst) { dst = v; }
__device__ __forceinline__ void from_acc(double v, double& dst) { dst = v; }
__device__ __forceinline__ void from_acc(float v, __half& dst) { dst = __float2half_rn(v); }
__device__ __forceinline__ void from_acc(float v, __nv_bfloat16& dst) { dst = __float2bfloat16_rn(v); }

// VEC contiguous elements moved as one (up to 16-byte) access; callers guarantee the alignment.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC, typename A>
__device__ __forceinline__ void load_pack(const T* src, A (&dst)[VEC]) {
  const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(src);
#pragma unroll
  for (int i = 0; i < VEC; ++i) dst[i] = to_acc(p.v[i]);
}

template <typename T, int VEC, typename A>
__device__ __forceinline__ void store_pack(T* dst, const A (&src)[VEC]) {
  Pack<T, VEC> p;
#pragma unroll
  for (int i = 0; i < VEC; ++i) from_acc(src[i], p.v[i]);
  *reinterpret_cast<Pack<T, VEC>*>(dst) = p;
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr bool kVectorAtomics = true;  // float2/float4 atomicAdd: sm_90+, global memory
#else
constexpr bool kVectorAtomics = false;
#endif

template <int VEC>
__device__ __forceinline__ void atomic_add_pack(float* dst, const float (&v)[VEC]) {
  if constexpr (kVectorAtomics && VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4)
      atomicAdd(reinterpret_cast<float4*>(dst + i), make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]));
  } else if constexpr (kVectorAtomics && VEC == 2) {
    atomicAdd(reinterpret_cast<float2*>(dst), make_float2(v[0], v[1]));
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) atomicAdd(dst + i, v[i]);
  }
}

template <int VEC>
__device__ __forceinline__ void atomic_add_pack(double* dst, const double (&v)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) atomicAdd(dst + i, v[i]);
}

// How the backward adds a contribution c to grad_value. Both policies are built inside the kernel
// from the `fixed_point_scale` pointer (ignored by FloatAdd).

// The fast path: float (double) atomics; the summation order, hence the last bits, vary per run.
template <typename A>
struct FloatAdd {
  using Slot = A;
  __device__ explicit FloatAdd(const double*) {}
  template <int VEC>
  __device__ __forceinline__ void add(Slot* dst, const A (&c)[VEC]) const {
    atomic_add_pack<VEC>(dst, c);
  }
};

// The deterministic path: q = llrint(c * scale) added to an int64 slot by an integer atomic
// (two's complement addition wraps, so the unsigned atomic is a signed add). Integer addition is
// associative: the sum, and grad_value = sum / scale computed afterwards, do not depend on the
// order of the atomics. scale is a power of two chosen by the caller so that no partial sum leaves
// int64; the product is formed in double for every value type (exact: c is a float or double and
// scale a power of two; a float product could overflow for a huge scale, i.e. tiny gradients).
template <typename A>
struct FixedPointAdd {
  using Slot = unsigned long long;
  double scale;
  __device__ explicit FixedPointAdd(const double* fixed_point_scale) : scale(*fixed_point_scale) {}
  template <int VEC>
  __device__ __forceinline__ void add(Slot* dst, const A (&c)[VEC]) const {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const long long q = llrint(static_cast<double>(c[i]) * scale);
      atomicAdd(dst + i, static_cast<unsigned long long>(q));
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Level table and sampling points

// Copies (h, w, start) of every level into shared memory; h = 0 marks a level whose metadata do not
// fit value (it is skipped, so a wrong table can never cause an out-of-bounds read).
__device__ __forceinline__ void load_levels(const int64_t* spatial_shapes,
                                            const int64_t* level_start_index, int64_t L, int64_t S,
                                            int64_t* levels) {
  for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
    const int64_t h = spatial_shapes[2 * l], w = spatial_shapes[2 * l + 1];
    const int64_t start = level_start_index[l];
    // h, w <= S keeps h * w from overflowing int64.
    const bool ok = h >= 1 && w >= 1 && h <= S && w <= S && start >= 0 && start <= S - h * w;
    levels[3 * l] = ok ? h : 0;
    levels[3 * l + 1] = w;
    levels[3 * l + 2] = start;
  }
  __syncthreads();
}

// One sampling point, set up by one lane and shared with its group.
template <typename A>
struct Sample {
  A lx, ly;         // fractions of the point inside its cell
  A a;              // attention weight
  long long row00;  // value row (position in S) of corner (y0, x0); only meaningful under `mask`
  int mask;         // bit k: corner k inside the map; k = 0 (y0,x0), 1 (y0,x1), 2 (y1,x0), 3 (y1,x1)
};

template <typename A>
__device__ __forceinline__ Sample<A> no_sample() {
  Sample<A> s;
  s.lx = A(0);
  s.ly = A(0);
  s.a = A(0);
  s.row00 = 0;
  s.mask = 0;
  return s;
}

template <typename A>
__device__ __forceinline__ Sample<A> locate(A loc_x, A loc_y, A a, int64_t h, int64_t w,
                                            int64_t start) {
  Sample<A> s = no_sample<A>();
  s.a = a;
  const A x = loc_x * static_cast<A>(w) - A(0.5);
  const A y = loc_y * static_cast<A>(h) - A(0.5);
  // x == -1 still touches column 0 (weight 0, non-zero gradient), as grid_sample does; NaN fails.
  if (!(x >= A(-1) && x < static_cast<A>(w) && y >= A(-1) && y < static_cast<A>(h))) return s;
  const A fx = floor(x), fy = floor(y);
  const int64_t x0 = static_cast<int64_t>(fx), y0 = static_cast<int64_t>(fy);
  s.lx = x - fx;
  s.ly = y - fy;
  s.row00 = start + y0 * w + x0;
  const bool x0_in = x0 >= 0, x1_in = x0 + 1 < w, y0_in = y0 >= 0, y1_in = y0 + 1 < h;
  s.mask = (y0_in && x0_in ? 1 : 0) | (y0_in && x1_in ? 2 : 0) | (y1_in && x0_in ? 4 : 0) |
           (y1_in && x1_in ? 8 : 0);
  return s;
}

template <typename A>
__device__ __forceinline__ Sample<A> broadcast(const Sample<A>& s, int src_lane, int lanes) {
  Sample<A> r;
  r.lx = __shfl_sync(kFullMask, s.lx, src_lane, lanes);
  r.ly = __shfl_sync(kFullMask, s.ly, src_lane, lanes);
  r.a = __shfl_sync(kFullMask, s.a, src_lane, lanes);
  r.row00 = __shfl_sync(kFullMask, s.row00, src_lane, lanes);
  r.mask = __shfl_sync(kFullMask, s.mask, src_lane, lanes);
  return r;
}

template <typename A>
__device__ __forceinline__ A group_sum(A v, int lanes) {
  for (int offset = lanes >> 1; offset > 0; offset >>= 1)
    v += __shfl_xor_sync(kFullMask, v, offset, lanes);
  return v;
}

template <typename A>
__device__ __forceinline__ A group_max(A v, int lanes) {
  for (int offset = lanes >> 1; offset > 0; offset >>= 1)
    v = fmax(v, __shfl_xor_sync(kFullMask, v, offset, lanes));
  return v;
}

// Softmax statistics of one group's L*P logits, the same in every lane of the group. kOn = false:
// the attention weights are used as they are (and the kernels compile as without softmax fusion).
template <typename A, bool kOn>
struct Softmax {
  A max, inv_sum;  // 1 / sum of exp(logit - max): one division per group, not per point

  // The weight of a point from its raw attention value.
  __device__ __forceinline__ A weight(A raw) const {
    if constexpr (kOn)
      return exp(raw - max) * inv_sum;
    else
      return raw;
  }
};

// The pre-pass (count >= 1): lane i reads logits i, i + lanes, ...; max first (subtracted so that
// large logits cannot overflow; every lane starts from logit 0, a broadcast read), then the sum of
// exp. fmax ignores NaN, but a NaN logit then makes the sum and
// so every weight of the group NaN, as torch.softmax does. All lanes (also those of an inactive
// group) take part in the shuffles; the loops without shuffles may have per-lane trip counts.
template <typename T, typename A, bool kOn>
__device__ __forceinline__ Softmax<A, kOn> softmax_stats(const T* logits, int64_t count,
                                                         bool active, int lane, int lanes) {
  Softmax<A, kOn> st;
  st.max = A(0);
  st.inv_sum = A(1);
  if constexpr (kOn) {
    A max = A(0);
    if (active) {
      max = to_acc(logits[0]);
      for (int64_t i = lane; i < count; i += lanes) max = fmax(max, to_acc(logits[i]));
    }
    st.max = group_max(max, lanes);
    A sum = A(0);
    if (active)
      for (int64_t i = lane; i < count; i += lanes) sum += exp(to_acc(logits[i]) - st.max);
    st.inv_sum = A(1) / group_sum(sum, lanes);
  }
  return st;
}

// acc += weight * value[corner, this lane's channels]
template <typename T, int VEC, typename A>
__device__ __forceinline__ void add_corner(A (&acc)[VEC], A weight, const T* corner) {
  A v[VEC];
  load_pack<T, VEC>(corner, v);
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] += weight * v[i];
}

// Launch layout shared by forward and backward.
struct Layout {
  int lanes;        // threads per (n, q, m) group: power of two <= 32
  int chunk_iters;  // ceil(D / VEC / lanes)
};

// ------------------------------------------------------------------------------------------------
// Kernels

template <typename T, int VEC, bool kSoftmax>
__global__ void __launch_bounds__(kThreads)
forward_kernel(const T* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
               const int64_t* __restrict__ level_start_index,
               const typename AccOf<T>::type* __restrict__ loc, const T* __restrict__ attn,
               T* __restrict__ out, Sizes sz, Layout lay) {
  using A = typename AccOf<T>::type;
  extern __shared__ int64_t levels[];
  load_levels(spatial_shapes, level_start_index, sz.L, sz.S, levels);

  const int lanes = lay.lanes;
  const int lane = threadIdx.x & (lanes - 1);
  const int groups_per_block = kThreads / lanes;
  const int64_t groups = sz.N * sz.Lq * sz.M;
  const int64_t chunks = sz.D / VEC;
  const int64_t row_stride = sz.M * sz.D;  // between consecutive value rows (positions in S)

  // The loop bound depends on the block only, so whole warps iterate together.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * groups_per_block; base < groups;
       base += static_cast<int64_t>(gridDim.x) * groups_per_block) {
    const int64_t g = base + threadIdx.x / lanes;  // (n, q, m) in loc/attn order
    const bool active = g < groups;
    const int64_t n = g / (sz.Lq * sz.M), m = g % sz.M;
    const T* value_nm = value + (n * sz.S * sz.M + m) * sz.D;
    const Softmax<A, kSoftmax> sm =
        softmax_stats<T, A, kSoftmax>(attn + g * sz.L * sz.P, sz.L * sz.P, active, lane, lanes);
    for (int k = 0; k < lay.chunk_iters; ++k) {
      const int64_t chunk = static_cast<int64_t>(k) * lanes + lane;
      const bool has_chunk = active && chunk < chunks;
      A acc[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = A(0);
      for (int64_t l = 0; l < sz.L; ++l) {
        const int64_t h = levels[3 * l], w = levels[3 * l + 1], start = levels[3 * l + 2];
        if (h == 0) continue;  // same for every thread
        for (int64_t p0 = 0; p0 < sz.P; p0 += lanes) {
          Sample<A> mine = no_sample<A>();
          const int64_t p = p0 + lane;
          if (active && p < sz.P) {
            const int64_t pt = (g * sz.L + l) * sz.P + p;
            mine = locate<A>(loc[2 * pt], loc[2 * pt + 1], sm.weight(to_acc(attn[pt])), h, w, start);
          }
          const int count = static_cast<int>(sz.P - p0 < lanes ? sz.P - p0 : lanes);
          for (int j = 0; j < count; ++j) {
            const Sample<A> s = broadcast(mine, j, lanes);
            if (!has_chunk || s.mask == 0) continue;
            const A hx = A(1) - s.lx, hy = A(1) - s.ly;
            const T* corner00 = value_nm + s.row00 * row_stride + chunk * VEC;
            const int64_t down = w * row_stride;  // from row y0 to row y1
            if (s.mask & 1) add_corner<T, VEC>(acc, s.a * hy * hx, corner00);
            if (s.mask & 2) add_corner<T, VEC>(acc, s.a * hy * s.lx, corner00 + row_stride);
            if (s.mask & 4) add_corner<T, VEC>(acc, s.a * s.ly * hx, corner00 + down);
            if (s.mask & 8) add_corner<T, VEC>(acc, s.a * s.ly * s.lx, corner00 + down + row_stride);
          }
        }
      }
      if (has_chunk) store_pack<T, VEC>(out + g * sz.D + chunk * VEC, acc);
    }
  }
}

template <typename T, int VEC, bool kSoftmax, typename Add>
__global__ void __launch_bounds__(kThreads)
backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ value,
                const int64_t* __restrict__ spatial_shapes,
                const int64_t* __restrict__ level_start_index,
                const typename AccOf<T>::type* __restrict__ loc, const T* __restrict__ attn,
                const double* __restrict__ fixed_point_scale,
                typename Add::Slot* __restrict__ grad_value,
                typename AccOf<T>::type* __restrict__ grad_loc,
                typename AccOf<T>::type* __restrict__ grad_attn, Sizes sz, Layout lay) {
  using A = typename AccOf<T>::type;
  extern __shared__ int64_t levels[];
  load_levels(spatial_shapes, level_start_index, sz.L, sz.S, levels);
  const Add add_to_grad_value(fixed_point_scale);

  const int lanes = lay.lanes;
  const int lane = threadIdx.x & (lanes - 1);
  const int groups_per_block = kThreads / lanes;
  const int64_t groups = sz.N * sz.Lq * sz.M;
  const int64_t chunks = sz.D / VEC;
  const int64_t row_stride = sz.M * sz.D;
  const int64_t points = sz.L * sz.P;  // per group

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * groups_per_block; base < groups;
       base += static_cast<int64_t>(gridDim.x) * groups_per_block) {
    const int64_t g = base + threadIdx.x / lanes;
    const bool active = g < groups;
    const int64_t n = g / (sz.Lq * sz.M), m = g % sz.M;
    const int64_t nm_offset = (n * sz.S * sz.M + m) * sz.D;  // value[n, 0, m, 0]
    const Softmax<A, kSoftmax> sm =
        softmax_stats<T, A, kSoftmax>(attn + g * points, points, active, lane, lanes);
    for (int k = 0; k < lay.chunk_iters; ++k) {
      const int64_t chunk = static_cast<int64_t>(k) * lanes + lane;
      const bool has_chunk = active && chunk < chunks;
      A go[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) go[i] = A(0);
      if (has_chunk) load_pack<T, VEC>(grad_out + g * sz.D + chunk * VEC, go);
      for (int64_t l = 0; l < sz.L; ++l) {
        const int64_t h = levels[3 * l], w = levels[3 * l + 1], start = levels[3 * l + 2];
        if (h == 0) continue;  // same for every thread
        for (int64_t p0 = 0; p0 < sz.P; p0 += lanes) {
          Sample<A> mine = no_sample<A>();
          const int64_t p = p0 + lane;
          const int64_t my_pt = (g * sz.L + l) * sz.P + p;
          if (active && p < sz.P)
            mine = locate<A>(loc[2 * my_pt], loc[2 * my_pt + 1], sm.weight(to_acc(attn[my_pt])), h,
                             w, start);
          A my_g_attn = A(0), my_g_lx = A(0), my_g_ly = A(0);
          const int count = static_cast<int>(sz.P - p0 < lanes ? sz.P - p0 : lanes);
          for (int j = 0; j < count; ++j) {
            const Sample<A> s = broadcast(mine, j, lanes);
            A g_attn = A(0), g_lx = A(0), g_ly = A(0);  // this lane's channels' share
            if (has_chunk && s.mask != 0) {
              const A hx = A(1) - s.lx, hy = A(1) - s.ly;
              const A weight[4] = {hy * hx, hy * s.lx, s.ly * hx, s.ly * s.lx};
              const long long row[4] = {s.row00, s.row00 + 1, s.row00 + w, s.row00 + w + 1};
              A v[4][VEC];
#pragma unroll
              for (int c = 0; c < 4; ++c) {
                if (s.mask & (1 << c)) {
                  load_pack<T, VEC>(value + nm_offset + row[c] * row_stride + chunk * VEC, v[c]);
                } else {
#pragma unroll
                  for (int i = 0; i < VEC; ++i) v[c][i] = A(0);
                }
              }
#pragma unroll
              for (int i = 0; i < VEC; ++i) {
                g_attn += go[i] * (weight[0] * v[0][i] + weight[1] * v[1][i] +
                                   weight[2] * v[2][i] + weight[3] * v[3][i]);
                g_lx += go[i] * (hy * (v[1][i] - v[0][i]) + s.ly * (v[3][i] - v[2][i]));
                g_ly += go[i] * (hx * (v[2][i] - v[0][i]) + s.lx * (v[3][i] - v[1][i]));
              }
#pragma unroll
              for (int c = 0; c < 4; ++c) {
                if (!(s.mask & (1 << c))) continue;
                A contribution[VEC];
#pragma unroll
                for (int i = 0; i < VEC; ++i) contribution[i] = s.a * weight[c] * go[i];
                add_to_grad_value.template add<VEC>(
                    grad_value + nm_offset + row[c] * row_stride + chunk * VEC, contribution);
              }
            }
            g_attn = group_sum(g_attn, lanes);
            g_lx = group_sum(g_lx, lanes);
            g_ly = group_sum(g_ly, lanes);
            if (lane == j) {
              my_g_attn = g_attn;
              my_g_lx = g_lx;
              my_g_ly = g_ly;
            }
          }
          // The owner lane of each point (lane p % lanes) adds its group's total (one writer per
          // element; chunk iterations of the same thread add in sequence). With softmax, grad_attn
          // holds g w.r.t. the softmaxed weight until the post-pass below.
          if (active && p < sz.P && mine.mask != 0) {
            grad_attn[my_pt] += my_g_attn;
            grad_loc[2 * my_pt] += mine.a * static_cast<A>(w) * my_g_lx;
            grad_loc[2 * my_pt + 1] += mine.a * static_cast<A>(h) * my_g_ly;
          }
        }
      }
    }
    if constexpr (kSoftmax) {
      // Softmax backward, after every chunk iteration: lane `lane` owns points p = lane, lane +
      // lanes, ... of every level (the owners above), so it re-reads only what it wrote itself.
      // Skipped levels (bad metadata) keep g = 0 but still take part in the softmax.
      A dot = A(0);
      if (active)
        for (int64_t l = 0; l < sz.L; ++l)
          for (int64_t p = lane; p < sz.P; p += lanes) {
            const int64_t pt = (g * sz.L + l) * sz.P + p;
            dot += sm.weight(to_acc(attn[pt])) * grad_attn[pt];
          }
      dot = group_sum(dot, lanes);
      if (active)
        for (int64_t l = 0; l < sz.L; ++l)
          for (int64_t p = lane; p < sz.P; p += lanes) {
            const int64_t pt = (g * sz.L + l) * sz.P + p;
            const A wt = sm.weight(to_acc(attn[pt]));
            grad_attn[pt] = wt * (grad_attn[pt] - dot);
          }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host launchers

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Widest VEC (elements per lane, at most 16 bytes) that divides D and keeps every pointer that is
// accessed VEC elements at a time aligned.
template <typename T>
int pick_vec(int64_t D, const void* a, const void* b, const void* c = nullptr) {
  for (int vec = 16 / static_cast<int>(sizeof(T)); vec > 1; vec /= 2) {
    const int bytes = vec * static_cast<int>(sizeof(T));
    if (D % vec == 0 && aligned(a, bytes) && aligned(b, bytes) && (c == nullptr || aligned(c, bytes)))
      return vec;
  }
  return 1;
}

Layout make_layout(int64_t D, int vec) {
  const int64_t chunks = D / vec;
  int lanes = 1;
  while (lanes < 32 && lanes < chunks) lanes *= 2;
  Layout lay;
  lay.lanes = lanes;
  lay.chunk_iters = static_cast<int>((chunks + lanes - 1) / lanes);
  return lay;
}

// Narrows `vec` (channels per lane) while that gives a group more lanes (at most 32) and the launch
// fills fewer than half of the device's thread slots: a small launch (batch 1: 2400 groups of 4
// lanes in fp16) is bound by latency, not bandwidth, and more lanes put more loads in flight and
// set up a group's points in fewer rounds. Large launches keep the widest vectors.
int narrow_vec_for_parallelism(const Sizes& sz, int vec) {
  int device = 0, sms = 0, threads_per_sm = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device) !=
          cudaSuccess) {
    cudaGetLastError();  // a failed query only skips the narrowing
    return vec;
  }
  const int64_t slots = static_cast<int64_t>(sms) * threads_per_sm;
  const int64_t groups = sz.N * sz.Lq * sz.M;
  while (vec > 1) {
    const Layout wide = make_layout(sz.D, vec);
    if (wide.lanes >= 32 || groups * wide.lanes * 2 >= slots) break;
    vec /= 2;
  }
  return vec;
}

// Enough blocks to cover every group once, at most a full-occupancy wave (the kernels grid-stride).
cudaError_t grid_size(const Sizes& sz, const Layout& lay, int* blocks) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t groups = sz.N * sz.Lq * sz.M;
  const int64_t groups_per_block = kThreads / lay.lanes;
  const int64_t needed = (groups + groups_per_block - 1) / groups_per_block;
  const int64_t wave = static_cast<int64_t>(sms > 0 ? sms : 1) * (2048 / kThreads);
  *blocks = static_cast<int>(needed < wave ? needed : wave);
  return cudaSuccess;
}

size_t level_table_bytes(const Sizes& sz) { return static_cast<size_t>(sz.L) * 3 * sizeof(int64_t); }

template <typename T, int VEC>
cudaError_t forward_vec(const Sizes& sz, const void* value, const int64_t* shapes,
                        const int64_t* starts, const void* loc, const void* attn, bool softmax,
                        void* out, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const Layout lay = make_layout(sz.D, VEC);
  int blocks = 0;
  cudaError_t err = grid_size(sz, lay, &blocks);
  if (err != cudaSuccess) return err;
  const size_t shared = level_table_bytes(sz);
  if (softmax)
    forward_kernel<T, VEC, true><<<blocks, kThreads, shared, stream>>>(
        static_cast<const T*>(value), shapes, starts, static_cast<const A*>(loc),
        static_cast<const T*>(attn), static_cast<T*>(out), sz, lay);
  else
    forward_kernel<T, VEC, false><<<blocks, kThreads, shared, stream>>>(
        static_cast<const T*>(value), shapes, starts, static_cast<const A*>(loc),
        static_cast<const T*>(attn), static_cast<T*>(out), sz, lay);
  return cudaGetLastError();
}

// Everything the backward launchers pass through unchanged.
struct BackwardArgs {
  const void *grad_out, *value;
  const int64_t *shapes, *starts;
  const void *loc, *attn;
  bool softmax;
  const double* fixed_point_scale;  // nullptr: float atomics
  void *grad_value, *grad_loc, *grad_attn;
  cudaStream_t stream;
};

template <typename T, int VEC, bool kSoftmax, typename Add>
cudaError_t backward_vec(const Sizes& sz, const BackwardArgs& b) {
  using A = typename AccOf<T>::type;
  const Layout lay = make_layout(sz.D, VEC);
  int blocks = 0;
  cudaError_t err = grid_size(sz, lay, &blocks);
  if (err != cudaSuccess) return err;
  backward_kernel<T, VEC, kSoftmax, Add><<<blocks, kThreads, level_table_bytes(sz), b.stream>>>(
      static_cast<const T*>(b.grad_out), static_cast<const T*>(b.value), b.shapes, b.starts,
      static_cast<const A*>(b.loc), static_cast<const T*>(b.attn), b.fixed_point_scale,
      static_cast<typename Add::Slot*>(b.grad_value), static_cast<A*>(b.grad_loc),
      static_cast<A*>(b.grad_attn), sz, lay);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t backward_vec(const Sizes& sz, const BackwardArgs& b) {
  using A = typename AccOf<T>::type;
  // Four variants: the softmax pre/post-passes and the fixed-point adds are compiled in only
  // where they are used, so the plain path keeps its registers.
  if (b.fixed_point_scale != nullptr)
    return b.softmax ? backward_vec<T, VEC, true, FixedPointAdd<A>>(sz, b)
                     : backward_vec<T, VEC, false, FixedPointAdd<A>>(sz, b);
  return b.softmax ? backward_vec<T, VEC, true, FloatAdd<A>>(sz, b)
                   : backward_vec<T, VEC, false, FloatAdd<A>>(sz, b);
}

template <typename T>
cudaError_t forward_typed(const Sizes& sz, const void* value, const int64_t* shapes,
                          const int64_t* starts, const void* loc, const void* attn, bool softmax,
                          void* out, cudaStream_t stream) {
  constexpr int kMaxVec = 16 / static_cast<int>(sizeof(T));
  const int vec = narrow_vec_for_parallelism(sz, pick_vec<T>(sz.D, value, out));
#define GK_FORWARD(V) forward_vec<T, V>(sz, value, shapes, starts, loc, attn, softmax, out, stream)
  if constexpr (kMaxVec >= 8)
    if (vec == 8) return GK_FORWARD(8);
  if constexpr (kMaxVec >= 4)
    if (vec == 4) return GK_FORWARD(4);
  if (vec == 2) return GK_FORWARD(2);
  return GK_FORWARD(1);
#undef GK_FORWARD
}

template <typename T>
cudaError_t backward_typed(const Sizes& sz, const BackwardArgs& b) {
  constexpr int kMaxVec = 16 / static_cast<int>(sizeof(T));
  int vec = pick_vec<T>(sz.D, b.value, b.grad_out);
  // A float grad_value needs VEC * sizeof(A) alignment for the vector atomics; the fixed-point
  // slots (int64) are added one at a time.
  if (b.fixed_point_scale == nullptr)
    while (vec > 1 &&
           !aligned(b.grad_value, vec * static_cast<int>(sizeof(typename AccOf<T>::type))))
      vec /= 2;
  vec = narrow_vec_for_parallelism(sz, vec);
  if constexpr (kMaxVec >= 8)
    if (vec == 8) return backward_vec<T, 8>(sz, b);
  if constexpr (kMaxVec >= 4)
    if (vec == 4) return backward_vec<T, 4>(sz, b);
  if (vec == 2) return backward_vec<T, 2>(sz, b);
  return backward_vec<T, 1>(sz, b);
}

bool nothing_to_do(const Sizes& sz) {
  return sz.N <= 0 || sz.Lq <= 0 || sz.M <= 0 || sz.D <= 0 || sz.L <= 0 || sz.P <= 0;
}

}  // namespace

cudaError_t forward(ValueType type, const Sizes& sz, const void* value,
                    const int64_t* spatial_shapes, const int64_t* level_start_index,
                    const void* loc, const void* attn, bool softmax, void* out,
                    cudaStream_t stream) {
  if (nothing_to_do(sz)) return cudaSuccess;
#define GK_FORWARD(T) \
  forward_typed<T>(sz, value, spatial_shapes, level_start_index, loc, attn, softmax, out, stream)
  switch (type) {
    case ValueType::kFloat64: return GK_FORWARD(double);
    case ValueType::kFloat32: return GK_FORWARD(float);
    case ValueType::kFloat16: return GK_FORWARD(__half);
    case ValueType::kBFloat16: return GK_FORWARD(__nv_bfloat16);
  }
#undef GK_FORWARD
  return cudaErrorInvalidValue;
}

cudaError_t backward(ValueType type, const Sizes& sz, const void* grad_out, const void* value,
                     const int64_t* spatial_shapes, const int64_t* level_start_index,
                     const void* loc, const void* attn, bool softmax,
                     const double* fixed_point_scale, void* grad_value, void* grad_loc,
                     void* grad_attn, cudaStream_t stream) {
  if (nothing_to_do(sz)) return cudaSuccess;
  const BackwardArgs b{grad_out, value, spatial_shapes, level_start_index, loc, attn, softmax,
                       fixed_point_scale, grad_value, grad_loc, grad_attn, stream};
  switch (type) {
    case ValueType::kFloat64: return backward_typed<double>(sz, b);
    case ValueType::kFloat32: return backward_typed<float>(sz, b);
    case ValueType::kFloat16: return backward_typed<__half>(sz, b);
    case ValueType::kBFloat16: return backward_typed<__nv_bfloat16>(sz, b);
  }
  return cudaErrorInvalidValue;
}

}  // namespace msda_cuda
}  // namespace ghostkernels
