"""Engine: the training loop, COCO evaluation, EMA, atomic checkpoints with exact resumption,
AdamW parameter groups with warm-up, and torchrun/DDP helpers."""
from rtdetr.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from rtdetr.engine.ema import ModelEMA
from rtdetr.engine.evaluate import STAT_NAMES, coco_map, evaluate, load_coco_gt
from rtdetr.engine.optim import build_optimizer, build_scheduler, param_groups
from rtdetr.engine.train import Trainer, build_datasets

__all__ = ["CheckpointError", "ModelEMA", "STAT_NAMES", "Trainer", "build_datasets",
           "build_optimizer", "build_scheduler", "coco_map", "evaluate", "load_checkpoint",
           "load_coco_gt", "param_groups", "save_checkpoint"]
