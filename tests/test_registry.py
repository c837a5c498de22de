"""The table of released checkpoints (vmz_jax.registry) against shared/spec/PRETRAINED.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from vmz_jax.errors import VMZError
from vmz_jax.weights import pretrained as reg

# (arch, name, classes, frames, crop), the spec's .pth table in its order.
PTH_ROWS = [
    ("r2plus1d_34", "ig65m_8frms", 487, 8, 112),
    ("r2plus1d_34", "ig65m_32frms", 359, 32, 112),
    ("r2plus1d_34", "ig_ft_kinetics_8frms", 400, 8, 112),
    ("r2plus1d_34", "ig_ft_kinetics_32frms", 400, 32, 112),
    ("r2plus1d_152", "ig65m_32frms", 359, 32, 112),
    ("r2plus1d_152", "ig_ft_kinetics_32frms", 400, 32, 112),
    ("r2plus1d_152", "sports1m_ft_kinetics_32frms", 400, 32, 112),
    ("ir_csn_152", "ig65m_32frms", 359, 32, 224),
    ("ir_csn_152", "ig_ft_kinetics_32frms", 400, 32, 224),
    ("ir_csn_152", "sports1m_32frms", 487, 32, 224),
    ("ir_csn_152", "sports1m_ft_kinetics_32frms", 400, 32, 224),
    ("ip_csn_152", "ig65m_32frms", 359, 32, 224),
    ("ip_csn_152", "ig_ft_kinetics_32frms", 400, 32, 224),
    ("ip_csn_152", "sports1m_32frms", 487, 32, 224),
    ("ip_csn_152", "sports1m_ft_kinetics_32frms", 400, 32, 224),
]
HUB_SHA = {  # torch.hub "-<sha256 prefix>.pth" files
    ("r2plus1d_34", "ig65m_8frms"): "9bae36ae",
    ("r2plus1d_34", "ig65m_32frms"): "449a7af9",
    ("r2plus1d_34", "ig_ft_kinetics_8frms"): "0aa0550b",
    ("r2plus1d_34", "ig_ft_kinetics_32frms"): "ade133f1",
}
# Caffe2 pickles of the families built here: (arch, name, classes, frames, crop).
PKL_ROWS = [
    ("c3d", "kinetics_16frms", 400, 16, 112),
    ("c3d", "sports1m_16frms", 487, 16, 112),
    ("c3d", "sports1m_ft_kinetics_16frms", 400, 16, 112),
    ("r2plus1d_34", "ig65m_8frms_caffe2", 487, 8, 112),
    ("r2plus1d_34", "ig_ft_kinetics_8frms_caffe2", 400, 8, 112),
    ("r2plus1d_34", "ig65m_32frms_caffe2", 359, 32, 112),
    ("r2plus1d_34", "ig_ft_kinetics_32frms_caffe2", 400, 32, 112),
    ("r2plus1d_152", "kinetics_32frms", 400, 32, 112),
    ("r2plus1d_152", "sports1m_32frms", 487, 32, 112),
    ("r2plus1d_152", "sports1m_ft_kinetics_32frms_caffe2", 400, 32, 112),
    ("r2plus1d_152", "ig65m_32frms_caffe2", 359, 32, 112),
    ("r2plus1d_152", "ig_ft_kinetics_32frms_caffe2", 400, 32, 112),
    ("ir_csn_50", "ig65m_32frms", 359, 32, 224),
    ("ir_csn_50", "ig_ft_kinetics_32frms", 400, 32, 224),
    ("ir_csn_152", "kinetics_32frms", 400, 32, 224),
    ("ir_csn_152", "sports1m_32frms_caffe2", 487, 32, 224),
    ("ir_csn_152", "sports1m_ft_kinetics_32frms_caffe2", 400, 32, 224),
    ("ir_csn_152", "ig65m_32frms_caffe2", 359, 32, 224),
    ("ir_csn_152", "ig_ft_kinetics_32frms_caffe2", 400, 32, 224),
    ("ip_csn_152", "kinetics_32frms", 400, 32, 224),
    ("ip_csn_152", "sports1m_32frms_caffe2", 487, 32, 224),
    ("ip_csn_152", "sports1m_ft_kinetics_32frms_caffe2", 400, 32, 224),
    ("ip_csn_152", "ig65m_32frms_caffe2", 359, 32, 224),
    ("ip_csn_152", "ig_ft_kinetics_32frms_caffe2", 400, 32, 224),
    ("r2plus1d_34", "kinetics_32frms", 400, 32, 112),
    ("r2plus1d_34", "sports1m_ft_kinetics_32frms", 400, 32, 112),
    ("c3d", "kinetics_16frms_closer_look", 400, 16, 112),
    *((arch, f"kinetics_{frames}frms", 400, frames, 112)
      for arch in ["r2plus1d_18", "r3d_18", "r2d_18", "r2df_18", "mc2_18", "mc3_18", "mc4_18", "mc5_18",
                   "rmc2_18", "rmc3_18", "rmc4_18", "rmc5_18"]
      for frames in (8, 16)),
]
DROPBOX = r"https://www\.dropbox\.com/s/[a-z0-9]{15}/[A-Za-z0-9_%.]+\.pkl\?dl=1"
VMZ_MODEL_URL_KEYS = [  # VMZ pt/vmz/models/utils.py model_urls, minus the one empty URL
    "r2plus1d_34_8_ig65m",
    "r2plus1d_34_32_ig65m",
    "r2plus1d_34_8_kinetics",
    "r2plus1d_34_32_kinetics",
    "r2plus1d_152_ig65m_32frms",
    "r2plus1d_152_ig_ft_kinetics_32frms",
    "r2plus1d_152_sports1m_ft_kinetics_32frms",
    "ir_csn_152_ig65m_32frms",
    "ir_csn_152_ig_ft_kinetics_32frms",
    "ir_csn_152_sports1m_32frms",
    "ir_csn_152_sports1m_ft_kinetics_32frms",
    "ip_csn_152_ig65m_32frms",
    "ip_csn_152_ig_ft_kinetics_32frms",
    "ip_csn_152_sports1m_32frms",
    "ip_csn_152_sports1m_ft_kinetics_32frms",
]


@pytest.mark.parametrize(("arch", "name", "classes", "frames", "crop"), PTH_ROWS)
def test_every_pth_row(arch, name, classes, frames, crop):
    p = reg.get_pretraining(arch, name)
    assert (p.arch, p.name, p.fmt) == (arch, name, "pth")
    assert (p.num_classes, p.clip_length, p.crop_size) == (classes, frames, crop)
    assert p.url.startswith("https://github.com/") and p.url.endswith(".pth")
    assert p.sha256_prefix == HUB_SHA.get((arch, name))


@pytest.mark.parametrize(("arch", "name", "classes", "frames", "crop"), PKL_ROWS)
def test_every_caffe2_row(arch, name, classes, frames, crop):
    p = reg.get_pretraining(arch, name)
    assert (p.arch, p.name, p.fmt) == (arch, name, "pkl")
    assert (p.num_classes, p.clip_length, p.crop_size) == (classes, frames, crop)
    assert re.fullmatch(DROPBOX, p.url)
    assert p.sha256_prefix is None  # the _f<digits> suffix is a run id, not a checksum
    # the model-zoo files carry a Caffe2 run id; the "Closer Look" files (r2.5d_d18_l8.pkl, ...) none
    assert (p.run_id is not None and p.run_id in p.url) or re.search(r"_l\d+(_ft_sports1m)?\.pkl", p.url)


# the audio-visual Gradient-Blending files of VMZ's c2/tutorials/model_zoo.md (issue 20):
# (arch, name, file, classes, frames)
AV_PKL_ROWS = [
    ("av_ip_csn_152", "kinetics_32frms", "g_b_ip_csn_152_kinetics.pkl", 400, 32),
    ("av_ip_csn_152", "sports1m_audioset_ft_kinetics_32frms",
     "g_b_ip_csn_152_sports_audioset_ft_kinetics.pkl", 400, 32),
    ("av_ip_csn_152", "ig_audioset_ft_kinetics_32frms",
     "g_b_ip_csn_152_ig_audioset_ft_kinetics.pkl", 400, 32),
    ("av_ip_csn_152", "sports1m_audioset_32frms", "sports1m_audioset_ip_csn_152.pkl", 487, 32),
    ("av_ip_csn_152", "ig_audioset_32frms", "ig_audioset_ip_csn_152.pkl", 359, 32),
    ("av_r2plus1d_101", "audioset_16frms", "g_b_r2_plus_1d_101_audioset.pkl", 527, 16),
]


def test_table_is_exactly_the_spec():
    pth = {(p.arch, p.name) for p in reg.all_pretrainings() if p.fmt == "pth"}
    pkl = {(p.arch, p.name) for p in reg.all_pretrainings() if p.fmt == "pkl"}
    assert pth == {r[:2] for r in PTH_ROWS} and len(pth) == 15
    assert pkl == {r[:2] for r in PKL_ROWS} | {r[:2] for r in AV_PKL_ROWS}
    assert len(reg.all_pretrainings()) == len(PTH_ROWS) + len(PKL_ROWS) + len(AV_PKL_ROWS)
    for arch, name, file, classes, frames in AV_PKL_ROWS:
        p = reg.get_pretraining(arch, name)
        assert urlsplit(p.url).path.endswith("/" + file) and re.fullmatch(DROPBOX, p.url), p.url
        assert (p.num_classes, p.clip_length, p.crop_size) == (classes, frames, 224)


def test_the_pth_rows_are_vmz_model_urls():
    keys = {p.key for p in reg.all_pretrainings() if "bjuncek/VMZ" in p.url}
    assert keys == {k for k in VMZ_MODEL_URL_KEYS if not k.startswith("r2plus1d_34_")}
    for key in VMZ_MODEL_URL_KEYS:
        assert reg.resolve_key(key).fmt == "pth"


def test_urls_and_file_names_are_unique():
    entries = reg.all_pretrainings()
    assert len({p.url for p in entries}) == len(entries)
    assert len({p.filename for p in entries}) == len(entries)
    assert all(" " not in p.filename and "%" not in p.filename for p in entries)


def test_dropbox_urls_keep_percent_20():
    p = reg.get_pretraining("r2plus1d_34", "ig_ft_kinetics_8frms_caffe2")
    assert p.url == (
        "https://www.dropbox.com/s/p81twy88kwrrcop/"
        "r2plus1d_34_clip8_ft_kinetics_from_ig65m_%20f128022400.pkl?dl=1"
    )
    assert p.filename == "r2plus1d_34_clip8_ft_kinetics_from_ig65m_f128022400.pkl"


def test_sha_prefixes_match_the_torch_hub_file_names():
    with_sha = [p for p in reg.all_pretrainings() if p.sha256_prefix is not None]
    assert {(p.arch, p.name) for p in with_sha} == set(HUB_SHA)
    for p in with_sha:
        assert re.fullmatch(r"[0-9a-f]{8}", p.sha256_prefix)
        m = re.search(r"-([0-9a-f]{8})\.pth$", urlsplit(p.url).path)
        assert m and m.group(1) == p.sha256_prefix


def test_class_counts_follow_the_dataset():
    # ig65m-pytorch issue #3: the 8-frame IG-65M model has 487 classes, the 32-frame one 359.
    assert reg.get_pretraining("r2plus1d_34", "ig65m_8frms").num_classes == 487
    assert reg.get_pretraining("r2plus1d_34", "ig65m_32frms").num_classes == 359
    for p in reg.all_pretrainings():
        expected = {"kinetics400": 400, "ig65m": 359, "sports1m": 487, "audioset": 527}[p.dataset]
        if p.arch == "r2plus1d_34" and p.name.startswith("ig65m_8frms"):
            expected = 487
        assert p.num_classes == expected, p.key
        assert ("kinetics" in p.name) == (p.dataset == "kinetics400"), p.key


def test_pth_and_caffe2_twins_are_the_same_run():
    for p in reg.all_pretrainings():
        if p.name.endswith("_caffe2"):
            twin = reg.get_pretraining(p.arch, p.name.removesuffix("_caffe2"))
            assert twin.fmt == "pth"
            assert (twin.num_classes, twin.clip_length, twin.crop_size, twin.dataset) == (
                p.num_classes,
                p.clip_length,
                p.crop_size,
                p.dataset,
            )
            if twin.run_id is not None:  # moabitcoin's .pth files carry a checksum instead
                assert twin.run_id == p.run_id


@pytest.mark.parametrize(
    ("arch", "alias", "canonical"),
    [
        ("r2plus1d_34", "r2plus1d_34_8_ig65m", "ig65m_8frms"),
        ("r2plus1d_34", "r2plus1d_34_32_ig65m", "ig65m_32frms"),
        ("r2plus1d_34", "r2plus1d_34_8_kinetics", "ig_ft_kinetics_8frms"),
        ("r2plus1d_34", "r2plus1d_34_32_kinetics", "ig_ft_kinetics_32frms"),
        ("r2plus1d_34", "8_kinetics", "ig_ft_kinetics_8frms"),
        ("ir_csn_152", "ir_csn_152_ig65m_32frms", "ig65m_32frms"),
        ("ip_csn_152", "ip_csn_152_sports1m_ft_kinetics_32frms", "sports1m_ft_kinetics_32frms"),
        ("r2plus1d_152", "r2plus1d_152_sports1m_32frms", "sports1m_32frms"),
        ("r2plus1d_152", "kinetics_32frms_caffe2", "kinetics_32frms"),  # pickle-only
        ("ir_csn_152", "ir_csn_152_ig65m_32frms_caffe2", "ig65m_32frms_caffe2"),
    ],
)
def test_aliases_resolve(arch, alias, canonical):
    assert reg.get_pretraining(arch, alias) is reg.get_pretraining(arch, canonical)
    if alias.startswith(arch):
        assert reg.resolve_key(alias) is reg.get_pretraining(arch, canonical)


def test_vmz_r2plus1d_34_keys_are_listed_as_aliases():
    names = reg.aliases("r2plus1d_34")
    for key in VMZ_MODEL_URL_KEYS[:4]:
        assert key in names and names[key] in reg.list_pretrainings("r2plus1d_34")


def test_unknown_name_lists_what_exists():
    with pytest.raises(VMZError) as err:
        reg.get_pretraining("ip_csn_152", "kinetics_8frms")
    msg = str(err.value)
    assert "kinetics_8frms" in msg and "\n" not in msg
    for name in reg.list_pretrainings("ip_csn_152"):
        assert name in msg


def test_unknown_arch_lists_what_exists():
    with pytest.raises(VMZError) as err:
        reg.get_pretraining("r2plus1d_50", "ig65m_32frms")
    for arch in reg.list_archs():
        assert arch in str(err.value)
    with pytest.raises(VMZError, match="must start with one of"):
        reg.resolve_key("resnet50_imagenet")
    assert reg.list_pretrainings("r3d_50") == []
    assert reg.default_pretraining("r3d_50") is None


def test_defaults_are_kinetics_fine_tuned():
    for arch in reg.list_archs():
        name = reg.default_pretraining(arch)
        datasets = {reg.get_pretraining(arch, n).dataset for n in reg.list_pretrainings(arch)}
        if "kinetics400" not in datasets:
            assert name is None, arch  # av_r2plus1d_101: AudioSet only, no default to guess
            continue
        assert name is not None and name in reg.list_pretrainings(arch)
        p = reg.get_pretraining(arch, name)
        # fine-tuned on Kinetics where such a checkpoint exists, else trained on it from scratch
        assert p.num_classes == 400 and p.dataset == "kinetics400"
        if any("ft_kinetics" in n for n in reg.list_pretrainings(arch)):
            assert "ft_kinetics" in p.name
    assert reg.default_pretraining("ip_csn_152") == "ig_ft_kinetics_32frms"


def test_list_pretrainings_puts_pth_first():
    for arch in reg.list_archs():
        fmts = [reg.get_pretraining(arch, n).fmt for n in reg.list_pretrainings(arch)]
        assert fmts == sorted(fmts, key=lambda f: f != "pth")


def test_entries_are_frozen_and_validated():
    p = reg.get_pretraining("c3d", "kinetics_16frms")
    with pytest.raises(AttributeError):
        p.num_classes = 10  # type: ignore[misc]
    with pytest.raises(ValueError):
        reg.Pretraining("a", "b", "u", 400, 8, 112, "pth", "XYZ", "kinetics400", "")
    with pytest.raises(ValueError):
        reg.Pretraining("a", "b", "u", 400, 8, 112, "zip", None, "kinetics400", "")  # type: ignore[arg-type]


def test_registry_and_download_do_not_import_jax():
    # Make `vmz_jax` a bare namespace (its __init__.py imports jax on purpose), so that importing the
    # table and the downloader runs only their own imports.
    code = (
        "import importlib, pathlib, sys, types\n"
        "root = pathlib.Path(sys.argv[1])\n"
        "pkg = types.ModuleType('vmz_jax'); pkg.__path__ = [str(root)]\n"
        "sys.modules['vmz_jax'] = pkg\n"
        "for m in ('vmz_jax.weights.pretrained', 'vmz_jax.weights.download'):\n"
        "    importlib.import_module(m)\n"
        "bad = [m for m in ('jax', 'numpy', 'flax', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    pkg_dir = Path(reg.__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code, str(pkg_dir)], check=True, timeout=60)
