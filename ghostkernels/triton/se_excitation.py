"""Triton kernel of the SE excitation:
``hardsigmoid(w_expand @ relu(w_reduce @ pooled + b_reduce) + b_expand)`` per image (kernel
contract in ``ghostkernels.ops.se_excitation``). One launch.

One program owns ``BLOCK_C`` output channels of one image. It walks the hidden vector [R] in
``BLOCK_R`` chunks: each chunk is computed from the whole pooled row (a loop over C in ``BLOCK_K``
chunks, fp32 multiply-adds of a [BLOCK_R, BLOCK_K] tile of w_reduce), gets its bias and the ReLU,
and is immediately folded into the program's [BLOCK_C] output accumulator through a
[BLOCK_C, BLOCK_R] tile of w_expand. No matrix is ever held whole, so R and C in the thousands
only lengthen the loops. Every program of an image recomputes the same hidden vector (R*C
multiply-adds, the weights read from L2): that is what keeps it one launch.
"""
import torch
import triton
import triton.language as tl

from ghostkernels.triton.activation import hardsigmoid, relu


@triton.jit
def _se_excitation_kernel(p_ptr, wr_ptr, br_ptr, we_ptr, be_ptr, out_ptr, C, R, chan_blocks,
                          BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    cb = pid % chan_blocks
    b = pid // chan_blocks
    chans = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    chan_ok = chans < C
    p_row = p_ptr + b.to(tl.int64) * C

    acc = tl.load(be_ptr + chans, mask=chan_ok, other=0.0).to(tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        r_ok = rs < R
        hidden = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < C
            p = tl.load(p_row + ks, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(wr_ptr + rs[:, None] * C + ks[None, :],
                        mask=r_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_K]
            hidden += tl.sum(w.to(tl.float32) * p[None, :], axis=1)
        hidden += tl.load(br_ptr + rs, mask=r_ok, other=0.0).to(tl.float32)
        # rows past R are zero (their masked weights times an inf in pooled would be NaN, and
        # relu keeps NaN)
        hidden = tl.where(r_ok, relu(hidden), 0.0)
        w = tl.load(we_ptr + chans[:, None] * R + rs[None, :],
                    mask=chan_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_C, BLOCK_R]
        acc += tl.sum(w.to(tl.float32) * hidden[None, :], axis=1)
    scale = hardsigmoid(acc)
    tl.store(out_ptr + b.to(tl.int64) * C + chans, scale.to(out_ptr.dtype.element_ty),
             mask=chan_ok)


def _pow2_between(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def forward(pooled, w_reduce, b_reduce, w_expand, b_expand, out=None):
    """Kernel contract of ``ghostkernels.ops.se_excitation``. ``out`` (optional, for tests) is a
    preallocated [B, C] output of pooled's dtype."""
    B, C = pooled.shape
    R = w_reduce.shape[0]
    if R * C >= 2**31:
        raise ValueError("the Triton kernel indexes the weights in int32: w_reduce must have "
                         f"fewer than 2**31 elements, got {tuple(w_reduce.shape)}")
    scale = out if out is not None else torch.empty((B, C), dtype=pooled.dtype,
                                                    device=pooled.device)
    # Tiles of at most 2048 elements (16 per thread at 4 warps). Not tuned on a GPU.
    block_c = _pow2_between(C, 16, 64)
    block_r = _pow2_between(R, 16, 32)
    block_k = _pow2_between(C, 16, 64)
    chan_blocks = triton.cdiv(C, block_c)
    _se_excitation_kernel[(B * chan_blocks,)](
        pooled, w_reduce, b_reduce, w_expand, b_expand, scale, C, R, chan_blocks,
        BLOCK_C=block_c, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4)
    return scale
