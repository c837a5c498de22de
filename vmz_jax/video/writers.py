"""What `vmz-jax extract` and `classify` write: one file per video, an index, failures, progress.

Layout of an output directory::

    OUT/<name>.npy          extract: the video's clip features, (clips, D) or (clips, views, D)
    OUT/<name>.npz          extract --audio with an audio-visual model: its "audio", "visual" and
                            "joint" features, each (clips, D) or (clips, views, D)
    OUT/<name>.jsonl        classify: one line per clip (its frames, seconds and top-k classes),
                            then one for the whole video (mean of the clip probabilities)
    OUT/index.jsonl         one line per video written: its output, clip count and times, probe
                            metadata, warnings (appended: a resumed run adds to it)
    OUT/failures.jsonl      one line per video that failed in the latest run, with the error

Every per-video file is written atomically (`vmz_jax.files`), so an existing output is complete and
a resumed run skips it. With several processes sharing OUT (`part` = (index, count)), the index and
failure files carry a `.IIIII-of-NNNNN` suffix so that no two processes append to the same file.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

import numpy as np

from vmz_jax.errors import VMZError
from vmz_jax.files import atomic_write

if TYPE_CHECKING:
    from vmz_jax.video.inputs import VideoJob
    from vmz_jax.video.pipeline import ClipSpan, VideoResult

__all__ = ["ClassWriter", "FeatureWriter", "NamedFeatureWriter", "OutputDir", "Progress", "Summary",
           "VideoWriter", "clip_record", "for_task", "output_path", "top", "write_all"]


# --- one file per video --------------------------------------------------------------------------

class VideoWriter(Protocol):
    """Writes one video's result to `target` (atomically) and returns its extra index fields."""

    suffix: str

    def __call__(self, result: VideoResult, target: Path) -> dict[str, Any]: ...


class FeatureWriter:
    """extract: the outputs as a .npy (no pickles, so anyone can load it safely)."""

    suffix = ".npy"

    def __call__(self, result: VideoResult, target: Path) -> dict[str, Any]:
        outputs = np.asarray(result.outputs)
        atomic_write(target, lambda f: np.save(f, outputs, allow_pickle=False))
        return {"shape": list(outputs.shape)}


class NamedFeatureWriter:
    """extract with an audio-visual model: its named features (audio, visual, joint) as one .npz."""

    suffix = ".npz"

    def __call__(self, result: VideoResult, target: Path) -> dict[str, Any]:
        outputs = result.outputs
        if not isinstance(outputs, dict):  # no clips: nothing was computed
            empty = np.asarray(outputs, np.float32)
            outputs = {name: empty for name in ("audio", "visual", "joint")}
        arrays = {name: np.asarray(value) for name, value in outputs.items()}
        atomic_write(target, lambda f: np.savez(f, allow_pickle=False, **arrays))
        return {"shape": {name: list(a.shape) for name, a in arrays.items()}}


