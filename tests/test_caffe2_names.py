"""Caffe2 `.pkl` blob names: spot checks against the spec and Caffe2's builders, a complete and
collision-free layout for every architecture, strict error reports, and parity through a real pickle
against the PyTorch reference (and bit-identity with the `.pth` route)."""

import functools
import re

import numpy as np
import pytest
from flax import nnx

from porting import keymap
from porting.caffe2_names import (
    caffe2_name_fn,
    caffe2_to_params,
    clip_length_from_blobs,
    is_training_state,
    num_classes_from_blobs,
    params_to_caffe2,
)
from porting.readers import read_weights, write_caffe2_pkl, write_pth_zip
from porting.torch_names import torch_to_params
from tests.parity import jax_stage_outputs, relative_error, torch_stage_outputs, torch_state_dict
from vmz_jax.errors import CheckpointError
from vmz_jax.models import VIDEO_ARCHS as ARCHS
from vmz_jax.models import build
from vmz_jax.models.specs import RESNET_SPECS
from vmz_jax.models.variables import abstract_shapes, set_variables, variable_shapes
from vmz_jax.reference import vmz_torch

RESNETS = [a for a in ARCHS if a != "c3d"]
# C3D's file (380 MB of fc6/fc7 through a protocol-2 pickle) runs in the slow set.
PARITY_FAST = ["r2plus1d_18", "ir_csn_26", "ip_csn_50", "r3d_10", "mc4_18", "rmc3_18", "r2d_18",
               "r2df_18"]
PARITY_SLOW = [a for a in ARCHS if a not in PARITY_FAST]

_BN = r"_(s|b|rm|riv)"
RESNET_GRAMMAR = re.compile(
    rf"conv1(_middle)?_w|conv1(_middle)?_spatbn_relu{_BN}"
    rf"|comp_\d+_conv_\d(_middle)?_w|comp_\d+_spatbn_\d(_middle)?{_BN}"
    rf"|shortcut_projection_\d+_w|shortcut_projection_\d+_spatbn{_BN}|last_out_L\d+_[wb]")
C3D_GRAMMAR = re.compile(rf"conv[1-5][ab]_w|conv[1-5][ab]_bn{_BN}|fc[67]_[wb]|last_out_L\d+_[wb]")


def shapes(arch, num_classes=400, clip_length=8):
    return _shapes(arch, num_classes, clip_length)


def blob_shapes(arch, num_classes=400, clip_length=8):
    """Caffe2 name -> Caffe2 shape of every blob of `arch`."""
    return _blob_shapes(arch, num_classes, clip_length)


@functools.cache  # called with every argument, so that one key means one model
def _shapes(arch, num_classes, clip_length):
    return abstract_shapes(arch, num_classes, clip_length)


@functools.cache
def _blob_shapes(arch, num_classes, clip_length):
    slots = keymap.layout(shapes(arch, num_classes, clip_length), caffe2_name_fn(arch, num_classes))
    return {name: slot.external_shape for name, slot in slots.items()}


def bn_of(conv):
    """The BatchNorm that follows a conv weight, by Caffe2's naming."""
    if conv in ("conv1_w", "conv1_middle_w"):
        return conv[:-2] + "_spatbn_relu"
    if conv.startswith("shortcut_projection_"):
        return conv[:-2] + "_spatbn"
    if conv.startswith("comp_"):
        return re.sub(r"_conv_(\d)", r"_spatbn_\1", conv[:-2])
    return conv[:-2] + "_bn"  # C3D


def num_arrays(ours):
    """How many unstacked arrays a flat tree holds (stacked `rest` paths count once per block)."""
    return sum(shape[0] if len(path) > 1 and path[1] == "rest" else 1 for path, shape in ours.items())


def random_params(ours, seed=0):
    rng = np.random.default_rng(seed)
    return {path: rng.standard_normal(shape, np.float32) for path, shape in ours.items()}


def tiny(ours):
    """The same tree with every dimension shrunk (stacking axes kept): same names, little data."""
    def shrink(path, shape):
        stacked = len(path) > 1 and path[1] == "rest"
        body = shape[1:] if stacked else shape
        body = tuple(min(d, 2 + axis) for axis, d in enumerate(body))
        return (shape[0], *body) if stacked else body
    return {path: shrink(path, shape) for path, shape in ours.items()}


