import math

import pytest
import torch
import torchvision

from rtdetr.models.box_ops import (box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid,
                                   pairwise_box_iou, pairwise_generalized_box_iou,
                                   paired_box_iou, paired_box_iou_and_giou,
                                   paired_generalized_box_iou)
from tests.backend_params import rel_err as rel


def random_xyxy(n, dtype=torch.float64):
    cxcywh = torch.cat([torch.rand(n, 2, dtype=dtype), 0.02 + 0.6 * torch.rand(n, 2, dtype=dtype)],
                       dim=1)
    return box_cxcywh_to_xyxy(cxcywh)


def test_conversions_hand_case_and_round_trip():
    cxcywh = torch.tensor([[0.5, 0.4, 0.2, 0.6]], dtype=torch.float64)
    xyxy = torch.tensor([[0.4, 0.1, 0.6, 0.7]], dtype=torch.float64)
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), xyxy)
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), cxcywh)
    boxes = torch.rand(3, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes)), boxes)


def test_giou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [3.0, 0.0, 4.0, 1.0]], dtype=torch.float64)
    # overlap: inter 1, union 7, enclosure 3x3=9 -> 1/7 - 2/9
    # disjoint: inter 0, union 5, enclosure 4x2=8 -> 0 - 3/8
    expected = torch.tensor([[1 / 7 - 2 / 9, -3 / 8]], dtype=torch.float64)
    torch.testing.assert_close(pairwise_generalized_box_iou(a, b), expected)
    iou, union = pairwise_box_iou(a, b)
    torch.testing.assert_close(iou, torch.tensor([[1 / 7, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(union, torch.tensor([[7.0, 5.0]], dtype=torch.float64))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_pairwise_against_torchvision(dtype, tol):
    a, b = random_xyxy(7, dtype), random_xyxy(5, dtype)
    assert rel(pairwise_generalized_box_iou(a, b),
               torchvision.ops.generalized_box_iou(a, b)) < tol
    assert rel(pairwise_box_iou(a, b)[0], torchvision.ops.box_iou(a, b)) < tol


def test_paired_equals_diagonal_of_pairwise():
    a, b = random_xyxy(6), random_xyxy(6)
    torch.testing.assert_close(paired_generalized_box_iou(a, b),
                               pairwise_generalized_box_iou(a, b).diagonal())
    torch.testing.assert_close(paired_box_iou(a, b), pairwise_box_iou(a, b)[0].diagonal())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_paired_iou_and_giou_equal_the_two_functions_bitwise(dtype):
    point = torch.tensor([[0.3, 0.3, 0.3, 0.3]], dtype=dtype)  # degenerate rows too
    a = torch.cat([random_xyxy(9, dtype), point, point]).requires_grad_(True)
    b = torch.cat([random_xyxy(9, dtype), point, random_xyxy(1, dtype)])
    iou, giou = paired_box_iou_and_giou(a, b)
    assert torch.equal(iou, paired_box_iou(a, b)) and torch.equal(giou,
                                                                   paired_generalized_box_iou(a, b))
    weights = torch.rand(11, dtype=dtype)
    grad, = torch.autograd.grad((giou * weights).sum(), a)
    want, = torch.autograd.grad((paired_generalized_box_iou(a, b) * weights).sum(), a)
    assert torch.equal(grad, want)


def test_degenerate_boxes_give_finite_values_and_gradients():
    point = torch.tensor([0.3, 0.3, 0.3, 0.3], dtype=torch.float64)
    line = torch.tensor([0.2, 0.1, 0.2, 0.9], dtype=torch.float64)
    box = torch.tensor([0.1, 0.1, 0.5, 0.5], dtype=torch.float64)
    a = torch.stack([point, line, point, line, box]).requires_grad_(True)
    b = torch.stack([point.clone(), line.clone(), box, box, box])
    giou = paired_generalized_box_iou(a, b)
    iou = paired_box_iou(a, b)
    # identical points / lines: everything 0; point inside the box: IoU 0, GIoU 0; the line
    # sticks out of the box: enclosure 0.4 x 0.8, union 0.16 -> GIoU -0.5; identical boxes: 1.
    torch.testing.assert_close(giou, torch.tensor([0, 0, 0, -0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(iou, torch.tensor([0, 0, 0, 0, 1.0], dtype=torch.float64))
    (giou.sum() + iou.sum()).backward()
    assert torch.isfinite(a.grad).all()
    pairwise = pairwise_generalized_box_iou(a.detach(), b)
    assert torch.isfinite(pairwise).all()


def test_inverse_sigmoid_matches_official_eps():
    x = torch.tensor([0.0, 1.0, -0.5, 1.5, 1e-7], dtype=torch.float64)
    big = math.log(1 / 1e-5)
    torch.testing.assert_close(inverse_sigmoid(x),
                               torch.tensor([-big, big, -big, big, -big], dtype=torch.float64))
    inside = 1e-4 + (1 - 2e-4) * torch.rand(50, dtype=torch.float64)
    torch.testing.assert_close(inverse_sigmoid(inside), torch.log(inside / (1 - inside)))
    torch.testing.assert_close(inverse_sigmoid(inside).sigmoid(), inside)


def test_inverse_sigmoid_float16_is_finite_at_and_near_one():
    """x / eps overflowed float16 (1 / 1e-5 > 65504): 1.0 gave +inf, and a half-precision decoder
    reference that rounded to 1.0 stayed pinned there for every later layer."""
    x = torch.tensor([0.0, 1e-6, 0.5, 0.9999, 1.0, 1.5], dtype=torch.float16, requires_grad=True)
    out = inverse_sigmoid(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out, inverse_sigmoid(x.detach().float()).half())
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.sigmoid(inverse_sigmoid(torch.ones(1, dtype=torch.float16)) - 5.0) < 1

def test_bad_inputs_raise():
    good = random_xyxy(3)
    with pytest.raises(ValueError, match=r"a must have shape \[N, 4\].*\(3, 5\)"):
        pairwise_box_iou(torch.rand(3, 5), good)
    with pytest.raises(TypeError, match="b must be a floating-point tensor"):
        pairwise_generalized_box_iou(good, torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="as many rows in b as in a"):
        paired_generalized_box_iou(good, random_xyxy(2))
