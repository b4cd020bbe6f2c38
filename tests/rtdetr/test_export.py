"""ONNX export of the folded detector + postprocessor: onnxruntime (CPU) agrees with PyTorch,
the batch is dynamic, the custom ops export as their reference decomposition, bad arguments fail
clearly, and the caller's model is left as it was."""
import onnx
import pytest
import torch

from rtdetr.export import deployable, export_onnx, main, onnx_outputs
from rtdetr.runtime import EndToEndDetector
from tests.rtdetr.detector_cases import (SIZE, assert_same_detections, one_thread,  # noqa: F401
                                         tiny_detector)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, one_thread):  # noqa: F811
    torch.manual_seed(1234)
    model, postprocessor = tiny_detector()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_onnx(model, postprocessor, tmp_path_factory.mktemp("onnx") / "tiny.onnx",
                       image_size=SIZE, opset=17)
    return model, postprocessor, path, state


def _inputs(batch):
    images = torch.rand(batch, 3, SIZE, SIZE)
    sizes = torch.stack([torch.randint(20, 1000, (batch,)), torch.randint(20, 1000, (batch,))], 1)
    return images, sizes


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_matches_pytorch_at_any_batch(exported, batch):
    model, postprocessor, path, _ = exported
    images, sizes = _inputs(batch)
    with torch.no_grad():
        ref = deployable(model, postprocessor)(images, sizes)
        unfolded = EndToEndDetector(model, postprocessor)(images, sizes)
    out = onnx_outputs(path, images, sizes, threads=1)
    assert_same_detections(out, ref)
    assert_same_detections(out, unfolded, tol=1e-4)  # folding changes rounding only
    assert out[1].shape == (batch, 20, 4)


def test_graph_is_standard_onnx_with_dynamic_batch(exported):
    path = exported[2]
    graph = onnx.load(path).graph
    ops = {n.op_type for n in graph.node}
    domains = {n.domain for n in graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard op domains {domains}"
    assert "GridSample" in ops and "TopK" in ops and "Conv" in ops
    assert {i.name for i in graph.input} == {"images", "orig_target_sizes"}
    assert [o.name for o in graph.output] == ["labels", "boxes", "scores"]
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param == "N", f"{value.name} has a fixed batch dimension"
    image_dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]]
    assert image_dims == [3, SIZE, SIZE]
    opset = {o.domain: o.version for o in onnx.load(path).opset_import}
    assert opset[""] == 17


def test_export_leaves_the_callers_model_unchanged(exported):
    model, postprocessor, _, state = exported
    assert not model.backbone.deployed and not postprocessor.deploy_mode
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())


def test_static_batch_and_non_square_size(tmp_path):
    model, postprocessor = tiny_detector()
    path = export_onnx(model, postprocessor, tmp_path / "static.onnx", image_size=(64, 96),
                       opset=16, dynamic_batch=False)
    dims = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 64, 96]
    images = torch.rand(1, 3, 64, 96)
    sizes = torch.tensor([[96, 64]])
    with torch.no_grad():
        ref = deployable(model, postprocessor)(images, sizes)
    assert_same_detections(onnx_outputs(path, images, sizes, threads=1), ref)


@pytest.mark.parametrize("kwargs, name", [({"image_size": (64,)}, "image_size"),
                                          ({"image_size": (0, 64)}, "image_size"),
                                          ({"opset": 15}, "opset")])
def test_bad_arguments_name_themselves(tmp_path, kwargs, name):
    model, postprocessor = tiny_detector()
    with pytest.raises(ValueError, match=name):
        export_onnx(model, postprocessor, tmp_path / "x.onnx", **kwargs)


def test_non_module_model_is_a_type_error(tmp_path):
    _, postprocessor = tiny_detector()
    with pytest.raises(TypeError, match="model"):
        export_onnx(lambda x: x, postprocessor, tmp_path / "x.onnx")


