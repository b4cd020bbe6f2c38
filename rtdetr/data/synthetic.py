"""Synthetic shapes: a seeded, COCO-format detection dataset written to disk (the embedded default).

Each image has a textured background (smooth colour noise plus faint stripes) and 0..``max_objects``
filled shapes (circle/ellipse, square/rectangle, triangle, and optionally cross and diamond) of
varied size, colour and aspect ratio. Shapes may overlap partially (IoU with earlier shapes at most
``max_overlap_iou``); about ``empty_fraction`` of the images have no objects. Boxes are the exact
axis-aligned extents of the drawn shapes. The output is a pure function of the arguments: the same
seed gives byte-identical files.

Layout under ``root``: ``train/*.png``, ``val/*.png``, ``annotations/instances_{train,val}.json``
and ``meta.json`` (the arguments; a second call with the same arguments reuses the files).
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "diamond")


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    grey = rng.uniform(70, 190, size=(4, 4, 1))
    coarse = np.clip(grey + rng.uniform(-25, 25, size=(4, 4, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    arr = np.asarray(img).astype(np.float32)
    period = rng.uniform(6, 20)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    arr += stripes[..., None] * rng.uniform(5, 20)
    arr += rng.normal(0, 6, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _polygon(kind: str, x0: float, y0: float, x1: float, y1: float, rng: np.random.Generator):
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if kind == "triangle":
        apex = rng.uniform(x0, x1)
        return [(apex, y0), (x1, y1), (x0, y1)] if rng.random() < 0.5 else \
               [(x0, y0), (x1, y0), (apex, y1)]
    if kind == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if kind == "cross":
        tw, th = (x1 - x0) / 6, (y1 - y0) / 6
        return [(cx - tw, y0), (cx + tw, y0), (cx + tw, cy - th), (x1, cy - th), (x1, cy + th),
                (cx + tw, cy + th), (cx + tw, y1), (cx - tw, y1), (cx - tw, cy + th),
                (x0, cy + th), (x0, cy - th), (cx - tw, cy - th)]
    raise ValueError(f"unknown polygon shape {kind!r}")


def _render(rng: np.random.Generator, size: int, num_classes: int, max_objects: int,
            empty_fraction: float, min_frac: float, max_frac: float, max_overlap_iou: float):
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    objects = []
    n = 0 if rng.random() < empty_fraction else int(rng.integers(1, max_objects + 1))
    for _ in range(n):
        for _attempt in range(20):
            label = int(rng.integers(num_classes))
            side = rng.uniform(min_frac, max_frac) * size
            aspect = 1.0 if SHAPES[label] in ("square",) and rng.random() < 0.5 else \
                rng.uniform(0.6, 1.6)
            w, h = side * np.sqrt(aspect), side / np.sqrt(aspect)
            w, h = min(w, size - 2.0), min(h, size - 2.0)
            x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
            box = (round(x0), round(y0), round(x0 + w), round(y0 + h))
            if all(_iou(box, o[1]) <= max_overlap_iou for o in objects):
                break
        else:
            continue
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if max(abs(c - 128) for c in colour) < 60:  # keep it away from the mid-grey background
            colour = tuple(255 - c if i == 0 else c for i, c in enumerate(colour))
        kind = SHAPES[label]
        bx0, by0, bx1, by1 = box
        if kind == "circle":
            draw.ellipse([bx0, by0, bx1 - 1, by1 - 1], fill=colour)
        elif kind == "square":
            draw.rectangle([bx0, by0, bx1 - 1, by1 - 1], fill=colour)
        else:
            pts = _polygon(kind, bx0, by0, bx1 - 1, by1 - 1, rng)
            draw.polygon([(round(px), round(py)) for px, py in pts], fill=colour)
        objects.append((label, box))
    return img, objects


def _write_split(root: str, split: str, num_images: int, seed: int, args: dict) -> str:
    os.makedirs(os.path.join(root, split), exist_ok=True)
    children = np.random.SeedSequence([seed, 0 if split == "train" else 1]).spawn(num_images)
    images, annotations = [], []
    for i, child in enumerate(children):
        rng = np.random.default_rng(child)
        img, objects = _render(rng, **args)
        file_name = f"{i:06d}.png"
        img.save(os.path.join(root, split, file_name), format="PNG", optimize=False)
        images.append({"id": i + 1, "file_name": file_name, "width": img.width,
                       "height": img.height})
        for label, (x0, y0, x1, y1) in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": label + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "area": float((x1 - x0) * (y1 - y0)), "iscrowd": 0})
    categories = [{"id": k + 1, "name": SHAPES[k], "supercategory": "shape"}
                  for k in range(args["num_classes"])]
    ann_file = os.path.join(root, "annotations", f"instances_{split}.json")
    os.makedirs(os.path.dirname(ann_file), exist_ok=True)
    with open(ann_file, "w", encoding="utf-8") as f:
        json.dump({"info": {"description": f"synthetic shapes ({split})", "seed": seed},
                   "images": images, "annotations": annotations, "categories": categories}, f)
    return ann_file


def generate_shapes_dataset(root: str, num_train: int = 800, num_val: int = 100,
                            image_size: int = 128, num_classes: int = 3, seed: int = 0,
                            max_objects: int = 3, empty_fraction: float = 0.1,
                            min_frac: float = 0.25, max_frac: float = 0.55,
                            max_overlap_iou: float = 0.3) -> dict:
    """Write the dataset under ``root`` and return its paths: ``{"train": (img_dir, ann_file),
    "val": (img_dir, ann_file), "classes": [...]}``."""
    for name, v in (("num_train", num_train), ("num_val", num_val), ("image_size", image_size),
                    ("num_classes", num_classes), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {v!r}")
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in [1, {len(SHAPES)}], got {num_classes}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train}, {num_val}")
    if not 0 < min_frac <= max_frac <= 1:
        raise ValueError(f"need 0 < min_frac <= max_frac <= 1, got {min_frac}, {max_frac}")
    if isinstance(max_objects, bool) or not isinstance(max_objects, int) or max_objects < 1:
        raise ValueError(f"max_objects must be an int >= 1, got {max_objects!r}")
    for name, v in (("empty_fraction", empty_fraction), ("max_overlap_iou", max_overlap_iou)):
        if not 0 <= v <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {v!r}")
    params = dict(num_train=num_train, num_val=num_val, image_size=image_size,
                  num_classes=num_classes, seed=seed, max_objects=max_objects,
                  empty_fraction=empty_fraction, min_frac=min_frac, max_frac=max_frac,
                  max_overlap_iou=max_overlap_iou, version=2)
    paths = {split: (os.path.join(root, split),
                     os.path.join(root, "annotations", f"instances_{split}.json"))
             for split in ("train", "val")}
    paths["classes"] = list(SHAPES[:num_classes])
    meta_file = os.path.join(root, "meta.json")
    if os.path.isfile(meta_file):
        try:
            with open(meta_file, encoding="utf-8") as f:
                same = json.load(f) == params
        except ValueError:  # truncated or corrupt (a crash while writing it): regenerate
            same = False
        if same and all(os.path.isfile(paths[s][1]) for s in ("train", "val")):
            return paths
        os.remove(meta_file)  # stale: an interrupted rewrite must not pass for these files
    render_args = dict(size=image_size, num_classes=num_classes, max_objects=max_objects,
                       empty_fraction=empty_fraction, min_frac=min_frac, max_frac=max_frac,
                       max_overlap_iou=max_overlap_iou)
    _write_split(root, "train", num_train, seed, render_args)
    _write_split(root, "val", num_val, seed, render_args)
    with open(meta_file + ".tmp", "w", encoding="utf-8") as f:
        json.dump(params, f)
    os.replace(meta_file + ".tmp", meta_file)  # whole or absent
    return paths
