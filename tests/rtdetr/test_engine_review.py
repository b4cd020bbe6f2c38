"""Engine hardening: resume onto a non-CPU device, a crash between checkpoints, COCO metrics that
match pycocotools exactly (category ids, crowd boxes, images without ground truth or without
detections, no detections at all) and checkpoint file permissions."""
import json
import math
import os
import stat

import pytest
import torch

from rtdetr.engine import STAT_NAMES, coco_map, evaluate, load_coco_gt, save_checkpoint
from tests.rtdetr.test_engine import make_trainer, real_detector_trainer


pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_resume_loads_the_checkpoint_whatever_the_training_device(tmp_path, monkeypatch):
    """Trainer.resume used to map the checkpoint onto the training device, RNG states included:
    on a GPU torch.set_rng_state then refused them ('RNG state must be a torch.ByteTensor'), so
    no CUDA run could resume. The meta device stands in for the GPU here: the checkpoint must be
    read onto the CPU (load_state_dict moves weights and optimizer state to their devices)."""
    full = make_trainer(tmp_path, "full", epochs=2)
    full.fit()
    part = make_trainer(tmp_path, "part", epochs=2, max_steps=6)
    part.fit()
    resumed = make_trainer(tmp_path, "resumed", epochs=2)
    device = resumed.device
    resumed.device = torch.device("meta")  # where the checkpoint must not be loaded to
    resumed.resume(part.checkpoint_path)
    resumed.device = device
    assert resumed.global_step == 6 and resumed.ema.updates == 6
    resumed.fit()
    assert resumed.losses == full.losses


@pytest.mark.gpu
def test_resume_on_the_gpu_continues_the_run(tmp_path):
    """The demo detector trained on a GPU resumes from its mid-run checkpoint (RNG states,
    optimizer, scheduler, EMA, counters) and finishes like the uninterrupted run."""
    def trainer(name, **train):
        return real_detector_trainer(tmp_path, name, device="cuda", **train)

    full = trainer("full", epochs=2)
    full.fit()
    part = trainer("part", epochs=2, max_steps=3)
    part.fit()
    saved = torch.load(part.checkpoint_path, map_location="cpu", weights_only=False)
    resumed = trainer("resumed", epochs=2)
    resumed.resume(part.checkpoint_path)
    assert torch.equal(torch.get_rng_state(), saved["rng"][0]["torch"])
    resumed.fit()
    assert resumed.global_step == full.global_step == 4
    assert resumed.ema.updates == full.ema.updates
    assert resumed.losses[:3] == part.losses
    assert resumed.losses == pytest.approx(full.losses, rel=1e-2)  # GPU atomics: last bits
    assert [g["lr"] for g in resumed.optimizer.param_groups] == \
        [g["lr"] for g in full.optimizer.param_groups]


def test_a_crash_between_step_checkpoints_resumes_exactly(tmp_path):
    """A run killed mid-epoch (not stopped by max_steps) resumes from its last step checkpoint:
    same losses, weights, EMA, optimizer moments and LR schedule as the uninterrupted run."""
    full = make_trainer(tmp_path, "full", epochs=2, checkpoint_every_steps=2)
    full.fit()
    part = make_trainer(tmp_path, "part", epochs=2, checkpoint_every_steps=2)
    step = part.train_step

    def crash_at_step_8(*args):
        if part.global_step == 7:
            raise KeyboardInterrupt("killed")
        return step(*args)
    part.train_step = crash_at_step_8
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    state = torch.load(part.checkpoint_path, weights_only=False)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 2, 6)
    torch.manual_seed(77)
    resumed = make_trainer(tmp_path, "resumed", epochs=2, checkpoint_every_steps=2)
    resumed.fit(resume=part.checkpoint_path)
    assert resumed.losses == full.losses
    assert (resumed.epoch, resumed.global_step, resumed.ema.updates) == (2, 8, 8)
    for a, b in zip(resumed.ema.module.state_dict().values(),
                    full.ema.module.state_dict().values()):
        assert torch.equal(a, b)
    mine, theirs = resumed.optimizer.state_dict(), full.optimizer.state_dict()
    for i, s in mine["state"].items():
        for k, v in s.items():
            assert torch.equal(v, theirs["state"][i][k]), (i, k)
    assert resumed.scheduler.state_dict() == full.scheduler.state_dict()


