// CPU emulation of the subset of CUDA that csrc/cuda/*.cu uses (see tests/cuda_emulation/__init__.py).
//
// Included first in every emulated translation unit (g++ -include). It defines the CUDA keywords as
// plain C++, the built-in index variables, the launch machinery that tests/cuda_emulation/rewrite.py
// turns `k<<<grid, block, shmem, stream>>>(args)` into, barriers (__syncthreads, and one inside every
// warp shuffle), atomics, half/bfloat16 storage types with round-to-nearest-even conversions, and
// the few runtime API calls the launchers make. The scheduler itself is in runtime.cpp.
#pragma once

#include <math.h>

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#define __CUDACC__ 1
#ifndef GK_EMU_CUDA_ARCH
#define GK_EMU_CUDA_ARCH 900
#endif
// Device code is what runs here, so the device-pass macro is defined (selects e.g. sm_90 paths).
#define __CUDA_ARCH__ GK_EMU_CUDA_ARCH

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// rewrite.py replaces every __shared__ declaration; one it missed fails to compile.
#define __shared__ __shared___declaration_not_rewritten_by_cuda_emulation
#define __constant__ __constant___memory_is_not_emulated

// ------------------------------------------------------------------------------------------------
// Runtime API types

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorLaunchFailure = 719,
  cudaErrorInvalidConfiguration = 9,
};
using cudaError = cudaError_t;
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxThreadsPerMultiProcessor = 39
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }

constexpr int warpSize = 32;

namespace cuda_emu {

// Set by the scheduler before it resumes an emulated thread.
inline thread_local uint3 g_thread_idx{0, 0, 0};
inline thread_local uint3 g_block_idx{0, 0, 0};
inline thread_local dim3 g_block_dim{1, 1, 1};
inline thread_local dim3 g_grid_dim{1, 1, 1};

struct LaunchConfig {
  dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;
};
inline LaunchConfig launch_config(dim3 grid, dim3 block, size_t shared_bytes = 0,
                                  cudaStream_t stream = nullptr) {
  return {grid, block, shared_bytes, stream};
}

// runtime.cpp
cudaError_t run_grid(const LaunchConfig& cfg, void (*entry)(void*), void* ctx);
void* dynamic_shared();
void* static_shared(size_t bytes, size_t align, const std::source_location& where);
void sync_block(const std::source_location& where);
// Every lane of the warp deposits `bits`; returns the 32 deposits of this round once all lanes
// named in `mask` have arrived (the warp barrier).
const uint64_t* warp_exchange(unsigned mask, uint64_t bits, int width, const char* what,
                              const std::source_location& where);
int lane_id();
// Fails the launch with `what` (a device-side error a GPU would also report or punish).
[[noreturn]] void device_fault(const std::string& what, const std::source_location& where);
void set_last_error(cudaError_t err);
cudaError_t take_last_error();
int sm_count();
int threads_per_sm();

// `k<<<cfg>>>(args...)` after rewrite.py: the kernel's parameters are copied once (by value, as
// CUDA does) and every emulated thread calls the kernel with them.
template <typename... P, typename... A>
void launch(const LaunchConfig& cfg, void (*kernel)(P...), A&&... args) {
  struct Call {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> params;
  };
  Call call{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
  auto entry = [](void* ctx) {
    Call* c = static_cast<Call*>(ctx);
    std::apply(c->kernel, c->params);
  };
  set_last_error(run_grid(cfg, +entry, &call));
}

// `__shared__ [__align__(A)] T name[N];` after rewrite.py: one object per block, shared by its
// threads, aligned to max(A, alignof(T)).
template <typename T, size_t A = 0>
T& block_shared(const std::source_location& where = std::source_location::current()) {
  constexpr size_t align = A > alignof(T) ? A : alignof(T);
  return *static_cast<T*>(static_shared(sizeof(T), align, where));
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type > 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// Float <-> half / bfloat16 bit patterns, round to nearest even (implemented in runtime.cpp).
uint16_t float_to_half_bits(float f);
float half_bits_to_float(uint16_t h);
uint16_t float_to_bfloat16_bits(float f);
float bfloat16_bits_to_float(uint16_t b);

}  // namespace cuda_emu

#define threadIdx (static_cast<const uint3&>(::cuda_emu::g_thread_idx))
#define blockIdx (static_cast<const uint3&>(::cuda_emu::g_block_idx))
#define blockDim (static_cast<const dim3&>(::cuda_emu::g_block_dim))
#define gridDim (static_cast<const dim3&>(::cuda_emu::g_grid_dim))

// ------------------------------------------------------------------------------------------------
// Runtime API

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = ::cuda_emu::sm_count(); return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = ::cuda_emu::threads_per_sm(); return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
inline cudaError_t cudaGetLastError() { return ::cuda_emu::take_last_error(); }
inline cudaError_t cudaPeekAtLastError() {
  const cudaError_t err = ::cuda_emu::take_last_error();
  ::cuda_emu::set_last_error(err);
  return err;
}
inline const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulation)";
  }
  return "unknown error";
}

// ------------------------------------------------------------------------------------------------
// Barriers and warp shuffles

inline void __syncthreads(const std::source_location& where = std::source_location::current()) {
  ::cuda_emu::sync_block(where);
}

inline void __syncwarp(unsigned mask = 0xffffffffu,
                       const std::source_location& where = std::source_location::current()) {
  ::cuda_emu::warp_exchange(mask, 0, 32, "__syncwarp", where);
}

