import itertools
import math

import pytest
import torch
import torchvision

from rtdetr.models.matcher import HungarianMatcher


def random_boxes(n, dtype=torch.float64):
    """Normalised cxcywh boxes."""
    return torch.cat([0.2 + 0.6 * torch.rand(n, 2, dtype=dtype),
                      0.05 + 0.3 * torch.rand(n, 2, dtype=dtype)], dim=1)


def random_case(sizes, num_queries=5, num_classes=3, dtype=torch.float64, logit_scale=3.0):
    logits = logit_scale * torch.randn(len(sizes), num_queries, num_classes, dtype=dtype)
    outputs = {"pred_logits": logits,
               "pred_boxes": torch.stack([random_boxes(num_queries, dtype) for _ in sizes])}
    targets = [{"labels": torch.randint(0, num_classes, (n,)), "boxes": random_boxes(n, dtype)}
               for n in sizes]
    return outputs, targets


def reference_cost(logits, boxes, labels, gt_boxes, alpha=0.25, gamma=2.0):
    """Cost [Q, n] element by element with Python floats: 5 L1 + 2 focal + 2 (-GIoU)."""
    to_xyxy = torchvision.ops.box_convert
    giou = torchvision.ops.generalized_box_iou(to_xyxy(boxes, "cxcywh", "xyxy"),
                                               to_xyxy(gt_boxes, "cxcywh", "xyxy"))
    cost = torch.zeros(boxes.shape[0], gt_boxes.shape[0], dtype=torch.float64)
    for q, g in itertools.product(range(cost.shape[0]), range(cost.shape[1])):
        p = 1 / (1 + math.exp(-float(logits[q, labels[g]])))
        focal = (alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
                 - (1 - alpha) * p ** gamma * -math.log(1 - p + 1e-8))
        l1 = sum(abs(float(boxes[q, c]) - float(gt_boxes[g, c])) for c in range(4))
        cost[q, g] = 5 * l1 + 2 * focal - 2 * float(giou[q, g])
    return cost


def brute_force(cost):
    """Minimum-cost injective assignment by enumeration -> (total, set of (query, gt))."""
    queries, gts = cost.shape
    best = (math.inf, None)
    if gts <= queries:
        candidates = ([(q, g) for g, q in enumerate(p)]
                      for p in itertools.permutations(range(queries), gts))
    else:
        candidates = ([(q, g) for q, g in enumerate(p)]
                      for p in itertools.permutations(range(gts), queries))
    for pairs in candidates:
        total = sum(float(cost[q, g]) for q, g in pairs)
        if total < best[0]:
            best = (total, set(pairs))
    return best


@pytest.mark.parametrize("sizes,num_queries", [((3, 1, 4), 5), ((2, 5), 4), ((0, 2), 3)])
def test_matches_brute_force(sizes, num_queries):
    outputs, targets = random_case(sizes, num_queries)
    indices = HungarianMatcher()(outputs, targets)
    assert len(indices) == len(sizes)
    for image, (rows, cols) in enumerate(indices):
        assert rows.dtype == cols.dtype == torch.int64
        assert len(rows) == len(cols) == min(num_queries, sizes[image])
        if sizes[image] == 0:
            continue
        cost = reference_cost(outputs["pred_logits"][image], outputs["pred_boxes"][image],
                              targets[image]["labels"], targets[image]["boxes"])
        best_total, best_pairs = brute_force(cost)
        pairs = set(zip(rows.tolist(), cols.tolist()))
        assert sum(float(cost[q, g]) for q, g in pairs) == pytest.approx(best_total, rel=1e-9)
        assert pairs == best_pairs


def test_cost_matrix_against_reference_float32():
    # -log(1 - p + 1e-8) loses relative accuracy in float32 as p -> 1 (the official formula does
    # too), so the float32 comparison keeps the logits moderate.
    outputs, targets = random_case((4,), num_queries=6, num_classes=4, dtype=torch.float32,
                                   logit_scale=1.0)
    matcher = HungarianMatcher()
    cost = matcher.cost_matrix(outputs["pred_logits"][0], outputs["pred_boxes"][0],
                               targets[0]["labels"], targets[0]["boxes"])
    ref = reference_cost(outputs["pred_logits"][0].double(), outputs["pred_boxes"][0].double(),
                         targets[0]["labels"], targets[0]["boxes"].double())
    assert ((cost.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_images_without_targets():
    outputs, targets = random_case((0, 0), num_queries=4)
    indices = HungarianMatcher()(outputs, targets)
    assert [(len(r), len(c)) for r, c in indices] == [(0, 0), (0, 0)]
    assert all(r.dtype == c.dtype == torch.int64 for r, c in indices)


def test_half_precision_inputs_are_matched_in_float32():
    outputs, targets = random_case((3, 2), num_queries=5, dtype=torch.float64)
    half = {k: v.to(torch.float16) for k, v in outputs.items()}
    rounded = {k: v.double() for k, v in half.items()}
    got = HungarianMatcher()(half, targets)
    want = HungarianMatcher()(rounded, targets)
    for (r1, c1), (r2, c2) in zip(got, want):
        assert set(zip(r1.tolist(), c1.tolist())) == set(zip(r2.tolist(), c2.tolist()))


def test_non_finite_predictions_raise():
    outputs, targets = random_case((2,), num_queries=3)
    outputs["pred_boxes"][0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        HungarianMatcher()(outputs, targets)


def test_bad_arguments_raise():
    outputs, targets = random_case((2, 1), num_queries=3)
    with pytest.raises(ValueError, match=r"one dict per image \(2\), got 1"):
        HungarianMatcher()(outputs, targets[:1])
    with pytest.raises(ValueError, match="at least one non-zero cost"):
        HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=0)


@pytest.mark.parametrize("label", [-1, 3, 7])
def test_out_of_range_labels_raise_naming_image_and_value(label):
    """-1 used to index the last class silently (a wrong matching, and a wrong loss in the
    criterion), 3 == num_classes an IndexError (a device assert on a GPU)."""
    outputs, targets = random_case((2, 3), num_queries=4, num_classes=3)
    targets[1]["labels"][2] = label
    with pytest.raises(ValueError, match=rf"targets\[1\]\['labels'\] must lie in \[0, 3\).*"
                                         rf"got {label} at position 2"):
        HungarianMatcher()(outputs, targets)


def test_labels_and_boxes_that_disagree_raise():
    """One label too many used to broadcast the [Q, 1] box costs against [Q, 2] class costs."""
    outputs, targets = random_case((1, 0), num_queries=4)
    targets[0]["labels"] = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\] must have shape \[2, 4\].*"
                                         r"got \(1, 4\)"):
        HungarianMatcher()(outputs, targets)
    targets[0]["labels"] = torch.tensor([0.0])
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\] must be an int64"):
        HungarianMatcher()(outputs, targets)
