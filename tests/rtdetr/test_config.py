"""Config loading from YAML, dotted key=value overrides, type checks and unknown-key errors."""
import pytest

from rtdetr.config import Config, ConfigError, load_config, resolve_config_path


def test_defaults_and_builtin_demo():
    cfg = load_config()
    assert isinstance(cfg, Config) and cfg.train.ema_decay == 0.9999
    assert cfg.train.warmup_steps == 2000 and cfg.train.clip_max_norm == 0.1
    demo = load_config("demo")
    assert demo.model.num_classes == 3 and demo.model.backbone.name == "ghostnetv3"
    assert resolve_config_path("demo").endswith("demo.yaml")


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_classes: 5\ntrain:\n  lr: 2.0e-4\n  betas: [0.8, 0.9]\n"
                    "data:\n  multiscale: [32, 48]\n")
    cfg = load_config(str(path), ["train.lr=1e-3", "train.epochs=3", "data.multiscale=null",
                                  "model.decoder.num_queries=7", "train.backbone_lr=null",
                                  "data.root=123", "model.backbone.pretrained=some/file.pth",
                                  "train.amp=false"])
    assert cfg.model.num_classes == 5 and cfg.train.betas == (0.8, 0.9)
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 3 and cfg.data.multiscale is None
    assert cfg.model.decoder.num_queries == 7 and cfg.train.backbone_lr is None
    assert cfg.data.root == "123" and cfg.model.backbone.pretrained == "some/file.pth"
    assert cfg.train.amp is False


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", r"unknown key 'lrr' in train \(did you mean 'lr'\?\)"),
    ("trian.lr=1", r"unknown key 'trian'"),
    ("model.decoder.foo=1", r"unknown key 'foo' in model.decoder"),
    ("train.epochs=1.5", r"train.epochs must be an int, got float 1.5"),
    ("train.amp=maybe", r"train.amp must be true or false"),
    ("train.lr=fast", r"train.lr must be a number"),
    ("data.dataset=imagenet", r"data.dataset must be one of \['synthetic', 'coco'\]"),
    ("train.betas=[1]", r"train.betas must have 2 items"),
    ("train.epochs", r"must look like section.key=value"),
    ("train.lr.x=1", r"train.lr is not a section"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_key_in_file_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'epochz' in train"):
        load_config(str(path))
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(str(path))
    with pytest.raises(FileNotFoundError, match="neither a file nor a built-in config"):
        load_config("no_such_config")


@pytest.mark.parametrize("override, message", [
    ("train.val_batch_size=0", r"train\.val_batch_size must be >= 1, got 0"),
    ("train.batch_size=-2", r"train\.batch_size must be >= 1, got -2"),
    ("train.epochs=0", r"train\.epochs must be >= 1, got 0"),
    ("train.num_workers=-1", r"train\.num_workers must be >= 0, got -1"),
    ("train.device=tpu", r"train\.device must be 'auto', 'cpu', 'cuda' or 'cuda:N'.*got 'tpu'"),
    ("train.device=cuda:x", r"train\.device must be .*got 'cuda:x'"),
])
def test_values_out_of_range_are_rejected_when_loading(tmp_path, override, message):
    """Values that fit their type but would fail only later (val_batch_size=0: when evaluation
    starts, after all the training; an unknown device: in torch's own words) fail at load time,
    naming the key, what is accepted and the value; from a file as from an override."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
    key, value = override.split("=")
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  {key.split('.')[1]}: {value}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: " + message):
        load_config(str(path))


def test_values_at_the_edge_of_their_range_are_accepted():
    cfg = load_config(None, ["train.val_batch_size=1", "train.batch_size=1", "train.epochs=1",
                             "train.num_workers=0", "train.device=cpu"])
    assert cfg.train.val_batch_size == cfg.train.batch_size == cfg.train.epochs == 1
    for device in ("auto", "cuda", "cuda:1", "cpu"):  # syntax only: no GPU needed to load
        assert load_config(None, [f"train.device={device}"]).train.device == device


def test_repeated_key_in_file_is_an_error(tmp_path):
    """PyYAML keeps the last of two equal keys: a second `train:` section silently dropped every
    setting of the first. Now an error naming the file and the key; YAML merge keys still work."""
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  epochs: 3\ndata:\n  image_size: 64\ntrain:\n  lr: 0.5\n")
    with pytest.raises(ConfigError, match=r"(?s)twice\.yaml.*found key 'train' twice"):
        load_config(str(path))
    path.write_text("train:\n  epochs: 3\n  epochs: 4\n")
    with pytest.raises(ConfigError, match="found key 'epochs' twice"):
        load_config(str(path))
    path.write_text("model:\n  num_classes: 5\n  decoder: &dec {num_queries: 7, nhead: 4}\n"
                    "  encoder: {nhead: 4}\ntrain: {epochs: 3, lr: 0.5}\n"
                    "data: {<<: {image_size: 64, flip: false}, image_size: 96}\n")
    cfg = load_config(str(path))
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.5 and cfg.model.decoder.num_queries == 7
    assert cfg.data.image_size == 96 and cfg.data.flip is False


@pytest.mark.parametrize("override, message", [
    ("train.lr=nan", r"train\.lr must be a finite number > 0, got nan"),
    ("train.lr=.inf", r"train\.lr must be a finite number > 0, got inf"),
    ("train.lr=0", r"train\.lr must be a finite number > 0, got 0"),
    ("train.backbone_lr=-1e-5", r"train\.backbone_lr must be a finite number >= 0"),
    ("train.weight_decay=-0.1", r"train\.weight_decay must be a finite number >= 0"),
    ("train.lr_gamma=0", r"train\.lr_gamma must be a finite number > 0"),
    ("train.clip_max_norm=-1", r"train\.clip_max_norm must be a finite number >= 0"),
    ("train.ema_decay=1", r"train\.ema_decay must be a finite number in \[0, 1\), got 1"),
    ("train.betas=[0.9, 1.5]", r"train\.betas must be two numbers in \[0, 1\)"),
    ("data.zoom_out_max=0.5", r"data\.zoom_out_max must be a finite number >= 1, got 0.5"),
])
def test_real_values_out_of_range_or_not_finite_are_rejected(override, message):
    """train.lr=nan used to load and train to NaN weights; a decay of 1 freezes the EMA."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_real_values_in_range_are_accepted():
    cfg = load_config(None, ["train.backbone_lr=null", "train.weight_decay=0",
                             "train.clip_max_norm=0", "train.ema_decay=0", "train.betas=[0, 0.5]",
                             "data.zoom_out_max=1"])
    assert cfg.train.backbone_lr is None and cfg.train.ema_decay == 0.0
    for name in ("demo", "rtdetr_r18vd", "rtdetr_ghostnetv3_100"):
        load_config(name)
