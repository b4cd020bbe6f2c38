import itertools
import math

import pytest
import torch
import torchvision
from torch import distributed as dist

from rtdetr.models.criterion import (RTDETRCriterion, average_num_boxes, box_losses,
                                     concat_targets, matched_pairs, pair_losses, varifocal_loss)
from rtdetr.models.matcher import HungarianMatcher

K = 3  # classes


def to_xyxy(boxes):
    return torchvision.ops.box_convert(boxes, "cxcywh", "xyxy")


def random_boxes(*shape, dtype=torch.float64):
    return torch.cat([0.25 + 0.5 * torch.rand(*shape, 2, dtype=dtype),
                      0.05 + 0.4 * torch.rand(*shape, 2, dtype=dtype)], dim=-1)


def random_output(batch, queries, classes=K, dtype=torch.float64):
    return {"pred_logits": torch.randn(batch, queries, classes, dtype=dtype, requires_grad=True),
            "pred_boxes": random_boxes(batch, queries, dtype=dtype).requires_grad_(True)}


def random_targets(sizes, dtype=torch.float64):
    return [{"labels": torch.randint(0, K, (n,)), "boxes": random_boxes(n, dtype=dtype)}
            for n in sizes]


def random_indices(sizes, queries):
    return [(torch.randperm(queries)[:n], torch.randperm(n)) for n in sizes]


def reference_vfl(logits, boxes, targets, indices, num_boxes, alpha=0.75, gamma=2.0):
    """Element by element: BCE(x, t) * w with t = IoU on the matched class of a matched query."""
    positive = {}
    for b, (queries, gts) in enumerate(indices):
        for q, g in zip(queries.tolist(), gts.tolist()):
            iou = torchvision.ops.box_iou(to_xyxy(boxes[b, q][None]),
                                          to_xyxy(targets[b]["boxes"][g][None]))
            positive[(b, q, int(targets[b]["labels"][g]))] = float(iou)
    total = 0.0
    for b, q, c in itertools.product(*(range(n) for n in logits.shape)):
        p = 1 / (1 + math.exp(-float(logits[b, q, c])))
        t = positive.get((b, q, c), 0.0)
        w = t if (b, q, c) in positive else alpha * p ** gamma
        total += -w * (t * math.log(p) + (1 - t) * math.log(1 - p))
    return total / num_boxes


def reference_box_losses(boxes, targets, indices, num_boxes):
    l1 = giou = 0.0
    for b, (queries, gts) in enumerate(indices):
        for q, g in zip(queries.tolist(), gts.tolist()):
            pred, gt = boxes[b, q], targets[b]["boxes"][g]
            l1 += float((pred - gt).abs().sum())
            giou += 1 - float(torchvision.ops.generalized_box_iou(to_xyxy(pred[None]),
                                                                  to_xyxy(gt[None])))
    return l1 / num_boxes, giou / num_boxes


def test_varifocal_loss_against_reference():
    sizes = (2, 0, 3)
    out, targets = random_output(3, 4), random_targets(sizes)
    indices = random_indices(sizes, 4)
    got = varifocal_loss(out["pred_logits"], out["pred_boxes"], targets, indices, num_boxes=2.5)
    want = reference_vfl(out["pred_logits"].detach(), out["pred_boxes"].detach(), targets,
                         indices, 2.5)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_box_losses_against_reference():
    sizes = (3, 1)
    out, targets = random_output(2, 5), random_targets(sizes)
    indices = random_indices(sizes, 5)
    l1, giou = box_losses(out["pred_boxes"], targets, indices, num_boxes=4.0)
    want_l1, want_giou = reference_box_losses(out["pred_boxes"].detach(), targets, indices, 4.0)
    assert l1.item() == pytest.approx(want_l1, rel=1e-10)
    assert giou.item() == pytest.approx(want_giou, rel=1e-10)


