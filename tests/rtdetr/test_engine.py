"""Engine: COCO mAP, atomic checkpoints, EMA, optimizer groups and warm-up, exact resumption.

The resumption test uses a tiny stand-in detector (same interface as the real one: model(images,
targets) -> {pred_logits, pred_boxes}, criterion(outputs, targets) -> dict of losses) with dropout,
so restored RNG states matter, and the real data pipeline (augmentation + multi-scale collate)."""
import copy
import math
import os

import pytest
import torch
from torch import nn

from rtdetr.config import load_config
from rtdetr.engine import (ModelEMA, Trainer, build_datasets, build_scheduler, coco_map,
                           load_coco_gt, param_groups, save_checkpoint)
from rtdetr.engine.optim import build_optimizer


pytestmark = pytest.mark.usefixtures("torch_single_thread")


class StandInDetector(nn.Module):
    def __init__(self, num_classes=3, queries=5):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8, queries * (num_classes + 4))
        self.q, self.k = queries, num_classes

    def forward(self, images, targets=None):
        out = self.head(self.drop(self.backbone(images))).view(-1, self.q, self.k + 4)
        return {"pred_logits": out[..., :self.k], "pred_boxes": out[..., self.k:].sigmoid()}


class StandInCriterion(nn.Module):
    def forward(self, outputs, targets):
        cls, box = 0.0, 0.0
        for logits, boxes, t in zip(outputs["pred_logits"], outputs["pred_boxes"], targets):
            present = torch.zeros(logits.shape[-1])
            present[t["labels"]] = 1.0
            cls = cls + nn.functional.binary_cross_entropy_with_logits(
                logits.mean(0), present)
            n = min(len(t["boxes"]), boxes.shape[0])
            box = box + (boxes[:n] - t["boxes"][:n]).abs().sum() + 0.0 * boxes.sum()
        return {"loss_cls": cls, "loss_box": 5 * box / len(targets)}


def make_trainer(tmp_path, name, **train):
    overrides = [f"data.root={tmp_path / 'shapes'}", "data.synthetic_num_train=12",
                 "data.synthetic_num_val=4", "data.synthetic_image_size=32",
                 "data.image_size=32", "data.multiscale=[24, 32, 40]", "train.batch_size=3",
                 "train.progress=false", "train.ema_warmups=3", "train.warmup_steps=4",
                 f"train.output_dir={tmp_path / name}", "train.eval_every_epochs=0",
                 "model.num_classes=3", "train.device=cpu"] + [f"train.{k}={v}" for k, v in train.items()]
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    train_set, _ = build_datasets(cfg.data, cfg.train.seed)
    return Trainer(cfg, StandInDetector(), StandInCriterion(), None, train_set)


def test_gradient_clipping_covers_every_model_parameter(tmp_path):
    tr = make_trainer(tmp_path, "clip", clip_max_norm=0.01)
    assert [id(p) for p in tr.clip_params] == [id(p) for p in tr.model.parameters()]
    tr.train_step(*next(iter(tr.loader)))
    grads = [p.grad for p in tr.model.parameters() if p.grad is not None]
    assert len(grads) == len(list(tr.model.parameters()))
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) <= 0.01 * (1 + 1e-5)


