"""The rtdetr command: argument parsing, delegation, and a tiny end-to-end train -> eval ->
predict with the real model (2 steps, 64 px, on the synthetic dataset)."""
import json
import os

import pytest
import torch

from rtdetr import cli

TINY = ["model.backbone.width=0.5", "model.encoder.hidden_dim=32", "model.encoder.nhead=2",
        "model.encoder.dim_feedforward=64", "model.decoder.hidden_dim=32",
        "model.decoder.nhead=2", "model.decoder.num_decoder_layers=1",
        "model.decoder.dim_feedforward=64", "model.decoder.num_queries=12",
        "model.decoder.num_denoising=6", "model.postprocessor.num_top_queries=12",
        "data.image_size=64", "data.synthetic_image_size=64", "data.synthetic_num_train=6",
        "data.synthetic_num_val=2", "data.multiscale=null", "train.batch_size=3",
        "train.val_batch_size=2", "train.epochs=1", "train.max_steps=2", "train.progress=false"]


pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_parsing():
    p = cli.build_parser()
    a = p.parse_args(["train", "--config", "demo", "train.epochs=2", "data.image_size=96"])
    assert a.command == "train" and a.config == "demo"
    assert a.overrides == ["train.epochs=2", "data.image_size=96"]
    a = p.parse_args(["predict", "--checkpoint", "c.pth", "--images", "x.png", "y"])
    assert a.images == ["x.png", "y"] and a.score_threshold == 0.5
    a = cli.parse_args(["export", "--opset", "17"])
    assert a.args == ["--opset", "17"]
    with pytest.raises(SystemExit):
        cli.parse_args(["train", "--bogus"])
    with pytest.raises(SystemExit):
        p.parse_args(["eval"])  # --checkpoint is required
    with pytest.raises(SystemExit):
        p.parse_args(["fly"])


def test_export_and_bench_pass_their_arguments_on(monkeypatch):
    import rtdetr.benchmark
    import rtdetr.export
    calls = []
    monkeypatch.setattr(rtdetr.export, "main", lambda argv: calls.append(("export", argv)) or 0)
    monkeypatch.setattr(rtdetr.benchmark, "main", lambda argv: calls.append(("bench", argv)))
    assert cli.main(["export", "--opset", "17"]) == 0
    assert cli.main(["bench", "--device", "cpu"]) == 0
    assert calls == [("export", ["--opset", "17"]), ("bench", ["--device", "cpu"])]


def test_train_eval_predict_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    common = [f"data.root={tmp_path / 'shapes'}"] + TINY
    assert cli.main(["train", "--config", "demo", "--output-dir", str(out)] + common) == 0
    assert os.path.isfile(out / "last.pth") and os.path.isfile(out / "config.yaml")
    state = torch.load(out / "last.pth", weights_only=False)
    assert state["global_step"] == 2 and state["class_names"] == ["circle", "square", "triangle"]
    text = capsys.readouterr().out
    assert "AP50" in text
    assert cli.main(["eval", "--checkpoint", str(out / "last.pth")]) == 0
    assert "AP75" in capsys.readouterr().out
    images = tmp_path / "shapes" / "val"
    pred = tmp_path / "pred"
    assert cli.main(["predict", "--checkpoint", str(out / "last.pth"), "--images", str(images),
                     "--output-dir", str(pred), "--score-threshold", "0"]) == 0
    results = json.load(open(pred / "predictions.json"))
    assert len(results) == 2 and all(os.path.isfile(r["annotated"]) for r in results)
    det = results[0]["detections"][0]
    assert det["name"] in ("circle", "square", "triangle") and len(det["box_xyxy"]) == 4
    # the JSON reports the dataset's COCO category ids (synthetic: label + 1), as README says
    assert all(d["category_id"] == d["label"] + 1 for r in results for d in r["detections"])
    # two inputs with one stem (other folder, other extension): two drawings, none overwritten
    first = sorted(os.listdir(images))[0]
    other = tmp_path / "other"
    other.mkdir()
    from PIL import Image
    Image.open(images / first).save(other / (os.path.splitext(first)[0] + ".jpg"))
    assert cli.main(["predict", "--checkpoint", str(out / "last.pth"), "--images",
                     str(images / first), str(other), "--output-dir", str(pred)]) == 0
    results = json.load(open(pred / "predictions.json"))
    assert len({r["annotated"] for r in results}) == 2
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        cli.main(["predict", "--checkpoint", str(out / "last.pth"), "--images", "nope.png"])
    # export without --config builds the model the checkpoint was trained with (as eval and
    # predict do), not rtdetr_r18vd, whose weights do not fit
    onnx_path = tmp_path / "m.onnx"
    assert cli.main(["export", "--checkpoint", str(out / "last.pth"), "--output",
                     str(onnx_path), "--image-size", "64"]) == 0
    assert onnx_path.is_file()


