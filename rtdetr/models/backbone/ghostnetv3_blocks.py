"""GhostNetV3 building blocks: the re-parameterisable Ghost module and bottleneck.

Training-time structure (spec ghostnetv3.md §1; module names follow the official checkpoint):

- ``GhostModuleV3``: primary = 3 x (1x1 conv + BN), ReLU after the sum (if ``relu``); cheap =
  3 x (DW3x3 + BN) + DW1x1 + BN ("scale") + BN identity ("skip"), ReLU after the sum; output
  ``cat(x1, x2)``. With ``dfc=True`` (bottlenecks 2..15, ghost1 only) a gate computed from the
  module input (avgpool 2x2 -> 1x1 conv+BN -> DW1x5+BN -> DW5x1+BN -> sigmoid -> nearest
  upsample) multiplies the output.
- ``GhostBottleneckV3``: ghost1 (ReLU, optional DFC) -> stride-2 DWkxk with 3 kxk branches + a 1x1
  stride-2 scale branch (no activation) -> SE (hard-sigmoid) -> ghost2 (no ReLU) + shortcut.

``reparameterize()`` folds every branch and every conv+BN pair (including the DFC gate and the
shortcut, which the official code leaves as conv+BN) into biased convs. Afterwards the forward runs
on ``ghostkernels.ghost_conv`` / ``ghostkernels.depthwise_conv`` when ``use_fused_ops`` is true,
or on ``F.conv2d`` with the same folded tensors when it is false; ``"auto"`` (the default after
folding) takes the fused ops for tensors on a GPU and plain PyTorch on the CPU, where oneDNN's
convolutions beat the fused kernels (BENCHMARKS.md). On fused ops the small
elementwise steps around each Ghost module go into its ``ghost_conv`` call: the DFC gate (computed
at half resolution, upsampled inside the kernel) as ghost1's ``gate``, the SE excitation as
ghost2's ``input_scale`` (its MLP after the channel means one ``ghostkernels.se_excitation``
call) and the shortcut as ghost2's ``residual``; in a stride-2 bottleneck ghost1 and the
stride-2 depthwise conv are one ``ghostkernels.ghost_conv_depthwise`` call (where the backend
selection has that op; a forced backend without it runs the two ops).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import ghostkernels
from ghostkernels import fold
from ghostkernels.reference.conv import conv2d_relu

NUM_CONV_BRANCHES = 3


def make_divisible(value: float, divisor: int = 4, min_value: int | None = None) -> int:
    """Round ``value`` to a multiple of ``divisor`` (never below 90 % of it): the official rule."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


FUSED_OPS_MODES = (True, False, "auto")


def runs_fused(deployed: bool, mode, x: torch.Tensor) -> bool:
    """Whether a folded block runs on the ghostkernels ops for input ``x`` (mode: True, False or
    "auto" = fused on GPUs, plain PyTorch on the CPU)."""
    if not deployed or mode is False:
        return False
    return mode is True or x.device.type != "cpu"


