"""Tests of the pure-PyTorch VMZ reference (vmz_jax/reference/vmz_torch.py) against the spec.

Big models are built on the ``meta`` device wherever only structure or shapes matter, so the
whole file runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vmz_jax.reference.vmz_torch import (
    ARCHS,
    C3D,
    BasicBlock,
    Bottleneck,
    VideoResNet,
    build,
    randomize_,
    two_plus_one_mid_channels,
)

RESNET_KEYS = ["stem", "layer1", "layer2", "layer3", "layer4", "features", "logits"]
LAYERS = ["layer1", "layer2", "layer3", "layer4"]
C3D_KEYS = ["pool1", "pool2", "pool3", "pool4", "pool5", "features", "logits"]


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """The inputs here are tiny: intra-op threads only add overhead (and stall on a busy box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def meta_model(arch: str, **kwargs: int) -> nn.Module:
    with torch.device("meta"):
        return build(arch, **kwargs).eval()


def meta_stages(arch: str, shape: tuple[int, ...], **kwargs: int) -> dict[str, tuple[int, ...]]:
    """Activation shapes (without the batch axis) computed on the meta device: no arithmetic."""
    model = meta_model(arch, **kwargs)
    with torch.device("meta"):
        out = model.forward_stages(torch.empty(shape))
    return {key: tuple(value.shape[1:]) for key, value in out.items()}


def random_model(arch: str, seed: int = 0, **kwargs: int) -> nn.Module:
    """A CPU model with seeded random weights, skipping torch's (slow) default init."""
    model = meta_model(arch, **kwargs).to_empty(device="cpu")
    return randomize_(model, seed).eval()


def modules_of(model: nn.Module, kind: type[nn.Module]) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


def test_arch_list() -> None:
    assert len(ARCHS) == 35 == len(set(ARCHS))
    for depth in (10, 16, 18, 26, 34, 50, 101, 152):
        assert f"r2plus1d_{depth}" in ARCHS and f"r3d_{depth}" in ARCHS
    for depth in (26, 50, 101, 152):
        assert f"ir_csn_{depth}" in ARCHS and f"ip_csn_{depth}" in ARCHS
    for level in (2, 3, 4, 5):
        assert f"mc{level}_18" in ARCHS and f"rmc{level}_18" in ARCHS
    assert {"r2d_18", "r2df_18", "c3d"} <= set(ARCHS)
    with pytest.raises(ValueError, match="unknown arch"):
        build("r2plus1d_17")


# ------------------------------------------------------------------------------------------
# Parameter totals and Caffe2 blob counts (spec table, 400 classes)
# ------------------------------------------------------------------------------------------

# arch: (nn.Parameters incl. BN affine, Caffe2 "params" column, Caffe2 blobs in the .pkl)
SPEC_TOTALS = {
    "r2plus1d_34": (63_697_175, 63_646_487, 347),
    "r2plus1d_152": (118_226_785, 118_021_015, 1032),
    "ir_csn_152": (29_703_568, 29_551_744, 777),
    "ip_csn_152": (33_016_592, 32_840_832, 1027),
}


@pytest.mark.parametrize("arch", sorted(SPEC_TOTALS))
def test_parameter_totals_and_blob_count(arch: str) -> None:
    torch_total, caffe2_total, blobs = SPEC_TOTALS[arch]
    model = meta_model(arch, num_classes=400)
    convs = modules_of(model, nn.Conv3d)
    bns = modules_of(model, nn.BatchNorm3d)
    (fc,) = modules_of(model, nn.Linear)

    assert sum(p.numel() for p in model.parameters()) == torch_total
    weights = sum(m.weight.numel() for m in convs) + fc.weight.numel()
    # The spec's "Caffe2 params" column equals conv + FC weights; the FC bias (400 values) is
    # NOT included, although the spec's prose says it is.
    assert weights == caffe2_total
    assert weights + fc.bias.numel() == caffe2_total + 400
    # Caffe2 blobs: one `_w` per conv, `_s/_b/_rm/_riv` per BN, `_w/_b` for the classifier.
    assert len(convs) + 4 * len(bns) + 2 == blobs


# ------------------------------------------------------------------------------------------
# (2+1)D middle widths
# ------------------------------------------------------------------------------------------


def test_two_plus_one_formula() -> None:
    assert two_plus_one_mid_channels(64, 64) == 144
    assert two_plus_one_mid_channels(64, 128) == 230
    assert two_plus_one_mid_channels(128, 128) == 288
    assert two_plus_one_mid_channels(512, 512) == 1152


def test_r2plus1d_34_mid_widths() -> None:
    model = meta_model("r2plus1d_34")
    assert model.stem[0].out_channels == 45 and model.stem[3].out_channels == 64
    expected = {
        "layer1": [[144, 144]] * 3,
        "layer2": [[230, 288]] + [[288, 288]] * 3,
        "layer3": [[460, 576]] + [[576, 576]] * 5,
        "layer4": [[921, 1152]] + [[1152, 1152]] * 2,
    }
    for name, blocks in expected.items():
        layer = getattr(model, name)
        assert len(layer) == len(blocks)
        for block, mids in zip(layer, blocks, strict=True):
            assert isinstance(block, BasicBlock)
            got = [conv[0][0].out_channels for conv in (block.conv1, block.conv2)]
            assert got == mids, (name, got)
            # temporal conv takes the mid width in
            assert [conv[0][3].in_channels for conv in (block.conv1, block.conv2)] == mids


def test_r2plus1d_152_mid_widths() -> None:
    model = meta_model("r2plus1d_152")
    for name, mid, blocks in zip(
        ["layer1", "layer2", "layer3", "layer4"], [144, 288, 576, 1152], [3, 8, 36, 3], strict=True
    ):
        layer = getattr(model, name)
        assert len(layer) == blocks
        for block in layer:
            assert isinstance(block, Bottleneck)
            spatial, _, _, temporal = block.conv2[0]
            assert spatial.out_channels == mid == temporal.in_channels
            assert spatial.kernel_size == (1, 3, 3) and temporal.kernel_size == (3, 1, 1)


# ------------------------------------------------------------------------------------------
# Structure
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["r2plus1d_26", "r3d_26", "ir_csn_26", "ip_csn_26"])
def test_depth_26_is_bottleneck_with_shallow_widths(arch: str) -> None:
    model = meta_model(arch)
    for name, width in zip(LAYERS, [64, 128, 256, 512], strict=True):
        layer = getattr(model, name)
        assert len(layer) == 2
        for block in layer:
            assert isinstance(block, Bottleneck)
            assert block.conv1[0].out_channels == width == block.conv3[0].out_channels
    assert model.layer1[0].downsample is None  # 64 -> 64, stride 1: identity shortcut
    assert model.fc.in_features == 512


