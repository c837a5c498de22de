"""vmz_jax.checkpoint: Orbax round trips, metadata, atomic writes, clear errors for foreign or
mismatched directories, and loading without torch or any unpickling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import vmz_jax
from vmz_jax.errors import CheckpointError
from vmz_jax.models.variables import expected_shapes
from vmz_jax.weights import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
ARCH = "ir_csn_26"


def random_params(arch: str = ARCH, num_classes: int = 5, seed: int = 0, clip_length: int | None = None):
    """Random weights; BatchNorm variances positive, so that the model's outputs are finite."""
    rng = np.random.default_rng(seed)
    params = {path: rng.standard_normal(shape, dtype=np.float32)
              for path, shape in expected_shapes(arch, num_classes, clip_length).items()}
    return {path: np.abs(v) + 0.5 if path[-1] == "var" else v for path, v in params.items()}


def saved(tmp_path: Path, arch: str = ARCH, num_classes: int = 5, **meta) -> tuple[Path, dict]:
    params = random_params(arch, num_classes)
    directory = tmp_path / "ckpt"
    ckpt.save(directory, params, {"arch": arch, "num_classes": num_classes, **meta})
    return directory, params


def test_round_trip_is_bit_identical_and_records_metadata(tmp_path):
    directory, params = saved(tmp_path, pretraining="kinetics_32frms", source="/x/w.pth",
                              source_sha256="ab" * 32, clip_length=32)
    assert sorted(os.listdir(directory)) == [ckpt.ITEM_DIR, ckpt.METADATA_FILE]
    restored, meta = ckpt.restore(directory, arch=ARCH)
    assert restored.keys() == params.keys()
    for path, value in params.items():
        assert restored[path].dtype == np.float32 and np.array_equal(restored[path], value)
    assert meta["arch"] == ARCH and meta["num_classes"] == 5 and meta["clip_length"] == 32
    assert meta["pretraining"] == "kinetics_32frms" and meta["source_sha256"] == "ab" * 32
    assert meta["source"] == "/x/w.pth"
    assert meta["vmz_jax_version"] == vmz_jax.__version__
    assert meta["format_version"] == ckpt.FORMAT_VERSION
    assert meta["num_arrays"] == len(params)
    assert json.loads((directory / ckpt.METADATA_FILE).read_text()) == meta
    assert ckpt.is_checkpoint(directory) and not ckpt.is_checkpoint(tmp_path)


def test_the_stored_tree_is_a_plain_nested_dict(tmp_path):
    directory, params = saved(tmp_path)
    stored = ckpt._orbax_metadata(str(directory / ckpt.ITEM_DIR))
    assert set(stored) == {("params", *path) for path in params}
    assert ("params", "layer2", "rest", "conv1", "kernel") in stored
    assert all(dtype == "float32" for _, dtype in stored.values())


def test_nest_and_flatten():
    flat = {("a", "b"): 1, ("a", "c", "d"): 2, ("e",): 3}
    assert ckpt.nest(flat) == {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
    assert ckpt.flatten(ckpt.nest(flat)) == flat
    with pytest.raises(ValueError):
        ckpt.nest({("a",): 1, ("a", "b"): 2})


def test_save_is_atomic(tmp_path, monkeypatch):
    def broken(path, tree):
        os.makedirs(path)
        Path(path, "half-written").write_bytes(b"x")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(ckpt, "_orbax_save", broken)
    with pytest.raises(CheckpointError, match="ckpt: cannot write .*disk on fire"):
        saved(tmp_path)
    assert os.listdir(tmp_path) == []


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    directory, _ = saved(tmp_path)
    with pytest.raises(CheckpointError, match="already exists"):
        ckpt.save(directory, random_params(seed=1), {"arch": ARCH, "num_classes": 5})
    new = random_params(seed=1)
    ckpt.save(directory, new, {"arch": ARCH, "num_classes": 5}, overwrite=True)
    restored, _ = ckpt.restore(directory)
    assert all(np.array_equal(restored[p], new[p]) for p in new)
    assert os.listdir(tmp_path) == ["ckpt"]


def test_save_checks_the_weights(tmp_path):
    params = random_params()
    with pytest.raises(CheckpointError, match="fc.kernel has shape"):
        ckpt.save(tmp_path / "a", params, {"arch": ARCH, "num_classes": 6})
    with pytest.raises(CheckpointError, match="missing"):
        ckpt.save(tmp_path / "b", dict(list(params.items())[1:]), {"arch": ARCH, "num_classes": 5})
    with pytest.raises(ValueError, match="metadata needs 'arch'"):
        ckpt.save(tmp_path / "c", params, {"num_classes": 5})
    assert os.listdir(tmp_path) == []


def test_restore_with_another_arch_names_both(tmp_path):
    directory, _ = saved(tmp_path)
    with pytest.raises(CheckpointError, match=r"holds ir_csn_26 weights, not ip_csn_26"):
        ckpt.restore(directory, arch="ip_csn_26")
    with pytest.raises(CheckpointError, match=r"holds ir_csn_26 weights, not ip_csn_26"):
        vmz_jax.load("ip_csn_26", checkpoint=directory)


def one_line_error(directory, **kw) -> str:
    with pytest.raises(CheckpointError) as err:
        ckpt.restore(directory, **kw)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(directory)), message
    return message


