"""Fast inference runtimes for a (folded) RT-DETR: the end-to-end module, torch.compile and CUDA graphs.

- :class:`EndToEndDetector`: ``(images [B,3,H,W], orig_target_sizes [B,2] (w, h)) ->
  (labels [B,k] int64, boxes [B,k,4] xyxy pixels, scores [B,k])``: the detector followed by its
  postprocessor in deploy mode (the graph that ONNX export and the benchmarks run).
- :func:`compile_detector`: ``torch.compile(fullgraph=True)``; the ghostkernels ops stay single
  opaque custom ops in the graph (their fake kernels give the output shapes).
- :class:`CudaGraphDetector`: one static batch/size/dtype captured in a CUDA graph and replayed
  (warm-up on a side stream, capture, copy the inputs into the static buffers, replay).

Fold first (``model.deploy()``): these wrappers run the model as they find it.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

import ghostkernels


def _require_module(name: str, module) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(module).__name__}")


def _require_eval(model: nn.Module) -> None:
    if model.training:
        raise ValueError("model must be in eval mode (call model.deploy() to fold it, or "
                         "model.eval()); got a model in training mode")


class EndToEndDetector(nn.Module):
    """Detector + postprocessor as one tensors-in, tensors-out module.

    The postprocessor is deep-copied and switched to deploy mode (the caller's is left as it is);
    the model is shared, not copied.
    """

    def __init__(self, model: nn.Module, postprocessor: nn.Module):
        super().__init__()
        _require_module("model", model)
        _require_module("postprocessor", postprocessor)
        if not callable(getattr(postprocessor, "deploy", None)):
            raise TypeError("postprocessor must have a deploy() method (RTDETRPostProcessor), "
                            f"got {type(postprocessor).__name__}")
        self.model = model
        self.postprocessor = copy.deepcopy(postprocessor).deploy()

    def forward(self, images: torch.Tensor, orig_target_sizes: torch.Tensor):
        return self.postprocessor(self.model(images), orig_target_sizes)


def compile_detector(model: nn.Module, postprocessor: nn.Module | None = None, *,
                     backend: str = "inductor", mode: str | None = None,
                     dynamic: bool | None = False):
    """``torch.compile(..., fullgraph=True)`` of the detector in eval mode.

    With ``postprocessor`` the compiled callable is the :class:`EndToEndDetector`
    (``(images, orig_target_sizes) -> (labels, boxes, scores)``); without it, the model alone
    (``images -> {"pred_logits", "pred_boxes"}``). Compilation happens on the first call.
    ``backend``/``mode``/``dynamic`` are passed to ``torch.compile`` (``dynamic=False``: one
    graph per input shape, the right choice for a fixed deployment size).
    """
    _require_module("model", model)
    _require_eval(model)
    module = model if postprocessor is None else EndToEndDetector(model, postprocessor)
    return torch.compile(module, fullgraph=True, backend=backend, mode=mode, dynamic=dynamic)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class CudaGraphDetector:
    """The detector (optionally with its postprocessor) captured in a CUDA graph for one static
    input: ``batch`` images of ``height`` x ``width`` in ``dtype`` on the model's CUDA device.

    ``detector(images[, orig_target_sizes])`` copies the inputs into the static buffers and
    replays the graph. The outputs are the graph's static tensors: the next call overwrites them
    (``.clone()`` what you keep). The model must already be on the GPU in ``dtype`` and in eval
    mode (folded: ``model.deploy()``); it must be capture-safe after ``warmup`` calls (no host
    reads of device tensors, no host-to-device copies in its forward).

    ``tune=True`` runs :func:`ghostkernels.tune` on the static input before the capture, so the
    graph holds, per ghostkernels op call, the backend measured fastest on this device for that
    shape (the measurements are in ``self.tuned``; the choices stay installed for later calls of
    the same shapes until ``ghostkernels.tuning.clear()``).
    """

    def __init__(self, model: nn.Module, batch: int, height: int, width: int,
                 dtype: torch.dtype = torch.float16, postprocessor: nn.Module | None = None,
                 channels_last: bool = False, warmup: int = 3, tune: bool = False):
        _require_module("model", model)
        if not isinstance(tune, bool):
            raise TypeError(f"tune must be a bool, got {tune!r}")
        _positive_int("batch", batch)
        _positive_int("height", height)
        _positive_int("width", width)
        _positive_int("warmup", warmup)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        _require_eval(model)
        if not torch.cuda.is_available():
            raise RuntimeError("CudaGraphDetector needs a CUDA device; none is visible")
        param = next(model.parameters(), None)
        if param is None or param.device.type != "cuda":
            raise ValueError("model must be on a CUDA device (model.cuda()), got parameters on "
                             f"{None if param is None else param.device}")
        if param.dtype != dtype:
            raise TypeError(f"model parameters must have dtype {dtype} (the graph's input "
                            f"dtype; convert with model.to({dtype})), got {param.dtype}")
        self.device, self.dtype = param.device, dtype
        self.module = model if postprocessor is None else EndToEndDetector(model, postprocessor)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.static_images = torch.rand(batch, 3, height, width, dtype=dtype, device=self.device
                                        ).contiguous(memory_format=fmt)
        self.static_sizes = None
        if postprocessor is not None:
            self.static_sizes = torch.tensor([[width, height]] * batch, dtype=torch.int64,
                                             device=self.device)
        self.tuned = ghostkernels.tune(self._run) if tune else []
        self.graph = torch.cuda.CUDAGraph()
        self.outputs = self._capture(warmup)

    def _run(self):
        if self.static_sizes is None:
            return self.module(self.static_images)
        return self.module(self.static_images, self.static_sizes)

    @torch.no_grad()
    def _capture(self, warmup: int):
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # lazy init, autotuning and caches happen here, not in capture
            for _ in range(warmup):
                self._run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(self.graph):
            outputs = self._run()
        return outputs

    def _copy_in(self, name: str, static: torch.Tensor, given) -> None:
        if not isinstance(given, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(given).__name__}")
        if given.shape != static.shape:
            raise ValueError(f"{name} must have the captured shape {tuple(static.shape)}, "
                             f"got {tuple(given.shape)}")
        if given.dtype != static.dtype:
            raise TypeError(f"{name} must have the captured dtype {static.dtype}, got {given.dtype}")
        static.copy_(given, non_blocking=True)

    def __call__(self, images: torch.Tensor, orig_target_sizes: torch.Tensor | None = None):
        self._copy_in("images", self.static_images, images)
        if self.static_sizes is not None:
            if orig_target_sizes is None:
                raise ValueError("orig_target_sizes is required: the graph was captured with a "
                                 "postprocessor")
            self._copy_in("orig_target_sizes", self.static_sizes, orig_target_sizes)
        elif orig_target_sizes is not None:
            raise ValueError("orig_target_sizes must be None: the graph was captured without a "
                             "postprocessor")
        self.graph.replay()
        return self.outputs

    def replay(self):
        """Replay on whatever the static buffers hold (for timing)."""
        self.graph.replay()
        return self.outputs
