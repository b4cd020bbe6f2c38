"""Two processes (gloo, CPU) train the real tiny model with DDP: identical weights on both ranks
after every step, including a step where one rank's batch has no boxes at all."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TINY = ["model.backbone.width=0.5", "model.encoder.hidden_dim=32", "model.encoder.nhead=2",
        "model.encoder.dim_feedforward=64", "model.decoder.hidden_dim=32",
        "model.decoder.nhead=2", "model.decoder.num_decoder_layers=1",
        "model.decoder.dim_feedforward=64", "model.decoder.num_queries=12",
        "model.decoder.num_denoising=6", "data.image_size=64", "data.synthetic_image_size=64",
        "data.synthetic_num_train=8", "data.synthetic_num_val=2", "data.multiscale=null",
        "train.batch_size=2", "train.epochs=1", "train.max_steps=1", "train.progress=false",
        "train.warmup_steps=1", "train.ema=false", "train.backbone_lr=null", "train.lr=1e-3"]


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _worker(rank, world, init_file, root, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    from rtdetr.config import load_config
    from rtdetr.engine import Trainer, build_datasets
    from rtdetr.models.config import build_model
    cfg = load_config("demo", TINY + [f"data.root={root}", f"train.output_dir={root}/run"])
    torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's weights
    model, criterion, post = build_model(cfg.model)
    train_set, _ = build_datasets(cfg.data, cfg.train.seed)
    trainer = Trainer(cfg, model, criterion, post, train_set)
    start = _flat(trainer.model).clone()
    trainer.fit()  # one step through the DistributedSampler, then an atomic checkpoint
    report = []
    for step in range(2):
        images = torch.rand(2, 3, 64, 64)
        if step == 1 and rank == 1:
            targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
                       for _ in range(2)]
        else:
            targets = [{"labels": torch.tensor([0, 2]),
                        "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])}
                       for _ in range(2)]
        loss = trainer.train_step(images, targets)
        flat = _flat(trainer.model)
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        report.append({"loss": loss, "max_rank_diff": float((gathered[0] - gathered[1]).abs()
                                                            .max()),
                       "moved": float((flat - start).abs().max())})
    # A stop requested on rank 1 only (its Ctrl-C) stops both ranks after the same step, with
    # one checkpoint (the save is collective: a rank stopping alone would hang the other)
    from rtdetr.engine.train import TrainingStopped
    trainer.cfg.train.max_steps = 4
    trainer.stop_requested = rank == 1
    stopped = [False]
    try:
        trainer.fit()
    except TrainingStopped:
        stopped = [True]
    everyone = [None] * world
    dist.all_gather_object(everyone, (stopped[0], trainer.global_step))
    if rank == 0:
        torch.save({"report": report, "ckpt": os.path.isfile(trainer.checkpoint_path),
                    "stopped": everyone,
                    "saved_step": torch.load(trainer.checkpoint_path, weights_only=False)[
                        "global_step"]}, out_file)
    dist.destroy_process_group()


def test_two_process_ddp_identical_weights_with_an_empty_rank(tmp_path):
    out_file = str(tmp_path / "report.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "data"), out_file),
             nprocs=2, join=True)
    result = torch.load(out_file)
    assert result["ckpt"]
    assert result["stopped"] == [(True, 2), (True, 2)] and result["saved_step"] == 2
    for step in result["report"]:
        assert torch.isfinite(torch.tensor(step["loss"]))
        assert step["max_rank_diff"] == 0.0
        assert step["moved"] > 0.0
