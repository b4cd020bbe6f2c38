"""Model configuration: dataclasses mapped 1:1 onto the ``model:`` section of a YAML config, and
``build_model(cfg) -> (model, criterion, postprocessor)``.

Unknown keys are errors that name the key; other top-level sections of a config file (``data:``,
``train:``...) are ignored here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from rtdetr.config_schema import from_dict, to_dict
from rtdetr.models.backbone import build_backbone
from rtdetr.models.criterion import RTDETRCriterion
from rtdetr.models.decoder import RTDETRDecoder
from rtdetr.models.hybrid_encoder import HybridEncoder
from rtdetr.models.matcher import HungarianMatcher
from rtdetr.models.postprocessor import RTDETRPostProcessor
from rtdetr.models.rtdetr import RTDETR


class _FromDict:
    @classmethod
    def from_dict(cls, d: dict | None, where: str = "model"):
        """Build from a mapping; nested sections become their dataclasses; unknown keys and values
        of the wrong type raise ConfigError (a ValueError) naming the key."""
        return from_dict(cls, d, where)

    def to_dict(self) -> dict:
        return to_dict(self)


@dataclass
class BackboneConfig(_FromDict):
    """``name``: presnet18/34/50 or ghostnetv3. Every other key left null takes the backbone's
    default; set keys are passed to its constructor (PResNet: return_idx, freeze_at, freeze_norm,
    pretrained; GhostNetV3: width, out_indices, normalize_input, drop_rate)."""
    name: str = "presnet18"
    return_idx: list | None = None
    freeze_at: int | None = None
    freeze_norm: bool | None = None
    pretrained: str | None = None
    width: float | None = None
    out_indices: list | None = None
    normalize_input: bool | None = None
    drop_rate: float | None = None

    def kwargs(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "name" and v is not None}


@dataclass
class EncoderConfig(_FromDict):
    hidden_dim: int = 256
    use_encoder_idx: list = field(default_factory=lambda: [2])
    num_encoder_layers: int = 1
    nhead: int = 8
    dim_feedforward: int = 1024
    dropout: float = 0.0
    enc_act: str = "gelu"
    pe_temperature: float = 10000.0
    expansion: float = 1.0
    depth_mult: float = 1.0
    act: str = "silu"


@dataclass
class DecoderConfig(_FromDict):
    hidden_dim: int = 256
    num_levels: int = 3
    num_queries: int = 300
    nhead: int = 8
    num_points: int = 4
    num_decoder_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.0
    activation: str = "relu"
    num_denoising: int = 100
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 1.0
    learnt_init_query: bool = False
    eval_idx: int = -1
    eps: float = 1e-2
    aux_loss: bool = True


@dataclass
class MatcherConfig(_FromDict):
    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    alpha: float = 0.25
    gamma: float = 2.0


@dataclass
class CriterionConfig(_FromDict):
    loss_vfl: float = 1.0
    loss_bbox: float = 5.0
    loss_giou: float = 2.0
    alpha: float = 0.75
    gamma: float = 2.0


@dataclass
class PostProcessorConfig(_FromDict):
    num_top_queries: int = 300


@dataclass
class ModelConfig(_FromDict):
    num_classes: int = 80
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    criterion: CriterionConfig = field(default_factory=CriterionConfig)
    postprocessor: PostProcessorConfig = field(default_factory=PostProcessorConfig)


def load_model_config(path: str | Path) -> ModelConfig:
    """The ``model:`` section of a YAML config file (other top-level sections are ignored)."""
    with open(path) as f:
        doc: Any = yaml.safe_load(f)
    if not isinstance(doc, dict) or "model" not in doc:
        raise ValueError(f"config {path} must be a mapping with a top-level 'model:' section")
    return ModelConfig.from_dict(doc["model"])


def build_detector(cfg: ModelConfig) -> RTDETR:
    backbone = build_backbone(cfg.backbone.name, **cfg.backbone.kwargs())
    enc = cfg.encoder
    encoder = HybridEncoder(backbone.out_channels, backbone.out_strides, enc.hidden_dim, enc.nhead,
                            enc.dim_feedforward, enc.dropout, enc.enc_act, enc.use_encoder_idx,
                            enc.num_encoder_layers, enc.pe_temperature, enc.expansion,
                            enc.depth_mult, enc.act)
    dec = cfg.decoder
    decoder = RTDETRDecoder(cfg.num_classes, encoder.out_channels, encoder.out_strides,
                            dec.hidden_dim, dec.num_levels, dec.num_queries, dec.nhead,
                            dec.num_points, dec.num_decoder_layers, dec.dim_feedforward,
                            dec.dropout, dec.activation, dec.num_denoising,
                            dec.label_noise_ratio, dec.box_noise_scale, dec.learnt_init_query,
                            dec.eval_idx, dec.eps, dec.aux_loss)
    return RTDETR(backbone, encoder, decoder)


def build_model(cfg: ModelConfig | dict) -> tuple[RTDETR, nn.Module, nn.Module]:
    """``(model, criterion, postprocessor)`` for a :class:`ModelConfig` (or its dict form)."""
    if isinstance(cfg, dict):
        cfg = ModelConfig.from_dict(cfg)
    matcher = HungarianMatcher(**cfg.matcher.to_dict())
    crit = cfg.criterion
    criterion = RTDETRCriterion(cfg.num_classes, matcher,
                                {"loss_vfl": crit.loss_vfl, "loss_bbox": crit.loss_bbox,
                                 "loss_giou": crit.loss_giou}, crit.alpha, crit.gamma)
    postprocessor = RTDETRPostProcessor(cfg.num_classes, cfg.postprocessor.num_top_queries)
    return build_detector(cfg), criterion, postprocessor