def assert_bit_identical(got, want):
    assert got.keys() == want.keys()
    for path in want:
        assert got[path].dtype == want[path].dtype == np.float32, path
        assert got[path].shape == want[path].shape, path
        assert got[path].tobytes() == want[path].tobytes(), path


# --------------------------------------------------------------------------------------------
# names against the spec


def test_r2plus1d_34_names():
    blobs = blob_shapes("r2plus1d_34")
    assert len(blobs) == 347
    expected = {
        "conv1_middle_w": (45, 3, 1, 7, 7),
        "conv1_middle_spatbn_relu_s": (45,),
        "conv1_middle_spatbn_relu_riv": (45,),
        "conv1_w": (64, 45, 3, 1, 1),
        "conv1_spatbn_relu_rm": (64,),
        "comp_0_conv_1_middle_w": (144, 64, 1, 3, 3),
        "comp_0_spatbn_1_middle_b": (144,),
        "comp_0_conv_1_w": (64, 144, 3, 1, 1),
        "comp_0_spatbn_1_s": (64,),
        "comp_0_conv_2_middle_w": (144, 64, 1, 3, 3),
        "comp_0_spatbn_2_riv": (64,),
        # layer2 block 0: the (2+1)D width is per conv (230 for 64 -> 128, 288 for 128 -> 128)
        "comp_3_conv_1_middle_w": (230, 64, 1, 3, 3),
        "comp_3_conv_1_w": (128, 230, 3, 1, 1),
        "comp_3_conv_2_middle_w": (288, 128, 1, 3, 3),
        "shortcut_projection_3_w": (128, 64, 1, 1, 1),
        "shortcut_projection_3_spatbn_b": (128,),
        "shortcut_projection_7_w": (256, 128, 1, 1, 1),
        "shortcut_projection_13_w": (512, 256, 1, 1, 1),
        "comp_15_conv_2_w": (512, 1152, 3, 1, 1),
        "comp_15_spatbn_2_riv": (512,),
        "last_out_L400_w": (400, 512),
        "last_out_L400_b": (400,),
    }
    assert {name: blobs.get(name) for name in expected} == expected
    for absent in ["shortcut_projection_0_w", "comp_16_conv_1_w", "comp_0_conv_3_w", "fc_w"]:
        assert absent not in blobs


def test_ir_csn_152_names():
    # Caffe2's channel-wise conv bumps the conv counter twice: middle conv _3, last 1x1x1 _4
    blobs = blob_shapes("ir_csn_152")
    assert len(blobs) == 777
    expected = {
        "conv1_w": (64, 3, 3, 7, 7),
        "conv1_spatbn_relu_b": (64,),
        "comp_0_conv_1_w": (64, 64, 1, 1, 1),
        "comp_0_spatbn_1_s": (64,),
        "comp_0_conv_3_w": (64, 1, 3, 3, 3),
        "comp_0_spatbn_3_riv": (64,),
        "comp_0_conv_4_w": (256, 64, 1, 1, 1),
        "comp_0_spatbn_4_rm": (256,),
        "shortcut_projection_0_w": (256, 64, 1, 1, 1),
        "comp_11_conv_3_w": (256, 1, 3, 3, 3),
        "shortcut_projection_47_w": (2048, 1024, 1, 1, 1),
        "comp_49_conv_4_w": (2048, 512, 1, 1, 1),
        "last_out_L400_w": (400, 2048),
    }
    assert {name: blobs.get(name) for name in expected} == expected
    for absent in ["comp_0_conv_2_w", "comp_0_spatbn_2_s", "comp_0_conv_3_middle_w", "comp_50_conv_1_w",
                   "conv1_middle_w"]:
        assert absent not in blobs


def test_ip_csn_152_names():
    blobs = blob_shapes("ip_csn_152")
    assert len(blobs) == 1027
    expected = {
        "conv1_w": (64, 3, 3, 7, 7),
        "comp_0_conv_1_w": (64, 64, 1, 1, 1),
        "comp_0_conv_2_middle_w": (64, 64, 1, 1, 1),
        "comp_0_spatbn_2_middle_s": (64,),
        "comp_0_conv_2_w": (64, 1, 3, 3, 3),
        "comp_0_spatbn_2_b": (64,),
        "comp_0_conv_3_w": (256, 64, 1, 1, 1),
        "comp_0_spatbn_3_riv": (256,),
        "comp_3_conv_2_middle_w": (128, 128, 1, 1, 1),
        "comp_49_conv_2_w": (512, 1, 3, 3, 3),
        "last_out_L400_b": (400,),
    }
    assert {name: blobs.get(name) for name in expected} == expected
    assert "comp_0_conv_4_w" not in blobs


