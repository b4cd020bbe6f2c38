"""The synthetic-shapes generator: deterministic per seed, valid COCO, the promised variety."""
import hashlib
import os

import pytest

from rtdetr.data import CocoDetection, generate_shapes_dataset
from rtdetr.engine.evaluate import load_coco_gt

ARGS = dict(num_train=24, num_val=6, image_size=48, num_classes=3, empty_fraction=0.2)


def digest(root):
    h = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            h.update(name.encode())
            h.update(open(os.path.join(folder, name), "rb").read())
    return h.hexdigest()


def test_deterministic_for_a_seed_and_different_across_seeds(tmp_path):
    generate_shapes_dataset(str(tmp_path / "a"), seed=5, **ARGS)
    generate_shapes_dataset(str(tmp_path / "b"), seed=5, **ARGS)
    generate_shapes_dataset(str(tmp_path / "c"), seed=6, **ARGS)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_valid_coco_with_variety(tmp_path):
    paths = generate_shapes_dataset(str(tmp_path), seed=1, **ARGS)
    assert paths["classes"] == ["circle", "square", "triangle"]
    for split, n in (("train", 24), ("val", 6)):
        folder, ann = paths[split]
        coco = load_coco_gt(ann)  # pycocotools accepts it
        assert len(coco.getImgIds()) == n and sorted(coco.getCatIds()) == [1, 2, 3]
        ds = CocoDetection(folder, ann)  # strict: every box inside its image
        counts = [len(ds.raw_target(i)["labels"]) for i in range(len(ds))]
        assert all(c <= 4 for c in counts)
        if split == "train":
            assert 0 in counts and max(counts) >= 2  # negatives and multi-object images
            labels = {int(lab) for i in range(len(ds)) for lab in ds.raw_target(i)["labels"]}
            assert labels == {0, 1, 2}
            sides = [b for i in range(len(ds)) for b in ds.raw_target(i)["boxes"].tolist()]
            widths = [x1 - x0 for x0, _, x1, _ in sides]
            assert min(widths) >= 0.1 * 48 and max(widths) > 2 * min(widths)
        image, _ = ds[0]
        assert image.shape == (3, 48, 48)


def test_reuses_matching_output_and_rejects_bad_arguments(tmp_path):
    paths = generate_shapes_dataset(str(tmp_path), seed=2, **ARGS)
    stamp = os.path.getmtime(paths["train"][1])
    generate_shapes_dataset(str(tmp_path), seed=2, **ARGS)
    assert os.path.getmtime(paths["train"][1]) == stamp
    with pytest.raises(ValueError, match="num_classes must be in"):
        generate_shapes_dataset(str(tmp_path / "x"), num_classes=9)
    with pytest.raises(ValueError, match="image_size must be >= 32"):
        generate_shapes_dataset(str(tmp_path / "x"), image_size=8)