def test_bench_tuned_mode_tunes_then_clears(tmp_path):
    """`rtdetr bench`'s "folded + fused + tuned" row: the detector runs after ghostkernels.tune
    (the note lists the choices) and the tuning is gone afterwards."""
    from ghostkernels import backends
    from rtdetr import benchmark
    assert benchmark.main(["--device", "cpu", "--models", "ghost100", "--size", "160", "--quick",
                           "--modes", "folded + fused + tuned", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "detector.json").read_text())["rows"]
    assert row["implementation"] == "folded + fused + tuned" and row["ms"] > 0
    assert row["note"].startswith("tuned: ") and "ghost_conv=" in row["note"]
    assert "ms_deform_attn=" in row["note"]
    assert not backends._TUNED


def test_bad_train_values_fail_before_any_work(tmp_path):
    """train.val_batch_size=0 (or an unknown train.device) fails at once, not after the whole
    training when evaluation starts; eval/predict check the checkpoint's config + overrides."""
    import argparse
    import dataclasses
    from rtdetr.config import ConfigError, load_config
    out = tmp_path / "run"
    for bad, message in (("train.val_batch_size=0", r"train\.val_batch_size must be >= 1, got 0"),
                         ("train.device=tpu", r"train\.device must be 'auto', 'cpu', 'cuda' or "
                                              r"'cuda:N'.*got 'tpu'")):
        with pytest.raises(ConfigError, match=message):
            cli.main(["train", "--config", "demo", "--output-dir", str(out),
                      f"data.root={tmp_path / 'shapes'}"] + TINY + [bad])
        state = {"config": dataclasses.asdict(load_config("demo"))}
        with pytest.raises(ConfigError, match=message):
            cli._config_from_checkpoint(argparse.Namespace(config=None, overrides=[bad]), state)
    assert not out.exists() and not (tmp_path / "shapes").exists()


def test_predict_folder_reads_the_usual_image_types_but_not_its_own_drawings(tmp_path):
    """A folder gives predict its .tif/.tiff/.gif/.webp/.bmp files as well (any case), but not
    the <name>.pred.png drawings an earlier predict wrote there; files named are always used."""
    from PIL import Image
    names = ["a.png", "b.TIF", "c.tiff", "d.webp", "e.BMP", "f.JPG", "g.jpeg", "h.gif",
             "a.pred.png", "x.PRED.PNG", "notes.txt"]
    for name in names:
        Image.new("RGB", (8, 8)).save(tmp_path / name, format="PNG" if name.endswith(
            ("txt", "PNG")) else None)
    found = [os.path.basename(f) for f in cli._image_files([str(tmp_path)])]
    assert found == ["a.png", "b.TIF", "c.tiff", "d.webp", "e.BMP", "f.JPG", "g.jpeg", "h.gif"]
    assert cli._image_files([str(tmp_path / "a.pred.png")]) == [str(tmp_path / "a.pred.png")]
