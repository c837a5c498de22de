"""Turning command-line inputs (files, directories, globs, list files) into a list of videos with
the output name of each."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vmz_jax.errors import VMZError

#: Suffixes a directory walk picks up (case-insensitive). Files named explicitly may have any.
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".flv",
                            ".wmv", ".3gp", ".ts", ".mts", ".ogv", ".gif"})
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class VideoJob:
    """A video to process. `name` is its output name without suffix, relative to the output
    directory: the file name's stem, or for files found under a directory argument, the path
    below that directory (so ``videos/a/x.mp4`` from ``videos/`` is ``a/x``)."""

    path: str
    name: str


def _walk(root: str) -> list[VideoJob]:
    jobs = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for file in sorted(files):
            if file.startswith(".") or Path(file).suffix.lower() not in VIDEO_SUFFIXES:
                continue
            path = os.path.join(folder, file)
            name = Path(os.path.relpath(path, root)).with_suffix("").as_posix()
            jobs.append(VideoJob(path, name))
    return jobs


def _read_list(list_file: str) -> list[str]:
    try:
        with open(list_file, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except OSError as exc:
        raise VMZError(f"{list_file}: cannot read the list of videos ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise VMZError(f"{list_file}: the list of videos is not UTF-8 text") from None
    return [line for line in lines if line and not line.startswith("#")]


def collect(inputs: Sequence[str], list_files: Sequence[str] = ()) -> list[VideoJob]:
    """Every video named by `inputs` (files, directories walked recursively, glob patterns) and by
    the lines of `list_files` (one path per line; blank lines and ``#`` comments skipped), in order,
    each once. Files are taken as given, existing or not, so that a missing one is reported with the
    other failures; a directory with no videos or a pattern matching nothing is an error, and so are
    two videos that would write the same output."""
    items = list(inputs)
    for list_file in list_files:
        items += _read_list(list_file)
    jobs: list[VideoJob] = []
    for item in items:
        if os.path.isdir(item):
            found = _walk(item)
            if not found:
                raise VMZError(f"{item}: no video files in this directory (looked for "
                               f"{', '.join(sorted(VIDEO_SUFFIXES))})")
            jobs += found
        elif _GLOB_CHARS & set(item) and not os.path.exists(item):
            matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not matches:
                raise VMZError(f"{item}: the pattern matches no files")
            jobs += [VideoJob(p, Path(p).stem) for p in matches]
        else:
            jobs.append(VideoJob(item, Path(item).stem))
    unique: dict[str, VideoJob] = {}
    for job in jobs:
        unique.setdefault(os.path.abspath(job.path), job)
    by_name: dict[str, list[str]] = {}
    for job in unique.values():
        by_name.setdefault(job.name, []).append(job.path)
    clashes = [paths for paths in by_name.values() if len(paths) > 1]
    if clashes:
        shown = "; ".join(" and ".join(paths) for paths in clashes[:3])
        more = f" (and {len(clashes) - 3} more)" if len(clashes) > 3 else ""
        raise VMZError(f"videos with the same name would write the same output: {shown}{more}; "
                       "pass their directory instead, which keeps subfolders")
    return list(unique.values())


def share(jobs: list[VideoJob], index: int, count: int) -> list[VideoJob]:
    """Process `index` of `count`'s part of `jobs`: every count-th video, starting at `index`."""
    if not 0 <= index < count:
        raise VMZError(f"process index {index} is not in 0..{count - 1}")
    return jobs[index::count]