@pytest.mark.parametrize(
    ("arch", "shortcuts"),
    [
        ("r2plus1d_34", ["layer2", "layer3", "layer4"]),
        ("r3d_18", ["layer2", "layer3", "layer4"]),
        ("r2plus1d_152", ["layer1", "layer2", "layer3", "layer4"]),
        ("ir_csn_50", ["layer1", "layer2", "layer3", "layer4"]),
    ],
)
def test_shortcut_positions(arch: str, shortcuts: list[str]) -> None:
    model = meta_model(arch)
    found = [
        f"layer{i}.{b}"
        for i in (1, 2, 3, 4)
        for b, block in enumerate(getattr(model, f"layer{i}"))
        if block.downsample is not None
    ]
    assert found == [f"{name}.0" for name in shortcuts]


@pytest.mark.parametrize("arch", ARCHS)
def test_bn_conv_fc_conventions(arch: str) -> None:
    model = meta_model(arch)
    bns = modules_of(model, nn.BatchNorm3d)
    assert bns and all(bn.eps == 1e-3 and bn.momentum == 0.1 for bn in bns)
    assert all(conv.bias is None for conv in modules_of(model, nn.Conv3d))
    assert all(fc.bias is not None for fc in modules_of(model, nn.Linear))
    assert len(modules_of(model, nn.Conv3d)) == len(bns)  # one BN per conv


