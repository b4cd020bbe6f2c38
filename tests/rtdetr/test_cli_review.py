"""Command-line argument handling found wanting in review: overrides between options, --threads
and --score-threshold ranges, `rtdetr export --help`, and image errors that name the file."""
import pytest
import torch

from rtdetr import cli


def test_overrides_may_come_between_options():
    """`rtdetr train a=1 --resume x b=2` takes both overrides (argparse alone rejected b=2 as an
    unrecognized argument); unknown options are still errors."""
    args = cli.parse_args(["train", "train.epochs=2", "--resume", "x.pth", "data.image_size=64",
                           "--output-dir", "o", "train.lr=1e-3"])
    assert args.overrides == ["train.epochs=2", "data.image_size=64", "train.lr=1e-3"]
    assert args.resume == "x.pth" and args.output_dir == "o"
    args = cli.parse_args(["predict", "--checkpoint", "c.pth", "train.device=cpu",
                           "--output-dir", "o", "--images", "a.png"])
    assert args.overrides == ["train.device=cpu"] and args.images == ["a.png"]
    with pytest.raises(SystemExit):
        cli.parse_args(["train", "train.epochs=2", "--resume", "x.pth", "--bogus"])


@pytest.mark.parametrize("argv, name", [
    (["train", "--threads", "-1"], "--threads"),
    (["eval", "--checkpoint", "c.pth", "--threads", "two"], "--threads"),
    (["predict", "--checkpoint", "c", "--images", "a", "--score-threshold", "50"],
     "--score-threshold"),
    (["predict", "--checkpoint", "c", "--images", "a", "--score-threshold", "nan"],
     "--score-threshold"),
])
def test_out_of_range_options_are_usage_errors(capsys, argv, name):
    """A negative --threads failed in torch.set_num_threads without naming the option; a score
    threshold outside [0, 1] silently dropped every detection."""
    with pytest.raises(SystemExit) as info:
        cli.parse_args(argv)
    assert info.value.code == 2 and f"argument {name}" in capsys.readouterr().err


def test_valid_threads_and_threshold_are_accepted():
    args = cli.parse_args(["predict", "--checkpoint", "c", "--images", "a", "--threads", "0",
                           "--score-threshold", "1"])
    assert args.threads == 0 and args.score_threshold == 1.0


def test_export_help_lists_the_export_options(capsys):
    """`rtdetr export --help` showed a stub ("args passed on to rtdetr.export.main"), not the
    options of the export command."""
    with pytest.raises(SystemExit) as info:
        cli.main(["export", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    assert "--checkpoint" in out and "--opset" in out and "--image-size" in out


def test_truncated_image_error_names_the_file(tmp_path):
    """PIL says only "image file is truncated": predict on a folder must say which file."""
    from PIL import Image
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30), (10, 20, 30)).save(good)
    bad = tmp_path / "bad.png"
    raw = good.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(OSError, match="bad.png"):
        cli.predict_images(None, None, [str(bad)], 64, "cpu", [], 0.5, str(tmp_path / "out"))
    (tmp_path / "corrupt.png").write_bytes(b"not an image")
    with pytest.raises(OSError, match="corrupt.png"):
        cli.predict_images(None, None, [str(tmp_path / "corrupt.png")], 64, "cpu", [], 0.5,
                           str(tmp_path / "out"))


def test_override_swallowed_by_images_gets_a_hint(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="put the overrides before --images"):
        cli._image_files([str(tmp_path / "a.png"), "train.device=cpu"])


