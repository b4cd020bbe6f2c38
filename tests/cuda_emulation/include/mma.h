// Shadows the CUDA toolkit's <mma.h> for the CPU emulation (tests/cuda_emulation): the warp matrix
// functions of nvcuda::wmma that the kernels use, for the 16x16x16 shape with __half or
// __nv_bfloat16 multiplicands and float accumulators.
//
// The element-to-lane mapping of a real fragment is unspecified, so kernels may only (a) load,
// store, fill and multiply whole fragments and (b) apply the same element-wise operation to every
// x[i], i < num_elements. Here every lane holds the whole matrix (num_elements = rows x cols),
// which satisfies both. What a GPU requires and this header checks, failing the launch with the source
// line: the pointer of a load or store is 256-bit (32-byte) aligned; ldm is a multiple of 16 bytes
// (8 halves, 4 floats); every lane of the warp calls the same function at the same source line
// with the same pointer, ldm and layout (the operations are warp-collective: each carries a warp
// barrier, like the shuffles).
#pragma once

#include "cuda_emulation.h"

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {

template <typename Use, int M, int N, int K>
struct Shape;
template <int M, int N, int K>
struct Shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct Shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct Shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

inline float value(float v) { return v; }
inline float value(__half v) { return __half2float(v); }
inline float value(__nv_bfloat16 v) { return __bfloat162float(v); }

// The warp-collective part: all 32 lanes arrive with the same (pointer, ldm, layout).
inline void collective(const char* what, const void* ptr, unsigned ldm, int layout,
                       size_t element_bytes, const std::source_location& where) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0)
    ::cuda_emu::device_fault(std::string("wmma::") + what + " with a pointer not 256-bit aligned",
                             where);
  if ((ldm * element_bytes) % 16 != 0)
    ::cuda_emu::device_fault(std::string("wmma::") + what + " with ldm " + std::to_string(ldm) +
                                 " (must be a multiple of 16 bytes)",
                             where);
  const uint64_t key = reinterpret_cast<uintptr_t>(ptr) ^ (uint64_t(ldm) << 48) ^
                       (uint64_t(layout) << 62);
  const uint64_t* all = ::cuda_emu::warp_exchange(0xffffffffu, key, 32, what, where);
  for (int lane = 0; lane < 32; ++lane)
    if (all[lane] != key)
      ::cuda_emu::device_fault(std::string("wmma::") + what +
                                   ": lanes of the warp passed different pointers, ldm or layouts",
                               where);
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = detail::Shape<Use, M, N, K>::rows;
  static constexpr int cols = detail::Shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  using element_type = T;
  T x[num_elements];  // row-major, whatever the memory layout it was loaded from
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, T v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = v;
}

// Multiplicands: the layout is the fragment's (row_major: element (r, c) at ptr[r * ldm + c]).
template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* ptr, unsigned ldm,
                      const std::source_location& where = std::source_location::current()) {
  static_assert(std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>,
                "a multiplicand fragment needs row_major or col_major");
  constexpr bool row = std::is_same_v<Layout, row_major>;
  detail::collective("load_matrix_sync", ptr, ldm, row ? 0 : 1, sizeof(T), where);
  for (int r = 0; r < f.rows; ++r)
    for (int c = 0; c < f.cols; ++c)
      f.x[r * f.cols + c] = row ? ptr[r * ldm + c] : ptr[c * ldm + r];
}

// Accumulators: the memory layout is an argument.
template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* ptr, unsigned ldm,
                      layout_t layout,
                      const std::source_location& where = std::source_location::current()) {
  detail::collective("load_matrix_sync", ptr, ldm, layout, sizeof(float), where);
  for (int r = 0; r < f.rows; ++r)
    for (int c = 0; c < f.cols; ++c)
      f.x[r * f.cols + c] = layout == mem_row_major ? ptr[r * ldm + c] : ptr[c * ldm + r];
}

template <int M, int N, int K>
void store_matrix_sync(float* ptr, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                       layout_t layout,
                       const std::source_location& where = std::source_location::current()) {
  detail::collective("store_matrix_sync", ptr, ldm, layout, sizeof(float), where);
  for (int r = 0; r < f.rows; ++r)
    for (int c = 0; c < f.cols; ++c)
      (layout == mem_row_major ? ptr[r * ldm + c] : ptr[c * ldm + r]) = f.x[r * f.cols + c];
}

// d = a b + c, products exact in float, summed in float over k in order.
template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b,
              const fragment<accumulator, M, N, K, float>& c,
              const std::source_location& where = std::source_location::current()) {
  ::cuda_emu::warp_exchange(0xffffffffu, 0, 32, "mma_sync", where);
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k)
        s += detail::value(a.x[i * K + k]) * detail::value(b.x[k * N + j]);
      out[i * N + j] = s;
    }
  for (int i = 0; i < M * N; ++i) d.x[i] = out[i];
}

}  // namespace wmma
}  // namespace nvcuda
