"""Run configuration: ``Config(model, data, train)`` dataclasses loaded from YAML plus ``key=value``
overrides with dotted keys (``train.lr=2e-4 data.image_size=320``).

Values are type-checked against the dataclass annotations (ints accepted for floats, YAML lists for
lists and tuples, ``null`` for optional fields); an unknown key is an error that names the key, the
section and the valid keys. Once loaded (overrides applied), values that would only fail later are
checked (:func:`check_config`): counts below their minimum (``train.val_batch_size=0`` would
otherwise fail only when evaluation starts, after all the training), real values that are not
finite or outside their range (``train.lr=nan``, ``train.ema_decay=1.5``) and an unknown
``train.device``. ``--config NAME`` resolves to ``rtdetr/configs/NAME.yaml`` when NAME is not a
file.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import yaml

from rtdetr.config_schema import ConfigError, _unknown_key, convert, from_dict, to_dict
from rtdetr.models.config import ModelConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


@dataclass
class DataConfig:
    dataset: Literal["synthetic", "coco"] = "synthetic"
    root: str = "data/shapes"              # synthetic: where the generator writes
    train_images: str = ""                 # coco: image folder and instances JSON
    train_annotations: str = ""
    val_images: str = ""
    val_annotations: str = ""
    image_size: int = 640                  # square train/eval input (aspect not kept)
    multiscale: Optional[list[int]] = None  # batch-level square sizes; null disables
    multiscale_stop_epoch: Optional[int] = None
    stop_epoch: Optional[int] = None       # from this epoch on: no distort/zoom-out/IoU crop
    photometric: bool = True
    zoom_out: bool = True
    zoom_out_max: float = 4.0
    iou_crop: bool = True
    flip: bool = True
    skip_invalid_boxes: bool = False
    synthetic_num_train: int = 800
    synthetic_num_val: int = 100
    synthetic_image_size: int = 128
    synthetic_num_classes: int = 3
    synthetic_seed: int = 0


@dataclass
class TrainConfig:
    epochs: int = 72
    batch_size: int = 4                    # per process
    val_batch_size: int = 8
    num_workers: int = 0
    lr: float = 1e-4
    backbone_lr: Optional[float] = 1e-5    # null: backbone at lr (RT-DETRv2)
    backbone_prefix: str = "backbone."
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 2000
    lr_milestones: list[int] = field(default_factory=list)  # in optimizer steps
    lr_gamma: float = 0.1
    clip_max_norm: float = 0.1
    amp: bool = True                       # only on CUDA
    ema: bool = True
    ema_decay: float = 0.9999
    ema_warmups: int = 2000
    seed: int = 0
    max_steps: int = 0                     # stop after this many steps in total (0: no limit)
    checkpoint_every_steps: int = 0        # also checkpoint mid-epoch (0: only per epoch)
    eval_every_epochs: int = 1             # 0: evaluate only after the last epoch
    sync_bn: bool = False
    find_unused_parameters: bool = False
    device: str = "auto"
    output_dir: str = "runs/train"
    progress: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ------------------------------------------------------------------------------------ checks

# The smallest value each count accepts.
MIN_VALUES = {"train.epochs": 1, "train.batch_size": 1, "train.val_batch_size": 1,
              "train.num_workers": 0}
DEVICES = "'auto', 'cpu', 'cuda' or 'cuda:N' (N: a GPU index)"
# Finite real values and the range each accepts (nan and +-inf never pass): (range, test)
FLOAT_RANGES = {
    "train.lr": ("> 0", lambda v: v > 0),
    "train.backbone_lr": (">= 0 (or null: train.lr)", lambda v: v is None or v >= 0),
    "train.weight_decay": (">= 0", lambda v: v >= 0),
    "train.lr_gamma": ("> 0", lambda v: v > 0),
    "train.clip_max_norm": (">= 0 (0: no clipping)", lambda v: v >= 0),
    "train.ema_decay": ("in [0, 1)", lambda v: 0 <= v < 1),
    "data.zoom_out_max": (">= 1", lambda v: v >= 1),
}


def check_device_name(name: str, key: str = "train.device") -> None:
    """ConfigError naming ``key`` unless ``name`` is 'auto' or a torch device string."""
    if name == "auto":
        return
    try:
        torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{key} must be {DEVICES}, got {name!r}") from None


def check_config(cfg: Config) -> Config:
    """Reject values that fit their type but not their use (ConfigError naming the key, the
    accepted range and the value), so that they fail when the run starts, not hours into it."""
    def value_of(key: str):
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)

    for key, low in MIN_VALUES.items():
        value = value_of(key)
        if value < low:
            raise ConfigError(f"{key} must be >= {low}, got {value!r}")
    for key, (accepted, ok) in FLOAT_RANGES.items():
        value = value_of(key)
        if not (value is None or math.isfinite(value)) or not ok(value):
            raise ConfigError(f"{key} must be a finite number {accepted}, got {value!r}")
    if not all(math.isfinite(b) and 0 <= b < 1 for b in cfg.train.betas):
        raise ConfigError(f"train.betas must be two numbers in [0, 1), got {cfg.train.betas!r}")
    check_device_name(cfg.train.device)
    return cfg


# ----------------------------------------------------------------------------------------- loading

def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r} has an empty key")
    return key.strip(), raw


def parse_args_with_overrides(parser, argv):
    """``parser.parse_args(argv)`` where the ``key=value`` words of a positional ``overrides``
    may come in several runs between options (``train a=1 --resume x b=2``, which argparse alone
    rejects); an unknown option (or any leftover word where the parser takes no overrides) is
    still a usage error."""
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def apply_override(cfg, key: str, raw: str):
    """Set dotted ``key`` on dataclass ``cfg`` from the string ``raw`` (YAML-parsed unless the
    field is a string)."""
    parts = key.split(".")
    node, where = cfg, ""
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"override {key!r}: {where} is not a section")
        names = {f.name for f in dataclasses.fields(node)}
        if part not in names:
            raise _unknown_key(part, type(node), where)
        where = f"{where}.{part}" if where else part
        if i < len(parts) - 1:
            node = getattr(node, part)
    tp = typing.get_type_hints(type(node))[parts[-1]]
    if tp is str or (typing.get_origin(tp) is Literal and all(isinstance(a, str)
                                                               for a in typing.get_args(tp))):
        value = raw
    else:
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}={raw!r}: not valid YAML ({exc})") from None
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp) \
                and value is not None:
            value = raw
    setattr(node, parts[-1], convert(value, tp, where))
    return cfg


class _NoRepeatsLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key repeated in one mapping: PyYAML keeps the last one
    silently, so a second ``train:`` section would drop every setting of the first."""


