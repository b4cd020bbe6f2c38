"""Multi-scale deformable attention in Triton (forward and backward).

Implements the kernel contract of ``ghostkernels.ops.ms_deform_attn`` with the semantics of the
grid_sample reference: pixel coordinate ``loc * size - 0.5`` (align_corners=False), bilinear
interpolation of the four neighbouring pixels, a corner outside the map reads as zero.

Mapping (both kernels): one program per (image n, block of BLOCK_Q queries, head m), image-major
so consecutive programs share one image's value rows in L2. A program holds a
``[BLOCK_Q, BLOCK_D]`` tile (queries x channels of the head), loops over the levels (runtime L,
level shapes read from the int64 tensors on the device: no host sync) and the points (P is a
constexpr, unrolled). The forward unrolls the levels too (L constexpr: at most 5 variants), so
the loads of every level's shape, locations and corners can be in flight together; with a
runtime level loop, a batch-1 launch (a few programs per SM) waited for one level's dependent
loads (shape, then location, then corners) before starting the next. Per (query, point) the
location, floor, fractions, corner weights and in-bounds masks are computed once as ``[BLOCK_Q]``
vectors; the four corners are gathered as ``[BLOCK_Q, BLOCK_D]`` tiles with masks; everything
accumulates in float32.

- forward: ``acc += attn * bilinear(value)``; stored once in value's dtype. D wider than
  ``BLOCK_D`` is split over extra programs (no reduction over D is needed).
- backward: ``grad_value`` gets ``attn * corner_weight * grad_out`` through ``tl.atomic_add``
  into a float32 buffer (many queries hit the same pixel). ``grad_attention_weights`` and
  ``grad_sampling_locations`` are sums over D, reduced inside the program with ``tl.sum`` (the
  program loops over D in chunks of ``BLOCK_D``) and stored without atomics, since each
  (query, head, level, point) belongs to exactly one program.

Softmax fusion (``softmax=True``, attention_weights hold logits; constexpr SOFTMAX): before the
sampling loop each program makes one pass over the ``L*P`` logits of its queries (online max and
sum of exponentials, float32) and then uses ``exp(logit - max) / sum`` as the weight. The backward
first stores ``g = d out / d weight`` per point (as without softmax), accumulating
``sum_k w_k g_k`` in registers; after a ``tl.debug_barrier()`` (the stored ``g``'s are read back by
other threads of the program) a second pass overwrites them with ``w * (g - sum_k w_k g_k)``.

Deterministic grad_value (a ``fixed_point_scale`` tensor; constexpr FIXED_POINT): each contribution
becomes ``int64(trunc(float64(contribution) * scale))`` and is added with an int64
``tl.atomic_add``: integer addition is associative, so the sum does not depend on the order in
which programs run. The launcher divides the int64 sums by the scale (float64) at the end.
With both flags off the kernels are the plain fast path (the flags are compile-time constants).

Flat offsets are int64 (the program id is widened first), so no tensor size overflows int32
arithmetic, and there is no batch chunking or divisibility rule. Block sizes come from D (next
power of two, masked) and shrink BLOCK_Q until the grid covers the GPU for small N * Lq.

Border behaviour is that of grid_sample, including gradients: a point at ``h == -1`` exactly
contributes zero but still has a location gradient through its in-map corner (as in
``torch.nn.functional.grid_sample``); points further out contribute nothing and get zero grads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ghostkernels.triton.device import num_sms as _num_sms

MAX_BLOCK_Q = 64
MIN_BLOCK_Q = 4
MAX_BLOCK_D = 128
# Elements of the [BLOCK_Q, BLOCK_D] tile, and per thread: compiled for sm_90 (Triton 3.8,
# cuobjdump), both kernels spill registers above 4 tile elements per thread (e.g. the forward at
# [64, 32] with 4 warps: 512 B of stack; the backward at [32, 32] with 4 warps: 568 B) and use
# no stack at 4 ([32, 32] with 8 warps: 114 / 251 registers).
FORWARD_TILE = 1024
BACKWARD_TILE = 1024
ELEMENTS_PER_THREAD = 4


@dataclass(frozen=True)
class LaunchConfig:
    block_q: int
    block_d: int
    num_warps: int


def launch_config(N: int, Lq: int, M: int, D: int, num_sms: int, tile: int) -> LaunchConfig:
    """Block sizes for ``N`` images x ``Lq`` queries x ``M`` heads of ``D`` channels.

    BLOCK_D: next power of two of D, at most MAX_BLOCK_D. BLOCK_Q fills a ``tile``-element tile,
    never exceeds the (power-of-two rounded) query count, and is halved (down to MIN_BLOCK_Q)
    while the grid has fewer than two programs per SM.
    """
    block_d = min(triton.next_power_of_2(max(D, 1)), MAX_BLOCK_D)
    block_q = max(1, min(MAX_BLOCK_Q, tile // block_d, triton.next_power_of_2(max(Lq, 1))))
    d_blocks = triton.cdiv(D, block_d)
    while block_q > MIN_BLOCK_Q and N * M * d_blocks * triton.cdiv(Lq, block_q) < 2 * num_sms:
        block_q //= 2
    num_warps = max(1, min(8, block_q * block_d // (32 * ELEMENTS_PER_THREAD)))
    return LaunchConfig(block_q, block_d, num_warps)


# --------------------------------------------------------------------------------------------
# Shared device helpers


@triton.jit
def _load_point(loc_ptr, attn_ptr, point, q_mask, H, W):
    """Location and weight of one point for each query of the block, as bilinear set-up:
    (row/column of the top-left corner, fractions, in-map masks of the corner rows/columns,
    attention weight)."""
    x = tl.load(loc_ptr + 2 * point, mask=q_mask, other=0.0)
    y = tl.load(loc_ptr + 2 * point + 1, mask=q_mask, other=0.0)
    a = tl.load(attn_ptr + point, mask=q_mask, other=0.0).to(tl.float32)
    Hf = H.to(tl.float32)
    Wf = W.to(tl.float32)
    px = x * Wf - 0.5
    py = y * Hf - 0.5
    # A point outside the map samples nothing. One at +-inf or NaN (failing every comparison)
    # would get NaN fractions (inf - floor(inf)) and NaN * 0 from its masked corners: every such
    # point moves to pixel (-2, -2), where all four corners are outside, as in the other backends.
    inside = (px >= -1.0) & (px < Wf) & (py >= -1.0) & (py < Hf)
    px = tl.where(inside, px, -2.0)
    py = tl.where(inside, py, -2.0)
    x0f = tl.floor(px)
    y0f = tl.floor(py)
    fx = px - x0f
    fy = py - y0f
    # Bounds are tested in float, so huge or non-finite locations never reach the int cast.
    x0_in = q_mask & (x0f >= 0.0) & (x0f <= Wf - 1.0)
    x1_in = q_mask & (x0f >= -1.0) & (x0f <= Wf - 2.0)
    y0_in = q_mask & (y0f >= 0.0) & (y0f <= Hf - 1.0)
    y1_in = q_mask & (y0f >= -1.0) & (y0f <= Hf - 2.0)
    x0 = tl.where(x0_in | x1_in, x0f, 0.0).to(tl.int64)
    y0 = tl.where(y0_in | y1_in, y0f, 0.0).to(tl.int64)
    return x0, y0, fx, fy, x0_in, x1_in, y0_in, y1_in, a


@triton.jit
def _softmax_stats(attn_ptr, query_head, q_mask, L, P: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Max and 1/sum(exp(logit - max)) over the L*P logits of each query of the block: one online
    pass (the running sum is rescaled when the max grows). The max starts at the lowest finite
    float32, so -inf logits get weight 0 without producing NaN (all -inf: NaN, as torch)."""
    row_max = tl.full([BLOCK_Q], -3.4028234663852886e38, tl.float32)
    total = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for lvl in range(L):
        for p in tl.static_range(P):
            logit = tl.load(attn_ptr + (query_head * L + lvl) * P + p, mask=q_mask,
                            other=0.0).to(tl.float32)
            new_max = tl.maximum(row_max, logit)
            total = total * tl.exp(row_max - new_max) + tl.exp(logit - new_max)
            row_max = new_max
    return row_max, 1.0 / total


