"""`evaluate`: a model, labelled videos and a protocol in; accuracy, scores and reports out."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from flax import nnx

from vmz_jax.errors import VMZError
from vmz_jax.evaluation import metrics as scoring
from vmz_jax.evaluation import report
from vmz_jax.evaluation.protocol import Protocol, vmz_protocol
from vmz_jax.evaluation.store import Entry, ProgressFile
from vmz_jax.files import pin_json
from vmz_jax.models.forward import Forward, audio_conv_head, make_forward
from vmz_jax.video import labels as head_labels
from vmz_jax.video.clips import ClipSampling
from vmz_jax.video.datasets import LabelledVideos, open_dataset
from vmz_jax.video.inputs import VideoJob
from vmz_jax.video.pipeline import Options, audio_output, is_audio_visual, run_forward
from vmz_jax.video.preprocess import CROP_RULE, Preprocess

__all__ = ["EvalResult", "default_protocol", "evaluate", "fit_protocol", "match_classes", "model_labels",
           "view_forward"]

StrPath = str | os.PathLike[str]
#: The files `evaluate` owns in an output directory (what --overwrite removes).
OWNED = ("run.json", "progress.jsonl", "report.json", "predictions.jsonl", "scores.npy", "classes.json",
         "per_class.csv", "confusion.png")


@dataclass
class EvalResult:
    """An evaluation's outcome. `metrics` has clip@1, video@1, video@5 (video@k with fewer than 5
    classes), mean_class@1 and counts; `scores` (videos, classes) float32, row i for `paths[i]`
    with true class `labels[i]` (indices into `classes`); `failures`: (path, error) of the videos
    that could not be read (excluded); `per_class` rows as in per_class.csv; `out` the report
    directory (None when not written); `audio` for the models that take log-mels: {"present": n,
    "short": [paths], "missing": [paths]} (`report.audio_summary`), else empty."""

    metrics: dict[str, Any]
    protocol: Protocol
    classes: list[str]
    scores: np.ndarray
    labels: np.ndarray
    paths: list[str]
    failures: list[tuple[str, str]]
    per_class: list[dict[str, Any]]
    confusion: np.ndarray
    record: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None
    audio: dict[str, Any] = field(default_factory=dict)

    @property
    def video_top1(self) -> float:
        return float(self.metrics["video@1"])

    def table(self) -> str:
        """The summary table `vmz-jax evaluate` prints."""
        m = scoring.Metrics(self.metrics["videos"], self.metrics["views"], self.metrics["clip@1"],
                            self.metrics["video@1"], self.metrics[self._k5()], self.metrics["mean_class@1"],
                            int(self._k5()[len("video@"):]), self.per_class, self.confusion)
        return report.summary_table(m, self.record, len(self.failures), self.out, self.audio)

    def _k5(self) -> str:
        return next(k for k in self.metrics if k.startswith("video@") and k != "video@1")


# --- classes -------------------------------------------------------------------------------------

def _key(name: str) -> str:
    """A class name without case, spaces, underscores or punctuation: ``playing_cards``, ``Playing
    cards`` and ``playing cards`` are one class (Kinetics folders renamed by mmaction2's script)."""
    return re.sub(r"[^0-9a-z]+", "", name.lower())


def match_classes(dataset: Sequence[str], model: Sequence[str], source: str) -> list[int]:
    """For each dataset class name, the index of the same class among the model's: equal names,
    else equal up to case, spaces, underscores and punctuation (when that is unambiguous). A class
    the model does not know is a one-line VMZError naming `source`."""
    exact = {name: i for i, name in enumerate(model)}
    loose: dict[str, list[int]] = {}
    for i, name in enumerate(model):
        loose.setdefault(_key(name), []).append(i)
    found, unknown = [], []
    for name in dataset:
        if name in exact:
            found.append(exact[name])
        elif len(loose.get(_key(name), [])) == 1:
            found.append(loose[_key(name)][0])
        else:
            unknown.append(name)
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:5])
        shown += f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise VMZError(f"{source}: {len(unknown)} class(es) of the dataset are not among the model's "
                       f"{len(model)} classes: {shown}")
    return found


