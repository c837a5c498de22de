"""vmz_jax.files: a target is absent, its old version, or complete; never half-written."""

import os
import stat

import pytest

from vmz_jax import files


def _listing(directory):
    return sorted(p.name for p in directory.iterdir())


class _Crash(Exception):
    pass


def test_file_appears_complete_with_usual_permissions(tmp_path):
    target = tmp_path / "out.bin"
    with files.atomic_file(target) as f:
        f.write(b"abc")
        assert not target.exists()  # nothing under the final name until the end
        (tmp_name,) = [p for p in _listing(tmp_path)]
        assert tmp_name.startswith(".out.bin.") and tmp_name.endswith(".tmp")
    assert target.read_bytes() == b"abc" and _listing(tmp_path) == ["out.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("error", [_Crash, KeyboardInterrupt])
def test_crash_mid_write_leaves_nothing(tmp_path, error):
    target = tmp_path / "new.npy"
    with pytest.raises(error), files.atomic_file(target) as f:
        f.write(b"partial")
        raise error()
    assert _listing(tmp_path) == []


def test_crash_mid_overwrite_keeps_the_old_file(tmp_path):
    target = tmp_path / "x.jsonl"
    target.write_text("old\n")

    def explode(f):
        f.write("half a line")
        raise _Crash

    with pytest.raises(_Crash):
        files.atomic_write(target, explode, "w")
    assert target.read_text() == "old\n" and _listing(tmp_path) == ["x.jsonl"]
    files.atomic_write(target, "new\n", "w")
    assert target.read_text() == "new\n"


def test_file_and_directory_are_fsynced(tmp_path, monkeypatch):
    """The data is fsynced before the rename and the directory after it (a rename is only durable
    once its directory is)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(("fsync", kind, os.fstat(fd).st_size if kind == "file" else None))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst), None))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    files.atomic_write(tmp_path / "a.txt", "hello", "w")
    assert events == [("fsync", "file", 5), ("replace", "a.txt", None), ("fsync", "dir", None)]


def test_fsync_dir_is_best_effort(tmp_path):
    files.fsync_dir(tmp_path)
    files.fsync_dir(tmp_path / "missing")  # no error: durability is not worth failing a write for


def test_atomic_file_refuses_non_write_modes(tmp_path):
    with pytest.raises(ValueError, match="mode"), files.atomic_file(tmp_path / "a", "ab"):
        pass
    assert _listing(tmp_path) == []


def test_directory_appears_complete(tmp_path):
    target = tmp_path / "sub" / "ckpt"
    with files.atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
        assert not target.exists()
    assert _listing(target) == ["a"] and _listing(tmp_path / "sub") == ["ckpt"]


def test_crash_in_directory_leaves_nothing_and_keeps_old(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(_Crash), files.atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
        raise _Crash
    assert _listing(tmp_path) == []
    target.mkdir()
    (target / "old").write_text("0")
    with pytest.raises(_Crash), files.atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new").write_text("1")
        raise _Crash
    assert _listing(tmp_path) == ["ckpt"] and _listing(target) == ["old"]


def test_directory_overwrite_and_refusal(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old").write_text("0")
    with pytest.raises(FileExistsError), files.atomic_dir(target):
        pass
    with files.atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new").write_text("1")
    assert _listing(target) == ["new"] and _listing(tmp_path) == ["ckpt"]


def test_directory_created_meanwhile_wins(tmp_path):
    """Another writer that finishes first keeps its (complete) directory; ours is discarded."""
    target = tmp_path / "ckpt"
    with pytest.raises(FileExistsError), files.atomic_dir(target) as tmp:
        (tmp / "ours").write_text("1")
        target.mkdir()
        (target / "theirs").write_text("2")
    assert _listing(target) == ["theirs"] and _listing(tmp_path) == ["ckpt"]


def test_failed_swap_puts_the_old_directory_back(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old").write_text("0")
    real_rename = os.rename

    def rename(src, dst):
        if os.fspath(src).endswith(".tmp") and os.fspath(dst) == str(target):
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="No space"), files.atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new").write_text("1")
    assert _listing(tmp_path) == ["ckpt"] and _listing(target) == ["old"]
