"""Run the CUDA C++ kernels of csrc/cuda/ on the CPU, to test their logic without a GPU.

How: rewrite.py turns the few non-C++ constructs of a .cu file (kernel launches, ``__shared__``
declarations) into calls into the emulator; build.py compiles the real kernel sources with the host
C++ compiler against include/ (shadow ``cuda_runtime.h``, ``cuda_fp16.h``, ``cuda_bf16.h`` and the
prelude ``cuda_emulation.h``) into shared libraries; kernels.py calls their launchers through ctypes
on CPU tensors. tests/test_cuda_emulated.py compares the results with ghostkernels.reference.

What is emulated (faithfully enough to catch indexing, masking, tiling and reduction bugs):
  * the launch: grid, block and dynamic shared memory size, validated like a real launch
    (<= 1024 threads, grid limits, <= 48 KiB of static + dynamic shared memory); blocks run one
    after another, in blockIdx order;
  * the threads of a block run as cooperative fibers with real barriers: ``__syncthreads`` waits for
    every live thread of the block (a returned thread no longer counts, as on the GPU), and every
    warp collective (``__shfl_sync``, ``__shfl_xor_sync``, ``__shfl_up/down_sync``, ``__syncwarp``)
    waits for every lane of the warp; shuffles honour ``width`` (segments of ``width`` lanes);
  * errors a GPU would turn into hangs or garbage are reported as launch failures with the source
    line: a deadlock (every live thread waits at a barrier that cannot complete), lanes of a warp in
    different collectives (different call sites, widths or masks), a collective whose mask names a
    lane that has returned, threads at different ``__syncthreads``;
  * shared memory starts each block filled with 0xff bytes (NaN / -1), so reads of shared memory
    no thread wrote show up; kernels.py surrounds every tensor with guard zones (NaN around
    inputs; sentinels around outputs, which must stay untouched), so out-of-bounds writes raise;
  * undefined behaviour that a GPU punishes too or that hides an indexing bug: the kernels are
    compiled with -fsanitize=alignment,bounds,signed-integer-overflow,shift,integer-divide-by-zero
    and runtime.cpp turns each finding into a launch failure with file:line (so a misaligned vector
    load is a "misaligned address" error, as on the GPU; indices past a ``__shared__`` or local
    array of known size are caught);
  * ``__CUDA_ARCH__`` is defined (900 or 800: ms_deform_attn is built for both, to run both
    atomic paths); ``__half`` / ``__nv_bfloat16`` are 16-bit storage types with correctly rounded
    (nearest-even) conversions and no implicit conversions or operators (as torch builds with
    ``__CUDA_NO_HALF_CONVERSIONS__`` / ``__CUDA_NO_HALF_OPERATORS__``); float/double atomicAdd
    (and the sm_90 float2/float4 overloads, element-wise), integer atomics.

What is NOT emulated:
  * no memory model beyond the barriers: threads interleave only at barriers, so a missing
    ``__syncthreads`` between a shared-memory write and another thread's read is only caught when
    the data comes from the wrong round of the barrier, and races between blocks never happen;
  * warp-synchronous behaviour exists only through the barrier inside each collective (no lockstep
    execution, no implicit reconvergence; only full-warp masks are supported);
  * no timing, occupancy, register limits, bank conflicts or coalescing; ``__launch_bounds__`` and
    ``#pragma unroll`` are ignored;
  * floating point is the host's (no FMA contraction on x86-64 without -mfma; nvcc contracts), so
    results agree with a GPU to rounding, not bit for bit; ``__expf`` etc. are the exact libm calls;
  * streams, events, graphs and the torch-side launchers (csrc/cuda/*.cpp) are not compiled: the
    bindings here call the torch-free launchers directly, preparing buffers as those files do;
  * no out-of-bounds detection through raw pointers beyond the guard zones around each tensor (a
    wild write far away can crash the test process); an endless loop without a barrier hangs (no
    watchdog).
"""
