"""The ``rtdetr`` command: ``train | eval | predict | export | bench | demo``.

Every sub-command takes ``--config`` (a YAML file or a built-in name from ``rtdetr/configs``) and
``key=value`` overrides with dotted keys, e.g.::

    rtdetr train --config demo train.epochs=2 data.image_size=160
    torchrun --nproc_per_node=2 -m rtdetr train --config demo      # DDP (gloo on CPU)
    rtdetr eval --checkpoint runs/train/last.pth
    rtdetr predict --checkpoint runs/train/last.pth --images some/folder --output-dir preds
    rtdetr demo                                                     # everything, on synthetic data
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time

import torch

DEMO_OUTPUT = "demo_output"
# One torch thread: on a 2-core CPU the intra-op pool of a tiny model gains little when the machine
# is idle and loses badly (spin-waits) when it is busy. 480 s of training leaves the whole demo
# (imports, data, evaluation, fold check, pictures) well inside 10 minutes on an idle 2-core CPU.
DEMO_THREADS = 1
DEMO_TRAIN_BUDGET_S = 480.0


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0 (0: torch's default), got "
                                         f"{text!r}")
    return value


def _score(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:  # scores are sigmoids; also rejects nan
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1] (scores are "
                                         f"probabilities), got {text!r}")
    return value


def _add_common(p: argparse.ArgumentParser, default_config: str | None = None) -> None:
    p.add_argument("--config", default=default_config,
                   help="YAML file or built-in config name (rtdetr/configs/NAME.yaml)")
    p.add_argument("--threads", type=_threads, default=0,
                   help="torch CPU threads (0: torch's default; 1 is much faster on a busy CPU)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.epochs=2 data.image_size=320")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtdetr", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a detector")
    _add_common(p)
    p.set_defaults(config=None)  # demo; with --resume: the config stored in the checkpoint
    p.add_argument("--resume", help="checkpoint to resume from (exact resumption; without "
                                    "--config, with the config stored in it)")
    p.add_argument("--output-dir", help="where checkpoints and metrics go (train.output_dir)")
    p = sub.add_parser("eval", help="COCO mAP of a checkpoint on the validation split")
    _add_common(p)
    p.add_argument("--checkpoint", required=True)
    p = sub.add_parser("predict", help="draw detections on images, write predictions.json")
    _add_common(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", nargs="+", required=True,
                   help="image files or folders (in a folder: png, jpg, bmp, webp, tif, gif "
                        "files; not predict's own *.pred.png drawings)")
    p.add_argument("--output-dir", default="outputs/predict")
    p.add_argument("--score-threshold", type=_score, default=0.5,
                   help="keep detections scoring at least this, in [0, 1] (default 0.5)")
    for name, target in (("export", "rtdetr.export.main"), ("bench", "rtdetr.benchmark.main")):
        p = sub.add_parser(name, help=f"delegates to {target}")
        p.add_argument("args", nargs="*", help=f"passed on to {target} (options included)")
    p = sub.add_parser("demo", help="synthetic data -> train -> mAP -> fold check -> pictures")
    _add_common(p, "demo")
    p.set_defaults(threads=DEMO_THREADS)
    p.add_argument("--output-dir", default=DEMO_OUTPUT)
    p.add_argument("--time-budget", type=float, default=DEMO_TRAIN_BUDGET_S, metavar="SECONDS",
                   help="wall-clock limit of the training: it stops after the step that crosses "
                        "it, then evaluates (0: no limit; train.epochs/max_steps still apply)")
    return parser


# ------------------------------------------------------------------------------------- helpers

def _load(args):
    from rtdetr.config import load_config
    return load_config(args.config, args.overrides)


def _config_from_checkpoint(args, state: dict):
    """--config when given, else the config stored in the checkpoint; then the overrides."""
    from rtdetr.config import config_for_checkpoint
    return config_for_checkpoint(args.config, args.overrides, state)


def load_trained_model(checkpoint: str, cfg, device):
    """The model (EMA weights when present) folded for inference (``deploy()``: eval mode, every
    re-parameterisable block and conv+BN folded; channels_last, which the convolutions of both
    oneDNN and cuDNN run faster), its postprocessor and the checkpoint dict."""
    from rtdetr.engine import load_checkpoint
    from rtdetr.engine.checkpoint import load_model_weights
    from rtdetr.models.config import build_model
    state = load_checkpoint(checkpoint)
    model, _, postprocessor = build_model(cfg.model)
    weights = state["ema"]["module"] if state.get("ema") else state["model"]
    load_model_weights(model, weights, checkpoint, state, cfg.model)
    model = model.to(device).deploy().to(memory_format=torch.channels_last)
    return model, postprocessor, state


# What predict reads from a folder (any case); files named on the command line are read whatever
# their name. Its own drawings (<name>.pred.png) are skipped, so a rerun into the same folder does
# not detect on them.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
PREDICTION_SUFFIX = ".pred.png"


def _image_files(paths) -> list[str]:
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(os.path.join(p, f) for f in os.listdir(p)
                            if f.lower().endswith(IMAGE_EXTENSIONS)
                            and not f.lower().endswith(PREDICTION_SUFFIX))
        elif os.path.isfile(p):
            files.append(p)
        else:
            hint = (" (a key=value override? --images takes every word after it: put the "
                    "overrides before --images)") if "=" in p else ""
            raise FileNotFoundError(f"--images: no such file or folder: {p}{hint}")
    if not files:
        raise ValueError(f"--images: no image files found in {list(paths)}")
    return files


def _annotated_path(output_dir: str, path: str, taken: set) -> str:
    """``<output_dir>/<name>.pred.png``; ``<name>-1.pred.png``, ... when two inputs share a name
    (``a/x.png`` and ``b/x.jpg``), so that no drawing overwrites another."""
    stem = os.path.splitext(os.path.basename(path))[0]
    name, n = stem, 0
    while name in taken:
        n += 1
        name = f"{stem}-{n}"
    taken.add(name)
    return os.path.join(output_dir, name + PREDICTION_SUFFIX)


@torch.no_grad()
def predict_images(model, postprocessor, files, image_size: int, device, class_names,
                   score_threshold: float, output_dir: str,
                   label2category: dict | None = None,
                   unreadable: list | None = None) -> list[dict]:
    """Detect on each file; write ``<name>.pred.png`` (boxes, labels, scores drawn) and return
    the detections (xyxy pixels of the original image): ``label`` (contiguous, 0..K-1),
    ``category_id`` (the dataset's COCO category id, from ``label2category``; the label when
    that is not given), ``name``, ``score``, ``box_xyxy``. A file that cannot be read as an
    image raises, or, given an ``unreadable`` list, is appended to it as ``(path, error)`` and
    skipped (the other images' results are still written)."""
    from PIL import ImageDraw
    from torchvision.transforms.v2 import functional as TF
    from rtdetr.data.coco import open_rgb
    os.makedirs(output_dir, exist_ok=True)
    label2category = {int(k): int(v) for k, v in (label2category or {}).items()}
    results, taken = [], set()
    for path in files:
        try:
            im = open_rgb(path)  # its errors name the file
        except (OSError, ValueError) as exc:
            if unreadable is None:
                raise
            unreadable.append((path, f"{type(exc).__name__}: {exc}"))
            continue
        # as the evaluation transforms do: resize the 8-bit image, then scale to [0, 1]
        x = TF.resize(TF.pil_to_tensor(im), [image_size, image_size])
        x = TF.to_dtype(x, torch.float32, scale=True).unsqueeze(0).to(device)
        out = postprocessor(model(x), torch.tensor([[im.width, im.height]], device=device))[0]
        keep = out["scores"] >= score_threshold
        dets = [{"label": int(lab), "category_id": label2category.get(int(lab), int(lab)),
                 "name": class_names[int(lab)] if int(lab) < len(class_names)
                 else str(int(lab)), "score": round(float(s), 4),
                 "box_xyxy": [round(float(v), 2) for v in b]}
                for lab, s, b in zip(out["labels"][keep], out["scores"][keep],
                                     out["boxes"][keep])]
        draw = ImageDraw.Draw(im)
        for d in dets:
            draw.rectangle(d["box_xyxy"], outline=(255, 0, 0), width=2)
            x0, y0 = d["box_xyxy"][:2]
            draw.text((x0 + 2, y0 + 1), f"{d['name']} {d['score']:.2f}", fill=(255, 255, 0))
        out_path = _annotated_path(output_dir, path, taken)
        im.save(out_path)
        results.append({"image": path, "annotated": out_path, "detections": dets})
    with open(os.path.join(output_dir, "predictions.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    return results


# ------------------------------------------------------------------------------------ commands

@contextlib.contextmanager
def _stop_on_ctrl_c(trainer):
    """The first Ctrl-C (SIGINT) asks ``trainer`` to stop after the current step with a
    checkpoint (nothing of the epoch is lost); a second one interrupts at once."""
    def request_stop(signum, frame):
        trainer.stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if trainer.info.is_main:
            print("\nrtdetr train: stopping after this step, with a checkpoint (Ctrl-C again: "
                  "stop at once)", file=sys.stderr, flush=True)

    try:
        previous = signal.signal(signal.SIGINT, request_stop)
    except ValueError:  # not the main thread: Ctrl-C interrupts as usual
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def cmd_train(args) -> int:
    from rtdetr.config import load_config
    from rtdetr.engine import Trainer, build_datasets
    from rtdetr.engine.distributed import cleanup
    from rtdetr.models.config import build_model
    if args.resume and args.config is None:  # the run's own config (its data, model, output)
        from rtdetr.engine import load_checkpoint
        cfg = _config_from_checkpoint(args, load_checkpoint(args.resume, resume=True))
    else:
        cfg = load_config(args.config or "demo", args.overrides)
    if args.output_dir:
        cfg.train.output_dir = args.output_dir
    torch.manual_seed(cfg.train.seed)
    model, criterion, postprocessor = build_model(cfg.model)
    train_set, val_set = build_datasets(cfg.data, cfg.train.seed)
    _check_classes(cfg, train_set)
    trainer = Trainer(cfg, model, criterion, postprocessor, train_set, val_set)
    if trainer.info.is_main:
        os.makedirs(trainer.output_dir, exist_ok=True)
        from rtdetr.config import dump_config
        dump_config(cfg, os.path.join(trainer.output_dir, "config.yaml"))
    try:
        with _stop_on_ctrl_c(trainer):
            result = trainer.fit(resume=args.resume)
    except KeyboardInterrupt:
        if trainer.info.is_main:
            where = (f"continue from its last checkpoint with `rtdetr train --resume "
                     f"{trainer.checkpoint_path}`" if os.path.isfile(trainer.checkpoint_path)
                     else "no checkpoint was written yet")
            print(f"\nrtdetr train: interrupted at epoch {trainer.epoch + 1}, step "
                  f"{trainer.global_step}; {where}", file=sys.stderr)
        return 130
    if trainer.info.is_main:
        print(_table({"steps": result["global_step"], "epochs": result["epoch"],
                      **{k: result["metrics"].get(k) for k in ("AP", "AP50", "AP75")},
                      "checkpoint": trainer.checkpoint_path}))
    cleanup()
    return 0


def _check_classes(cfg, dataset) -> None:
    if dataset.num_classes != cfg.model.num_classes:
        raise ValueError(f"model.num_classes={cfg.model.num_classes} but the dataset "
                         f"{dataset.ann_file} has {dataset.num_classes} categories")


def cmd_eval(args) -> int:
    from torch.utils.data import DataLoader
    from rtdetr.data import BatchCollator
    from rtdetr.engine import build_datasets, evaluate, load_checkpoint
    from rtdetr.engine.distributed import resolve_device
    from rtdetr.engine.train import check_same_categories
    cfg = _config_from_checkpoint(args, load_checkpoint(args.checkpoint))
    device = resolve_device(cfg.train.device)
    model, postprocessor, state = load_trained_model(args.checkpoint, cfg, device)
    _, val_set = build_datasets(cfg.data, cfg.train.seed)
    if val_set is None:
        raise ValueError("rtdetr eval needs a validation set: set data.val_images and "
                         "data.val_annotations")
    check_same_categories(val_set, state.get("label2category") or {},
                          f"the checkpoint {args.checkpoint}")
    loader = DataLoader(val_set, batch_size=cfg.train.val_batch_size, collate_fn=BatchCollator(),
                        num_workers=cfg.train.num_workers)
    metrics = evaluate(model, postprocessor, loader, device, val_set.ann_file,
                       val_set.label2category, progress=cfg.train.progress)
    print(_table(metrics))
    return 0


def cmd_predict(args) -> int:
    from rtdetr.engine import load_checkpoint
    from rtdetr.engine.distributed import resolve_device
    cfg = _config_from_checkpoint(args, load_checkpoint(args.checkpoint))
    device = resolve_device(cfg.train.device)
    model, postprocessor, state = load_trained_model(args.checkpoint, cfg, device)
    unreadable = []
    results = predict_images(model, postprocessor, _image_files(args.images), cfg.data.image_size,
                             device, state.get("class_names", []), args.score_threshold,
                             args.output_dir, state.get("label2category"), unreadable)
    n = sum(len(r["detections"]) for r in results)
    print(f"{n} detections in {len(results)} images -> {args.output_dir}/predictions.json")
    for path, error in unreadable:
        print(f"rtdetr predict: skipped {path}: {error}", file=sys.stderr)
    return 1 if unreadable else 0


def _exit_code(result) -> int:
    return result if isinstance(result, int) else 0


def cmd_export(args) -> int:
    from rtdetr.export import main as export_main
    return _exit_code(export_main(args.args))


def cmd_bench(args) -> int:
    from rtdetr.benchmark import main as bench_main
    return _exit_code(bench_main(args.args))


@torch.no_grad()
def fold_check(model, images: torch.Tensor) -> float:
    """Worst relative difference, before vs after ``deploy()`` (on an eval copy), of the feature
    maps the decoder receives (backbone + hybrid encoder, every block that ``deploy()`` folds).

    The decoder is not folded, and its outputs are not compared: it keeps the top-k encoder
    scores as queries, and in a barely trained model near-tied scores can swap on float rounding,
    which changes the outputs discontinuously although the fold is exact."""
    import copy
    model = copy.deepcopy(model).eval()
    ref = model.encoder(model.backbone(images))
    folded = model.deploy()
    out = folded.encoder(folded.backbone(images))
    worst = 0.0
    for a, b in zip(ref, out):
        a, b = a.double(), b.double()
        worst = max(worst, float((a - b).norm() / a.norm().clamp_min(1e-12)))
    return worst


def _with_time_budget(trainer, seconds: float):
    """Make ``trainer`` stop after the training step that ends ``seconds`` after this call (its
    ``train.max_steps`` becomes the steps done, so the saved config records where it stopped);
    ``fit()`` then evaluates and checkpoints as after a normal last step. 0 disables."""
    if seconds == 0:
        return trainer
    deadline = time.perf_counter() + seconds
    step = trainer.train_step

    def train_step(images, targets):
        loss = step(images, targets)
        if time.perf_counter() >= deadline:
            trainer.cfg.train.max_steps = trainer.global_step + 1  # counted after this returns
        return loss

    trainer.train_step = train_step
    return trainer


def cmd_demo(args) -> int:
    """Synthetic shapes -> train the demo config -> COCO mAP on the held-out split -> fold check
    -> predictions drawn on a few held-out images -> summary table."""
    from PIL import Image
    from rtdetr.engine import Trainer, build_datasets
    from rtdetr.models.config import build_model
    start = time.perf_counter()
    if args.time_budget < 0:
        raise ValueError(f"--time-budget must be >= 0 seconds, got {args.time_budget}")
    cfg = _load(args)
    out = args.output_dir
    cfg.train.output_dir = os.path.join(out, "run")
    if not os.path.isabs(cfg.data.root) and cfg.data.root == "data/shapes":
        cfg.data.root = os.path.join(out, "shapes")
    torch.manual_seed(cfg.train.seed)
    train_set, val_set = build_datasets(cfg.data, cfg.train.seed)
    if val_set is None:
        raise ValueError("rtdetr demo evaluates on a held-out set: set data.val_images and "
                         "data.val_annotations")
    _check_classes(cfg, train_set)
    data_s = time.perf_counter() - start
    model, criterion, postprocessor = build_model(cfg.model)
    trainer = Trainer(cfg, model, criterion, postprocessor, train_set, val_set)
    print(f"rtdetr demo: {len(train_set)} train / {len(val_set)} held-out images, "
          f"{trainer.steps_per_epoch} steps per epoch, up to {cfg.train.epochs} epochs, "
          + (f"training stops after {args.time_budget:g} s (--time-budget)" if args.time_budget
             else "no time budget") + f", {torch.get_num_threads()} torch thread(s)", flush=True)
    tic = time.perf_counter()
    result = _with_time_budget(trainer, args.time_budget).fit()
    train_s = time.perf_counter() - tic
    metrics = result["metrics"] or trainer.evaluate()
    eval_model = trainer.eval_model().eval()
    images = torch.stack([val_set[i][0] for i in range(min(4, len(val_set)))])
    try:  # a failing fold must not hide the trained model's AP: report it, exit 1 at the end
        fold_rel, fold_error = fold_check(eval_model, images.to(trainer.device)), None
    except Exception as exc:  # noqa: BLE001 - reported below, and the exit status says so
        fold_rel, fold_error = float("nan"), f"{type(exc).__name__}: {exc}"
    files = [val_set.image_path(i) for i in range(min(4, len(val_set)))]
    preds = predict_images(eval_model, postprocessor, files, cfg.data.image_size, trainer.device,
                           train_set.class_names, 0.5, os.path.join(out, "predictions"),
                           train_set.label2category)
    tiles = [Image.open(p["annotated"]).convert("RGB") for p in preds]
    w, h = tiles[0].size
    sheet = Image.new("RGB", (w * len(tiles), h))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (i * w, 0))
    picture = os.path.join(out, "predictions.png")
    sheet.save(picture)
    summary = {"AP": metrics["AP"], "AP50": metrics["AP50"], "AP75": metrics["AP75"],
               "train steps": result["global_step"],
               "epochs": round(result["global_step"] / trainer.steps_per_epoch, 2),
               "train time s": round(train_s, 1),
               "data time s": round(data_s, 1), "fold rel diff": f"{fold_rel:.2e}",
               "total time s": round(time.perf_counter() - start, 1), "picture": picture}
    print(_table(summary))
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    if fold_error is not None:
        print(f"rtdetr demo: the fold check failed: {fold_error}", file=sys.stderr)
        return 1
    if fold_rel > 1e-4:
        print(f"rtdetr demo: folded and unfolded outputs differ (rel {fold_rel:.2e} > 1e-4)",
              file=sys.stderr)
        return 1
    return 0


def _table(row: dict) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    width = max(len(k) for k in row)
    lines = [f"{'metric'.ljust(width)} | value", f"{'-' * width}-|------"]
    lines += [f"{k.ljust(width)} | {fmt(v)}" for k, v in row.items()]
    return "\n".join(lines)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "export": cmd_export,
            "bench": cmd_bench, "demo": cmd_demo}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse; ``export`` and ``bench`` pass every argument on (``--help`` included: their own
    parsers list their options). ``key=value`` overrides may come in several runs between
    options (``train a=1 --resume x b=2``), which plain argparse rejects."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("export", "bench"):
        return argparse.Namespace(command=argv[0], args=argv[1:])
    from rtdetr.config import parse_args_with_overrides
    return parse_args_with_overrides(build_parser(), argv)


# What a user's input can get wrong (paths, configs, data, checkpoints, values): on the command
# line these print as one "rtdetr <command>: error: ..." line, exit status 2, no traceback
USER_ERRORS = (ValueError, TypeError, OSError, FloatingPointError)


def main(argv: list[str] | None = None) -> int:
    """The ``rtdetr`` command. Called without ``argv`` (the console script, ``python -m
    rtdetr``), a :data:`USER_ERRORS` exception prints as one line (``RTDETR_TRACEBACK=1``: the
    traceback too); called with ``argv`` (tests, scripts), it propagates."""
    args = parse_args(argv)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    if argv is not None or os.environ.get("RTDETR_TRACEBACK") == "1":
        return COMMANDS[args.command](args)
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as exc:
        print(f"rtdetr {args.command}: error: {exc}\n(RTDETR_TRACEBACK=1 shows where it came "
              f"from)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
