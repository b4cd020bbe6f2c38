"""Data-pipeline review regressions: each test failed before its fix."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

import rtdetr.data.synthetic as synthetic
from rtdetr.data import CocoDetection, DatasetError, DetectionTransforms, generate_shapes_dataset
from rtdetr.data.coco import open_rgb
from rtdetr.data.transforms import sample_seed


def write_coco(root, images, annotations=(), categories=({"id": 1, "name": "c"},)):
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    for im in images:
        arr = np.zeros((im["height"], im["width"], 3), np.uint8)
        Image.fromarray(arr).save(os.path.join(root, "img", str(im["file_name"])))
    ann = os.path.join(root, "ann.json")
    with open(ann, "w") as f:
        json.dump({"images": list(images), "annotations": list(annotations),
                   "categories": list(categories)}, f)
    return os.path.join(root, "img"), ann


# ---------------------------------------------------------------------------------- transforms

def sample(fmt="XYXY", box=(10.0, 10.0, 30.0, 20.0)):
    image = tv_tensors.Image(torch.randint(0, 256, (3, 40, 80), dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes(torch.tensor([box]), format=fmt, canvas_size=(40, 80))
    return image, {"boxes": boxes, "labels": torch.tensor([1])}


def test_transforms_without_an_index_are_random():
    """Without an index the call ran under a fork of the global generator that was restored
    afterwards: every call drew the same numbers, so every sample got the same flip."""
    tf = DetectionTransforms(32, train=True, photometric=False, zoom_out=False, iou_crop=False)
    image, target = sample()
    torch.manual_seed(0)
    xs = {round(tf(image, target)[1]["boxes"][0, 0].item(), 4) for _ in range(24)}
    assert len(xs) == 2  # flipped and not flipped


@pytest.mark.parametrize("fmt, box", [("XYWH", (10.0, 10.0, 20.0, 10.0)),
                                      ("CXCYWH", (20.0, 15.0, 20.0, 10.0))])
@pytest.mark.parametrize("train", [False, True])
def test_bounding_boxes_in_any_format(fmt, box, train):
    """tv_tensors.BoundingBoxes in XYWH/CXCYWH were read as XYXY at the end: wrong (even
    negative) normalised boxes, silently."""
    tf = DetectionTransforms(40, train=train, seed=1)
    image, want_target = sample()
    _, want = tf(image, want_target, 3)
    _, got = tf(image, sample(fmt, box)[1], 3)
    torch.testing.assert_close(got["boxes"], want["boxes"])
    if not train:
        torch.testing.assert_close(got["boxes"], torch.tensor([[0.25, 0.375, 0.25, 0.25]]))


@pytest.mark.parametrize("index", [np.int64(3), np.int32(3), torch.tensor(3)],
                         ids=["np.int64", "np.int32", "tensor"])
def test_integer_like_sample_index(index):
    """A NumPy index (e.g. Subset(dataset, np.arange(n))) overflowed in the seed arithmetic:
    'Python int too large to convert to C long'."""
    assert sample_seed(5, 2, index) == sample_seed(5, 2, 3)
    tf = DetectionTransforms(32, train=True, seed=5)
    image, target = sample()
    got_img, got = tf(image, target, index)
    want_img, want = tf(image, target, 3)
    assert torch.equal(got_img, want_img) and torch.equal(got["boxes"], want["boxes"])


# ---------------------------------------------------------------------------------- COCO

@pytest.mark.parametrize("image_id, match", [
    (1.5, r"images\[0\] has id 1\.5, expected an int"),
    ("a1", r"images\[0\] has id 'a1', expected an int"),
    (None, r"images\[0\] has id None, expected an int"),
])
def test_image_id_must_be_an_int(tmp_path, image_id, match):
    """int(image_id) in the target turned 1.5 into 1 (another image's id for evaluation and
    the collator): a silent mix-up; a string id failed late with a bare int() error."""
    images = [{"id": image_id, "file_name": "a.png", "width": 40, "height": 30}]
    anns = [{"id": 1, "image_id": image_id, "category_id": 1, "bbox": [1, 1, 5, 5]}]
    with pytest.raises(DatasetError, match=r"ann\.json: " + match):
        CocoDetection(*write_coco(str(tmp_path), images, anns))


def test_integral_float_image_id_and_bad_file_name(tmp_path):
    images = [{"id": 7.0, "file_name": "a.png", "width": 40, "height": 30}]
    anns = [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [1, 1, 5, 5]}]
    _, target = CocoDetection(*write_coco(str(tmp_path), images, anns))[0]
    assert target["image_id"] == 7 and target["labels"].tolist() == [0]
    folder, ann = write_coco(str(tmp_path), [{"id": 1, "file_name": "b.png", "width": 4,
                                              "height": 3}])
    data = json.load(open(ann))
    data["images"][0]["file_name"] = 5
    json.dump(data, open(ann, "w"))
    with pytest.raises(DatasetError, match=r"images\[0\] \(id 1\) has file_name 5, expected a "
                                           r"non-empty string"):
        CocoDetection(folder, ann)


@pytest.mark.parametrize("array, mode", [
    (np.linspace(0, 1, 120, dtype=np.float32).reshape(10, 12), "F"),
    ((np.arange(120) * 500).astype(np.int32).reshape(10, 12), "I"),
])
def test_32_bit_images_are_an_error_not_black_or_white(tmp_path, array, mode):
    """A float TIFF in [0, 1] came out all black, a 32-bit integer one clipped to white."""
    folder, ann = write_coco(str(tmp_path), [{"id": 1, "file_name": "a.tif", "width": 12,
                                              "height": 10}])
    path = os.path.join(folder, "a.tif")
    Image.fromarray(array).save(path)
    assert Image.open(path).mode == mode
    with pytest.raises(DatasetError, match=rf"cannot read image .*a\.tif \(image id 1\): image "
                                           rf"mode '{mode}' \(32-bit .*\) is not supported"):
        CocoDetection(folder, ann)[0]
    with pytest.raises(ValueError, match=r"a\.tif: image mode"):
        open_rgb(path)


# ---------------------------------------------------------------------------------- synthetic

ARGS = dict(num_train=3, num_val=2, image_size=32)


def test_interrupted_regeneration_does_not_pass_for_the_old_dataset(tmp_path, monkeypatch):
    """meta.json of the previous arguments survived a rewrite that was interrupted after the
    train split: a call with the previous arguments then reused the other seed's train files."""
    root = str(tmp_path)
    paths = generate_shapes_dataset(root, seed=1, **ARGS)
    want = open(paths["train"][1]).read()
    write_split = synthetic._write_split

    def interrupted(root, split, *args):
        if split == "val":
            raise KeyboardInterrupt
        return write_split(root, split, *args)

    monkeypatch.setattr(synthetic, "_write_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_shapes_dataset(root, seed=2, **ARGS)
    monkeypatch.setattr(synthetic, "_write_split", write_split)
    paths = generate_shapes_dataset(root, seed=1, **ARGS)
    assert open(paths["train"][1]).read() == want


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_objects=0), r"max_objects must be an int >= 1, got 0"),
    (dict(empty_fraction=1.5), r"empty_fraction must be in \[0, 1\], got 1\.5"),
    (dict(max_overlap_iou=-0.1), r"max_overlap_iou must be in \[0, 1\], got -0\.1"),
])
def test_generator_rejects_bad_arguments(tmp_path, kwargs, match):
    """max_objects=0 failed with numpy's bare 'low >= high'; a negative max_overlap_iou gave a
    dataset of empty images, silently."""
    with pytest.raises(ValueError, match=match):
        generate_shapes_dataset(str(tmp_path), **ARGS, **kwargs)


