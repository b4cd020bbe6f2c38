"""Bad data fails with an error that names the file and the entry (or a logged skip)."""
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from rtdetr.data import CocoDetection, DatasetError


def write_coco(root, images, annotations, categories):
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    for im in images:
        arr = np.random.default_rng(0).integers(0, 256, (im["height"], im["width"], 3), np.uint8)
        Image.fromarray(arr).save(os.path.join(root, "img", im["file_name"]))
    ann = os.path.join(root, "ann.json")
    with open(ann, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return os.path.join(root, "img"), ann

IMAGES = [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}]
CATS = [{"id": 1, "name": "c"}]


def make(tmp_path, anns=(), images=IMAGES, cats=CATS):
    return write_coco(str(tmp_path), images, list(anns), cats)


def test_malformed_json(tmp_path):
    ann = tmp_path / "bad.json"
    ann.write_text('{"images": [\n  {"id": 1,,}]}')
    with pytest.raises(DatasetError, match=r"bad\.json: malformed JSON at line 2"):
        CocoDetection(str(tmp_path), str(ann))


def test_missing_section(tmp_path):
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DatasetError, match="'categories'"):
        CocoDetection(str(tmp_path), str(ann))


def test_unknown_category(tmp_path):
    paths = make(tmp_path, [{"id": 7, "image_id": 1, "category_id": 5, "bbox": [1, 1, 5, 5]}])
    with pytest.raises(DatasetError, match=r"ann\.json: annotation id 7 has category_id 5"):
        CocoDetection(*paths)


def rejected_then_skipped(paths, ann_id: int, caplog) -> CocoDetection:
    """Annotation ``ann_id`` of ``paths`` lies outside its image: an error naming it, or with
    skip_invalid_boxes a dataset without it and a logged warning naming it."""
    with pytest.raises(DatasetError,
                       match=rf"annotation id {ann_id}: bbox .* outside image 'a.png'"):
        CocoDetection(*paths)
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(*paths, skip_invalid_boxes=True)
    assert f"annotation id {ann_id}" in caplog.text
    return ds


def test_box_outside_image_error_and_logged_skip(tmp_path, caplog):
    anns = [{"id": 4, "image_id": 1, "category_id": 1, "bbox": [30, 5, 20, 5]},
            {"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}]
    ds = rejected_then_skipped(make(tmp_path, anns), 4, caplog)
    assert "ann.json" in caplog.text
    assert ds[0][1]["labels"].tolist() == [0]


def test_degenerate_box_and_unknown_image(tmp_path):
    with pytest.raises(DatasetError, match="annotation id 2: bbox .* non-positive"):
        CocoDetection(*make(tmp_path, [{"id": 2, "image_id": 1, "category_id": 1,
                                        "bbox": [1, 1, 0, 5]}]))
    with pytest.raises(DatasetError, match="annotation id 3 refers to image_id 9"):
        CocoDetection(*make(tmp_path, [{"id": 3, "image_id": 9, "category_id": 1,
                                        "bbox": [1, 1, 2, 5]}]))


def test_missing_image_file(tmp_path):
    folder, ann = make(tmp_path)
    os.remove(os.path.join(folder, "a.png"))
    ds = CocoDetection(folder, ann)
    with pytest.raises(FileNotFoundError, match=r"a\.png \(image id 1"):
        ds[0]


def test_corrupt_image_file(tmp_path):
    folder, ann = make(tmp_path)
    with open(os.path.join(folder, "a.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(DatasetError, match=r"cannot read image .*a\.png \(image id 1\)"):
        CocoDetection(folder, ann)[0]


def test_image_size_disagrees_with_json(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}]
    folder, ann = make(tmp_path, images=images)
    data = json.load(open(ann))
    data["images"][0]["width"] = 41
    json.dump(data, open(ann, "w"))
    with pytest.raises(DatasetError, match="a.png .* is 40x30, but .* says 41x30"):
        CocoDetection(folder, ann)[0]


def test_repeated_image_id(tmp_path):
    """A second image with the same id would silently take the first one's annotations (and
    pycocotools would keep only one of the two)."""
    images = IMAGES + [{"id": 1, "file_name": "b.png", "width": 20, "height": 20}]
    with pytest.raises(DatasetError, match=r"ann\.json: images\[1\] repeats image id 1"):
        CocoDetection(*make(tmp_path, images=images))


@pytest.mark.parametrize("bad, match", [
    ({"annotations": ["x"]}, r"annotations\[0\] must be a JSON object"),
    ({"images": [{"id": 1, "file_name": "a.png", "width": "40", "height": 30}]},
     r"images\[0\] \(id 1\) has width '40', expected a positive int"),
    ({"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 0}]},
     r"images\[0\] \(id 1\) has height 0"),
    ({"annotations": [{"id": 6, "image_id": 1, "category_id": 1, "bbox": [1, 1, None, 5]}]},
     r"annotation id 6: bbox must be \[x, y, w, h\] \(4 numbers\)"),
], ids=["entry-not-object", "string-width", "zero-height", "null-in-bbox"])
def test_malformed_entries_name_the_file_and_entry(tmp_path, bad, match):
    folder, ann = make(tmp_path)
    data = json.load(open(ann))
    data.update(bad)
    json.dump(data, open(ann, "w"))
    with pytest.raises(DatasetError, match=r"ann\.json: " + match):
        CocoDetection(folder, ann)


def test_integral_float_image_size_is_accepted(tmp_path):
    folder, ann = make(tmp_path)
    data = json.load(open(ann))
    data["images"][0].update(width=40.0, height=30.0)
    json.dump(data, open(ann, "w"))
    assert CocoDetection(folder, ann)[0][0].shape == (3, 30, 40)


def test_box_wholly_past_the_border_within_tolerance(tmp_path, caplog):
    """[40.5, 5, 0.4, 5] in a 40 px wide image ends within the 1 px tolerance but starts past
    the border: clamping would make it an inverted box (x0 40.5 > x1 40)."""
    anns = [{"id": 8, "image_id": 1, "category_id": 1, "bbox": [40.5, 5, 0.4, 5]},
            {"id": 9, "image_id": 1, "category_id": 1, "bbox": [39.5, 5, 1.4, 5]}]
    ds = rejected_then_skipped(make(tmp_path, anns), 8, caplog)
    assert ds[0][1]["boxes"].tolist() == [[39.5, 5, 40, 10]]  # id 9: clamped, kept