def test_mixed_convolution_stage_kinds() -> None:
    for level in (2, 3, 4, 5):
        mc, rmc = meta_model(f"mc{level}_18"), meta_model(f"rmc{level}_18")
        assert mc.stem[0].kernel_size == (3, 7, 7) and mc.stem[0].padding == (1, 3, 3)
        assert rmc.stem[0].kernel_size == (1, 7, 7) and rmc.stem[0].padding == (0, 3, 3)
        for stage in (1, 2, 3, 4):
            for model, is_3d in ((mc, stage < level - 1), (rmc, stage >= level - 1)):
                for block in getattr(model, f"layer{stage}"):
                    for conv in (block.conv1[0], block.conv2[0]):
                        assert conv.kernel_size == ((3, 3, 3) if is_3d else (1, 3, 3))
                        assert conv.padding == ((1, 1, 1) if is_3d else (0, 1, 1))
                if stage > 1:
                    stride = (2, 2, 2) if is_3d else (1, 2, 2)
                    block0 = getattr(model, f"layer{stage}")[0]
                    assert block0.conv1[0].stride == stride
                    assert block0.downsample[0].stride == stride


def test_r2d_and_r2df_stems() -> None:
    r2d = meta_model("r2d_18", clip_length=16)
    assert r2d.stem[0].kernel_size == (16, 7, 7) and r2d.stem[0].padding == (0, 3, 3)
    assert meta_model("r2df_18", clip_length=16).stem[0].kernel_size == (1, 7, 7)
    for model in (r2d, meta_model("r2df_18")):
        for conv in modules_of(model, nn.Conv3d):
            assert conv.kernel_size[0] == 1 or conv is model.stem[0]
    shapes = meta_stages("r2d_18", (1, 3, 16, 112, 112), clip_length=16)
    assert shapes["stem"] == (64, 1, 56, 56) and shapes["layer4"] == (512, 1, 7, 7)
    shapes = meta_stages("r2df_18", (1, 3, 16, 112, 112))
    assert shapes["stem"] == (64, 16, 56, 56) and shapes["layer4"] == (512, 16, 7, 7)


def test_csn_middle_convs() -> None:
    ir, ip = meta_model("ir_csn_152"), meta_model("ip_csn_152")
    for name, width in zip(LAYERS, [64, 128, 256, 512], strict=True):
        pairs = zip(getattr(ir, name), getattr(ip, name), strict=True)
        for b, (ir_block, ip_block) in enumerate(pairs):
            stride = (2, 2, 2) if b == 0 and name != "layer1" else (1, 1, 1)
            depthwise = ir_block.conv2[0]
            assert isinstance(depthwise, nn.Conv3d)
            assert depthwise.groups == width and depthwise.kernel_size == (3, 3, 3)
            assert depthwise.stride == stride and depthwise.padding == (1, 1, 1)
            pointwise, bn, depthwise = ip_block.conv2[0]  # no ReLU in between
            assert pointwise.kernel_size == (1, 1, 1) and pointwise.groups == 1
            assert isinstance(bn, nn.BatchNorm3d) and bn.num_features == width
            assert depthwise.groups == width and depthwise.stride == stride
    assert isinstance(ir.stem[3], nn.MaxPool3d)


