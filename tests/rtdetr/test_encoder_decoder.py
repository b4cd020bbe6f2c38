"""HybridEncoder, PResNet, anchors, denoising and decoder semantics (small shapes, CPU)."""
import math

import pytest
import torch
from torch import nn

from rtdetr.models.backbone import build_backbone
from rtdetr.models.decoder import RTDETRDecoder, generate_anchors
from rtdetr.models.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid
from rtdetr.models.denoising import DUMMY_BOX, contrastive_denoising_group, denoising_attn_mask
from rtdetr.models import hybrid_encoder
from rtdetr.models.hybrid_encoder import (CSPRepLayer, HybridEncoder, RepVggBlock,
                                          sincos_position_embedding)
from tests.rtdetr.detector_cases import randomize_bn
from tests.backend_params import rel_err as rel


# ------------------------------------------------------------------ positional embedding
def test_sincos_position_embedding_non_square_encodes_row_then_column():
    h, w, dim, temp = 3, 5, 16, 10000.0
    pe = sincos_position_embedding(h, w, dim, temp, dtype=torch.float64)[0]
    assert pe.shape == (h * w, dim)
    q = dim // 4
    for y in range(h):
        for x in range(w):
            expect = []
            for coord in (y, x):
                angles = [coord / temp ** (i / q) for i in range(q)]
                expect += [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
            torch.testing.assert_close(pe[y * w + x], torch.tensor(expect, dtype=torch.float64),
                                       rtol=0, atol=1e-12)


def test_sincos_position_embedding_square_matches_official_construction():
    # Official: meshgrid(arange(W), arange(H), 'ij'), first half from the first grid.
    n, dim, temp = 6, 32, 10000.0
    omega = 1.0 / temp ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    gw, gh = torch.meshgrid(torch.arange(n, dtype=torch.float64),
                            torch.arange(n, dtype=torch.float64), indexing="ij")
    ow, oh = gw.flatten()[:, None] * omega, gh.flatten()[:, None] * omega
    official = torch.cat([ow.sin(), ow.cos(), oh.sin(), oh.cos()], 1)
    ours = sincos_position_embedding(n, n, dim, temp, dtype=torch.float64)[0]
    torch.testing.assert_close(ours, official, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ RepVGG / CSP
def test_encoder_builds_the_position_embedding_once_per_size(monkeypatch):
    """The AIFI embedding is a constant: cached per (size, device, dtype), equal to the function's
    result, and the encoder's output is unchanged by the cache."""
    torch.manual_seed(0)
    enc = HybridEncoder(in_channels=(8, 16, 32), hidden_dim=32, nhead=4, dim_feedforward=64,
                        expansion=0.5, depth_mult=0.34).eval()
    built = []
    real = hybrid_encoder.sincos_position_embedding
    monkeypatch.setattr(hybrid_encoder, "sincos_position_embedding",
                        lambda *a, **k: built.append(a[:2]) or real(*a, **k))
    feats = [torch.rand(2, c, s, s + 1) for c, s in ((8, 8), (16, 4), (32, 2))]
    with torch.no_grad():
        first = enc(feats)
        again = enc(feats)
        enc([torch.rand(2, c, s, s + 1) for c, s in ((8, 12), (16, 6), (32, 3))])  # new size
    assert built == [(2, 3), (3, 4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    cached = enc.position_embedding(2, 3, torch.device("cpu"), torch.float32)
    assert torch.equal(cached, real(2, 3, 32, enc.pe_temperature, "cpu", torch.float32))
    for size in range(hybrid_encoder.MAX_POSITION_CACHE + 1):  # bounded: cleared when full
        enc.position_embedding(1, size + 1, torch.device("cpu"), torch.float32)
    assert len(enc._position_cache) <= hybrid_encoder.MAX_POSITION_CACHE


def test_repvgg_fold_equals_two_branches_float64():
    block = RepVggBlock(6, 8).double()
    randomize_bn(block)
    block.eval()
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    ref = block(x)
    block.reparameterize()
    assert not hasattr(block, "conv1") and block.conv.bias is not None
    assert rel(block(x), ref) < 1e-12


def test_csp_conv3_identity_only_when_hidden_equals_out():
    assert isinstance(CSPRepLayer(16, 8, 1, expansion=1.0).conv3, nn.Identity)
    assert not isinstance(CSPRepLayer(16, 8, 1, expansion=0.5).conv3, nn.Identity)


# ------------------------------------------------------------------ PResNet
@pytest.mark.parametrize("name,channels", [("presnet18", [128, 256, 512]),
                                           ("presnet50", [512, 1024, 2048])])
def test_presnet_features_at_strides_8_16_32(name, channels):
    net = build_backbone(name)
    assert net.out_channels == channels and net.out_strides == [8, 16, 32]
    feats = net(torch.rand(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, c, 64 // s, 96 // s)
                                               for c, s in zip(channels, [8, 16, 32])]


def test_presnet_vd_structure_and_freezing():
    net = build_backbone("presnet18", freeze_at=0, freeze_norm=True)
    assert [m.conv.out_channels for m in net.conv1] == [32, 32, 64]
    assert net.res_layers[0].blocks[0].short is not None  # stage-0 projection (64 -> 64)
    short = net.res_layers[1].blocks[0].short
    assert isinstance(short.pool, nn.AvgPool2d) and short.pool.ceil_mode
    assert not any(p.requires_grad for p in net.conv1.parameters())
    assert all(p.requires_grad for p in net.res_layers.parameters())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    with pytest.raises(ValueError, match="width"):
        build_backbone("presnet18", width=1.0)


# ------------------------------------------------------------------ anchors
def test_anchors_valid_ring_and_xy_order():
    logits, valid = generate_anchors([(80, 80), (40, 40), (20, 20)], eps=0.01)
    assert logits.shape == (1, 8400, 4) and int((valid == 0).sum()) == 316
    assert torch.isinf(logits[valid[..., 0] == 0]).all()
    logits, valid = generate_anchors([(2, 3), (1, 2)], eps=0.01)
    boxes = logits.sigmoid()[0].double()
    # level 0 (h=2, w=3), token y*w + x = 1*3 + 2 -> centre ((2+.5)/3, (1+.5)/2), size 0.05
    torch.testing.assert_close(boxes[5], torch.tensor([2.5 / 3, 0.75, 0.05, 0.05],
                                                      dtype=torch.float64), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(boxes[7], torch.tensor([0.75, 0.5, 0.1, 0.1], dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ denoising
def _targets(counts, num_classes, rng_boxes=True):
    out = []
    for n in counts:
        cxcy = torch.rand(n, 2) * 0.2 + 0.4
        wh = torch.rand(n, 2) * 0.1 + 0.05
        out.append({"labels": torch.randint(0, num_classes, (n,)),
                    "boxes": torch.cat([cxcy, wh], 1)})
    return out


def test_denoising_groups_mask_and_positive_indices():
    K, Q, hidden = 7, 5, 8
    embed = nn.Embedding(K + 1, hidden, padding_idx=K)
    targets = _targets([2, 0, 3], K)
    content, ref, mask, meta = contrastive_denoising_group(targets, K, Q, embed, num_denoising=10)
    G, groups = 3, 10 // 3
    n_dn = 2 * G * groups
    assert meta["dn_num_group"] == groups and meta["dn_num_split"] == [n_dn, Q]
    assert content.shape == (3, n_dn, hidden) and ref.shape == (3, n_dn, 4)
    for i, n in enumerate([2, 0, 3]):
        expect = [g * 2 * G + j for g in range(groups) for j in range(n)]
        assert meta["dn_positive_idx"][i].tolist() == expect
    assert mask.shape == (n_dn + Q, n_dn + Q) and mask.dtype == torch.bool
    for r in range(n_dn + Q):
        for c in range(n_dn + Q):
            if c >= n_dn:
                blocked = False  # everybody sees the matching queries
            elif r >= n_dn:
                blocked = True  # matching queries never see DN queries
            else:
                blocked = r // (2 * G) != c // (2 * G)
            assert bool(mask[r, c]) == blocked, (r, c)
    # padding slots (image 1 has no gt) use the zero padding embedding
    assert torch.equal(content[1], torch.zeros_like(content[1]))


def _loop_denoising_group(targets, num_classes, num_queries, class_embed, num_denoising,
                          label_noise_ratio, box_noise_scale):
    """contrastive_denoising_group as first written: gts placed and positive slots found image by
    image (the reference for the batched version)."""
    device = class_embed.weight.device
    num_gts = [int(t["labels"].shape[0]) for t in targets]
    batch, max_gt = len(targets), max(num_gts, default=0)
    empty = max_gt == 0
    group_gt = 1 if empty else max_gt
    num_group = 1 if empty else max(1, num_denoising // max_gt)
    labels = torch.full((batch, group_gt), num_classes, dtype=torch.long, device=device)
    boxes = torch.zeros(batch, group_gt, 4, device=device)
    if empty:
        boxes[:] = torch.tensor(DUMMY_BOX, device=device)
    real = torch.zeros(batch, group_gt, dtype=torch.bool, device=device)
    for i, (t, n) in enumerate(zip(targets, num_gts)):
        labels[i, :n] = t["labels"].to(device)
        boxes[i, :n] = t["boxes"].to(device=device, dtype=boxes.dtype)
        real[i, :n] = True
    labels = labels.repeat(1, 2 * num_group)
    boxes = boxes.repeat(1, 2 * num_group, 1)
    real = real.repeat(1, 2 * num_group)
    negative = torch.zeros(batch, 2 * group_gt, 1, device=device)
    negative[:, group_gt:] = 1.0
    negative = negative.repeat(1, num_group, 1)
    positive_slots = real & (negative[..., 0] == 0)
    slot_index = torch.arange(labels.shape[1], device=device)
    dn_positive_idx = [slot_index[positive_slots[i]] for i in range(batch)]
    if label_noise_ratio > 0:
        flip = (torch.rand(labels.shape, device=device) < label_noise_ratio * 0.5) & real
        labels = torch.where(flip, torch.randint_like(labels, 0, num_classes), labels)
    if box_noise_scale > 0:
        xyxy = box_cxcywh_to_xyxy(boxes)
        half_size = boxes[..., 2:].repeat(1, 1, 2) * 0.5 * box_noise_scale
        sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
        magnitude = torch.rand_like(boxes) + negative
        boxes = box_xyxy_to_cxcywh((xyxy + sign * magnitude * half_size).clamp(0.0, 1.0))
    attn_mask = denoising_attn_mask(2 * group_gt, num_group, num_queries, device)
    dn_meta = {"dn_positive_idx": dn_positive_idx, "dn_num_group": num_group,
               "dn_num_split": [labels.shape[1], num_queries]}
    return class_embed(labels), inverse_sigmoid(boxes), attn_mask, dn_meta


@pytest.mark.parametrize("counts", [[2, 0, 3], [5, 1, 0, 4, 4], [0, 0], [1]])
@pytest.mark.parametrize("noise", [(0.5, 1.0), (0.0, 0.0)])
def test_denoising_group_equals_the_image_by_image_construction(counts, noise):
    K = 6
    embed = nn.Embedding(K + 1, 8, padding_idx=K)
    targets = _targets(counts, K)
    targets[0]["boxes"] = targets[0]["boxes"].double()  # cast to the query dtype as before
    args = (targets, K, 5, embed, 12, *noise)
    state = torch.get_rng_state()
    got = contrastive_denoising_group(*args)
    torch.set_rng_state(state)
    want = _loop_denoising_group(*args)
    for g, w in zip(got[:3], want[:3]):
        assert torch.equal(g, w)
    assert [p.tolist() for p in got[3]["dn_positive_idx"]] == \
        [p.tolist() for p in want[3]["dn_positive_idx"]]
    assert all(p.dtype == torch.int64 for p in got[3]["dn_positive_idx"])
    assert {k: v for k, v in got[3].items() if k != "dn_positive_idx"} == \
        {k: v for k, v in want[3].items() if k != "dn_positive_idx"}


def test_denoising_box_noise_magnitudes():
    K = 3
    embed = nn.Embedding(K + 1, 4, padding_idx=K)
    targets = _targets([4, 4], K)
    _, ref, _, meta = contrastive_denoising_group(targets, K, 2, embed, num_denoising=20,
                                                  label_noise_ratio=0.0, box_noise_scale=1.0)
    G, groups = 4, 5
    noisy = ref.double().sigmoid()
    checked = 0
    for i, t in enumerate(targets):
        gt = t["boxes"].double()
        gt_xyxy = torch.cat([gt[:, :2] - gt[:, 2:] / 2, gt[:, :2] + gt[:, 2:] / 2], 1)
        half = gt[:, 2:].repeat(1, 2) / 2
        for g in range(groups):
            for part, (lo, hi) in enumerate([(0.0, 1.0), (1.0, 2.0)]):
                s = g * 2 * G + part * G
                b = noisy[i, s:s + G]
                xyxy = torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1)
                mag = (xyxy - gt_xyxy).abs() / half
                # A negative whose corners crossed has w or h clipped to 0: corners unrecoverable.
                kept = (b[:, 2:] > 1e-3).all(1)
                checked += int(kept.sum())
                assert (mag[kept] >= lo - 1e-4).all() and (mag[kept] < hi + 1e-4).all()
    assert checked >= 2 * groups * G  # every positive and some negatives


def test_denoising_label_noise_rate():
    K = 1000
    embed = nn.Embedding(K + 1, 16, padding_idx=K)
    targets = _targets([50] * 8, K)
    content, _, _, _ = contrastive_denoising_group(targets, K, 2, embed, num_denoising=100,
                                                   label_noise_ratio=0.5)
    labels = torch.cdist(content.reshape(-1, 16), embed.weight).argmin(-1).view(8, -1)
    orig = torch.stack([t["labels"] for t in targets]).repeat(1, 4)
    changed = (labels != orig).float().mean().item()
    assert 0.2 < changed < 0.3  # expected 0.25 * (1 - 1/K) over 1600 slots


def test_denoising_all_empty_batch_keeps_dummy_group():
    K, Q = 4, 3
    embed = nn.Embedding(K + 1, 8, padding_idx=K)
    targets = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    content, ref, mask, meta = contrastive_denoising_group(targets, K, Q, embed, num_denoising=10)
    assert content.shape == (2, 2, 8) and ref.shape == (2, 2, 4) and mask.shape == (5, 5)
    assert meta["dn_num_group"] == 1 and all(len(p) == 0 for p in meta["dn_positive_idx"])
    assert torch.isfinite(ref).all()


# ------------------------------------------------------------------ decoder
def _decoder(**kw):
    args = dict(num_classes=5, feat_channels=[16, 16, 16], hidden_dim=16, num_queries=10,
                nhead=2, num_points=2, num_decoder_layers=3, dim_feedforward=32,
                num_denoising=0)
    args.update(kw)
    return RTDETRDecoder(**args)


def _feats(b=2, h=16, w=12):
    return [torch.randn(b, 16, h // s, w // s) for s in (1, 2, 4)]


def test_decoder_initialisation():
    dec = _decoder(num_denoising=10)
    prior = -math.log((1 - 0.01) / 0.01)
    for head in [dec.enc_score_head, *dec.dec_score_head]:
        torch.testing.assert_close(head.bias, torch.full_like(head.bias, prior))
    for mlp in [dec.enc_bbox_head, *dec.dec_bbox_head]:
        assert not mlp.layers[-1].weight.any() and not mlp.layers[-1].bias.any()
    assert not dec.denoising_class_embed.weight[-1].any()
    assert not dec.layers[0].cross_attn.attention_weights.weight.any()


def test_decoder_detach_pattern():
    dec = _decoder()
    for mlp in dec.dec_bbox_head:  # non-zero so gradients flow through the deltas
        nn.init.normal_(mlp.layers[-1].weight, std=0.1)
    dec.train()
    out = dec(_feats())
    (out["pred_boxes"].sum() + out["pred_logits"].sum()).backward()
    grad = lambda m: any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert grad(dec.dec_bbox_head[2]) and grad(dec.dec_bbox_head[1])  # look forward twice
    assert not grad(dec.dec_bbox_head[0])
    assert not grad(dec.enc_output) and not grad(dec.enc_bbox_head) and not grad(dec.enc_score_head)
    assert grad(dec.input_proj)
    dec.zero_grad()
    enc = dec(_feats())["enc_aux_outputs"][0]
    (enc["pred_boxes"].sum() + enc["pred_logits"].sum()).backward()
    assert grad(dec.enc_bbox_head) and grad(dec.enc_score_head) and grad(dec.enc_output)


def test_decoder_eval_stops_at_eval_idx():
    dec = _decoder(eval_idx=0).eval()
    calls = []
    for i, layer in enumerate(dec.layers):
        layer.register_forward_hook(lambda *a, i=i: calls.append(i))
    out = dec(_feats())
    assert calls == [0] and out["pred_logits"].shape == (2, 10, 5)


def test_decoder_rejects_inputs_smaller_than_num_queries():
    dec = _decoder(num_queries=50).eval()
    with pytest.raises(ValueError, match="num_queries=50"):
        dec(_feats(h=4, w=4))  # 16 + 4 + 1 = 21 positions < 50 queries


@pytest.mark.parametrize("kwargs", [{"num_queries": 0}, {"num_queries": -1},
                                    {"num_decoder_layers": 0}])
def test_decoder_rejects_no_queries_or_layers(kwargs):
    """num_queries <= 0 used to build and then fail in the first forward, in topk or reshape."""
    with pytest.raises(ValueError, match="num_queries and num_decoder_layers must be >= 1"):
        _decoder(**kwargs)


def test_query_selection_equals_box_head_over_every_position_then_top_k():
    """The encoder box head runs on the top-k rows only; it must equal RT-DETR's formulation
    (box head over all S positions + anchors, then gather the top k), values and gradients."""
    torch.manual_seed(0)
    dec = _decoder(num_levels=4).double().train()
    for mlp in [dec.enc_bbox_head]:
        nn.init.normal_(mlp.layers[-1].weight, std=0.3)
    feats = [f.double() for f in _feats(h=24, w=20)]
    memory, shapes = dec._flatten_memory(feats)
    content, ref_unact, topk_logits = dec._select_queries(memory, shapes)
    # the official formulation, written out
    anchors, valid = dec.anchors(shapes, memory.device, memory.dtype)
    out_mem = dec.enc_output(memory * valid)
    logits = dec.enc_score_head(out_mem)
    coords = dec.enc_bbox_head(out_mem) + anchors
    idx = logits.max(-1).values.topk(dec.num_queries, dim=1).indices
    expect_ref = torch.stack([c[i] for c, i in zip(coords, idx)])
    expect_content = torch.stack([m[i] for m, i in zip(out_mem, idx)])
    assert torch.isfinite(expect_ref).any()
    torch.testing.assert_close(ref_unact, expect_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(content, expect_content, rtol=1e-12, atol=0)
    torch.testing.assert_close(topk_logits, torch.stack([g[i] for g, i in zip(logits, idx)]))
    finite = torch.isfinite(expect_ref)
    grads = torch.autograd.grad(ref_unact[finite].sum(), list(dec.enc_bbox_head.parameters()))
    expect = torch.autograd.grad(expect_ref[finite].sum(), list(dec.enc_bbox_head.parameters()))
    for g, e in zip(grads, expect):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_size_cache_and_position_embedding_reject_bad_arguments():
    from rtdetr.models.size_cache import cached
    for limit in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="limit must be an int >= 1"):
            cached({}, "k", lambda: 1, limit)
    cache = {}
    assert cached(cache, "k", lambda: 1, 1) == 1 and cached(cache, "k", lambda: 2, 1) == 1
    assert cached(cache, "j", lambda: 3, 1) == 3 and list(cache) == ["j"]  # full: cleared
    enc = HybridEncoder(in_channels=(8, 16, 32), hidden_dim=32, nhead=4, dim_feedforward=64)
    with pytest.raises(ValueError, match="height and width must be positive, got 0 x 3"):
        enc.position_embedding(0, 3, torch.device("cpu"), torch.float32)
