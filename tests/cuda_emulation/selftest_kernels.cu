// Small kernels that check the emulator itself: the semantics it gives to shuffles and shared
// memory, and that it reports the bugs it claims to catch (tests/test_cuda_emulated.py).
// Compiled like csrc/cuda/*.cu (rewrite.py + cuda_emulation.h); each `case` is one launch.
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

namespace {

constexpr unsigned kFull = 0xffffffffu;

// out[t] = sum of `in` over t's segment of `width` lanes (xor butterfly), then a shuffle of lane
// `src` of the segment, then shfl_down / shfl_up by `delta`: out has 4 values per thread.
__global__ void shuffles(const float* in, float* out, int width, int src, int delta) {
  const int t = threadIdx.x;
  float v = in[t];
  for (int offset = width / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFull, v, offset, width);
  out[4 * t] = v;
  out[4 * t + 1] = __shfl_sync(kFull, in[t], src, width);
  out[4 * t + 2] = __shfl_down_sync(kFull, in[t], delta, width);
  out[4 * t + 3] = __shfl_up_sync(kFull, in[t], delta, width);
}

// Reverses `in` within the block through static and dynamic shared memory.
__global__ void reverse_through_shared(const float* in, float* out) {
  __shared__ float staged[256];
  extern __shared__ float dynamic_staged[];
  const int t = threadIdx.x, n = blockDim.x, base = blockIdx.x * n;
  staged[t] = in[base + t];
  __syncthreads();
  dynamic_staged[t] = staged[n - 1 - t];
  __syncthreads();
  out[base + t] = dynamic_staged[t];
}

// Bugs the emulator must report.
__global__ void lane_returns_before_shuffle(float* out) {  // lane 3 skips the shuffle
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_sync(kFull, 1.f, 0);
}

__global__ void uneven_shuffle_loop(float* out) {  // trip count depends on the lane
  float v = 1.f;
  for (unsigned i = 0; i <= threadIdx.x % 2; ++i) v += __shfl_xor_sync(kFull, v, 1);
  out[threadIdx.x] = v;
}

__global__ void divergent_syncthreads(float* out) {  // two different barriers
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

__global__ void shuffle_against_syncthreads(float* out) {  // half of warp 0 shuffles
  float v = 1.f;
  if (threadIdx.x < 16) v = __shfl_sync(kFull, v, 0);
  __syncthreads();
  out[threadIdx.x] = v;
}

__global__ void reads_unwritten_shared(float* out) {  // staged[64:] is never written
  __shared__ float staged[128];
  staged[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = staged[threadIdx.x + 64];
}

__global__ void writes_past_the_end(float* out, int n) { out[threadIdx.x] = n; }  // block > n

__global__ void misaligned_vector_load(const float* in, float* out) {  // in + 1 is not 16-aligned
  const float4 v = *reinterpret_cast<const float4*>(in + 1 + 4 * threadIdx.x);
  out[threadIdx.x] = v.x + v.y + v.z + v.w;
}

__global__ void shared_index_out_of_bounds(float* out) {  // staged[64] for the last thread
  __shared__ float staged[64];
  staged[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = staged[threadIdx.x + 1];
}

namespace wmma = nvcuda::wmma;

// out[0:256] = A B + C for 16x16 row-major A = in[0:256], B = in[256:512] (both rounded to half),
// C = in[512:768]; one warp, through shared memory.
__global__ void wmma_product(const float* in, float* out) {
  __shared__ __align__(32) __half ab[2 * 256];
  __shared__ __align__(32) float c[256];
  for (int i = threadIdx.x; i < 512; i += 32) ab[i] = __float2half_rn(in[i]);
  for (int i = threadIdx.x; i < 256; i += 32) c[i] = in[512 + i];
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;  // B^T row-major
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::load_matrix_sync(fa, ab, 16);
  __syncwarp();
  for (int i = threadIdx.x; i < 256; i += 32)
    ab[256 + (i % 16) * 16 + i / 16] = __float2half_rn(in[256 + i]);
  __syncwarp();
  wmma::load_matrix_sync(fb, ab + 256, 16);
  wmma::load_matrix_sync(acc, c, 16, wmma::mem_row_major);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(out, acc, 16, wmma::mem_row_major);
}

__global__ void wmma_misaligned(float* out) {  // 16 bytes past a 32-byte boundary
  __shared__ __align__(32) __half a[2 * 256];
  for (int i = threadIdx.x; i < 512; i += 32) a[i] = __float2half_rn(1.f);
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, a + 8, 16);
  out[threadIdx.x] = 1.f;
}

__global__ void wmma_divergent_pointers(float* out) {  // each half-warp its own matrix
  __shared__ __align__(32) __half a[2 * 256];
  for (int i = threadIdx.x; i < 512; i += 32) a[i] = __float2half_rn(1.f);
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, a + (threadIdx.x < 16 ? 0 : 256), 16);
  out[threadIdx.x] = 1.f;
}

// out[2t] = staged value before __pipeline_wait_prior (NaN: not landed), out[2t+1] = after.
__global__ void async_copy_lands_at_wait(const float* in, float* out) {
  __shared__ __align__(16) float staged[4 * 32];
  const int t = threadIdx.x;
  __pipeline_memcpy_async(staged + 4 * t, in + 4 * t, 16);
  __pipeline_commit();
  out[2 * t] = staged[4 * t];
  __pipeline_wait_prior(0);
  out[2 * t + 1] = staged[4 * t];
}

__global__ void async_copy_misaligned(const float* in, float* out) {
  __shared__ __align__(16) float staged[4 * 32 + 4];
  __pipeline_memcpy_async(staged + 4 * threadIdx.x, in + 1 + 4 * threadIdx.x, 16);
  __pipeline_commit();
  __pipeline_wait_prior(0);
  out[threadIdx.x] = staged[4 * threadIdx.x];
}

}  // namespace

extern "C" int gk_selftest(int which, const float* in, float* out, int n, int a, int b, int c) {
  switch (which) {
    case 0: shuffles<<<1, n>>>(in, out, a, b, c); break;
    case 1: reverse_through_shared<<<2, n, n * sizeof(float)>>>(in, out); break;
    case 2: lane_returns_before_shuffle<<<1, 32>>>(out); break;
    case 3: uneven_shuffle_loop<<<1, 32>>>(out); break;
    case 4: divergent_syncthreads<<<1, 64>>>(out); break;
    case 5: shuffle_against_syncthreads<<<1, 64>>>(out); break;
    case 6: reads_unwritten_shared<<<1, 64>>>(out); break;
    case 7: writes_past_the_end<<<1, n + 1>>>(out, n); break;
    case 8: reverse_through_shared<<<1, 2048, 0>>>(in, out); break;  // too many threads
    case 9: misaligned_vector_load<<<1, 8>>>(in, out); break;
    case 10: shared_index_out_of_bounds<<<1, 64>>>(out); break;
    case 11: wmma_product<<<1, 32>>>(in, out); break;
    case 12: wmma_misaligned<<<1, 32>>>(out); break;
    case 13: wmma_divergent_pointers<<<1, 32>>>(out); break;
    case 14: async_copy_lands_at_wait<<<1, 32>>>(in, out); break;
    case 15: async_copy_misaligned<<<1, 32>>>(in, out); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
