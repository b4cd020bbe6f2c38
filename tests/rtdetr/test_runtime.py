"""Inference runtimes: torch.compile(fullgraph=True) through the ghostkernels ops equals eager;
CUDA-graph capture and replay (GPU only); argument errors; capture-safety of the forward."""
import pytest
import torch

import ghostkernels
from torch._dynamo.backends.common import aot_autograd
from torch.utils._python_dispatch import TorchDispatchMode

from ghostkernels import backend_for
from rtdetr.runtime import CudaGraphDetector, EndToEndDetector, compile_detector
from tests.backend_params import rel_err as rel
from tests.rtdetr.detector_cases import (SIZE, assert_same_detections, one_thread,  # noqa: F401
                                         tiny_detector)

pytestmark = pytest.mark.usefixtures("one_thread")
CUSTOM_OPS = {"ghostkernels.ghost_conv.default", "ghostkernels.depthwise_conv.default",
              "ghostkernels.ms_deform_attn.default", "ghostkernels.dfc_gate.default",
              "ghostkernels.se_excitation.default"}


def _folded():
    """The folded tiny detector with its backbone on the fused ops also on the CPU (its default,
    "auto", runs plain convs there), so the runtimes are tested through every custom op."""
    model, postprocessor = tiny_detector()
    model.deploy()
    model.backbone.use_fused_ops = True
    return model, postprocessor


def _inputs(batch, device="cpu", dtype=torch.float32):
    images = torch.rand(batch, 3, SIZE, SIZE, device=device, dtype=dtype)
    sizes = torch.randint(20, 1000, (batch, 2), device=device)
    return images, sizes


def test_compile_fullgraph_equals_eager_and_keeps_the_kernels_custom_ops():
    """Every op with a kernel here stays one custom op in the compiled graph; an op whose chosen
    backend is the reference (dfc_gate and se_excitation have no CPU kernel; without the
    extension, all but MSDA) reaches the compiler as its plain PyTorch ops, which it can fuse.
    MSDA stays a custom op whatever the backend (its reference reads the level shapes on the
    host)."""
    model, postprocessor = _folded()
    seen = set()

    def record(gm, _inputs):  # aot_eager that also records the ops of the ATen graph
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    compiled = compile_detector(model, postprocessor, backend=aot_autograd(fw_compiler=record))
    eager = EndToEndDetector(model, postprocessor)
    for call in range(2):  # eager first: its anchor cache is filled before tracing
        images, sizes = _inputs(2)
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=call > 0):
            ref, out = eager(images, sizes), compiled(images, sizes)
        assert_same_detections(out, ref, tol=1e-6)
    kept = {f"ghostkernels.{name}.default" for name in
            ("ghost_conv", "depthwise_conv", "dfc_gate", "se_excitation")
            if backend_for(name, "cpu", torch.float32) != "reference"}
    kept.add("ghostkernels.ms_deform_attn.default")
    assert kept <= seen, f"missing custom ops: {kept - seen}"
    assert not (CUSTOM_OPS - kept) & seen, f"not decomposed: {(CUSTOM_OPS - kept) & seen}"


def test_compile_rejects_training_mode_and_non_modules():
    model, postprocessor = tiny_detector()
    with pytest.raises(ValueError, match="eval mode"):
        compile_detector(model.train(), postprocessor)
    with pytest.raises(TypeError, match="model"):
        compile_detector(lambda x: x)


@pytest.mark.parametrize("kwargs, error, name", [
    ({"batch": 0}, ValueError, "batch"), ({"height": -1}, ValueError, "height"),
    ({"width": 64.0}, ValueError, "width"), ({"dtype": torch.int32}, TypeError, "dtype"),
    ({"tune": "yes"}, TypeError, "tune")])
def test_cuda_graph_argument_errors(kwargs, error, name):
    model, _ = _folded()
    args = {"batch": 1, "height": SIZE, "width": SIZE, "dtype": torch.float32, **kwargs}
    with pytest.raises(error, match=name):
        CudaGraphDetector(model, **args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_cuda_graph_without_cuda_says_so():
    model, _ = _folded()
    with pytest.raises(RuntimeError, match="CUDA device"):
        CudaGraphDetector(model, 1, SIZE, SIZE, torch.float32)


class _HostDataCounter(TorchDispatchMode):
    """Counts tensors built from Python data (torch.tensor(...)): on a GPU each one is a
    host-to-device copy, which CUDA-graph capture forbids."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.lift_fresh.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_folded_forward_builds_no_tensors_from_host_data_after_warmup():
    model, postprocessor = _folded()
    detector = EndToEndDetector(model, postprocessor)
    images, sizes = _inputs(1)
    with torch.no_grad():
        detector(images, sizes)  # warm-up fills the caches
        with _HostDataCounter() as counter:
            detector(images, sizes)
    assert counter.count == 0


@pytest.mark.gpu
@pytest.mark.parametrize("tune", [False, True], ids=["auto", "tuned"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_cuda_graph_replay_equals_eager(dtype, tol, tune):
    model, postprocessor = _folded()
    model = model.cuda().to(dtype)
    ghostkernels.tuning.clear()
    graphed = CudaGraphDetector(model, 2, SIZE, SIZE, dtype, postprocessor=postprocessor,
                                tune=tune)
    assert bool(graphed.tuned) == tune
    assert all(e.backend for e in graphed.tuned)
    ghostkernels.tuning.clear()  # the graph keeps the tuned kernels; eager runs the automatic
    if tune:  # other kernels than eager's (float32: cuDNN's convolutions may use TF32)
        tol = max(tol, 2e-3)
    eager = EndToEndDetector(model, postprocessor)
    for _ in range(2):  # new inputs each time: the static buffers must be refilled
        images, sizes = _inputs(2, "cuda", dtype)
        with torch.no_grad():
            ref = eager(images, sizes)
        out = graphed(images, sizes)
        torch.cuda.synchronize()
        assert_same_detections(out, ref, tol=tol, tie=tol)
    with pytest.raises(ValueError, match="images"):
        graphed(torch.rand(1, 3, SIZE, SIZE, device="cuda", dtype=dtype), sizes[:1])


@pytest.mark.gpu
def test_compile_inductor_on_gpu_equals_eager():
    model, postprocessor = _folded()
    model = model.cuda()
    compiled = compile_detector(model, postprocessor)
    images, sizes = _inputs(2, "cuda")
    with torch.no_grad():
        out, ref = compiled(images, sizes), EndToEndDetector(model, postprocessor)(images, sizes)
    assert_same_detections(out, ref, tol=1e-4, tie=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("part", ["backbone", "backbone + encoder"])
def test_cuda_graph_of_a_detector_prefix_equals_eager(part):
    """`rtdetr bench --breakdown` captures the forward's prefixes alone."""
    from rtdetr.benchmark_parts import DetectorPrefix
    model, _ = _folded()
    prefix = DetectorPrefix(model.cuda(), part)
    graphed = CudaGraphDetector(prefix, 2, SIZE, SIZE, torch.float32)
    images, _ = _inputs(2, "cuda", torch.float32)
    with torch.no_grad():
        ref = prefix(images)
    out = graphed(images)
    torch.cuda.synchronize()
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        assert o.shape == r.shape
        assert rel(o, r) < 1e-5
