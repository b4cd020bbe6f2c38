// Shadows the CUDA toolkit's <cuda_pipeline.h> for the CPU emulation (tests/cuda_emulation): the
// asynchronous global -> shared copy primitives (cp.async).
//
// Faithful where it catches bugs: a copy is only *issued* by __pipeline_memcpy_async (the source
// is read then, global memory being constant during a launch); the destination is written when
// the issuing thread waits for its batch (__pipeline_wait_prior), so a kernel that reads shared
// memory before waiting sees the emulator's NaN fill instead of the data. Sizes must be 4, 8 or
// 16 bytes with both pointers aligned to the size (a misaligned cp.async faults on a GPU);
// `zfill` trailing bytes are zeros.
#pragma once

#include <vector>

#include "cuda_emulation.h"

namespace cuda_emu {

struct PendingCopy {
  unsigned long long block;  // linear block index (copies never outlive their block)
  unsigned long long batch;  // commit count of the thread when issued
  unsigned char* dst;
  unsigned char bytes[16];
  size_t size;
};

struct ThreadPipeline {
  unsigned long long block = ~0ull;
  unsigned long long committed = 0;
  std::vector<PendingCopy> pending;
};

inline ThreadPipeline& pipeline_of_this_thread() {
  static std::vector<ThreadPipeline> pipelines(1024);
  const unsigned long long block =
      (static_cast<unsigned long long>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x +
      blockIdx.x;
  ThreadPipeline& p =
      pipelines[(threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x];
  if (p.block != block) p = ThreadPipeline{block, 0, {}};
  return p;
}

}  // namespace cuda_emu

inline void __pipeline_memcpy_async(
    void* dst_shared, const void* src_global, size_t size_and_align, size_t zfill = 0,
    const std::source_location& where = std::source_location::current()) {
  if (size_and_align != 4 && size_and_align != 8 && size_and_align != 16)
    ::cuda_emu::device_fault("__pipeline_memcpy_async of " + std::to_string(size_and_align) +
                                 " bytes (must be 4, 8 or 16)", where);
  if (zfill > size_and_align)
    ::cuda_emu::device_fault("__pipeline_memcpy_async with zfill > size", where);
  if (reinterpret_cast<uintptr_t>(dst_shared) % size_and_align != 0 ||
      reinterpret_cast<uintptr_t>(src_global) % size_and_align != 0)
    ::cuda_emu::device_fault("misaligned address in __pipeline_memcpy_async", where);
  ::cuda_emu::ThreadPipeline& p = ::cuda_emu::pipeline_of_this_thread();
  ::cuda_emu::PendingCopy c{p.block, p.committed, static_cast<unsigned char*>(dst_shared), {},
                            size_and_align};
  const size_t copied = size_and_align - zfill;
  std::memcpy(c.bytes, src_global, copied);
  std::memset(c.bytes + copied, 0, zfill);
  p.pending.push_back(c);
}

inline void __pipeline_commit() { ++::cuda_emu::pipeline_of_this_thread().committed; }

// Completes this thread's committed batches except the `prior` most recent ones. Copies issued
// after the last commit belong to no batch yet and stay pending (cp.async.wait_group does not
// wait for them either).
inline void __pipeline_wait_prior(size_t prior) {
  ::cuda_emu::ThreadPipeline& p = ::cuda_emu::pipeline_of_this_thread();
  std::vector<::cuda_emu::PendingCopy> keep;
  for (const ::cuda_emu::PendingCopy& c : p.pending) {
    if (c.batch + prior < p.committed)
      std::memcpy(c.dst, c.bytes, c.size);
    else
      keep.push_back(c);
  }
  p.pending.swap(keep);
}
