"""Triton kernels of the DFC attention gate: ``sigmoid(dw5x1(dw1x5(conv1x1(avgpool2x2(x)))))``
at the pooled resolution (kernel contract in ``ghostkernels.ops.dfc_gate``). Two launches:

1. ``_pool_project_kernel``: one program owns ``BLOCK_P`` pooled pixels x ``BLOCK_C`` output
   channels of one image. It loops over Cin in ``BLOCK_K`` chunks, reads the four x values of each
   2x2 window, averages them in fp32 as it loads (the pooled map is never written) and accumulates
   the 1x1 conv with ``tl.dot`` in IEEE fp32; adds the bias and writes P [B, C, Hp, Wp] in fp32
   (the intermediate keeps full precision for half inputs: one rounding at the end).
2. ``_stencil_sigmoid_kernel``: one program owns ``BLOCK_P`` pixels x ``BLOCK_C`` channels of P.
   For each of the five rows the 5x1 reads, it recomputes the 1x5 result of that row (five
   column-masked loads of P + the 1x5 bias), zeroes it where the row lies outside the map (the
   5x1 pads the 1x5 *result* with zeros, not with its bias), and accumulates it times the 5x1 tap;
   then the 5x1 bias and the sigmoid, stored in x's dtype. The 25 reads per output hit L1/L2
   (P is small: a quarter of one channel's worth of x per channel).

Both memory formats go through strides (Triton specialises stride-1 arguments, so the loads
vectorise along whichever dim is contiguous). Offsets within one image are int32; the launcher
rejects images of 2**31 elements or more, and image offsets are computed in int64.
"""
import torch
import triton
import triton.language as tl

from ghostkernels.triton.alignment import aligned, common_alignment, pixel_alignment


