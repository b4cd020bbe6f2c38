import pytest
import torch

from rtdetr.models.targets import validate_targets

K = 5


def valid_targets(sizes=(3, 0, 2)):
    targets = []
    for n in sizes:
        wh = 0.05 + 0.3 * torch.rand(n, 2)
        centre = wh / 2 + (1 - wh) * torch.rand(n, 2)  # box fully inside the image
        targets.append({"labels": torch.randint(0, K, (n,)),
                        "boxes": torch.cat([centre, wh], dim=1)})
    return targets


def test_valid_targets_pass():
    validate_targets(valid_targets(), num_classes=K, batch_size=3)
    validate_targets(tuple(valid_targets((0, 0))), num_classes=K)
    edge = {"labels": torch.tensor([0, K - 1]),
            "boxes": torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.05, 0.95, 0.1, 0.1]],
                                  dtype=torch.float64)}
    validate_targets([edge], num_classes=K)
    with_id = [{**t, "image_id": torch.tensor(i)} for i, t in enumerate(valid_targets())]
    validate_targets(with_id, num_classes=K, extra_keys=("image_id",))


def break_target(image, key, value):
    targets = valid_targets()
    if value is None:
        del targets[image][key]
    else:
        targets[image][key] = value
    return targets


def test_container_errors():
    with pytest.raises(TypeError, match="targets must be a list of dicts.*got dict"):
        validate_targets(valid_targets()[0], num_classes=K)
    with pytest.raises(ValueError, match=r"one dict per image \(4 images\), got 3"):
        validate_targets(valid_targets(), num_classes=K, batch_size=4)
    with pytest.raises(TypeError, match=r"targets\[1\] must be a dict.*got list"):
        validate_targets([valid_targets()[0], []], num_classes=K)
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="num_classes must be a positive int"):
            validate_targets(valid_targets(), num_classes=bad)


@pytest.mark.parametrize("key", ["labels", "boxes"])
def test_missing_key(key):
    with pytest.raises(ValueError, match=rf"targets\[2\] is missing the key '{key}'"):
        validate_targets(break_target(2, key, None), num_classes=K)


def test_unknown_key():
    targets = valid_targets()
    targets[1]["image_id"] = torch.tensor(7)
    with pytest.raises(ValueError, match=r"targets\[1\] has unknown key 'image_id'"):
        validate_targets(targets, num_classes=K)


@pytest.mark.parametrize("key", ["labels", "boxes"])
def test_non_tensor_value(key):
    with pytest.raises(TypeError, match=rf"targets\[0\]\['{key}'\] must be a torch.Tensor, "
                                        r"got list"):
        validate_targets(break_target(0, key, [1, 2, 3]), num_classes=K)


LABEL_ERRORS = [
    (torch.tensor([1, 2, 0], dtype=torch.int32), TypeError, "dtype int64, got torch.int32"),
    (torch.tensor([1.0, 2.0, 0.0]), TypeError, "dtype int64, got torch.float32"),
    (torch.tensor([[1, 2, 0]]), ValueError, r"1-d tensor \[n\], got shape \(1, 3\)"),
    (torch.tensor([1, K, 0]), ValueError, rf"lie in \[0, {K}\).*got {K} at position 1"),
    (torch.tensor([1, 2, -1]), ValueError, rf"lie in \[0, {K}\).*got -1 at position 2"),
]


@pytest.mark.parametrize("labels,error,message", LABEL_ERRORS)
def test_label_errors(labels, error, message):
    with pytest.raises(error, match=rf"targets\[0\]\['labels'\] must .*{message}"):
        validate_targets(break_target(0, "labels", labels), num_classes=K)


BOX_ERRORS = [
    (torch.ones(3, 4, dtype=torch.int64), TypeError, "floating-point tensor, got torch.int64"),
    (torch.rand(3, 5), ValueError, r"shape \[n, 4\].*got \(3, 5\)"),
    (torch.rand(12), ValueError, r"shape \[n, 4\].*got \(12,\)"),
    (torch.full((2, 4), 0.3), ValueError, r"one row per label \(3 labels\), got 2 boxes"),
    (torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 2 + [[0.5, float("nan"), 0.2, 0.2]]), ValueError,
     "finite values.*at row 2"),
    (torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.0, 0.2], [0.5, 0.5, 0.2, 0.2]]),
     ValueError, r"width > 0 and height > 0, got \[0.5, 0.5, 0.0, 0.2\+?\d*\] at row 1"),
    (torch.tensor([[0.5, 0.5, 0.2, -0.1]] + [[0.5, 0.5, 0.2, 0.2]] * 2), ValueError,
     "width > 0 and height > 0.*at row 0"),
    (torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 2 + [[1.5, 0.5, 0.2, 0.2]]), ValueError,
     r"values in \[0, 1\].*at row 2"),
    (torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.9, 0.5, 0.4, 0.2], [0.5, 0.5, 0.2, 0.2]]),
     ValueError, r"inside the image \(corners in \[0, 1\]\).*at row 1"),
]


@pytest.mark.parametrize("boxes,error,message", BOX_ERRORS)
def test_box_errors(boxes, error, message):
    with pytest.raises(error, match=rf"targets\[0\]\['boxes'\] must .*{message}"):
        validate_targets(break_target(0, "boxes", boxes), num_classes=K)


def test_labels_and_boxes_on_different_devices():
    targets = valid_targets()
    targets[0]["labels"] = targets[0]["labels"].to("meta")
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\] must be on the device of"):
        validate_targets(targets, num_classes=K)


def test_a_bad_value_in_any_image_of_a_batch_is_found_and_named():
    """Valid batches are checked in one pass over the concatenated targets; an error is still
    reported for the first bad image and row, as an image-by-image check does."""
    targets = valid_targets((3, 0, 2, 4))
    targets[3]["labels"] = torch.tensor([0, 1, K, 2])
    with pytest.raises(ValueError, match=r"targets\[3\]\['labels'\] .*got 5 at position 2"):
        validate_targets(targets, num_classes=K)
    targets = valid_targets((3, 0, 2, 4))
    targets[2]["boxes"] = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.95, 0.5, 0.2, 0.2]])
    with pytest.raises(ValueError, match=r"targets\[2\]\['boxes'\] .*inside the image.*row 1"):
        validate_targets(targets, num_classes=K)


def test_the_first_image_with_an_error_is_reported_whatever_its_kind():
    """An earlier image's bad value comes before a later image's wrong type (image by image)."""
    targets = valid_targets()
    targets[0]["labels"] = torch.tensor([0, -1, 2])
    targets[2]["boxes"] = targets[2]["boxes"].long()
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\] must lie in"):
        validate_targets(targets, num_classes=K)
    targets[0]["labels"] = torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match=r"targets\[2\]\['boxes'\] must be a floating-point"):
        validate_targets(targets, num_classes=K)


def test_boxes_of_several_dtypes_are_checked_image_by_image():
    targets = valid_targets()
    targets[2]["boxes"] = targets[2]["boxes"].double()
    validate_targets(targets, num_classes=K)
    targets[2]["boxes"][1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"targets\[2\]\['boxes'\] .*finite values.*row 1"):
        validate_targets(targets, num_classes=K)
