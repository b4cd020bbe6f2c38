"""Facts about the compiled ms_deform_attn kernels (csrc/) that the cross-backend tests in
test_ms_deform_attn.py do not reach: the registered schemas and dispatch keys, the C++ checks that
guard direct calls of torch.ops.ghostkernels_C.*, CPU backward determinism, the torch-free CUDA
kernel file, and (on a GPU) the CUDA paths the shared cases miss: several chunk iterations per
lane, misaligned pointers (scalar fallback), half-precision gradients and CUDA-graph capture."""
import os
import pathlib
import re

import pytest
import torch

from ghostkernels import backends
from tests.backend_params import TOLERANCE
from tests.msda_cases import make_inputs, rel_err

ROOT = pathlib.Path(__file__).resolve().parents[1]
FWD = "ghostkernels_C::ms_deform_attn_forward"
BWD = "ghostkernels_C::ms_deform_attn_backward"


@pytest.fixture(scope="module")
def ops():
    if backends.compiled_extension() is None:
        if os.environ.get("GHOSTKERNELS_REQUIRE_EXTENSION") == "1":
            pytest.fail("ghostkernels._C must be built in this run")
        pytest.skip("ghostkernels._C is not built")
    return torch.ops.ghostkernels_C


def kernel_args(N, shapes, M, D, Lq, P, dtype, device="cpu"):
    """Inputs in the kernel contract: locations in the accumulation dtype, all contiguous."""
    value, spatial_shapes, starts, loc, weights = make_inputs(N, shapes, M, D, Lq, P,
                                                              dtype=torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (value.to(device, dtype), spatial_shapes.to(device), starts.to(device),
            loc.to(device, acc), weights.to(device, dtype))


def test_schemas_and_dispatch_keys(ops):
    assert str(ops.ms_deform_attn_forward.default._schema) == (
        "ghostkernels_C::ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, "
        "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights, "
        "bool softmax=False) -> Tensor")
    assert str(ops.ms_deform_attn_backward.default._schema).endswith(
        "Tensor attention_weights, bool softmax=False, Tensor? fixed_point_scale=None) "
        "-> (Tensor, Tensor, Tensor)")
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has(FWD, "CPU") and has(BWD, "CPU")
    with_cuda = bool(backends.compiled_extension().WITH_CUDA)
    assert has(FWD, "CUDA") == with_cuda and has(BWD, "CUDA") == with_cuda


@pytest.mark.parametrize("mutate,words", [
    (lambda a: a.__setitem__(0, a[0].transpose(2, 3)), "value must be contiguous"),
    (lambda a: a.__setitem__(3, a[3].double()), "sampling_locations must be Float"),
    (lambda a: a.__setitem__(4, a[4][:, :1].contiguous()),
     "attention_weights must be [N, Lq, M, L, P]"),
    (lambda a: a.__setitem__(2, torch.tensor([0, 23])), "level_start_index[1] must be 24"),
    (lambda a: a.__setitem__(1, torch.tensor([[6, 4], [3, 3]])), "describe 33 positions"),
    (lambda a: a.__setitem__(1, torch.tensor([[6, 4], [-1, -6]])), "positive (h, w)"),
])
def test_direct_calls_are_checked_in_cpp(ops, mutate, words):
    args = list(kernel_args(2, [(6, 4), (3, 2)], 2, 4, 5, 2, torch.float32))
    mutate(args)
    with pytest.raises(RuntimeError, match=re.escape(words)):
        ops.ms_deform_attn_forward(*args)


def test_cpu_backward_is_deterministic_and_typed(ops):
    torch.set_num_threads(max(2, torch.get_num_threads()))
    args = kernel_args(2, [(9, 7), (4, 3)], 4, 8, 40, 4, torch.bfloat16)
    grad_out = torch.randn(2, 40, 32, dtype=torch.bfloat16)
    first = ops.ms_deform_attn_backward(grad_out, *args)
    second = ops.ms_deform_attn_backward(grad_out, *args)
    for a, b in zip(first, second):
        assert a.dtype == torch.float32  # half types come back in the accumulation dtype
        assert torch.equal(a, b)


def test_cuda_kernel_file_is_torch_free():
    allowed = {"cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h", "ms_deform_attn_kernel.h",
               "cstdint"}
    for name in ("ms_deform_attn_kernel.cu", "ms_deform_attn_kernel.h"):
        text = (ROOT / "csrc" / "cuda" / name).read_text()
        includes = set(re.findall(r'#include\s*[<"]([^>"]+)[>"]', text))
        assert includes <= allowed, (name, includes - allowed)


# ------------------------------------------------------------------------------------------
# CUDA kernels against the CPU kernels (GPU only)

CUDA_CASES = {  # name: (N, shapes, M, D, Lq, P)
    "rtdetr-like-D32": (2, [(20, 20), (10, 10), (5, 5)], 8, 32, 30, 4),
    "two-chunk-iterations-D256": (1, [(7, 9), (3, 4)], 2, 256, 5, 3),
    "odd-D13-scalar": (2, [(6, 5), (1, 1)], 3, 13, 9, 5),
    "D6-two-channels-per-lane": (1, [(8, 3)], 4, 6, 11, 33),
}


def _require_cuda():
    if not torch.cuda.is_available() or not backends.compiled_extension().WITH_CUDA:
        pytest.skip("needs a CUDA device and a CUDA build of ghostkernels._C")


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CUDA_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["f64", "f32", "f16", "bf16"])
def test_cuda_matches_cpu_forward_and_backward(ops, dtype, case):
    _require_cuda()
    args = kernel_args(*CUDA_CASES[case], dtype)
    N, _, M, D = args[0].shape
    grad_out = torch.randn(N, args[3].shape[1], M * D, dtype=torch.float64).to(dtype)
    want = [ops.ms_deform_attn_forward(*args)] + list(ops.ms_deform_attn_backward(grad_out, *args))
    got = [ops.ms_deform_attn_forward(*[a.cuda() for a in args])]
    got += list(ops.ms_deform_attn_backward(grad_out.cuda(), *[a.cuda() for a in args]))
    # Both accumulate in float32/float64: the gap is summation order (and one final rounding).
    tolerance = 1e-12 if dtype == torch.float64 else TOLERANCE[dtype][1]
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, i
        assert rel_err(g, w) < tolerance, i