@triton.jit
def _tile(pix_blocks, chan_blocks, NP, Wp, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's image, pooled pixels (row, column, in-map mask) and channels (and mask);
    the channel block varies fastest, so neighbouring programs read the same input tile."""
    pid = tl.program_id(0)
    cb = pid % chan_blocks
    pb = (pid // chan_blocks) % pix_blocks
    b = pid // (chan_blocks * pix_blocks)
    pix = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    chans = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    return b, pix // Wp, pix % Wp, pix < NP, chans, chans < C


@triton.jit
def _pool_project_kernel(x_ptr, w_ptr, b_ptr, p_ptr, Cin, C, Wp, NP,
                         sxb, sxc, sxh, sxw, spb, spc, sph, spw, pix_blocks, chan_blocks,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                         CIN_ALIGN: tl.constexpr, C_ALIGN: tl.constexpr, X_ALIGN: tl.constexpr,
                         P_ALIGN: tl.constexpr):
    # vector loads and stores along the channels with channel counts and pixel strides that are
    # not multiples of 16 (ghostkernels.triton.alignment)
    Cin, C = aligned(Cin, CIN_ALIGN), aligned(C, C_ALIGN)
    sxb, sxh, sxw = aligned(sxb, X_ALIGN), aligned(sxh, X_ALIGN), aligned(sxw, X_ALIGN)
    spb, sph, spw = aligned(spb, P_ALIGN), aligned(sph, P_ALIGN), aligned(spw, P_ALIGN)
    b, ph, pw, pix_ok, chans, chan_ok = _tile(pix_blocks, chan_blocks, NP, Wp, C, BLOCK_P,
                                              BLOCK_C)

    window = x_ptr + b.to(tl.int64) * sxb + (2 * ph * sxh + 2 * pw * sxw)[:, None]
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for k0 in range(0, Cin, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < Cin
        at = window + ks[None, :] * sxc
        m = pix_ok[:, None] & k_ok[None, :]
        s = tl.load(at, mask=m, other=0.0).to(tl.float32)
        s += tl.load(at + sxw, mask=m, other=0.0).to(tl.float32)
        s += tl.load(at + sxh, mask=m, other=0.0).to(tl.float32)
        s += tl.load(at + sxh + sxw, mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + chans[None, :] * Cin + ks[:, None],
                    mask=k_ok[:, None] & chan_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_C]
        acc = tl.dot(s * 0.25, w.to(tl.float32), acc, input_precision="ieee")
    acc += tl.load(b_ptr + chans, mask=chan_ok, other=0.0).to(tl.float32)[None, :]
    out = p_ptr + b.to(tl.int64) * spb + (ph * sph + pw * spw)[:, None] + chans[None, :] * spc
    tl.store(out, acc, mask=pix_ok[:, None] & chan_ok[None, :])


@triton.jit
def _stencil_sigmoid_kernel(p_ptr, wh_ptr, bh_ptr, wv_ptr, bv_ptr, g_ptr, C, Hp, Wp, NP,
                            spb, spc, sph, spw, sgb, sgc, sgh, sgw, pix_blocks, chan_blocks,
                            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, TAPS: tl.constexpr,
                            C_ALIGN: tl.constexpr, P_ALIGN: tl.constexpr, G_ALIGN: tl.constexpr):
    C = aligned(C, C_ALIGN)  # alignment facts, as in _pool_project_kernel
    spb, sph, spw = aligned(spb, P_ALIGN), aligned(sph, P_ALIGN), aligned(spw, P_ALIGN)
    sgb, sgh, sgw = aligned(sgb, G_ALIGN), aligned(sgh, G_ALIGN), aligned(sgw, G_ALIGN)
    b, ph, pw, pix_ok, chans, chan_ok = _tile(pix_blocks, chan_blocks, NP, Wp, C, BLOCK_P,
                                              BLOCK_C)

    p_img = p_ptr + b.to(tl.int64) * spb + chans[None, :] * spc
    b_h = tl.load(bh_ptr + chans, mask=chan_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc += tl.load(bv_ptr + chans, mask=chan_ok, other=0.0).to(tl.float32)[None, :]
    for i in tl.static_range(TAPS):
        r = ph + (i - TAPS // 2)
        row_ok = pix_ok & (r >= 0) & (r < Hp)
        across = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32) + b_h[None, :]
        for j in tl.static_range(TAPS):
            c = pw + (j - TAPS // 2)
            ok = row_ok & (c >= 0) & (c < Wp)
            v = tl.load(p_img + (r * sph + c * spw)[:, None], mask=ok[:, None] & chan_ok[None, :],
                        other=0.0)
            tap = tl.load(wh_ptr + chans * TAPS + j, mask=chan_ok, other=0.0).to(tl.float32)
            across += v * tap[None, :]
        across = tl.where(row_ok[:, None], across, 0.0)  # the 5x1 zero-pads the 1x5 result
        tap = tl.load(wv_ptr + chans * TAPS + i, mask=chan_ok, other=0.0).to(tl.float32)
        acc += across * tap[None, :]
    gate = 1.0 / (1.0 + tl.exp(-acc))
    out = g_ptr + b.to(tl.int64) * sgb + (ph * sgh + pw * sgw)[:, None] + chans[None, :] * sgc
    tl.store(out, gate.to(g_ptr.dtype.element_ty), mask=pix_ok[:, None] & chan_ok[None, :])


def _pow2_between(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def forward(x, w_proj, b_proj, w_h, b_h, w_v, b_v, out=None):
    """Kernel contract of ``ghostkernels.ops.dfc_gate``. ``out`` (optional, for tests) is a
    preallocated gate of the right shape, dtype and memory format."""
    B, Cin, H, W = x.shape
    C = w_proj.shape[0]
    Hp, Wp = H // 2, W // 2
    channels_last = not x.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gate = out if out is not None else torch.empty((B, C, Hp, Wp), dtype=x.dtype,
                                                   device=x.device, memory_format=fmt)
    projected = torch.empty((B, C, Hp, Wp), dtype=torch.float32, device=x.device,
                            memory_format=fmt)
    if max(x[0].numel(), projected[0].numel()) >= 2**31:
        raise ValueError("the Triton kernels index within one image in int32: each image of x and "
                         f"of the gate must have fewer than 2**31 elements, got x "
                         f"{tuple(x.shape)}, gate {tuple(gate.shape)}")
    NP = Hp * Wp
    # Pool + 1x1: tl.dot needs every tile dim >= 16; 64 pixels x 32 channels x 32-wide Cin
    # chunks (fp32 operands). Not tuned on a GPU.
    block_p = _pow2_between(NP, 16, 64)
    block_c = _pow2_between(C, 16, 32)
    block_k = _pow2_between(Cin, 16, 32)
    pix_blocks, chan_blocks = triton.cdiv(NP, block_p), triton.cdiv(C, block_c)
    _pool_project_kernel[(B * pix_blocks * chan_blocks,)](
        x, w_proj, b_proj, projected, Cin, C, Wp, NP, *x.stride(), *projected.stride(),
        pix_blocks, chan_blocks, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_K=block_k,
        CIN_ALIGN=common_alignment(Cin), C_ALIGN=common_alignment(C), X_ALIGN=pixel_alignment(x),
        P_ALIGN=pixel_alignment(projected), num_warps=4)
    # Stencil: at most 512 tile elements (4 per thread): compiled for sm_90, 1024-element tiles
    # use 255 registers and spill (the 25 loads are hoisted). Wide along whichever dim is
    # contiguous.
    stencil_c = _pow2_between(C, 1, 32 if channels_last else 8)
    stencil_p = _pow2_between(NP, 1, max(1, 512 // stencil_c))
    pix_blocks, chan_blocks = triton.cdiv(NP, stencil_p), triton.cdiv(C, stencil_c)
    _stencil_sigmoid_kernel[(B * pix_blocks * chan_blocks,)](
        projected, w_h, b_h, w_v, b_v, gate, C, Hp, Wp, NP, *projected.stride(), *gate.stride(),
        pix_blocks, chan_blocks, BLOCK_P=stencil_p, BLOCK_C=stencil_c, TAPS=w_h.shape[1],
        C_ALIGN=common_alignment(C), P_ALIGN=pixel_alignment(projected),
        G_ALIGN=pixel_alignment(gate), num_warps=4)
    return gate
