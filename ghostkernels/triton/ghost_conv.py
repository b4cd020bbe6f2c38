"""Triton kernels of the folded Ghost op: ``y = cat(x1, x2)[:, :out_channels]`` in one pass, with
the optional input scale, gate and residual of ``ghostkernels.ops.ghost_conv`` fused in.

``forward`` (the backend entry point) launches the halo-tile kernel of ``ghost_conv_halo`` by
default; this module's row kernel, described below, runs when a ``GhostLaunchConfig`` is passed
(it was the default until the halo kernel; kept as a measured alternative for the sweeps).

One program owns a strip of ``BLOCK_H`` image rows x ``BLOCK_W`` columns x ``BLOCK_C`` primary
channels of one image. It walks down the strip keeping a rolling window of three rows of x1 in
registers (row above, current row, row below). Each x1 row is the 1x1 conv (``tl.dot`` over Cin in
``BLOCK_K`` chunks, fp32 accumulation) plus bias and activation, set to zero outside the image (the
depthwise conv zero-pads x1, not x). For the current row the program writes x1 to channels
``[0, C1)`` of y and the depthwise 3x3 + bias + activation of those channels to ``[C1,
out_channels)``. x1 is never written anywhere else and nothing is concatenated.

Trade-off: Triton has no cheap way to shift a register tile sideways by one column, so each x1 row
is computed at three column offsets (cols-1, cols, cols+1) from three shifted loads of x that share
the weight chunk. That costs 3 x (BLOCK_H + 2) / BLOCK_H = 3.75x the 1x1 FLOPs (BLOCK_H = 8) but
no shared-memory round trip and no recomputation of rows; the 1x1 stays cheap next to the memory
traffic for GhostNet's channel counts (see spec kernels.md 8.3), and the extra x loads hit L1/L2.
The alternative, recomputing the 1x1 at all 9 taps, would cost 9x; a shared-memory tile (the CUDA
kernel's choice) costs 1.27x at 16x16 but is not expressible in Triton without a global scratch.

Fused extras (each a constexpr switch, so the plain op compiles to the same code as before): the
input scale ``s[b, k]`` multiplies the 1x1 weight chunk's rows (``W1 diag(s_b)``: one multiply per
weight instead of three per x tile). For fp16/bf16 the scaled weight is split into its rounding to
the input type plus the remainder, and both go through the tensor-core dot (``SPLIT_SCALED_W``:
twice the 1x1 dots, only when scaling), so the products keep ~16 bits instead of 8 (bf16): a
single rounding of w * s would move pre-activations by ~1e-3 relative and flip ReLU masks near
zero. The gate and residual are applied to each row as it is stored (gate row ``(r * Hg) // H``,
columns ``(cols * Wg) // W``).

Both memory formats go through strides (stride-1 arguments are specialised by Triton, so loads and
stores vectorise along whichever dim is contiguous). float32 uses ``tl.dot`` in IEEE precision (no
TF32) so the float32 result matches the reference to ~1e-6. Under the Triton interpreter (CPU
tensors) ``tl.dot`` mis-computes bfloat16 operands (triton 3.8), so there they are upcast to fp32 first
(``UPCAST_DOT``), which gives the same products; GPU launches keep bf16 tensor-core dots.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ghostkernels.triton.activation import relu
from ghostkernels.triton import ghost_conv_halo as halo
from ghostkernels.triton.ghost_conv_halo import weight_chunk

BLOCK_H = 8


@triton.jit
def _x1_row_three_shifts(x_row_ptr, w_ptr, bias, scale_ptr, r, cols, chans, chan_ok, H, W, Cin,
                         sxc, sxw, RELU: tl.constexpr, HAS_SCALE: tl.constexpr,
                         SPLIT_SCALED_W: tl.constexpr, BLOCK_W: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                         PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """x1 of image row ``r`` at columns cols-1, cols and cols+1: three [BLOCK_W, BLOCK_C] fp32
    tiles, zero where the pixel lies outside the image."""
    row_ok = (r >= 0) & (r < H)
    ok_l = row_ok & (cols >= 1) & (cols <= W)
    ok_m = row_ok & (cols < W)
    ok_r = row_ok & (cols + 1 < W)
    acc_l = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    acc_m = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    pix = x_row_ptr + cols[:, None] * sxw
    for k0 in range(0, Cin, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < Cin
        w, w_rest = weight_chunk(w_ptr, scale_ptr, chans, chan_ok, ks, k_ok, Cin, HAS_SCALE,
                                 SPLIT_SCALED_W, UPCAST_DOT)
        at_k = pix + ks[None, :] * sxc
        x_l = tl.load(at_k - sxw, mask=ok_l[:, None] & k_ok[None, :], other=0.0)
        x_m = tl.load(at_k, mask=ok_m[:, None] & k_ok[None, :], other=0.0)
        x_r = tl.load(at_k + sxw, mask=ok_r[:, None] & k_ok[None, :], other=0.0)
        if UPCAST_DOT:  # exact: products of two bf16 values fit in fp32
            x_l = x_l.to(tl.float32)
            x_m = x_m.to(tl.float32)
            x_r = x_r.to(tl.float32)
        acc_l = tl.dot(x_l, w, acc_l, input_precision=PRECISION)
        acc_m = tl.dot(x_m, w, acc_m, input_precision=PRECISION)
        acc_r = tl.dot(x_r, w, acc_r, input_precision=PRECISION)
        if SPLIT_SCALED_W:
            acc_l = tl.dot(x_l, w_rest, acc_l, input_precision=PRECISION)
            acc_m = tl.dot(x_m, w_rest, acc_m, input_precision=PRECISION)
            acc_r = tl.dot(x_r, w_rest, acc_r, input_precision=PRECISION)
    acc_l += bias[None, :]
    acc_m += bias[None, :]
    acc_r += bias[None, :]
    if RELU:
        acc_l = relu(acc_l)
        acc_m = relu(acc_m)
        acc_r = relu(acc_r)
    return (tl.where(ok_l[:, None], acc_l, 0.0), tl.where(ok_m[:, None], acc_m, 0.0),
            tl.where(ok_r[:, None], acc_r, 0.0))


@triton.jit
def _add_tap_row(acc, left, mid, right, w_cheap_ptr, chans, cheap_ok, TAP_ROW: tl.constexpr):
    """acc + one row of the 3x3 depthwise taps applied to (left, mid, right)."""
    taps = w_cheap_ptr + chans * 9 + TAP_ROW * 3
    w0 = tl.load(taps, mask=cheap_ok, other=0.0).to(tl.float32)
    w1 = tl.load(taps + 1, mask=cheap_ok, other=0.0).to(tl.float32)
    w2 = tl.load(taps + 2, mask=cheap_ok, other=0.0).to(tl.float32)
    return acc + left * w0[None, :] + mid * w1[None, :] + right * w2[None, :]


@triton.jit
def _epilogue(v, r, cols, out_chans, mask, gate_img, sgc, sgh, sgw, Hg, Wg, res_img,
              src, srh, srw, H, W, HAS_GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """v [BLOCK_W, BLOCK_C] (output row r, channels out_chans) times the nearest gate values,
    plus the residual."""
    if HAS_GATE:
        gate_cols = (cols * Wg) // W
        g = tl.load(gate_img + ((r * Hg) // H) * sgh + gate_cols[:, None] * sgw
                    + out_chans[None, :] * sgc, mask=mask, other=0.0)
        v = v * g.to(tl.float32)
    if HAS_RESIDUAL:
        res = tl.load(res_img + r * srh + cols[:, None] * srw + out_chans[None, :] * src,
                      mask=mask, other=0.0)
        v = v + res.to(tl.float32)
    return v


@triton.jit
def _ghost_conv_kernel(x_ptr, w_primary_ptr, b_primary_ptr, w_cheap_ptr, b_cheap_ptr, y_ptr,
                       scale_ptr, gate_ptr, res_ptr,
                       Cin, C1, OUT_C, H, W, Hg, Wg,
                       sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                       sgb, sgc, sgh, sgw, srb, src, srh, srw,
                       tiles_w, strips, chan_blocks,
                       RELU_P: tl.constexpr, RELU_C: tl.constexpr, HAS_SCALE: tl.constexpr,
                       SPLIT_SCALED_W: tl.constexpr, HAS_GATE: tl.constexpr,
                       HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                       PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    # Channel block fastest: neighbouring programs read the same x tile (L2 reuse).
    pid = tl.program_id(0)
    cb = pid % chan_blocks
    tile = pid // chan_blocks
    tw = tile % tiles_w
    strip = (tile // tiles_w) % strips
    b = tile // (tiles_w * strips)
    h0 = strip * BLOCK_H
    cols = tw * BLOCK_W + tl.arange(0, BLOCK_W)
    col_ok = cols < W
    chans = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    chan_ok = chans < C1
    cheap_ok = chan_ok & (C1 + chans < OUT_C)  # cheap channels that survive the slice

    x_img = x_ptr + b.to(tl.int64) * sxb
    y_img = y_ptr + b.to(tl.int64) * syb
    scale_img = scale_ptr + b.to(tl.int64) * Cin  # [B, Cin] contiguous
    gate_img = gate_ptr + b.to(tl.int64) * sgb
    res_img = res_ptr + b.to(tl.int64) * srb
    b_p = tl.load(b_primary_ptr + chans, mask=chan_ok, other=0.0).to(tl.float32)
    b_c = tl.load(b_cheap_ptr + chans, mask=cheap_ok, other=0.0).to(tl.float32)

    up_l, up_m, up_r = _x1_row_three_shifts(
        x_img + (h0 - 1) * sxh, w_primary_ptr, b_p, scale_img, h0 - 1, cols, chans, chan_ok, H,
        W, Cin, sxc, sxw, RELU_P, HAS_SCALE, SPLIT_SCALED_W, BLOCK_W, BLOCK_C, BLOCK_K,
        PRECISION, UPCAST_DOT)
    mid_l, mid_m, mid_r = _x1_row_three_shifts(
        x_img + h0 * sxh, w_primary_ptr, b_p, scale_img, h0, cols, chans, chan_ok, H, W, Cin,
        sxc, sxw, RELU_P, HAS_SCALE, SPLIT_SCALED_W, BLOCK_W, BLOCK_C, BLOCK_K, PRECISION,
        UPCAST_DOT)
    primary_mask = col_ok[:, None] & chan_ok[None, :]
    cheap_mask = col_ok[:, None] & cheap_ok[None, :]
    for i in range(0, BLOCK_H):
        r = h0 + i
        if r < H:
            dn_l, dn_m, dn_r = _x1_row_three_shifts(
                x_img + (r + 1) * sxh, w_primary_ptr, b_p, scale_img, r + 1, cols, chans, chan_ok,
                H, W, Cin, sxc, sxw, RELU_P, HAS_SCALE, SPLIT_SCALED_W, BLOCK_W, BLOCK_C,
                BLOCK_K, PRECISION, UPCAST_DOT)
            y_pix = y_img + r * syh + cols[:, None] * syw
            x1 = _epilogue(mid_m, r, cols, chans, primary_mask, gate_img, sgc, sgh, sgw, Hg, Wg,
                           res_img, src, srh, srw, H, W, HAS_GATE, HAS_RESIDUAL)
            tl.store(y_pix + chans[None, :] * syc, x1.to(y_ptr.dtype.element_ty),
                     mask=primary_mask)
            x2 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32) + b_c[None, :]
            x2 = _add_tap_row(x2, up_l, up_m, up_r, w_cheap_ptr, chans, cheap_ok, 0)
            x2 = _add_tap_row(x2, mid_l, mid_m, mid_r, w_cheap_ptr, chans, cheap_ok, 1)
            x2 = _add_tap_row(x2, dn_l, dn_m, dn_r, w_cheap_ptr, chans, cheap_ok, 2)
            if RELU_C:
                x2 = relu(x2)
            x2 = _epilogue(x2, r, cols, C1 + chans, cheap_mask, gate_img, sgc, sgh, sgw, Hg, Wg,
                           res_img, src, srh, srw, H, W, HAS_GATE, HAS_RESIDUAL)
            tl.store(y_pix + (C1 + chans)[None, :] * syc, x2.to(y_ptr.dtype.element_ty),
                     mask=cheap_mask)
            up_l, up_m, up_r = mid_l, mid_m, mid_r
            mid_l, mid_m, mid_r = dn_l, dn_m, dn_r


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


@dataclass(frozen=True)
class GhostLaunchConfig:
    block_h: int
    block_w: int
    block_c: int
    block_k: int
    num_warps: int


def default_config(W: int, channels_last: bool) -> GhostLaunchConfig:
    """Block sizes. channels_last: 16 columns x 32 channels, 4 warps, the fastest of 16 candidates
    at B32 40->120 @80 fp16 on an H200 (bench/sweep_triton.py, 2026-11-28: 0.165 ms against
    0.322 ms for the previous 32 x 16; BENCHMARKS.md); a channel block of 32 halves the re-reads of
    x across channel blocks. NCHW keeps 32 (or fewer) columns x 16 channels: of the NCHW
    candidates timed, only one was faster (64 columns, 8 warps: 1.2x), too little to switch on."""
    if channels_last:
        return GhostLaunchConfig(block_h=BLOCK_H, block_w=16, block_c=32, block_k=16, num_warps=4)
    return GhostLaunchConfig(block_h=BLOCK_H, block_w=_block(W, 16, 32), block_c=16, block_k=16,
                             num_warps=4)


def forward(x, w_primary, b_primary, w_cheap, b_cheap, relu_primary: bool, relu_cheap: bool,
            out_channels: int, input_scale=None, gate=None, residual=None, out=None,
            config: GhostLaunchConfig | halo.HaloLaunchConfig | None = None):
    """Kernel contract of ``ghostkernels.ops.ghost_conv``. ``out`` (optional, for tests) is a
    preallocated y of the right shape, dtype and memory format; ``config`` picks the kernel and
    its block sizes (benchmark sweeps, tests): a ``HaloLaunchConfig`` (the default, from
    ``halo.default_config``) runs the halo-tile kernel, a ``GhostLaunchConfig`` this module's
    row kernel."""
    B, Cin, H, W = x.shape
    C1 = w_primary.shape[0]
    channels_last = not x.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = out if out is not None else torch.empty((B, out_channels, H, W), dtype=x.dtype,
                                                device=x.device, memory_format=fmt)
    cfg = config or halo.default_config(C1, W, channels_last)
    if max(x[0].numel(), y[0].numel()) >= 2**31:
        raise ValueError("the Triton kernel indexes within one image in int32: each image of x and "
                         f"y must have fewer than 2**31 elements, got x {tuple(x.shape)}, "
                         f"y {tuple(y.shape)}")
    for name, t in (("gate", gate), ("residual", residual)):
        if t is not None and t[0].numel() >= 2**31:
            raise ValueError(f"the Triton kernel indexes within one image in int32: each image of "
                             f"{name} must have fewer than 2**31 elements, got {tuple(t.shape)}")
    if isinstance(cfg, halo.HaloLaunchConfig):
        return halo.launch(x, w_primary, b_primary, w_cheap, b_cheap, y, relu_primary,
                           relu_cheap, out_channels, input_scale, gate, residual, cfg)
    tiles_w = triton.cdiv(W, cfg.block_w)
    strips = triton.cdiv(H, cfg.block_h)
    chan_blocks = triton.cdiv(C1, cfg.block_c)
    Hg, Wg = gate.shape[-2:] if gate is not None else (1, 1)
    grid = (B * strips * tiles_w * chan_blocks,)
    _ghost_conv_kernel[grid](
        x, w_primary, b_primary, w_cheap, b_cheap, y,
        y if input_scale is None else input_scale,  # absent extras: unused placeholders
        y if gate is None else gate, y if residual is None else residual,
        Cin, C1, out_channels, H, W, Hg, Wg,
        *x.stride(), *y.stride(), *(gate.stride() if gate is not None else (0,) * 4),
        *(residual.stride() if residual is not None else (0,) * 4), tiles_w, strips, chan_blocks,
        RELU_P=bool(relu_primary), RELU_C=bool(relu_cheap), HAS_SCALE=input_scale is not None,
        SPLIT_SCALED_W=input_scale is not None and x.dtype != torch.float32,
        HAS_GATE=gate is not None, HAS_RESIDUAL=residual is not None, BLOCK_H=cfg.block_h,
        BLOCK_W=cfg.block_w, BLOCK_C=cfg.block_c, BLOCK_K=cfg.block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        UPCAST_DOT=x.dtype == torch.bfloat16 and x.device.type == "cpu", num_warps=cfg.num_warps)
    return y