def _mapping_without_repeats(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden
            continue
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, typing.Hashable) and key in seen:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, f"found key {key!r} twice",
                key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_NoRepeatsLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _mapping_without_repeats)


def resolve_config_path(name: str) -> str:
    if os.path.isfile(name):
        return name
    for candidate in (os.path.join(CONFIG_DIR, name), os.path.join(CONFIG_DIR, name + ".yaml")):
        if os.path.isfile(candidate):
            return candidate
    known = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml")) \
        if os.path.isdir(CONFIG_DIR) else []
    raise FileNotFoundError(f"config {name!r} is neither a file nor a built-in config "
                            f"(built-in: {', '.join(known) or 'none'})")


def load_config(path: str | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Config from a YAML file (or built-in name; None: defaults) plus ``key=value`` overrides."""
    data = {}
    if path is not None:
        path = resolve_config_path(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.load(f, Loader=_NoRepeatsLoader) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping with model/data/train")
    try:
        cfg = from_dict(Config, data)
        for text in overrides:
            apply_override(cfg, *parse_override(text))
        check_config(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
    return cfg


def dump_config(cfg: Config, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def config_for_checkpoint(path: str | None, overrides: list[str] | tuple, state: dict | None,
                          default: str | None = None) -> Config:
    """The config of a command that loads a checkpoint: ``path`` (``--config``) when given, else
    the config the checkpoint's ``state`` was trained with, else ``default`` (None: the
    defaults); then the overrides, checked as :func:`load_config` checks them."""
    if path is None and state is not None and "config" in state:
        cfg = from_dict(Config, state["config"])
        for text in overrides:
            apply_override(cfg, *parse_override(text))
        return check_config(cfg)
    return load_config(path if path is not None else default, overrides)