def _hand_made_gt(tmp_path):
    """Category ids 3, 7, 90 (labels 0, 1, 2); image 22 has a crowd box; image 33 has no ground
    truth; no large object anywhere."""
    images = [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 80}
              for i in (11, 22, 33, 44)]
    anns = [(11, 3, [10, 10, 30, 20], 0), (11, 90, [50, 40, 40, 30], 0),
            (22, 7, [0, 0, 60, 60], 1), (22, 7, [60, 10, 20, 20], 0), (44, 3, [5, 5, 10, 10], 0)]
    path = str(tmp_path / "gt.json")
    with open(path, "w") as f:
        json.dump({"images": images, "categories": [{"id": c, "name": str(c)} for c in (3, 7, 90)],
                   "annotations": [{"id": n, "image_id": i, "category_id": c, "bbox": b,
                                    "area": b[2] * b[3], "iscrowd": crowd}
                                   for n, (i, c, b, crowd) in enumerate(anns, 1)]}, f)
    return path


def _pycocotools(ann_file, dets):
    import contextlib
    import io
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        gt = load_coco_gt(ann_file)
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(STAT_NAMES, ev.stats.tolist()))


def test_evaluate_matches_pycocotools_on_a_hand_made_case(tmp_path):
    """Postprocessor output (labels 0..K-1, xyxy pixels) through evaluate() scores exactly as
    pycocotools does on the same detections written by hand (COCO ids, xywh): a detection on a
    crowd box is ignored, one on an image without ground truth is a false positive, an image
    without detections only loses recall."""
    ann_file = _hand_made_gt(tmp_path)
    label2category = {0: 3, 1: 7, 2: 90}
    canned = {11: [(0, [10, 10, 40, 30], 0.9), (2, [52, 41, 90, 70], 0.8),
                   (1, [0, 0, 10, 10], 0.3)],
              22: [(1, [5, 5, 50, 50], 0.95), (1, [60, 10, 80, 30], 0.7)],
              33: [(0, [1, 1, 20, 20], 0.6)], 44: []}

    class Model(torch.nn.Module):
        def forward(self, images):
            return images[:, 0, 0, 0].long()

    def postprocessor(ids, sizes):
        return [{"labels": torch.tensor([d[0] for d in canned[i]], dtype=torch.int64),
                 "boxes": torch.tensor([d[1] for d in canned[i]]).reshape(-1, 4),
                 "scores": torch.tensor([d[2] for d in canned[i]])} for i in ids.tolist()]

    loader = [(torch.tensor(ids, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 4, 4),
               [{"image_id": i, "orig_size": torch.tensor([100, 80])} for i in ids])
              for ids in ([11, 22], [33, 44])]  # each image holds its id
    got = evaluate(Model(), postprocessor, loader, torch.device("cpu"), ann_file, label2category)
    by_hand = [{"image_id": i, "category_id": label2category[lab], "score": s,
                "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
               for i, dets in canned.items() for lab, b, s in dets]
    want = _pycocotools(ann_file, by_hand)
    assert got == pytest.approx(want, abs=1e-12)
    assert got["APl"] == -1.0 and 0.0 < got["AP"] < 1.0


def test_no_detections_score_as_pycocotools_scores_them(tmp_path):
    """No detections at all is AP 0 where there is ground truth but -1 (undefined) for a size
    bucket without any, as pycocotools reports for every other result set; it used to be 0.0
    for all twelve numbers."""
    ann_file = _hand_made_gt(tmp_path)
    got = coco_map(load_coco_gt(ann_file), [])
    assert got["AP"] == got["AP50"] == got["APs"] == got["AR100"] == 0.0
    assert got["APl"] == got["ARl"] == -1.0
    one_far_miss = [{"image_id": 33, "category_id": 3, "bbox": [0, 0, 2, 2], "score": 0.1}]
    want = _pycocotools(ann_file, one_far_miss)  # a lone false positive changes nothing
    assert got == pytest.approx(want, abs=1e-12)
    assert all(math.isfinite(v) for v in got.values())


def test_checkpoint_file_is_as_readable_as_torch_save_makes_it(tmp_path):
    """The atomic save went through mkstemp, whose file is 0600: last.pth became unreadable to
    anyone but its owner (a serving or evaluation job under another account)."""
    old = os.umask(0o022)
    try:
        save_checkpoint({"w": torch.arange(3)}, str(tmp_path / "a.pth"))
        torch.save({"w": torch.arange(3)}, str(tmp_path / "b.pth"))
    finally:
        os.umask(old)
    modes = [stat.S_IMODE(os.stat(tmp_path / n).st_mode) for n in ("a.pth", "b.pth")]
    assert modes[0] == modes[1] == 0o644
    assert sorted(os.listdir(tmp_path)) == ["a.pth", "b.pth"]


def test_a_folder_given_as_checkpoint_is_named_as_a_folder(tmp_path):
    """It used to say 'checkpoint not found' for a folder that exists."""
    from rtdetr.engine.checkpoint import load_checkpoint
    with pytest.raises(IsADirectoryError, match="must be a file, got the folder"):
        load_checkpoint(str(tmp_path))


def test_resume_forgets_metrics_logged_after_the_checkpoint(tmp_path):
    """A run that stopped after an evaluation but before its checkpoint logged that evaluation;
    the resumed run evaluates again: the line after the checkpoint's step must not stay twice."""
    part = make_trainer(tmp_path, "part", epochs=2, max_steps=6)
    part.fit()
    resumed = make_trainer(tmp_path, "resumed", epochs=2)
    os.makedirs(resumed.output_dir, exist_ok=True)
    path = os.path.join(resumed.output_dir, "metrics.jsonl")
    lines = [json.dumps({"epoch": 1, "step": 4, "AP": 0.1}), "not json",
             json.dumps({"epoch": 2, "step": 6, "AP": 0.2}),
             json.dumps({"epoch": 2, "step": 8, "AP": 0.3})]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    resumed.resume(part.checkpoint_path)
    with open(path, encoding="utf-8") as f:
        assert f.read().splitlines() == lines[:3]


def test_a_run_without_amp_resumes_with_amp(tmp_path):
    """A CPU run's checkpoint holds a disabled GradScaler's empty state; loading it into an
    enabled scaler (the run resumed on a GPU with AMP) failed in GradScaler.load_state_dict."""
    part = make_trainer(tmp_path, "part", epochs=2, max_steps=6)
    part.fit()
    resumed = make_trainer(tmp_path, "resumed", epochs=2)
    resumed.scaler = torch.amp.GradScaler("cpu", enabled=True)
    resumed.resume(part.checkpoint_path)
    assert resumed.global_step == 6 and resumed.scaler.get_scale() == 2.0 ** 16


def test_a_sample_that_cannot_be_loaded_checkpoints_the_steps_done(tmp_path):
    """A corrupt image met mid-epoch (only the files' existence is checked up front) stopped the
    run and lost the epoch's steps since the last checkpoint; they are now checkpointed first,
    and the resumed run (the file fixed) ends as an uninterrupted one."""
    from rtdetr.data import DatasetError
    full = make_trainer(tmp_path, "full", epochs=2)
    full.fit()
    part = make_trainer(tmp_path, "part", epochs=2)
    loader = part.loader

    class BrokenAtTheThirdBatch:
        def __iter__(self):
            batches = iter(loader)
            yield next(batches)
            yield next(batches)
            raise DatasetError("cannot read image bad.png (image id 7): truncated")
    part.loader = BrokenAtTheThirdBatch()
    with pytest.raises(DatasetError, match="bad.png"):
        part.fit()
    state = torch.load(part.checkpoint_path, weights_only=False)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 2, 2)
    resumed = make_trainer(tmp_path, "resumed", epochs=2)
    resumed.fit(resume=part.checkpoint_path)
    assert resumed.losses == full.losses
