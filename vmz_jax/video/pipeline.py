"""Videos in, per-clip features or class probabilities out, with the accelerator kept busy.

`run(model, videos, task, options)` yields one `VideoResult` per video. Inside:

* decode workers (threads; ffmpeg runs as a child process of each) probe, decode, preprocess and
  cut clips, and hand them over a bounded queue, so decoding overlaps the model and memory stays flat;
* the model is one function, `vmz_jax.models.forward.make_forward`, chosen by the task ("extract":
  pooled features, "classify": probabilities, "logits");
* clip views go through a `vmz_jax.video.batcher.Batcher`: batched by shape into fixed-size batches
  (the last one padded), so each input shape compiles once, split over all local devices and
  dispatched asynchronously, one batch in flight while the next is assembled;
* a video's result is yielded once its decoding has finished and all its clips are computed. A video
  that fails (unreadable, truncated, ...) yields a result with `error` set; the others go on.

With `Options.audio` (`vmz-jax extract/classify --audio`, the audio and audio-visual models), each
clip also carries its log-mels, (F, 40) float32 (F = 100), cut from the video's audio track as VMZ's
``AVInput`` op does (`vmz_jax.video.audio`), and the model is called as ``model(clips, logmels,
head=...)`` / ``model.features(clips, logmels)`` (audio-visual: audio, visual and joint features) or
``model(logmels)`` / ``model.features(logmels)`` (audio only; their log-mels are cut from the raw
frames, as VMZ's audio-only input, not stretched over the video); see `audio_output` and
`Options.align_audio`. The index records per video whether its audio was present, short or missing.

`write(results, out_dir, ...)` is what the `vmz-jax extract`/`classify` commands do with them; the
files themselves are `vmz_jax.video.writers`.
"""

from __future__ import annotations

import dataclasses
import functools
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

from vmz_jax.errors import VMZError
from vmz_jax.files import atomic_write
from vmz_jax.models import registry
from vmz_jax.models.forward import Forward, make_forward
from vmz_jax.video import audio as sound
from vmz_jax.video import batcher as batching
from vmz_jax.video import clips as clipping
from vmz_jax.video import decode as video
from vmz_jax.video import writers
from vmz_jax.video.inputs import VideoJob
from vmz_jax.video.preprocess import Preprocess
from vmz_jax.video.writers import Progress, Summary, output_path

__all__ = ["HEADS", "ClipSpan", "Engine", "Options", "Progress", "Summary", "VideoResult", "atomic_write",
           "audio_output", "default_options", "feature_dim", "features", "is_audio_visual", "num_classes",
           "output_path", "run", "run_forward", "task_forward", "write"]

Task = Literal["extract", "classify", "logits"]
Pool = Literal["mean", "max"]
#: The heads of an audio-visual model (Gradient-Blending's fusion, audio-only and visual-only ones).
HEADS: tuple[str, ...] = ("av", "audio", "visual")


@dataclass(frozen=True)
class Options:
    """How videos become model inputs, and how they are batched. See `default_options` for the
    per-architecture defaults the command line uses.

    `audio`: each clip also carries its log-mels (see the module docstring); `head`: the head of an
    audio-visual model that "logits"/"classify" report. `align_audio`: stretch the log-mels over the
    video, VMZ's input with video (``align_audio=1``), or (False) cut them from the raw frames, 100 a
    second, VMZ's audio-only input; None (default): aligned for audio-visual models, raw for audio-only
    ones (`run` decides from the model)."""

    sampling: clipping.ClipSampling = field(default_factory=clipping.ClipSampling)
    preprocess: Preprocess = field(default_factory=Preprocess)
    fps: float | None = None
    pool_spatial: Pool = "mean"
    pool_temporal: Pool = "mean"
    batch_size: int = 4
    workers: int = 2
    ffmpeg_threads: int = 1
    strict: bool = True
    audio: bool = False
    head: str = "av"
    align_audio: bool | None = None

    def __post_init__(self) -> None:
        if self.pool_spatial not in ("mean", "max") or self.pool_temporal not in ("mean", "max"):
            raise VMZError("pooling must be mean or max")
        if min(self.batch_size, self.workers, self.ffmpeg_threads) < 1:
            raise VMZError("batch size, workers and ffmpeg threads must be at least 1")
        if self.fps is not None and not self.fps > 0:
            raise VMZError(f"fps must be positive, not {self.fps}")
        if self.head not in HEADS:
            raise VMZError(f"unknown head {self.head!r}: use one of {', '.join(HEADS)}")
        if self.audio and (self.pool_spatial, self.pool_temporal) != ("mean", "mean"):
            raise VMZError("the audio models' features are pooled by the models themselves: use mean pooling")


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

