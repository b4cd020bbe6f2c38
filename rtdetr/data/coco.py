"""COCO-format detection dataset: an image folder plus an ``instances`` JSON.

Category ids (any integers, gaps allowed) are mapped to contiguous labels ``0..K-1`` in the order of
the sorted ids; :attr:`CocoDetection.label2category` maps them back for evaluation and predictions.
Crowd annotations are dropped; images without annotations are kept (negatives).

Bad data fails loudly, naming the file and the entry: malformed JSON, a missing key, an entry that
is not an object, a repeated image id, a non-positive image size, an annotation whose
``category_id`` is not in ``categories``, an annotation for an unknown image, a box that is not 4
numbers, has a non-positive size or lies outside its image (beyond ``box_tolerance`` pixels, or
wholly past the border), a missing or unreadable image file. With ``skip_invalid_boxes=True`` bad
boxes are instead dropped and logged (one warning per box, naming the file and the annotation id).
Boxes that overshoot the border by at most ``box_tolerance`` pixels are clamped to the image.
16-bit images (16-bit grayscale PNG/TIFF) are scaled to 8 bits; 32-bit integer or float images
(PIL modes ``I``, ``F``) are an error. Image ids must be ints.

A sample is ``(image, target)``: ``image`` a ``tv_tensors.Image`` (uint8, CHW, RGB) and ``target`` a
dict with ``boxes`` (``tv_tensors.BoundingBoxes``, XYXY pixels), ``labels`` (int64), ``image_id``
(int) and ``orig_size`` (int64 ``[w, h]``), before ``transforms`` (see
:mod:`rtdetr.data.transforms`) turn it into a float image in [0, 1] and normalised cxcywh boxes.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """Malformed or inconsistent dataset content (names the file and the entry)."""


def load_coco_json(ann_file: str) -> dict:
    """Read and structurally validate a COCO instances file."""
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {ann_file}") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{ann_file}: malformed JSON at line {exc.lineno} column {exc.colno}: "
                           f"{exc.msg}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{ann_file}: expected a JSON object with 'images', 'annotations', "
                           f"'categories', got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{ann_file}: missing or non-list key {key!r}")
    for key in ("images", "annotations", "categories"):
        for i, entry in enumerate(data[key]):
            if not isinstance(entry, dict):
                raise DatasetError(f"{ann_file}: {key}[{i}] must be a JSON object, got "
                                   f"{type(entry).__name__} {entry!r}")
    seen_ids: dict = {}
    for i, img in enumerate(data["images"]):
        for key in ("id", "file_name", "width", "height"):
            if key not in img:
                raise DatasetError(f"{ann_file}: images[{i}] lacks {key!r}: {img}")
        for key in ("width", "height"):
            img[key] = v = _whole(img[key])
            if not _is_int(v) or v <= 0:
                raise DatasetError(f"{ann_file}: images[{i}] (id {img['id']}) has {key} "
                                   f"{v!r}, expected a positive int")
        img["id"] = v = _whole(img["id"])
        if not _is_int(v):
            # targets, evaluation and the batch collator use int(image_id): 1.5 would become 1
            raise DatasetError(f"{ann_file}: images[{i}] has id {v!r}, expected an int")
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            raise DatasetError(f"{ann_file}: images[{i}] (id {v}) has file_name "
                               f"{img['file_name']!r}, expected a non-empty string")
        if img["id"] in seen_ids:
            raise DatasetError(f"{ann_file}: images[{i}] repeats image id {img['id']} of "
                               f"images[{seen_ids[img['id']]}]")
        seen_ids[img["id"]] = i
    for i, ann in enumerate(data["annotations"]):
        for key in ("image_id", "category_id", "bbox"):
            if key not in ann:
                raise DatasetError(f"{ann_file}: annotations[{i}] (id {ann.get('id')}) lacks "
                                   f"{key!r}")
        ann["category_id"] = _whole(ann["category_id"])
    for i, cat in enumerate(data["categories"]):
        if "id" not in cat:
            raise DatasetError(f"{ann_file}: categories[{i}] lacks 'id'")
        cat["id"] = v = _whole(cat["id"])
        if not _is_int(v):
            # labels map to sorted ids, evaluation and predict report them as COCO's int ids
            raise DatasetError(f"{ann_file}: categories[{i}] has id {v!r}, expected an int")
    return data


def _whole(value):
    """``value``, as an int when it is a whole float (some tools write 640.0 for 640)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB. 16-bit images (modes ``I;16*``, e.g. 16-bit grayscale PNG or TIFF) are
    scaled to 8 bits (``v / 257``) first: PIL's own ``convert("RGB")`` clips them at 255, which
    turns almost every pixel white. A mode ``I`` PNG is the same 16-bit data (older Pillow releases
    opened 16-bit grayscale PNGs as ``I``; PNG holds at most 16 bits). Other 32-bit integer or
    float images (modes ``I``, ``F``, e.g. from TIFF) have no known range (a float image in [0, 1]
    would come out black): a ValueError."""
    sixteen_bit = im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG")
    if im.mode in ("I", "F") and not sixteen_bit:
        kind = "integer" if im.mode == "I" else "float"
        raise ValueError(f"image mode {im.mode!r} (32-bit {kind}) is not supported: expected an "
                         f"8-bit (RGB, L, RGBA, P, ...) or 16-bit (I;16) image")
    if sixteen_bit:
        a = np.asarray(im).astype(np.float32) / 257.0
        im = Image.fromarray(np.rint(a).clip(0, 255).astype(np.uint8), "L")
    return im if im.mode == "RGB" else im.convert("RGB")


def _read_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return to_rgb(im)


def open_rgb(path: str) -> Image.Image:
    """Read an image file fully, as 8-bit RGB (see :func:`to_rgb`). Errors name the file (PIL's
    do not always: "image file is truncated")."""
    try:
        return _read_rgb(path)
    except ValueError as exc:  # an unsupported image mode
        raise ValueError(f"{path}: {exc}") from None
    except OSError as exc:
        if path in str(exc):
            raise
        raise OSError(f"cannot read image {path}: {exc}") from exc


class CocoDetection(torch.utils.data.Dataset):
    def __init__(self, img_folder: str, ann_file: str, transforms: Callable | None = None,
                 skip_invalid_boxes: bool = False, box_tolerance: float = 1.0):
        self.img_folder = img_folder
        self.ann_file = ann_file
        self.transforms = transforms
        data = load_coco_json(ann_file)
        self.categories = sorted(data["categories"], key=lambda c: c["id"])
        ids = [c["id"] for c in self.categories]
        if len(set(ids)) != len(ids):
            raise DatasetError(f"{ann_file}: duplicate category ids in {ids}")
        self.category2label = {cid: i for i, cid in enumerate(ids)}
        self.label2category = {i: cid for i, cid in enumerate(ids)}
        self.class_names = [c.get("name", str(c["id"])) for c in self.categories]
        self.images = data["images"]
        self._index_of_image = {img["id"]: i for i, img in enumerate(self.images)}
        self._boxes = [[] for _ in self.images]
        self._labels = [[] for _ in self.images]
        for ann in data["annotations"]:
            self._add_annotation(ann, skip_invalid_boxes, box_tolerance)

    @property
    def num_classes(self) -> int:
        return len(self.category2label)

    def _add_annotation(self, ann: dict, skip_invalid: bool, tol: float) -> None:
        where = f"{self.ann_file}: annotation id {ann.get('id')}"
        if ann.get("iscrowd", 0):
            return
        if ann["image_id"] not in self._index_of_image:
            raise DatasetError(f"{where} refers to image_id {ann['image_id']}, which is not in "
                               f"'images'")
        if ann["category_id"] not in self.category2label:
            raise DatasetError(f"{where} has category_id {ann['category_id']}, which is not in "
                               f"'categories' (ids {sorted(self.category2label)})")
        idx = self._index_of_image[ann["image_id"]]
        img = self.images[idx]
        w_img, h_img = img["width"], img["height"]
        bbox = ann["bbox"]
        problem = None
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            problem = f"bbox must be [x, y, w, h] (4 numbers), got {bbox!r}"
        else:
            x, y, w, h = (float(v) for v in bbox)
            if not np.isfinite([x, y, w, h]).all() or w <= 0 or h <= 0:
                problem = f"bbox {bbox} has a non-finite or non-positive size"
            elif (x < -tol or y < -tol or x + w > w_img + tol or y + h > h_img + tol
                  # within the tolerance band but wholly past the border: nothing left to clamp
                  or x >= w_img or y >= h_img or x + w <= 0 or y + h <= 0):
                problem = (f"bbox {bbox} (xywh) lies outside image {img['file_name']!r} of size "
                           f"{w_img}x{h_img}")
        if problem:
            if not skip_invalid:
                raise DatasetError(f"{where}: {problem}")
            log.warning("skipping %s: %s", where, problem)
            return
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, float(w_img)), min(y + h, float(h_img))
        self._boxes[idx].append([x0, y0, x1, y1])
        self._labels[idx].append(self.category2label[ann["category_id"]])

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> str:
        return os.path.join(self.img_folder, self.images[index]["file_name"])

    def load_image(self, index: int) -> Image.Image:
        path = self.image_path(index)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: {path} (image id "
                                    f"{self.images[index]['id']} in {self.ann_file})")
        return self._read_checked(index, _read_rgb)

    def check_image_header(self, index: int) -> None:
        """What :meth:`load_image` checks, from the file's header alone (no pixels decoded): a
        DatasetError unless it reads and has the size the JSON says."""
        def header(path):
            with Image.open(path) as im:
                return im

        self._read_checked(index, header)

    def _read_checked(self, index: int, read: Callable[[str], Image.Image]) -> Image.Image:
        """``read(path)`` of image ``index``, whose failure or size other than the JSON's is a
        DatasetError naming the file and the image id."""
        path, image_id = self.image_path(index), self.images[index]["id"]
        try:
            im = read(path)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DatasetError(f"cannot read image {path} (image id {image_id}): {exc}") from None
        expected = (self.images[index]["width"], self.images[index]["height"])
        if im.size != expected:
            raise DatasetError(f"image {path} (image id {image_id}) is {im.size[0]}x{im.size[1]}, "
                               f"but {self.ann_file} says {expected[0]}x{expected[1]}")
        return im

    def raw_target(self, index: int) -> dict:
        img = self.images[index]
        h, w = img["height"], img["width"]
        boxes = torch.tensor(self._boxes[index], dtype=torch.float32).reshape(-1, 4)
        return {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "labels": torch.tensor(self._labels[index], dtype=torch.int64),
            "image_id": int(img["id"]),
            "orig_size": torch.tensor([w, h], dtype=torch.int64),
        }

    def __getitem__(self, index: int):
        im = self.load_image(index)
        image = tv_tensors.Image(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
        target = self.raw_target(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target, index)
        return image, target

