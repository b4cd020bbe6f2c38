"""Benchmark helpers that can be checked without timing: operator counting, table output."""
import json

import torch

from ghostkernels.benchmark import Row, count_ops, write_outputs


def test_count_ops_counts_kernels_not_views():
    x = torch.randn(4, 6)
    assert count_ops(lambda: (torch.relu(x).view(-1).unsqueeze(0) + 1).sum()) == 3
    assert count_ops(lambda: x.view(2, 12).t()) == 0
    assert count_ops(lambda: x.view(2, 12).t().reshape(-1)) == 1  # not viewable: one copy


def test_write_outputs_writes_markdown_and_json(tmp_path, capsys):
    rows = [Row("g", "case", "impl", 2.0, floor_ms=1.0, ratios={"base": 1.5}, note="n")]
    write_outputs(rows, "# header", str(tmp_path), "t", echo=False)
    assert capsys.readouterr().out == ""
    assert "| g | case | impl | 2.0000 | 1.0000 | 2.0x | base 1.50x | n |" in \
        (tmp_path / "t.md").read_text()
    assert json.loads((tmp_path / "t.json").read_text())["rows"][0]["ms"] == 2.0


def test_op_traffic_counts_each_tensor_once_and_skips_views():
    from bench.backbone_floors import op_traffic
    a, b = torch.ones(2, 3), torch.ones(2, 3, dtype=torch.float16)

    def fn():
        torch.cat([a, a.view(3, 2).view(2, 3)], dim=0)  # 24 + 24 read, 48 written
        torch.relu(b)  # 12 read, 12 written
        return a + a  # the same tensor twice: read once (24), 24 written

    assert op_traffic(fn) == [("cat", 96), ("relu", 24), ("add", 48)]


def test_backbone_floors_fused_moves_fewer_bytes_than_folded_eager():
    """On fake tensors (no compute): the fused GhostNetV3 runs fewer ops and moves at most half
    the bytes of the folded eager model at a detector-like size, and the ghostkernels ops appear
    as single operators."""
    from bench.backbone_floors import backbones, model_traffic
    models = backbones(0.5)
    eager = model_traffic(models["ghostnetv3 folded eager"], 2, 128, torch.float16, True)
    fused = model_traffic(models["ghostnetv3 folded fused"], 2, 128, torch.float16, True)
    assert len(fused) < len(eager) / 2
    assert sum(b for _, b in fused) < sum(b for _, b in eager) / 2
    names = {name for name, _ in fused}
    assert {"ghostkernels::ghost_conv", "ghostkernels::dfc_gate"} <= names
    assert "cat" not in names and "upsample_nearest2d" not in names


def test_backbone_floors_counts_the_automatic_gpu_path_without_a_gpu():
    """The fused model on fake CUDA tensors: the ops whose automatic CUDA choice is the
    reference (cuDNN) are counted as its PyTorch operators, the others (the DFC gate's own CUDA
    kernel) stay one operator; that path moves more than the one-pass-per-op fused floor and
    less than the folded eager model (no cat, no upsampled gates, no scaled inputs)."""
    from bench.backbone_floors import backbones, gpu_auto_choice, model_traffic
    assert gpu_auto_choice("ghost_conv", torch.float16) == "reference"
    assert gpu_auto_choice("dfc_gate", torch.float16) == "cuda"
    models = backbones(0.5)
    args = (2, 128, torch.float16, True)
    eager = model_traffic(models["ghostnetv3 folded eager"], *args)
    fused = model_traffic(models["ghostnetv3 folded fused"], *args)
    on_gpu = model_traffic(models["ghostnetv3 folded fused"], *args, on_gpu=True)
    names = {name for name, _ in on_gpu}
    assert "ghostkernels::dfc_gate" in names and "cudnn_convolution_relu" in names
    assert not names & {"ghostkernels::ghost_conv", "ghostkernels::depthwise_conv",
                        "ghostkernels::ghost_conv_depthwise", "cat", "upsample_nearest2d"}
    moved = [sum(b for _, b in records) for records in (fused, on_gpu, eager)]
    assert moved == sorted(moved) and moved[1] < 0.75 * moved[2], moved