# ------------------------------------------------------------------------------------------
# state_dict keys
# ------------------------------------------------------------------------------------------

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
KEY_SPOT_CHECKS = {
    "r2plus1d_34": [
        ("stem.0.weight", (45, 3, 1, 7, 7)),
        ("stem.1.running_var", (45,)),
        ("stem.3.weight", (64, 45, 3, 1, 1)),
        ("stem.4.weight", (64,)),
        ("layer1.0.conv1.0.0.weight", (144, 64, 1, 3, 3)),
        ("layer1.0.conv1.0.1.running_mean", (144,)),
        ("layer1.0.conv1.0.3.weight", (64, 144, 3, 1, 1)),
        ("layer1.0.conv1.1.weight", (64,)),
        ("layer2.0.conv1.0.0.weight", (230, 64, 1, 3, 3)),
        ("layer2.0.conv2.0.0.weight", (288, 128, 1, 3, 3)),
        ("layer2.0.downsample.0.weight", (128, 64, 1, 1, 1)),
        ("layer2.0.downsample.1.bias", (128,)),
        ("layer4.2.conv2.0.3.weight", (512, 1152, 3, 1, 1)),
        ("fc.weight", (400, 512)),
        ("fc.bias", (400,)),
    ],
    "r2plus1d_152": [
        ("layer1.0.conv1.0.weight", (64, 64, 1, 1, 1)),
        ("layer1.0.conv2.0.0.weight", (144, 64, 1, 3, 3)),
        ("layer1.0.conv2.0.1.running_var", (144,)),
        ("layer1.0.conv2.0.3.weight", (64, 144, 3, 1, 1)),
        ("layer1.0.conv3.0.weight", (256, 64, 1, 1, 1)),
        ("layer1.0.conv3.1.weight", (256,)),
        ("layer1.0.downsample.0.weight", (256, 64, 1, 1, 1)),
        ("layer3.35.conv2.1.bias", (256,)),
        ("fc.weight", (400, 2048)),
    ],
    "ir_csn_152": [
        ("stem.0.weight", (64, 3, 3, 7, 7)),
        ("stem.1.weight", (64,)),
        ("layer1.0.conv2.0.weight", (64, 1, 3, 3, 3)),
        ("layer1.0.conv2.1.running_mean", (64,)),
        ("layer4.2.conv3.0.weight", (2048, 512, 1, 1, 1)),
        ("layer4.0.downsample.0.weight", (2048, 1024, 1, 1, 1)),
    ],
    "ip_csn_152": [
        ("layer2.0.conv2.0.0.weight", (128, 128, 1, 1, 1)),
        ("layer2.0.conv2.0.1.running_var", (128,)),
        ("layer2.0.conv2.0.2.weight", (128, 1, 3, 3, 3)),
        ("layer2.0.conv2.1.weight", (128,)),
    ],
    "r3d_18": [
        ("stem.0.weight", (64, 3, 3, 7, 7)),
        ("layer1.0.conv1.0.weight", (64, 64, 3, 3, 3)),
        ("layer1.1.conv2.1.num_batches_tracked", ()),
        ("layer3.0.downsample.0.weight", (256, 128, 1, 1, 1)),
    ],
    "mc3_18": [
        ("layer1.0.conv1.0.weight", (64, 64, 3, 3, 3)),
        ("layer2.0.conv1.0.weight", (128, 64, 1, 3, 3)),
    ],
    "c3d": [
        ("conv1a.0.weight", (64, 3, 3, 3, 3)),
        ("conv1a.1.running_var", (64,)),
        ("conv3b.0.weight", (256, 256, 3, 3, 3)),
        ("conv5b.1.weight", (512,)),
        ("fc6.weight", (4096, 4608)),
        ("fc6.bias", (4096,)),
        ("fc7.weight", (4096, 4096)),
        ("fc.weight", (400, 4096)),
        ("fc.bias", (400,)),
    ],
}


