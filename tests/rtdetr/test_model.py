"""The assembled RT-DETR: parameter count, outputs in train/eval, deploy(), empty targets, sizes."""
import copy

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from rtdetr.models import ModelConfig, build_detector, build_model, load_model_config
from rtdetr.models.hybrid_encoder import RepVggBlock
from tests.rtdetr.detector_cases import TINY_GHOST, randomize_bn

CONFIGS = "rtdetr/configs"
TINY = {"num_classes": 5,
        "encoder": {"hidden_dim": 32, "nhead": 4, "dim_feedforward": 64, "expansion": 0.5,
                    "depth_mult": 0.34},
        "decoder": {"hidden_dim": 32, "nhead": 4, "num_points": 2, "num_decoder_layers": 2,
                    "num_queries": 20, "num_denoising": 12, "dim_feedforward": 64},
        "postprocessor": {"num_top_queries": 20}}


def tiny_model(frozen_backbone=False, **decoder):
    """Frozen backbone: the CPU cost of a training step is then mostly encoder and decoder."""
    backbone = {"name": "presnet18", "freeze_at": 4 if frozen_backbone else -1}
    cfg = {**TINY, "backbone": backbone, "decoder": {**TINY["decoder"], **decoder}}
    return build_model(cfg)


def targets(counts, k=5):
    out = []
    for n in counts:
        cxcy = torch.rand(n, 2) * 0.5 + 0.25
        wh = torch.rand(n, 2) * 0.3 + 0.1
        out.append({"labels": torch.randint(0, k, (n,)), "boxes": torch.cat([cxcy, wh], 1)})
    return out


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_r18_parameter_count_matches_official():
    model = build_detector(load_model_config(f"{CONFIGS}/rtdetr_r18vd.yaml"))
    assert (count(model.backbone), count(model.encoder), count(model.decoder)) == \
        (11_199_968, 4_965_120, 4_019_376)
    assert count(model) == 20_184_464


@pytest.mark.parametrize("name", ["demo", "rtdetr_ghostnetv3_050", "rtdetr_ghostnetv3_100",
                                  "rtdetr_ghostnetv3_130"])
def test_configs_load_and_build(name):
    cfg = load_model_config(f"{CONFIGS}/{name}.yaml")
    model = build_detector(cfg)
    assert model.backbone.out_strides == [8, 16, 32]
    assert model.encoder.in_channels == model.backbone.out_channels


def test_config_rejects_unknown_keys_and_ignores_other_sections(tmp_path):
    with pytest.raises(ValueError, match="num_querys"):
        ModelConfig.from_dict({"decoder": {"num_querys": 3}})
    path = tmp_path / "c.yaml"
    path.write_text("data: {root: x}\ntrain: {epochs: 1}\nmodel:\n  num_classes: 3\n")
    assert load_model_config(path).num_classes == 3


