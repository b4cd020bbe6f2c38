"""A new user's journeys through the ``rtdetr`` command on their own tiny COCO-format data
(category ids 5 and 17, an image without annotations, a non-square image): what used to fail
late, with an unclear message, or not as the README says."""
import json
import os

import pytest
import torch
from PIL import Image, ImageDraw

from rtdetr import cli
from rtdetr.config import load_config
from rtdetr.engine import build_datasets, load_checkpoint, save_checkpoint
from rtdetr.engine.checkpoint import CheckpointError

TINY = ["model.backbone.width=0.5", "model.encoder.hidden_dim=32", "model.encoder.nhead=2",
        "model.encoder.dim_feedforward=64", "model.decoder.hidden_dim=32",
        "model.decoder.nhead=2", "model.decoder.num_decoder_layers=1",
        "model.decoder.dim_feedforward=64", "model.decoder.num_queries=12",
        "model.decoder.num_denoising=6", "model.postprocessor.num_top_queries=12",
        "data.image_size=64", "data.multiscale=null", "train.batch_size=2",
        "train.val_batch_size=2", "train.epochs=1", "train.progress=false"]


def write_coco(root, split: str, n: int = 4) -> tuple[str, str]:
    folder = os.path.join(root, split)
    os.makedirs(folder, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        w, h = (90, 60) if i == 1 else (64, 64)
        im = Image.new("RGB", (w, h), (200, 200, 200))
        if i:  # image 0: no annotations
            cat = 5 if i % 2 else 17
            ImageDraw.Draw(im).rectangle([10, 10, 39, 29], fill=(220, 20, 20))
            anns.append({"id": i, "image_id": i + 1, "category_id": cat,
                         "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0})
        im.save(os.path.join(folder, f"im{i}.png"))
        images.append({"id": i + 1, "file_name": f"im{i}.png", "width": w, "height": h})
    ann = os.path.join(root, f"instances_{split}.json")
    with open(ann, "w") as f:
        json.dump({"images": images, "annotations": anns,
                   "categories": [{"id": 5, "name": "a"}, {"id": 17, "name": "b"}]}, f)
    return folder, ann


def coco_overrides(root) -> list[str]:
    (ti, ta), (vi, va) = write_coco(root, "train"), write_coco(root, "val", 2)
    return ["data.dataset=coco", f"data.train_images={ti}", f"data.train_annotations={ta}",
            f"data.val_images={vi}", f"data.val_annotations={va}", "model.num_classes=2"]


pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch (2 steps) of a tiny detector on the tiny COCO data: (root, last.pth, the
    data overrides)."""
    root = tmp_path_factory.mktemp("journey")
    torch.set_num_threads(1)
    out = root / "run"
    over = coco_overrides(str(root))
    assert cli.main(["train", "--config", "demo", "--output-dir", str(out)] + over + TINY) == 0
    return root, str(out / "last.pth"), over


def test_a_wrong_val_image_folder_fails_before_training(tmp_path):
    """A typo in data.val_images surfaced only at the evaluation after the whole training, and
    the run died before writing its last checkpoint: the training was lost."""
    over = coco_overrides(str(tmp_path))
    cfg = load_config("demo", over + [f"data.val_images={tmp_path / 'valX'}"])
    with pytest.raises(FileNotFoundError, match=r"data\.val_images=.*valX: no such folder"):
        build_datasets(cfg.data)
    os.remove(tmp_path / "val" / "im1.png")
    cfg = load_config("demo", over)
    with pytest.raises(FileNotFoundError, match=r"data\.val_images=.*1 of the 2 image files .*"
                                                 r"are missing, e.g. .*im1\.png"):
        build_datasets(cfg.data)


def test_a_val_image_that_disagrees_with_its_json_fails_before_training(tmp_path):
    """As a missing one: it failed only in the evaluation after the training, which lost the
    last epoch (all of a one-epoch run)."""
    from rtdetr.data import DatasetError
    cfg = load_config("demo", coco_overrides(str(tmp_path)))
    Image.new("RGB", (50, 64)).save(tmp_path / "val" / "im1.png")
    with pytest.raises(DatasetError, match=r"im1\.png \(image id 2\) is 50x64, but .*"
                                           r"instances_val\.json says 90x60"):
        build_datasets(cfg.data)
    with open(tmp_path / "val" / "im1.png", "wb") as f:
        f.write(b"not a png")
    with pytest.raises(DatasetError, match=r"cannot read image .*im1\.png \(image id 2\)"):
        build_datasets(cfg.data)


def test_train_resume_alone_continues_the_run_with_its_own_config(trained, tmp_path,
                                                                  monkeypatch):
    """README: `rtdetr train --resume runs/train/last.pth` continues where a run stopped. It
    loaded the demo config instead (generating the synthetic dataset in the working folder) and
    then failed on the weights of a 2-class model."""
    import rtdetr.engine.train as train_module

    def no_synthetic(*args, **kwargs):
        raise AssertionError("a resumed COCO run generated the synthetic dataset")
    monkeypatch.setattr(train_module, "generate_shapes_dataset", no_synthetic)
    monkeypatch.chdir(tmp_path)
    _, ckpt, _ = trained
    out = tmp_path / "resumed"
    assert cli.main(["train", "--resume", ckpt, "train.epochs=2", "--output-dir", str(out)]) == 0
    state = load_checkpoint(str(out / "last.pth"))
    assert (state["epoch"], state["global_step"]) == (2, 4)
    assert state["label2category"] == {0: 5, 1: 17}


def test_a_checkpoint_of_another_model_config_names_the_difference(trained, tmp_path):
    """It was PyTorch's list of every mismatched tensor (hundreds of lines), no word of the
    cause or of the fix."""
    root, ckpt, _ = trained
    for argv in (["eval", "--checkpoint", ckpt, "model.num_classes=3"],
                 ["predict", "--checkpoint", ckpt, "model.num_classes=3", "--images",
                  str(root / "val"), "--output-dir", str(tmp_path)],
                 ["export", "--checkpoint", ckpt, "--output", str(tmp_path / "m.onnx"),
                  "model.num_classes=3"]):
        with pytest.raises(CheckpointError, match=r"model\.num_classes=3 \(checkpoint: 2\).*"
                                                  r"omit --config and model\.\* overrides"):
            cli.main(argv)


def test_predict_reports_dataset_category_ids_in_original_pixels(trained, tmp_path):
    root, ckpt, _ = trained
    assert cli.main(["predict", "--checkpoint", ckpt, "--images", str(root / "val"),
                     "--output-dir", str(tmp_path), "--score-threshold", "0"]) == 0
    with open(tmp_path / "predictions.json") as f:
        results = json.load(f)
    dets = [d for r in results for d in r["detections"]]
    assert dets and {d["category_id"] for d in dets} <= {5, 17}
    wide = [r for r in results if r["image"].endswith("im1.png")][0]["detections"]
    assert max(d["box_xyxy"][2] for d in wide) > 64  # scaled to the 90 x 60 original


def test_a_full_disk_names_the_checkpoint_and_the_free_space(tmp_path, monkeypatch):
    """torch.save reports a full disk as '[enforce fail at inline_container.cc:672] .
    unexpected pos 2018112 vs 2018016': no file, no cause."""
    def full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 2")
    monkeypatch.setattr(torch, "save", full)
    path = tmp_path / "run" / "last.pth"
    with pytest.raises(OSError, match=r"cannot write checkpoint .*last\.pth \(.* MiB free in "
                                      r".*is the disk full\?\): RuntimeError: \[enforce fail"):
        save_checkpoint({"w": torch.zeros(3)}, str(path))
    assert os.listdir(tmp_path / "run") == []  # no temporary left behind


def test_resuming_a_finished_run_says_there_is_nothing_to_train(trained, tmp_path, capsys,
                                                                monkeypatch):
    """It printed the old metrics table as if it had trained."""
    monkeypatch.chdir(tmp_path)  # (before the fix, the demo config wrote data/shapes here)
    _, ckpt, _ = trained
    assert cli.main(["train", "--resume", ckpt, "--output-dir", str(tmp_path)]) == 0
    assert "has done 1 epochs (2 steps): train.epochs=1 is reached, nothing to train" in \
        capsys.readouterr().out


def test_ctrl_c_says_how_to_continue(trained, tmp_path, monkeypatch, capsys):
    """Ctrl-C was a KeyboardInterrupt traceback, with no word of the checkpoint to resume."""
    from rtdetr.engine import Trainer
    _, _, over = trained
    step = Trainer.train_step

    def interrupted(self, images, targets):
        if self.global_step == 2:  # after the first epoch's checkpoint
            raise KeyboardInterrupt
        return step(self, images, targets)
    monkeypatch.setattr(Trainer, "train_step", interrupted)
    out = tmp_path / "run"
    try:
        rc = cli.main(["train", "--config", "demo", "--output-dir", str(out), "train.epochs=3"]
                      + over + TINY[:-2] + ["train.progress=false"])
    except KeyboardInterrupt:  # not out of the test: it would stop pytest
        rc = "KeyboardInterrupt"
    assert rc == 130
    err = capsys.readouterr().err
    assert f"interrupted at epoch 2, step 2; continue from its last checkpoint with `rtdetr " \
        f"train --resume {out / 'last.pth'}`" in err
    assert load_checkpoint(str(out / "last.pth"))["global_step"] == 2


def test_coco_training_without_a_val_set(tmp_path):
    """Both val paths empty: train without evaluation (it used to insist on all four paths);
    one of the two alone is an error naming the other; eval and demo say they need one."""
    ti, ta = write_coco(str(tmp_path), "train")
    base = ["data.dataset=coco", f"data.train_images={ti}", f"data.train_annotations={ta}",
            "model.num_classes=2"]
    train_set, val_set = build_datasets(load_config("demo", base + TINY).data)
    assert len(train_set) == 4 and val_set is None
    for given, missing in (("val_images", "val_annotations"), ("val_annotations", "val_images")):
        cfg = load_config("demo", base + TINY + [f"data.{given}={ti if 'images' in given else ta}"])
        with pytest.raises(ValueError, match=rf"data\.{missing} must be set with data\.{given}"):
            build_datasets(cfg.data)
    out = tmp_path / "run"
    assert cli.main(["train", "--threads", "1", "--output-dir", str(out), "train.max_steps=1",
                     "train.device=cpu"] + base + TINY) == 0
    assert not (out / "metrics.jsonl").exists() and (out / "last.pth").is_file()
    with pytest.raises(ValueError, match="rtdetr eval needs a validation set"):
        cli.main(["eval", "--checkpoint", str(out / "last.pth")])


def test_ctrl_c_stops_after_the_step_with_a_checkpoint(trained, tmp_path, monkeypatch, capsys):
    """The first Ctrl-C used to lose everything since the last epoch's checkpoint: it now stops
    after the current step with a checkpoint (mid-epoch), and the resumed run ends as an
    uninterrupted one (same losses)."""
    import signal
    from rtdetr.engine import Trainer
    _, _, over = trained
    args = over + TINY[:-2] + ["train.progress=false", "train.epochs=3", "train.ema=false"]
    full = tmp_path / "full"
    assert cli.main(["train", "--config", "demo", "--output-dir", str(full)] + args) == 0
    step = Trainer.train_step

    def ctrl_c_in_step_three(self, images, targets):
        if self.global_step == 2:  # the first step of the second epoch
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, images, targets)
    monkeypatch.setattr(Trainer, "train_step", ctrl_c_in_step_three)
    out = tmp_path / "run"
    assert cli.main(["train", "--config", "demo", "--output-dir", str(out)] + args) == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    err = capsys.readouterr().err
    assert "stopping after this step, with a checkpoint" in err
    assert "interrupted at epoch 2, step 3" in err
    state = load_checkpoint(str(out / "last.pth"))
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 1, 3)
    monkeypatch.setattr(Trainer, "train_step", step)
    assert cli.main(["train", "--resume", str(out / "last.pth")]) == 0
    assert load_checkpoint(str(out / "last.pth"))["losses"] == \
        load_checkpoint(str(full / "last.pth"))["losses"]