#: What each task computes per clip view, and whether the views of a clip are averaged.
TASK_OUTPUTS: dict[str, tuple[str, bool]] = {"extract": ("features", False),
                                             "classify": ("probabilities", True),
                                             "logits": ("logits", True)}


def feature_dim(model: nnx.Module) -> int:
    return int(model.fc.in_features)


def num_classes(model: nnx.Module) -> int:
    return int(model.fc.out_features)


def is_audio_visual(model: nnx.Module) -> bool:
    """Whether `model` takes clips and log-mels and has several heads (`model.heads`)."""
    return callable(getattr(model, "heads", None))


@functools.cache
def audio_output(output: str, head: str = "av") -> Any:
    """The output function (`make_forward`'s callable form) of a model that takes log-mels, for inputs
    ``x = (clips, logmels)``: an audio-visual model (`is_audio_visual`) gets both, ``model(clips,
    logmels, head=head)`` and ``model.features(clips, logmels)`` (a dict: audio, visual, joint); an
    audio-only model gets the log-mels, ``model(logmels)`` and ``model.features(logmels)``. One
    function object per (output, head), so that jit caches are shared."""
    if output not in ("logits", "probabilities", "features"):
        raise VMZError(f"the audio models have no {output!r} output: use logits, probabilities or features")

    def forward(net: nnx.Module, x: tuple[jax.Array, jax.Array]) -> Any:
        clips, logmels = x
        both = is_audio_visual(net)
        if output == "features":
            out = net.features(clips, logmels) if both else net.features(logmels)
            return jax.tree.map(lambda a: a.astype(jnp.float32), out)
        logits = (net(clips, logmels, head=head) if both else net(logmels)).astype(jnp.float32)
        return jax.nn.softmax(logits, axis=-1) if output == "probabilities" else logits

    forward.__name__ = forward.__qualname__ = f"audio_{output}_{head}"
    return forward


def task_forward(model: nnx.Module, task: Task, options: Options) -> Forward:
    """The forward of a task: pooled features (with the options' pooling), probabilities or logits;
    with `options.audio` one of `audio_output`, whose input is the pair (clips, logmels)."""
    if task not in TASK_OUTPUTS:
        raise VMZError(f"unknown task {task!r}: use one of {', '.join(TASK_OUTPUTS)}")
    output, _ = TASK_OUTPUTS[task]
    if options.audio:
        return make_forward(model, audio_output(output, options.head))
    pools = (options.pool_spatial, options.pool_temporal) if output == "features" else ("mean", "mean")
    return make_forward(model, output, pool_spatial=pools[0], pool_temporal=pools[1])  # type: ignore[arg-type]


class Engine(batching.Engine):
    """`batcher.Engine` for a task's forward and the options' batch size (for timing the model
    alone, as benchmarks/bench_extract.py does)."""

    def __init__(self, model: nnx.Module, task: Task, options: Options):
        super().__init__(task_forward(model, task, options), options.batch_size)


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
                 if sampling.num_clips or options.audio else None)
        track = sound.decode_audio(job.path, strict=options.strict) if options.audio else None
        rate = video.fps_or_default(info, options.fps)
        aligned = options.align_audio is not False
        logmels = _ClipAudio(track, total or 0, sampling, rate, aligned) if track is not None else None
        report = video.DecodeReport()
        frames = video.decode(info, fps=options.fps, size=pre.ffmpeg_size(info.height, info.width),
                              threads=options.ffmpeg_threads, report=report, strict=options.strict)
        spans = []
        try:
            for clip in clipping.assemble((pre(f) for f in frames), sampling, total):
                if self.stop.is_set():
                    return
                spans.append(_span(clip, rate))
                block = logmels.block(clip) if logmels is not None else None
                self._put(("clip", number, clip.index, clipping.stack(clip), block))
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
        if track is not None:
            seconds = None if math.isnan(rate) else (total or report.frames) / rate
            meta.update(track.metadata(seconds))
            warnings += track.warnings + _audio_warnings(track, seconds)
        self._put(("done", number, spans, meta, warnings))


