"""Pure-PyTorch reference implementation of the VMZ video model family.

Written from the Caffe2 builders of facebookresearch/VMZ (``c2/lib/models/r3d_model.py``,
``c2/lib/models/builder/video_model.py``, ``c2/lib/models/c3d_model.py``); module and
``state_dict`` names follow VMZ's PyTorch port (torchvision ``VideoResNet`` structure) so that
released ``.pth`` weights load unchanged. Only ``torch``, the standard library and the error type
of ``vmz_jax.reference`` (raised, with the install command, when torch is missing) are used.

Tensors are NCDHW = (N, C, T, H, W). Every conv is bias-free and followed by one BatchNorm
(eps 1e-3, torch momentum 0.1 == Caffe2 momentum 0.9); the classifier is an ``nn.Linear``.

Caffe2 facts reproduced here that are easy to get wrong:

* (2+1)D middle widths are computed per conv from that conv's own in/out channels:
  ``mid = 27 * in * out // (9 * in + 3 * out)``.
* Depth 26 uses bottleneck blocks with the *shallow* widths (out == inner == 64/128/256/512).
* ``create_r3d`` families (r2plus1d, r3d, ir-CSN, ip-CSN) drop the temporal stride of layer3's
  first block when the clip has fewer than 4 frames and of layer4's when it has fewer than 8.
  Here the rule is applied at forward time from ``x.shape[2]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from vmz_jax.reference import INSTALL_HINT, TorchMissingError

try:
    import torch
    import torch.nn.functional as F
    from torch import Tensor, nn
except ImportError as exc:  # one line, with the fix, instead of a traceback from deep inside
    raise TorchMissingError(f"the PyTorch reference needs torch ({exc}); {INSTALL_HINT}") from None

__all__ = [
    "ARCHS",
    "C3D",
    "BasicBlock",
    "Bottleneck",
    "ResNetSpec",
    "VideoResNet",
    "build",
    "randomize_",
    "two_plus_one_mid_channels",
]

ConvKind = Literal["3d", "2d", "2plus1d", "ir", "ip"]
BlockKind = Literal["basic", "bottleneck"]
# stems: r2plus1d (1x7x7 then 3x1x1), r3d (3x7x7), csn (3x7x7 + max-pool),
# 2d (1x7x7: fR2D, rMCx), r2d (clip_length x 7 x 7, collapses time)
StemKind = Literal["r2plus1d", "r3d", "csn", "2d", "r2d"]
Triple = tuple[int, int, int]
StageKinds = tuple[ConvKind, ConvKind, ConvKind, ConvKind]

BN_EPS = 1e-3
BN_MOMENTUM = 0.1  # torch convention; equals Caffe2's momentum=0.9

BLOCK_CONFIG: dict[int, tuple[int, int, int, int]] = {
    10: (1, 1, 1, 1),
    16: (2, 2, 2, 1),
    18: (2, 2, 2, 2),
    26: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
# (out, inner) widths per stage; Caffe2 picks the shallow table for every depth <= 34.
SHALLOW_WIDTHS: tuple[tuple[int, int], ...] = ((64, 64), (128, 128), (256, 256), (512, 512))
DEEP_WIDTHS: tuple[tuple[int, int], ...] = ((256, 64), (512, 128), (1024, 256), (2048, 512))

_DEPTHS = (10, 16, 18, 26, 34, 50, 101, 152)
_CSN_DEPTHS = (26, 50, 101, 152)

ARCHS: tuple[str, ...] = (
    *(f"r2plus1d_{d}" for d in _DEPTHS),
    *(f"r3d_{d}" for d in _DEPTHS),
    "r2d_18",
    "r2df_18",
    *(f"mc{x}_18" for x in (2, 3, 4, 5)),
    *(f"rmc{x}_18" for x in (2, 3, 4, 5)),
    *(f"ir_csn_{d}" for d in _CSN_DEPTHS),
    *(f"ip_csn_{d}" for d in _CSN_DEPTHS),
    "c3d",
)


def _bn(channels: int) -> nn.BatchNorm3d:
    return nn.BatchNorm3d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def two_plus_one_mid_channels(in_channels: int, out_channels: int) -> int:
    """Width of the hidden layer of a (2+1)D conv replacing a 3x3x3 conv (Caffe2 formula)."""
    return (27 * in_channels * out_channels) // (9 * in_channels + 3 * out_channels)


# --------------------------------------------------------------------------------------------
# Convolution operators. Each accepts ``keep_time``: when True, a temporal stride of the module
# is replaced by 1 (the Caffe2 ``down_sampling_temporal=False`` case). Parameters are unchanged.
# --------------------------------------------------------------------------------------------


class Conv3d(nn.Conv3d):
    """Bias-free ``nn.Conv3d`` whose temporal stride can be suppressed per call."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Triple,
        stride: Triple = (1, 1, 1),
        padding: Triple = (0, 0, 0),
        groups: int = 1,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            groups=groups,
            bias=False,
        )

    def forward(self, x: Tensor, keep_time: bool = False) -> Tensor:
        stride = tuple(self.stride)
        if keep_time:
            stride = (1, *stride[1:])
        return F.conv3d(x, self.weight, None, stride, self.padding, self.dilation, self.groups)