def test_resume_mid_run_gives_the_same_losses(tmp_path):
    full = make_trainer(tmp_path, "full", epochs=2)
    full.fit()
    assert len(full.losses) == 8 and all(math.isfinite(v) for v in full.losses)
    part = make_trainer(tmp_path, "part", epochs=2, max_steps=6)  # stops inside epoch 2
    part.fit()
    state = torch.load(part.checkpoint_path, weights_only=False)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 2, 6)
    torch.manual_seed(1234)  # a different RNG state: resume must restore it
    resumed = make_trainer(tmp_path, "resumed", epochs=2)
    resumed.fit(resume=part.checkpoint_path)
    assert resumed.losses == full.losses
    for a, b in zip(resumed.model.state_dict().values(), full.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(resumed.ema.module.state_dict().values(),
                    full.ema.module.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.optimizer.param_groups[0]["lr"] == full.optimizer.param_groups[0]["lr"]


def test_atomic_checkpoint_survives_a_crash_during_save(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pth")
    save_checkpoint({"w": torch.arange(5)}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"w": torch.zeros(5)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["w"], torch.arange(5))
    assert os.listdir(tmp_path) == ["ckpt.pth"]  # no temporary left behind


def _gt_and_dets(tmp_path, shift=0.0):
    from rtdetr.data import generate_shapes_dataset
    paths = generate_shapes_dataset(str(tmp_path), num_train=1, num_val=12, image_size=64,
                                    seed=3)
    gt = load_coco_gt(paths["val"][1])
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9,
             "bbox": [a["bbox"][0] + shift * a["bbox"][2], a["bbox"][1], a["bbox"][2],
                      a["bbox"][3]]} for a in gt.dataset["annotations"]]
    return gt, dets


def test_coco_map_perfect_is_one_and_shifted_is_less(tmp_path):
    gt, perfect = _gt_and_dets(tmp_path)
    m = coco_map(gt, perfect)
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0)
    _, shifted = _gt_and_dets(tmp_path, shift=0.3)  # IoU ~0.54: counts at 0.5, not at 0.75
    s = coco_map(gt, shifted)
    assert s["AP50"] == pytest.approx(1.0) and s["AP75"] == 0.0 and s["AP"] < 0.2
    assert coco_map(gt, [])["AP"] == 0.0


def test_ema_formula_including_buffers():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9, warmups=4)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model[1].running_mean.add_(torch.randn(2))
    ema.update(model)
    d = 0.9 * (1 - math.exp(-1 / 4))
    for k, v in ema.module.state_dict().items():
        src = model.state_dict()[k]
        expect = d * before[k] + (1 - d) * src if v.dtype.is_floating_point else src
        torch.testing.assert_close(v, expect)


def test_ema_update_equals_the_per_tensor_formula_bitwise():
    """The multi-tensor update computes exactly ema * d + value * (1 - d) per tensor (mul_ then
    add_ with alpha, as one tensor at a time would), for float32 and float64 entries alike."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(5, 2).double())
    ema = ModelEMA(model, decay=0.99, warmups=3)
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_var.mul_(1.5)
            model[1].num_batches_tracked.add_(step + 1)  # an integer buffer: copied
        before = {k: v.clone() for k, v in ema.module.state_dict().items()}
        ema.update(model)
        d = ema.current_decay()
        for k, v in ema.module.state_dict().items():
            src = model.state_dict()[k]
            expect = before[k].mul(d).add_(src, alpha=1 - d) if v.dtype.is_floating_point \
                else src
            assert torch.equal(v, expect), (step, k)
        assert int(ema.module[1].num_batches_tracked) == sum(range(1, step + 2))
        assert not any(p.requires_grad for p in ema.module.parameters())
        assert all(p.requires_grad for p in model.parameters())


def test_param_groups_and_warmup():
    model = StandInDetector()
    groups = {g["name"]: g for g in param_groups(model, 1e-4, 1e-4, backbone_lr=1e-5)}
    assert set(groups) == {"backbone", "backbone_no_decay", "main", "main_no_decay"}
    assert groups["backbone"]["lr"] == 1e-5 and groups["main"]["weight_decay"] == 1e-4
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim < 2 for p in groups["main_no_decay"]["params"])  # biases, norm weights
    n = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())
    opt = build_optimizer(model, 1e-4, 1e-4, backbone_lr=1e-5)
    sched = build_scheduler(opt, warmup_steps=4, milestones=[6], gamma=0.1)
    lrs = []
    for _ in range(8):
        lrs.append(next(g["lr"] for g in opt.param_groups if g["name"] == "main"))
        opt.step()
        sched.step()
    assert lrs == pytest.approx([2.5e-5, 5e-5, 7.5e-5, 1e-4, 1e-4, 1e-4, 1e-5, 1e-5])


def test_optimizer_is_fused_and_steps_like_plain_adamw():
    """build_optimizer takes PyTorch's fused AdamW on CPU parameters; its updates (with the
    groups' learning rates and weight decays) are those of the plain per-tensor AdamW."""
    model = StandInDetector()
    twin = copy.deepcopy(model)
    opt = build_optimizer(model, 1e-3, 1e-2, backbone_lr=1e-4)
    assert all(g["fused"] for g in opt.param_groups)
    plain = torch.optim.AdamW(param_groups(twin, 1e-3, 1e-2, backbone_lr=1e-4), lr=1e-3,
                              weight_decay=1e-2, foreach=False)
    for _ in range(5):
        for net in (model, twin):
            torch.manual_seed(1)  # the same gradients for both
            for p in net.parameters():
                p.grad = torch.randn_like(p)
        opt.step()
        plain.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), name