def test_foreign_and_damaged_directories_fail_clearly(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a vmz_jax checkpoint directory" in one_line_error(empty)
    assert "no such file" in one_line_error(tmp_path / "missing")

    # an Orbax checkpoint that is not ours
    import orbax.checkpoint as ocp

    foreign = tmp_path / "foreign"
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(foreign, {"w": np.zeros(3, np.float32)})
    assert "not a vmz_jax checkpoint directory" in one_line_error(foreign)

    directory, _ = saved(tmp_path)
    meta_path = directory / ckpt.METADATA_FILE
    meta = json.loads(meta_path.read_text())

    meta_path.write_text(json.dumps(dict(meta, num_classes=7)))  # metadata contradicting the arrays
    message = one_line_error(directory)
    assert "do not fit the recorded architecture" in message and "fc.kernel has shape (512, 5)" in message

    meta_path.write_text(json.dumps(dict(meta, arch="ip_csn_26")))
    assert "do not fit the recorded architecture" in one_line_error(directory)

    meta_path.write_text(json.dumps(dict(meta, format_version=ckpt.FORMAT_VERSION + 1)))
    assert "format version" in one_line_error(directory)

    meta_path.write_text("{not json")
    assert "unreadable" in one_line_error(directory)

    meta_path.write_text(json.dumps(meta))
    data = [p for p in (directory / ckpt.ITEM_DIR).glob("ocdbt.process_*/d/*") if p.stat().st_size > 1000]
    assert data
    for path in data:
        path.write_bytes(path.read_bytes()[:100])  # array data truncated
    assert "cannot restore" in one_line_error(directory)

    (directory / ckpt.ITEM_DIR / "_METADATA").unlink()
    assert "Orbax" in one_line_error(directory)


def test_load_from_orbax_never_imports_torch_nor_unpickles(tmp_path):
    directory, params = saved(tmp_path)
    np.savez(tmp_path / "want.npz", **{"/".join(path): value for path, value in params.items()})
    script = textwrap.dedent(f"""
        import builtins, pickle, sys

        def refuse(*args, **kwargs):
            raise AssertionError("something unpickled")

        class NoUnpickler:
            def __init__(self, *args, **kwargs):
                refuse()

        pickle.load = pickle.loads = refuse
        pickle.Unpickler = NoUnpickler
        import _pickle
        _pickle.load = _pickle.loads = refuse
        _pickle.Unpickler = NoUnpickler

        real_import = builtins.__import__

        def guarded(name, *args, **kwargs):
            if name == "torch" or name.startswith(("torch.", "porting")):
                raise AssertionError(f"imported {{name}}")
            return real_import(name, *args, **kwargs)

        builtins.__import__ = guarded
        import numpy as np
        import vmz_jax
        from vmz_jax.models.variables import get_variables

        model = vmz_jax.load({ARCH!r}, checkpoint={str(directory)!r})
        assert model.stem.conv.bn.use_running_average is True  # eval mode
        got = get_variables(model)
        with np.load({str(tmp_path / "want.npz")!r}) as want:
            assert sorted("/".join(p) for p in got) == sorted(want.files)
            for path, value in got.items():
                assert np.array_equal(value, want["/".join(path)]), path
        bad = [m for m in sys.modules if m == "torch" or m.startswith(("torch.", "porting"))]
        assert not bad, bad
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
