"""ONNX export of the folded detector with its postprocessor (spec rtdetr.md §7.1).

Graph: ``images [B,3,H,W] float32, orig_target_sizes [B,2] int64 (w, h) -> labels [B,k] int64,
boxes [B,k,4] float32 (xyxy pixels), scores [B,k] float32``; the batch dimension is dynamic, the
spatial size is static (anchors and position embeddings are baked for ``image_size``).

The model is deep-copied and folded (``deploy()``); the caller's modules are not changed. Tracing
runs inside ``ghostkernels.decomposed()``, so the ghostkernels ops appear as their reference
decomposition (MSDA -> per-level ``GridSample``, opset >= 16) and the file runs in any ONNX
runtime. The folded backbone's Ghost/depthwise layers are exported with ``use_fused_ops=False``:
their folded weights as plain ``Conv`` nodes, the same graph as the ops' reference definition.
The TorchScript exporter (``dynamo=False``) is used: it needs no extra package.

Command line (``rtdetr export ...`` or ``python -m rtdetr.export``): see :func:`main`.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import torch
from torch import nn

import ghostkernels
from rtdetr.runtime import EndToEndDetector

MIN_OPSET = 16  # the first opset with GridSample
INPUT_NAMES = ("images", "orig_target_sizes")
OUTPUT_NAMES = ("labels", "boxes", "scores")


def _image_size(image_size) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    ok = (isinstance(image_size, (tuple, list)) and len(image_size) == 2
          and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in image_size))
    if not ok:
        raise ValueError(f"image_size must be a positive int or (height, width) of positive ints, "
                         f"got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def _plain_convs(model: nn.Module) -> None:
    """Run folded Ghost/depthwise layers as plain convs (the ops' reference graph)."""
    for m in model.modules():
        if getattr(m, "deployed", False) and hasattr(type(m), "use_fused_ops"):
            m.use_fused_ops = False  # a backbone's property: propagates to all its blocks


def deployable(model: nn.Module, postprocessor: nn.Module) -> EndToEndDetector:
    """A folded CPU float32 copy of ``model`` with a deploy-mode copy of ``postprocessor``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(getattr(model, "deploy", None)):
        raise TypeError(f"model must have a deploy() method (RTDETR), got {type(model).__name__}")
    folded = copy.deepcopy(model).cpu().float()
    folded.deploy()
    _plain_convs(folded)
    return EndToEndDetector(folded, postprocessor).eval()


def export_onnx(model: nn.Module, postprocessor: nn.Module, path: str | os.PathLike,
                image_size=(640, 640), opset: int = 17, dynamic_batch: bool = True) -> str:
    """Export ``model`` (folded on a copy) + ``postprocessor`` (deploy mode) to ONNX at ``path``.

    Args:
        model: an RT-DETR (training or folded structure; any device/dtype: a float32 CPU copy is
            exported).
        postprocessor: its ``RTDETRPostProcessor``.
        path: the ``.onnx`` file to write (folders are created).
        image_size: ``(height, width)`` (or one int) of the static input size.
        opset: ONNX opset, >= 16 (GridSample).
        dynamic_batch: symbolic batch dimension ``N`` for every input and output.

    Returns:
        ``path`` as a string, after ``onnx.checker`` accepted the file.
    """
    height, width = _image_size(image_size)
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an int >= {MIN_OPSET} (GridSample), got {opset!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    detector = deployable(model, postprocessor)
    batch = 2 if dynamic_batch else 1  # trace with B > 1 so no size-1 broadcast is baked in
    images = torch.rand(batch, 3, height, width)
    sizes = torch.tensor([[width, height]] * batch, dtype=torch.int64)
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {name: {0: "N"} for name in INPUT_NAMES + OUTPUT_NAMES}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with ghostkernels.decomposed(), torch.no_grad(), warnings.catch_warnings():
        # shape checks and level tables read on the host become constants: that is intended
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(detector, (images, sizes), path, dynamo=False, opset_version=opset,
                          input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                          dynamic_axes=dynamic_axes, do_constant_folding=True)
    import onnx
    onnx.checker.check_model(path)
    return path


def onnx_outputs(path: str, images: torch.Tensor, orig_target_sizes: torch.Tensor,
                 threads: int = 0):
    """Run the exported file in onnxruntime (CPU; ``threads`` 0: its default):
    ``(labels, boxes, scores)`` as tensors."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feeds = {"images": images.detach().cpu().float().numpy(),
             "orig_target_sizes": orig_target_sizes.detach().cpu().to(torch.int64).numpy()}
    return tuple(torch.from_numpy(o) for o in session.run(list(OUTPUT_NAMES), feeds))


# -------------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rtdetr export",
                                description="Export a folded RT-DETR + postprocessor to ONNX.")
    p.add_argument("--config", default=None,
                   help="config file or built-in name (default: the config stored in "
                        "--checkpoint; rtdetr_r18vd without a checkpoint)")
    p.add_argument("--checkpoint", help="checkpoint (EMA weights when present); omit for "
                                        "random weights (graph and speed checks)")
    p.add_argument("--output", default="rtdetr.onnx", help="the .onnx file to write")
    p.add_argument("--image-size", type=int, nargs="+", default=None,
                   help="H [W] of the static input (default: the config's data.image_size, "
                        "which a checkpoint stores: the size the model was trained at)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--static-batch", action="store_true", help="fix the batch dimension at 1")
    p.add_argument("--check", action="store_true",
                   help="run the file in onnxruntime and compare with PyTorch on random images: "
                        "exit status 1 when they disagree")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