def test_r3d_18_names():
    blobs = blob_shapes("r3d_18")
    expected = {
        "conv1_w": (64, 3, 3, 7, 7),
        "conv1_spatbn_relu_s": (64,),
        "comp_0_conv_1_w": (64, 64, 3, 3, 3),
        "comp_0_spatbn_2_riv": (64,),
        "comp_2_conv_1_w": (128, 64, 3, 3, 3),
        "shortcut_projection_2_w": (128, 64, 1, 1, 1),
        "comp_7_conv_2_w": (512, 512, 3, 3, 3),
        "last_out_L400_w": (400, 512),
    }
    assert {name: blobs.get(name) for name in expected} == expected
    assert not any("middle" in name for name in blobs)


def test_mc3_18_names():
    # 3-D stem and layer1, 2-D (1x3x3) convs above, all named comp_i_conv_j
    blobs = blob_shapes("mc3_18")
    expected = {
        "conv1_w": (64, 3, 3, 7, 7),
        "comp_1_conv_2_w": (64, 64, 3, 3, 3),
        "comp_2_conv_1_w": (128, 64, 1, 3, 3),
        "shortcut_projection_2_w": (128, 64, 1, 1, 1),
        "comp_7_conv_2_w": (512, 512, 1, 3, 3),
    }
    assert {name: blobs.get(name) for name in expected} == expected


def test_stem_kernels_of_the_2d_stems():
    assert blob_shapes("rmc3_18")["conv1_w"] == (64, 3, 1, 7, 7)
    assert blob_shapes("r2df_18")["conv1_w"] == (64, 3, 1, 7, 7)
    assert blob_shapes("r2d_18", clip_length=16)["conv1_w"] == (64, 3, 16, 7, 7)


def test_c3d_names():
    blobs = blob_shapes("c3d")
    expected = {
        "conv1a_w": (64, 3, 3, 3, 3),
        "conv1a_bn_s": (64,),
        "conv1a_bn_b": (64,),
        "conv1a_bn_rm": (64,),
        "conv1a_bn_riv": (64,),
        "conv3b_w": (256, 256, 3, 3, 3),
        "conv5b_bn_riv": (512,),
        "fc6_w": (4096, 512 * 3 * 3),
        "fc6_b": (4096,),
        "fc7_w": (4096, 4096),
        "fc7_b": (4096,),
        "last_out_L400_w": (400, 4096),
        "last_out_L400_b": (400,),
    }
    assert {name: blobs.get(name) for name in expected} == expected
    assert len(blobs) == 8 * 5 + 6


@pytest.mark.parametrize(("arch", "positions"), [
    ("r2plus1d_152", [0, 3, 11, 47]), ("ir_csn_152", [0, 3, 11, 47]), ("ip_csn_152", [0, 3, 11, 47]),
    ("r3d_152", [0, 3, 11, 47]), ("ir_csn_50", [0, 3, 7, 13]), ("ip_csn_50", [0, 3, 7, 13]),
    ("r2plus1d_50", [0, 3, 7, 13]), ("r2plus1d_34", [3, 7, 13]), ("r3d_18", [2, 4, 6]),
    ("ir_csn_26", [2, 4, 6])])
def test_shortcut_positions(arch, positions):
    blobs = blob_shapes(arch)
    found = sorted(int(m.group(1)) for name in blobs
                   if (m := re.fullmatch(r"shortcut_projection_(\d+)_w", name)))
    assert found == positions


@pytest.mark.parametrize(("arch", "count"), [("r2plus1d_34", 347), ("r2plus1d_152", 1032),
                                             ("ir_csn_152", 777), ("ip_csn_152", 1027)])
def test_blob_counts(arch, count):
    assert len(keymap.layout(shapes(arch), caffe2_name_fn(arch, 400))) == count  # abstract_shapes


def test_classifier_name_carries_the_class_count():
    assert caffe2_name_fn("r2plus1d_34", 359)("fc.kernel")[0] == "last_out_L359_w"
    assert caffe2_name_fn("c3d", 487)("fc.bias") == ("last_out_L487_b", keymap.SAME)
    assert caffe2_name_fn("c3d", 487)("fc6.kernel") == ("fc6_w", keymap.DENSE)
    assert caffe2_name_fn("ir_csn_152", 400)("layer3.35.conv2.kernel") == ("comp_46_conv_3_w", keymap.CONV)