@triton.jit
def _accumulate_grad_value(ptr, contribution, mask, scale, FIXED_POINT: tl.constexpr):
    """grad_value[ptr] += contribution: a float atomic, or the fixed-point int64 one."""
    if FIXED_POINT:
        fixed = (contribution.to(tl.float64) * scale).to(tl.int64)
        tl.atomic_add(ptr, fixed, mask=mask, sem="relaxed")
    else:
        tl.atomic_add(ptr, contribution, mask=mask, sem="relaxed")


@triton.jit
def _value_offsets(row, m, M, D, d):
    """Element offsets of channels ``d`` of head ``m`` at value rows ``row`` ([BLOCK_Q])."""
    return (row * M + m)[:, None] * D + d[None, :]


# --------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _ms_deform_attn_fwd_kernel(
        value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
        S, M, D, Lq, num_q_blocks, num_d_blocks, L: tl.constexpr,
        P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, SOFTMAX: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    d_block = pid % num_d_blocks
    rest = pid // num_d_blocks
    m = rest % M
    rest = rest // M
    q_block = rest % num_q_blocks
    n = rest // num_q_blocks

    q = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    q_mask = q < Lq
    d_mask = d < D
    query_head = (n * Lq + q) * M + m  # index into [N, Lq, M]

    if SOFTMAX:
        row_max, inv_sum = _softmax_stats(attn_ptr, query_head, q_mask, L, P, BLOCK_Q)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for lvl in tl.static_range(L):
        H = tl.load(shapes_ptr + 2 * lvl)
        W = tl.load(shapes_ptr + 2 * lvl + 1)
        row_base = n * S + tl.load(starts_ptr + lvl)
        for p in tl.static_range(P):
            point = (query_head * L + lvl) * P + p
            x0, y0, fx, fy, x0_in, x1_in, y0_in, y1_in, a = _load_point(
                loc_ptr, attn_ptr, point, q_mask, H, W)
            if SOFTMAX:
                a = tl.exp(a - row_max) * inv_sum
            row00 = row_base + y0 * W + x0
            v00 = tl.load(value_ptr + _value_offsets(row00, m, M, D, d),
                          mask=(y0_in & x0_in)[:, None] & d_mask[None, :], other=0.0)
            v01 = tl.load(value_ptr + _value_offsets(row00 + 1, m, M, D, d),
                          mask=(y0_in & x1_in)[:, None] & d_mask[None, :], other=0.0)
            v10 = tl.load(value_ptr + _value_offsets(row00 + W, m, M, D, d),
                          mask=(y1_in & x0_in)[:, None] & d_mask[None, :], other=0.0)
            v11 = tl.load(value_ptr + _value_offsets(row00 + W + 1, m, M, D, d),
                          mask=(y1_in & x1_in)[:, None] & d_mask[None, :], other=0.0)
            gx = 1.0 - fx
            gy = 1.0 - fy
            acc += (a * gy * gx)[:, None] * v00.to(tl.float32)
            acc += (a * gy * fx)[:, None] * v01.to(tl.float32)
            acc += (a * fy * gx)[:, None] * v10.to(tl.float32)
            acc += (a * fy * fx)[:, None] * v11.to(tl.float32)

    out_offsets = query_head[:, None] * D + d[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty),
             mask=q_mask[:, None] & d_mask[None, :])


