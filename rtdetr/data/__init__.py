"""Data: COCO-format datasets, box-aware transforms, batch collation and the synthetic-shapes
generator (the embedded default dataset: nothing is downloaded)."""
from rtdetr.data.coco import CocoDetection, DatasetError, load_coco_json
from rtdetr.data.collate import BatchCollator
from rtdetr.data.synthetic import generate_shapes_dataset
from rtdetr.data.transforms import DetectionTransforms

__all__ = ["BatchCollator", "CocoDetection", "DatasetError", "DetectionTransforms",
           "generate_shapes_dataset", "load_coco_json"]
