"""Triton kernel of ``ghost_conv_depthwise``: the folded Ghost op (with its input scale and gate)
whose output g goes straight into a k x k depthwise conv of stride s, g never written.

A work item is a ``TILE_H x TILE_W`` tile of the strided output of one image x ``BLOCK_C``
primary channels (and the cheap channels paired with them). Its output pixels need g on the
region ``(TILE_H - 1) * s + k`` rows tall (the depthwise conv's halo, zero outside the image),
and g's cheap half needs x1 on one more pixel all around (the Ghost op's 3x3 halo): the program
works on a ``REGION_H x REGION_W`` pixel region (a power of two) of x1, from which the launcher
derives the output tile, ``TILE = (REGION - 2 - k) // s + 1`` (16 x 16 regions: 6 x 6 outputs
for k=3, 5 x 5 for k=5 at stride 2). Stride 2 and 3x3: 256 x1 pixels per 144 pixels of g the
tile consumes, i.e. 1.8x the 1x1 FLOPs, which the small-Cin blocks this op serves (16-40 input
channels at 320-80 px) can afford; what it saves is g's write and read back (bench/PERF_NOTES.md).

1. x1 of every region pixel: one ``tl.dot`` of the [pixels, Cin] x tile with the [Cin, BLOCK_C]
   weight (the halo kernel's ``_x1_tile``), zero outside the image, to the program's private fp32
   scratch plane 0.
2. After a barrier, x2 of the region's inner pixels from plane 0's nine shifted taps, times the
   nearest gate values, to plane 1; after another barrier (the tap reads are done) x1 times the
   gate overwrites plane 0. Both halves of g are zero outside the image (the depthwise conv's
   zero padding).
3. After a barrier, each output pixel's k x k taps read both planes at stride s: bias, activation,
   one rounding, stored to channels c and C1 + c of y.

The grid is persistent (``programs_per_sm`` programs per SM over the work items), so the scratch
is ``programs x 2 planes x REGION x BLOCK_C`` fp32 (132 SMs x 2 x 256 x 16 x 4 B = 4.3 MB on an
H100 with the defaults), which stays in L2. Not yet timed on a GPU.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ghostkernels.triton.activation import relu
from ghostkernels.triton.alignment import aligned, common_alignment, pixel_alignment
from ghostkernels.triton.device import num_sms
from ghostkernels.triton.ghost_conv_halo import (_apply_epilogue, _channel_block, _cheap_taps,
                                                 _work_item, _x1_zero_padded)


@triton.jit
def _ghost_depthwise_kernel(x_ptr, w_primary_ptr, b_primary_ptr, w_cheap_ptr, b_cheap_ptr,
                            w_dw_ptr, b_dw_ptr, y_ptr, scratch_ptr, scale_ptr, gate_ptr,
                            Cin, C1, OUT_C, H, W, Ho, Wo, Hg, Wg,
                            sxb, sxc, sxh, sxw, syb, syc, syh, syw, sgb, sgc, sgh, sgw,
                            tiles_w, tiles_h, chan_blocks, work_items,
                            RELU_P: tl.constexpr, RELU_C: tl.constexpr, RELU_DW: tl.constexpr,
                            HAS_SCALE: tl.constexpr, SPLIT_SCALED_W: tl.constexpr,
                            HAS_GATE: tl.constexpr, K: tl.constexpr, STRIDE: tl.constexpr,
                            REGION_H: tl.constexpr, REGION_W: tl.constexpr,
                            TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                            OUT_PIXELS: tl.constexpr, BLOCK_C: tl.constexpr,
                            BLOCK_K: tl.constexpr, X_ALIGN: tl.constexpr,
                            Y_ALIGN: tl.constexpr, G_ALIGN: tl.constexpr,
                            CIN_ALIGN: tl.constexpr, COUT_ALIGN: tl.constexpr,
                            PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    # vector loads and stores along the channels (ghostkernels.triton.alignment)
    Cin, C1, OUT_C = aligned(Cin, CIN_ALIGN), aligned(C1, COUT_ALIGN), aligned(OUT_C, COUT_ALIGN)
    sxb, sxh, sxw = aligned(sxb, X_ALIGN), aligned(sxh, X_ALIGN), aligned(sxw, X_ALIGN)
    syb, syh, syw = aligned(syb, Y_ALIGN), aligned(syh, Y_ALIGN), aligned(syw, Y_ALIGN)
    sgb, sgh, sgw = aligned(sgb, G_ALIGN), aligned(sgh, G_ALIGN), aligned(sgw, G_ALIGN)
    PIXELS: tl.constexpr = REGION_H * REGION_W
    PLANE: tl.constexpr = PIXELS * BLOCK_C
    p = tl.arange(0, PIXELS)
    ry = p // REGION_W
    rx = p % REGION_W
    ring_inside = (ry >= 1) & (ry < REGION_H - 1) & (rx >= 1) & (rx < REGION_W - 1)
    o = tl.arange(0, OUT_PIXELS)
    oy = o // TILE_W
    ox = o % TILE_W
    o_in_tile = o < TILE_H * TILE_W
    c_local = tl.arange(0, BLOCK_C)
    pid = tl.program_id(0)
    plane0 = scratch_ptr + pid.to(tl.int64) * (2 * PLANE)
    plane1 = plane0 + PLANE
    at_p = p[:, None] * BLOCK_C + c_local[None, :]

    for item in range(pid, work_items, tl.num_programs(0)):
        cb, tw, th, b64 = _work_item(item, chan_blocks, tiles_w, tiles_h)
        # region pixel (ry, rx) is image pixel (row0 + ry, col0 + rx); g's region starts at row0+1
        row0 = th * TILE_H * STRIDE - K // 2 - 1
        col0 = tw * TILE_W * STRIDE - K // 2 - 1
        rows = row0 + ry
        cols = col0 + rx
        in_img = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)
        chans, chan_ok, cheap_ok = _channel_block(cb, c_local, C1, OUT_C, BLOCK_C)

        # 1. x1 (zero outside the image: the cheap 3x3 zero-pads x1)
        x1 = _x1_zero_padded(x_ptr, w_primary_ptr, b_primary_ptr, scale_ptr, b64, rows, cols,
                             in_img, chans, chan_ok, Cin, sxb, sxc, sxh, sxw, RELU_P, HAS_SCALE,
                             SPLIT_SCALED_W, PIXELS, BLOCK_C, BLOCK_K, PRECISION, UPCAST_DOT)
        tl.debug_barrier()  # the previous item's reads of the planes are done
        tl.store(plane0 + at_p, x1)
        tl.debug_barrier()

        # 2. x2 on the inner pixels, then g = (x1, x2) * gate, zero outside the image; x1 is
        # read back from plane 0 (each thread its own elements) instead of kept in registers
        x2 = _cheap_taps(plane0 + at_p, w_cheap_ptr, b_cheap_ptr, chans, cheap_ok, ring_inside,
                         REGION_W, RELU_C, PIXELS, BLOCK_C)
        g_ok = in_img & ring_inside
        gate_img = gate_ptr + b64 * sgb
        g2 = _apply_epilogue(x2, rows, cols, C1 + chans, g_ok[:, None] & cheap_ok[None, :],
                             gate_img, sgc, sgh, sgw, Hg, Wg, gate_img, 0, 0, 0, H, W, HAS_GATE,
                             False)
        tl.store(plane1 + at_p, tl.where(g_ok[:, None], g2, 0.0))
        tl.debug_barrier()  # every tap read of plane 0 is done
        g1 = _apply_epilogue(tl.load(plane0 + at_p), rows, cols, chans,
                             g_ok[:, None] & chan_ok[None, :], gate_img, sgc, sgh, sgw, Hg, Wg,
                             gate_img, 0, 0, 0, H, W, HAS_GATE, False)
        tl.store(plane0 + at_p, tl.where(g_ok[:, None], g1, 0.0))
        tl.debug_barrier()

        # 3. the k x k stride-s depthwise conv of both halves
        out_rows = th * TILE_H + oy
        out_cols = tw * TILE_W + ox
        out_ok = o_in_tile & (out_rows < Ho) & (out_cols < Wo)
        acc1 = tl.zeros([OUT_PIXELS, BLOCK_C], dtype=tl.float32)
        acc2 = tl.zeros([OUT_PIXELS, BLOCK_C], dtype=tl.float32)
        acc1 += tl.load(b_dw_ptr + chans, mask=chan_ok, other=0.0).to(tl.float32)[None, :]
        acc2 += tl.load(b_dw_ptr + C1 + chans, mask=cheap_ok, other=0.0).to(tl.float32)[None, :]
        # region index of the output's first tap: row oy * s + 1 (g's region starts at row 1)
        first = (oy * STRIDE + 1) * REGION_W + (ox * STRIDE + 1)
        tap_ok = o_in_tile[:, None]
        for ky in tl.static_range(K):
            for kx in tl.static_range(K):
                at = (first + ky * REGION_W + kx)[:, None] * BLOCK_C + c_local[None, :]
                w1 = tl.load(w_dw_ptr + chans * (K * K) + (ky * K + kx), mask=chan_ok, other=0.0)
                w2 = tl.load(w_dw_ptr + (C1 + chans) * (K * K) + (ky * K + kx), mask=cheap_ok,
                             other=0.0)
                acc1 += tl.load(plane0 + at, mask=tap_ok, other=0.0) * w1.to(tl.float32)[None, :]
                acc2 += tl.load(plane1 + at, mask=tap_ok, other=0.0) * w2.to(tl.float32)[None, :]
        if RELU_DW:
            acc1 = relu(acc1)
            acc2 = relu(acc2)
        y_pix = y_ptr + b64 * syb + out_rows * syh + out_cols * syw
        tl.store(y_pix[:, None] + chans[None, :] * syc, acc1.to(y_ptr.dtype.element_ty),
                 mask=out_ok[:, None] & chan_ok[None, :])
        tl.store(y_pix[:, None] + (C1 + chans)[None, :] * syc, acc2.to(y_ptr.dtype.element_ty),
                 mask=out_ok[:, None] & cheap_ok[None, :])


@dataclass(frozen=True)
class LaunchConfig:
    """``region_h x region_w`` x1 pixels per work item (product a power of two, each at least
    k + 2 so that the output tile has a pixel) x ``block_c`` primary channels (>= 16), Cin in
    ``block_k`` chunks (>= 16); a persistent grid of at most ``programs_per_sm`` programs per SM."""
    region_h: int = 16
    region_w: int = 16
    block_c: int = 16
    block_k: int = 16
    num_warps: int = 8
    # one program per SM: at 113-172 registers x 256 threads (sm_90, fp16, the GhostNet shapes)
    # two do not fit in an SM's 64K registers
    programs_per_sm: int = 1


def output_tile(region: int, kernel_size: int, stride: int) -> int:
    """Output pixels per tile along one dim: the most whose k-tap windows at stride s fit in the
    region less its one-pixel ring."""
    return (region - 2 - kernel_size) // stride + 1


def default_config() -> LaunchConfig:
    """16 x 16 regions x 16 primary channels, 8 warps: 113-172 registers and no spills at
    GhostNetV3's stride-2 blocks (sm_90, fp16, both formats); 32 channels took 183-255 registers
    and spilled 112-120 bytes. Not yet timed on a GPU."""
    return LaunchConfig()


def forward(x, w_primary, b_primary, w_cheap, b_cheap, w_dw, b_dw, kernel_size: int, stride: int,
            relu_primary: bool, relu_cheap: bool, relu_dw: bool, out_channels: int,
            input_scale=None, gate=None, config: LaunchConfig | None = None):
    """Kernel contract of ``ghostkernels.ops.ghost_conv_depthwise``; ``config`` (tests, sweeps)
    picks the tiling."""
    B, Cin, H, W = x.shape
    C1 = w_primary.shape[0]
    cfg = config or default_config()
    tile_h = output_tile(cfg.region_h, kernel_size, stride)
    tile_w = output_tile(cfg.region_w, kernel_size, stride)
    if min(tile_h, tile_w) < 1:
        raise ValueError(f"config regions {cfg.region_h}x{cfg.region_w} are too small for a "
                         f"{kernel_size}x{kernel_size} depthwise conv: need >= {kernel_size + 2}")
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    fmt = torch.contiguous_format if x.is_contiguous() else torch.channels_last
    y = torch.empty((B, out_channels, Ho, Wo), dtype=x.dtype, device=x.device,
                    memory_format=fmt)
    for name, t in (("x", x), ("y", y), ("gate", gate)):
        if t is not None and t[0].numel() >= 2**31:
            raise ValueError(f"the Triton kernel indexes within one image in int32: each image of "
                             f"{name} must have fewer than 2**31 elements, got {tuple(t.shape)}")
    tiles_h, tiles_w = triton.cdiv(Ho, tile_h), triton.cdiv(Wo, tile_w)
    chan_blocks = triton.cdiv(C1, cfg.block_c)
    work_items = B * tiles_h * tiles_w * chan_blocks
    programs = min(work_items, cfg.programs_per_sm * num_sms(x.device))
    scratch = torch.empty(programs * 2 * cfg.region_h * cfg.region_w * cfg.block_c,
                          dtype=torch.float32, device=x.device)
    Hg, Wg = gate.shape[-2:] if gate is not None else (1, 1)
    _ghost_depthwise_kernel[(programs,)](
        x, w_primary, b_primary, w_cheap, b_cheap, w_dw, b_dw, y, scratch,
        y if input_scale is None else input_scale,  # absent extras: unused placeholders
        y if gate is None else gate,
        Cin, C1, out_channels, H, W, Ho, Wo, Hg, Wg, *x.stride(), *y.stride(),
        *(gate.stride() if gate is not None else (0,) * 4),
        tiles_w, tiles_h, chan_blocks, work_items,
        RELU_P=bool(relu_primary), RELU_C=bool(relu_cheap), RELU_DW=bool(relu_dw),
        HAS_SCALE=input_scale is not None,
        SPLIT_SCALED_W=input_scale is not None and x.dtype != torch.float32,
        HAS_GATE=gate is not None, K=int(kernel_size), STRIDE=int(stride),
        REGION_H=cfg.region_h, REGION_W=cfg.region_w, TILE_H=tile_h, TILE_W=tile_w,
        OUT_PIXELS=triton.next_power_of_2(tile_h * tile_w), BLOCK_C=cfg.block_c,
        BLOCK_K=cfg.block_k, X_ALIGN=pixel_alignment(x), Y_ALIGN=pixel_alignment(y),
        G_ALIGN=pixel_alignment(gate) if gate is not None else 1,
        CIN_ALIGN=common_alignment(Cin), COUT_ALIGN=common_alignment(C1, out_channels),
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        UPCAST_DOT=x.dtype == torch.bfloat16 and x.device.type == "cpu",
        num_warps=cfg.num_warps)
    return y