def model_labels(model: nnx.Module, labels: Sequence[str] | StrPath | None = None,
                 checkpoint: StrPath | None = None) -> tuple[list[str], str]:
    """The model's class names and where they came from: `labels` (a list, or a JSON list file),
    the names saved with the model or its checkpoint, Kinetics-400 for a 400-class head."""
    num = int(model.fc.out_features)  # type: ignore[attr-defined]
    if labels is not None and not isinstance(labels, str | os.PathLike):
        names = [str(x) for x in labels]
        if len(names) != num:
            raise VMZError(f"{len(names)} class names given, but the model has {num} classes")
        return names, "given"
    if labels is not None:
        return head_labels.read(labels, num), os.fsdecode(labels)
    saved = getattr(model, "labels", None)
    if saved:
        return list(saved), "saved with the weights"
    if checkpoint is not None:
        from vmz_jax.weights.loading import checkpoint_labels

        stored = checkpoint_labels(checkpoint)
        if stored:
            return stored, f"saved with {os.fsdecode(checkpoint)}"
    if num == 400:
        return head_labels.kinetics400(), "Kinetics-400"
    raise VMZError(f"the model's {num} classes have no names (none were saved with the weights): pass "
                   "the class names (--labels FILE.json)")


# --- records pinned in the output directory ------------------------------------------------------

def _weights_record(model: nnx.Module, label_source: str, classes: list[str]) -> dict[str, Any]:
    from vmz_jax.models.variables import get_variables

    digest = hashlib.sha256()
    for path, value in sorted(get_variables(model).items()):
        digest.update("/".join(path).encode())
        digest.update(np.ascontiguousarray(np.asarray(value), "<f4").tobytes())
    provenance = dict(getattr(model, "provenance", None) or ())
    keys = ("pretraining", "dataset", "source", "source_sha256", "url", "new_head")
    return {"arch": getattr(model, "arch", type(model).__name__),
            "num_classes": int(model.fc.out_features),  # type: ignore[attr-defined]
            "clip_length": int(getattr(model, "clip_length", 0)), "digest": digest.hexdigest()[:16],
            "labels": label_source,
            "classes_digest": hashlib.sha256(json.dumps(classes).encode()).hexdigest()[:16],
            **{k: provenance[k] for k in keys if k in provenance}}


def _dataset_record(videos: LabelledVideos) -> dict[str, Any]:
    digest = hashlib.sha256()
    for r in videos.records:
        digest.update(f"{os.path.abspath(r.path)}\t{r.label_name}\n".encode())
    return {"source": os.path.abspath(videos.source) if os.path.exists(videos.source) else videos.source,
            "videos": len(videos), "classes": len(videos.classes), "missing": len(videos.missing),
            "digest": digest.hexdigest()[:16]}