def test_train_outputs_with_denoising():
    model, _, _ = tiny_model()
    model.train()
    tg = targets([2, 3])
    out = model(torch.rand(2, 3, 64, 64), tg)
    assert out["pred_logits"].shape == (2, 20, 5) and out["pred_boxes"].shape == (2, 20, 4)
    assert len(out["aux_outputs"]) == 1 and len(out["enc_aux_outputs"]) == 1
    assert out["enc_aux_outputs"][0]["pred_logits"].shape == (2, 20, 5)
    meta = out["dn_meta"]
    n_dn = 2 * 3 * (12 // 3)
    assert meta["dn_num_split"] == [n_dn, 20] and meta["dn_num_group"] == 4
    assert len(out["dn_aux_outputs"]) == 2
    assert out["dn_aux_outputs"][-1]["pred_boxes"].shape == (2, n_dn, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()


def test_training_validates_targets_first():
    model, _, _ = tiny_model()
    model.train()
    bad = targets([1, 1])
    bad[1]["labels"][0] = 5  # == num_classes
    with pytest.raises(ValueError, match="labels"):
        model(torch.rand(2, 3, 64, 64), bad)
    with pytest.raises(ValueError, match="images"):
        model(torch.rand(2, 1, 64, 64))


def test_images_of_another_dtype_than_the_model_raise_naming_images():
    """A float64 (or bfloat16) batch for a float32 model used to fail inside the backbone's first
    conv ("expected scalar type Double but found Float"); under autocast it is fine."""
    model, _, _ = tiny_model()
    model.eval()
    for dtype in (torch.float64, torch.bfloat16):
        with pytest.raises(TypeError, match=rf"images must have the model's dtype "
                                            rf"\(torch.float32.*got {dtype}"):
            model(torch.rand(1, 3, 64, 64, dtype=dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(1, 3, 64, 64, dtype=torch.bfloat16))
        assert torch.isfinite(out["pred_boxes"].float()).all()
        with pytest.raises(TypeError, match="images must have the model's dtype"):
            model(torch.rand(1, 3, 64, 64, dtype=torch.float64))  # autocast keeps float64
    with torch.no_grad():
        assert model.double()(torch.rand(1, 3, 64, 64, dtype=torch.float64))[
            "pred_boxes"].dtype == torch.float64
    with pytest.raises(ValueError, match=r"images must be on the model's device \(cpu\), "
                                         r"got meta"):
        model(torch.rand(1, 3, 64, 64, dtype=torch.float64, device="meta"))


def test_inference_mode_eval_then_training_at_the_same_size():
    """The per-size constants (anchors, level tables, position embedding) first built under
    torch.inference_mode() were inference tensors: that forward failed in the deformable
    attention ("Inference tensors do not track version counter"), and a later training step
    at that size could not save them for backward."""
    model, criterion, _ = tiny_model(frozen_backbone=True)
    model.eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.inference_mode():
        out = model(x)
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(out["pred_boxes"], ref["pred_boxes"])
    model.train()
    tg = targets([1, 2])
    loss = sum(criterion(model(x, tg), tg).values())
    loss.backward()
    assert torch.isfinite(loss)


def test_boxes_stay_float32_under_autocast():
    """As in the official model, the anchors are float32 under autocast, so the reference boxes
    and each layer's refined boxes are float32 (half-precision deltas added to float32 logits);
    they were bfloat16 here, ~2.5 px steps at 640. A half-precision model keeps its dtype."""
    model, _, _ = tiny_model()
    x = torch.rand(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, targets([1, 2]))
    boxes = [out["pred_boxes"], *(o["pred_boxes"] for o in out["aux_outputs"]),
             out["enc_aux_outputs"][0]["pred_boxes"], *(o["pred_boxes"] for o in
                                                       out.get("dn_aux_outputs", []))]
    assert len(boxes) >= 3
    for b in boxes:
        assert b.dtype == torch.float32
        # not merely bfloat16 values in a float32 tensor: most are off bfloat16's grid
        assert (b.bfloat16().float() != b).float().mean() > 0.5
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x)["pred_boxes"].dtype == torch.float32
    with torch.no_grad():
        assert model.bfloat16()(x.bfloat16())["pred_boxes"].dtype == torch.bfloat16


@pytest.mark.parametrize("size", [(64, 64), (96, 64), (64, 128)])
def test_eval_at_sizes_other_than_training(size):
    model, _, post = tiny_model()
    model.train()
    model(torch.rand(2, 3, 96, 96), targets([1, 2]))
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, *size))
    assert set(out) == {"pred_logits", "pred_boxes"}
    assert out["pred_logits"].shape == (2, 20, 5) and torch.isfinite(out["pred_boxes"]).all()
    res = post(out, torch.tensor([[size[1], size[0]]] * 2))
    assert len(res) == 2


def _grad_names(model, criterion, tg):
    model.zero_grad()
    out = model(torch.rand(len(tg), 3, 64, 64), tg)
    loss = sum(criterion(out, tg).values())
    assert torch.isfinite(loss)
    loss.backward()
    return {n for n, p in model.named_parameters() if p.grad is not None}


def test_empty_target_batches_keep_the_same_graph():
    model, criterion, _ = tiny_model(frozen_backbone=True)
    model.train()
    full = _grad_names(model, criterion, targets([2, 1]))
    some = _grad_names(model, criterion, targets([0, 2]))
    none = _grad_names(model, criterion, targets([0, 0]))
    assert full == some == none
    out = model(torch.rand(2, 3, 64, 64), targets([0, 0]))
    assert out["dn_meta"]["dn_num_group"] == 1
    assert all(len(p) == 0 for p in out["dn_meta"]["dn_positive_idx"])


DEPLOY_CASES = {
    "r18": {},
    "r18-frozen-norm-extra-level": {"backbone": {"name": "presnet18", "freeze_norm": True},
                                    "decoder": {**TINY["decoder"], "num_levels": 4}},
    "ghostnetv3": {"backbone": TINY_GHOST["backbone"]},
}