@pytest.mark.parametrize("path", ["stem.conv.weight", "layer5.0.conv1.kernel", "layer1.3.conv1.kernel",
                                  "layer1.0.conv4.kernel", "fc8.kernel", "conv1a.kernel", "head.kernel"])
def test_unknown_paths_are_refused(path):
    with pytest.raises(KeyError, match="no Caffe2 blob name rule"):
        caffe2_name_fn("r3d_18", 400)(path)


@pytest.mark.parametrize("path", ["stem.conv.kernel", "layer1.0.conv1.kernel", "conv6a.kernel", "fc8.bias"])
def test_unknown_c3d_paths_are_refused(path):
    with pytest.raises(KeyError, match="no Caffe2 blob name rule"):
        caffe2_name_fn("c3d", 400)(path)


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="unknown architecture"):
        caffe2_name_fn("resnet50", 400)


# --------------------------------------------------------------------------------------------
# every architecture


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_is_complete_and_follows_the_grammar(arch):
    ours = shapes(arch)
    blobs = blob_shapes(arch)
    assert len(blobs) == num_arrays(ours)  # one blob per array: no two paths share a name
    grammar = C3D_GRAMMAR if arch == "c3d" else RESNET_GRAMMAR
    assert [n for n in blobs if not grammar.fullmatch(n)] == []
    assert {"last_out_L400_w", "last_out_L400_b"} <= blobs.keys()
    # BatchNorms come whole, every conv weight is 5-D and every conv has exactly one BatchNorm
    bns = {n[:-2] for n in blobs if n.endswith("_s")}
    for bn in bns:
        assert {f"{bn}_{f}" for f in ("s", "b", "rm", "riv")} <= blobs.keys()
    convs = [n for n in blobs if n.endswith("_w") and not n.startswith(("fc", "last_out"))]
    assert all(len(blobs[n]) == 5 for n in convs)
    assert sorted(bn_of(n) for n in convs) == sorted(bns)
    assert all(blobs[f"{bn_of(n)}_riv"] == blobs[n][:1] for n in convs)  # BN width = conv output
    if arch != "c3d":
        spec = RESNET_SPECS[arch]
        comps = {int(m.group(1)) for n in blobs if (m := re.match(r"comp_(\d+)_", n))}
        assert comps == set(range(sum(spec.blocks)))
        # conv weights per block: each residual conv is one weight, or two for (2+1)D and ip-CSN
        pairs = {kind: 2 if kind in ("2plus1d", "ip") else 1 for kind in spec.stage_convs}
        blocks = [kind for kind, count in zip(spec.stage_convs, spec.blocks, strict=True)
                  for _ in range(count)]
        want = [2 + pairs[kind] if spec.bottleneck else 2 * pairs[kind] for kind in blocks]
        assert [len([n for n in convs if n.startswith(f"comp_{i}_")]) for i in range(len(blocks))] == want


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_every_arch(arch):
    # shrunk arrays: the names, stack indices and transforms are what is tested here
    small = tiny(shapes(arch))
    params = random_params(small, seed=1)
    blobs = params_to_caffe2(params, arch)
    assert len(blobs) == num_arrays(small)
    assert_bit_identical(caffe2_to_params(blobs, arch, small, source=arch), params)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_every_arch_full_size(arch):
    ours = shapes(arch)
    params = random_params(ours, seed=2)
    blobs = params_to_caffe2(params, arch)
    assert {name: b.shape for name, b in blobs.items()} == blob_shapes(arch)
    assert_bit_identical(caffe2_to_params(blobs, arch, ours, source=arch), params)


# --------------------------------------------------------------------------------------------
# parity through a real file


def torch_reference(arch, num_classes, clip_length, seed=0):
    ref = vmz_torch.build(arch, num_classes=num_classes, clip_length=clip_length)
    vmz_torch.randomize_(ref, seed)
    return ref.eval()


def load_pkl(path, arch):
    """What a loader does: class count and clip length from the file, then the strict mapping."""
    blobs = read_weights(path)
    n = num_classes_from_blobs(blobs, str(path))
    clip_length = clip_length_from_blobs(blobs, arch)
    model = nnx.eval_shape(lambda: build(arch, n, clip_length=clip_length, rngs=nnx.Rngs(0)))
    params = caffe2_to_params(blobs, arch, variable_shapes(model), source=str(path))
    return model, params