class _ClipAudio:
    """The log-mels of one video's clips: VMZ's ``AVInput`` (`vmz_jax.video.audio`), `aligned`
    (stretched over the video's frame count `total`, the container's as upstream's ``nb_frames``, for
    the clips' span) or raw (100 frames a second, upstream's audio-only input). Uniformly spaced clips
    (`num_clips` > 1, VMZ's test protocol) take upstream's uniform rule; others (one clip, which we
    centre where upstream starts it at frame 0, or back-to-back clips) the block at their own start:
    the start frame's row of the stretched frames, or the start time's of the raw ones."""

    def __init__(self, track: sound.AudioTrack, total: int, sampling: clipping.ClipSampling, fps: float,
                 aligned: bool):
        self.total, self.fps, self.aligned = total, fps, aligned
        raw = sound.log_mels(track.samples, rate=track.rate)
        self.rows = sound.stretch_to_video(raw, total, sampling.span) if aligned else raw
        clips = sampling.num_clips
        self.uniform = sound.uniform_clips(self.rows, clips) if clips and clips > 1 else None

    def block(self, clip: clipping.Clip[Any]) -> np.ndarray:
        if self.uniform is not None:
            return self.uniform[clip.index]
        if self.aligned or math.isnan(self.fps):
            return sound.clip_at(self.rows, clip.start, self.total)
        return sound.clip_at_seconds(self.rows, clip.start / self.fps)


def _audio_warnings(track: sound.AudioTrack, video_seconds: float | None) -> list[str]:
    status = track.status(video_seconds)
    if status == "missing":
        what = "no audio track" if not track.present else f"an audio track of {track.duration:.3f} s"
        return [f"{track.path}: {what}: its log-mels are zeros (as VMZ's AVInput gives)"]
    if status == "short":
        return [f"{track.path}: the audio track ({track.duration:.2f} s) is shorter than the video "
                f"({video_seconds:.2f} s): its log-mels are stretched over the video (as VMZ's AVInput does)"]
    return []


def _span(clip: clipping.Clip[Any], rate: float) -> ClipSpan:
    def seconds(frame: int) -> float | None:
        return None if math.isnan(rate) else round(frame / rate, 6)

    return ClipSpan(clip.index, clip.start, clip.end, seconds(clip.start), seconds(clip.end), clip.padded)


# --- putting them together ---------------------------------------------------------------------

def run(model: nnx.Module, videos: Iterable[VideoJob | str | os.PathLike[str]], task: Task = "extract",
        options: Options | None = None) -> Iterator[VideoResult]:
    """One `VideoResult` per video, in the order they finish (not necessarily the input order)."""
    options = options or Options()
    if options.audio and options.align_audio is None:
        options = dataclasses.replace(options, align_audio=is_audio_visual(model))
    jobs = _jobs(videos)
    if not jobs:
        return
    yield from run_forward(task_forward(model, task, options), jobs, options,
                           mean_views=TASK_OUTPUTS[task][1])


def _jobs(videos: Iterable[VideoJob | str | os.PathLike[str]]) -> list[VideoJob]:
    return [v if isinstance(v, VideoJob) else VideoJob(os.fspath(v), Path(os.fspath(v)).stem) for v in videos]


