"""Run configuration: ``Config(model, data, train)`` dataclasses loaded from YAML plus ``key=value``
overrides with dotted keys (``train.lr=2e-4 data.image_size=320``).

Values are type-checked against the dataclass annotations (ints accepted for floats, YAML lists for
lists and tuples, ``null`` for optional fields); an unknown key is an error that names the key, the
section and the valid keys. ``--config NAME`` resolves to ``rtdetr/configs/NAME.yaml`` when NAME is
not a file.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from rtdetr.models.config import ModelConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


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


# ----------------------------------------------------------------------------------------- loading

def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def convert(value: Any, tp, where: str) -> Any:
    """``value`` checked/converted to annotation ``tp``; ConfigError naming ``where`` otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of "
                          f"{[_type_name(a) for a in args]}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if tp in (list, tuple):
        origin, args = tp, ()
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where} must have {len(args)} items, got {len(value)}")
            return tuple(convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value,
                                                                                       args)))
        item = args[0] if args else Any
        out = [convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {type(value).__name__} {value!r}")
        return value
    return value


def _unknown_key(key: str, cls, where: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown key {key!r} in {where or 'the config'}{hint}; valid keys: "
                       f"{', '.join(names)}")


def from_dict(cls, data: dict | None, where: str = ""):
    """Build dataclass ``cls`` from a mapping, recursively, rejecting unknown keys."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(key, cls, where)
        kwargs[key] = convert(value, hints[key], f"{where}.{key}" if where else key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from exc


def to_dict(cfg) -> dict:
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r} has an empty key")
    return key.strip(), raw


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
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping with model/data/train")
    try:
        cfg = from_dict(Config, data)
        for text in overrides:
            apply_override(cfg, *parse_override(text))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
    return cfg


def dump_config(cfg: Config, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