class Conv2Plus1D(nn.Sequential):
    """(2+1)D conv: 1x3x3 spatial conv -> BN -> ReLU -> 3x1x1 temporal conv.

    Indices 0 (spatial), 1 (BN), 2 (ReLU), 3 (temporal) match VMZ's ``state_dict`` keys.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: Triple) -> None:
        mid = two_plus_one_mid_channels(in_channels, out_channels)
        super().__init__(
            Conv3d(in_channels, mid, (1, 3, 3), (1, stride[1], stride[2]), (0, 1, 1)),
            _bn(mid),
            nn.ReLU(),
            Conv3d(mid, out_channels, (3, 1, 1), (stride[0], 1, 1), (1, 0, 0)),
        )

    def forward(self, x: Tensor, keep_time: bool = False) -> Tensor:
        x = self[2](self[1](self[0](x)))
        return self[3](x, keep_time)


class IPConv(nn.Sequential):
    """ip-CSN middle conv: 1x1x1 dense conv -> BN (no ReLU) -> depthwise 3x3x3 conv."""

    def __init__(self, channels: int, stride: Triple) -> None:
        super().__init__(
            Conv3d(channels, channels, (1, 1, 1)),
            _bn(channels),
            Conv3d(channels, channels, (3, 3, 3), stride, (1, 1, 1), groups=channels),
        )

    def forward(self, x: Tensor, keep_time: bool = False) -> Tensor:
        return self[2](self[1](self[0](x)), keep_time)


def _conv_op(kind: ConvKind, in_channels: int, out_channels: int, stride: Triple) -> nn.Module:
    """The 'k3' convolution of a residual block, in the flavour ``kind``."""
    if kind == "3d":
        return Conv3d(in_channels, out_channels, (3, 3, 3), stride, (1, 1, 1))
    if kind == "2d":
        return Conv3d(in_channels, out_channels, (1, 3, 3), stride, (0, 1, 1))
    if kind == "2plus1d":
        return Conv2Plus1D(in_channels, out_channels, stride)
    if in_channels != out_channels:
        raise ValueError(f"channel-separated conv needs in == out: {in_channels}, {out_channels}")
    if kind == "ir":
        return Conv3d(in_channels, in_channels, (3, 3, 3), stride, (1, 1, 1), groups=in_channels)
    if kind == "ip":
        return IPConv(in_channels, stride)
    raise ValueError(f"unknown conv kind {kind!r}")


def _block_stride(kind: ConvKind, downsample: bool) -> Triple:
    if not downsample:
        return (1, 1, 1)
    return (1, 2, 2) if kind == "2d" else (2, 2, 2)


class ConvBN(nn.Sequential):
    """Sequential(conv op, BN[, ReLU]) whose first element receives ``keep_time``."""

    def __init__(self, conv: nn.Module, channels: int, relu: bool) -> None:
        layers: list[nn.Module] = [conv, _bn(channels)]
        if relu:
            layers.append(nn.ReLU())
        super().__init__(*layers)

    def forward(self, x: Tensor, keep_time: bool = False) -> Tensor:
        x = self[0](x, keep_time)
        for layer in list(self)[1:]:
            x = layer(x)
        return x


def _shortcut(in_channels: int, out_channels: int, stride: Triple) -> ConvBN | None:
    if in_channels == out_channels and stride == (1, 1, 1):
        return None
    return ConvBN(Conv3d(in_channels, out_channels, (1, 1, 1), stride), out_channels, relu=False)


class BasicBlock(nn.Module):
    """conv(in->out, stride) BN ReLU, conv(out->out) BN, + shortcut, ReLU."""

    def __init__(
        self, in_channels: int, out_channels: int, kind: ConvKind, downsample: bool
    ) -> None:
        super().__init__()
        stride = _block_stride(kind, downsample)
        conv1 = _conv_op(kind, in_channels, out_channels, stride)
        conv2 = _conv_op(kind, out_channels, out_channels, (1, 1, 1))
        self.conv1 = ConvBN(conv1, out_channels, relu=True)
        self.conv2 = ConvBN(conv2, out_channels, relu=False)
        self.downsample = _shortcut(in_channels, out_channels, stride)

    @property
    def residual_bn(self) -> nn.BatchNorm3d:
        """The BN whose output is added to the shortcut."""
        return self.conv2[1]

    def forward(self, x: Tensor, keep_time: bool = False) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x, keep_time)
        return F.relu(self.conv2(self.conv1(x, keep_time)) + residual)


class Bottleneck(nn.Module):
    """1x1x1 in->inner BN ReLU, conv(inner->inner, stride) BN ReLU, 1x1x1 inner->out BN,
    + shortcut, ReLU."""

    def __init__(
        self, in_channels: int, out_channels: int, inner: int, kind: ConvKind, downsample: bool
    ) -> None:
        super().__init__()
        stride = _block_stride(kind, downsample)
        self.conv1 = ConvBN(Conv3d(in_channels, inner, (1, 1, 1)), inner, relu=True)
        self.conv2 = ConvBN(_conv_op(kind, inner, inner, stride), inner, relu=True)
        self.conv3 = ConvBN(Conv3d(inner, out_channels, (1, 1, 1)), out_channels, relu=False)
        self.downsample = _shortcut(in_channels, out_channels, stride)

    @property
    def residual_bn(self) -> nn.BatchNorm3d:
        """The BN whose output is added to the shortcut."""
        return self.conv3[1]

    def forward(self, x: Tensor, keep_time: bool = False) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x, keep_time)
        out = self.conv3(self.conv2(self.conv1(x), keep_time))
        return F.relu(out + residual)


class Stage(nn.Sequential):
    """A residual stage; ``keep_time`` only affects its first (possibly strided) block."""

    def forward(self, x: Tensor, keep_time: bool = False) -> Tensor:
        for index, block in enumerate(self):
            x = block(x, keep_time and index == 0)
        return x


# --------------------------------------------------------------------------------------------
# Stems
# --------------------------------------------------------------------------------------------


def _stem(kind: StemKind, clip_length: int) -> nn.Sequential:
    if kind == "r2plus1d":
        return nn.Sequential(
            Conv3d(3, 45, (1, 7, 7), (1, 2, 2), (0, 3, 3)),
            _bn(45),
            nn.ReLU(),
            Conv3d(45, 64, (3, 1, 1), (1, 1, 1), (1, 0, 0)),
            _bn(64),
            nn.ReLU(),
        )
    if kind in ("r3d", "csn"):
        layers: list[nn.Module] = [
            Conv3d(3, 64, (3, 7, 7), (1, 2, 2), (1, 3, 3)),
            _bn(64),
            nn.ReLU(),
        ]
        if kind == "csn":
            layers.append(nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)))
        return nn.Sequential(*layers)
    time_kernel = clip_length if kind == "r2d" else 1
    return nn.Sequential(
        Conv3d(3, 64, (time_kernel, 7, 7), (1, 2, 2), (0, 3, 3)), _bn(64), nn.ReLU()
    )


# --------------------------------------------------------------------------------------------
# Residual networks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResNetSpec:
    """Everything that distinguishes one VMZ residual network from another."""

    depth: int
    stem: StemKind
    stage_kinds: StageKinds
    # create_r3d's rule: no temporal stride in layer3 block 0 if T < 4, layer4 block 0 if T < 8.
    short_clip_rule: bool

    @property
    def block(self) -> BlockKind:
        return "basic" if self.depth in (10, 16, 18, 34) else "bottleneck"

    @property
    def widths(self) -> tuple[tuple[int, int], ...]:
        return SHALLOW_WIDTHS if self.depth <= 34 else DEEP_WIDTHS


class VideoResNet(nn.Module):
    """VMZ residual video network (R(2+1)D, R3D, R2D, fR2D, MCx, rMCx, ir-CSN, ip-CSN)."""

    def __init__(self, spec: ResNetSpec, num_classes: int = 400, clip_length: int = 8) -> None:
        super().__init__()
        self.spec = spec
        self.stem = _stem(spec.stem, clip_length)
        in_channels = 64
        stages: list[Stage] = []
        for index, (blocks, (out_channels, inner), kind) in enumerate(
            zip(BLOCK_CONFIG[spec.depth], spec.widths, spec.stage_kinds, strict=True)
        ):
            layer: list[nn.Module] = []
            for b in range(blocks):
                downsample = index > 0 and b == 0
                if spec.block == "basic":
                    layer.append(BasicBlock(in_channels, out_channels, kind, downsample))
                else:
                    layer.append(Bottleneck(in_channels, out_channels, inner, kind, downsample))
                in_channels = out_channels
            stages.append(Stage(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(in_channels, num_classes)

    @property
    def feature_dim(self) -> int:
        return self.fc.in_features

    def stage_outputs(self, x: Tensor) -> dict[str, Tensor]:
        """NCDHW activations after the stem and each stage, the pooled features and the logits:
        the same keys as `vmz_jax` models' ``stage_outputs`` (which are NTHWC)."""
        if x.dim() != 5:
            raise ValueError(f"expected an NCDHW tensor, got shape {tuple(x.shape)}")
        frames = x.shape[2]
        rule = self.spec.short_clip_rule
        out: dict[str, Tensor] = {}
        out["stem"] = h = self.stem(x)
        out["layer1"] = h = self.layer1(h)
        out["layer2"] = h = self.layer2(h)
        out["layer3"] = h = self.layer3(h, rule and frames < 4)
        out["layer4"] = h = self.layer4(h, rule and frames < 8)
        out["features"] = h = h.mean(dim=(2, 3, 4))
        out["logits"] = self.fc(h)
        return out

    forward_stages = stage_outputs  # the name the parity tests were written with

    def forward(self, x: Tensor) -> Tensor:
        return self.stage_outputs(x)["logits"]