def run_forward(forward: Forward, videos: Iterable[VideoJob | str | os.PathLike[str]], options: Options, *,
                mean_views: bool = False) -> Iterator[VideoResult]:
    """`run` for any forward (`make_forward`): each video's outputs are (clips, views, ...) stacked,
    averaged over the views with `mean_views`, the views axis dropped when there is one view."""
    jobs = _jobs(videos)
    if not jobs:
        return
    batcher: batching.Batcher[int, tuple[int, int]] = batching.Batcher(
        batching.Engine(forward, options.batch_size))
    num_views = options.preprocess.num_views
    results: dict[int, VideoResult] = {}

    def result(number: int) -> VideoResult:
        return results.setdefault(number, VideoResult(jobs[number]))

    def completed() -> Iterator[VideoResult]:
        for done in batcher.take():
            r = results.pop(done.group)
            r.outputs = _assemble(done.outputs, r.clips, num_views, mean_views, forward.out_dim)
            yield r

    capacity = max(2 * batcher.batch_size // num_views, 2 * options.workers, 2)
    decoders = _Decoders(jobs, options, capacity)
    exited = 0
    try:
        idle_since = time.monotonic()
        while exited < len(decoders.threads):
            try:
                item = decoders.queue.get(timeout=0.1)
            except queue.Empty:
                batcher.poll()
                if not batcher.busy and time.monotonic() - idle_since > STALL_FLUSH_S:
                    # Decoding has stalled and the device is idle: run the batches whose videos
                    # are all decoded (and wait only for them), padded, instead of at the end.
                    batcher.flush(closed_only=True)
                    idle_since = time.monotonic()
                yield from completed()
                continue
            idle_since = time.monotonic()
            if item is _EXIT:
                exited += 1
                continue
            kind, number = item[0], item[1]
            if kind == "clip":
                _, _, clip, array, logmels = item
                for view in range(array.shape[0]):
                    example = array[view] if logmels is None else (array[view], logmels)
                    batcher.add(number, (clip, view), example)
            elif kind == "done":
                _, _, spans, meta, warnings = item
                r = result(number)
                r.clips, r.info, r.warnings = spans, meta, warnings
                batcher.close(number)
            else:
                batcher.discard(number)
                r = results.pop(number, None) or VideoResult(jobs[number])
                r.error = item[2]
                yield r
            yield from completed()
        batcher.finish()
        yield from completed()
    finally:
        decoders.stop.set()
        for thread in decoders.threads:
            thread.join(timeout=5)


def _assemble(outputs: dict[tuple[int, int], Any], clips: list[ClipSpan], num_views: int, mean_views: bool,
              out_dim: int | None) -> Any:
    """{(clip, view): output} -> (clips, views, ...) float32, views averaged or squeezed."""
    if not clips:
        stacked: Any = np.zeros((0, num_views, out_dim or 0), np.float32)
    else:
        per_clip = [jax.tree.map(lambda *views: np.stack(views),
                                 *(outputs[(span.index, v)] for v in range(num_views))) for span in clips]
        stacked = jax.tree.map(lambda *c: np.stack(c).astype(np.float32, copy=False), *per_clip)
    if mean_views:
        return jax.tree.map(lambda a: a.mean(axis=1), stacked)
    if num_views == 1:
        return jax.tree.map(lambda a: a[:, 0], stacked)
    return stacked


def features(model: nnx.Module, path: str | os.PathLike[str], options: Options | None = None) -> np.ndarray:
    """The clip features of one video, (clips, D) (or (clips, views, D) with three crops)."""
    (result,) = run(model, [path], "extract", options)
    if result.error:
        raise video.VideoError(result.error)
    assert result.outputs is not None
    return result.outputs


# --- writing results ---------------------------------------------------------------------------

def write(model: nnx.Module, jobs: Sequence[VideoJob], out_dir: str | os.PathLike[str], task: Task,
          options: Options, *, labels: Sequence[str] | None = None, top_k: int = 5, overwrite: bool = False,
          progress: bool = True, part: tuple[int, int] = (0, 1), command: str = "vmz-jax",
          stream: TextIO | None = None) -> Summary:
    """Run `jobs` and write each video's output under `out_dir` (atomically), an index of JSON lines
    (``index.jsonl``) and the failures (``failures.jsonl``; one line each on `stream` too). Videos
    whose output exists are skipped unless `overwrite`. `part` = (this process, processes) only
    changes the index and failure file names, so that several processes can share `out_dir`.
    See `vmz_jax.video.writers` for the files."""
    named = options.audio and is_audio_visual(model) and task == "extract"
    writer = writers.for_task(task, num_classes(model), labels, top_k, named_features=named)
    out = writers.OutputDir(out_dir, writer.suffix, part)
    todo = out.todo(jobs, overwrite)
    summary = Summary(total=len(jobs), skipped=len(jobs) - len(todo))
    bar = Progress(f"{command} {task}", len(jobs), progress, stream or sys.stderr)
    results = run(model, todo, task, options)
    if options.audio and is_audio_visual(model) and task == "classify":
        results = (_with_head(r, options.head) for r in results)
    return writers.write_all(results, out, writer, summary, bar)


def _with_head(result: VideoResult, head: str) -> VideoResult:
    result.info["head"] = head
    return result
