"""`vmz-jax port`, `export` and `list`: round trips, content-based format detection, one-line errors
(exit status 2, no traceback, nothing half-written)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from porting import readers
from porting.convert import export_params, read_params
from tests.test_checkpoint import random_params
from vmz_jax.cli import main
from vmz_jax.weights import checkpoint
from vmz_jax.weights import download as dl
from vmz_jax.weights import loading as api
from vmz_jax.weights import pretrained as registry

REPO = Path(__file__).resolve().parents[1]
ARCH = "ir_csn_26"


@pytest.fixture(autouse=True)
def home(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv(dl.HOME_ENV, str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def params():
    return random_params(ARCH, 5)


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_port_then_export_round_trips(capsys, params, tmp_path):
    src = tmp_path / "w.pkl"
    export_params(params, ARCH, src, "pkl")
    code, out, err = run(capsys, "port", src, tmp_path / "ckpt", "--arch", ARCH, "--num-classes", "5",
                         "--pretraining-name", "my_run")
    assert code == 0 and err == "" and "caffe2-pkl" in out and "5 classes" in out
    restored, meta = checkpoint.restore(tmp_path / "ckpt", arch=ARCH)
    assert same(restored, params)
    assert meta["pretraining"] == "my_run" and meta["source_format"] == "caffe2-pkl"
    assert meta["source"] == str(src)

    for fmt in ("pth", "npz", "pkl"):
        dst = tmp_path / f"back.{fmt}"
        code, out, err = run(capsys, "export", tmp_path / "ckpt", dst, "--arch", ARCH)
        assert code == 0, err
        again, info = read_params(dst, ARCH)
        assert same(again, params) and info.naming == ("caffe2" if fmt == "pkl" else "torch")
    assert (tmp_path / "back.pkl").read_bytes() == src.read_bytes()

    # export straight from a file, format forced; the output is VMZ-named
    code, _, err = run(capsys, "export", src, tmp_path / "out.bin", "--arch", ARCH, "--format", "pth")
    assert code == 0, err
    state_dict = readers.read_weights(tmp_path / "out.bin")
    assert "layer1.0.conv1.0.weight" in state_dict and "fc.weight" in state_dict


def test_port_detects_the_format_from_content(capsys, params, tmp_path):
    src = tmp_path / "weights.pkl"  # really a zip .pth
    export_params(params, ARCH, src, "pth")
    code, out, err = run(capsys, "port", src, tmp_path / "ckpt", "--arch", ARCH)
    assert code == 0, err
    assert "pth-zip" in out
    assert same(checkpoint.restore(tmp_path / "ckpt")[0], params)


def test_port_records_a_registry_pretraining(capsys, tmp_path):
    params = random_params("ir_csn_50", 400)
    src = tmp_path / "w.pth"
    export_params(params, "ir_csn_50", src, "pth")
    code, _, err = run(capsys, "port", src, tmp_path / "c", "--arch", "ir_csn_50", "--pretraining-name",
                       "ig_ft_kinetics_32frms")
    assert code == 0, err
    meta = checkpoint.read_metadata(tmp_path / "c")
    assert meta["clip_length"] == 32 and meta["crop_size"] == 224 and meta["dataset"] == "kinetics400"
    code, _, err = run(capsys, "port", src, tmp_path / "d", "--arch", "ir_csn_50", "--pretraining-name",
                       "ig65m_32frms")
    assert_one_line_error(code, err, str(src), "400 classes", "359")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("case", ["truncated", "garbage", "missing", "wrong_arch", "wrong_classes"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, capsys, params, tmp_path):
    src = tmp_path / "w.pth"
    export_params(params, ARCH, src, "pth")
    arch, extra = ARCH, []
    if case == "truncated":
        src.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    elif case == "garbage":
        src.write_bytes(b"\x00garbage" * 100)
    elif case == "missing":
        src.unlink()
    elif case == "wrong_arch":
        arch = "ip_csn_26"
    else:
        extra = ["--num-classes", "400"]
    before = sorted(os.listdir(tmp_path))
    for command, dst in (("port", tmp_path / "ckpt"), ("export", tmp_path / "out.npz")):
        code, out, err = run(capsys, command, src, dst, "--arch", arch, *extra)
        assert_one_line_error(code, err, f"vmz-jax {command}: error: {src}")
        assert out == ""
        assert sorted(os.listdir(tmp_path)) == before  # no DST, no temporary files


def test_usage_errors(capsys, params, tmp_path):
    src = tmp_path / "w.pth"
    export_params(params, ARCH, src, "pth")
    (tmp_path / "taken").mkdir()
    code, _, err = run(capsys, "port", src, tmp_path / "taken", "--arch", ARCH)
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert os.listdir(tmp_path / "taken") == []
    code, _, err = run(capsys, "port", src, tmp_path / "taken", "--arch", ARCH, "--overwrite")
    assert code == 0 and checkpoint.is_checkpoint(tmp_path / "taken")
    code, _, err = run(capsys, "port", src, tmp_path / "x", "--arch", "resnet50")
    assert_one_line_error(code, err, "unknown architecture 'resnet50'")
    code, _, err = run(capsys, "export", src, tmp_path / "w.h5", "--arch", ARCH)
    assert_one_line_error(code, err, "cannot tell the format", "--format")
    code, _, err = run(capsys, "export", tmp_path / "taken", tmp_path / "e.pth", "--arch", "ip_csn_26")
    assert_one_line_error(code, err, "holds ir_csn_26 weights, not ip_csn_26")
    assert not (tmp_path / "e.pth").exists()


def test_list_shows_archs_pretrainings_classes_frames_and_cache(capsys, home):
    entry = registry.get_pretraining("r2plus1d_34", "ig65m_32frms")
    code, out, _ = run(capsys, "list")
    assert code == 0
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["arch", "pretraining", "classes", "frames", "crop", "format", "cached"]
    archs = {row[0] for row in rows[1:] if row}
    assert {"r2plus1d_10", "r2d_18", "c3d", "ip_csn_152"} <= archs
    assert ["r2plus1d_34", "ig65m_32frms", "359", "32", "112", "pth", "no"] in rows
    assert ["r2plus1d_34", "ig65m_8frms", "487", "8", "112", "pth", "no"] in rows
    assert ["r2plus1d_10", "-"] in rows
    assert str(home) in out

    # downloaded, then ported (the listing looks at the metadata file, which appears last)
    download = api.download_path(entry)
    download.parent.mkdir(parents=True)
    download.write_bytes(b"x")
    cached = api.orbax_cache_dir("r2plus1d_34", "ig65m_8frms")
    cached.mkdir(parents=True)
    (cached / checkpoint.METADATA_FILE).write_text(json.dumps({}))
    code, out, _ = run(capsys, "list", "r2plus1d_34")
    rows = [line.split() for line in out.splitlines()]
    assert ["r2plus1d_34", "ig65m_32frms", "359", "32", "112", "pth", "downloaded"] in rows
    assert ["r2plus1d_34", "ig65m_8frms", "487", "8", "112", "pth", "yes"] in rows
    assert {row[0] for row in rows[1:] if row and row[0] != "cache:"} == {"r2plus1d_34"}


def cli_process(*argv: object) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "vmz_jax.cli", *map(str, argv)], capture_output=True,
                          text=True, env=env, timeout=120)


def test_the_entry_point_prints_no_traceback(params, tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"PK\x03\x04 not really a zip")
    result = cli_process("port", tmp_path / "junk.pth", tmp_path / "out", "--arch", ARCH)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"vmz-jax port: error: {tmp_path / 'junk.pth'}: ")
    assert len(result.stderr.splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["junk.pth"]

    # an Orbax checkpoint whose array data is damaged: Orbax's own failure stays one line too
    checkpoint.save(tmp_path / "damaged", params, {"arch": ARCH, "num_classes": 5})
    for path in (tmp_path / "damaged" / checkpoint.ITEM_DIR).glob("ocdbt.process_*/d/*"):
        path.write_bytes(path.read_bytes()[:100])
    result = cli_process("export", tmp_path / "damaged", tmp_path / "out.pth", "--arch", ARCH)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"vmz-jax export: error: {tmp_path / 'damaged'}: cannot restore")
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert not (tmp_path / "out.pth").exists()
