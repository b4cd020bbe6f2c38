"""Every Triton kernel specialisation that the launchers produce compiles for an H100 (sm_90).

CI runs the Triton kernels through the interpreter, which accepts some programs the real compiler
rejects. Here the launchers run with their launches recorded (tests/triton_aot.py), and each
distinct launch is compiled ahead of time for GPUTarget("cuda", 90, 32) in a subprocess without
the interpreter. No GPU is needed; on a GPU machine the GPU tests compile the kernels for real, so
this test is skipped there.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.triton_aot import record_launches

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs the Triton interpreter (CPU-only runs); GPU runs compile the kernels for real")

GPU_ONLY_CONSTEXPRS = {"UPCAST_DOT": False}  # the launcher's CPU-interpreter workaround
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Register spills (stack bytes per thread) tolerated: ptxas spills a few 64-bit values (8-24 B)
# in some specialisations at 64-80 registers (triton 3.6's fp32 softmax MSDA forward, the 5x5
# depthwise kernels); what this guards against are tiles that spill 88-568 B (the depthwise
# channels_last tile at 8 elements per thread, the MSDA tiles before they were capped).
MAX_STACK_BYTES = 32


def _msda_launches():
    from ghostkernels.triton import ms_deform_attn as msda
    shapes = torch.tensor([[6, 5], [3, 3]])
    starts = torch.tensor([0, 30])
    for dtype in DTYPES:
        for D in (32, 24):
            value = torch.randn(1, 39, 2, D).to(dtype)
            loc = torch.rand(1, 7, 2, 2, 4, 2)
            attn = torch.rand(1, 7, 2, 2, 4).to(dtype)
            grad = torch.randn(1, 7, 2 * D).to(dtype)
            scale = torch.tensor(2.0**40, dtype=torch.float64)
            for softmax in (False, True):
                msda.forward(value, shapes, starts, loc, attn, softmax=softmax)
                for fixed_point_scale in (None, scale):
                    msda.backward(grad, value, shapes, starts, loc, attn, softmax=softmax,
                                  fixed_point_scale=fixed_point_scale)


def _conv_inputs():
    """(dtype, memory format, x [2, 12, 9, 11]) for every dtype and both layouts."""
    for dtype in DTYPES:
        for fmt in (torch.contiguous_format, torch.channels_last):
            yield dtype, fmt, torch.randn(2, 12, 9, 11).to(dtype).contiguous(memory_format=fmt)


def _ghost_launches():
    from ghostkernels.triton import ghost_conv
    for dtype, fmt, x in _conv_inputs():
        w1, b1 = torch.randn(8, 12).to(dtype), torch.randn(8).to(dtype)
        wc, bc = torch.randn(8, 9).to(dtype), torch.randn(8).to(dtype)
        gate = torch.rand(2, 16, 5, 6).to(dtype).contiguous(memory_format=fmt)
        residual = torch.randn(2, 16, 9, 11).to(dtype).contiguous(memory_format=fmt)
        # the default (halo) kernel, and the row kernel (an alternative launch: fp16 only, to
        # bound this test's time), plain and with every epilogue
        rows = ghost_conv.GhostLaunchConfig(8, 16, 16, 16, 4)
        for config in (None, rows) if dtype == torch.float16 else (None,):
            ghost_conv.forward(x, w1, b1, wc, bc, True, True, 16, config=config)
            ghost_conv.forward(x, w1, b1, wc, bc, True, False, 16, config=config,
                               input_scale=torch.rand(2, 12).to(dtype), gate=gate,
                               residual=residual)


def _ghost_depthwise_launches():
    from ghostkernels.triton import ghost_conv_depthwise
    for dtype, fmt, x in _conv_inputs():
        w1, b1 = torch.randn(8, 12).to(dtype), torch.randn(8).to(dtype)
        wc, bc = torch.randn(8, 9).to(dtype), torch.randn(8).to(dtype)
        gate = torch.rand(2, 14, 4, 5).to(dtype).contiguous(memory_format=fmt)
        for k, stride in ((3, 2), (5, 1)):
            wd, bd = torch.randn(14, k * k).to(dtype), torch.randn(14).to(dtype)
            ghost_conv_depthwise.forward(x, w1, b1, wc, bc, wd, bd, k, stride, True, True, False,
                                         14, input_scale=torch.rand(2, 12).to(dtype), gate=gate)


def _depthwise_launches():
    from ghostkernels.triton import depthwise_conv
    for dtype, fmt, x in _conv_inputs():
        for k, stride in ((3, 1), (5, 2)):
            w, b = torch.randn(12, k * k).to(dtype), torch.randn(12).to(dtype)
            depthwise_conv.forward(x, w, b, k, k, stride, True)


def _dfc_launches():
    from ghostkernels.triton import dfc_gate
    for dtype, fmt, x in _conv_inputs():
        for C in (20, 70):  # one and several channel blocks
            w_proj, b_proj = torch.randn(C, 12).to(dtype), torch.randn(C).to(dtype)
            w_h, b_h = torch.randn(C, 5).to(dtype), torch.randn(C).to(dtype)
            w_v, b_v = torch.randn(C, 5).to(dtype), torch.randn(C).to(dtype)
            dfc_gate.forward(x, w_proj, b_proj, w_h, b_h, w_v, b_v)
    for fmt in (torch.contiguous_format, torch.channels_last):  # the largest tiles
        x = torch.randn(1, 4, 48, 48).half().contiguous(memory_format=fmt)
        params = [torch.randn(40, *shape).half() for shape in ((4,), (), (5,), (), (5,), ())]
        dfc_gate.forward(x, *params)


# GhostNetV3's SE sizes (C, R = make_divisible(C / 4, 4)), plus tiny and odd ones
SE_SIZES = ((72, 20), (120, 32), (240, 60), (480, 120), (672, 168), (960, 240), (1, 1), (7, 3))


def _se_launches():
    from ghostkernels.triton import se_excitation
    for dtype in DTYPES:
        for C, R in SE_SIZES:
            params = [torch.randn(*shape).to(dtype) for shape in ((R, C), (R,), (C, R), (C,))]
            se_excitation.forward(torch.randn(2, C).to(dtype), *params)


def _rtdetr_decoder_msda_launches(monkeypatch):
    """The MSDA launches of RT-DETR's decoder at batch 32 (fp32 and fp16) as an H100 (132 SMs)
    sizes them."""
    from ghostkernels.triton import ms_deform_attn as msda
    monkeypatch.setattr(msda, "_num_sms", lambda device: 132)
    shapes = torch.tensor([[80, 80], [40, 40], [20, 20]])
    starts = torch.tensor([0, 6400, 8000])
    for dtype in (torch.float32, torch.float16):
        value = torch.empty(32, 8400, 8, 32, dtype=dtype)
        loc, attn = torch.empty(32, 300, 8, 3, 4, 2), torch.empty(32, 300, 8, 3, 4).to(dtype)
        grad = torch.empty(32, 300, 256).to(dtype)
        for softmax in (False, True):
            msda.forward(value, shapes, starts, loc, attn, softmax=softmax)
            msda.backward(grad, value, shapes, starts, loc, attn, softmax=softmax)


def _compile_for_sm90(launches, tmp_path) -> list[dict]:
    unique = {}
    for launch in launches:
        for name, value in GPU_ONLY_CONSTEXPRS.items():
            if name in launch["constexprs"]:
                launch["constexprs"][name] = value
        unique[json.dumps(launch, sort_keys=True)] = launch
    path = tmp_path / "launches.json"
    path.write_text(json.dumps(list(unique.values())))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    proc = subprocess.run([sys.executable, "-m", "tests.triton_aot", str(path)], env=env,
                          capture_output=True, text=True, timeout=900,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(unique), proc.stdout[-2000:] + proc.stderr[-2000:]
    failed = [r for r in results if not r["ok"]]
    assert not failed, "\n\n".join(f"{r['kernel']}: {r['error']}\n{r['trace']}" for r in failed)
    return results


def _compile_with_resources(launches, tmp_path) -> list[dict]:
    """:func:`_compile_for_sm90`, skipping when the registers and stack cannot be read."""
    results = _compile_for_sm90(launches, tmp_path)
    if not all("stack_bytes" in r for r in results):
        pytest.skip("Triton's cuobjdump is not available to read the resource usage")
    return results


def test_msda_kernels_do_not_spill_at_the_rtdetr_decoder_shapes(tmp_path, monkeypatch):
    """A static resource check (not a timing): register spills at the production tile sizes."""
    with record_launches() as launches:
        _rtdetr_decoder_msda_launches(monkeypatch)
    results = _compile_with_resources(launches, tmp_path)
    spilling = [r for r in results if r["stack_bytes"] > MAX_STACK_BYTES]
    assert not spilling, spilling
    # Compiled with the JIT's specialisation (D = 32 and the pointers divisible by 16), the
    # forward gathers each corner's channels with vector loads (kernels.md §9: several channels
    # per lane): 16 bytes per thread in fp32, 8 in fp16 (4 tile elements per thread, the most
    # that does not spill). One load per corner and point: at least 4 * P (P = 4) of them.
    forward = [r for r in results if r["kernel"] == "_ms_deform_attn_fwd_kernel"]
    assert len(forward) == 4, forward  # fp32/fp16 x softmax on/off
    for r in forward:
        vector = "4x32" if r["signature"]["value_ptr"] == "*fp32" else "2x32"
        assert r["global_loads"].get(vector, 0) >= 16, (r["signature"], r["global_loads"])


# GhostNetV3-1.0's stride-2 depthwise convs at 640x640 (bottleneck conv_dw: k, mid channels, input
# size; shortcut: k, in channels) and one stride-1 5x5
GHOSTNET_DEPTHWISE = ((3, 48, 320), (5, 72, 160), (3, 240, 80), (5, 672, 40), (3, 16, 320),
                      (5, 24, 160), (3, 40, 80), (5, 112, 40))


def test_depthwise_kernel_does_not_spill_at_ghostnet_shapes(tmp_path):
    """A static resource check (not a timing) at the production tile sizes, fp16, both formats."""
    from ghostkernels.triton import depthwise_conv
    with record_launches() as launches:
        for fmt in (torch.contiguous_format, torch.channels_last):
            for k, C, size in GHOSTNET_DEPTHWISE:
                x = torch.empty(32, C, size, size, dtype=torch.float16).contiguous(memory_format=fmt)
                w, b = torch.empty(C, k * k).half(), torch.empty(C).half()
                depthwise_conv.forward(x, w, b, k, k, 2, True)
            x = torch.empty(32, 120, 80, 80, dtype=torch.float16).contiguous(memory_format=fmt)
            depthwise_conv.forward(x, torch.empty(120, 25).half(), torch.empty(120).half(),
                                   5, 5, 1, False)
    results = _compile_with_resources(launches, tmp_path)
    assert not [r for r in results if r["stack_bytes"] > MAX_STACK_BYTES], results
    assert max(r["registers"] for r in results) <= 128, results
    # channels_last (the channel stride specialised to 1): every tap's load is a vector along the
    # channels, also for channel counts that are not multiples of 16 (72, 120, 672: the launcher's
    # alignment constexprs); at least 9 of them (3x3) per kernel
    channels_last = [r for r in results if r["signature"]["sxc"] == "constexpr"]
    assert channels_last, results
    for r in channels_last:
        vectors = sum(n for shape, n in r["global_loads"].items() if not shape.startswith("1x"))
        assert vectors >= 9, r["global_loads"]


# GhostNetV3-1.0's DFC gates at 640x640 (ghost1 input channels, gate channels, input size)
GHOSTNET_DFC = ((24, 72, 160), (40, 120, 80), (80, 240, 40), (112, 672, 20))


def test_dfc_kernels_load_vectors_in_channels_last_at_ghostnet_shapes(tmp_path):
    """A static check (not a timing), fp16 channels_last: the pooling reads x and the stencil
    reads the projected map as vectors along the channels (2-byte and 4-byte scalar loads before
    the alignment constexprs: 76 per pool-project kernel, 100 per stencil kernel), no spills."""
    from ghostkernels.triton import dfc_gate
    with record_launches() as launches:
        for cin, C, size in GHOSTNET_DFC:
            x = torch.empty(32, cin, size, size, dtype=torch.float16).contiguous(
                memory_format=torch.channels_last)
            params = [torch.empty(*shape).half() for shape in ((C, cin), (C,), (C, 5), (C,),
                                                               (C, 5), (C,))]
            dfc_gate.forward(x, *params)
    results = _compile_with_resources(launches, tmp_path)
    assert not [r for r in results if r["stack_bytes"] > MAX_STACK_BYTES], results
    for r in results:
        loads = r["global_loads"]
        if r["kernel"] == "_pool_project_kernel":
            assert loads.get("1x16", 0) < 16, loads
        else:  # 25 taps of the 1x5 / 5x1 stencil, one vector each
            assert sum(n for shape, n in loads.items() if not shape.startswith("1x")) >= 25, loads


def test_ghost_halo_kernel_does_not_spill_at_ghostnet_shapes(tmp_path):
    """A static resource check (not a timing) of the default Ghost launches at the standard Ghost
    shapes (bench/bench_ghost.py), fp16, both formats, plain and with the bottleneck epilogues."""
    from bench.bench_ghost import SHAPES
    from ghostkernels.triton import ghost_conv
    with record_launches() as launches:
        for fmt in (torch.contiguous_format, torch.channels_last):
            for cin, cout, size in SHAPES.values():
                c1 = (cout + 1) // 2
                x = torch.empty(32, cin, size, size, dtype=torch.float16).contiguous(
                    memory_format=fmt)
                w1, wc = torch.empty(c1, cin).half(), torch.empty(c1, 9).half()
                b1, bc = torch.empty(c1).half(), torch.empty(c1).half()
                ghost_conv.forward(x, w1, b1, wc, bc, True, True, cout)
                residual = torch.empty(32, cout, size, size).half().contiguous(memory_format=fmt)
                ghost_conv.forward(x, w1, b1, wc, bc, False, False, cout, residual=residual,
                                   input_scale=torch.empty(32, cin).half())
    assert {launch["kernel"] for launch in launches} == {"_ghost_halo_kernel"}
    results = _compile_with_resources(launches, tmp_path)
    assert not [r for r in results if r["stack_bytes"] > MAX_STACK_BYTES], results


# GhostNetV3-1.0's stride-2 bottlenecks at 640x640: ghost1 (input channels, output channels),
# the depthwise kernel size, the input size
GHOSTNET_GHOST_DEPTHWISE = ((16, 48, 3, 320), (24, 72, 5, 160), (40, 240, 3, 80),
                            (112, 672, 5, 40))


def test_ghost_depthwise_kernel_does_not_spill_at_ghostnet_shapes(tmp_path):
    """A static resource check (not a timing) of the default ghost_conv_depthwise launches at the
    stride-2 bottlenecks, fp16, both formats, with the DFC gate (the last three; the first block
    has none)."""
    from ghostkernels.triton import ghost_conv_depthwise
    with record_launches() as launches:
        for fmt in (torch.contiguous_format, torch.channels_last):
            for i, (cin, cout, k, size) in enumerate(GHOSTNET_GHOST_DEPTHWISE):
                c1 = cout // 2
                x = torch.empty(32, cin, size, size, dtype=torch.float16).contiguous(
                    memory_format=fmt)
                params = [torch.empty(*shape).half() for shape in (
                    (c1, cin), (c1,), (c1, 9), (c1,), (cout, k * k), (cout,))]
                gate = None if i == 0 else torch.empty(32, cout, size // 2, size // 2).half(
                    ).contiguous(memory_format=fmt)
                ghost_conv_depthwise.forward(x, *params, k, 2, True, True, False, cout,
                                             gate=gate)
    results = _compile_with_resources(launches, tmp_path)
    assert not [r for r in results if r["stack_bytes"] > MAX_STACK_BYTES], results


def test_every_triton_launch_compiles_for_sm90(tmp_path):
    with record_launches() as launches:
        _msda_launches()
        _ghost_launches()
        _ghost_depthwise_launches()
        _depthwise_launches()
        _dfc_launches()
        _se_launches()
    kernels = {launch["kernel"] for launch in launches}
    assert {"_ms_deform_attn_fwd_kernel", "_ms_deform_attn_bwd_kernel", "_ghost_conv_kernel",
            "_ghost_halo_kernel", "_ghost_depthwise_kernel",
            "_depthwise_kernel", "_pool_project_kernel", "_stencil_sigmoid_kernel",
            "_se_excitation_kernel"} <= kernels, kernels
    results = _compile_for_sm90(launches, tmp_path)
    no_spills = ("_pool_project_kernel", "_stencil_sigmoid_kernel", "_se_excitation_kernel")
    checked = [r for r in results if r["kernel"] in no_spills]
    assert not [r for r in checked if r.get("stack_bytes", 0) > MAX_STACK_BYTES], checked