def check_pkl_parity(arch, tmp_path, num_classes=11):
    clip_length = 4 if arch == "r2d_18" else 8  # r2d's clip length must come from the file
    ref = torch_reference(arch, num_classes, clip_length)
    # the .pth route
    pth, pkl = tmp_path / f"{arch}.pth", tmp_path / f"{arch}.pkl"
    write_pth_zip(pth, torch_state_dict(ref))
    via_pth = torch_to_params(read_weights(pth), shapes(arch, num_classes, clip_length), source=str(pth))
    # the same weights as a Caffe2 pickle, loaded the way a Caffe2 file is
    blobs = params_to_caffe2(via_pth, arch)
    assert {n: b.shape for n, b in blobs.items()} == blob_shapes(arch, num_classes, clip_length)
    write_caffe2_pkl(pkl, blobs)
    del blobs
    model, params = load_pkl(pkl, arch)
    expected_clip = 16 if arch == "c3d" else clip_length  # C3D takes 16-frame clips only
    assert (model.num_classes, model.clip_length) == (num_classes, expected_clip)
    assert_bit_identical(params, via_pth)
    del via_pth

    set_variables(model, params, source=str(pkl))
    model.eval()
    shape = (1, 16, 112, 112, 3) if arch == "c3d" else (1, 8, 16, 16, 3)
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    want = torch_stage_outputs(ref, x.transpose(0, 4, 1, 2, 3))["logits"]
    got = jax_stage_outputs(model, x)["logits"]
    assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize("arch", PARITY_FAST)