@pytest.mark.parametrize("arch", sorted(KEY_SPOT_CHECKS))
def test_state_dict_keys(arch: str) -> None:
    state = meta_model(arch).state_dict()
    for key, shape in KEY_SPOT_CHECKS[arch]:
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    # every BN has its five entries; every bias belongs to a BN or a Linear
    bn_prefixes = {k[: -len(".running_mean")] for k in state if k.endswith(".running_mean")}
    for prefix in bn_prefixes:
        assert all(f"{prefix}.{name}" in state for name in BN)
    linear_prefixes = {"fc", "fc6", "fc7"}
    for key in state:
        if key.endswith(".bias"):
            assert key[: -len(".bias")] in bn_prefixes | linear_prefixes, key
    assert not any("pool" in key or "dropout" in key for key in state)


def test_r2plus1d_34_key_count() -> None:
    state = meta_model("r2plus1d_34").state_dict()
    # one Caffe2 blob per conv weight, four per BN, two for the classifier; torch has one
    # more entry per BN (num_batches_tracked)
    convs = [k for k, v in state.items() if k.endswith(".weight") and v.dim() == 5]
    bns = [k for k in state if k.endswith(".running_var")]
    assert len(convs) + 4 * len(bns) + 2 == 347
    assert len(state) == len(convs) + 5 * len(bns) + 2


# ------------------------------------------------------------------------------------------
# Activation shapes and the short-clip temporal-stride rule
# ------------------------------------------------------------------------------------------


def test_spec_shapes_r2plus1d() -> None:
    shapes = meta_stages("r2plus1d_18", (1, 3, 32, 112, 112))
    assert shapes == {
        "stem": (64, 32, 56, 56),
        "layer1": (64, 32, 56, 56),
        "layer2": (128, 16, 28, 28),
        "layer3": (256, 8, 14, 14),
        "layer4": (512, 4, 7, 7),
        "features": (512,),
        "logits": (400,),
    }
    shapes = meta_stages("r2plus1d_34", (1, 3, 8, 112, 112))
    assert shapes["layer4"] == (512, 1, 7, 7)


def test_spec_shapes_csn() -> None:
    shapes = meta_stages("ir_csn_152", (1, 3, 32, 224, 224))
    assert shapes == {
        "stem": (64, 32, 56, 56),  # conv1 64x32x112x112 then pool1
        "layer1": (256, 32, 56, 56),
        "layer2": (512, 16, 28, 28),
        "layer3": (1024, 8, 14, 14),
        "layer4": (2048, 4, 7, 7),
        "features": (2048,),
        "logits": (400,),
    }


