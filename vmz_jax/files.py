"""Atomic writes: a file or a directory is either absent (or its previous version) or complete.

Everything vmz_jax writes (feature files, classification lines, ported weights, Orbax checkpoints,
downloads) goes through here, so that an interrupted run (Ctrl-C, a full disk, a crash, a power cut)
never leaves a half-written file under the final name, where a later run would take it for a result
and skip or load it. The recipe is the usual one: write a hidden temporary sibling (same directory, so
the rename cannot cross file systems), flush and fsync it, `os.replace` it over the target, then fsync
the directory so that the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_dir", "atomic_file", "atomic_write", "fsync_dir", "temp_sibling"]

StrPath = str | os.PathLike[str]


def fsync_dir(directory: StrPath) -> None:
    """Make the renames and creations in `directory` durable.

    Best effort: some file systems (and Windows) cannot open or fsync a directory, and a failure here
    must not turn a completely written file into an error."""
    with contextlib.suppress(OSError):
        fd = os.open(os.fspath(directory), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_sibling(path: StrPath, suffix: str = ".tmp") -> str:
    """A fresh hidden name beside `path` (random, so concurrent writers never share one)."""
    name = os.path.abspath(os.fspath(path))
    parent, base = os.path.split(name)
    return os.path.join(parent, f".{base}.{secrets.token_hex(6)}{suffix}")


@contextlib.contextmanager
def atomic_file(path: StrPath, mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path` for writing; on a clean exit it replaces `path`.

    On any exception (KeyboardInterrupt included) the temporary file is removed and `path` is left as
    it was. The parent directory must exist. The file gets the usual permissions (0o666 less the
    umask), not the 0o600 of `tempfile`, since it becomes the user's output. Text modes default to
    UTF-8 rather than the locale's encoding, so outputs do not depend on the environment.
    """
    if not mode.startswith("w"):
        raise ValueError(f"atomic_file writes a new file: mode must start with 'w', not {mode!r}")
    target = os.path.abspath(os.fspath(path))
    tmp = temp_sibling(target)
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(target))


def atomic_write(path: StrPath, write: Callable[[IO[Any]], object] | bytes | str, mode: str = "wb", *,
                 encoding: str | None = None) -> None:
    """Write `path` atomically: `write` is the content (bytes/str) or a function of the open file."""
    with atomic_file(path, mode, encoding=encoding) as f:
        if callable(write):
            write(f)
        else:
            f.write(write)


def json_differences(stored: Any, current: Any, prefix: str = "") -> list[str]:
    """What differs between two JSON values: dotted keys present on one side only, and
    `key (old -> new)` for changed leaves; [] when equal."""
    if isinstance(stored, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(stored) | set(current)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in stored or key not in current:
                out.append(name)
            else:
                out += json_differences(stored[key], current[key], name)
        return out
    if stored != current:
        return [f"{prefix or 'value'} ({stored!r} -> {current!r})"]
    return []


def pin_json(path: StrPath, record: Any) -> list[str]:
    """Pin `record` (JSON-serialisable) at `path`: written atomically when the file does not exist,
    otherwise compared with what is stored. Returns the differences ([] = the same record), so a run
    directory can refuse to continue a different run. Raises ValueError if the stored file is not
    JSON, OSError if it cannot be read or written."""
    record = json.loads(json.dumps(record))  # tuples -> lists, as they read back
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                stored = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{os.fspath(path)}: not a JSON file ({exc})") from None
        return json_differences(stored, record)
    atomic_write(path, json.dumps(record, indent=1, sort_keys=True) + "\n", "w", encoding="utf-8")
    return []


@contextlib.contextmanager
def atomic_dir(path: StrPath, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling directory of `path`; on a clean exit it becomes `path`.

    On any exception the temporary directory is removed and `path` is left as it was. An existing
    `path` is FileExistsError (checked before and again when moving into place, so a concurrent
    writer that got there first wins and its complete directory is kept) unless `overwrite`: then the
    old one is renamed aside, the new one renamed in, and only then the old one deleted; a failed
    rename puts the old one back. (Between those two renames `path` is briefly absent: POSIX cannot
    swap two directories in one step.)
    """
    target = os.path.abspath(os.fspath(path))
    if os.path.lexists(target) and not overwrite:
        raise FileExistsError(errno.EEXIST, "already exists", target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = temp_sibling(target)
    os.mkdir(tmp)
    try:
        yield Path(tmp)
        fsync_dir(tmp)
        _move_dir_into_place(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(parent)


def _move_dir_into_place(tmp: str, target: str, overwrite: bool) -> None:
    if not os.path.lexists(target):
        try:
            os.rename(tmp, target)  # fails if another writer got there first: theirs is complete too
        except OSError as exc:
            if os.path.lexists(target) and not overwrite:
                raise FileExistsError(errno.EEXIST, "already exists", target) from exc
            raise
        return
    if not overwrite:
        raise FileExistsError(errno.EEXIST, "already exists", target)
    old = temp_sibling(target, ".old")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.unlink(old)