def _prepare(out: Path, record: dict[str, Any], overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in OWNED:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    try:
        changed = pin_json(out / "run.json", record)
    except (OSError, ValueError) as exc:
        raise VMZError(f"{out / 'run.json'}: {exc}") from None
    if changed:
        shown = ", ".join(changed[:4]) + (f" (and {len(changed) - 4} more)" if len(changed) > 4 else "")
        raise VMZError(f"{out}: holds an evaluation with a different protocol, weights or dataset "
                       f"({shown}); pass --overwrite (overwrite=True) to replace it, or use another "
                       "directory")


# --- scoring -------------------------------------------------------------------------------------

def view_forward(model: nnx.Module, protocol: Protocol) -> Forward:
    """The forward that scores one view under `protocol` (what the evaluation batches); for the
    models that take log-mels (`protocol.model_head`), of the pair (clips, logmels)."""
    if protocol.model_head is None:
        return make_forward(model, **protocol.forward_kwargs())
    if protocol.head == "pool":
        output = "probabilities" if protocol.average == "softmax" else "logits"
        return make_forward(model, audio_output(output, protocol.model_head))
    kwargs = protocol.forward_kwargs()
    return make_forward(model, _audio_conv_output(protocol.model_head, kwargs["conv_window"],
                                                  kwargs["conv_softmax"]))


@functools.cache
def _audio_conv_output(head: str, window: int, softmax: str) -> Any:
    """`audio_conv_head` as `make_forward`'s callable output, one function object per setting (shared
    jit caches)."""

    def forward(net: nnx.Module, x: tuple[Any, Any]) -> Any:
        return audio_conv_head(net, x[0], x[1], window, softmax, head)

    forward.__name__ = forward.__qualname__ = f"audio_conv_head_{head}_{window}_{softmax}"
    return forward


def fit_protocol(model: nnx.Module, protocol: Protocol) -> Protocol:
    """`protocol` for `model`: a model that takes log-mels gets its default classifier and alignment
    where the protocol names none (audio-visual: "av", aligned; audio ResNet: "audio", raw); a visual
    model with a model head, or an audio ResNet asked for another head, is a VMZError."""
    from vmz_jax.models.audio import AudioResNet

    name = getattr(model, "arch", type(model).__name__)
    if is_audio_visual(model):
        if protocol.model_head is None:
            return dataclasses.replace(protocol, model_head="av", audio="aligned")
        return protocol
    if isinstance(model, AudioResNet):
        if protocol.model_head not in (None, "audio"):
            raise VMZError(f"{name} is an audio model: it has only the audio head, "
                           f"not {protocol.model_head!r}")
        return dataclasses.replace(protocol, model_head="audio", audio=protocol.audio or "raw")
    if protocol.model_head is not None:
        raise VMZError(f"{name} is a visual model: it has no {protocol.model_head!r} head (the av, audio "
                       "and visual heads belong to the audio-visual models)")
    return protocol


def _options(protocol: Protocol, batch_size: int, workers: int, ffmpeg_threads: int) -> Options:
    sampling = ClipSampling(clip_len=protocol.clip_len, sampling_rate=protocol.sampling_rate,
                            num_clips=protocol.clips)
    preprocess = Preprocess(short_side=protocol.frame_size, crop="center" if protocol.crops == 1 else "three",
                            crop_size=protocol.crop_size, resize=protocol.resize)
    audio = {} if protocol.model_head is None else {
        "audio": True, "head": protocol.model_head, "align_audio": protocol.audio == "aligned"}
    return Options(sampling=sampling, preprocess=preprocess, batch_size=batch_size, workers=workers,
                   ffmpeg_threads=ffmpeg_threads, **audio)


def _entry(index: int, path: str, label: int, outputs: np.ndarray) -> Entry:
    """A video's entry from its view outputs (clips[, crops], classes): the views already hold the
    softmaxes or logits the protocol averages."""
    views = np.asarray(outputs, np.float32).reshape(-1, outputs.shape[-1])  # (clips x crops, classes)
    if not len(views):
        return Entry(index, path, label, error=f"{path}: no clips (the video has no frames)")
    correct = int(np.sum(np.argmax(views, axis=-1) == label))
    scores = views.astype(np.float64).mean(axis=0).astype(np.float32)
    return Entry(index, path, label, scores, len(views), correct)


def default_protocol(model: nnx.Module) -> Protocol:
    """VMZ's protocol (`vmz_protocol`) for a loaded model: its architecture, its clip length, and
    the crop its released weights were trained at (from the pretraining its provenance names;
    otherwise the architecture's)."""
    arch = getattr(model, "arch", None)
    if not isinstance(arch, str):
        raise VMZError(f"{type(model).__name__} is not a vmz_jax model: give an explicit Protocol")
    trained_crop = None
    name = dict(getattr(model, "provenance", None) or ()).get("pretraining")
    if isinstance(name, str):
        from vmz_jax.weights import pretrained as released

        try:
            trained_crop = released.get_pretraining(arch, name).crop_size
        except VMZError:
            trained_crop = None
    return vmz_protocol(arch, clip_len=int(getattr(model, "clip_length", 0)) or None,
                        trained_crop=trained_crop)


def evaluate(model: nnx.Module | str, data: LabelledVideos | StrPath, out: StrPath | None = None,
             protocol: Protocol | str | None = "vmz", *, pretraining: str | None = None,
             checkpoint: StrPath | None = None, labels: Sequence[str] | StrPath | None = None,
             root: StrPath | None = None, split: int = 1, subset: str = "test",
             dataset_classes: StrPath | Sequence[str] | None = None, batch_size: int = 4, workers: int = 2,
             ffmpeg_threads: int = 1, resize: str | None = None, overwrite: bool = False,
             progress: bool = True, stream: TextIO | None = None) -> EvalResult:
    """Evaluate a classifier on labelled videos under a test protocol.

    `model`: an `nnx.Module` (e.g. fresh from fine-tuning; its class names `labels`, or those saved
    with it) or an architecture name loaded with `pretraining`/`checkpoint` (`vmz_jax.load`).
    `data`: `LabelledVideos` or anything `open_dataset` reads (with `root`, `split`, `subset`,
    `dataset_classes`); its classes are matched to the model's by name. `protocol`: "vmz" (VMZ's
    published protocol for the architecture, the weights' clip length and crop) or a `Protocol`.
    With `out`, the reports are written there and the run resumes from what is already finished
    (a different protocol, weights or dataset there is a VMZError unless `overwrite`).
    Host options: `batch_size` (views per batch), `workers` (videos decoded in parallel),
    `ffmpeg_threads`, `resize` ("exact"/"ffmpeg", overriding the protocol's).
    """
    if isinstance(model, str):
        from vmz_jax.weights.loading import load

        model = load(model, pretraining, checkpoint=checkpoint, progress=progress)
    elif pretraining is not None or checkpoint is not None:
        raise VMZError("pretraining/checkpoint apply when the model is given by name")
    if protocol is None or protocol == "vmz":
        chosen = default_protocol(model)
    elif isinstance(protocol, Protocol):
        chosen = protocol
    else:
        raise VMZError(f"protocol must be 'vmz' or a Protocol, not {protocol!r}")
    if resize is not None and resize != chosen.resize:
        chosen = chosen.replace(resize=resize)
    chosen = fit_protocol(model, chosen)
    classes, label_source = model_labels(model, labels, checkpoint)
    videos = data if isinstance(data, LabelledVideos) else open_dataset(
        data, root=root, split=split, subset=subset, classes=dataset_classes)
    mapping = match_classes(videos.classes, classes, videos.source)
    todo_labels = [mapping[r.label] for r in videos.records]
    # crop_rule: a run made when crops were placed otherwise is not resumed into this one
    record = {"protocol": chosen.record(), "protocol_text": chosen.describe(), "crop_rule": CROP_RULE,
              "weights": _weights_record(model, label_source, classes), "dataset": _dataset_record(videos)}
    out_dir = Path(out) if out is not None else None
    store: ProgressFile | _MemoryStore = _MemoryStore()
    if out_dir is not None:
        _prepare(out_dir, record, overwrite)
        store = ProgressFile(out_dir / "progress.jsonl", len(classes))
    try:
        _score(model, videos, todo_labels, chosen, store, batch_size, workers, ffmpeg_threads,
               progress, stream)
    finally:
        store.close()
    entries = [store.entries[i] for i in range(len(videos)) if i in store.entries]
    done = [e for e in entries if e.error is None]
    failures = [e for e in entries if e.error is not None]
    m = scoring.compute(np.stack([e.scores for e in done]) if done else np.zeros((0, len(classes))),  # type: ignore[misc]
                        np.array([e.label for e in done], np.int64),
                        np.array([e.clip_correct for e in done]), np.array([e.views for e in done]), classes)
    if out_dir is not None:
        report.write_all(out_dir, done, classes, m, record, failures)
    return EvalResult(metrics=m.as_dict(), protocol=chosen, classes=classes,
                      scores=np.stack([e.scores for e in done]).astype(np.float32) if done  # type: ignore[misc]
                      else np.zeros((0, len(classes)), np.float32),
                      labels=np.array([e.label for e in done], np.int64), paths=[e.path for e in done],
                      failures=[(e.path, str(e.error)) for e in failures], per_class=m.per_class,
                      confusion=m.confusion, record=record, out=out_dir,
                      audio=report.audio_summary(done).get("audio", {}))


class _MemoryStore:
    """The progress of an evaluation without an output directory."""

    def __init__(self) -> None:
        self.entries: dict[int, Entry] = {}

    def add(self, entry: Entry) -> None:
        self.entries[entry.index] = entry

    def close(self) -> None:
        pass


def _score(model: nnx.Module, videos: LabelledVideos, labels: list[int], protocol: Protocol,
           store: ProgressFile | _MemoryStore, batch_size: int, workers: int, ffmpeg_threads: int,
           progress: bool, stream: TextIO | None) -> None:
    from tqdm import tqdm

    todo = [i for i in range(len(videos)) if i not in store.entries]
    if not todo:
        return
    forward = view_forward(model, protocol)
    options = _options(protocol, batch_size, workers, ffmpeg_threads)
    jobs = [VideoJob(videos.records[i].path, str(i)) for i in todo]
    bar = tqdm(total=len(videos), initial=len(videos) - len(todo), unit="video", desc="evaluate",
               disable=not progress, file=stream or sys.stderr, dynamic_ncols=True)
    failed = 0
    try:
        for result in run_forward(forward, jobs, options, mean_views=False):
            index = int(result.job.name)
            path = videos.records[index].path
            if result.error is not None or result.outputs is None:
                entry = Entry(index, path, labels[index], error=result.error or f"{path}: no output")
            else:
                entry = _entry(index, path, labels[index], result.outputs)
                entry.warnings = list(result.warnings)
                entry.audio = result.info.get("audio") if protocol.model_head is not None else None
            failed += entry.error is not None
            store.add(entry)
            bar.update(1)
            if failed:
                bar.set_postfix(failed=failed)
    finally:
        bar.close()
