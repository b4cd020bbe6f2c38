"""COCO dataset label mapping, transforms keep boxes consistent, multi-scale collate."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.ops import box_convert

from rtdetr.data import BatchCollator, CocoDetection, DetectionTransforms
from rtdetr.data.transforms import horizontal_flip


def write_coco(root, images, annotations, categories):
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    rng = np.random.default_rng(0)
    for im in images:
        arr = rng.integers(0, 256, size=(im["height"], im["width"], 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(root, "img", im["file_name"]))
    ann = os.path.join(root, "ann.json")
    with open(ann, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return os.path.join(root, "img"), ann


@pytest.fixture
def gapped(tmp_path):
    images = [{"id": 10, "file_name": "a.png", "width": 40, "height": 30},
              {"id": 11, "file_name": "b.png", "width": 20, "height": 20}]
    cats = [{"id": 90, "name": "z"}, {"id": 3, "name": "x"}, {"id": 17, "name": "y"}]
    anns = [{"id": 1, "image_id": 10, "category_id": 17, "bbox": [1, 2, 10, 8]},
            {"id": 2, "image_id": 10, "category_id": 90, "bbox": [5, 5, 30, 20]},
            {"id": 3, "image_id": 10, "category_id": 3, "bbox": [0, 0, 4, 4], "iscrowd": 1}]
    return write_coco(str(tmp_path), images, anns, cats)


def test_label_mapping_round_trip_crowd_dropped_empty_kept(gapped):
    ds = CocoDetection(*gapped)
    assert ds.category2label == {3: 0, 17: 1, 90: 2}
    assert all(ds.label2category[ds.category2label[c]] == c for c in (3, 17, 90))
    assert ds.class_names == ["x", "y", "z"]
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.uint8
    assert target["labels"].tolist() == [1, 2]  # crowd annotation (category 3) dropped
    assert target["boxes"].tolist() == [[1, 2, 11, 10], [5, 5, 35, 25]]
    assert target["orig_size"].tolist() == [40, 30] and target["image_id"] == 10
    _, empty = ds[1]  # image without annotations is kept
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def test_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    """A 16-bit grayscale PNG (mode I;16): PIL's convert("RGB") clips every value above 255 to
    white; the dataset scales it (v / 257) instead."""
    folder, ann = write_coco(str(tmp_path), [], [], [{"id": 1, "name": "c"}])
    gray16 = (np.arange(12 * 10).reshape(10, 12) * 500).astype(np.uint16)
    Image.fromarray(gray16).save(os.path.join(folder, "g.png"))
    assert Image.open(os.path.join(folder, "g.png")).mode.startswith("I;16")
    json.dump({"images": [{"id": 1, "file_name": "g.png", "width": 12, "height": 10}],
               "annotations": [], "categories": [{"id": 1, "name": "c"}]}, open(ann, "w"))
    image, _ = CocoDetection(folder, ann)[0]
    want = torch.from_numpy(np.rint(gray16 / 257.0).astype(np.uint8))
    assert image.shape == (3, 10, 12) and image.dtype == torch.uint8
    for channel in image:
        assert torch.equal(channel, want)


def random_sample(n=5, h=48, w=64):
    xy = torch.rand(n, 2) * torch.tensor([w * 0.55, h * 0.55])
    wh = 4 + torch.rand(n, 2) * torch.tensor([w * 0.35, h * 0.35])
    boxes = tv_tensors.BoundingBoxes(torch.cat([xy, xy + wh], 1), format="XYXY",
                                     canvas_size=(h, w))
    image = tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))
    return image, {"boxes": boxes, "labels": torch.randint(0, 3, (n,)), "image_id": 1,
                   "orig_size": torch.tensor([w, h])}


def test_flip_twice_is_identity():
    image, target = random_sample()
    once_img, once = horizontal_flip(image, target)
    twice_img, twice = horizontal_flip(once_img, once)
    assert torch.equal(twice_img, image)
    torch.testing.assert_close(twice["boxes"], target["boxes"], rtol=0, atol=1e-5)
    w = image.shape[-1]  # x0' = w - x1
    torch.testing.assert_close(once["boxes"][:, 0], w - target["boxes"][:, 2], rtol=0, atol=1e-5)


def test_eval_transform_normalised_cxcywh_matches_pixels():
    image, target = random_sample(h=48, w=64)
    out_img, out = DetectionTransforms(32, train=False)(image, target, 0)
    assert out_img.shape == (3, 32, 32) and out_img.dtype == torch.float32
    assert 0 <= out_img.min() and out_img.max() <= 1
    expect = box_convert(target["boxes"].as_subclass(torch.Tensor), "xyxy", "cxcywh")
    expect = expect / torch.tensor([64, 48, 64, 48])
    torch.testing.assert_close(out["boxes"], expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(out["labels"], target["labels"])


def test_train_transforms_keep_boxes_inside_and_are_seeded():
    tf = DetectionTransforms(40, train=True, seed=3)
    for index in range(12):
        image, target = random_sample()
        out_img, out = tf(image, target, index)
        assert out_img.shape == (3, 40, 40)
        b = out["boxes"]
        assert b.shape[0] == out["labels"].shape[0]
        xyxy = box_convert(b, "cxcywh", "xyxy")
        assert (xyxy >= -1e-6).all() and (xyxy <= 1 + 1e-6).all()
        assert (b[:, 2:] * 40 >= 1 - 1e-4).all()  # sanitize: no box below 1 px
        again_img, again = tf(image, target, index)  # same (seed, epoch, index) -> same sample
        assert torch.equal(again_img, out_img) and torch.equal(again["boxes"], b)
    image, target = random_sample()
    state = torch.get_rng_state()
    tf(image, target, 0)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone


def test_train_transforms_seed_the_cpu_generator_only(monkeypatch):
    """The per-sample seed goes to the CPU generator the transforms draw from (and the fork
    restores): no accelerator generator is reseeded, which torch.manual_seed would do."""
    tf = DetectionTransforms(40, train=True, seed=3)
    image, target = random_sample()
    want_img, want = tf(image, target, 4)

    def fail(*args, **kwargs):
        raise AssertionError("a device generator was seeded")

    monkeypatch.setattr(torch, "manual_seed", fail)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", fail)
    got_img, got = tf(image, target, 4)
    assert torch.equal(got_img, want_img) and torch.equal(got["boxes"], want["boxes"])


def test_sanitize_drops_degenerate_boxes():
    image, target = random_sample(n=3)
    boxes = target["boxes"].clone()
    boxes[1, 2] = boxes[1, 0] + 0.2  # 0.2 px wide
    target["boxes"] = tv_tensors.wrap(boxes, like=target["boxes"])
    _, out = DetectionTransforms(64, train=False)(image, target, 0)
    assert out["boxes"].shape[0] == 2
    assert out["labels"].tolist() == [target["labels"][0].item(), target["labels"][2].item()]


def test_strong_ops_stop_at_stop_epoch():
    tf = DetectionTransforms(32, train=True, stop_epoch=2)
    tf.set_epoch(1)
    assert tf.strong_enabled()
    tf.set_epoch(2)
    assert not tf.strong_enabled()


def test_multiscale_collate():
    batch = [(torch.rand(3, 32, 32), {"image_id": i, "boxes": torch.rand(2, 4)})
             for i in range(3)]
    collate = BatchCollator(scales=[24, 40], seed=1)
    sizes = set()
    for epoch in range(8):
        collate.set_epoch(epoch)
        images, targets = collate(batch)
        assert images.shape[:2] == (3, 3) and images.shape[2] == images.shape[3]
        sizes.add(images.shape[-1])
        again, _ = collate(batch)
        assert torch.equal(again, images)
        assert targets[0]["boxes"] is batch[0][1]["boxes"]
    assert sizes == {24, 40}
    images, _ = BatchCollator()(batch)
    assert torch.equal(images, torch.stack([b[0] for b in batch]))
    with pytest.raises(ValueError, match="one shape"):
        BatchCollator()([(torch.rand(3, 8, 8), {}), (torch.rand(3, 9, 8), {})])