// Lanes form segments of `width` (a power of two <= 32); a source outside the caller's segment
// reads the caller's own value (shfl_sync: source taken modulo width instead).
template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
              const std::source_location& where = std::source_location::current()) {
  const uint64_t* all = ::cuda_emu::warp_exchange(mask, ::cuda_emu::to_bits(var), width,
                                                  "__shfl_sync", where);
  const int lane = ::cuda_emu::lane_id();
  const int src = (lane & ~(width - 1)) + (src_lane & (width - 1));
  return ::cuda_emu::from_bits<T>(all[src]);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  const std::source_location& where = std::source_location::current()) {
  const uint64_t* all = ::cuda_emu::warp_exchange(mask, ::cuda_emu::to_bits(var), width,
                                                  "__shfl_xor_sync", where);
  const int lane = ::cuda_emu::lane_id();
  const int src = lane ^ lane_mask;
  const int segment_end = (lane | (width - 1));
  return ::cuda_emu::from_bits<T>(all[src > segment_end ? lane : src]);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   const std::source_location& where = std::source_location::current()) {
  const uint64_t* all = ::cuda_emu::warp_exchange(mask, ::cuda_emu::to_bits(var), width,
                                                  "__shfl_down_sync", where);
  const int lane = ::cuda_emu::lane_id();
  const int src = lane + static_cast<int>(delta);
  return ::cuda_emu::from_bits<T>(all[src > (lane | (width - 1)) ? lane : src]);
}

template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 const std::source_location& where = std::source_location::current()) {
  const uint64_t* all = ::cuda_emu::warp_exchange(mask, ::cuda_emu::to_bits(var), width,
                                                  "__shfl_up_sync", where);
  const int lane = ::cuda_emu::lane_id();
  const int src = lane - static_cast<int>(delta);
  return ::cuda_emu::from_bits<T>(all[src < (lane & ~(width - 1)) ? lane : src]);
}

// ------------------------------------------------------------------------------------------------
// Atomics (blocks run one at a time and threads interleave only at barriers, so these never race
// here; std::atomic_ref keeps them honest anyway). Each returns the old value, as CUDA's do.

template <typename T>
inline T gk_emu_atomic_add(T* address, T v) {
  return std::atomic_ref<T>(*address).fetch_add(v);
}
inline int atomicAdd(int* a, int v) { return gk_emu_atomic_add(a, v); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return gk_emu_atomic_add(a, v); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  return gk_emu_atomic_add(a, v);
}
inline float atomicAdd(float* a, float v) { return gk_emu_atomic_add(a, v); }
inline double atomicAdd(double* a, double v) { return gk_emu_atomic_add(a, v); }
#if __CUDA_ARCH__ >= 900
// sm_90 vector atomics (global memory): element-wise, the vector is not one atomic unit.
inline float2 atomicAdd(float2* a, float2 v) {
  return {atomicAdd(&a->x, v.x), atomicAdd(&a->y, v.y)};
}
inline float4 atomicAdd(float4* a, float4 v) {
  return {atomicAdd(&a->x, v.x), atomicAdd(&a->y, v.y), atomicAdd(&a->z, v.z),
          atomicAdd(&a->w, v.w)};
}
#endif
template <typename T>
inline T gk_emu_atomic_cas(T* address, T compare, T v) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, v);
  return compare;
}
inline int atomicCAS(int* a, int c, int v) { return gk_emu_atomic_cas(a, c, v); }
inline unsigned atomicCAS(unsigned* a, unsigned c, unsigned v) { return gk_emu_atomic_cas(a, c, v); }
inline unsigned long long atomicCAS(unsigned long long* a, unsigned long long c,
                                    unsigned long long v) {
  return gk_emu_atomic_cas(a, c, v);
}
inline int atomicExch(int* a, int v) { return std::atomic_ref<int>(*a).exchange(v); }
inline float atomicExch(float* a, float v) { return std::atomic_ref<float>(*a).exchange(v); }
inline int atomicMax(int* a, int v) {
  int old = *a;
  while (old < v && !std::atomic_ref<int>(*a).compare_exchange_weak(old, v)) {
  }
  return old;
}
inline int atomicMin(int* a, int v) {
  int old = *a;
  while (old > v && !std::atomic_ref<int>(*a).compare_exchange_weak(old, v)) {
  }
  return old;
}

// ------------------------------------------------------------------------------------------------
// Math intrinsics used by kernels (host libm; default rounding mode = round to nearest even).

inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline int __float2int_rn(float x) { return static_cast<int>(lrintf(x)); }
inline long long __float2ll_rn(float x) { return llrintf(x); }
inline long long __double2ll_rn(double x) { return llrint(x); }
inline long long __double2ll_rz(double x) { return static_cast<long long>(x); }
inline double __ll2double_rn(long long x) { return static_cast<double>(x); }
inline float __int_as_float(int x) { return ::cuda_emu::from_bits<float>(static_cast<uint32_t>(x)); }
inline int __float_as_int(float x) { return static_cast<int>(::cuda_emu::to_bits(x)); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

// ------------------------------------------------------------------------------------------------
// Half types: 16-bit storage only (torch builds with __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_HALF_OPERATORS__, so kernels must convert explicitly; so must they here).

struct alignas(2) __half {
  uint16_t __x;
};
struct alignas(2) __nv_bfloat16 {
  uint16_t __x;
};
using half = __half;

inline float __half2float(__half h) { return ::cuda_emu::half_bits_to_float(h.__x); }
inline __half __float2half_rn(float f) { return {::cuda_emu::float_to_half_bits(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short x) { return {x}; }
inline float __bfloat162float(__nv_bfloat16 b) { return ::cuda_emu::bfloat16_bits_to_float(b.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {::cuda_emu::float_to_bfloat16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
