"""ghostkernels.fold: every folded conv equals the eval-mode unfolded modules it replaces.

References are the unfolded ``nn.Conv2d``/``nn.BatchNorm2d`` modules in eval mode, with randomised
running statistics and affine parameters, in float64 (tight) and float32.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ghostkernels import fold
from tests.backend_params import rel_err


def random_bn(channels: int, dtype=torch.float64, eps: float = 1e-5, affine: bool = True):
    bn = nn.BatchNorm2d(channels, eps=eps, affine=affine).to(dtype)
    with torch.no_grad():
        bn.running_mean.normal_(0, 1)
        bn.running_var.uniform_(0.1, 3.0)
        if affine:
            bn.weight.normal_(0, 1)
            bn.bias.normal_(0, 1)
    return bn.eval()


TOL = {torch.float64: 1e-12, torch.float32: 1e-5}

# (in, out, kernel, stride, groups, conv_bias)
CONVS = [
    (6, 10, 3, 1, 1, False),
    (8, 8, 3, 2, 8, False),      # depthwise stride 2
    (8, 8, 5, 2, 8, True),       # depthwise 5x5 stride 2 with conv bias
    (6, 9, 1, 1, 3, True),       # grouped 1x1
    (4, 4, (1, 5), 1, 4, False), # DFC horizontal
    (4, 4, (5, 1), 1, 4, False), # DFC vertical
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cin,cout,k,stride,groups,bias", CONVS)
def test_fold_conv_bn_matches_eval_modules(cin, cout, k, stride, groups, bias, dtype):
    kernel = (k, k) if isinstance(k, int) else k
    conv = nn.Conv2d(cin, cout, kernel, stride, tuple(s // 2 for s in kernel), groups=groups,
                     bias=bias).to(dtype)
    bn = random_bn(cout, dtype, eps=1e-3)  # a non-default eps: the BN's own must be used
    x = torch.randn(2, cin, 11, 10, dtype=dtype)
    ref = bn(conv(x))
    with torch.no_grad():
        w, b = fold.fold_conv_bn(conv.weight, bn, conv.bias)
        out = F.conv2d(x, w, b, stride, conv.padding, groups=groups)
        fused = fold.fused_conv_bn(conv, bn)(x)
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(fused, ref) < TOL[dtype]


def test_fold_conv_bn_without_affine():
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False).double()
    bn = random_bn(5, affine=False)
    x = torch.randn(1, 3, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        out = fold.fused_conv_bn(conv, bn)(x)
        assert rel_err(out, bn(conv(x))) < 1e-12


@pytest.mark.parametrize("channels,groups,k", [(6, 6, 3), (6, 1, 3), (6, 2, 1), (8, 4, 5)])
def test_identity_kernel_returns_input(channels, groups, k):
    kernel = fold.identity_kernel(channels, groups, k, dtype=torch.float64)
    assert kernel.shape == (channels, channels // groups, k, k)
    x = torch.randn(2, channels, 9, 8, dtype=torch.float64)
    out = F.conv2d(x, kernel, padding=k // 2, groups=groups)
    assert torch.equal(out, x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("groups", [1, 2, 6])
def test_fold_bn_identity_matches_bn(groups, dtype):
    bn = random_bn(6, dtype)
    x = torch.randn(2, 6, 8, 9, dtype=dtype)
    with torch.no_grad():
        w, b = fold.fold_bn_identity(bn, groups=groups, kernel_size=3)
        out = F.conv2d(x, w, b, padding=1, groups=groups)
        assert rel_err(out, bn(x)) < TOL[dtype]


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(9, 9), (10, 7)])
def test_pad_1x1_to_kxk_is_exact_at_any_stride(k, stride, size):
    c = 4
    w1 = torch.randn(c, 1, 1, 1, dtype=torch.float64)
    x = torch.randn(2, c, *size, dtype=torch.float64)
    ref = F.conv2d(x, w1, stride=stride, padding=0, groups=c)
    wk = fold.pad_kernel_to(w1, k)
    assert wk.shape == (c, 1, k, k)
    out = F.conv2d(x, wk, stride=stride, padding=k // 2, groups=c)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-14


def test_pad_3x3_to_5x5_keeps_values_centred():
    w = torch.randn(2, 3, 3, 3)
    padded = fold.pad_kernel_to(w, (5, 5))
    assert torch.equal(padded[:, :, 1:4, 1:4], w)
    border = padded.clone()
    border[:, :, 1:4, 1:4] = 0
    assert not border.any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("stride", [1, 2])
def test_repvgg_style_block_folds_exactly(stride, dtype):
    """3 kxk conv+BN + 1x1 conv+BN (+ BN identity at stride 1), summed: one kxk conv."""
    c, k = 6, 3
    branches = [nn.Sequential(nn.Conv2d(c, c, k, stride, 1, bias=False), random_bn(c, dtype))
                .to(dtype).eval() for _ in range(3)]
    scale = nn.Sequential(nn.Conv2d(c, c, 1, stride, 0, bias=False), random_bn(c, dtype)).to(dtype)
    identity = random_bn(c, dtype) if stride == 1 else None
    x = torch.randn(2, c, 10, 11, dtype=dtype)
    with torch.no_grad():
        ref = sum(b(x) for b in branches) + scale(x) + (identity(x) if identity else 0)
        parts = [fold.fold_conv_bn(b[0].weight, b[1]) for b in branches]
        sw, sb = fold.fold_conv_bn(scale[0].weight, scale[1])
        parts.append((fold.pad_kernel_to(sw, k), sb))
        if identity is not None:
            parts.append(fold.fold_bn_identity(identity, groups=1, kernel_size=k))
        w, b = fold.sum_branches(parts)
        merged = fold.conv_with(branches[0][0], w, b)
        assert rel_err(merged(x), ref) < TOL[dtype]


def test_sum_branches_adds_weights_and_biases():
    a = (torch.randn(3, 2, 3, 3), torch.randn(3))
    b = (torch.randn(3, 2, 3, 3), torch.randn(3))
    w, bias = fold.sum_branches([a, b])
    assert torch.equal(w, a[0] + b[0]) and torch.equal(bias, a[1] + b[1])


def test_bad_inputs_raise_clear_errors():
    bn = random_bn(4)
    with pytest.raises(ValueError, match="bn must have as many channels"):
        fold.fold_conv_bn(torch.randn(5, 1, 3, 3, dtype=torch.float64), bn)
    with pytest.raises(ValueError, match="weight must be a 4-d"):
        fold.fold_conv_bn(torch.randn(4, 3), bn)
    with pytest.raises(ValueError, match="bias must have shape"):
        fold.fold_conv_bn(torch.randn(4, 1, 3, 3, dtype=torch.float64), bn, torch.randn(3))
    with pytest.raises(TypeError, match="bn must be a BatchNorm"):
        fold.bn_scale_shift(nn.Identity())
    no_stats = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        fold.fold_conv_bn(torch.randn(4, 1, 3, 3), no_stats)
    with pytest.raises(ValueError, match="channels must be a positive multiple of groups"):
        fold.identity_kernel(6, 4, 3)
    with pytest.raises(ValueError, match="kernel_size must be an odd"):
        fold.identity_kernel(6, 6, 2)
    with pytest.raises(ValueError, match="at most kernel_size"):
        fold.pad_kernel_to(torch.randn(2, 1, 5, 5), 3)
    with pytest.raises(ValueError, match="branch 1 must have weight shape"):
        fold.sum_branches([(torch.randn(2, 1, 3, 3), torch.randn(2)),
                           (torch.randn(2, 1, 1, 1), torch.randn(2))])
    with pytest.raises(ValueError, match="at least one"):
        fold.sum_branches([])
    with pytest.raises(ValueError, match="template's kernel size"):
        fold.conv_with(nn.Conv2d(2, 2, 3), torch.randn(2, 2, 1, 1), torch.randn(2))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_conv_with_keeps_the_template_weight_memory_format(channels_last):
    """A model converted to channels_last before folding stays channels_last (cuDNN would
    otherwise convert the weight, or run the layer NCHW, on every call)."""
    template = nn.Conv2d(4, 6, 3, padding=1, bias=False).double()
    if channels_last:
        template = template.to(memory_format=torch.channels_last)
    weight = torch.randn(6, 4, 3, 3, dtype=torch.float64)  # NCHW, as folding math returns it
    bias = torch.randn(6, dtype=torch.float64)
    conv = fold.conv_with(template, weight, bias)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert conv.weight.is_contiguous() != channels_last
    x = torch.randn(2, 4, 7, 5, dtype=torch.float64)
    assert torch.allclose(conv(x), F.conv2d(x, weight, bias, padding=1), rtol=0, atol=1e-12)
