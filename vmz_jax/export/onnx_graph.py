"""ONNX graphs of the VMZ networks, written from the model's structure with the `onnx` package.

Why not a converter: jax2onnx (the maintained JAX -> ONNX converter) pins `orbax-checkpoint<0.11.37`
while vmz-jax runs on a newer Orbax, so it cannot be an optional extra without downgrading a core
dependency; and a traced converter would translate the CPU convolution rewrites, not the network.
The graph here is what a runtime executes well: one standard `Conv` per convolution (`group` =
channels for the depthwise ones) with its BatchNorm folded into weights and bias, `Relu`, `Add` for
the residuals, `MaxPool`, `ReduceMean` for the global pool, `Gemm` for the classifier. The input is
NTHWC like the JAX model (`clips`, float32, normalized RGB) and is transposed once to NCDHW, the
layout ONNX convolutions use; the batch is dynamic (T, H, W too where asked).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from vmz_jax.errors import VMZError
from vmz_jax.models.c3d import C3D, C3D_GROUPS
from vmz_jax.models.layers import BN_EPSILON, Conv2Plus1dBN, ConvBN, InteractionPreservedBN
from vmz_jax.models.resnet import STAGES, BasicBlock, Bottleneck, VideoResNet

__all__ = ["OPSET", "build_onnx"]

OPSET = 17


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise VMZError("ONNX export needs the onnx package: pip install 'vmz-jax[onnx]'") from None
    return onnx


class _Graph:
    """Nodes and initializers under construction; `name` hands out unique tensor names."""

    def __init__(self, onnx: Any):
        self.onnx = onnx
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, hint: str, value: np.ndarray) -> str:
        name = self.name(hint)
        self.inits.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        out = self.name(hint)
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _array(var: nnx.Variable, index: int | None) -> np.ndarray:
    a = np.asarray(var[...], np.float32)
    return a if index is None else a[index]


def _conv(
    g: _Graph,
    x: str,
    m: ConvBN,
    index: int | None,
    *,
    relu: bool = False,
    residual: str | None = None,
    temporal_stride: int | None = None,
) -> str:
    """One ConvBN: the BatchNorm's running statistics folded into the kernel and a bias."""
    kernel = _array(m.kernel, index)  # (kT, kH, kW, Cin/groups, Cout)
    gamma, beta, mean, var = (_array(v, index) for v in (m.bn.scale, m.bn.bias, m.bn.mean, m.bn.var))
    scale = (gamma / np.sqrt(var.astype(np.float64) + BN_EPSILON)).astype(np.float32)
    shift = (beta - mean * scale).astype(np.float32)
    weight = (kernel * scale).transpose(4, 3, 0, 1, 2)  # (Cout, Cin/groups, kT, kH, kW)
    stride = m.stride if temporal_stride is None else (temporal_stride, *m.stride[1:])
    y = g.op(
        "Conv",
        [x, g.const("w", weight), g.const("b", shift)],
        "conv",
        kernel_shape=list(weight.shape[2:]),
        strides=list(stride),
        pads=list(m.padding) * 2,
        group=int(m.groups),
    )
    if residual is not None:
        y = g.op("Add", [y, residual], "add")
    return g.op("Relu", [y], "relu") if relu else y


def _residual_conv(
    g: _Graph,
    x: str,
    m: nnx.Module,
    index: int | None,
    *,
    relu: bool = False,
    residual: str | None = None,
    temporal_stride: int | None = None,
) -> str:
    if isinstance(m, ConvBN):
        return _conv(g, x, m, index, relu=relu, residual=residual, temporal_stride=temporal_stride)
    if isinstance(m, Conv2Plus1dBN):
        y = _conv(g, x, m.spatial, index, relu=True)
        return _conv(g, y, m.temporal, index, relu=relu, residual=residual, temporal_stride=temporal_stride)
    if isinstance(m, InteractionPreservedBN):
        y = _conv(g, x, m.pointwise, index)
        return _conv(g, y, m.depthwise, index, relu=relu, residual=residual, temporal_stride=temporal_stride)
    raise VMZError(f"ONNX export does not know the convolution {type(m).__name__}")


def _block(g: _Graph, x: str, b: nnx.Module, index: int | None, temporal_stride: int | None) -> str:
    shortcut = (
        x if b.downsample is None else _conv(g, x, b.downsample, index, temporal_stride=temporal_stride)
    )
    if isinstance(b, BasicBlock):
        y = _residual_conv(g, x, b.conv1, index, relu=True, temporal_stride=temporal_stride)
        return _residual_conv(g, y, b.conv2, index, relu=True, residual=shortcut)
    if isinstance(b, Bottleneck):
        y = _conv(g, x, b.conv1, index, relu=True)
        y = _residual_conv(g, y, b.conv2, index, relu=True, temporal_stride=temporal_stride)
        return _conv(g, y, b.conv3, index, relu=True, residual=shortcut)
    raise VMZError(f"ONNX export does not know the block {type(b).__name__}")