# --------------------------------------------------------------------------------------------
# C3D
# --------------------------------------------------------------------------------------------


def _c3d_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        Conv3d(in_channels, out_channels, (3, 3, 3), (1, 1, 1), (1, 1, 1)),
        _bn(out_channels),
        nn.ReLU(),
    )


class C3D(nn.Module):
    """C3D with BatchNorm (VMZ ``c3d_model.py``); input must be 3 x 16 x 112 x 112."""

    POOL5_SHAPE = (512, 1, 3, 3)

    def __init__(self, num_classes: int = 400) -> None:
        super().__init__()
        self.conv1a = _c3d_conv(3, 64)
        self.pool1 = nn.MaxPool3d((1, 2, 2), (1, 2, 2))
        self.conv2a = _c3d_conv(64, 128)
        self.pool2 = nn.MaxPool3d(2, 2)
        self.conv3a = _c3d_conv(128, 256)
        self.conv3b = _c3d_conv(256, 256)
        self.pool3 = nn.MaxPool3d(2, 2)
        self.conv4a = _c3d_conv(256, 512)
        self.conv4b = _c3d_conv(512, 512)
        self.pool4 = nn.MaxPool3d(2, 2)
        self.conv5a = _c3d_conv(512, 512)
        self.conv5b = _c3d_conv(512, 512)
        self.pool5 = nn.MaxPool3d(2, 2)
        self.fc6 = nn.Linear(math.prod(self.POOL5_SHAPE), 4096)
        self.dropout6 = nn.Dropout(0.5)
        self.fc7 = nn.Linear(4096, 4096)
        self.dropout7 = nn.Dropout(0.5)
        self.fc = nn.Linear(4096, num_classes)

    @property
    def feature_dim(self) -> int:
        return self.fc.in_features

    def stage_outputs(self, x: Tensor) -> dict[str, Tensor]:
        """NCDHW pool1..pool5 activations, the fc7 features and the logits (the keys of
        `vmz_jax`'s C3D ``stage_outputs``)."""
        if x.dim() != 5:
            raise ValueError(f"expected an NCDHW tensor, got shape {tuple(x.shape)}")
        frames, height, width = x.shape[2:]
        pool5 = (512, frames // 16, height // 32, width // 32)  # pool1 halves space only
        if pool5 != self.POOL5_SHAPE:
            raise ValueError(
                f"C3D needs pool5 of shape {self.POOL5_SHAPE} for fc6 (input 3x16x112x112), "
                f"input {tuple(x.shape[1:])} gives {pool5}"
            )
        out: dict[str, Tensor] = {}
        out["pool1"] = h = self.pool1(self.conv1a(x))
        out["pool2"] = h = self.pool2(self.conv2a(h))
        out["pool3"] = h = self.pool3(self.conv3b(self.conv3a(h)))
        out["pool4"] = h = self.pool4(self.conv4b(self.conv4a(h)))
        out["pool5"] = h = self.pool5(self.conv5b(self.conv5a(h)))
        h = self.dropout6(F.relu(self.fc6(h.flatten(1))))
        out["features"] = h = F.relu(self.fc7(h))
        out["logits"] = self.fc(self.dropout7(h))
        return out

    forward_stages = stage_outputs  # the name the parity tests were written with

    def forward(self, x: Tensor) -> Tensor:
        return self.stage_outputs(x)["logits"]


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def _stage_kinds(is_3d: Sequence[bool]) -> StageKinds:
    """Stage kinds of the mixed-convolution nets: '3d' where ``is_3d`` else '2d'."""
    a, b, c, d = ("3d" if flag else "2d" for flag in is_3d)
    return (a, b, c, d)


def _spec(arch: str) -> ResNetSpec:
    family, _, depth_text = arch.rpartition("_")
    depth = int(depth_text)
    stages = (1, 2, 3, 4)
    if family == "r2plus1d":
        return ResNetSpec(depth, "r2plus1d", ("2plus1d",) * 4, short_clip_rule=True)
    if family == "r3d":
        return ResNetSpec(depth, "r3d", ("3d",) * 4, short_clip_rule=True)
    if family == "ir_csn":
        return ResNetSpec(depth, "csn", ("ir",) * 4, short_clip_rule=True)
    if family == "ip_csn":
        return ResNetSpec(depth, "csn", ("ip",) * 4, short_clip_rule=True)
    if family == "r2d":
        return ResNetSpec(depth, "r2d", ("2d",) * 4, short_clip_rule=False)
    if family == "r2df":
        return ResNetSpec(depth, "2d", ("2d",) * 4, short_clip_rule=False)
    if family.startswith("rmc"):  # 2D stem; stage L is 3D iff L >= x - 1 (stage 4 always 3D)
        level = int(family[3:])
        kinds = _stage_kinds([stage >= level - 1 for stage in stages])
        return ResNetSpec(depth, "2d", kinds, short_clip_rule=False)
    if family.startswith("mc"):  # 3D stem; stage L is 3D iff L < x - 1 (stage 4 always 2D)
        level = int(family[2:])
        kinds = _stage_kinds([stage < level - 1 for stage in stages])
        return ResNetSpec(depth, "r3d", kinds, short_clip_rule=False)
    raise ValueError(f"unknown arch {arch!r}")


def build(arch: str, num_classes: int = 400, clip_length: int = 8) -> nn.Module:
    """Build ``arch`` (one of :data:`ARCHS`). ``clip_length`` only sets r2d_18's stem kernel."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if arch == "c3d":
        return C3D(num_classes)
    return VideoResNet(_spec(arch), num_classes, clip_length)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter and BN statistic with seeded, non-symmetric random values.

    Conv / Linear weights ~ N(0, sqrt(2 / fan_in)); Linear bias ~ N(0, 0.1);
    BN weight ~ U(0.5, 1.5), bias ~ N(0, 0.1), running_mean ~ N(0, 0.1),
    running_var ~ U(0.5, 1.5); ``num_batches_tracked`` is set to 0.

    In eval mode BN does not renormalise, so with these values every residual block roughly
    doubles the activations' second moment (1e11 after ip-CSN-152's 50 blocks). To keep
    activations O(1) at any depth, the weight of the BN that closes each residual branch
    (the one summed with the shortcut) is then divided by sqrt(number of residual blocks).
    Values are drawn on the CPU in ``model.modules()`` order. Returns ``model``.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(t: Tensor, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=gen) * std)

    def uniform(t: Tensor, low: float, high: float) -> None:
        t.copy_(torch.rand(t.shape, generator=gen) * (high - low) + low)

    for module in model.modules():
        if isinstance(module, nn.Conv3d | nn.Linear):
            fan_in = math.prod(module.weight.shape[1:])
            normal(module.weight, math.sqrt(2.0 / fan_in))
            if module.bias is not None:
                normal(module.bias, 0.1)
        elif isinstance(module, nn.BatchNorm3d):
            uniform(module.weight, 0.5, 1.5)
            normal(module.bias, 0.1)
            normal(module.running_mean, 0.1)
            uniform(module.running_var, 0.5, 1.5)
            if module.num_batches_tracked is not None:
                module.num_batches_tracked.zero_()
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock | Bottleneck)]
    for block in blocks:
        block.residual_bn.weight.div_(math.sqrt(len(blocks)))
    return model