@triton.jit
def _ms_deform_attn_bwd_kernel(
        grad_out_ptr, value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr,
        grad_value_ptr, grad_loc_ptr, grad_attn_ptr, scale_ptr,
        S, M, D, Lq, L, num_q_blocks,
        P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, SOFTMAX: tl.constexpr,
        FIXED_POINT: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    m = pid % M
    rest = pid // M
    q_block = rest % num_q_blocks
    n = rest // num_q_blocks

    q = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < Lq
    query_head = (n * Lq + q) * M + m
    if SOFTMAX:
        row_max, inv_sum = _softmax_stats(attn_ptr, query_head, q_mask, L, P, BLOCK_Q)
        weighted_grad = tl.zeros([BLOCK_Q], dtype=tl.float32)  # sum_k w_k g_k
    if FIXED_POINT:
        scale = tl.load(scale_ptr)
    else:
        scale = 1.0

    for lvl in range(L):
        H = tl.load(shapes_ptr + 2 * lvl)
        W = tl.load(shapes_ptr + 2 * lvl + 1)
        row_base = n * S + tl.load(starts_ptr + lvl)
        for p in tl.static_range(P):
            point = (query_head * L + lvl) * P + p
            x0, y0, fx, fy, x0_in, x1_in, y0_in, y1_in, a = _load_point(
                loc_ptr, attn_ptr, point, q_mask, H, W)
            if SOFTMAX:
                a = tl.exp(a - row_max) * inv_sum
            gx = 1.0 - fx
            gy = 1.0 - fy
            row00 = row_base + y0 * W + x0
            in00 = (y0_in & x0_in)[:, None]
            in01 = (y0_in & x1_in)[:, None]
            in10 = (y1_in & x0_in)[:, None]
            in11 = (y1_in & x1_in)[:, None]
            grad_a = tl.zeros([BLOCK_Q], dtype=tl.float32)  # d out / d attn, summed over D
            grad_px = tl.zeros([BLOCK_Q], dtype=tl.float32)  # d sample / d pixel x, same
            grad_py = tl.zeros([BLOCK_Q], dtype=tl.float32)
            for d_start in range(0, D, BLOCK_D):
                d = d_start + tl.arange(0, BLOCK_D)
                d_mask = (d < D)[None, :]
                go = tl.load(grad_out_ptr + query_head[:, None] * D + d[None, :],
                             mask=q_mask[:, None] & d_mask, other=0.0).to(tl.float32)
                off00 = _value_offsets(row00, m, M, D, d)
                off01 = _value_offsets(row00 + 1, m, M, D, d)
                off10 = _value_offsets(row00 + W, m, M, D, d)
                off11 = _value_offsets(row00 + W + 1, m, M, D, d)
                v00 = tl.load(value_ptr + off00, mask=in00 & d_mask, other=0.0).to(tl.float32)
                v01 = tl.load(value_ptr + off01, mask=in01 & d_mask, other=0.0).to(tl.float32)
                v10 = tl.load(value_ptr + off10, mask=in10 & d_mask, other=0.0).to(tl.float32)
                v11 = tl.load(value_ptr + off11, mask=in11 & d_mask, other=0.0).to(tl.float32)
                sample = ((gy * gx)[:, None] * v00 + (gy * fx)[:, None] * v01
                          + (fy * gx)[:, None] * v10 + (fy * fx)[:, None] * v11)
                grad_a += tl.sum(go * sample, axis=1)
                dx = gy[:, None] * (v01 - v00) + fy[:, None] * (v11 - v10)
                dy = gx[:, None] * (v10 - v00) + fx[:, None] * (v11 - v01)
                grad_px += tl.sum(go * dx, axis=1)
                grad_py += tl.sum(go * dy, axis=1)
                go_a = go * a[:, None]
                _accumulate_grad_value(grad_value_ptr + off00, go_a * (gy * gx)[:, None],
                                       in00 & d_mask, scale, FIXED_POINT)
                _accumulate_grad_value(grad_value_ptr + off01, go_a * (gy * fx)[:, None],
                                       in01 & d_mask, scale, FIXED_POINT)
                _accumulate_grad_value(grad_value_ptr + off10, go_a * (fy * gx)[:, None],
                                       in10 & d_mask, scale, FIXED_POINT)
                _accumulate_grad_value(grad_value_ptr + off11, go_a * (fy * fx)[:, None],
                                       in11 & d_mask, scale, FIXED_POINT)
            tl.store(grad_attn_ptr + point, grad_a, mask=q_mask)
            if SOFTMAX:
                weighted_grad += a * grad_a
            # pixel x = loc_x * W - 0.5, so d/d loc_x = W * d/d pixel x (same for y with H).
            tl.store(grad_loc_ptr + 2 * point, grad_px * a * W.to(tl.float32), mask=q_mask)
            tl.store(grad_loc_ptr + 2 * point + 1, grad_py * a * H.to(tl.float32), mask=q_mask)

    if SOFTMAX:
        # Softmax backward: d logit_k = w_k * (g_k - sum_j w_j g_j). The g's stored above are
        # read back, possibly by other threads of this program: the barrier orders the two.
        tl.debug_barrier()
        for lvl in range(L):
            for p in tl.static_range(P):
                point = (query_head * L + lvl) * P + p
                g = tl.load(grad_attn_ptr + point, mask=q_mask, other=0.0)
                logit = tl.load(attn_ptr + point, mask=q_mask, other=0.0).to(tl.float32)
                w = tl.exp(logit - row_max) * inv_sum
                tl.store(grad_attn_ptr + point, w * (g - weighted_grad), mask=q_mask)


# --------------------------------------------------------------------------------------------
# Launchers (the kernel contract of ghostkernels.ops.ms_deform_attn)


def _launch_forward(value, spatial_shapes, level_start_index, sampling_locations,
                    attention_weights, config: LaunchConfig, softmax: bool = False):
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    out = value.new_empty(N, Lq, M * D)
    num_q_blocks = triton.cdiv(Lq, config.block_q)
    num_d_blocks = triton.cdiv(D, config.block_d)
    grid = (N * num_q_blocks * M * num_d_blocks,)
    _ms_deform_attn_fwd_kernel[grid](
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, out,
        S, M, D, Lq, num_q_blocks, num_d_blocks, L=L,
        P=P, BLOCK_Q=config.block_q, BLOCK_D=config.block_d, SOFTMAX=softmax,
        num_warps=config.num_warps)
    return out


def _launch_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                     attention_weights, config: LaunchConfig, softmax: bool = False,
                     fixed_point_scale: torch.Tensor | None = None):
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    fixed_point = fixed_point_scale is not None
    grad_value = torch.zeros(value.shape, dtype=torch.int64 if fixed_point else torch.float32,
                             device=value.device)
    grad_loc = torch.empty(sampling_locations.shape, dtype=torch.float32, device=value.device)
    grad_attn = torch.empty(attention_weights.shape, dtype=torch.float32, device=value.device)
    num_q_blocks = triton.cdiv(Lq, config.block_q)
    grid = (N * num_q_blocks * M,)
    _ms_deform_attn_bwd_kernel[grid](
        grad_output, value, spatial_shapes, level_start_index, sampling_locations,
        attention_weights, grad_value, grad_loc, grad_attn, fixed_point_scale,
        S, M, D, Lq, L, num_q_blocks,
        P=P, BLOCK_Q=config.block_q, BLOCK_D=config.block_d, SOFTMAX=softmax,
        FIXED_POINT=fixed_point, num_warps=config.num_warps)
    if fixed_point:  # int64 sums back to float: exact division by a power of two, in float64
        grad_value = (grad_value.to(torch.float64) / fixed_point_scale).to(torch.float32)
    return grad_value, grad_loc, grad_attn


def forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            softmax=False):
    """-> ``[N, Lq, M*D]`` in value's dtype (inputs as in the op module's kernel contract)."""
    N, _, M, D = value.shape
    Lq = sampling_locations.shape[1]
    config = launch_config(N, Lq, M, D, _num_sms(value.device), FORWARD_TILE)
    return _launch_forward(value, spatial_shapes, level_start_index, sampling_locations,
                           attention_weights, config, softmax)


def backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
             attention_weights, softmax=False, fixed_point_scale=None):
    """-> (grad_value, grad_sampling_locations, grad_attention_weights), all float32; the third
    w.r.t. the logits when ``softmax``. ``fixed_point_scale`` (0-d float64 on the device):
    deterministic grad_value (see the module docstring)."""
    N, _, M, D = value.shape
    Lq = sampling_locations.shape[1]
    config = launch_config(N, Lq, M, D, _num_sms(value.device), BACKWARD_TILE)
    return _launch_backward(grad_output, value, spatial_shapes, level_start_index,
                            sampling_locations, attention_weights, config, softmax,
                            fixed_point_scale)