def _linear(g: _Graph, x: str, fc: nnx.Linear, hint: str) -> str:
    kernel = np.asarray(fc.kernel[...], np.float32)
    bias = (
        np.asarray(fc.bias[...], np.float32) if fc.bias is not None else np.zeros(kernel.shape[1], np.float32)
    )
    return g.op("Gemm", [x, g.const(f"{hint}_w", kernel), g.const(f"{hint}_b", bias)], hint)


def _resnet(g: _Graph, x: str, model: VideoResNet, output: str, frames: int | None) -> str:
    # Caffe2's short-clip rule: the temporal strides depend on the clip length; a symbolic length is
    # exported for clips of at least 8 frames (the metadata's min_frames), where no stage is affected.
    strides = model._temporal_strides(frames if frames is not None else 8)
    stem = model.stem
    if stem.kind == "2plus1d":
        h = _conv(g, _conv(g, x, stem.spatial, None, relu=True), stem.temporal, None, relu=True)
    else:
        h = _conv(g, x, stem.conv, None, relu=True)
    if stem.pool:
        h = g.op("MaxPool", [h], "pool", kernel_shape=[1, 3, 3], strides=[1, 2, 2], pads=[0, 1, 1, 0, 1, 1])
    for name in STAGES:
        stage = getattr(model, name)
        h = _block(g, h, stage.first, None, strides[name])
        if stage.rest is not None:
            for i in range(_stacked(stage.rest)):
                h = _block(g, h, stage.rest, i, None)
    features = g.op("ReduceMean", [h], "features", axes=[2, 3, 4], keepdims=0)
    if output == "features":
        return features
    return _linear(g, features, model.fc, "fc")


def _stacked(module: nnx.Module) -> int:
    """How many blocks a stacked module holds: the leading axis of its parameters."""
    for _, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        return int(np.shape(var[...])[0])
    raise VMZError("a stacked stage without parameters")


def _c3d(g: _Graph, x: str, model: C3D, output: str) -> str:
    h = x
    for i, group in enumerate(C3D_GROUPS, start=1):
        for name in group:
            h = _conv(g, h, getattr(model, name), None, relu=True)
        window = [1, 2, 2] if i == 1 else [2, 2, 2]
        h = g.op("MaxPool", [h], "pool", kernel_shape=window, strides=window)
    # NCDHW flattens in Caffe2's (C, T, H, W) order, which fc6's rows follow.
    flat = g.op("Flatten", [h], "flat", axis=1)
    h = g.op("Relu", [_linear(g, flat, model.fc6, "fc6")], "relu")
    features = g.op("Relu", [_linear(g, h, model.fc7, "fc7")], "features")
    if output == "features":
        return features
    return _linear(g, features, model.fc, "fc")


def build_onnx(
    model: nnx.Module,
    output: str,
    frames: int | None,
    height: int | None,
    width: int | None,
    *,
    doc: str = "",
    metadata: dict[str, str] | None = None,
) -> Any:
    """The ONNX `ModelProto` of `model` (float32, eval mode) computing `output` ("logits",
    "features" or "probabilities") from NTHWC clips; None sizes are dynamic."""
    onnx = _onnx()
    if output not in ("logits", "features", "probabilities"):
        raise VMZError(f"ONNX export: unknown output {output!r} (logits, features, probabilities)")
    g = _Graph(onnx)
    x = g.op("Transpose", ["clips"], "ncdhw", perm=[0, 4, 1, 2, 3])
    head = "features" if output == "features" else "logits"
    if isinstance(model, VideoResNet):
        y = _resnet(g, x, model, head, frames)
    elif isinstance(model, C3D):
        y = _c3d(g, x, model, head)
    else:
        raise VMZError(f"ONNX export does not know {type(model).__name__}")
    if output == "probabilities":
        y = g.op("Softmax", [y], "probabilities", axis=-1)
    # the last node's output is the graph's output, named after it
    g.nodes[-1].output[0] = output
    y_dim = int(model.fc.out_features) if output != "features" else int(model.fc.in_features)
    dims = ["batch", frames or "frames", height or "height", width or "width", 3]
    graph = onnx.helper.make_graph(
        g.nodes,
        f"vmz_{getattr(model, 'arch', 'model')}",
        [onnx.helper.make_tensor_value_info("clips", onnx.TensorProto.FLOAT, dims)],
        [onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, ["batch", y_dim])],
        g.inits,
    )
    proto = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)], producer_name="vmz-jax", doc_string=doc
    )
    proto.ir_version = 8  # readable by every onnxruntime since 1.14
    if metadata:
        onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    return proto