def test_command_line_writes_and_checks(tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    config = tmp_path / "tiny.yaml"
    config.write_text("model:\n  num_classes: 3\n  backbone: {name: ghostnetv3, width: 0.5, "
                      "out_indices: [4, 6, 8]}\n  encoder: {hidden_dim: 32, nhead: 4, "
                      "dim_feedforward: 64, expansion: 0.5, depth_mult: 0.34}\n  decoder: "
                      "{hidden_dim: 32, nhead: 4, num_points: 2, num_decoder_layers: 1, "
                      "num_queries: 10, dim_feedforward: 64}\n  postprocessor: "
                      "{num_top_queries: 10}\n")
    assert main(["--config", str(config), "--output", str(out), "--image-size", "64",
                 "--check"]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "onnxruntime vs PyTorch" in text
    line = next(x for x in text.splitlines() if x.startswith("onnxruntime vs PyTorch: "))
    diffs = [float(part.split()[-1]) for part in line.split("PyTorch: ")[1].split(",")]
    assert diffs[2] < 1e-5  # scores (sorted, so a rank swap of near-equal scores is harmless)
    assert "agrees with PyTorch" in text


def test_command_line_overrides_may_follow_options(monkeypatch, tmp_path):
    """`rtdetr export --config c a=1 --output m.onnx b=2`: both overrides reach the config
    (argparse alone rejected the second run as unrecognized arguments); unknown options fail."""
    import rtdetr.export as export
    seen = {}

    def fake_load(args):
        seen["overrides"] = args.overrides
        return (*tiny_detector(), 640)

    monkeypatch.setattr(export, "_load_model", fake_load)
    monkeypatch.setattr(export, "export_onnx", lambda *a, **k: str(a[2]))
    assert main(["model.num_classes=4", "--output", str(tmp_path / "m.onnx"),
                 "model.postprocessor.num_top_queries=5", "--opset", "16",
                 "train.device=cpu"]) == 0
    assert seen["overrides"] == ["model.num_classes=4", "model.postprocessor.num_top_queries=5",
                                 "train.device=cpu"]
    with pytest.raises(SystemExit):
        main(["a.b=1", "--output", "m.onnx", "--bogus"])


def test_detection_mismatches_is_tie_aware_and_catches_real_differences():
    from rtdetr.export import detection_mismatches
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    scores = torch.rand(2, 6, generator=g).sort(-1, descending=True).values
    scores[0, 2] = scores[0, 1] + 1e-6  # a near-tie: the two may swap ranks
    labels = torch.randint(0, 4, (2, 6), generator=g)
    boxes = torch.rand(2, 6, 4, generator=g) * 100
    ref = (labels, boxes, scores)
    assert detection_mismatches(ref, ref) == []
    swapped = [t.clone() for t in ref]
    for t in swapped[:2]:
        t[0, [1, 2]] = t[0, [2, 1]]
    assert detection_mismatches(swapped, ref) == []
    moved = [t.clone() for t in ref]
    moved[1][1, 3, 0] += 0.5
    assert [p.split(":")[0] for p in detection_mismatches(moved, ref)] == ["image 1 detection 3"]
    relabelled = [t.clone() for t in ref]
    relabelled[0][1, 0] = (relabelled[0][1, 0] + 1) % 4
    assert len(detection_mismatches(relabelled, ref)) == 1
    drifted = [t.clone() for t in ref]
    drifted[2][0, 5] += 0.01
    assert detection_mismatches(drifted, ref)[0].startswith("scores differ")
    assert detection_mismatches([t[:, :5] for t in ref], ref)[0].startswith("shapes differ")


def test_command_line_check_fails_when_the_file_disagrees(monkeypatch, tmp_path, capsys):
    """--check printed the differences and exited 0 whatever they were."""
    import rtdetr.export as export
    monkeypatch.setattr(export, "_load_model", lambda args: (*tiny_detector(), SIZE))
    real = export.onnx_outputs

    def wrong_boxes(*args, **kwargs):
        labels, boxes, scores = real(*args, **kwargs)
        return labels, boxes + 3.0, scores
    assert main(["--output", str(tmp_path / "m.onnx"), "--check"]) == 0
    assert "agrees with PyTorch" in capsys.readouterr().out
    monkeypatch.setattr(export, "onnx_outputs", wrong_boxes)
    assert main(["--output", str(tmp_path / "m.onnx"), "--check"]) == 1
    assert "disagrees with PyTorch" in capsys.readouterr().err


def test_command_line_exports_at_the_size_the_model_was_trained_at(monkeypatch, tmp_path):
    """Without --image-size the file's input is the config's (a checkpoint's) data.image_size,
    not always 640: a model trained at 96 px exported at 96 px, as predict runs it."""
    import rtdetr.export as export
    sizes = []
    monkeypatch.setattr(export, "_load_model", lambda args: (*tiny_detector(), 96))
    monkeypatch.setattr(export, "export_onnx",
                        lambda model, post, path, size, *a: sizes.append(size) or str(path))
    assert main(["--output", str(tmp_path / "m.onnx")]) == 0
    assert main(["--output", str(tmp_path / "m.onnx"), "--image-size", "64", "128"]) == 0
    assert sizes == [(96, 96), (64, 128)]
