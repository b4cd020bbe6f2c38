"""GhostNetV3 backbone: architecture numbers of the spec, exact folding, fused ops, timm parity.

Numbers (channels, parameter and MAC counts) are the measured ones of spec ghostnetv3.md §2.
Folding is checked in eval mode against the training-time model with randomised BN statistics.
"""
import copy

import pytest
import torch
from torch import nn

import ghostkernels
from ghostkernels import use_backend
from rtdetr.models.backbone.ghostnetv3 import IMAGENET_MEAN, IMAGENET_STD, GhostNetV3
from rtdetr.models.backbone.ghostnetv3_blocks import (ConvBn, DepthwiseConv2d, GhostBottleneckV3,
                                                      SqueezeExcite, conv_relu)
from tests.rtdetr.detector_cases import randomize_bn
from tests.backend_params import backend_params, rel_err, require

WIDTHS = (0.5, 1.0, 1.3, 1.6)
# outputs of blocks[0..9] (spec §2.3)
BLOCK_CHANNELS = {
    0.5: [8, 12, 12, 20, 20, 40, 56, 80, 80, 480],
    1.0: [16, 24, 24, 40, 40, 80, 112, 160, 160, 960],
    1.3: [20, 32, 32, 52, 52, 104, 144, 208, 208, 1248],
    1.6: [24, 40, 40, 64, 64, 128, 180, 256, 256, 1536],
}
BLOCK_STRIDES = [2, 4, 4, 8, 8, 16, 16, 32, 32, 32]
# (train-mode, official deploy) parameters with the ImageNet head, in millions (spec §2.4)
PARAMS_M = {0.5: (3.395, 2.853), 1.0: (8.129, 6.148), 1.3: (12.218, 8.948)}


pytestmark = pytest.mark.usefixtures("torch_single_thread")


