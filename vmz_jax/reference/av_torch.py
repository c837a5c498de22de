"""Pure-PyTorch reference of VMZ's audio ResNet and audio-visual (Gradient-Blending) models.

Transcribed from the Caffe2 builders: ``create_acoustic_resnet`` and ``create_av_resnet``
(``c2/lib/models/audio_visual_model.py``), ``AudioModelBuilder`` (``builder/audio_model.py``) and
``VideoModelBuilder`` (``builder/video_model.py``). Like Caffe2, a model is a net of operators over
named blobs: the builder functions below record the operators and create every parameter under the
blob name Caffe2 gives it (``v_comp_3_conv_2_middle_w``, ``a_shortcut_projection_0_spatbn_riv``,
``last_out_L400_b``...), so a released ``.pkl`` loads with ``load_blobs`` name for name. It shares no
code with vmz_jax (only the error type of ``vmz_jax.reference``), so a bug cannot hide in both.

Tensors are NCHW (audio) and NCTHW (video). BatchNorm: eps 1e-3, running statistics in eval mode,
batch statistics in train mode. Pools, as the builder writes them: the audio tower's ``MaxPool``
[4, 2] (stride 1) on its last map, which is 4 x 2 at 100 x 40 log-mels; the visual tower's
``AveragePool`` [T/8, k, k] spans its whole last map at Caffe2's sizes and is taken here over the
whole map, so that small test clips run too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vmz_jax.reference import INSTALL_HINT, TorchMissingError

try:
    import torch
    import torch.nn.functional as F
    from torch import Tensor, nn
except ImportError as exc:
    raise TorchMissingError(f"the PyTorch reference needs torch ({exc}); {INSTALL_HINT}") from None

__all__ = ["ARCHS", "Caffe2Net", "build"]

BN_EPS = 1e-3
# audio_visual_model.py
BLOCK_CONFIG = {
    18: (2, 2, 2, 2),
    26: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
SHALLOW_FILTER_CONFIG = ((64, 64), (128, 128), (256, 256), (512, 512))
DEEP_FILTER_CONFIG = ((256, 64), (512, 128), (1024, 256), (2048, 512))
MODEL_BLOCKTYPE = {"r2plus1d": "2.5d", "r3d": "3d", "ir_csn": "3d-sep", "ip_csn": "0.3d"}
_TRUNK_DEPTHS = {
    "r2plus1d": (18, 26, 34, 50, 101, 152),
    "r3d": (18, 26, 34, 50, 101, 152),
    "ir_csn": (26, 50, 101, 152),
    "ip_csn": (26, 50, 101, 152),
}

ARCHS: tuple[str, ...] = (
    *(f"a_resnet_{d}" for d in BLOCK_CONFIG),
    *(f"av_{trunk}_{d}" for trunk, depths in _TRUNK_DEPTHS.items() for d in depths),
)

Op = Callable[[dict[str, Tensor]], None]


def _pair(k: int | Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(k) if isinstance(k, Sequence) else (k,) * n


class Caffe2Net(nn.Module):
    """Operators over named blobs, parameters named by their Caffe2 blob names.

    ``forward(**inputs)`` runs the operators in order on the input blobs and returns every blob.
    """

    def __init__(self) -> None:
        super().__init__()
        self.blobs = nn.ParameterDict()
        self._ops: list[Op] = []
        self._stats: dict[str, str] = {}

    # ---- parameters -------------------------------------------------------------------
    def _param(self, name: str, shape: Sequence[int]) -> None:
        if name in self.blobs or name in self._stats.values():
            raise ValueError(f"blob {name!r} created twice")
        self.blobs[name] = nn.Parameter(torch.zeros(tuple(shape)))

    def _stat(self, name: str, shape: Sequence[int]) -> None:
        buffer = f"stat{len(self._stats)}"  # buffer names may not hold every blob name's characters
        self.register_buffer(buffer, torch.zeros(tuple(shape)))
        self._stats[buffer] = name

    def blob_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every blob a checkpoint of this net holds: name -> Caffe2 shape."""
        shapes = {name: tuple(p.shape) for name, p in self.blobs.items()}
        shapes.update({name: tuple(getattr(self, buffer).shape) for buffer, name in self._stats.items()})
        return shapes

    def load_blobs(self, blobs: dict[str, Tensor]) -> None:
        """Copy a checkpoint's blobs in, strictly: every blob used once, none missing, shapes equal."""
        shapes = self.blob_shapes()
        missing = sorted(set(shapes) - set(blobs))
        unexpected = sorted(set(blobs) - set(shapes))
        wrong = sorted(n for n in shapes.keys() & blobs.keys() if tuple(blobs[n].shape) != shapes[n])
        if missing or unexpected or wrong:
            raise ValueError(
                f"blobs do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                f"wrong shape {wrong[:5]}"
            )
        with torch.no_grad():
            for name, p in self.blobs.items():
                p.copy_(blobs[name])
            for buffer, name in self._stats.items():
                getattr(self, buffer).copy_(blobs[name])

    def _stat_of(self, name: str) -> Tensor:
        for buffer, blob in self._stats.items():
            if blob == name:
                return getattr(self, buffer)
        raise KeyError(name)

    # ---- operators (Caffe2's, as the builders call them) --------------------------------
    def conv(
        self,
        blob_in: str,
        name: str,
        dim_in: int,
        dim_out: int,
        kernel: Sequence[int],
        strides: Sequence[int] | int = 1,
        pads: Sequence[int] | int = 0,
        group: int = 1,
        bias: bool = False,
    ) -> str:
        """ConvNd / brew.conv: weight (dim_out, dim_in / group, *kernel), optional bias."""
        kernel = tuple(kernel)
        n = len(kernel)
        self._param(f"{name}_w", (dim_out, dim_in // group, *kernel))
        if bias:
            self._param(f"{name}_b", (dim_out,))
        stride, pad = _pair(strides, n), _pair(pads, n)[:n]  # Caffe2 pads: begins then ends, equal here
        fn = F.conv3d if n == 3 else F.conv2d

        def op(b: dict[str, Tensor]) -> None:
            b[name] = fn(
                b[blob_in],
                self.blobs[f"{name}_w"],
                self.blobs[f"{name}_b"] if bias else None,
                stride,
                pad,
                1,
                group,
            )

        self._ops.append(op)
        return name

    def spatial_bn(self, blob_in: str, name: str, dim: int) -> str:
        self._param(f"{name}_s", (dim,))
        self._param(f"{name}_b", (dim,))
        self._stat(f"{name}_rm", (dim,))
        self._stat(f"{name}_riv", (dim,))  # the running variance, despite the name

        def op(b: dict[str, Tensor]) -> None:
            b[name] = F.batch_norm(
                b[blob_in],
                self._stat_of(f"{name}_rm"),
                self._stat_of(f"{name}_riv"),
                self.blobs[f"{name}_s"],
                self.blobs[f"{name}_b"],
                self.training,
                0.1,
                BN_EPS,
            )

        self._ops.append(op)
        return name

    def relu(self, blob: str) -> str:
        self._ops.append(lambda b: b.__setitem__(blob, F.relu(b[blob])))
        return blob

    def sum(self, a: str, c: str, name: str) -> str:
        self._ops.append(lambda b: b.__setitem__(name, b[a] + b[c]))
        return name

    def max_pool(
        self,
        blob_in: str,
        name: str,
        kernel: Sequence[int],
        stride: Sequence[int] | int,
        pads: Sequence[int] | int = 0,
    ) -> str:
        n = len(kernel)
        fn = F.max_pool3d if n == 3 else F.max_pool2d
        self._ops.append(
            lambda b: b.__setitem__(name, fn(b[blob_in], tuple(kernel), _pair(stride, n), _pair(pads, n)[:n]))
        )
        return name

    def average_pool_whole(self, blob_in: str, name: str) -> str:
        self._ops.append(lambda b: b.__setitem__(name, b[blob_in].mean(dim=(2, 3, 4), keepdim=True)))
        return name

    def squeeze(self, blob_in: str, name: str, dim: int) -> str:
        self._ops.append(lambda b: b.__setitem__(name, b[blob_in].squeeze(dim)))
        return name

    def concat(self, blobs_in: Sequence[str], name: str) -> str:
        self._ops.append(lambda b: b.__setitem__(name, torch.cat([b[x] for x in blobs_in], dim=1)))
        return name

    def fc(self, blob_in: str, name: str, dim_in: int, dim_out: int) -> str:
        """brew.fc: flattens everything after the batch axis, weight (dim_out, dim_in), bias."""
        self._param(f"{name}_w", (dim_out, dim_in))
        self._param(f"{name}_b", (dim_out,))
        self._ops.append(
            lambda b: b.__setitem__(
                name, F.linear(b[blob_in].flatten(1), self.blobs[f"{name}_w"], self.blobs[f"{name}_b"])
            )
        )
        return name

    def forward(self, **inputs: Tensor) -> dict[str, Tensor]:
        blobs = dict(inputs)
        for op in self._ops:
            op(blobs)
        return blobs


class _Builder:
    """What ``VideoModelBuilder`` and ``AudioModelBuilder`` share: the counters, BN and ReLU."""

    def __init__(self, net: Caffe2Net, prev_blob: str, prefix: str):
        self.net, self.prev_blob, self.prefix = net, prev_blob, prefix
        self.comp_count = 0
        self.comp_idx = 0

    def _name(self, what: str, suffix: str = "") -> str:
        return f"{self.prefix}comp_{self.comp_count}_{what}_{self.comp_idx}{suffix}"

    def add_relu(self) -> str:
        self.prev_blob = self.net.relu(self.prev_blob)
        return self.prev_blob

    def add_spatial_bn(self, num_filters: int, suffix: str = "") -> str:
        self.prev_blob = self.net.spatial_bn(self.prev_blob, self._name("spatbn", suffix), num_filters)
        return self.prev_blob

    def _shortcut(
        self, shortcut: str, dim_in: int, dim_out: int, kernel: Sequence[int], strides: Sequence[int] | int
    ) -> str:
        name = f"{self.prefix}shortcut_projection_{self.comp_count}"
        shortcut = self.net.conv(shortcut, name, dim_in, dim_out, kernel, strides)
        return self.net.spatial_bn(shortcut, f"{name}_spatbn", dim_out)

    def _finish(self, shortcut: str, last: str) -> None:
        self.prev_blob = self.net.sum(shortcut, last, self._name("sum"))
        self.comp_idx += 1
        self.add_relu()
        self.comp_count += 1


class AudioBuilder(_Builder):
    """``AudioModelBuilder``: 2-D blocks."""

    def add_conv(self, dim_in: int, dim_out: int, kernel: int, stride: int = 1, pad: int = 0) -> str:
        self.comp_idx += 1
        self.prev_blob = self.net.conv(
            self.prev_blob, self._name("conv"), dim_in, dim_out, (kernel, kernel), stride, pad
        )
        return self.prev_blob

    def add_bottleneck(
        self, input_filters: int, output_filters: int, base_filters: int, down_sampling: bool = False
    ) -> None:
        self.comp_idx = 0
        shortcut = self.prev_blob
        self.add_conv(input_filters, base_filters, 1)
        self.add_spatial_bn(base_filters)
        self.add_relu()
        self.add_conv(base_filters, base_filters, 3, 2 if down_sampling else 1, 1)
        self.add_spatial_bn(base_filters)
        self.add_relu()
        self.add_conv(base_filters, output_filters, 1)
        last = self.add_spatial_bn(output_filters)
        if output_filters > input_filters or down_sampling:
            shortcut = self._shortcut(
                shortcut, input_filters, output_filters, (1, 1), 2 if down_sampling else 1
            )
        self._finish(shortcut, last)

    def add_simple_block(
        self, input_filters: int, num_filters: int, base_filters: int = 0, down_sampling: bool = False
    ) -> None:
        self.comp_idx = 0
        shortcut = self.prev_blob
        self.add_conv(input_filters, num_filters, 3, 2 if down_sampling else 1, 1)
        self.add_spatial_bn(num_filters)
        self.add_relu()
        self.add_conv(num_filters, num_filters, 3, 1, 1)
        last = self.add_spatial_bn(num_filters)
        if num_filters != input_filters or down_sampling:
            shortcut = self._shortcut(shortcut, input_filters, num_filters, (1, 1), 2 if down_sampling else 1)
        self._finish(shortcut, last)


class VideoBuilder(_Builder):
    """``VideoModelBuilder``: 3-D blocks of type '3d', '2.5d', '3d-sep' or '0.3d'."""

    def add_conv(
        self,
        dim_in: int,
        dim_out: int,
        kernels: Sequence[int],
        strides: Sequence[int] = (1, 1, 1),
        pads: Sequence[int] = (0, 0, 0),
        block_type: str = "3d",
    ) -> str:
        self.comp_idx += 1
        net = self.net
        if block_type == "2.5d":
            i = 3 * dim_in * dim_out * kernels[1] * kernels[2]
            i /= dim_in * kernels[1] * kernels[2] + 3 * dim_out
            middle = int(i)
            self.prev_blob = net.conv(
                self.prev_blob,
                self._name("conv", "_middle"),
                dim_in,
                middle,
                (1, kernels[1], kernels[2]),
                (1, strides[1], strides[2]),
                (0, pads[1], pads[2]),
            )
            self.add_spatial_bn(middle, "_middle")
            self.add_relu()
            self.prev_blob = net.conv(
                self.prev_blob,
                self._name("conv"),
                middle,
                dim_out,
                (kernels[0], 1, 1),
                (strides[0], 1, 1),
                (pads[0], 0, 0),
            )
        elif block_type == "0.3d":
            self.prev_blob = net.conv(
                self.prev_blob, self._name("conv", "_middle"), dim_in, dim_out, (1, 1, 1)
            )
            self.add_spatial_bn(dim_out, "_middle")
            self.prev_blob = net.conv(
                self.prev_blob, self._name("conv"), dim_out, dim_out, kernels, strides, pads, group=dim_out
            )
        elif block_type == "3d":
            self.prev_blob = net.conv(
                self.prev_blob, self._name("conv"), dim_in, dim_out, kernels, strides, pads
            )
        elif block_type == "3d-sep":  # add_channelwise_conv: the counter moves once more
            assert dim_in == dim_out
            self.comp_idx += 1
            self.prev_blob = net.conv(
                self.prev_blob, self._name("conv"), dim_in, dim_out, kernels, strides, pads, group=dim_in
            )
        else:
            raise ValueError(f"unknown block type {block_type!r}")
        return self.prev_blob

    def _striding(self, down_sampling: bool, down_sampling_temporal: bool | None) -> tuple[int, int, int]:
        if down_sampling_temporal is None:
            down_sampling_temporal = down_sampling
        if down_sampling:
            return (2, 2, 2) if down_sampling_temporal else (1, 2, 2)
        return (1, 1, 1)

    def add_bottleneck(
        self,
        input_filters: int,
        output_filters: int,
        base_filters: int,
        down_sampling: bool = False,
        down_sampling_temporal: bool | None = None,
        block_type: str = "3d",
    ) -> None:
        self.comp_idx = 0
        shortcut = self.prev_blob
        self.add_conv(input_filters, base_filters, (1, 1, 1))
        self.add_spatial_bn(base_filters)
        self.add_relu()
        striding = self._striding(down_sampling, down_sampling_temporal)
        self.add_conv(base_filters, base_filters, (3, 3, 3), striding, (1, 1, 1), block_type)
        self.add_spatial_bn(base_filters)
        self.add_relu()
        self.add_conv(base_filters, output_filters, (1, 1, 1))
        last = self.add_spatial_bn(output_filters)
        if output_filters != input_filters or down_sampling:
            shortcut = self._shortcut(shortcut, input_filters, output_filters, (1, 1, 1), striding)
        self._finish(shortcut, last)

    def add_simple_block(
        self,
        input_filters: int,
        num_filters: int,
        base_filters: int = 0,
        down_sampling: bool = False,
        down_sampling_temporal: bool | None = None,
        block_type: str = "3d",
    ) -> None:
        self.comp_idx = 0
        shortcut = self.prev_blob
        striding = self._striding(down_sampling, down_sampling_temporal)
        self.add_conv(input_filters, num_filters, (3, 3, 3), striding, (1, 1, 1), block_type)
        self.add_spatial_bn(num_filters)
        self.add_relu()
        self.add_conv(num_filters, num_filters, (3, 3, 3), (1, 1, 1), (1, 1, 1), block_type)
        last = self.add_spatial_bn(num_filters)
        if num_filters != input_filters or down_sampling:
            shortcut = self._shortcut(shortcut, input_filters, num_filters, (1, 1, 1), striding)
        self._finish(shortcut, last)


def _transformation(builder: _Builder, depth: int) -> Callable[..., None]:
    return builder.add_simple_block if depth <= 18 or depth == 34 else builder.add_bottleneck


def _audio_tower(net: Caffe2Net, data: str, depth: int, prefix: str) -> tuple[str, int]:
    """conv1, the three 16 -> 32 blocks, the four stages and the [4, 2] max pool; (blob, width)."""
    conv1 = net.conv(data, f"{prefix}conv1", 1, 16, (3, 3), 1, 1, bias=True)
    builder = AudioBuilder(net, conv1, prefix)
    builder.add_simple_block(16, 32, down_sampling=True)
    builder.add_simple_block(32, 32)
    builder.add_simple_block(32, 32)
    filters = SHALLOW_FILTER_CONFIG if depth <= 34 else DEEP_FILTER_CONFIG
    transformation = _transformation(builder, depth)
    dim_in = 32
    for n, (out, base) in zip(BLOCK_CONFIG[depth], filters, strict=True):
        transformation(dim_in, out, base, down_sampling=True)
        for _ in range(n - 1):
            transformation(out, out, base)
        dim_in = out
    name = f"{prefix}final_avg" if prefix else "final_avg"
    return net.max_pool(builder.prev_blob, name, (4, 2), 1), dim_in


def build_acoustic_resnet(depth: int, num_labels: int) -> Caffe2Net:
    """``create_acoustic_resnet``: input blob ``logmels`` (N, 1, 100, 40)."""
    net = Caffe2Net()
    last, dim = _audio_tower(net, "logmels", depth, "")
    net.fc(last, f"last_out_L{num_labels}", dim, num_labels)
    return net


def build_av_resnet(
    trunk: str, depth: int, num_labels: int, clip_length: int, use_pool1: bool, g_blend: bool = True
) -> Caffe2Net:
    """``create_av_resnet``: input blobs ``data`` (N, 3, T, H, W) and ``logmels`` (N, 1, 100, 40)."""
    block_type = MODEL_BLOCKTYPE[trunk]
    net = Caffe2Net()
    if block_type != "2.5d":
        net.conv("data", "v_conv1", 3, 64, (3, 7, 7), (1, 2, 2), (1, 3, 3))
    else:
        net.conv("data", "v_conv1_middle", 3, 45, (1, 7, 7), (1, 2, 2), (0, 3, 3))
        net.relu(net.spatial_bn("v_conv1_middle", "v_conv1_middle_spatbn_relu", 45))
        net.conv("v_conv1_middle_spatbn_relu", "v_conv1", 45, 64, (3, 1, 1), (1, 1, 1), (1, 0, 0))
    v_conv1 = net.relu(net.spatial_bn("v_conv1", "v_conv1_spatbn_relu", 64))
    if use_pool1:
        v_conv1 = net.max_pool(v_conv1, "pool1", (1, 3, 3), (1, 2, 2), (0, 1, 1))

    last_a, a_dim = _audio_tower(net, "logmels", depth, "a_")
    v = VideoBuilder(net, v_conv1, "v_")
    transformation = _transformation(v, depth)
    filters = SHALLOW_FILTER_CONFIG if depth <= 34 else DEEP_FILTER_CONFIG
    dim_in = 64
    for stage, (n, (out, base)) in enumerate(zip(BLOCK_CONFIG[depth], filters, strict=True)):
        keep_time = stage == 3 and clip_length < 8  # conv_5x
        transformation(
            dim_in,
            out,
            base,
            down_sampling=stage > 0,
            down_sampling_temporal=False if keep_time else None,
            block_type=block_type,
        )
        for _ in range(n - 1):
            transformation(out, out, base, block_type=block_type)
        dim_in = out

    last_v = net.squeeze(net.average_pool_whole(v.prev_blob, "v_final_avg"), "v_final_avg_squeezed", 4)
    av_concat = net.concat([last_v, last_a], "av_concat")
    dim = 2 * filters[3][0]
    fc_dim = dim // 2
    relu1 = net.relu(net.fc(av_concat, "av_fc1", dim, fc_dim))
    relu2 = net.relu(net.fc(relu1, "av_fc2", fc_dim, fc_dim))
    net.fc(relu2, f"last_out_L{num_labels}", fc_dim, num_labels)
    if g_blend:
        net.fc(last_a, f"a_last_out_L{num_labels}", a_dim, num_labels)
        net.fc(last_v, f"v_last_out_L{num_labels}", dim_in, num_labels)
    return net


@dataclass(frozen=True)
class Outputs:
    """Blob names of a net's results: logits per head and features."""

    logits: dict[str, str]
    features: dict[str, str]


def outputs(arch: str, num_labels: int) -> Outputs:
    """Which blobs hold each head's logits and the features, for `arch`."""
    if arch.startswith("a_resnet_"):
        return Outputs({"audio": f"last_out_L{num_labels}"}, {"audio": "final_avg"})
    return Outputs(
        {
            "av": f"last_out_L{num_labels}",
            "audio": f"a_last_out_L{num_labels}",
            "visual": f"v_last_out_L{num_labels}",
        },
        {"audio": "a_final_avg", "visual": "v_final_avg_squeezed", "joint": "av_fc2"},
    )


def build(arch: str, num_classes: int = 400, clip_length: int = 8) -> Caffe2Net:
    """``a_resnet_<depth>`` or ``av_<trunk>_<depth>`` (one of :data:`ARCHS`), with zero weights;
    ``clip_length`` sets whether the last visual stage strides in time (< 8 frames: it does not).
    The stem max-pool is on for the CSN trunks (the released AV files' 110.1 GFLOPs need it)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    depth = int(arch.rsplit("_", 1)[1])
    if arch.startswith("a_resnet_"):
        return build_acoustic_resnet(depth, num_classes)
    trunk = arch[len("av_") :].rsplit("_", 1)[0]
    return build_av_resnet(trunk, depth, num_classes, clip_length, use_pool1=trunk.endswith("csn"))


def run(
    net: Caffe2Net, arch: str, num_classes: int, logmels: Tensor, clips: Tensor | None = None
) -> dict[str, Tensor]:
    """Logits of every head and the features: ``logmels`` (N, F, 40), ``clips`` (N, 3, T, H, W)."""
    inputs = {"logmels": logmels[:, None]}
    if clips is not None:
        inputs["data"] = clips
    blobs = net(**inputs)
    names = outputs(arch, num_classes)
    out = {f"logits_{head}": blobs[name] for head, name in names.logits.items()}
    out.update({f"features_{k}": blobs[name].flatten(1) for k, name in names.features.items()})
    return out