@pytest.mark.parametrize("sizes", [(3, 0, 2, 5), (0, 0), (4,)])
def test_matched_pairs_equal_the_per_image_gather(sizes):
    targets, indices = random_targets(sizes), random_indices(sizes, 6)
    pairs = matched_pairs(concat_targets(targets, torch.device("cpu")), indices,
                          torch.device("cpu"))
    assert torch.equal(pairs.images, torch.cat([torch.full_like(q, i)
                                                for i, (q, _) in enumerate(indices)]))
    assert torch.equal(pairs.queries, torch.cat([q for q, _ in indices]))
    for key in ("labels", "boxes"):
        assert torch.equal(getattr(pairs, key),
                           torch.cat([t[key][g] for t, (_, g) in zip(targets, indices)]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sizes", [(2, 0, 3), (0, 0)])
def test_pair_losses_equal_varifocal_and_box_losses_bitwise(dtype, sizes):
    """One gather, one conversion and one intersection/union for the three losses: the values
    and the gradients are those of the separate functions."""
    out, targets = random_output(len(sizes), 5, dtype=dtype), random_targets(sizes, dtype)
    indices = random_indices(sizes, 5)
    logits, boxes = out["pred_logits"], out["pred_boxes"]
    pairs = matched_pairs(concat_targets(targets, logits.device), indices, logits.device)
    got = pair_losses(logits, boxes, pairs, 2.5, alpha=0.6, gamma=1.5)
    want = (varifocal_loss(logits, boxes, targets, indices, 2.5, alpha=0.6, gamma=1.5),
            *box_losses(boxes, targets, indices, 2.5))
    def grads(loss):
        return torch.autograd.grad(loss, (logits, boxes), retain_graph=True, allow_unused=True,
                                   materialize_grads=True)

    for g, w in zip(got, want):
        assert torch.equal(g, w)
        assert all(torch.equal(a, b) for a, b in zip(grads(g), grads(w)))


def dn_case(sizes, groups, queries=4, layers=3):
    """DN outputs and meta as the model builds them: per group G positives then G negatives."""
    g = max(max(sizes), 1)
    meta = {"dn_positive_idx": [torch.cat([torch.arange(n) + grp * 2 * g for grp in range(groups)])
                                for n in sizes],
            "dn_num_group": groups, "dn_num_split": [2 * g * groups, queries]}
    return [random_output(len(sizes), 2 * g * groups) for _ in range(layers)], meta


def r18_outputs(sizes, queries=4, layout="v1", dn=True):
    out = random_output(len(sizes), queries)
    out["aux_outputs"] = [random_output(len(sizes), queries) for _ in range(2)]
    encoder = random_output(len(sizes), queries)
    if layout == "v1":
        out["aux_outputs"].append(encoder)
    else:
        out["enc_aux_outputs"], out["enc_meta"] = [encoder], {"class_agnostic": False}
    if dn:
        out["dn_aux_outputs"], out["dn_meta"] = dn_case(sizes, groups=2, queries=queries)
    return out


def leaves(out):
    yield out
    for key in ("aux_outputs", "enc_aux_outputs", "dn_aux_outputs"):
        yield from out.get(key, [])


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_r18_loss_terms_and_main_values(layout):
    sizes = (2, 3)
    out, targets = r18_outputs(sizes, layout=layout), random_targets(sizes)
    losses = RTDETRCriterion(num_classes=K)(out, targets)
    suffixes = ["", "_aux_0", "_aux_1", "_aux_2" if layout == "v1" else "_enc_0",
                "_dn_0", "_dn_1", "_dn_2"]
    assert sorted(losses) == sorted(f"loss_{n}{s}" for n in ("vfl", "bbox", "giou")
                                    for s in suffixes)  # 21 terms, as in RT-DETR's logs
    indices = HungarianMatcher()(out, targets)
    detached = {k: out[k].detach() for k in ("pred_logits", "pred_boxes")}
    l1, giou = reference_box_losses(detached["pred_boxes"], targets, indices, 5.0)
    assert losses["loss_vfl"].item() == pytest.approx(
        reference_vfl(detached["pred_logits"], detached["pred_boxes"], targets, indices, 5.0),
        rel=1e-10)
    assert losses["loss_bbox"].item() == pytest.approx(5 * l1, rel=1e-10)
    assert losses["loss_giou"].item() == pytest.approx(2 * giou, rel=1e-10)


def test_denoising_loss_uses_exactly_the_positive_pairs():
    sizes, groups = (2, 1, 0), 3
    dn_outputs, meta = dn_case(sizes, groups)
    out = {**random_output(3, 4), "dn_aux_outputs": dn_outputs, "dn_meta": meta}
    targets = random_targets(sizes)
    losses = RTDETRCriterion(num_classes=K)(out, targets)
    pairs = [(meta["dn_positive_idx"][b], torch.arange(n).repeat(groups))
             for b, n in enumerate(sizes)]
    normaliser = 3.0 * groups  # num_boxes * dn_num_group
    for i, dn in enumerate(dn_outputs):
        logits, boxes = dn["pred_logits"].detach(), dn["pred_boxes"].detach()
        l1, giou = reference_box_losses(boxes, targets, pairs, normaliser)
        assert losses[f"loss_bbox_dn_{i}"].item() == pytest.approx(5 * l1, rel=1e-10)
        assert losses[f"loss_giou_dn_{i}"].item() == pytest.approx(2 * giou, rel=1e-10)
        assert losses[f"loss_vfl_dn_{i}"].item() == pytest.approx(
            reference_vfl(logits, boxes, targets, pairs, normaliser), rel=1e-10)
    losses["loss_bbox_dn_1"].backward()
    grad_rows = dn_outputs[1]["pred_boxes"].grad.abs().sum(-1) > 0
    expected = torch.zeros_like(grad_rows)
    for b, slots in enumerate(meta["dn_positive_idx"]):
        expected[b, slots] = True
    assert torch.equal(grad_rows, expected)


@pytest.mark.parametrize("sizes", [(0, 2), (0, 0)], ids=["some-empty", "all-empty"])
def test_empty_targets_keep_losses_finite_and_connected(sizes):
    out, targets = r18_outputs(sizes), random_targets(sizes)
    if sum(sizes) == 0:  # the model's dummy DN group: one group of 2 padding queries
        out["dn_aux_outputs"], out["dn_meta"] = dn_case(sizes, groups=1)
    losses = RTDETRCriterion(num_classes=K)(out, targets)
    assert all(torch.isfinite(v) and v.requires_grad for v in losses.values())
    sum(losses.values()).backward()
    for leaf in leaves(out):
        for key in ("pred_logits", "pred_boxes"):
            grad = leaf[key].grad
            assert grad is not None and torch.isfinite(grad).all()
        assert leaf["pred_logits"].grad.abs().sum() > 0


def test_class_agnostic_encoder_uses_label_zero():
    sizes = (2, 1)
    out, targets = random_output(2, 4), random_targets(sizes)
    out["enc_aux_outputs"], out["enc_meta"] = [random_output(2, 4, classes=1)], \
        {"class_agnostic": True}
    losses = RTDETRCriterion(num_classes=K)(out, targets)
    encoder = out["enc_aux_outputs"][0]
    agnostic = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets]
    indices = HungarianMatcher()(encoder, agnostic)
    want = reference_vfl(encoder["pred_logits"].detach(), encoder["pred_boxes"].detach(),
                         agnostic, indices, 3.0)
    assert losses["loss_vfl_enc_0"].item() == pytest.approx(want, rel=1e-10)


def test_half_precision_outputs_give_float32_losses():
    sizes = (2, 2)
    out, targets = random_output(2, 4, dtype=torch.float16), random_targets(sizes)
    losses = RTDETRCriterion(num_classes=K)(out, targets)
    assert all(v.dtype == torch.float32 for v in losses.values())
    up = {k: v.detach().double() for k, v in out.items()}
    want = RTDETRCriterion(num_classes=K)(up, targets)
    for name, value in losses.items():
        assert abs(value.item() - float(want[name])) <= 1e-5 * abs(float(want[name])) + 1e-6


def test_num_boxes_is_averaged_over_ranks_and_clamped(monkeypatch):
    targets = random_targets((2, 1))
    assert average_num_boxes(targets, torch.device("cpu")) == 3.0
    assert average_num_boxes(random_targets((0,)), torch.device("cpu")) == 1.0
    other_rank = {"count": 7.0}
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t: t.add_(other_rank["count"]))
    assert average_num_boxes(targets, torch.device("cpu")) == 5.0  # (3 + 7) / 2
    other_rank["count"] = 0.0
    assert average_num_boxes(random_targets((0, 0)), torch.device("cpu")) == 1.0


