"""Videos in, per-clip features or class probabilities out, with the accelerator kept busy.

`run(model, videos, task, options)` yields one `VideoResult` per video. Inside:

* decode workers (threads; ffmpeg runs as a child process of each) probe, decode, preprocess and
  cut clips, and hand them over a bounded queue, so decoding overlaps the model and memory stays flat;
* clip views are batched by shape into fixed-size batches (the last one padded), so each input shape
  compiles once; the batch is split over all local devices (`jax.sharding`, a 1-D "data" mesh) and
  dispatched asynchronously, one batch in flight while the next is assembled;
* a video's result is yielded once its decoding has finished and all its clips are computed. A video
  that fails (unreadable, truncated, ...) yields a result with `error` set; the others go on.

`write(results, out_dir, ...)` is what the `vmz-jax extract`/`classify` commands do with them.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vmz_jax.errors import VMZError
from vmz_jax.models import registry
from vmz_jax.video import clips as clipping
from vmz_jax.video import decode as video
from vmz_jax.video.inputs import VideoJob
from vmz_jax.video.preprocess import Preprocess

Task = Literal["extract", "classify", "logits"]
Pool = Literal["mean", "max"]


@dataclass(frozen=True)
class Options:
    """How videos become model inputs, and how they are batched. See `default_options` for the
    per-architecture defaults the command line uses."""

    sampling: clipping.ClipSampling = field(default_factory=clipping.ClipSampling)
    preprocess: Preprocess = field(default_factory=Preprocess)
    fps: float | None = None
    pool_spatial: Pool = "mean"
    pool_temporal: Pool = "mean"
    batch_size: int = 4
    workers: int = 2
    ffmpeg_threads: int = 1
    strict: bool = True

    def __post_init__(self) -> None:
        if self.pool_spatial not in ("mean", "max") or self.pool_temporal not in ("mean", "max"):
            raise VMZError("pooling must be mean or max")
        if min(self.batch_size, self.workers, self.ffmpeg_threads) < 1:
            raise VMZError("batch size, workers and ffmpeg threads must be at least 1")
        if self.fps is not None and not self.fps > 0:
            raise VMZError(f"fps must be positive, not {self.fps}")


def default_options(arch: str | registry.ModelEntry) -> dict[str, Any]:
    """Per-architecture defaults, the registry's `ModelEntry.input`: ig65m-pytorch's `extract`
    (32-frame clips, short side 128, no crop) for the R(2+1)D/R3D/MC family, short side 256 for CSN
    (its evaluation size upstream), and 16-frame 112x112 centre crops of a 128 short side for C3D,
    which accepts nothing else."""
    given = registry.get(arch).input
    return {"clip_len": given.clip_length, "frame_size": given.short_side, "crop": given.crop,
            "crop_size": given.crop_size, "sampling_rate": given.sampling_rate}


@dataclass(frozen=True)
class ClipSpan:
    """Where a clip is in its video: frames [start, end) (decoded frame numbers) and seconds."""

    index: int
    start: int
    end: int
    start_s: float | None
    end_s: float | None
    padded: int


@dataclass
class VideoResult:
    """One video's outcome. `outputs`: for extract, features (clips, D) or (clips, views, D) with
    several crops; for classify, softmax probabilities (clips, classes) averaged over the views; for
    logits, the logits (clips, classes) averaged over the views.
    `error` is set (and `outputs` None) when the video could not be processed."""

    job: VideoJob
    outputs: np.ndarray | None = None
    clips: list[ClipSpan] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None


# --- the model side ---------------------------------------------------------------------------

def _reduce(x: jax.Array, how: Pool, axes: tuple[int, ...]) -> jax.Array:
    return jnp.max(x, axis=axes) if how == "max" else jnp.mean(x, axis=axes)


def feature_dim(model: nnx.Module) -> int:
    return int(model.fc.in_features)


def num_classes(model: nnx.Module) -> int:
    return int(model.fc.out_features)


@functools.lru_cache(maxsize=16)
def _compiled_forward(graphdef: Any, task: Task, is_c3d: bool, spatial: Pool, temporal: Pool,
                      replicated: NamedSharding, sharded: NamedSharding) -> Any:
    """One jitted function per (model structure, task, pooling, devices), so that running the
    pipeline again (another `run`, another `features` call) reuses the compiled executables."""

    def forward(state: nnx.State, x: jax.Array) -> jax.Array:
        net = nnx.merge(graphdef, state)
        if task == "classify":
            return jax.nn.softmax(net(x).astype(jnp.float32), axis=-1)
        if task == "logits":
            return net(x).astype(jnp.float32)
        if is_c3d:
            return net.features(x)
        h = net.stage_outputs(x)["layer4"].astype(jnp.float32)
        return _reduce(_reduce(h, spatial, (2, 3)), temporal, (1,))

    return jax.jit(forward, in_shardings=(replicated, sharded), out_shardings=sharded)


class Engine:
    """The model as one jitted function of a fixed-size batch, split over the local devices."""

    def __init__(self, model: nnx.Module, task: Task, options: Options):
        from vmz_jax.models import C3D

        is_c3d = isinstance(model, C3D)
        if task == "extract" and is_c3d and (options.pool_spatial, options.pool_temporal) != ("mean", "mean"):
            raise VMZError("C3D's features are its fc7 activations: there is nothing to pool")
        devices = jax.local_devices()
        self.mesh = Mesh(np.array(devices), ("data",))
        self.batch_size = math.ceil(options.batch_size / len(devices)) * len(devices)
        self.input_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        graphdef, state = nnx.split(model)
        self.state = jax.device_put(state, replicated)
        self._forward = _compiled_forward(graphdef, task, is_c3d, options.pool_spatial,
                                          options.pool_temporal, replicated, self.input_sharding)

    def __call__(self, batch: np.ndarray) -> jax.Array:
        """Dispatch a (batch_size, T, H, W, 3) float32 batch; the result is computed asynchronously."""
        x = jax.device_put(batch, self.input_sharding)
        return self._forward(self.state, x)


# --- the decoding side -------------------------------------------------------------------------

_EXIT = object()
#: Seconds without a new clip, with nothing running, after which partly filled batches whose videos
#: are completely decoded run padded rather than wait for more clips of their shape.
STALL_FLUSH_S = 2.0


class _Decoders:
    """Worker threads that turn jobs into clip messages on a bounded queue."""

    def __init__(self, jobs: Sequence[VideoJob], options: Options, capacity: int):
        self.options = options
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=capacity)
        self.stop = threading.Event()
        self._jobs = iter(enumerate(jobs))
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._work, name=f"vmz-decode-{i}", daemon=True)
                        for i in range(options.workers)]
        for thread in self.threads:
            thread.start()

    def _put(self, item: Any) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _work(self) -> None:
        try:
            while not self.stop.is_set():
                with self._lock:
                    nxt = next(self._jobs, None)
                if nxt is None:
                    break
                number, job = nxt
                try:
                    self._decode(number, job)
                except video.VideoError as exc:
                    self._put(("fail", number, str(exc)))
                except VMZError as exc:
                    self._put(("fail", number, f"{job.path}: {exc}"))
                except Exception as exc:  # a bug or an OS error: still only this video fails
                    self._put(("fail", number, f"{job.path}: {type(exc).__name__}: {exc}"))
        finally:
            self._put(_EXIT)

    def _decode(self, number: int, job: VideoJob) -> None:
        options, sampling, pre = self.options, self.options.sampling, self.options.preprocess
        info = video.probe(job.path)
        pre.view_shape(info.height, info.width)  # a crop that does not fit fails before decoding
        total = (video.count_frames(job.path, options.fps, options.ffmpeg_threads)
                 if sampling.num_clips else None)
        report = video.DecodeReport()
        frames = video.decode(info, fps=options.fps, size=pre.ffmpeg_size(info.height, info.width),
                              threads=options.ffmpeg_threads, report=report, strict=options.strict)
        spans = []
        rate = video.fps_or_default(info, options.fps)
        try:
            for clip in clipping.assemble((pre(f) for f in frames), sampling, total):
                if self.stop.is_set():
                    return
                spans.append(_span(clip, rate))
                self._put(("clip", number, clip.index, clipping.stack(clip)))
        finally:
            frames.close()
        warnings = list(report.warnings)
        if report.frames < sampling.span:
            outcome = (f"{len(spans)} clip(s) padded with its last frame" if spans else "no clips")
            warnings.append(f"{job.path}: {report.frames} frames is shorter than one clip "
                            f"({sampling.span} frames): {outcome}")
        elif total is not None and report.frames < total:
            warnings.append(f"{job.path}: decoded {report.frames} frames, the container counts {total}: "
                            "the last clips repeat the last frame")
        meta = {"codec": info.codec, "width": info.width, "height": info.height, "fps": info.fps,
                "duration": info.duration, "rotation": info.rotation, "frames": report.frames,
                "decoded_fps": None if math.isnan(rate) else rate}
        self._put(("done", number, spans, meta, warnings))


def _span(clip: clipping.Clip[Any], rate: float) -> ClipSpan:
    def seconds(frame: int) -> float | None:
        return None if math.isnan(rate) else round(frame / rate, 6)

    return ClipSpan(clip.index, clip.start, clip.end, seconds(clip.start), seconds(clip.end), clip.padded)


# --- putting them together ---------------------------------------------------------------------

@dataclass
class _Pending:
    result: VideoResult
    views: dict[int, np.ndarray] = field(default_factory=dict)  # clip index -> (views, out)
    computed: dict[int, int] = field(default_factory=dict)  # clip index -> views computed
    outstanding: int = 0
    decoded: bool = False


def run(model: nnx.Module, videos: Iterable[VideoJob | str | os.PathLike[str]], task: Task = "extract",
        options: Options | None = None) -> Iterator[VideoResult]:
    """One `VideoResult` per video, in the order they finish (not necessarily the input order)."""
    options = options or Options()
    jobs = [v if isinstance(v, VideoJob) else VideoJob(os.fspath(v), Path(os.fspath(v)).stem) for v in videos]
    if not jobs:
        return
    engine = Engine(model, task, options)
    out_dim = feature_dim(model) if task == "extract" else num_classes(model)
    num_views = options.preprocess.num_views
    pending: dict[int, _Pending] = {}
    buckets: dict[tuple[int, ...], list[tuple[int, int, int, np.ndarray]]] = {}
    in_flight: collections.deque[tuple[list[tuple[int, int, int]], jax.Array]] = collections.deque()
    finished: list[VideoResult] = []

    def state(number: int) -> _Pending:
        if number not in pending:
            pending[number] = _Pending(VideoResult(jobs[number]))
        return pending[number]

    def finish_if_complete(number: int) -> None:
        p = pending.get(number)
        if p is None or not p.decoded or p.outstanding:
            return
        del pending[number]
        per_clip = [p.views[span.index] for span in p.result.clips]
        outputs = (np.stack(per_clip) if per_clip
                   else np.zeros((0, num_views, out_dim), np.float32))
        if task != "extract":
            outputs = outputs.mean(axis=1)
        elif num_views == 1:
            outputs = outputs[:, 0]
        p.result.outputs = outputs.astype(np.float32, copy=False)
        finished.append(p.result)

    def collect() -> None:
        keys, result = in_flight.popleft()
        values = np.asarray(result)
        for row, (number, clip, view) in enumerate(keys):
            p = pending.get(number)
            if p is None or p.result.error:
                continue
            p.views.setdefault(clip, np.zeros((num_views, out_dim), np.float32))[view] = values[row]
            p.outstanding -= 1
            finish_if_complete(number)

    def dispatch(shape: tuple[int, ...]) -> None:
        items = buckets.pop(shape)
        batch = np.zeros((engine.batch_size, *shape), np.float32)
        for row, (*_, array) in enumerate(items):
            batch[row] = array
        in_flight.append(([(n, c, v) for n, c, v, _ in items], engine(batch)))
        if len(in_flight) > 1:
            collect()

    capacity = max(2 * engine.batch_size // num_views, 2 * options.workers, 2)
    decoders = _Decoders(jobs, options, capacity)
    exited = 0
    try:
        idle_since = time.monotonic()
        while exited < len(decoders.threads):
            try:
                item = decoders.queue.get(timeout=0.1)
            except queue.Empty:
                while in_flight and in_flight[0][1].is_ready():
                    collect()
                if not in_flight and time.monotonic() - idle_since > STALL_FLUSH_S:
                    # Decoding has stalled and the device is idle: run the batches whose videos
                    # are all decoded (and wait only for them), padded, instead of at the end.
                    for shape in [k for k, items in buckets.items()
                                  if all(pending[n].decoded for n, *_ in items if n in pending)]:
                        dispatch(shape)
                    idle_since = time.monotonic()
                yield from _drain(finished)
                continue
            idle_since = time.monotonic()
            if item is _EXIT:
                exited += 1
                continue
            kind, number = item[0], item[1]
            p = state(number)
            if kind == "clip":
                _, _, clip, array = item
                for view in range(array.shape[0]):
                    bucket = buckets.setdefault(array.shape[1:], [])
                    bucket.append((number, clip, view, array[view]))
                    p.outstanding += 1
                    if len(bucket) == engine.batch_size:
                        dispatch(array.shape[1:])
            elif kind == "done":
                _, _, spans, meta, warnings = item
                p.result.clips, p.result.info, p.result.warnings = spans, meta, warnings
                p.decoded = True
                finish_if_complete(number)
            else:
                p.result.error = item[2]
                del pending[number]
                finished.append(p.result)
            yield from _drain(finished)
        for shape in list(buckets):
            dispatch(shape)
        while in_flight:
            collect()
        yield from _drain(finished)
    finally:
        decoders.stop.set()
        for thread in decoders.threads:
            thread.join(timeout=5)


def _drain(finished: list[VideoResult]) -> Iterator[VideoResult]:
    while finished:
        yield finished.pop(0)


def features(model: nnx.Module, path: str | os.PathLike[str], options: Options | None = None) -> np.ndarray:
    """The clip features of one video, (clips, D) (or (clips, views, D) with three crops)."""
    (result,) = run(model, [path], "extract", options)
    if result.error:
        raise video.VideoError(result.error)
    assert result.outputs is not None
    return result.outputs


# --- writing results ---------------------------------------------------------------------------

def atomic_write(path: Path, write: Any, mode: str = "wb") -> None:
    """Write `path` through a hidden temporary file beside it, renamed into place when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def output_path(out_dir: Path, job: VideoJob, task: Task) -> Path:
    return out_dir / f"{job.name}{'.npy' if task == 'extract' else '.jsonl'}"