@pytest.mark.gpu
def test_cuda_misaligned_pointers_use_the_scalar_path(ops):
    _require_cuda()
    value, shapes, starts, loc, weights = kernel_args(1, [(6, 6)], 2, 32, 7, 4, torch.float16)
    storage = torch.empty(value.numel() + 1, dtype=torch.float16, device="cuda")
    shifted = storage[1:].view(value.shape)  # contiguous, but only 2-byte aligned
    shifted.copy_(value)
    got = ops.ms_deform_attn_forward(shifted, shapes.cuda(), starts.cuda(), loc.cuda(),
                                     weights.cuda())
    want = ops.ms_deform_attn_forward(value, shapes, starts, loc, weights)
    assert rel_err(got, want) < TOLERANCE[torch.float16][0]


@pytest.mark.gpu
def test_cuda_forward_and_backward_capture_in_a_cuda_graph(ops):
    _require_cuda()
    args = [a.cuda() for a in kernel_args(2, [(8, 8), (4, 4)], 4, 32, 16, 4, torch.float32)]
    grad_out = torch.randn(2, 16, 128, device="cuda")
    eager = [ops.ms_deform_attn_forward(*args)] + list(ops.ms_deform_attn_backward(grad_out, *args))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture, as the CUDA-graph docs ask
        ops.ms_deform_attn_forward(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = [ops.ms_deform_attn_forward(*args)]
        captured += list(ops.ms_deform_attn_backward(grad_out, *args))
    graph.replay()
    torch.cuda.synchronize()
    for c, e in zip(captured, eager):
        assert rel_err(c, e) < 1e-5