def test_interface_errors():
    sizes = (1, 2)
    targets = random_targets(sizes)
    criterion = RTDETRCriterion(num_classes=K)
    out = r18_outputs(sizes)
    del out["dn_aux_outputs"]
    with pytest.raises(ValueError, match="dn_meta but no dn_aux_outputs"):
        criterion(out, targets)
    out = r18_outputs(sizes)
    out["dn_meta"]["dn_num_split"] = [out["dn_meta"]["dn_num_split"][0], 9]
    with pytest.raises(ValueError, match="matching queries only"):
        criterion(out, targets)
    out = r18_outputs(sizes)
    out["dn_meta"]["dn_positive_idx"][1] = out["dn_meta"]["dn_positive_idx"][1][:-1]
    with pytest.raises(ValueError, match=r"dn_positive_idx'\]\[1\] must hold"):
        criterion(out, targets)
    with pytest.raises(ValueError,
                       match=r"aux_outputs\[0\]\['pred_logits'\] must have 3 classes"):
        out = r18_outputs(sizes, dn=False)
        out["aux_outputs"][0] = random_output(2, 4, classes=5)
        criterion(out, targets)
    with pytest.raises(ValueError, match="weight_dict must have exactly the keys"):
        RTDETRCriterion(num_classes=K, weight_dict={"loss_vfl": 1.0})