def n_params(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def conv_linear_macs(model: GhostNetV3, size: int = 224) -> float:
    """Multiply-accumulates of every Conv2d and Linear call (forward hooks), in millions."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        conv = isinstance(module, nn.Conv2d)
        per_output = module.weight[0].numel() if conv else module.in_features
        total += output.numel() // output.shape[0] * per_output

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.forward_classifier(torch.rand(1, 3, size, size))
    for h in handles:
        h.remove()
    return total / 1e6


# ------------------------------------------------------------------------------ architecture


@pytest.mark.parametrize("width", WIDTHS)
def test_channels_strides_and_taps_match_spec(width):
    with torch.device("meta"):
        net = GhostNetV3(width)
        assert net.block_channels == BLOCK_CHANNELS[width]
        assert net.block_strides == BLOCK_STRIDES
        assert net.out_channels == [BLOCK_CHANNELS[width][i] for i in (4, 6, 9)]
        assert net.out_strides == [8, 16, 32]
        option_a = GhostNetV3(width, out_indices=(4, 6, 8))
        assert option_a.out_channels == [BLOCK_CHANNELS[width][i] for i in (4, 6, 8)]
        assert len(option_a.blocks) == 9  # headless: nothing after the deepest tap
    bottlenecks = [m for m in net.modules() if type(m).__name__ == "GhostBottleneckV3"]
    assert len(bottlenecks) == 16
    assert [b.ghost1.dfc for b in bottlenecks] == [False, False] + [True] * 14
    assert not any(b.ghost2.dfc for b in bottlenecks)
    assert [b.stride for b in bottlenecks].count(2) == 4


def test_se_reduced_channels_at_width_1():
    with torch.device("meta"):
        net = GhostNetV3(1.0)
    reduced = [m.conv_reduce.out_channels for m in net.modules() if hasattr(m, "conv_reduce")]
    assert reduced == [20, 32, 120, 168, 168, 240, 240]


@pytest.mark.parametrize("width", sorted(PARAMS_M))
def test_parameter_counts_match_spec(width):
    train_m, deploy_m = PARAMS_M[width]
    net = GhostNetV3(width, num_classes=1000)
    assert n_params(net) == pytest.approx(train_m, abs=0.001)
    official = copy.deepcopy(net).reparameterize(use_fused_ops=False, fold_all_bn=False)
    assert n_params(official) == pytest.approx(deploy_m, abs=0.001)
    # folding the remaining BNs turns (gamma, beta) per channel into one conv bias per channel
    left_bn_channels = sum(m.num_features for m in official.modules()
                           if isinstance(m, nn.BatchNorm2d))
    assert left_bn_channels > 0
    full = net.reparameterize(use_fused_ops=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in full.modules())
    assert round(n_params(full) * 1e6) == round(n_params(official) * 1e6) - left_bn_channels


def test_macs_at_224_match_spec():
    net = GhostNetV3(1.0, num_classes=1000).eval()
    assert conv_linear_macs(net) == pytest.approx(404.1, abs=0.05)
    net.reparameterize(use_fused_ops=False)
    assert conv_linear_macs(net) == pytest.approx(167.0, abs=0.05)


def test_feature_shapes_at_640_and_non_square():
    with torch.device("meta"):  # shapes only: no compute at 640x640
        net = GhostNetV3(1.0)
        feats = net(torch.rand(1, 3, 640, 640))
    assert [tuple(f.shape) for f in feats] == [(1, 40, 80, 80), (1, 112, 40, 40), (1, 960, 20, 20)]
    net = GhostNetV3(0.5, out_indices=(4, 6, 8)).eval()
    h, w = 97, 45  # odd, non-square: every stride-2 conv rounds up, DFC gates upsample to size
    with torch.no_grad():
        feats = net(torch.rand(2, 3, h, w))
    expected = [(2, c, -(-h // s), -(-w // s)) for c, s in zip(net.out_channels, net.out_strides)]
    assert [tuple(f.shape) for f in feats] == expected
    assert net.out_channels == [20, 56, 80]


# ----------------------------------------------------------------------------------- folding


@pytest.mark.parametrize("width", WIDTHS)
def test_folding_is_exact_in_eval_mode_float32(width):
    net = randomize_bn(GhostNetV3(width, num_classes=1000)).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = net(x) + [net.forward_classifier(x)]
        net.reparameterize(use_fused_ops=False)
        out = net(x) + [net.forward_classifier(x)]
    for r, o in zip(ref, out):
        assert (o - r).abs().max() < 1e-5 * r.abs().max()


def test_folding_is_exact_float64_both_graphs():
    net = randomize_bn(GhostNetV3(0.5, num_classes=1000)).double().eval()
    x = torch.rand(1, 3, 49, 40, dtype=torch.float64)
    with torch.no_grad():
        ref = net(x) + [net.forward_classifier(x)]
        for fold_all_bn in (False, True):
            folded = copy.deepcopy(net).reparameterize(use_fused_ops=False, fold_all_bn=fold_all_bn)
            out = folded(x) + [folded.forward_classifier(x)]
            for r, o in zip(ref, out):
                assert rel_err(o, r) < 1e-12


def test_reparameterize_switches_to_eval_and_is_idempotent():
    net = randomize_bn(GhostNetV3(0.5, out_indices=(2,))).train()
    net.reparameterize(use_fused_ops=False)
    assert not net.training and net.deployed
    state = {k: v.clone() for k, v in net.state_dict().items()}
    net.reparameterize(use_fused_ops=False)
    assert state.keys() == net.state_dict().keys()
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())


def _folded_pair(width=0.5):
    net = randomize_bn(GhostNetV3(width, num_classes=1000)).eval()
    return net.reparameterize(use_fused_ops=False)


def _expected_fused_extras(net: GhostNetV3, fused_depthwise: bool) -> list[tuple[str, set]]:
    """The (op, extras) of each Ghost call of one forward: ghost1 gets its DFC gate (bottlenecks
    2..15) and, in the stride-2 bottlenecks, is a ghost_conv_depthwise call (``fused_depthwise``:
    where the backend has that op); ghost2 gets the SE excitation as input_scale (where there is
    SE) and the shortcut as residual (every bottleneck)."""
    expected = []
    for m in net.modules():
        if isinstance(m, GhostBottleneckV3):
            op = "ghost_conv_depthwise" if fused_depthwise and m.stride > 1 else "ghost_conv"
            expected.append((op, {"gate"} if m.ghost1.dfc else set()))
            expected.append(("ghost_conv", {"residual"} | (
                {"input_scale"} if isinstance(m.se, SqueezeExcite) else set())))
    return expected


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_ops_match_plain_pytorch(channels_last, backend, monkeypatch):
    # Must fail (not skip) while ghostkernels.ghost_conv / depthwise_conv are missing.
    assert callable(ghostkernels.ghost_conv) and callable(ghostkernels.depthwise_conv)
    require(backend, "ghost_conv", torch.float32)
    net = _folded_pair()
    x = torch.rand(2, 3, 67, 45)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    calls, gate_calls, se_calls = [], [], []
    dfc_gate = ghostkernels.dfc_gate
    se_excitation = ghostkernels.se_excitation

    def recording(name):
        op = getattr(ghostkernels, name)

        def call(*args, **kwargs):
            calls.append((name, {k for k in ("input_scale", "gate", "residual")
                                 if kwargs.get(k) is not None}))
            return op(*args, **kwargs)
        return call

    def recording_dfc_gate(*args, **kwargs):
        gate_calls.append(args[0].shape)
        return dfc_gate(*args, **kwargs)

    def recording_se_excitation(*args, **kwargs):
        se_calls.append(args[0].shape)
        return se_excitation(*args, **kwargs)

    monkeypatch.setattr(ghostkernels, "ghost_conv", recording("ghost_conv"))
    monkeypatch.setattr(ghostkernels, "ghost_conv_depthwise", recording("ghost_conv_depthwise"))
    monkeypatch.setattr(ghostkernels, "dfc_gate", recording_dfc_gate)
    monkeypatch.setattr(ghostkernels, "se_excitation", recording_se_excitation)
    with torch.no_grad():
        ref = net(x) + [net.forward_classifier(x)]
        assert not calls and not gate_calls and not se_calls
        net.use_fused_ops = True
        with use_backend(backend):
            out = net(x) + [net.forward_classifier(x)]
    for r, o in zip(ref, out):
        assert o.shape == r.shape
        assert rel_err(o, r) < 1e-5
    if channels_last:
        assert out[0].is_contiguous(memory_format=torch.channels_last)
    # every fused site ran on the fused path (both forwards walk all 16 bottlenecks)
    # (ghost1 and the stride-2 depthwise conv are one call where the forced backend has the op:
    # the reference does, the cpu backend does not and runs ghost_conv, then depthwise_conv)
    fused_depthwise = backend in ghostkernels.backends.implementations("ghost_conv_depthwise")
    assert backend != "reference" or fused_depthwise
    expected = _expected_fused_extras(net, fused_depthwise)
    assert calls == expected * 2
    assert sum(op == "ghost_conv_depthwise" for op, _ in expected) == (4 if fused_depthwise else 0)
    for extra in ("input_scale", "gate", "residual"):
        assert any(extra in e for _, e in expected), extra
    # the gates come from ghostkernels.dfc_gate where the forced backend implements it (the
    # reference does; without a dfc_gate kernel they run on depthwise_conv)
    gated = sum("gate" in e for _, e in expected)
    assert gated == 14
    has_dfc_gate = backend in ghostkernels.backends.implementations("dfc_gate")
    assert len(gate_calls) == (2 * gated if has_dfc_gate else 0)
    assert backend != "reference" or has_dfc_gate
    # likewise the SE excitations from ghostkernels.se_excitation (else plain 1x1 convs)
    excited = sum("input_scale" in e for _, e in expected)
    assert excited == 7
    has_se_excitation = backend in ghostkernels.backends.implementations("se_excitation")
    assert len(se_calls) == (2 * excited if has_se_excitation else 0)
    assert backend != "reference" or has_se_excitation


@pytest.mark.parametrize("backend", backend_params("reference", "triton"))
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_stride2_bottleneck_runs_ghost1_and_its_depthwise_conv_as_one_op(kernel_size, backend,
                                                                        monkeypatch):
    """A folded stride-2 bottleneck with DFC and SE on the fused ops: ghost1 and the stride-2
    depthwise conv are one ghost_conv_depthwise call (Triton: the fused kernel), and the block's
    output equals the plain PyTorch one."""
    require(backend, "ghost_conv_depthwise", torch.float32)
    block = GhostBottleneckV3(8, 24, 12, kernel_size=kernel_size, stride=2, se_ratio=0.25,
                              dfc=True)
    randomize_bn(block).eval()
    block.reparameterize()
    x = torch.rand(2, 8, 19, 14).to(memory_format=torch.channels_last)
    calls = []
    op = ghostkernels.ghost_conv_depthwise
    monkeypatch.setattr(ghostkernels, "ghost_conv_depthwise",
                        lambda *a, **k: calls.append(k["stride"]) or op(*a, **k))
    with torch.no_grad():
        plain = block(x)
        block.set_fused_ops(True)
        with use_backend(backend):
            fused = block(x)
    assert calls == [2] and fused.shape == plain.shape == (2, 12, 10, 7)
    assert rel_err(fused, plain) < 1e-5


def test_fused_forward_dispatches_a_third_of_the_plain_ops():
    """The fusions (Ghost module, DFC gate, SE scaling, residual) cut the operators, hence the
    kernel launches, of a folded forward: counted, not timed."""
    from ghostkernels.benchmark import count_ops
    net = _folded_pair()
    x = torch.rand(1, 3, 64, 64)
    plain = count_ops(lambda: net(x))
    net.use_fused_ops = True
    fused = count_ops(lambda: net(x))
    assert 3 * fused < plain, (fused, plain)


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
def test_fused_se_excitation_is_two_operators(backend):
    """Fused, the SE excitation is the channel mean plus one ghostkernels.se_excitation (five
    operators unfused); under a forced backend without that op (cpu: no C++ kernel, extension
    built or not) it falls back to the plain ones, with the same factors."""
    from ghostkernels.benchmark import count_ops
    se = SqueezeExcite(24)
    x = torch.randn(2, 24, 5, 7)
    with torch.no_grad(), use_backend(backend):
        plain, fused = se.excitation(x), se.excitation(x, fused=True)
        assert count_ops(lambda: se.excitation(x)) == 5
        has_op = backend in ghostkernels.backends.implementations("se_excitation")
        assert count_ops(lambda: se.excitation(x, fused=True)) == (2 if has_op else 5)
    assert rel_err(fused, plain) < 1e-6


def test_fused_ops_auto_mode_runs_plain_convs_on_the_cpu(monkeypatch):
    net = _folded_pair()
    net.use_fused_ops = "auto"
    assert GhostNetV3(width=0.5).reparameterize().use_fused_ops == "auto"  # the default
    x = torch.rand(1, 3, 64, 64)
    calls = []
    ghost_conv = ghostkernels.ghost_conv
    monkeypatch.setattr(ghostkernels, "ghost_conv",
                        lambda *a, **k: calls.append(1) or ghost_conv(*a, **k))
    with torch.no_grad():
        auto = net(x)
        assert not calls  # CPU input: plain PyTorch convs
        net.use_fused_ops = False
        plain = net(x)
    for a, p in zip(auto, plain):
        assert torch.equal(a, p)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="use_fused_ops must be True, False or 'auto'"):
            net.use_fused_ops = bad
    with pytest.raises(ValueError, match="needs a folded model"):
        GhostNetV3(width=0.5).use_fused_ops = "auto"


def test_fused_stem_normalises_in_one_pass():
    """Fused, the input normalisation is one addcmul (x / std - mean / std) instead of a sub and
    a div, with the same values; the stem's conv + ReLU stay two ops on the CPU."""
    from ghostkernels.benchmark import count_ops
    net = _folded_pair()
    x = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        plain_ops = count_ops(lambda: net._stem(x))
        plain = net._stem(x)
        net.use_fused_ops = True
        assert count_ops(lambda: net._stem(x)) == plain_ops - 1 == 3
        assert rel_err(net._stem(x), plain) < 1e-6
        manual = torch.relu(net.conv_stem((x - net.mean) / net.std))
    assert rel_err(plain, manual) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_conv_relu_is_one_cudnn_call_on_gpu(dtype):
    from ghostkernels.benchmark import count_ops
    conv = nn.Conv2d(16, 24, 3, 2, 1).cuda().to(dtype)
    x = torch.randn(2, 16, 33, 47, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
    with torch.no_grad():
        fused, plain = conv_relu(conv, x), torch.relu(conv(x))
        ops = count_ops(lambda: conv_relu(conv, x))
    assert ops == (2 if dtype == torch.bfloat16 else 1)  # bf16: the plain pair
    assert fused.shape == plain.shape and fused.dtype == dtype
    assert rel_err(fused, plain) < 2e-3  # both cuDNN (float32 may use TF32 in either)
    with torch.enable_grad():  # autograd: the plain pair, which has a backward
        assert count_ops(lambda: conv_relu(conv, x.requires_grad_())) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [None, "cuda", "triton"])
def test_fused_ops_fp16_channels_last_on_gpu(backend):
    """The automatic choice (cuDNN for ghost_conv / depthwise_conv, kernels for the rest) and each
    kernel backend forced (ops it lacks run as plain convs)."""
    if backend and not ghostkernels.backends.availability(backend, "cuda").available:
        pytest.skip(f"{backend} backend unavailable")
    net = _folded_pair(1.0).cuda()
    x = torch.rand(2, 3, 160, 224, device="cuda")
    with torch.no_grad(), ghostkernels.use_backend(backend):
        ref = net(x)
        half = copy.deepcopy(net).half().to(memory_format=torch.channels_last)
        xh = x.half().to(memory_format=torch.channels_last)
        plain = half(xh)
        half.use_fused_ops = True
        fused = half(xh)
    for r, p, f in zip(ref, plain, fused):
        assert f.dtype == torch.float16
        # the fused fp16 net is at most about as far from fp32 as eager fp16 is
        assert rel_err(f, r) <= max(2 * rel_err(p, r), 2e-3)


# ------------------------------------------------------------------------------ weights: timm


def _timm_model(name="ghostnetv3_050"):
    timm = pytest.importorskip("timm", reason="timm is not installed")
    return randomize_bn(timm.create_model(name, pretrained=False)).eval()


def _timm_blocks(model, x, indices):
    x = model.act1(model.bn1(model.conv_stem(x)))
    feats = []
    for i, block in enumerate(model.blocks):
        x = block(x)
        if i in indices:
            feats.append(x)
    return feats


def test_timm_state_dict_reproduces_timm_exactly():
    reference = _timm_model()
    net = GhostNetV3(0.5, num_classes=1000, normalize_input=False)
    assert net.load_pretrained(reference.state_dict()) == []
    net.eval()
    x = torch.randn(2, 3, 64, 64)  # timm's input is already normalised
    with torch.no_grad():
        assert torch.equal(net.forward_classifier(x), reference(x))
        for ours, theirs in zip(net(x), _timm_blocks(reference, x, (4, 6, 9))):
            assert torch.equal(ours, theirs)
        # with built-in normalisation, [0, 1] images give timm's output on normalised images
        net.normalize_input = True
        images = torch.rand(1, 3, 64, 64)
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        normalised = (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        assert rel_err(net.forward_classifier(images), reference(normalised)) < 1e-6


def test_headless_backbone_loads_classifier_checkpoint():
    reference = _timm_model()
    net = GhostNetV3(0.5, out_indices=(4, 6, 8), normalize_input=False)
    skipped = net.load_pretrained(reference.state_dict())
    absent = ("blocks.9.", "conv_head.", "classifier.")
    assert skipped and all(k.startswith(absent) for k in skipped)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for ours, theirs in zip(net.eval()(x), _timm_blocks(reference, x, (4, 6, 8))):
            assert torch.equal(ours, theirs)


def test_official_checkpoint_layout_prefers_ema():
    source = randomize_bn(GhostNetV3(0.5, num_classes=1000))
    ema = source.state_dict()
    raw = {k: v + 1 if v.is_floating_point() else v for k, v in ema.items()}
    checkpoint = {"state_dict": raw, "epoch": 300,
                  "state_dict_ema": {"module." + k: v for k, v in ema.items()}}
    checkpoint["state_dict_ema"]["module.blocks.0.0.ghost1.total_ops"] = torch.zeros(1)
    checkpoint["state_dict_ema"]["module.total_params"] = torch.zeros(1)
    net = GhostNetV3(0.5, num_classes=1000)
    net.load_pretrained(checkpoint)
    assert all(torch.equal(v, ema[k]) for k, v in net.state_dict().items())
    net.load_pretrained(checkpoint, prefer_ema=False)
    assert all(torch.equal(v, raw[k]) for k, v in net.state_dict().items())


def test_loading_errors_list_the_keys():
    state = GhostNetV3(0.5, num_classes=1000).state_dict()
    net = GhostNetV3(0.5, num_classes=1000)
    broken = dict(state)
    del broken["blocks.3.0.dw_rpr_scale.bn.running_var"]
    broken["blocks.3.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 missing keys \[blocks\.3\.0\.dw_rpr_scale\.bn\."
                                         r"running_var\], 1 unexpected keys \[blocks\.3\.0\.extra"):
        net.load_pretrained(broken)
    with pytest.raises(ValueError, match=r"0 missing keys \[\], 0 unexpected keys \[\], \d+ "
                                         r"shape mismatches \[blocks\.0\.0\..* checkpoint "
                                         r"\(8,\) vs model \(4,\)"):
        net.load_pretrained(GhostNetV3(1.0, num_classes=1000).state_dict())
    net.reparameterize(use_fused_ops=False)
    with pytest.raises(ValueError, match="before reparameterize"):
        net.load_pretrained(state)


# --------------------------------------------------------------------- training and bad input


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_depthwise_1x1_branch_is_the_conv_it_replaces(stride, channels_last):
    """The "scale" branches (1x1 depthwise conv + BN) multiply the strided input by the weight
    instead of calling the conv: the same outputs and gradients as the conv in float64 (train
    mode: batch statistics), odd sizes included."""
    branch = ConvBn(6, 6, 1, stride=stride, groups=6).double().train()
    assert isinstance(branch.conv, nn.Conv2d)  # counted as a conv (MACs, hooks), same state
    nn.init.normal_(branch.conv.weight)
    x = torch.randn(3, 6, 7, 9, dtype=torch.float64)
    x = (x.contiguous(memory_format=torch.channels_last) if channels_last else x).requires_grad_()
    grad_out = torch.randn(3, 6, (7 - 1) // stride + 1, (9 - 1) // stride + 1,
                           dtype=torch.float64)
    y = branch(x)
    expected = branch.bn(torch.nn.functional.conv2d(x, branch.conv.weight, stride=stride,
                                                    groups=6))
    assert y.shape == expected.shape
    assert torch.allclose(y, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(y, (x, branch.conv.weight), grad_out)
    expected_grads = torch.autograd.grad(expected, (x, branch.conv.weight), grad_out)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_depthwise_1x1_branch_rejects_a_wrong_input_as_the_conv_does():
    conv = ConvBn(6, 6, 1, groups=6).conv
    with pytest.raises(RuntimeError, match="expected input.*to have 6 channels, but got 5"):
        conv(torch.rand(2, 5, 4, 4))
    with pytest.raises(RuntimeError, match="Expected 3D .* or 4D .* input to conv2d"):
        conv(torch.rand(2, 1, 6, 4, 4))


DEPTHWISE_CONVS = {  # (kernel, stride, padding): the training-time model's depthwise convs
    "branch-3x3": ((3, 3), 1, (1, 1)), "stride-2-5x5": ((5, 5), 2, (2, 2)),
    "dfc-1x5": ((1, 5), 1, (0, 2)), "dfc-5x1": ((5, 1), 1, (2, 0)),
}


@pytest.mark.parametrize("name", list(DEPTHWISE_CONVS))
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_depthwise_branch_conv_is_the_conv_it_replaces(name, layout):
    """DepthwiseConv2d (ghostkernels' kernels for NCHW CPU inputs, nn.Conv2d otherwise) gives the
    outputs and the x / weight gradients of nn.Conv2d in float64, odd sizes and a map smaller
    than the kernel included."""
    kernel, stride, padding = DEPTHWISE_CONVS[name]
    conv = DepthwiseConv2d(6, 6, kernel, stride, padding, groups=6, bias=False).double()
    assert conv.kernel_fits
    nn.init.normal_(conv.weight)
    for size in ((7, 9), (2, 1)):
        x = torch.randn(3, 6, size[0], 2 * size[1], dtype=torch.float64)
        x = {"nchw": x[..., ::2].contiguous(), "sliced": x[..., ::2],
             "channels_last": x[..., ::2].contiguous(memory_format=torch.channels_last)}[layout]
        x.requires_grad_()
        y = conv(x)
        expected = torch.nn.functional.conv2d(x, conv.weight, None, stride, padding, 1, 6)
        assert y.shape == expected.shape
        assert torch.allclose(y, expected, rtol=1e-12, atol=1e-12)
        grad_out = torch.randn_like(expected)
        grads = torch.autograd.grad(y, (x, conv.weight), grad_out)
        expected_grads = torch.autograd.grad(expected, (x, conv.weight), grad_out)
        for got, want in zip(grads, expected_grads):
            assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_training_time_depthwise_convs_run_ghostkernels_on_the_cpu(monkeypatch):
    """Every depthwise conv of the training-time model (branches, stride-2 convs, DFC, shortcut)
    is a DepthwiseConv2d that calls ghostkernels.depthwise_conv for NCHW CPU inputs; the folded
    model's convs are plain nn.Conv2d again."""
    net = GhostNetV3(0.5).train()
    depthwise = [m for m in net.modules() if isinstance(m, nn.Conv2d)
                 and m.groups == m.in_channels == m.out_channels and m.kernel_size != (1, 1)]
    assert depthwise and all(type(m) is DepthwiseConv2d and m.kernel_fits for m in depthwise)
    calls = []
    real = ghostkernels.depthwise_conv
    monkeypatch.setattr(ghostkernels, "depthwise_conv",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    net(torch.rand(2, 3, 64, 64))
    assert len(calls) == len(depthwise)
    net.reparameterize()
    assert not any(type(m) is DepthwiseConv2d for m in net.modules())


def test_training_forward_and_backward():
    net = GhostNetV3(0.5).train()
    x = torch.rand(2, 3, 64, 64).to(memory_format=torch.channels_last)
    feats = net(x)
    loss = sum((f * torch.randn_like(f)).sum() for f in feats)
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # (a BN bias right before another train-mode BN can get an exactly zero gradient)
        if p.dim() == 4:
            assert p.grad.abs().sum() > 0, name
    assert net.bn1.num_batches_tracked.item() == 1


def test_channels_last_input_gives_the_same_features():
    net = randomize_bn(GhostNetV3(0.5)).eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        for a, b in zip(net(x), net(x.to(memory_format=torch.channels_last))):
            # the float32 tolerance of benchmark-protocol.md: oneDNN's NHWC and NCHW convolutions
            # round differently, through 16 blocks with random BN (1.04e-6 was seen once)
            assert rel_err(b, a) < 1e-5


def test_bad_input_raises_clear_errors():
    net = GhostNetV3(0.5).eval()
    with pytest.raises(ValueError, match=r"x must be a 4-d image batch \[B, 3, H, W\], got shape "
                                         r"\(1, 1, 64, 64\)"):
        net(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="x must be a 4-d"):
        net(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="at least 33x33 pixels .* got 32x64"):
        net(torch.rand(1, 3, 32, 64))
    with pytest.raises(TypeError, match="floating-point"):
        net(torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        net([1, 2, 3])
    with torch.no_grad():
        assert [f.shape[-1] for f in net(torch.rand(1, 3, 33, 33))] == [5, 3, 2]
    with pytest.raises(ValueError, match="out_indices must be strictly increasing"):
        GhostNetV3(0.5, out_indices=(6, 4))
    with pytest.raises(ValueError, match="out_indices must be strictly increasing"):
        GhostNetV3(0.5, out_indices=(4, 10))
    with pytest.raises(ValueError, match="width must be > 0"):
        GhostNetV3(0.0)
    with pytest.raises(ValueError, match="forward_classifier needs a model built with num_classes"):
        net.forward_classifier(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="reparameterize"):
        net.use_fused_ops = True
