"""Triton kernel of the folded Ghost op, halo-tile mapping (the default launch).

A work item is a ``HALO_H x HALO_W`` pixel tile of one image (flattened to one register axis of
``HALO_H * HALO_W`` pixels, a power of two) x ``BLOCK_C`` primary channels. Its output pixels are
the tile's interior, ``(HALO_H - 2) x (HALO_W - 2)``; the one-pixel ring around it is the halo the
depthwise 3x3 needs. Tiles step by the interior size, so neighbouring tiles' halos overlap.

1. x1 of every tile pixel, halo included, is ONE ``tl.dot`` of the [pixels, Cin] x tile with the
   [Cin, BLOCK_C] weight (``BLOCK_K`` chunks, fp32 accumulation), plus bias and activation, zero
   outside the image (the depthwise conv zero-pads x1): an M = 128..256 matrix product instead
   of the row kernel's M = 16 ones, each x1 computed once (the halo ring costs
   (HALO_H*HALO_W) / interior: 1.5x at 8 x 16) instead of 3.75x.
2. The fp32 x1 tile goes to the program's private scratch tile (global memory that stays in
   cache, see below), and the interior's x1 (times the gate, plus the residual, when given) to
   channels ``[0, C1)`` of y: x1 is written to HBM once, where it belongs.
3. After a barrier (``tl.debug_barrier``: the program's own global stores are visible to all its
   threads) the 9 depthwise taps read the scratch tile shifted by a row/column, channel-fastest
   16-byte vectors; the result goes to channels ``[C1, out_channels)``.

The grid is persistent (``programs_per_sm`` programs per SM looping over the work items), so the
scratch is ``programs x tile`` (8.4 MB for 528 programs of 128 x 32 fp32), small enough to stay in
L2 instead of costing HBM traffic, and each program rewrites its own tile (a barrier before each
rewrite): no program reads another's data, and x1 is kept unrounded for the taps (the op's
one-rounding contract: fp16/bf16 results equal the row kernel's, which holds x1 in registers).
Nothing is concatenated. Input scale, fp32 IEEE dots and the bf16 interpreter upcast work as in
the row kernel (``ghostkernels.triton.ghost_conv``, whose docstring explains them).
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ghostkernels.triton.activation import relu
from ghostkernels.triton.alignment import aligned, common_alignment, pixel_alignment
from ghostkernels.triton.device import num_sms


@triton.jit
def weight_chunk(w_ptr, scale_ptr, chans, chan_ok, ks, k_ok, Cin, HAS_SCALE: tl.constexpr,
                 SPLIT_SCALED_W: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Rows ``ks`` of the transposed 1x1 weight, ``[BLOCK_K, BLOCK_C]``, times the input scale
    (``W1 diag(s_b)``: x . (s w) == (x s) . w); with SPLIT_SCALED_W also the remainder of its
    rounding to the input type (second of the returned pair; otherwise the pair repeats w)."""
    w = tl.load(w_ptr + chans[None, :] * Cin + ks[:, None],
                mask=k_ok[:, None] & chan_ok[None, :], other=0.0)
    w_rest = w
    if HAS_SCALE:
        s = tl.load(scale_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        w_scaled = w.to(tl.float32) * s[:, None]
        w = w_scaled.to(w.dtype)
        if SPLIT_SCALED_W:
            w_rest = (w_scaled - w.to(tl.float32)).to(w.dtype)
    if UPCAST_DOT:  # exact: products of two bf16 values fit in fp32
        w = w.to(tl.float32)
        w_rest = w_rest.to(tl.float32)
    return w, w_rest


@triton.jit
def _x1_tile(x_pix, w_ptr, scale_ptr, b_p, in_img, chans, chan_ok, Cin, sxc,
             RELU: tl.constexpr, HAS_SCALE: tl.constexpr, SPLIT_SCALED_W: tl.constexpr,
             PIXELS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
             PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """act(x . W1 + b1) of the tile's pixels ([PIXELS, BLOCK_C] fp32); rows of pixels outside
    the image are garbage (bias, activation) and must be masked by the caller."""
    acc = tl.zeros([PIXELS, BLOCK_C], dtype=tl.float32)
    for k0 in range(0, Cin, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < Cin
        w, w_rest = weight_chunk(w_ptr, scale_ptr, chans, chan_ok, ks, k_ok, Cin, HAS_SCALE,
                                 SPLIT_SCALED_W, UPCAST_DOT)
        xv = tl.load(x_pix[:, None] + ks[None, :] * sxc, mask=in_img[:, None] & k_ok[None, :],
                     other=0.0)
        if UPCAST_DOT:
            xv = xv.to(tl.float32)
        acc = tl.dot(xv, w, acc, input_precision=PRECISION)
        if SPLIT_SCALED_W:
            acc = tl.dot(xv, w_rest, acc, input_precision=PRECISION)
    acc += b_p[None, :]
    if RELU:
        acc = relu(acc)
    return acc


@triton.jit
def _work_item(item, chan_blocks, tiles_w, tiles_h):
    """(channel block, tile column, tile row, image as int64) of a persistent loop's work item;
    channel block fastest, so programs running together read the same x tile (L2 reuse)."""
    tile = item // chan_blocks
    return (item % chan_blocks, tile % tiles_w, (tile // tiles_w) % tiles_h,
            (tile // (tiles_w * tiles_h)).to(tl.int64))


@triton.jit
def _channel_block(cb, c_local, C1, OUT_C, BLOCK_C: tl.constexpr):
    """(primary channels of block ``cb``, which of them exist, which of their cheap channels
    survive the ``out_channels`` slice)."""
    chans = cb * BLOCK_C + c_local
    chan_ok = chans < C1
    return chans, chan_ok, chan_ok & (C1 + chans < OUT_C)


@triton.jit
def _x1_zero_padded(x_ptr, w_primary_ptr, b_primary_ptr, scale_ptr, b64, rows, cols, in_img,
                    chans, chan_ok, Cin, sxb, sxc, sxh, sxw, RELU: tl.constexpr,
                    HAS_SCALE: tl.constexpr, SPLIT_SCALED_W: tl.constexpr,
                    PIXELS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """:func:`_x1_tile` of image ``b64``'s pixels at rows/cols with its bias, zero at pixels
    outside the image (the cheap depthwise conv zero-pads x1)."""
    b_p = tl.load(b_primary_ptr + chans, mask=chan_ok, other=0.0).to(tl.float32)
    x_pix = x_ptr + b64 * sxb + rows * sxh + cols * sxw
    x1 = _x1_tile(x_pix, w_primary_ptr, scale_ptr + b64 * Cin, b_p, in_img, chans, chan_ok, Cin,
                  sxc, RELU, HAS_SCALE, SPLIT_SCALED_W, PIXELS, BLOCK_C, BLOCK_K, PRECISION,
                  UPCAST_DOT)
    return tl.where(in_img[:, None], x1, 0.0)


@triton.jit
def _cheap_taps(tile_x1, w_cheap_ptr, b_cheap_ptr, chans, cheap_ok, ring_inside,
                ROW: tl.constexpr, RELU: tl.constexpr, PIXELS: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """x2 = act(dw3x3(x1) + b2) of the pixels at ``ring_inside`` of a [PIXELS, BLOCK_C] fp32 x1
    tile stored channel-fastest at ``tile_x1`` (pointers of every element; ROW pixels per tile
    row). Inner pixels only: their neighbours are in the tile (out-of-image ones hold zeros), so
    no image-bounds masks."""
    x2 = tl.zeros([PIXELS, BLOCK_C], dtype=tl.float32)
    x2 += tl.load(b_cheap_ptr + chans, mask=cheap_ok, other=0.0).to(tl.float32)[None, :]
    for dy in tl.static_range(3):
        for dx in tl.static_range(3):
            v = tl.load(tile_x1 + ((dy - 1) * ROW + (dx - 1)) * BLOCK_C,
                        mask=ring_inside[:, None], other=0.0)
            tap = tl.load(w_cheap_ptr + chans * 9 + (dy * 3 + dx), mask=cheap_ok, other=0.0)
            x2 += v * tap.to(tl.float32)[None, :]
    if RELU:
        x2 = relu(x2)
    return x2


@triton.jit
def _apply_epilogue(v, rows, cols, out_chans, mask, gate_img, sgc, sgh, sgw, Hg, Wg, res_img,
                    src, srh, srw, H, W, HAS_GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """v [PIXELS, BLOCK_C] (pixels at rows/cols, channels out_chans) times the nearest gate values,
    plus the residual."""
    if HAS_GATE:
        at = ((rows * Hg) // H) * sgh + ((cols * Wg) // W) * sgw
        g = tl.load(gate_img + at[:, None] + out_chans[None, :] * sgc, mask=mask, other=0.0)
        v = v * g.to(tl.float32)
    if HAS_RESIDUAL:
        res = tl.load(res_img + (rows * srh + cols * srw)[:, None] + out_chans[None, :] * src,
                      mask=mask, other=0.0)
        v = v + res.to(tl.float32)
    return v


@triton.jit
def _ghost_halo_kernel(x_ptr, w_primary_ptr, b_primary_ptr, w_cheap_ptr, b_cheap_ptr, y_ptr,
                       scratch_ptr, scale_ptr, gate_ptr, res_ptr,
                       Cin, C1, OUT_C, H, W, Hg, Wg,
                       sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                       sgb, sgc, sgh, sgw, srb, src, srh, srw,
                       tiles_w, tiles_h, chan_blocks, work_items,
                       RELU_P: tl.constexpr, RELU_C: tl.constexpr, HAS_SCALE: tl.constexpr,
                       SPLIT_SCALED_W: tl.constexpr, HAS_GATE: tl.constexpr,
                       HAS_RESIDUAL: tl.constexpr, HALO_H: tl.constexpr, HALO_W: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, X_ALIGN: tl.constexpr,
                       Y_ALIGN: tl.constexpr, G_ALIGN: tl.constexpr, R_ALIGN: tl.constexpr,
                       CIN_ALIGN: tl.constexpr, COUT_ALIGN: tl.constexpr,
                       PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    # vector loads and stores along the channels with channel counts and pixel strides that are
    # not multiples of 16 (ghostkernels.triton.alignment)
    Cin, C1, OUT_C = aligned(Cin, CIN_ALIGN), aligned(C1, COUT_ALIGN), aligned(OUT_C, COUT_ALIGN)
    sxb, sxh, sxw = aligned(sxb, X_ALIGN), aligned(sxh, X_ALIGN), aligned(sxw, X_ALIGN)
    syb, syh, syw = aligned(syb, Y_ALIGN), aligned(syh, Y_ALIGN), aligned(syw, Y_ALIGN)
    sgb, sgh, sgw = aligned(sgb, G_ALIGN), aligned(sgh, G_ALIGN), aligned(sgw, G_ALIGN)
    srb, srh, srw = aligned(srb, R_ALIGN), aligned(srh, R_ALIGN), aligned(srw, R_ALIGN)
    PIXELS: tl.constexpr = HALO_H * HALO_W
    p = tl.arange(0, PIXELS)
    hy = p // HALO_W
    hx = p % HALO_W
    ring_inside = (hy >= 1) & (hy < HALO_H - 1) & (hx >= 1) & (hx < HALO_W - 1)
    c_local = tl.arange(0, BLOCK_C)
    # this program's private fp32 x1 tile, [PIXELS, BLOCK_C] channel-fastest
    pid = tl.program_id(0)
    mine = scratch_ptr + pid.to(tl.int64) * (PIXELS * BLOCK_C)
    tile_x1 = mine + p[:, None] * BLOCK_C + c_local[None, :]

    # Persistent loop over (image, tile, channel block)
    for item in range(pid, work_items, tl.num_programs(0)):
        cb, tw, th, b64 = _work_item(item, chan_blocks, tiles_w, tiles_h)
        rows = th * (HALO_H - 2) - 1 + hy
        cols = tw * (HALO_W - 2) - 1 + hx
        in_img = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)
        inner = in_img & ring_inside
        chans, chan_ok, cheap_ok = _channel_block(cb, c_local, C1, OUT_C, BLOCK_C)

        x1 = _x1_zero_padded(x_ptr, w_primary_ptr, b_primary_ptr, scale_ptr, b64, rows, cols,
                             in_img, chans, chan_ok, Cin, sxb, sxc, sxh, sxw, RELU_P, HAS_SCALE,
                             SPLIT_SCALED_W, PIXELS, BLOCK_C, BLOCK_K, PRECISION, UPCAST_DOT)
        tl.debug_barrier()  # the previous item's tap reads of the tile are done
        tl.store(tile_x1, x1)
        gate_img = gate_ptr + b64 * sgb
        res_img = res_ptr + b64 * srb
        y_pix = y_ptr + b64 * syb + rows * syh + cols * syw
        primary_mask = inner[:, None] & chan_ok[None, :]
        v = _apply_epilogue(x1, rows, cols, chans, primary_mask, gate_img, sgc, sgh, sgw, Hg, Wg,
                            res_img, src, srh, srw, H, W, HAS_GATE, HAS_RESIDUAL)
        tl.store(y_pix[:, None] + chans[None, :] * syc, v.to(y_ptr.dtype.element_ty),
                 mask=primary_mask)
        tl.debug_barrier()  # the tile is written, by every thread of the program

        x2 = _cheap_taps(tile_x1, w_cheap_ptr, b_cheap_ptr, chans, cheap_ok, ring_inside, HALO_W,
                         RELU_C, PIXELS, BLOCK_C)
        cheap_mask = inner[:, None] & cheap_ok[None, :]
        x2 = _apply_epilogue(x2, rows, cols, C1 + chans, cheap_mask, gate_img, sgc, sgh, sgw, Hg,
                             Wg, res_img, src, srh, srw, H, W, HAS_GATE, HAS_RESIDUAL)
        tl.store(y_pix[:, None] + (C1 + chans)[None, :] * syc, x2.to(y_ptr.dtype.element_ty),
                 mask=cheap_mask)


@dataclass(frozen=True)
class HaloLaunchConfig:
    """Tile of the halo kernel: ``halo_h x halo_w`` pixels (product a power of two, each >= 3;
    the output tile is 2 smaller in each dim) x ``block_c`` channels (>= 16), Cin in ``block_k``
    chunks (>= 16); a persistent grid of at most ``programs_per_sm`` programs per SM."""
    halo_h: int
    halo_w: int
    block_c: int
    block_k: int
    num_warps: int
    # 4 programs per SM, each with its own x1 tile (16 KB at 128 pixels x 32 channels in fp32):
    # 132 x 4 x 16 KB = 8.4 MB of scratch on an H100, which stays in L2 (50 MB)
    programs_per_sm: int = 4


def _pow2_between(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def default_config(C1: int, W: int, channels_last: bool) -> HaloLaunchConfig:
    """8 warps, Cin in 16-channel chunks. channels_last: 8 x 16 pixel tiles (6 x 14 outputs:
    1.52x the x1 work for the halo) x 32 channels (C1 = 60 in two blocks: x read twice, from
    L2), 124 registers (192 with input scale and residual); NCHW: 16 x 16 (14 x 14 outputs,
    1.31x) x 16 channels, 129 registers; no spills, 16-byte tap loads (sm_90, triton 3.8, fp16
    B32 40->120 @80; 16 x 16 x 32 spilled with the epilogues). Images at most 6 columns wide get
    16 x 8 tiles (fewer halo columns wasted). Not yet timed on a GPU: bench/sweep_triton.py
    times the alternatives."""
    narrow = W <= 6
    halo_h, halo_w = (16, 8) if narrow else ((8, 16) if channels_last else (16, 16))
    block_c = 32 if channels_last else 16
    return HaloLaunchConfig(halo_h=halo_h, halo_w=halo_w,
                            block_c=_pow2_between(C1, 16, block_c),
                            block_k=16, num_warps=8)


def launch(x, w_primary, b_primary, w_cheap, b_cheap, y, relu_primary: bool, relu_cheap: bool,
           out_channels: int, input_scale, gate, residual, cfg: HaloLaunchConfig):
    """Fill y (allocated by the caller in x's memory format) with the Ghost op."""
    B, Cin, H, W = x.shape
    C1 = w_primary.shape[0]
    tiles_h = triton.cdiv(H, cfg.halo_h - 2)
    tiles_w = triton.cdiv(W, cfg.halo_w - 2)
    chan_blocks = triton.cdiv(C1, cfg.block_c)
    work_items = B * tiles_h * tiles_w * chan_blocks
    programs = min(work_items, cfg.programs_per_sm * num_sms(x.device))
    scratch = torch.empty(programs * cfg.halo_h * cfg.halo_w * cfg.block_c, dtype=torch.float32,
                          device=x.device)
    Hg, Wg = gate.shape[-2:] if gate is not None else (1, 1)
    _ghost_halo_kernel[(programs,)](
        x, w_primary, b_primary, w_cheap, b_cheap, y, scratch,
        y if input_scale is None else input_scale,  # absent extras: unused placeholders
        y if gate is None else gate, y if residual is None else residual,
        Cin, C1, out_channels, H, W, Hg, Wg, *x.stride(), *y.stride(),
        *(gate.stride() if gate is not None else (0,) * 4),
        *(residual.stride() if residual is not None else (0,) * 4),
        tiles_w, tiles_h, chan_blocks, work_items,
        RELU_P=bool(relu_primary), RELU_C=bool(relu_cheap), HAS_SCALE=input_scale is not None,
        SPLIT_SCALED_W=input_scale is not None and x.dtype != torch.float32,
        HAS_GATE=gate is not None, HAS_RESIDUAL=residual is not None, HALO_H=cfg.halo_h,
        HALO_W=cfg.halo_w, BLOCK_C=cfg.block_c, BLOCK_K=cfg.block_k,
        X_ALIGN=pixel_alignment(x), Y_ALIGN=pixel_alignment(y),
        G_ALIGN=pixel_alignment(gate) if gate is not None else 1,
        R_ALIGN=pixel_alignment(residual) if residual is not None else 1,
        CIN_ALIGN=common_alignment(Cin), COUT_ALIGN=common_alignment(C1, out_channels),
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        UPCAST_DOT=x.dtype == torch.bfloat16 and x.device.type == "cpu", num_warps=cfg.num_warps)
    return y