def test_predict_feeds_the_model_what_evaluation_feeds_it(tmp_path):
    """predict scaled to float before resizing, evaluation resizes the 8-bit image first: the
    same picture reached the model up to ~1/255 apart. Now the inputs are identical."""
    import numpy as np
    from PIL import Image
    from rtdetr.data import DetectionTransforms
    from rtdetr.data.transforms import tv_tensors
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ())))
    path = str(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(path)
    seen = []

    def model(x):
        seen.append(x)
        return {}

    def postprocessor(outputs, sizes):
        return [{"labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
                 "boxes": torch.zeros(0, 4)}]

    cli.predict_images(model, postprocessor, [path], 48, "cpu", [], 0.5, str(tmp_path / "out"))
    image = tv_tensors.Image(torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1))
    boxes = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(37, 53))
    want, _ = DetectionTransforms(48, train=False)(image, {"boxes": boxes,
                                                           "labels": torch.zeros(0).long()})
    assert seen[0].shape == (1, 3, 48, 48)
    assert torch.equal(seen[0][0], want)


def test_bench_exits_1_when_a_row_failed(capsys):
    """A size too small for the model's queries fails every row: the table shows why, and the
    exit status (was 0) says so to a script."""
    assert cli.main(["bench", "--device", "cpu", "--models", "ghost100", "--size", "64",
                     "--modes", "folded eager", "--quick", "--threads", "1"]) == 1
    err = capsys.readouterr().err
    assert "rtdetr bench: 1 of 1 rows failed" in err and "num_queries" in err


def test_predict_skips_an_unreadable_image_and_keeps_the_others(tmp_path, monkeypatch, capsys):
    """One corrupt file in a folder stopped predict: the images before it were drawn but no
    predictions.json was written. Now it is skipped and named, the rest are written, exit 1."""
    import json
    import os
    from PIL import Image
    from rtdetr.config import load_config
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "c.png"):
        Image.new("RGB", (20, 10), (200, 10, 10)).save(folder / name)
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")

    def model(x):
        return {}

    def postprocessor(outputs, sizes):
        return [{"labels": torch.tensor([0]), "scores": torch.tensor([0.9]),
                 "boxes": torch.tensor([[1.0, 2.0, 5.0, 6.0]])}]

    skipped = []
    files = cli._image_files([str(folder)])
    results = cli.predict_images(model, postprocessor, files, 32, "cpu", ["x"], 0.5,
                                 str(tmp_path / "out"), None, skipped)
    assert [os.path.basename(r["image"]) for r in results] == ["a.png", "c.png"]
    assert [os.path.basename(p) for p, _ in skipped] == ["b.png"]
    written = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [os.path.basename(r["image"]) for r in written] == ["a.png", "c.png"]
    with pytest.raises(OSError, match="b.png"):  # without the list: an error, as before
        cli.predict_images(model, postprocessor, files, 32, "cpu", ["x"], 0.5,
                           str(tmp_path / "out2"))

    monkeypatch.setattr(cli, "load_trained_model",
                        lambda *a: (model, postprocessor, {"class_names": ["x"]}))
    monkeypatch.setattr(cli, "_config_from_checkpoint",
                        lambda args, state: load_config("demo", ["train.device=cpu"]))
    import rtdetr.engine
    monkeypatch.setattr(rtdetr.engine, "load_checkpoint", lambda path: {})
    assert cli.main(["predict", "--checkpoint", "c.pth", "--output-dir", str(tmp_path / "o3"),
                     "--images", str(folder)]) == 1
    assert "rtdetr predict: skipped" in capsys.readouterr().err


def test_console_errors_are_one_line_without_a_traceback(tmp_path, monkeypatch, capsys):
    """`rtdetr eval --checkpoint missing.pth` printed a 20-line traceback before the message;
    from the console it is one line, exit 2 (RTDETR_TRACEBACK=1 keeps the traceback)."""
    import sys
    missing = str(tmp_path / "missing.pth")
    monkeypatch.setattr(sys, "argv", ["rtdetr", "eval", "--checkpoint", missing])
    monkeypatch.delenv("RTDETR_TRACEBACK", raising=False)
    assert cli.main() == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rtdetr eval: error: checkpoint not found: {missing}")
    assert "Traceback" not in err
    monkeypatch.setenv("RTDETR_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        cli.main()
    monkeypatch.delenv("RTDETR_TRACEBACK")
    with pytest.raises(FileNotFoundError):  # with argv (scripts, tests): the exception
        cli.main(["eval", "--checkpoint", missing])