DEFAULT_CONFIG = "rtdetr_r18vd"


def _load_model(args):
    """The model of ``--config`` (else the config the checkpoint was trained with, as ``rtdetr
    eval`` and ``predict`` do; else rtdetr_r18vd) plus the overrides, with the checkpoint's
    weights (EMA when present): ``(model, postprocessor, the config's data.image_size)``."""
    from rtdetr.config import config_for_checkpoint
    from rtdetr.models.config import build_model
    state = None
    if args.checkpoint:
        from rtdetr.engine.checkpoint import load_checkpoint
        state = load_checkpoint(args.checkpoint)
    cfg = config_for_checkpoint(args.config, args.overrides, state, default=DEFAULT_CONFIG)
    model, _, postprocessor = build_model(cfg.model)
    if state is not None:
        from rtdetr.engine.checkpoint import load_model_weights
        load_model_weights(model, state["ema"]["module"] if state.get("ema") else state["model"],
                           args.checkpoint, state, cfg.model)
    else:
        print("rtdetr export: no --checkpoint, exporting random weights", file=sys.stderr)
    return model, postprocessor, cfg.data.image_size


def detection_mismatches(out, ref, tol: float = 1e-4, tie: float = 1e-4) -> list[str]:
    """What differs between two ``(labels, boxes, scores)`` results of the same images (e.g.
    onnxruntime's and PyTorch's); empty when they agree. Scores are sorted, so they must agree
    elementwise (relative error of the whole tensor <= ``tol``); a label and box may differ only
    where ``ref`` holds another detection of that image whose score is within ``tie`` (near-equal
    scores may swap ranks between runtimes), with boxes within ``tol`` of the largest
    coordinate."""
    labels, boxes, scores = out
    ref_labels, ref_boxes, ref_scores = ref
    shapes = [tuple(t.shape) for t in out], [tuple(t.shape) for t in ref]
    if shapes[0] != shapes[1]:
        return [f"shapes differ: {shapes[0]} vs {shapes[1]}"]
    if labels.dtype != torch.int64:
        return [f"labels must be int64, got {labels.dtype}"]
    scores, ref_scores = scores.double(), ref_scores.double()
    boxes, ref_boxes = boxes.double(), ref_boxes.double()
    problems = []
    score_err = float((scores - ref_scores).norm() / ref_scores.norm().clamp_min(1e-30))
    if not score_err <= tol:
        problems.append(f"scores differ: relative error {score_err:.3g} > {tol:g}")
    box_tol = tol * max(float(ref_boxes.abs().max()) if ref_boxes.numel() else 0.0, 1.0)
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1]):
            near = (ref_scores[b] - ref_scores[b, i]).abs() <= tie
            same = (ref_labels[b] == labels[b, i]) & near & \
                ((ref_boxes[b] - boxes[b, i]).abs().amax(-1) <= box_tol)
            if not bool(same.any()):
                problems.append(f"image {b} detection {i}: label {int(labels[b, i])}, box "
                                f"{[round(float(v), 3) for v in boxes[b, i]]} has no match")
    return problems


def main(argv: list[str] | None = None) -> int:
    from rtdetr.config import parse_args_with_overrides
    # overrides may also follow another option (`--config c a=1 --output m.onnx b=2`)
    args = parse_args_with_overrides(build_parser(), argv)
    if args.image_size is not None and len(args.image_size) not in (1, 2):
        raise SystemExit("--image-size takes H or H W")
    model, postprocessor, trained_size = _load_model(args)
    chosen = args.image_size or [trained_size]
    size = tuple(chosen) * (3 - len(chosen))
    path = export_onnx(model, postprocessor, args.output, size, args.opset,
                       not args.static_batch)
    print(f"wrote {path} (opset {args.opset}, input {size[0]}x{size[1]}, "
          f"batch {'1' if args.static_batch else 'dynamic'})")
    if args.check:
        detector = deployable(model, postprocessor)
        images = torch.rand(1, 3, *size)
        sizes = torch.tensor([[size[1], size[0]]], dtype=torch.int64)
        with torch.no_grad():
            ref = detector(images, sizes)
        out = onnx_outputs(path, images, sizes)
        names_diffs = [f"{n} max |diff| {(o.double() - r.double()).abs().max().item():.3g}"
                       for n, o, r in zip(OUTPUT_NAMES, out, ref)]
        print("onnxruntime vs PyTorch: " + ", ".join(names_diffs))
        problems = detection_mismatches(out, ref)
        if problems:
            print(f"rtdetr export --check: the file disagrees with PyTorch ({len(problems)} "
                  f"problems): " + "; ".join(problems[:5]), file=sys.stderr)
            return 1
        print("rtdetr export --check: the file agrees with PyTorch (label, box and score of "
              "every detection)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
