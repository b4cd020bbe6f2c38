"""rtdetr.models: backbones, encoder, decoder, criterion and the assembled detector.

``build_model(cfg)`` (``rtdetr.models.config``) returns ``(model, criterion, postprocessor)``.
"""
from rtdetr.models.backbone import build_backbone
from rtdetr.models.config import ModelConfig, build_detector, build_model, load_model_config
from rtdetr.models.rtdetr import RTDETR

__all__ = ["RTDETR", "ModelConfig", "build_backbone", "build_detector", "build_model",
           "load_model_config"]