def _top(probs: np.ndarray, labels: Sequence[str], k: int) -> list[dict[str, Any]]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"label": labels[i], "index": int(i), "score": round(float(probs[i]), 6)} for i in order]


def _clip_record(span: ClipSpan) -> dict[str, Any]:
    return {"clip": span.index, "start_frame": span.start, "end_frame": span.end,
            "start": span.start_s, "end": span.end_s, **({"padded": span.padded} if span.padded else {})}


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


def write(model: nnx.Module, jobs: Sequence[VideoJob], out_dir: str | os.PathLike[str], task: Task,
          options: Options, *, labels: Sequence[str] | None = None, top_k: int = 5, overwrite: bool = False,
          progress: bool = True, part: tuple[int, int] = (0, 1), command: str = "vmz-jax",
          stream: TextIO | None = None) -> Summary:
    """Run `jobs` and write each video's output under `out_dir` (atomically), an index of JSON lines
    (``index.jsonl``) and the failures (``failures.jsonl``; one line each on `stream` too). Videos
    whose output exists are skipped unless `overwrite`. `part` = (this process, processes) only
    changes the index and failure file names, so that several processes can share `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stream = stream or sys.stderr
    suffix = "" if part[1] == 1 else f".{part[0]:05d}-of-{part[1]:05d}"
    index_path, failures_path = out / f"index{suffix}.jsonl", out / f"failures{suffix}.jsonl"
    todo = [j for j in jobs if overwrite or not output_path(out, j, task).exists()]
    summary = Summary(total=len(jobs), skipped=len(jobs) - len(todo))
    bar = Progress(f"{command} {task}", len(jobs), progress, stream)
    if task == "classify":
        classes = num_classes(model)
        labels = list(labels) if labels is not None else [str(i) for i in range(classes)]
        if len(labels) != classes:
            raise VMZError(f"{len(labels)} labels for a model with {classes} classes")
    failures_path.unlink(missing_ok=True)
    with open(index_path, "a", encoding="utf-8") as index:
        for result in run(model, todo, task, options):
            job, target = result.job, output_path(out, result.job, task)
            for warning in result.warnings:
                bar.message(f"{command} {task}: warning: {warning}")
            if result.error:
                summary.failed += 1
                bar.message(f"{command} {task}: failed: {result.error}")
                with open(failures_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"video": job.path, "error": result.error}) + "\n")
                bar.update(summary)
                continue
            assert result.outputs is not None
            record = {"video": job.path, "output": target.relative_to(out).as_posix(),
                      "clips": len(result.clips), **result.info}
            if task == "extract":
                outputs = result.outputs
                atomic_write(target, lambda f, a=outputs: np.save(f, a, allow_pickle=False))
                record["shape"] = list(outputs.shape)
            else:
                assert labels is not None
                mean = (result.outputs.mean(axis=0) if len(result.clips)
                        else np.full(len(labels), np.nan, np.float32))
                lines = [{"video": job.path, **_clip_record(s), "top": _top(p, labels, top_k)}
                         for s, p in zip(result.clips, result.outputs, strict=True)]
                video_line = {"video": job.path, "clip": "video", "clips": len(result.clips),
                              "top": _top(mean, labels, top_k) if len(result.clips) else []}
                text = "".join(json.dumps(line) + "\n" for line in [*lines, video_line])
                atomic_write(target, lambda f, t=text: f.write(t), mode="w")
                record["top"] = video_line["top"]
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
        summary.failures_file = failures_path
    return summary