def test_pkl_parity(arch, tmp_path):
    check_pkl_parity(arch, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("arch", PARITY_SLOW)
def test_pkl_parity_all(arch, tmp_path):
    check_pkl_parity(arch, tmp_path)


@pytest.mark.parametrize("variant", ["flat", "training_state", "training_state_flat"])
def test_pkl_variants(variant, tmp_path):
    arch, n = "ir_csn_26", 7
    want = torch_to_params(torch_state_dict(torch_reference(arch, n, 8, seed=4)), shapes(arch, n))
    blobs = params_to_caffe2(want, arch)
    if variant.startswith("training_state"):
        blobs = {**blobs, **{f"{name}_momentum": np.full_like(b, np.nan) for name, b in blobs.items()},
                 "model_iter": np.array(123456, np.int64), "lr": np.array(0.01, np.float64)}
    path = tmp_path / f"{variant}.pkl"
    write_caffe2_pkl(path, blobs, flat=variant.endswith("flat"))
    assert read_weights(path).keys() == blobs.keys()
    _, params = load_pkl(path, arch)
    assert_bit_identical(params, want)


# --------------------------------------------------------------------------------------------
# errors


@functools.cache
def _valid_blobs(arch="ir_csn_26", n=5):
    return params_to_caffe2(random_params(shapes(arch, n), seed=5), arch)


def valid_blobs():
    return {name: b.copy() for name, b in _valid_blobs().items()}


def _drop_classifier(blobs):
    del blobs["last_out_L5_w"], blobs["last_out_L5_b"]


def _nan(blobs):
    blobs["comp_5_conv_1_w"][0, 0, 0, 0, 0] = np.nan


def _inf(blobs):
    blobs["comp_5_conv_1_w"][1, 0, 0, 0, 0] = -np.inf


ERRORS = {  # mutation, fragments the message must hold
    "leftover": (lambda b: b.update(comp_0_conv_9_w=np.ones((2, 2), np.float32)),
                 ["unexpected 'comp_0_conv_9_w'"]),
    "missing": (lambda b: b.pop("comp_3_spatbn_3_rm"), ["missing 'comp_3_spatbn_3_rm'"]),
    "shape": (lambda b: b.update(comp_0_conv_3_w=np.ones((64, 64, 3, 3, 3), np.float32)),
              ["'comp_0_conv_3_w' has shape (64, 64, 3, 3, 3), expected (64, 1, 3, 3, 3)"]),
    "float64": (lambda b: b.update(conv1_w=b["conv1_w"].astype(np.float64)),
                ["'conv1_w' has dtype float64, expected float32"]),
    "nan": (_nan, ["non-finite values in layer3.rest.conv1.kernel"]),
    "inf": (_inf, ["non-finite values in layer3.rest.conv1.kernel"]),
    "no_classifier": (_drop_classifier, ["missing 'last_out_L5_w'", "missing 'last_out_L5_b'"]),
    "other_classifier": (lambda b: b.update(last_out_L6_w=b.pop("last_out_L5_w")[[0, 1, 2, 3, 4, 0]],
                                            last_out_L6_b=b.pop("last_out_L5_b")[[0, 1, 2, 3, 4, 0]]),
                         ["unexpected 'last_out_L6_w'", "unexpected 'last_out_L6_b'",
                          "missing 'last_out_L5_w'", "missing 'last_out_L5_b'"]),
    "not_training_state": (lambda b: b.update(model_iter_2=np.zeros(()), momentum=np.zeros(())),
                           ["unexpected 'model_iter_2'", "unexpected 'momentum'"]),
}


def check_error(path, fragments):
    with pytest.raises(CheckpointError) as info:
        caffe2_to_params(read_weights(path), "ir_csn_26", shapes("ir_csn_26", 5), source=str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: {len(fragments)} problem(s)"), message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("case", ERRORS)
def test_each_problem_is_reported(case, tmp_path):
    mutate, fragments = ERRORS[case]
    blobs = valid_blobs()
    mutate(blobs)
    path = tmp_path / f"{case}.pkl"
    write_caffe2_pkl(path, blobs)
    check_error(path, fragments)


def test_all_problems_in_one_error(tmp_path):
    blobs = valid_blobs()
    fragments = []
    for case in ["leftover", "missing", "shape", "float64", "no_classifier", "not_training_state"]:
        mutate, expected = ERRORS[case]
        mutate(blobs)
        fragments += expected
    blobs["comp_0_conv_1_w_momentum"] = np.zeros(3, np.float64)  # skipped whatever it holds
    path = tmp_path / "broken.pkl"
    write_caffe2_pkl(path, blobs, flat=True)
    check_error(path, fragments)


def test_valid_blobs_load():
    params = caffe2_to_params(valid_blobs(), "ir_csn_26", shapes("ir_csn_26", 5), source="ok")
    assert_bit_identical(params_to_caffe2(params, "ir_csn_26"), _valid_blobs())


# --------------------------------------------------------------------------------------------
# class count, clip length and the training-state rule


def test_num_classes_from_blobs():
    w = np.zeros((487, 2048), np.float32)
    assert num_classes_from_blobs({"last_out_L487_w": w, "conv1_w": np.zeros(1)}, "f.pkl") == 487
    with pytest.raises(CheckpointError, match=r"^f\.pkl: no classifier blob 'last_out_L<n>_w'"):
        num_classes_from_blobs({"conv1_w": w, "last_out_L487_b": w[:, 0]}, "f.pkl")
    with pytest.raises(CheckpointError,
                       match=r"^f\.pkl: ambiguous .*'last_out_L400_w', 'last_out_L487_w'"):
        num_classes_from_blobs({"last_out_L487_w": w, "last_out_L400_w": w[:400]}, "f.pkl")
    with pytest.raises(CheckpointError, match=r"^f\.pkl: classifier 'last_out_L400_w' has shape "
                                              r"\(487, 2048\), expected \(400, C\)"):
        num_classes_from_blobs({"last_out_L400_w": w}, "f.pkl")
    with pytest.raises(CheckpointError, match="has shape"):  # a convolutional classifier
        num_classes_from_blobs({"last_out_L400_w": np.zeros((400, 2048, 1, 1, 1))}, "f.pkl")


def test_clip_length_from_blobs():
    conv1 = np.zeros((64, 3, 16, 7, 7), np.float32)
    assert clip_length_from_blobs({"conv1_w": conv1}, "r2d_18") == 16
    assert clip_length_from_blobs({"conv1_w": conv1[:, :, :4]}, "r2d_18") == 4
    assert clip_length_from_blobs({}, "r2d_18") == 8  # the strict mapping reports the blob
    assert clip_length_from_blobs({"conv1_w": conv1}, "r3d_18") == 8
    assert clip_length_from_blobs({"conv1_w": conv1}, "c3d") == 8


@pytest.mark.parametrize(("name", "skipped"), [
    ("comp_0_conv_1_w_momentum", True), ("last_out_L400_b_momentum", True),
    ("conv1_spatbn_relu_s_momentum", True), ("model_iter", True), ("lr", True),
    ("_momentum", False), ("momentum", False), ("comp_0_conv_1_w", False), ("model_iter_2", False),
    ("lr_mult", False), ("iter", False), ("conv1_momentum_w", False), ("gpu_0/lr", False)])
def test_training_state_rule(name, skipped):
    assert is_training_state(name) is skipped