def test_a_mode_i_png_is_sixteen_bit_data():
    """Older Pillow releases open a 16-bit grayscale PNG as mode 'I' (PNG holds at most 16 bits):
    it is scaled like 'I;16', not rejected as a 32-bit image."""
    from rtdetr.data.coco import to_rgb
    im = Image.fromarray(np.array([[0, 257, 65535, 1000]], dtype=np.int32))
    assert im.mode == "I"
    im.format = "PNG"  # what Image.open sets for a PNG file
    rgb = np.asarray(to_rgb(im))
    assert rgb.shape == (1, 4, 3) and rgb[..., 0].tolist() == [[0, 1, 255, 4]]
    assert (rgb == rgb[..., :1]).all()


@pytest.mark.parametrize("bad", ["3", None, 2.5, True])
def test_category_ids_must_be_ints(tmp_path, bad):
    """A string category id trained, then failed in predict's int(); mixed int and str ids
    failed with a bare TypeError while sorting."""
    folder, ann = write_coco(str(tmp_path), [{"id": 1, "file_name": "a.png", "width": 8,
                                              "height": 8}],
                             categories=[{"id": 1, "name": "a"}, {"id": bad, "name": "b"}])
    with pytest.raises(DatasetError, match=rf"categories\[1\] has id {bad!r}, expected an int"):
        CocoDetection(folder, ann)


def test_whole_float_category_ids_count_as_ints(tmp_path):
    folder, ann = write_coco(
        str(tmp_path), [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],
        annotations=[{"id": 1, "image_id": 1, "category_id": 7.0, "bbox": [1, 1, 4, 4]}],
        categories=[{"id": 7.0, "name": "a"}, {"id": 2, "name": "b"}])
    ds = CocoDetection(folder, ann)
    assert ds.label2category == {0: 2, 1: 7}
    assert all(type(c) is int for c in ds.label2category.values())
    assert ds[0][1]["labels"].tolist() == [1]


def test_generator_counts_must_be_ints(tmp_path):
    """image_size=64.0 failed deep in NumPy with a bare TypeError."""
    with pytest.raises(TypeError, match=r"image_size must be an int, got 64\.0"):
        generate_shapes_dataset(str(tmp_path), image_size=64.0, num_train=2, num_val=1)
    with pytest.raises(TypeError, match=r"num_train must be an int, got '3'"):
        generate_shapes_dataset(str(tmp_path), num_train="3", num_val=1, image_size=32)


def test_a_corrupt_meta_file_regenerates_the_dataset(tmp_path):
    """A truncated meta.json (a crash while writing it) raised a JSONDecodeError forever."""
    root = str(tmp_path)
    paths = generate_shapes_dataset(root, seed=3, **ARGS)
    want = open(paths["train"][1]).read()
    with open(os.path.join(root, "meta.json"), "w") as f:
        f.write('{"num_train": 3, "num_')
    assert generate_shapes_dataset(root, seed=3, **ARGS) == paths
    assert open(paths["train"][1]).read() == want
    with open(os.path.join(root, "meta.json")) as f:
        assert json.load(f)["seed"] == 3
