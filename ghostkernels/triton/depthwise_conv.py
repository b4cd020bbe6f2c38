"""Triton kernel of the folded depthwise convolution (kh, kw in {1, 3, 5}, stride 1 or 2,
padding (kh//2, kw//2), bias, optional ReLU).

Direct tiled kernel: one program owns a TILE_H x TILE_W tile of output pixels (flattened to one
register axis) x BLOCK_C channels of one image, and accumulates the kh*kw shifted, masked loads of
x times the per-channel tap in fp32 (the taps are compile-time loops; the masks implement the zero
padding). Both memory formats go through strides: the flattened pixel axis is contiguous along W in
NCHW, the channel axis is contiguous in channels_last, and Triton specialises stride-1 arguments
so either vectorises. The kernel is bandwidth-bound (20 FLOP per 8 bytes for 3x3 fp32); the
overlapping input windows of neighbouring taps are served by L1.
"""
import torch
import triton
import triton.language as tl

from ghostkernels.triton.activation import relu
from ghostkernels.triton.alignment import aligned, common_alignment, pixel_alignment


@triton.jit
def _depthwise_kernel(x_ptr, w_ptr, b_ptr, y_ptr, C, H, W, Ho, Wo,
                      sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                      tiles_w, tiles_h, chan_blocks,
                      KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr,
                      RELU: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                      BLOCK_C: tl.constexpr, C_ALIGN: tl.constexpr, X_ALIGN: tl.constexpr,
                      Y_ALIGN: tl.constexpr):
    # vector loads and stores along the channels with channel counts and pixel strides that are
    # not multiples of 16 (ghostkernels.triton.alignment)
    C = aligned(C, C_ALIGN)
    sxb, sxh, sxw = aligned(sxb, X_ALIGN), aligned(sxh, X_ALIGN), aligned(sxw, X_ALIGN)
    syb, syh, syw = aligned(syb, Y_ALIGN), aligned(syh, Y_ALIGN), aligned(syw, Y_ALIGN)
    pid = tl.program_id(0)
    cb = pid % chan_blocks
    tile = pid // chan_blocks
    tw = tile % tiles_w
    th = (tile // tiles_w) % tiles_h
    b = tile // (tiles_w * tiles_h)
    p = tl.arange(0, TILE_H * TILE_W)
    oh = th * TILE_H + p // TILE_W
    ow = tw * TILE_W + p % TILE_W
    pix_ok = (oh < Ho) & (ow < Wo)
    chans = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    chan_ok = chans < C

    x_img = x_ptr + b.to(tl.int64) * sxb + chans[None, :] * sxc
    acc = tl.zeros([TILE_H * TILE_W, BLOCK_C], dtype=tl.float32)
    acc += tl.load(b_ptr + chans, mask=chan_ok, other=0.0).to(tl.float32)[None, :]
    for i in tl.static_range(KH):
        ih = oh * STRIDE + (i - KH // 2)
        row_ok = pix_ok & (ih >= 0) & (ih < H)
        for j in tl.static_range(KW):
            iw = ow * STRIDE + (j - KW // 2)
            ok = row_ok & (iw >= 0) & (iw < W)
            v = tl.load(x_img + (ih * sxh + iw * sxw)[:, None], mask=ok[:, None] & chan_ok[None, :],
                        other=0.0)
            tap = tl.load(w_ptr + chans * (KH * KW) + (i * KW + j), mask=chan_ok, other=0.0)
            acc += v.to(tl.float32) * tap.to(tl.float32)[None, :]
    if RELU:
        acc = relu(acc)
    y_pix = y_ptr + b.to(tl.int64) * syb + (oh * syh + ow * syw)[:, None] + chans[None, :] * syc
    tl.store(y_pix, acc.to(y_ptr.dtype.element_ty), mask=pix_ok[:, None] & chan_ok[None, :])


# Tile elements per thread. Compiled for sm_90 (Triton 3.8, fp16 at GhostNetV3's shapes), 8 per
# thread spills (channels_last 2 x 8 pixels x 64 channels with 4 warps: 72 registers and 88 B of
# stack) and 16 per thread takes 168 registers (NCHW 8 x 32 pixels x 8 channels with 4 warps:
# little occupancy for a memory-bound kernel); at 4 per thread (1024-element tiles, 8 warps) the
# 3x3 kernels use 48-72 registers without spills and the 5x5 ones at most 24 B of stack. 16 warps
# made ptxas (triton 3.6) hold a 5x5 kernel to 64 registers with 56 B of stack. A static choice
# (tests/test_triton_aot_compile.py), not timed.
ELEMENTS_PER_THREAD = 4
MAX_WARPS = 8
TILE_ELEMENTS = 1024


def _pow2_at_most(n: int, cap: int) -> int:
    return min(cap, triton.next_power_of_2(max(n, 1)))


def forward(x, weight, bias, kh: int, kw: int, stride: int, relu: bool, out=None):
    """Kernel contract of ``ghostkernels.ops.depthwise_conv``. ``out`` (optional, for tests) is
    a preallocated y of the right shape, dtype and memory format."""
    B, C, H, W = x.shape
    Ho = (H + 2 * (kh // 2) - kh) // stride + 1
    Wo = (W + 2 * (kw // 2) - kw) // stride + 1
    channels_last = not x.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = out if out is not None else torch.empty((B, C, Ho, Wo), dtype=x.dtype, device=x.device,
                                                memory_format=fmt)
    # TILE_ELEMENTS fp32 accumulators per program: a wide pixel tile for NCHW (contiguous along W),
    # a wide channel block for channels_last (contiguous along C).
    block_c = _pow2_at_most(C, 64 if channels_last else 8)
    tile_w = _pow2_at_most(Wo, 32 if not channels_last else 8)
    tile_h = _pow2_at_most(Ho, max(1, TILE_ELEMENTS // (tile_w * block_c)))
    tiles_w, tiles_h = triton.cdiv(Wo, tile_w), triton.cdiv(Ho, tile_h)
    chan_blocks = triton.cdiv(C, block_c)
    if max(x[0].numel(), y[0].numel()) >= 2**31:
        raise ValueError("the Triton kernel indexes within one image in int32: each image of x and "
                         f"y must have fewer than 2**31 elements, got x {tuple(x.shape)}, "
                         f"y {tuple(y.shape)}")
    num_warps = max(1, min(MAX_WARPS, tile_h * tile_w * block_c // (32 * ELEMENTS_PER_THREAD)))
    grid = (B * tiles_h * tiles_w * chan_blocks,)
    _depthwise_kernel[grid](
        x, weight, bias, y, C, H, W, Ho, Wo, *x.stride(), *y.stride(), tiles_w, tiles_h,
        chan_blocks, KH=kh, KW=kw, STRIDE=stride, RELU=bool(relu), TILE_H=tile_h, TILE_W=tile_w,
        BLOCK_C=block_c, C_ALIGN=common_alignment(C), X_ALIGN=pixel_alignment(x),
        Y_ALIGN=pixel_alignment(y), num_warps=num_warps)
    return y
