"""COCO mAP through pycocotools: AP, AP50, AP75, AP small/medium/large and the AR numbers.

Predictions come from the postprocessor (labels 0..K-1, xyxy pixels of the original image) and are
mapped back to the dataset's category ids. With several processes the per-image detections are
gathered on every rank (duplicates from a padded sampler are dropped by image id). Non-finite
predicted boxes or scores (a model whose weights diverged) are an error, not a meaningless AP.
"""
from __future__ import annotations

import contextlib
import copy
import io

import torch
from tqdm import tqdm

from rtdetr.engine.distributed import all_gather_objects

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
              "ARl")


def load_coco_gt(ann_file: str):
    from pycocotools.coco import COCO
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(ann_file)


def coco_map(coco_gt, detections: list[dict]) -> dict:
    """COCO bbox metrics of ``detections`` ({image_id, category_id, bbox [x,y,w,h], score})."""
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(detections) if detections else _no_results(coco_gt)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # pycocotools reports -1 where a size bucket has no ground truth; keep that visible as -1.
    return {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}


def _no_results(coco_gt):
    """An empty result set on ``coco_gt``'s images (``loadRes`` fails on an empty list), so
    no detections score like any others: 0 where there is ground truth, -1 where there is none."""
    from pycocotools.coco import COCO
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset.get("images", [])), "annotations": [],
                       "categories": copy.deepcopy(coco_gt.dataset.get("categories", []))}
    coco_dt.createIndex()
    return coco_dt


def to_coco_detections(results: list[dict], image_ids, label2category: dict) -> list[dict]:
    dets = []
    for image_id, res in zip(image_ids, results):
        boxes = res["boxes"].detach().float().cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for label, box, score in zip(res["labels"].tolist(), xywh, res["scores"].tolist()):
            dets.append({"image_id": int(image_id), "category_id": label2category[int(label)],
                         "bbox": [round(v, 3) for v in box], "score": float(score)})
    return dets


@torch.no_grad()
def predict_dataset(model, postprocessor, loader, device, label2category: dict,
                    amp: bool = False, progress: bool = False) -> list[dict]:
    model.eval()
    per_image: dict[int, list] = {}
    # non-finite predicted boxes, scores, and images with any: summed on the device, read once
    bad = torch.zeros(3, dtype=torch.long, device=device)
    for images, targets in tqdm(loader, desc="eval", disable=not progress, leave=False):
        images = images.to(device)
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            outputs = model(images)
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        results = postprocessor(outputs, sizes)
        for r in results:
            boxes = (~torch.isfinite(r["boxes"])).any(-1).sum()
            scores = (~torch.isfinite(r["scores"])).sum()
            bad += torch.stack([boxes, scores, (boxes + scores > 0).long()])
        ids = [t["image_id"] for t in targets]
        for image_id, det in zip(ids, [to_coco_detections([r], [i], label2category)
                                       for r, i in zip(results, ids)]):
            per_image[int(image_id)] = det
    bad = dict(zip(("boxes", "scores", "images"), bad.tolist()))
    merged: dict[int, list] = {}
    total = dict.fromkeys(bad, 0)
    for part, part_bad in all_gather_objects((per_image, bad)):  # every rank raises, or none
        merged.update(part)
        for key in total:
            total[key] += part_bad[key]
    if total["images"]:
        raise FloatingPointError(
            f"the model predicted {total['boxes']} non-finite boxes and {total['scores']} "
            f"non-finite scores (NaN/inf) on {total['images']} of {len(merged)} images: its "
            f"weights are not finite, most likely because training diverged (lower train.lr); "
            f"an AP of these predictions would mean nothing")
    return [d for image_id in sorted(merged) for d in merged[image_id]]


def evaluate(model, postprocessor, loader, device, ann_file: str, label2category: dict,
             amp: bool = False, progress: bool = False) -> dict:
    dets = predict_dataset(model, postprocessor, loader, device, label2category, amp, progress)
    return coco_map(load_coco_gt(ann_file), dets)
