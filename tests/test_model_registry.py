"""The architecture registry (vmz_jax.models.registry): one entry per name, one error for unknown names
wherever a name comes in, and the per-architecture facts other modules used to derive from the name."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from flax import nnx

import vmz_jax
from porting import caffe2_names, convert, torch_names
from vmz_jax import models
from vmz_jax.cli import main
from vmz_jax.errors import VMZError
from vmz_jax.models import registry, variables
from vmz_jax.models.specs import RESNET_SPECS
from vmz_jax.reference import vmz_torch
from vmz_jax.video import pipeline, preprocess
from vmz_jax.weights import loading
from vmz_jax.weights import pretrained as released

UNKNOWN = "resnet50"
MESSAGE = f"unknown architecture {UNKNOWN!r}; available: {', '.join(registry.names())}"
SMALL = ("r2plus1d_10", "r3d_10", "ir_csn_26", "ip_csn_26", "r2d_18", "r2df_18", "mc3_18", "rmc3_18", "c3d")


def _expected_family(name: str) -> str:
    """The family as the upstream names spell it (independent of how the registry derives it)."""
    for pattern, family in ((r"r2plus1d_\d+", "r2plus1d"), (r"r3d_\d+", "r3d"), (r"r2df?_18", "r2d"),
                            (r"mc[2-5]_18", "mc"), (r"rmc[2-5]_18", "rmc"), (r"ir_csn_\d+", "ir_csn"),
                            (r"ip_csn_\d+", "ip_csn"), (r"c3d", "c3d")):
        if re.fullmatch(pattern, name):
            return family
    raise AssertionError(f"no family pattern for {name}")


def test_every_architecture_has_one_entry():
    names = registry.names()
    assert len(names) == len(set(names)) and len(models.VIDEO_ARCHS) == 35
    # the independent torch reference lists the same video architectures (the audio and
    # audio-visual ones have theirs, checked in test_audio_visual.py)
    assert set(models.VIDEO_ARCHS) == set(vmz_torch.ARCHS)
    assert models.ARCHS == names and vmz_jax.list_models() == list(names)
    assert tuple(e.name for e in registry.entries()) == names
    for entry in registry.entries():
        assert registry.get(entry.name) is entry and registry.get(entry) is entry
        if entry.family in registry.AUDIO_FAMILIES:
            continue
        assert entry.family == _expected_family(entry.name) and entry.family in registry.FAMILIES
        assert callable(getattr(models, entry.name))
        if entry.family == "c3d":
            assert entry.spec is None and entry.depth is None and entry.feature_dim == 4096
        else:
            assert entry.spec is RESNET_SPECS[entry.name] and entry.depth == entry.spec.depth
            assert entry.feature_dim == (512 if entry.spec.depth <= 34 else 2048)
        assert entry.torch_names in torch_names.TABLES and entry.caffe2_names in caffe2_names.RULES
    assert {e.family for e in registry.entries()} == set(registry.FAMILIES)
    assert [e.name for e in registry.entries() if e.spans_clip] == ["r2d_18"]
    assert [e.name for e in registry.entries() if not e.features_are_pooled
            and e.family not in registry.AUDIO_FAMILIES] == ["c3d"]


@pytest.mark.parametrize("arch", ["r3d_10", "ir_csn_26", "c3d"])
def test_entries_describe_the_models_they_build(arch):
    entry = registry.get(arch)
    model = nnx.eval_shape(lambda: models.build(arch, 7, rngs=nnx.Rngs(0)))
    assert model.arch == arch and registry.entry_of(model) is entry
    shapes = variables.variable_shapes(model)
    assert shapes[("fc", "kernel")] == (entry.feature_dim, 7)
    assert variables.expected_shapes(entry, 7) == shapes  # an entry works wherever a name does


def test_entry_of_rejects_foreign_modules():
    class Foreign(nnx.Module):
        pass

    with pytest.raises(VMZError, match="cannot tell the architecture of a Foreign"):
        registry.entry_of(Foreign())


@pytest.mark.parametrize("bad", [UNKNOWN, "R3D_18", "r3d_18 ", "", None, 18])
def test_unknown_names_fail_once_with_the_list(bad):
    with pytest.raises(registry.UnknownArchitectureError) as info:
        registry.get(bad)
    message = str(info.value)
    assert message == f"unknown architecture {bad!r}; available: {', '.join(registry.names())}"
    assert "\n" not in message and len(message) <= 1000  # 61 names since the audio-visual family
    assert isinstance(info.value, VMZError) and isinstance(info.value, ValueError)


def _consumers(tmp_path):
    """Every function that takes an architecture name from outside, called with an unknown one."""
    weights = tmp_path / "missing.pth"  # never opened: the name is checked first
    return {
        "models.build": lambda: models.build(UNKNOWN),
        "abstract_model": lambda: variables.abstract_model(UNKNOWN, 400),
        "expected_shapes": lambda: variables.expected_shapes(UNKNOWN, 400),
        "spans_clip": lambda: variables.spans_clip(UNKNOWN),
        "vmz_jax.load": lambda: vmz_jax.load(UNKNOWN, checkpoint=weights),
        "vmz_jax.list_pretrainings": lambda: vmz_jax.list_pretrainings(UNKNOWN),
        "read_local": lambda: loading.read_local(UNKNOWN, weights),
        "read_params": lambda: convert.read_params(weights, UNKNOWN),
        "export_params": lambda: convert.export_params({}, UNKNOWN, tmp_path / "out.pth", "pth"),
        "caffe2_name_fn": lambda: caffe2_names.caffe2_name_fn(UNKNOWN, 400),
        "clip_length_from_blobs": lambda: caffe2_names.clip_length_from_blobs({}, UNKNOWN),
        "params_to_caffe2": lambda: caffe2_names.params_to_caffe2({("fc", "kernel"): np.zeros((2, 3))},
                                                                  UNKNOWN),
        "torch model_layout": lambda: torch_names.model_layout({}, UNKNOWN),
        "default_options": lambda: pipeline.default_options(UNKNOWN),
    }


def test_every_consumer_rejects_an_unknown_name_with_the_same_message(tmp_path):
    for where, call in _consumers(tmp_path).items():
        with pytest.raises(VMZError) as info:
            call()
        assert str(info.value) == MESSAGE, where
    assert not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize("argv", [
    ["list", "r3d_18", UNKNOWN],
    ["port", "w.pth", "ckpt", "--arch", UNKNOWN],
    ["export", "w.pth", "out.pkl", "--arch", UNKNOWN],
    ["extract", "a.mp4", "--out", "o", "--arch", UNKNOWN],
    ["classify", "a.mp4", "--out", "o", "--arch", UNKNOWN],
    ["bench", "r3d_10", UNKNOWN, "--no-torch"],
], ids=lambda argv: argv[0])
def test_every_command_rejects_an_unknown_name_with_the_same_message(capsys, monkeypatch, tmp_path, argv):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"vmz-jax {argv[0]}: error: {MESSAGE}\n"
    assert not any(tmp_path.iterdir())  # nothing written, nothing benchmarked


def test_input_defaults():
    csn, c3d, r21d = (registry.get(a).input for a in ("ir_csn_152", "c3d", "r2plus1d_34"))
    fields = ("clip_length", "short_side", "crop", "crop_size", "sampling_rate")
    assert tuple(getattr(csn, f) for f in fields) == (32, 256, "none", None, 1)
    assert tuple(getattr(c3d, f) for f in fields) == (16, 128, "center", 112, 1)
    assert (r21d.clip_length, r21d.short_side, r21d.crop, r21d.crop_size) == (32, 128, "none", None)
    by_family = {e.family: e.input for e in registry.entries()}
    assert by_family["ip_csn"] == csn and by_family["r3d"] == by_family["mc"] == by_family["rmc"] == r21d
    for entry in registry.entries():
        # the numbers the video pipeline normalizes with
        np.testing.assert_array_equal(np.float32(entry.input.mean), preprocess.MEAN)
        np.testing.assert_array_equal(np.float32(entry.input.std), preprocess.STD)
        assert pipeline.default_options(entry) == pipeline.default_options(entry.name) == {
            "clip_len": entry.input.clip_length, "frame_size": entry.input.short_side,
            "crop": entry.input.crop, "crop_size": entry.input.crop_size,
            "sampling_rate": entry.input.sampling_rate}
    with pytest.raises(ValueError, match="a crop size needs a crop"):
        registry.InputDefaults(clip_length=8, short_side=128, crop_size=112)


def test_c3d_inputs_are_those_of_its_released_weights():
    # C3D takes one input size only, so its default input must be what every checkpoint was made for
    given = registry.get("c3d").input
    rows = [p for p in released.all_pretrainings() if p.arch == "c3d"]
    assert rows and all((p.clip_length, p.crop_size) == (given.clip_length, given.crop_size) for p in rows)


def test_default_pretraining_is_a_flag_on_the_released_rows():
    names = set(registry.names())
    assert set(released.list_archs()) <= names
    defaults = [p for p in released.all_pretrainings() if p.default]
    assert len({p.arch for p in defaults}) == len(defaults)  # at most one per arch
    # every arch with Kinetics-400 weights has a default (av_r2plus1d_101 has AudioSet weights only)
    assert {p.arch for p in defaults} == {p.arch for p in released.all_pretrainings()
                                          if p.dataset == released.KINETICS400}
    for p in defaults:
        assert released.default_pretraining(p.arch) == p.name
        assert (p.dataset, p.num_classes) == (released.KINETICS400, 400)
    assert released.default_pretraining("r3d_50") is None  # no released weights


@pytest.mark.parametrize("arch", SMALL)
def test_torch_tables_are_disjoint_and_picked_by_key(arch):
    entry = registry.get(arch)
    shapes = variables.abstract_shapes(arch, 5)
    by_key = torch_names.model_layout(shapes, entry)
    assert torch_names.model_layout(shapes) == by_key  # every table at once: same names
    other = "resnet" if entry.torch_names == "c3d" else "c3d"
    with pytest.raises(KeyError, match=f"in the '{other}' table"):
        torch_names.model_layout(shapes, dataclasses.replace(entry, torch_names=other))