@pytest.mark.parametrize("case", DEPLOY_CASES)
def test_deploy_equals_unfolded_eval_model_and_leaves_no_norm(case):
    model = build_detector(ModelConfig.from_dict({**TINY, **DEPLOY_CASES[case]})).double()
    randomize_bn(model)
    model.eval()
    norms = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == ("frozen" in case)
    x = torch.rand(2, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        model.deploy()
        out = model(x)
    assert not model.training
    blocks = [m for m in model.modules() if isinstance(m, RepVggBlock)]
    assert blocks and all(hasattr(b, "conv") and not hasattr(b, "conv1") for b in blocks)
    # every conv+BN folded: backbone, encoder (input projections, CSP, lateral/downsample convs)
    # and the decoder's input projections
    assert [n for n, m in model.named_modules() if isinstance(m, norms)] == []
    assert_same_queries(out, ref, tol=1e-10)
    model.deploy()  # idempotent
    with torch.no_grad():
        again = model(x)
    assert torch.equal(again["pred_boxes"], out["pred_boxes"])


def test_conv_norm_state_dict_keys_are_unchanged_for_official_checkpoints():
    """The input projections became ConvNorm modules: their keys must stay RT-DETR's
    (``input_proj.i.conv.weight``, ``input_proj.i.norm.*``)."""
    model = build_detector(ModelConfig.from_dict(
        {**TINY, "decoder": {**TINY["decoder"], "num_levels": 4}}))
    keys = model.state_dict().keys()
    for prefix, levels in (("encoder.input_proj", 3), ("decoder.input_proj", 4)):
        for i in range(levels):
            assert {f"{prefix}.{i}.conv.weight", f"{prefix}.{i}.norm.weight",
                    f"{prefix}.{i}.norm.running_var"} <= keys
            assert f"{prefix}.{i}.conv.bias" not in keys


def test_overfit_one_batch_loss_falls():
    torch.set_num_threads(1)  # tiny ops: threads only add overhead on a shared 2-core machine
    model, criterion, _ = tiny_model(frozen_backbone=True, num_denoising=0)
    model.train()
    x, tg = torch.rand(2, 3, 64, 64), targets([2, 1])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss = sum(criterion(model(x, tg), tg).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    # Matching can make the first steps go up; over 40 steps the loss must fall clearly.
    assert min(losses[-5:]) < 0.7 * max(losses[:3])


@pytest.mark.parametrize("case", ["r18", "ghostnetv3"])
def test_channels_last_model_stays_channels_last_through_deploy_and_the_encoder(case):
    """model.to(memory_format=torch.channels_last).deploy(): every folded conv weight and every
    encoder output map is channels_last (a plain .contiguous() after the AIFI layer once turned
    the whole FPN/PAN NCHW), and the outputs equal the NCHW model's."""
    model = build_detector(ModelConfig.from_dict({**TINY, **DEPLOY_CASES[case]}))
    randomize_bn(model)
    model.eval()
    x = torch.rand(2, 3, 64, 96)
    reference = copy.deepcopy(model).deploy()
    with torch.no_grad():
        ref = reference(x)
    model = model.to(memory_format=torch.channels_last).deploy()
    wrong = [n for n, p in model.named_parameters()
             if p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last)]
    assert wrong == []
    xc = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        maps = model.encoder(model.backbone(xc))
        ref_maps = reference.encoder(reference.backbone(x))
        out = model(xc)
    assert all(m.is_contiguous(memory_format=torch.channels_last) and not m.is_contiguous()
               for m in maps)
    for m, r in zip(maps, ref_maps, strict=True):
        assert ((m - r).norm() / r.norm()).item() < 1e-5
    assert_same_queries(out, ref, tol=1e-5)


def assert_same_queries(out: dict, ref: dict, tol: float) -> None:
    """The decoder outputs agree up to the order of the queries: the encoder's top-k query
    selection may rank two near-equal scores differently when the convolutions sum in another
    order (a measured case: float32 NCHW swapped two queries that float64 and channels_last kept
    in order). Each query's (logits, box) must match exactly one reference query."""
    rows = torch.cat([out["pred_logits"], out["pred_boxes"]], -1)
    ref_rows = torch.cat([ref["pred_logits"], ref["pred_boxes"]], -1)
    assert rows.shape == ref_rows.shape
    for b in range(rows.shape[0]):
        nearest = torch.cdist(rows[b], ref_rows[b]).argmin(-1)
        assert sorted(nearest.tolist()) == list(range(rows.shape[1])), f"image {b}: {nearest}"
        matched = ref_rows[b, nearest]
        assert ((rows[b] - matched).norm() / matched.norm()).item() < tol