def top(probs: np.ndarray, labels: Sequence[str], k: int) -> list[dict[str, Any]]:
    """The `k` best classes, best first (ties in class order)."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"label": labels[i], "index": int(i), "score": round(float(probs[i]), 6)} for i in order]


def clip_record(span: ClipSpan) -> dict[str, Any]:
    return {"clip": span.index, "start_frame": span.start, "end_frame": span.end,
            "start": span.start_s, "end": span.end_s, **({"padded": span.padded} if span.padded else {})}


class ClassWriter:
    """classify: JSON lines, the top-k classes of each clip and of the video."""

    suffix = ".jsonl"

    def __init__(self, labels: Sequence[str], top_k: int = 5):
        self.labels, self.top_k = list(labels), top_k

    def __call__(self, result: VideoResult, target: Path) -> dict[str, Any]:
        assert result.outputs is not None
        path, clips = result.job.path, result.clips
        lines = [{"video": path, **clip_record(s), "top": top(p, self.labels, self.top_k)}
                 for s, p in zip(clips, result.outputs, strict=True)]
        video = top(result.outputs.mean(axis=0), self.labels, self.top_k) if clips else []
        lines.append({"video": path, "clip": "video", "clips": len(clips), "top": video})
        atomic_write(target, "".join(json.dumps(line) + "\n" for line in lines), "w")
        return {"top": video}


def for_task(task: str, num_classes: int, labels: Sequence[str] | None = None, top_k: int = 5, *,
             named_features: bool = False) -> VideoWriter:
    """The writer of a command: "extract" or "classify" (with `labels` for the model's classes,
    default their indices). `named_features`: extract writes a dict of features (.npz)."""
    if task == "extract":
        return NamedFeatureWriter() if named_features else FeatureWriter()
    if task != "classify":
        raise VMZError(f"nothing writes {task!r} results: use extract or classify")
    names = list(labels) if labels is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise VMZError(f"{len(names)} labels for a model with {num_classes} classes")
    return ClassWriter(names, top_k)


def output_path(out_dir: Path, job: VideoJob, task: str) -> Path:
    return out_dir / f"{job.name}{'.npy' if task == 'extract' else '.jsonl'}"


# --- the directory ------------------------------------------------------------------------------

class OutputDir:
    """An output directory: per-video targets, the index and the failures of process `part`."""

    def __init__(self, out_dir: str | Path, suffix: str, part: tuple[int, int] = (0, 1)):
        self.root, self.suffix = Path(out_dir), suffix
        tag = "" if part[1] == 1 else f".{part[0]:05d}-of-{part[1]:05d}"
        self.index_path = self.root / f"index{tag}.jsonl"
        self.failures_path = self.root / f"failures{tag}.jsonl"

    def target(self, job: VideoJob) -> Path:
        return self.root / f"{job.name}{self.suffix}"

    def todo(self, jobs: Sequence[VideoJob], overwrite: bool) -> list[VideoJob]:
        """The jobs whose output is missing (all of them with `overwrite`)."""
        return [j for j in jobs if overwrite or not self.target(j).exists()]

    def record_failure(self, job: VideoJob, error: str) -> None:
        with open(self.failures_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"video": job.path, "error": error}) + "\n")


# --- progress -----------------------------------------------------------------------------------

@dataclass
class Summary:
    total: int
    done: int = 0
    skipped: int = 0
    failed: int = 0
    clips: int = 0
    failures_file: Path | None = None


class Progress:
    """One status line on stderr: rewritten in place on a terminal, printed every 30 s otherwise."""

    def __init__(self, task: str, total: int, enabled: bool, stream: TextIO | None = None):
        self.task, self.total, self.enabled = task, total, enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self.last = -math.inf
        self.shown = False

    def line(self, s: Summary) -> str:
        elapsed = time.monotonic() - self.start
        rate = s.clips / elapsed if elapsed > 0 else 0.0
        return (f"{self.task}: {s.done + s.failed + s.skipped}/{self.total} videos ({s.failed} failed, "
                f"{s.skipped} skipped), {s.clips} clips, {rate:.2f} clips/s, {elapsed:.0f} s")

    def update(self, s: Summary, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < (0.2 if self.tty else 30.0)):
            return
        self.last = now
        end = "" if self.tty else "\n"
        self.stream.write(("\r\033[K" if self.tty else "") + self.line(s) + end)
        self.stream.flush()
        self.shown = True

    def message(self, text: str) -> None:
        if self.tty and self.shown:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()
        if self.tty:
            self.last = -math.inf  # redraw the status line under the message

    def close(self, s: Summary) -> None:
        if self.enabled:
            self.update(s, force=True)
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()


# --- the loop -----------------------------------------------------------------------------------

def write_all(results: Iterable[VideoResult], out: OutputDir, writer: VideoWriter, summary: Summary,
              bar: Progress) -> Summary:
    """Write each result as it comes: its file, its index line (flushed, so that an interrupted run
    leaves a usable index), or its failure line; warnings and failures also go to `bar`'s stream."""
    out.root.mkdir(parents=True, exist_ok=True)
    out.failures_path.unlink(missing_ok=True)
    with open(out.index_path, "a", encoding="utf-8") as index:
        for result in results:
            job = result.job
            for warning in result.warnings:
                bar.message(f"{bar.task}: warning: {warning}")
            if result.error:
                summary.failed += 1
                bar.message(f"{bar.task}: failed: {result.error}")
                out.record_failure(job, result.error)
                bar.update(summary)
                continue
            target = out.target(job)
            target.parent.mkdir(parents=True, exist_ok=True)
            record = {"video": job.path, "output": target.relative_to(out.root).as_posix(),
                      "clips": len(result.clips), **result.info, **writer(result, target)}
            record["clip_times"] = [[s.start_s, s.end_s] for s in result.clips]
            if result.warnings:
                record["warnings"] = result.warnings
            index.write(json.dumps(record) + "\n")
            index.flush()
            summary.done += 1
            summary.clips += len(result.clips)
            bar.update(summary)
    bar.close(summary)
    if summary.failed:
        summary.failures_file = out.failures_path
    return summary