def real_detector_trainer(tmp_path, name, with_val=False, **train):
    """A Trainer of the demo detector (GhostNetV3 + denoising) on a few 64 px synthetic images
    (``with_val``: with the held-out split, evaluated after the last step)."""
    from rtdetr.models import build_model
    overrides = [f"data.root={tmp_path / 'shapes'}", "data.synthetic_num_train=6",
                 "data.synthetic_num_val=2", "data.synthetic_image_size=64",
                 "data.image_size=64", "train.batch_size=3", "train.progress=false",
                 f"train.output_dir={tmp_path / name}", "train.eval_every_epochs=0",
                 "train.warmup_steps=2"] + [f"train.{k}={v}" for k, v in train.items()]
    cfg = load_config("demo", overrides)
    torch.manual_seed(0)
    model, criterion, postprocessor = build_model(cfg.model)
    train_set, val_set = build_datasets(cfg.data, cfg.train.seed)
    return Trainer(cfg, model, criterion, postprocessor, train_set,
                   val_set if with_val else None)


def test_resume_mid_run_gives_the_same_losses_with_the_real_detector(tmp_path):
    """The demo detector (whose denoising noise draws on the RNG) resumed from a checkpoint
    written inside an epoch repeats the uninterrupted run's losses exactly (on the CPU: GPU
    float atomics would change the last bits from run to run)."""
    def trainer(name, **train):
        return real_detector_trainer(tmp_path, name, device="cpu", **train)

    full = trainer("full", epochs=2)
    full.fit()
    part = trainer("part", epochs=2, max_steps=3)  # stops after the first step of epoch 2
    part.fit()
    torch.manual_seed(4321)
    resumed = trainer("resumed", epochs=2)
    resumed.fit(resume=part.checkpoint_path)
    assert len(full.losses) == 4 and resumed.losses == full.losses
    for a, b in zip(resumed.model.state_dict().values(), full.model.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_after_a_run_that_stopped_and_evaluated_gives_the_same_losses(tmp_path):
    """A run stopped by train.max_steps evaluates before its checkpoint; the evaluation (whose
    DataLoader draws on the global RNG) must not change the RNG state the resumed run restores,
    or its denoising noise, hence its losses, differ from the uninterrupted run's."""
    def trainer(name, **train):
        return real_detector_trainer(tmp_path, name, with_val=True, device="cpu", **train)

    full = trainer("full", epochs=2)
    full.fit()
    part = trainer("part", epochs=2, max_steps=3)  # evaluates after step 3, then checkpoints
    part.fit()
    assert part.metrics  # it did evaluate
    rng = torch.get_rng_state()
    part.evaluate()
    assert torch.equal(torch.get_rng_state(), rng)
    resumed = trainer("resumed", epochs=2)
    resumed.fit(resume=part.checkpoint_path)
    assert len(full.losses) == 4 and resumed.losses == full.losses


@pytest.mark.parametrize("content", [b"", b"garbage", "truncated", "not_a_checkpoint",
                                     "model_only"])
def test_corrupt_or_foreign_checkpoint_is_a_clear_error(tmp_path, content):
    from rtdetr.engine import CheckpointError, load_checkpoint
    path = tmp_path / "last.pth"
    good = {"model": {"w": torch.zeros(1000)}, "optimizer": {}, "scheduler": {}, "scaler": {},
            "epoch": 0, "global_step": 1, "step_in_epoch": 1, "losses": [], "rng": []}
    save_checkpoint(good, str(path))
    assert load_checkpoint(str(path), resume=True)["global_step"] == 1
    if content == "truncated":
        path.write_bytes(path.read_bytes()[:2000])
    elif content == "not_a_checkpoint":
        torch.save([1, 2, 3], path)
    elif content == "model_only":
        torch.save({"model": {}}, path)
    else:
        path.write_bytes(content)
    match = {"not_a_checkpoint": "not an rtdetr checkpoint.*list",
             "model_only": "cannot resume from .*lacks"}.get(content,
                                                             "cannot read checkpoint .*last.pth")
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(str(path), resume=True)


def test_val_set_with_other_category_ids_than_the_train_set_is_an_error(tmp_path):
    """Labels 0..K-1 are the training categories; a val JSON listing other ids (same count)
    would have evaluation map every label to the wrong category, silently."""
    import json
    from rtdetr.data import DatasetError
    (tmp_path / "img").mkdir()
    for split, ids in (("train", [1, 2, 5]), ("val", [1, 2, 6])):
        with open(tmp_path / f"{split}.json", "w") as f:
            json.dump({"images": [], "annotations": [],
                       "categories": [{"id": i, "name": str(i)} for i in ids]}, f)
    cfg = load_config(None, ["data.dataset=coco", f"data.train_images={tmp_path / 'img'}",
                             f"data.train_annotations={tmp_path / 'train.json'}",
                             f"data.val_images={tmp_path / 'img'}",
                             f"data.val_annotations={tmp_path / 'val.json'}"])
    with pytest.raises(DatasetError, match=r"val\.json lists category ids \[1, 2, 6\], but the "
                                           r"training set .*train\.json has \[1, 2, 5\]"):
        build_datasets(cfg.data)
    cfg.data.val_annotations = cfg.data.train_annotations
    train_set, val_set = build_datasets(cfg.data)
    assert val_set.label2category == train_set.label2category == {0: 1, 1: 2, 2: 5}


@pytest.mark.gpu
def test_amp_training_steps_on_the_gpu_with_the_real_detector(tmp_path):
    """AMP (float16 autocast + GradScaler) through the whole detector on a GPU, the ghostkernels
    ops included: finite losses, every trained weight finite and the weights actually updated."""
    trainer = real_detector_trainer(tmp_path, "amp", device="cuda", amp="true", epochs=1,
                                    max_steps=2)
    assert trainer.amp and trainer.device.type == "cuda"
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    assert len(trainer.losses) == 2 and all(math.isfinite(x) for x in trainer.losses)
    after = trainer.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


def test_a_diverged_model_is_an_error_in_evaluation_not_a_meaningless_ap(tmp_path):
    """One step at lr=1e38 leaves the weights non-finite or about to overflow (lr=inf itself is
    now rejected by the config check); the loss check (before the update)
    cannot see it when that step is the last, so evaluation must: FloatingPointError naming the
    non-finite predictions and the likely cause, instead of an AP computed from NaN boxes."""
    trainer = real_detector_trainer(tmp_path, "diverged", with_val=True, device="cpu",
                                    lr="1e38", backbone_lr="1e38", warmup_steps=0, epochs=1,
                                    max_steps=1)
    with pytest.raises(FloatingPointError, match=r"predicted \d+ non-finite boxes and \d+ "
                                                 r"non-finite scores .* on 2 of 2 images.*"
                                                 r"training diverged \(lower train\.lr\)"):
        trainer.fit()
    healthy = real_detector_trainer(tmp_path, "healthy", with_val=True, device="cpu", epochs=1,
                                    max_steps=1)
    assert set(healthy.fit()["metrics"]) >= {"AP", "AP50"}  # normal evaluation unaffected


def test_bad_train_values_are_rejected_before_the_trainer_does_any_work():
    from rtdetr.config import ConfigError
    from rtdetr.engine.distributed import resolve_device
    cfg = load_config(None, ["train.device=cpu"])
    cfg.train.val_batch_size = 0  # set after loading: the Trainer checks again
    with pytest.raises(ConfigError, match=r"train\.val_batch_size must be >= 1, got 0"):
        Trainer(cfg, None, None, None, None)
    with pytest.raises(ValueError, match=r"train\.device must be 'auto', 'cpu', 'cuda' or "
                                         r"'cuda:N'.*got 'tpu'"):
        resolve_device("tpu")
    assert resolve_device("cpu") == torch.device("cpu")