def test_small_shapes_computed() -> None:
    x = torch.randn(1, 3, 8, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        r2p1 = random_model("r2plus1d_18").forward_stages(x)
        csn = random_model("ir_csn_26").forward_stages(x)
    assert {k: tuple(v.shape[1:]) for k, v in r2p1.items()} == {
        "stem": (64, 8, 16, 16),
        "layer1": (64, 8, 16, 16),
        "layer2": (128, 4, 8, 8),
        "layer3": (256, 2, 4, 4),
        "layer4": (512, 1, 2, 2),
        "features": (512,),
        "logits": (400,),
    }
    assert {k: tuple(v.shape[1:]) for k, v in csn.items()} == {
        "stem": (64, 8, 8, 8),
        "layer1": (64, 8, 8, 8),
        "layer2": (128, 4, 4, 4),
        "layer3": (256, 2, 2, 2),
        "layer4": (512, 1, 1, 1),
        "features": (512,),
        "logits": (400,),
    }


@pytest.mark.parametrize(
    ("arch", "frames", "time_after_layer2_3_4"),
    [
        ("r3d_18", 16, (8, 4, 2)),
        ("r3d_18", 8, (4, 2, 1)),
        ("r3d_18", 6, (3, 2, 2)),  # T < 8: layer4 keeps time (it would be 1 otherwise)
        ("r3d_18", 4, (2, 1, 1)),  # T < 8 again, but a 1-frame map cannot shrink anyway
        ("r3d_18", 3, (2, 2, 2)),  # T < 4: layer3 and layer4 keep time
        ("r2plus1d_18", 6, (3, 2, 2)),
        ("r2plus1d_50", 3, (2, 2, 2)),
        ("ir_csn_50", 6, (3, 2, 2)),
        ("ip_csn_26", 3, (2, 2, 2)),
        ("rmc2_18", 6, (3, 2, 1)),  # the rule is create_r3d's only: rMCx strides as usual
        ("rmc2_18", 3, (2, 1, 1)),
        ("mc5_18", 3, (2, 1, 1)),
    ],
)
def test_short_clip_rule(arch: str, frames: int, time_after_layer2_3_4: tuple[int, ...]) -> None:
    shapes = meta_stages(arch, (1, 3, frames, 32, 32))
    assert tuple(shapes[name][1] for name in ("layer2", "layer3", "layer4")) == (
        time_after_layer2_3_4
    )
    # space is unaffected: 32 -> 16 (stem, CSN: -> 8 by the pool) -> 8 -> 4 -> 2 (CSN: 1)
    assert shapes["layer4"][2:] == ((1, 1) if "csn" in arch else (2, 2))


def test_short_clip_rule_on_cpu() -> None:
    """The rule also holds with real arithmetic (shortcut and main path must agree)."""
    model = random_model("r2plus1d_10", num_classes=5)
    with torch.inference_mode():
        out = model.forward_stages(torch.randn(2, 3, 3, 16, 16))
    assert out["layer3"].shape == (2, 256, 2, 2, 2)
    assert out["layer4"].shape == (2, 512, 2, 1, 1)
    assert out["logits"].shape == (2, 5)


# ------------------------------------------------------------------------------------------
# Forward on CPU for every arch
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_every_arch(arch: str) -> None:
    model = random_model(arch, seed=3, num_classes=7)
    # C3D only accepts 16x112x112 and is costly there: a single clip
    shape = (1, 3, 16, 112, 112) if arch == "c3d" else (2, 3, 8, 16, 16)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        stages = model.forward_stages(x)
        logits = model(x)
    assert list(stages) == (C3D_KEYS if arch == "c3d" else RESNET_KEYS)
    assert logits.shape == (shape[0], 7)
    torch.testing.assert_close(logits, stages["logits"], rtol=0, atol=0)
    features = stages["features"]
    assert features.shape == (shape[0], model.fc.in_features)
    if arch != "c3d":
        torch.testing.assert_close(features, stages["layer4"].mean(dim=(2, 3, 4)))
    for key, value in stages.items():
        assert torch.isfinite(value).all(), key
        # randomize_ keeps activations O(1) even through 152 layers
        assert 0.05 < value.std().item() < 20.0, (key, value.std().item())
    if shape[0] > 1:  # the clips of a batch are processed independently
        with torch.inference_mode():
            single = model(x[1:])
        torch.testing.assert_close(single, logits[1:], rtol=1e-4, atol=1e-4)


def test_c3d_shapes_and_input_check() -> None:
    shapes = meta_stages("c3d", (1, 3, 16, 112, 112))
    assert shapes == {
        "pool1": (64, 16, 56, 56),
        "pool2": (128, 8, 28, 28),
        "pool3": (256, 4, 14, 14),
        "pool4": (512, 2, 7, 7),
        "pool5": (512, 1, 3, 3),
        "features": (4096,),
        "logits": (400,),
    }
    for bad in [(1, 3, 8, 112, 112), (1, 3, 16, 128, 128), (1, 3, 32, 112, 112)]:
        with pytest.raises(ValueError, match="pool5"):
            meta_stages("c3d", bad)
    assert isinstance(build("c3d", num_classes=3), C3D)


# ------------------------------------------------------------------------------------------
# randomize_ and a hand-written functional check of the building blocks
# ------------------------------------------------------------------------------------------


def test_randomize_is_seeded_and_in_range() -> None:
    a = random_model("ip_csn_26", seed=11).state_dict()
    b = random_model("ip_csn_26", seed=11).state_dict()
    c = random_model("ip_csn_26", seed=12).state_dict()
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert not torch.equal(a["fc.weight"], c["fc.weight"])

    model = random_model("r3d_34", seed=5)
    blocks = modules_of(model, BasicBlock)
    residual_bns = {id(block.residual_bn) for block in blocks}
    scale = 1 / math.sqrt(len(blocks))
    for bn in modules_of(model, nn.BatchNorm3d):
        low, high = (0.5 * scale, 1.5 * scale) if id(bn) in residual_bns else (0.5, 1.5)
        assert low <= bn.weight.min() and bn.weight.max() <= high
        assert 0.5 <= bn.running_var.min() and bn.running_var.max() <= 1.5
        assert bn.num_batches_tracked.item() == 0
    conv = model.layer3[1].conv1[0]
    expected_std = math.sqrt(2 / (256 * 27))
    assert abs(conv.weight.std().item() / expected_std - 1) < 0.02


def _bn_eval(x: Tensor, bn: nn.BatchNorm3d) -> Tensor:
    shape = (1, -1, 1, 1, 1)
    inv = (bn.running_var + 1e-3).rsqrt() * bn.weight
    return (x - bn.running_mean.view(shape)) * inv.view(shape) + bn.bias.view(shape)


def test_blocks_match_functional_formulas() -> None:
    """Recompute r2plus1d_10's stem and layer4 (T < 8: no temporal stride) by hand."""
    model = random_model("r2plus1d_10", seed=7)
    x = torch.randn(1, 3, 4, 16, 16, generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        out = model.forward_stages(x)

        def conv(h: Tensor, m: nn.Conv3d, stride: tuple[int, int, int]) -> Tensor:
            return F.conv3d(h, m.weight, None, stride, m.padding)

        s = model.stem
        h = F.relu(_bn_eval(conv(x, s[0], (1, 2, 2)), s[1]))
        h = F.relu(_bn_eval(conv(h, s[3], (1, 1, 1)), s[4]))
        torch.testing.assert_close(out["stem"], h, rtol=1e-5, atol=1e-5)

        block = model.layer4[0]

        def two_plus_one(h: Tensor, seq: nn.Module, spatial: int, temporal: int) -> Tensor:
            h = F.relu(_bn_eval(conv(h, seq[0], (1, spatial, spatial)), seq[1]))
            return conv(h, seq[3], (temporal, 1, 1))

        h_in = out["layer3"]
        h = F.relu(_bn_eval(two_plus_one(h_in, block.conv1[0], 2, 1), block.conv1[1]))
        h = _bn_eval(two_plus_one(h, block.conv2[0], 1, 1), block.conv2[1])
        shortcut = _bn_eval(conv(h_in, block.downsample[0], (1, 2, 2)), block.downsample[1])
        expected = F.relu(h + shortcut)
        torch.testing.assert_close(out["layer4"], expected, rtol=1e-5, atol=1e-5)
        logits = expected.mean(dim=(2, 3, 4)) @ model.fc.weight.T + model.fc.bias
        torch.testing.assert_close(out["logits"], logits, rtol=1e-5, atol=1e-5)


def test_ip_csn_middle_has_no_relu() -> None:
    model = random_model("ip_csn_26", seed=2)
    middle = model.layer1[0].conv2[0]
    x = torch.randn(1, 64, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        bn_out = _bn_eval(F.conv3d(x, middle[0].weight), middle[1])
        assert (bn_out < 0).any()  # a ReLU here would change the result
        expected = F.conv3d(bn_out, middle[2].weight, None, 1, 1, 1, 64)
        torch.testing.assert_close(middle(x), expected, rtol=1e-5, atol=1e-5)


def test_plain_cpu_build() -> None:
    """build() without the meta-device shortcut used elsewhere in this file."""
    model = build("r2plus1d_10", num_classes=3)
    assert isinstance(model, VideoResNet) and model.feature_dim == 512
    assert next(model.parameters()).device.type == "cpu"
    randomize_(model, 0).eval()
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 4, 16, 16)).shape == (1, 3)
