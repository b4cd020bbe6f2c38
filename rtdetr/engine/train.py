"""The training loop (spec §5): AdamW groups + warm-up, AMP on CUDA (criterion outside autocast, in
fp32), gradient clipping, EMA, a checkpoint each epoch (optionally every N steps) written
atomically, exact resumption, COCO evaluation of the EMA model, tqdm progress, DDP via torchrun.

Exact resumption: the checkpoint holds model, optimizer, scheduler, GradScaler, EMA, epoch, global
step, the position inside the epoch and every rank's RNG states. Data order is a seeded permutation
per epoch (:class:`ResumableSampler`, which skips the batches already seen), and augmentation is a
pure function of (seed, epoch, sample index), so a run resumed from a mid-epoch checkpoint sees the
same batches and produces the same losses as the uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from rtdetr.config import check_config
from rtdetr.data import (BatchCollator, CocoDetection, DatasetError, DetectionTransforms,
                         generate_shapes_dataset)
from rtdetr.engine.checkpoint import (capture_rng_state, load_checkpoint, load_model_weights,
                                      restore_rng_state, save_checkpoint)
from rtdetr.engine.distributed import (ResumableSampler, all_gather_objects, all_reduce_mean,
                                       any_rank, barrier, get_rank, init_distributed, wrap_model)
from rtdetr.engine.ema import ModelEMA, unwrap
from rtdetr.engine.evaluate import evaluate
from rtdetr.engine.optim import build_optimizer, build_scheduler


def build_datasets(data_cfg, seed: int = 0):
    """(train_set, val_set) from a DataConfig; the synthetic dataset is generated if needed.
    COCO data without ``val_images`` and ``val_annotations`` (both empty) has no val set: None
    (training then evaluates nothing)."""
    d = data_cfg
    if d.dataset == "synthetic":
        if get_rank() != 0:
            barrier()  # rank 0 writes the files first
        paths = generate_shapes_dataset(d.root, num_train=d.synthetic_num_train,
                                        num_val=d.synthetic_num_val,
                                        image_size=d.synthetic_image_size,
                                        num_classes=d.synthetic_num_classes, seed=d.synthetic_seed)
        if get_rank() == 0:
            barrier()
        (train_images, train_ann), (val_images, val_ann) = paths["train"], paths["val"]
    else:
        train_images, train_ann = d.train_images, d.train_annotations
        val_images, val_ann = d.val_images, d.val_annotations
        for name in ("train_images", "train_annotations"):
            if not getattr(d, name):
                raise ValueError(f"data.{name} must be set when data.dataset is 'coco'")
        if bool(val_images) != bool(val_ann):
            given, missing = (("val_images", "val_annotations") if val_images
                              else ("val_annotations", "val_images"))
            raise ValueError(f"data.{missing} must be set with data.{given} (or leave both "
                             f"empty: no validation)")
    train_tf = DetectionTransforms(d.image_size, train=True, seed=seed, stop_epoch=d.stop_epoch,
                                   photometric=d.photometric, zoom_out=d.zoom_out,
                                   iou_crop=d.iou_crop, flip=d.flip, zoom_out_max=d.zoom_out_max)
    val_tf = DetectionTransforms(d.image_size, train=False)
    train_set = CocoDetection(train_images, train_ann, train_tf, d.skip_invalid_boxes)
    own_files = d.dataset != "synthetic"  # checked now, not when the batch that reads them comes
    if own_files:
        check_image_files(train_set, "data.train_images")
    if not val_ann:
        return train_set, None
    val_set = CocoDetection(val_images, val_ann, val_tf, d.skip_invalid_boxes)
    if own_files:
        check_image_files(val_set, "data.val_images", headers=True)
    check_same_categories(val_set, train_set.label2category, f"the training set {train_ann}")
    return train_set, val_set


def check_image_files(dataset, key: str, headers: bool = False) -> None:
    """FileNotFoundError naming ``key`` unless every image file of ``dataset`` exists; with
    ``headers``, a DatasetError unless each one's header reads and gives the size its JSON says
    (the pixels are not decoded). A wrong ``data.val_images`` would otherwise fail only at the
    evaluation after the whole training, before the last checkpoint is written."""
    folder = dataset.img_folder
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{key}={folder}: no such folder (the images of "
                                f"{dataset.ann_file})")
    missing = [dataset.image_path(i) for i in range(len(dataset))
               if not os.path.isfile(dataset.image_path(i))]
    if missing:
        raise FileNotFoundError(f"{key}={folder}: {len(missing)} of the {len(dataset)} image "
                                f"files that {dataset.ann_file} lists are missing, e.g. "
                                f"{missing[0]}")
    for i in range(len(dataset) if headers else 0):
        dataset.check_image_header(i)


def check_same_categories(dataset, label2category: dict, source: str) -> None:
    """Labels mean categories through ``label2category`` (the training set's); a dataset that
    lists other category ids would map the model's labels to the wrong ones, silently."""
    if label2category and dict(dataset.label2category) != dict(label2category):
        raise DatasetError(f"{dataset.ann_file} lists category ids "
                           f"{sorted(dataset.label2category.values())}, but {source} has "
                           f"{sorted(label2category.values())}: a model's labels 0..K-1 stand "
                           f"for the training categories, so both must list the same ids")


def move_targets(targets: list[dict], device) -> list[dict]:
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
            for t in targets]


