import io
import math

import onnxruntime
import pytest
import torch

from rtdetr.models.postprocessor import RTDETRPostProcessor


def random_outputs(batch=2, queries=4, classes=3):
    return {"pred_logits": torch.randn(batch, queries, classes),
            "pred_boxes": torch.cat([0.2 + 0.6 * torch.rand(batch, queries, 2),
                                     0.05 + 0.3 * torch.rand(batch, queries, 2)], dim=-1)}


def hand_detections(logits, boxes, size, k):
    """Python-only reference for one image: every (score, query, class), sorted, top k."""
    w, h = size
    entries = sorted(((1 / (1 + math.exp(-logits[q][c])), q, c)
                      for q in range(len(logits)) for c in range(len(logits[0]))), reverse=True)
    result = []
    for score, q, c in entries[:k]:
        cx, cy, bw, bh = boxes[q]
        result.append((c, [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w,
                           (cy + bh / 2) * h], score))
    return result


def test_box_scaling_hand_case():
    outputs = {"pred_logits": torch.tensor([[[2.0, -1.0]]]),
               "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.4]]])}
    sizes = torch.tensor([[640, 480]])  # (w, h)
    result = RTDETRPostProcessor(num_classes=2, num_top_queries=2)(outputs, sizes)[0]
    box = torch.tensor([256.0, 144.0, 384.0, 336.0])
    torch.testing.assert_close(result["boxes"], torch.stack([box, box]))
    assert result["labels"].tolist() == [0, 1]
    torch.testing.assert_close(result["scores"], torch.tensor([2.0, -1.0]).sigmoid())


def test_topk_over_queries_and_classes_against_hand_computation():
    outputs = random_outputs(batch=2, queries=4, classes=3)
    sizes = torch.tensor([[640, 480], [300, 500]])
    results = RTDETRPostProcessor(num_classes=3, num_top_queries=5)(outputs, sizes)
    for image, result in enumerate(results):
        want = hand_detections(outputs["pred_logits"][image].tolist(),
                               outputs["pred_boxes"][image].tolist(), sizes[image].tolist(), 5)
        assert result["labels"].dtype == torch.int64
        assert result["labels"].tolist() == [c for c, _, _ in want]
        torch.testing.assert_close(result["boxes"], torch.tensor([b for _, b, _ in want]))
        torch.testing.assert_close(result["scores"], torch.tensor([s for _, _, s in want]))


def test_fewer_scores_than_num_top_queries_keeps_all():
    results = RTDETRPostProcessor(num_classes=3, num_top_queries=300)(
        random_outputs(1, 4, 3), torch.tensor([[10, 10]]))
    assert results[0]["scores"].shape == (12,)


@pytest.mark.parametrize("mapping", [{0: 1, 1: 7, 2: 90}, [1, 7, 90]], ids=["dict", "list"])
def test_labels_remapped_to_category_ids(mapping):
    outputs, sizes = random_outputs(), torch.tensor([[64, 48], [32, 32]])
    plain = RTDETRPostProcessor(num_classes=3, num_top_queries=6)(outputs, sizes)
    remapped = RTDETRPostProcessor(num_classes=3, num_top_queries=6,
                                   label_to_category=mapping)(outputs, sizes)
    for a, b in zip(plain, remapped):
        assert b["labels"].tolist() == [[1, 7, 90][c] for c in a["labels"].tolist()]
        torch.testing.assert_close(a["boxes"], b["boxes"])


def onnx_session(post, outputs, sizes):
    """onnxruntime session of ``post`` (a deployed postprocessor) exported with a dynamic batch."""

    class Export(torch.nn.Module):
        def forward(self, logits, pred_boxes, orig_target_sizes):
            return post({"pred_logits": logits, "pred_boxes": pred_boxes}, orig_target_sizes)

    buffer = io.BytesIO()
    torch.onnx.export(Export(), (outputs["pred_logits"], outputs["pred_boxes"], sizes), buffer,
                      input_names=["logits", "pred_boxes", "orig_target_sizes"],
                      output_names=["labels", "boxes", "scores"], opset_version=17, dynamo=False,
                      dynamic_axes={n: {0: "batch"} for n in
                                    ("logits", "pred_boxes", "orig_target_sizes")})
    return onnxruntime.InferenceSession(buffer.getvalue())


def run_onnx(session, outputs, sizes):
    return session.run(None, {"logits": outputs["pred_logits"].numpy(),
                              "pred_boxes": outputs["pred_boxes"].numpy(),
                              "orig_target_sizes": sizes.numpy()})


def test_deploy_returns_tensors_and_exports_to_onnx():
    post = RTDETRPostProcessor(num_classes=3, num_top_queries=5)
    outputs, sizes = random_outputs(), torch.tensor([[640, 480], [320, 200]])
    listed = post(outputs, sizes)
    labels, boxes, scores = post.deploy()(outputs, sizes)
    assert labels.shape == (2, 5) and boxes.shape == (2, 5, 4) and scores.shape == (2, 5)
    for image, result in enumerate(listed):
        assert torch.equal(labels[image], result["labels"])
        assert torch.equal(boxes[image], result["boxes"])

    session = onnx_session(post, outputs, sizes)
    other, other_sizes = random_outputs(batch=3), torch.tensor([[64, 48], [32, 32], [10, 20]])
    got = run_onnx(session, other, other_sizes)
    want = post(other, other_sizes)
    assert torch.equal(torch.from_numpy(got[0]), want[0])
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(torch.from_numpy(g), w)


def test_export_with_fewer_scores_than_num_top_queries_keeps_all():
    """Q * K < num_top_queries (e.g. 300 top queries, 100 queries, 1 class): the traced graph
    keeps all Q * K scores as eager mode does, instead of failing in topk."""
    post = RTDETRPostProcessor(num_classes=3, num_top_queries=300).deploy()
    outputs, sizes = random_outputs(batch=2, queries=4), torch.tensor([[64, 48], [32, 32]])

    session = onnx_session(post, outputs, sizes)
    other, other_sizes = random_outputs(batch=3, queries=4), torch.tensor([[64, 48]] * 3)
    got = run_onnx(session, other, other_sizes)
    want = post(other, other_sizes)
    assert got[0].shape == (3, 12) and torch.equal(torch.from_numpy(got[0]), want[0])
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(torch.from_numpy(g), w)


def test_bad_arguments_raise():
    post = RTDETRPostProcessor(num_classes=3, num_top_queries=5)
    outputs = random_outputs()
    with pytest.raises(ValueError, match=r"orig_target_sizes must have shape \[2, 2\].*\(2,\)"):
        post(outputs, torch.tensor([640, 480]))
    with pytest.raises(ValueError, match=r"pred_logits must have shape \[B, Q, 3\]"):
        post(random_outputs(classes=4), torch.ones(2, 2))
    with pytest.raises(ValueError, match="pred_boxes must have shape"):
        post({**outputs, "pred_boxes": outputs["pred_boxes"][:, :2]}, torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"orig_target_sizes must be on the outputs' device "
                                         r"\(cpu\), got meta"):
        post(outputs, torch.ones(2, 2, device="meta"))
    with pytest.raises(ValueError, match=r"no entry for \[2\]"):
        RTDETRPostProcessor(num_classes=3, label_to_category={0: 1, 1: 2})
    with pytest.raises(ValueError, match="must list 3 category ids"):
        RTDETRPostProcessor(num_classes=3, label_to_category=[1, 2])
    with pytest.raises(TypeError, match="label_to_category must be a mapping"):
        RTDETRPostProcessor(num_classes=3, label_to_category=5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_boxes_are_scaled_to_pixels_in_float32(dtype):
    """A half-precision model's boxes were scaled in its dtype: at 4000 px, float16 steps 2-4 px
    (bfloat16 16-32 px). The normalised boxes are what the model gives; their pixels are
    computed in float32."""
    post = RTDETRPostProcessor(num_classes=1, num_top_queries=8)
    outputs = random_outputs(batch=2, queries=8, classes=1)
    # scores far apart, so that the ranking cannot differ between dtypes
    outputs["pred_logits"] = torch.stack([torch.linspace(-3, 3, 8)[torch.randperm(8)]
                                          for _ in range(2)])[..., None]
    half = {k: v.to(dtype) for k, v in outputs.items()}
    sizes = torch.tensor([[4000, 3000], [6000, 4500]])
    got = post(half, sizes)
    exact = post({k: v.double() for k, v in half.items()}, sizes)
    for g, e in zip(got, exact):
        assert g["boxes"].dtype == torch.float32
        assert torch.equal(g["labels"], e["labels"])
        assert (g["boxes"].double() - e["boxes"]).abs().max() < 0.01
