"""A tiny GhostNetV3 RT-DETR shared by the export and runtime tests, and a tie-aware comparison of
(labels, boxes, scores) detections."""
import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from rtdetr.export import detection_mismatches
from rtdetr.models import build_model

TINY_GHOST = {"num_classes": 4,
              "backbone": {"name": "ghostnetv3", "width": 0.5, "out_indices": [4, 6, 8]},
              "encoder": {"hidden_dim": 32, "nhead": 4, "dim_feedforward": 64,
                          "expansion": 0.5, "depth_mult": 0.34},
              "decoder": {"hidden_dim": 32, "nhead": 4, "num_points": 2,
                          "num_decoder_layers": 2, "num_queries": 20, "num_denoising": 0,
                          "dim_feedforward": 64},
              "postprocessor": {"num_top_queries": 20}}
SIZE = 64  # GhostNetV3's DFC gates need >= 33 px; 8x8 + 4x4 + 2x2 = 84 positions >= 20 queries


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (so that folding has something to fold);
    returns the model."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def tiny_detector():
    """(model in eval mode, training structure; postprocessor) with random BN statistics."""
    model, _, postprocessor = build_model(TINY_GHOST)
    randomize_bn(model)
    return model.eval(), postprocessor


def assert_same_detections(out, ref, tol: float = 1e-5, tie: float = 1e-5) -> None:
    """``out`` and ``ref`` are (labels, boxes, scores): they agree as
    ``rtdetr.export.detection_mismatches`` defines it (tie-aware; tested on its own)."""
    problems = detection_mismatches(out, ref, tol, tie)
    assert not problems, problems[:5]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module: on a shared 2-core CPU, 2 threads are many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