def _fp32(outputs):
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {k: _fp32(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_fp32(v) for v in outputs)
    return outputs


class TrainingStopped(KeyboardInterrupt):
    """:attr:`Trainer.stop_requested` stopped the run between two steps, after a checkpoint."""


class Trainer:
    def __init__(self, cfg, model, criterion, postprocessor, train_set, val_set=None,
                 output_dir: str | None = None):
        self.cfg, t = check_config(cfg), cfg.train  # before any work, as load_config does
        self.info = init_distributed(t.device)
        self.device = self.info.device
        self.output_dir = output_dir or t.output_dir
        self.amp = bool(t.amp and self.device.type == "cuda")
        self.model = wrap_model(model, self.device, t.sync_bn, t.find_unused_parameters)
        # What gradient clipping runs over, listed once: model.parameters() walks every module
        # (1 273 in the GhostNetV3 demo detector, ~1.6 ms a step on the development CPU).
        self.clip_params = list(self.model.parameters())
        self.criterion = criterion.to(self.device)
        self.postprocessor = postprocessor
        self.optimizer = build_optimizer(unwrap(self.model), t.lr, t.weight_decay, t.backbone_lr,
                                         t.betas, t.backbone_prefix)
        self.scheduler = build_scheduler(self.optimizer, t.warmup_steps, t.lr_milestones,
                                         t.lr_gamma)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        self.ema = ModelEMA(self.model, t.ema_decay, t.ema_warmups) if t.ema else None
        self.train_set, self.val_set = train_set, val_set
        self.sampler = ResumableSampler(train_set, self.info.world_size, self.info.rank,
                                        shuffle=True, seed=t.seed, drop_last=True)
        self.collate = BatchCollator(cfg.data.multiscale, cfg.data.multiscale_stop_epoch, t.seed)
        self.loader = DataLoader(train_set, batch_size=t.batch_size, sampler=self.sampler,
                                 drop_last=True, collate_fn=self.collate,
                                 num_workers=t.num_workers,
                                 generator=torch.Generator().manual_seed(t.seed))
        self.steps_per_epoch = self.sampler.num_samples // t.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"train.batch_size={t.batch_size} is larger than the "
                             f"{self.sampler.num_samples} training images per process")
        self.epoch = self.global_step = self.step_in_epoch = 0
        self.losses: list[float] = []
        self.metrics: dict = {}
        # Set (e.g. by `rtdetr train`'s Ctrl-C handler) to stop after the current step with a
        # checkpoint: TrainingStopped, resumable where it stopped (on any rank: all stop)
        self.stop_requested = False

    # ------------------------------------------------------------------------------ state
    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.output_dir, "last.pth")

    def state_dict(self) -> dict:
        return {"model": unwrap(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None,
                "epoch": self.epoch, "global_step": self.global_step,
                "step_in_epoch": self.step_in_epoch, "losses": list(self.losses),
                "metrics": self.metrics, "rng": all_gather_objects(capture_rng_state()),
                "world_size": self.info.world_size, "config": dataclasses.asdict(self.cfg),
                "class_names": list(getattr(self.train_set, "class_names", [])),
                "label2category": dict(getattr(self.train_set, "label2category", {}))}

    def load_state_dict(self, state: dict, path: str = "the checkpoint") -> None:
        load_model_weights(unwrap(self.model), state["model"], path, state, self.cfg.model)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] or not self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        # else: a run without AMP (on the CPU) resumed with AMP on: the scaler starts afresh
        if self.ema is not None:
            if state.get("ema") is None:
                raise ValueError("checkpoint has no EMA state but train.ema is true")
            self.ema.load_state_dict(state["ema"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.step_in_epoch = state["step_in_epoch"]
        self.losses, self.metrics = list(state["losses"]), state.get("metrics", {})
        if state.get("world_size", 1) != self.info.world_size:
            raise ValueError(f"checkpoint was written by {state.get('world_size')} processes, "
                             f"this run has {self.info.world_size}: exact resume needs the same")
        restore_rng_state(state["rng"][self.info.rank])

    def save(self) -> None:
        state = self.state_dict()  # collective (RNG gather): every rank calls it
        if self.info.is_main:
            save_checkpoint(state, self.checkpoint_path)
        barrier()

    def resume(self, path: str) -> None:
        # Onto the CPU: load_state_dict copies weights and optimizer state to their devices,
        # and the RNG states must stay CPU tensors (on a GPU, torch.set_rng_state refuses them).
        self.load_state_dict(load_checkpoint(path, map_location="cpu", resume=True), path)
        self._forget_metrics_after_checkpoint()

    def _forget_metrics_after_checkpoint(self) -> None:
        """Drop the metrics.jsonl lines logged after the resumed checkpoint's step (a run that
        stopped after an evaluation but before its checkpoint would log that evaluation twice)."""
        path = os.path.join(self.output_dir, "metrics.jsonl")
        if not self.info.is_main or not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
        keep = [line for line in lines if _logged_step(line) <= self.global_step]
        if len(keep) < len(lines):
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(keep)
            os.replace(path + ".tmp", path)

    def eval_model(self):
        return self.ema.module if self.ema is not None else unwrap(self.model)

    # ------------------------------------------------------------------------------ loop
    def _set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.collate.set_epoch(epoch)
        if hasattr(self.train_set, "transforms") and hasattr(self.train_set.transforms,
                                                             "set_epoch"):
            self.train_set.transforms.set_epoch(epoch)

    def _done(self) -> bool:
        t = self.cfg.train
        return self.epoch >= t.epochs or (t.max_steps > 0 and self.global_step >= t.max_steps)

    def train_step(self, images: torch.Tensor, targets: list[dict]) -> float:
        t = self.cfg.train
        images = images.to(self.device, non_blocking=True)
        targets = move_targets(targets, self.device)
        with torch.autocast(self.device.type, enabled=self.amp):
            outputs = self.model(images, targets)
        with torch.autocast(self.device.type, enabled=False):
            losses = self.criterion(_fp32(outputs), targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            detail = {k: float(v) for k, v in losses.items()}
            raise FloatingPointError(f"loss is {float(loss)} at epoch {self.epoch} step "
                                     f"{self.global_step}: {detail}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if t.clip_max_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.clip_params, t.clip_max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return float(all_reduce_mean(loss.detach()))

    def train_one_epoch(self) -> None:
        t = self.cfg.train
        self._set_epoch(self.epoch)
        self.sampler.set_start(self.step_in_epoch * t.batch_size)
        self.model.train()
        self.criterion.train()
        remaining = self.steps_per_epoch - self.step_in_epoch
        if t.max_steps > 0:
            remaining = min(remaining, t.max_steps - self.global_step)
        bar = tqdm(total=remaining, desc=f"epoch {self.epoch + 1}/{t.epochs}", leave=False,
                   disable=not (t.progress and self.info.is_main), dynamic_ncols=True)
        tic = time.perf_counter()
        for images, targets in self._batches():
            if t.max_steps > 0 and self.global_step >= t.max_steps:
                break
            loss = self.train_step(images, targets)
            self.losses.append(loss)
            self.global_step += 1
            self.step_in_epoch += 1
            toc = time.perf_counter()
            ips = images.shape[0] * self.info.world_size / max(toc - tic, 1e-9)
            tic = toc
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.optimizer.param_groups[-1]['lr']:.2e}",
                            img_s=f"{ips:.1f}")
            if t.checkpoint_every_steps > 0 and self.global_step % t.checkpoint_every_steps == 0:
                self.save()
            if any_rank(self.stop_requested, self.device):
                bar.close()
                self.save()
                raise TrainingStopped(f"stopped at epoch {self.epoch + 1}, step "
                                      f"{self.global_step}, after a checkpoint")
        bar.close()
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0

    def _batches(self):
        """The loader's batches. A sample that cannot be loaded (DatasetError: a corrupt image,
        say) stops the run between two steps: in a single process the steps done so far are
        checkpointed first, to resume once the file is fixed (with several processes the other
        ranks could not join the collective save)."""
        batches = iter(self.loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except DatasetError:
                if self.info.world_size == 1 and self.step_in_epoch > 0:
                    self.save()
                raise
            yield batch

    def evaluate(self) -> dict:
        if self.val_set is None:
            return {}
        t = self.cfg.train
        sampler = ResumableSampler(self.val_set, self.info.world_size, self.info.rank,
                                   shuffle=False)
        loader = DataLoader(self.val_set, batch_size=t.val_batch_size, sampler=sampler,
                            collate_fn=BatchCollator(), num_workers=t.num_workers)
        # Under forked RNGs: evaluating (its DataLoader draws a seed from the global generator)
        # must not change the training that follows, or a run resumed from a checkpoint written
        # after an evaluation the uninterrupted run did not do would diverge from it.
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            return evaluate(self.eval_model(), self.postprocessor, loader, self.device,
                            self.val_set.ann_file, self.val_set.label2category, self.amp,
                            t.progress and self.info.is_main)

    def fit(self, resume: str | None = None) -> dict:
        t = self.cfg.train
        if resume:
            self.resume(resume)
            if self._done() and self.info.is_main:  # else a silent no-op that looks like a run
                limit = f"train.max_steps={t.max_steps}" if t.max_steps > 0 and \
                    self.global_step >= t.max_steps else f"train.epochs={t.epochs}"
                tqdm.write(f"{resume} has done {self.epoch} epochs ({self.global_step} steps): "
                           f"{limit} is reached, nothing to train (raise it to train on)")
        while not self._done():
            self.train_one_epoch()
            last = self._done()
            if self.val_set is not None and (last or (t.eval_every_epochs > 0 and self.epoch %
                                                      t.eval_every_epochs == 0 and
                                                      self.step_in_epoch == 0)):
                self.metrics = self.evaluate()
                self._log_metrics()
            self.save()
        return {"metrics": self.metrics, "losses": self.losses, "epoch": self.epoch,
                "global_step": self.global_step}

    def _log_metrics(self) -> None:
        if not self.info.is_main:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps({"epoch": self.epoch, "step": self.global_step,
                                **{k: (v if math.isfinite(v) else None)
                                   for k, v in self.metrics.items()}}) + "\n")
        summary = ", ".join(f"{k} {v:.3f}" for k, v in self.metrics.items() if k.startswith("AP"))
        tqdm.write(f"[epoch {self.epoch} step {self.global_step}] {summary}")


def _logged_step(line: str) -> float:
    """The ``step`` of a metrics.jsonl line (-inf for a line that is not one: kept)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("-inf")