def conv_relu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``relu(conv(x))`` for a folded conv (with bias) of a model running its fused path: on
    CUDA float16/float32 inputs, without autograd or a compiler tracing, one cuDNN call with the
    ReLU in the convolution's epilogue (``ghostkernels.reference.conv.conv2d_relu``), so the
    output is written once instead of written, read and written again; elsewhere the two plain
    ops."""
    if conv.padding_mode != "zeros" or not isinstance(conv.padding, tuple):
        return F.relu(conv(x))
    return conv2d_relu(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                       conv.groups)


def _fused_op(name: str):
    op = getattr(ghostkernels, name, None)
    if op is None:
        raise RuntimeError(f"ghostkernels.{name} is not available in this build of ghostkernels; "
                           f"set use_fused_ops=False to run the folded model on plain PyTorch "
                           f"convs")
    return op


class ChannelScaleConv(nn.Conv2d):
    """A 1x1 depthwise conv without padding (the "scale" branches): a per-channel scale of the
    strided input, computed as one multiply (the same products). PyTorch runs such convs on CPUs
    through a per-channel loop of tiny matrix products when it skips oneDNN (1x1, stride 1, one
    thread, batch < 16: the demo's training), about a sixth of a training step there."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.padding != (0, 0) or self.dilation != (1, 1)
                or not self.groups == self.in_channels == self.out_channels
                or x.dim() != 4 or x.shape[1] != self.in_channels):
            return super().forward(x)  # (and nn.Conv2d's errors for a wrong input)
        stride_h, stride_w = self.stride
        y = x[:, :, ::stride_h, ::stride_w] * self.weight.view(1, -1, 1, 1)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise conv (one filter per channel; kernel sides 1, 3 or 5; padding half the
    kernel; stride 1 or 2) whose forward and backward in training mode on NCHW float32/float64
    CPU tensors run ``ghostkernels.depthwise_conv`` (its C++ kernels, the reference where the
    extension is missing): oneDNN spends more on its per-call reorders of small maps than on the
    arithmetic, above all in the backward, and the training-time branches of GhostNetV3 are
    mostly such convs (BENCHMARKS.md: the demo's training step). Parameters and state_dict are
    nn.Conv2d's; eval mode (which then reproduces nn.Conv2d, and timm, bitwise), other devices,
    layouts and dtypes run nn.Conv2d."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        kh, kw = self.kernel_size
        self.kernel_fits = (self.groups == self.in_channels == self.out_channels
                            and kh in (1, 3, 5) and kw in (1, 3, 5)
                            and self.padding == (kh // 2, kw // 2) and self.dilation == (1, 1)
                            and self.stride[0] == self.stride[1] and self.stride[0] in (1, 2)
                            and self.padding_mode == "zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.training or not self.kernel_fits or x.device.type != "cpu" or x.dim() != 4
                or x.shape[1] != self.in_channels or x.dtype not in (torch.float32, torch.float64)
                or x.dtype != self.weight.dtype or not x.is_contiguous()):
            return super().forward(x)  # (and nn.Conv2d's errors for a wrong input)
        return ghostkernels.depthwise_conv(x, self.weight, self.bias, self.stride[0])


class ConvBn(nn.Sequential):
    """Conv2d (no bias) followed by BatchNorm2d: one re-parameterisation branch."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride: int = 1, groups: int = 1):
        kernel = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        padding = tuple(k // 2 for k in kernel)
        super().__init__()
        depthwise = groups == in_ch == out_ch
        conv_type = (nn.Conv2d if not depthwise
                     else ChannelScaleConv if kernel == (1, 1) else DepthwiseConv2d)
        self.conv = conv_type(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        return fold.fold_conv_bn(self.conv.weight, self.bn)


def fold_sequential_conv_bn(seq: nn.Sequential) -> None:
    """In place: every ``Conv2d`` directly followed by a BatchNorm in ``seq`` absorbs it; the BN
    becomes ``nn.Identity`` (state-dict indices of the convs stay the same)."""
    names = list(seq._modules)
    for name, next_name in zip(names, names[1:]):
        conv, bn = seq._modules[name], seq._modules[next_name]
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            seq._modules[name] = fold.fused_conv_bn(conv, bn)
            seq._modules[next_name] = nn.Identity()


def _sum(branches):
    """Sum branch outputs in list order (the order of the official/timm forward)."""
    total = branches[0]
    for b in branches[1:]:
        total = total + b
    return total


def _op_runs(name: str, x: torch.Tensor) -> bool:
    """Whether ``ghostkernels.<name>`` can run on x under the current backend selection (a forced
    backend without a kernel for that op, e.g. ``use_backend("cpu")`` for dfc_gate, cannot;
    automatic selection always can)."""
    if getattr(ghostkernels, name, None) is None:
        return False
    if ghostkernels.backends.requested_backend() is None:  # automatic: nothing to look up
        return True
    try:
        ghostkernels.backend_for(name, x.device, x.dtype)
    except ghostkernels.BackendUnavailableError:
        return False
    return True


def _dfc_gate_low_res(short_conv: nn.Sequential, x: torch.Tensor, fused: bool) -> torch.Tensor:
    """The DFC attention gate of a Ghost module from its input ``x``, sigmoided, at the
    2x2-average-pooled resolution (before the nearest upsampling).

    Fused and folded, it is one ``ghostkernels.dfc_gate`` call (one launch on CUDA, two on Triton);
    where the backend forced for this call has no dfc_gate kernel (``use_backend("cpu")``), the
    same folded convs run as a 1x1 conv and two ``ghostkernels.depthwise_conv`` calls."""
    if fused and isinstance(short_conv[1], nn.Identity):  # folded: [1x1, Id, 1x5, Id, 5x1, Id]
        proj, horizontal, vertical = short_conv[0], short_conv[2], short_conv[4]
        if _op_runs("dfc_gate", x):
            return _fused_op("dfc_gate")(x, proj.weight, proj.bias, horizontal.weight,
                                         horizontal.bias, vertical.weight, vertical.bias)
        depthwise = _fused_op("depthwise_conv")
        res = F.conv2d(F.avg_pool2d(x, kernel_size=2, stride=2), proj.weight, proj.bias)
        res = depthwise(res, horizontal.weight, horizontal.bias)
        res = depthwise(res, vertical.weight, vertical.bias)
    else:
        res = short_conv(F.avg_pool2d(x, kernel_size=2, stride=2))
    return torch.sigmoid(res)


class GhostModuleV3(nn.Module):
    """Ghost module (ratio 2, 1x1 primary, 3x3 depthwise cheap op) with re-param branches."""

    def __init__(self, in_ch: int, out_ch: int, relu: bool = True, dfc: bool = False):
        super().__init__()
        if out_ch % 2:
            raise ValueError(f"out_ch must be even (ratio 2 Ghost module), got {out_ch}")
        init_ch = out_ch // 2
        self.in_ch, self.out_ch, self.init_ch = in_ch, out_ch, init_ch
        self.relu, self.dfc = relu, dfc
        self.deployed = False
        self.use_fused_ops = False
        self.primary_rpr_conv = nn.ModuleList(
            ConvBn(in_ch, init_ch, 1) for _ in range(NUM_CONV_BRANCHES))
        self.cheap_rpr_skip = nn.BatchNorm2d(init_ch)
        self.cheap_rpr_conv = nn.ModuleList(
            ConvBn(init_ch, init_ch, 3, groups=init_ch) for _ in range(NUM_CONV_BRANCHES))
        self.cheap_rpr_scale = ConvBn(init_ch, init_ch, 1, groups=init_ch)
        if dfc:
            self.short_conv = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch),
                DepthwiseConv2d(out_ch, out_ch, (1, 5), padding=(0, 2), groups=out_ch,
                                bias=False),
                nn.BatchNorm2d(out_ch),
                DepthwiseConv2d(out_ch, out_ch, (5, 1), padding=(2, 0), groups=out_ch,
                                bias=False),
                nn.BatchNorm2d(out_ch))

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) if self.relu else x

    def forward(self, x: torch.Tensor, input_scale: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """``cat(x1, x2)`` of ``x * input_scale[:, :, None, None]`` (times the DFC gate), plus
        ``residual``; input_scale [B, in_ch] and residual [B, out_ch, H, W] are optional."""
        if runs_fused(self.deployed, self.use_fused_ops, x):
            return self._forward_fused(x, input_scale, residual)
        if input_scale is not None:
            x = x * input_scale[:, :, None, None]
        if self.deployed:
            x1 = self._act(self.primary_conv(x))
            x2 = self._act(self.cheap_operation(x1))
        else:
            x1 = self._act(_sum([branch(x) for branch in self.primary_rpr_conv]))
            x2 = self._act(_sum([self.cheap_rpr_scale(x1), self.cheap_rpr_skip(x1)]
                                + [branch(x1) for branch in self.cheap_rpr_conv]))
        out = torch.cat([x1, x2], dim=1)
        if self.dfc:  # sigmoid at low resolution, then nearest upsampling (spec §1.3)
            gate = _dfc_gate_low_res(self.short_conv, x, fused=False)
            out = out * F.interpolate(gate, size=out.shape[-2:], mode="nearest")
        return out if residual is None else out + residual

    def _gate_fused(self, x, input_scale) -> torch.Tensor | None:
        """The DFC gate's low-resolution path on the (scaled) input, or None without DFC."""
        if not self.dfc:
            return None
        gate_input = x if input_scale is None else x * input_scale[:, :, None, None]
        return _dfc_gate_low_res(self.short_conv, gate_input, fused=True)

    def _forward_fused(self, x, input_scale, residual) -> torch.Tensor:
        """One ghost_conv call (after the DFC gate's)."""
        act = "relu" if self.relu else "none"
        return _fused_op("ghost_conv")(
            x, self.primary_conv.weight, self.primary_conv.bias, self.cheap_operation.weight,
            self.cheap_operation.bias, act_primary=act, act_cheap=act, out_channels=self.out_ch,
            input_scale=input_scale, gate=self._gate_fused(x, input_scale), residual=residual)

    def forward_then_depthwise(self, x: torch.Tensor, conv_dw: nn.Conv2d) -> torch.Tensor:
        """``conv_dw(self(x))`` for a folded module on the fused ops, as one
        ``ghostkernels.ghost_conv_depthwise`` call (after the DFC gate's): this module's output
        goes straight into the folded depthwise conv (square kernel, padding k//2, with bias)
        without being written."""
        act = "relu" if self.relu else "none"
        return _fused_op("ghost_conv_depthwise")(
            x, self.primary_conv.weight, self.primary_conv.bias, self.cheap_operation.weight,
            self.cheap_operation.bias, conv_dw.weight, conv_dw.bias, act_primary=act,
            act_cheap=act, out_channels=self.out_ch, stride=conv_dw.stride[0],
            gate=self._gate_fused(x, None))

    @torch.no_grad()
    def reparameterize(self, fold_all_bn: bool = True) -> None:
        """Fold the branches into ``primary_conv`` (1x1) and ``cheap_operation`` (DW3x3), and
        (``fold_all_bn``) the DFC gate's conv+BN pairs, which the official code keeps."""
        if self.deployed:
            return
        primary = fold.sum_branches(b.folded() for b in self.primary_rpr_conv)
        cheap_template = self.cheap_rpr_conv[0].conv
        cheap = fold.sum_branches(
            [b.folded() for b in self.cheap_rpr_conv]
            + [(fold.pad_kernel_to(self.cheap_rpr_scale.folded()[0], 3),
                self.cheap_rpr_scale.folded()[1]),
               fold.fold_bn_identity(self.cheap_rpr_skip, groups=self.init_ch, kernel_size=3)])
        self.primary_conv = fold.conv_with(self.primary_rpr_conv[0].conv, *primary)
        self.cheap_operation = fold.conv_with(cheap_template, *cheap)
        del self.primary_rpr_conv, self.cheap_rpr_conv, self.cheap_rpr_scale, self.cheap_rpr_skip
        if self.dfc and fold_all_bn:
            fold_sequential_conv_bn(self.short_conv)
        self.deployed = True


class SqueezeExcite(nn.Module):
    """SE on the mid channels: avgpool -> 1x1 (bias) -> ReLU -> 1x1 (bias) -> hard-sigmoid."""

    def __init__(self, channels: int, se_ratio: float = 0.25):
        super().__init__()
        reduced = make_divisible(channels * se_ratio, 4)
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)

    def excitation(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """The per-(image, channel) factors [B, C] that ``forward`` multiplies x by. ``fused``:
        the MLP after the mean is one ``ghostkernels.se_excitation`` call (four operators in one)
        where the backend selection has that op."""
        if fused and _op_runs("se_excitation", x):
            return _fused_op("se_excitation")(x.mean((2, 3)), self.conv_reduce.weight,
                                              self.conv_reduce.bias, self.conv_expand.weight,
                                              self.conv_expand.bias)
        s = x.mean((2, 3), keepdim=True)
        return F.hardsigmoid(self.conv_expand(F.relu(self.conv_reduce(s)))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.excitation(x)[:, :, None, None]


class GhostBottleneckV3(nn.Module):
    """GhostNetV3 bottleneck (spec §1.4); ``dw_rpr_*`` branches exist only when stride > 1."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, kernel_size: int = 3,
                 stride: int = 1, se_ratio: float = 0.0, dfc: bool = False):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.stride, self.kernel_size = stride, kernel_size
        self.deployed = False
        self.use_fused_ops = False
        self.ghost1 = GhostModuleV3(in_ch, mid_ch, relu=True, dfc=dfc)
        if stride > 1:
            self.dw_rpr_conv = nn.ModuleList(
                ConvBn(mid_ch, mid_ch, kernel_size, stride, groups=mid_ch)
                for _ in range(NUM_CONV_BRANCHES))
            self.dw_rpr_scale = ConvBn(mid_ch, mid_ch, 1, stride, groups=mid_ch)
        self.se = SqueezeExcite(mid_ch, se_ratio) if se_ratio > 0 else nn.Identity()
        self.ghost2 = GhostModuleV3(mid_ch, out_ch, relu=False, dfc=False)
        if in_ch == out_ch and stride == 1:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                DepthwiseConv2d(in_ch, in_ch, kernel_size, stride, (kernel_size - 1) // 2,
                                groups=in_ch, bias=False),
                nn.BatchNorm2d(in_ch),
                nn.Conv2d(in_ch, out_ch, 1, bias=False),
                nn.BatchNorm2d(out_ch))

    def _depthwise(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x
        if not self.deployed:
            return _sum([self.dw_rpr_scale(x)] + [branch(x) for branch in self.dw_rpr_conv])
        if runs_fused(self.deployed, self.use_fused_ops, x):
            return _fused_op("depthwise_conv")(x, self.conv_dw.weight, self.conv_dw.bias,
                                               stride=self.stride)
        return self.conv_dw(x)

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if (not runs_fused(self.deployed, self.use_fused_ops, x)
                or isinstance(self.shortcut, nn.Identity)
                or not isinstance(self.shortcut[1], nn.Identity)):  # identity / not folded
            return self.shortcut(x)
        dw, pw = self.shortcut[0], self.shortcut[2]  # folded: [dw, Identity, pw, Identity]
        x = _fused_op("depthwise_conv")(x, dw.weight, dw.bias, stride=self.stride)
        return F.conv2d(x, pw.weight, pw.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = runs_fused(self.deployed, self.use_fused_ops, x)
        if fused and self.stride > 1 and _op_runs("ghost_conv_depthwise", x):
            # ghost1's output goes straight into the stride-2 depthwise conv, never written
            y = self.ghost1.forward_then_depthwise(x, self.conv_dw)
        else:
            y = self._depthwise(self.ghost1(x))
        if fused:
            # SE multiply -> ghost2 scales its input as it reads it; shortcut add -> its epilogue
            scale = (self.se.excitation(y, fused=True) if isinstance(self.se, SqueezeExcite)
                     else None)
            return self.ghost2(y, input_scale=scale, residual=self._shortcut(x))
        return self.ghost2(self.se(y)) + self._shortcut(x)

    @torch.no_grad()
    def reparameterize(self, fold_all_bn: bool = True) -> None:
        """Fold the stride-2 DW branches into ``conv_dw`` and the Ghost modules' branches;
        with ``fold_all_bn`` also the shortcut's and DFC gates' conv+BN pairs."""
        if self.deployed:
            return
        self.ghost1.reparameterize(fold_all_bn)
        self.ghost2.reparameterize(fold_all_bn)
        if self.stride > 1:
            scale_w, scale_b = self.dw_rpr_scale.folded()
            weight, bias = fold.sum_branches(
                [b.folded() for b in self.dw_rpr_conv]
                + [(fold.pad_kernel_to(scale_w, self.kernel_size), scale_b)])
            self.conv_dw = fold.conv_with(self.dw_rpr_conv[0].conv, weight, bias)
            del self.dw_rpr_conv, self.dw_rpr_scale
        if isinstance(self.shortcut, nn.Sequential) and fold_all_bn:
            fold_sequential_conv_bn(self.shortcut)
        self.deployed = True

    def set_fused_ops(self, enabled) -> None:  # True, False or "auto"
        self.use_fused_ops = self.ghost1.use_fused_ops = self.ghost2.use_fused_ops = enabled
