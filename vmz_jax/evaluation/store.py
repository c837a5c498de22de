"""The evaluation's progress file: one JSON line per finished video, appended as videos finish.

``DIR/progress.jsonl`` holds, per video, its index in the dataset, path, true label, the number of
views scored, how many of them were right on their own, and the averaged scores (float32, base64
of the little-endian bytes, so they read back bit for bit); or, for a video that could not be read,
the error. Lines are appended and flushed one at a time, so a killed run (SIGKILL included) loses at
most the line being written; a rerun reads the complete lines, cuts a torn last line off, and skips
those videos. The final reports are always recomputed from this file, which makes a resumed run's
reports equal to an uninterrupted one's.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from vmz_jax.errors import VMZError

__all__ = ["Entry", "ProgressFile"]


@dataclass
class Entry:
    """One finished video: `scores` (classes,) float32 and counts, or `error`; `audio`: its audio
    track's status ("present", "short", "missing") for the models that take log-mels."""

    index: int
    path: str
    label: int
    scores: np.ndarray | None = None
    views: int = 0
    clip_correct: int = 0
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    audio: str | None = None

    def to_json(self) -> str:
        record: dict[str, Any] = {"index": self.index, "path": self.path, "label": self.label}
        if self.error is not None:
            record["error"] = self.error
        else:
            assert self.scores is not None
            data = np.ascontiguousarray(self.scores, "<f4").tobytes()
            record.update(views=self.views, clip_correct=self.clip_correct,
                          scores=base64.b64encode(data).decode("ascii"), warnings=self.warnings)
            if self.audio is not None:
                record["audio"] = self.audio
        return json.dumps(record, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, num_classes: int) -> Entry:
        record = json.loads(text)
        if "error" in record:
            return cls(int(record["index"]), str(record["path"]), int(record["label"]),
                       error=str(record["error"]))
        scores = np.frombuffer(base64.b64decode(record["scores"]), "<f4").astype(np.float32)
        if scores.shape != (num_classes,):
            raise ValueError(f"{scores.size} scores, expected {num_classes}")
        return cls(int(record["index"]), str(record["path"]), int(record["label"]), scores,
                   int(record["views"]), int(record["clip_correct"]), list(record.get("warnings", [])),
                   audio=record.get("audio"))


class ProgressFile:
    """Read the finished videos of `path`, then append new ones (`add`)."""

    def __init__(self, path: str | os.PathLike[str], num_classes: int):
        self.path = os.fspath(path)
        self.num_classes = num_classes
        self.entries: dict[int, Entry] = {}
        self._file: IO[str] | None = None
        if os.path.exists(self.path):
            self._read()

    def _read(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        good = data.rfind(b"\n") + 1  # a torn last line (no newline yet) is cut off below
        for number, line in enumerate(data[:good].splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = Entry.from_json(line.decode("utf-8"), self.num_classes)
            except (ValueError, KeyError, TypeError) as exc:
                raise VMZError(f"{self.path}: line {number} is not a finished video ({exc}); remove "
                               "the file (or pass --overwrite) to start over") from None
            self.entries[entry.index] = entry
        if good < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def add(self, entry: Entry) -> None:
        """Append `entry` (one line, flushed to the OS at once)."""
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open; see close)
        self._file.write(entry.to_json() + "\n")
        self._file.flush()
        self.entries[entry.index] = entry

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
