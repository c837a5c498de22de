"""Datasets for training and the order their items are batched in.

A dataset is anything with `len(ds)` and `ds.load(index, epoch, seed) -> (clip, label)`: a float32
clip (T, H, W, 3), normalized like the model's inputs, and an int class index. `load` must be a
function of its arguments only (the same arguments give the same clip), so random augmentation
draws from `(index, epoch, seed)` rather than from a global generator. That is what makes a run
reproducible and resumable: the batch order is a function of `(seed, epoch)` and every clip a
function of `(index, epoch, seed)`, so the position `(epoch, batch)` alone says what comes next.
A dataset may also have `class_names` (index -> name), which `fit` records with the saved model.
For the audio-visual models the clip is the pair ``(clip, logmels)``, logmels float32 (F, 40) (the
clip's block of log-mels, `vmz_jax.video.audio`), and batches hold the pair of stacked arrays.

Training batches: each epoch visits `epoch_permutation(len(ds), epoch, seed)` in `batch_size`
slices; the last partial slice is dropped (a smaller batch would change the shapes, so compile a
second step function, and weigh its clips more in BatchNorm statistics), so an epoch is
`len(ds) // batch_size` steps and the dropped clips differ from epoch to epoch. Validation batches
cover every item once, in index order; the last batch is padded to full size with copies of the
last item and a `mask` marks the real ones.

With several processes (hosts) each loads only its own rows of every batch (`part=(i, n)`: rows
`i*B/n` to `(i+1)*B/n` of the global batch of B), which together make the batch one process alone
would have loaded.

Loading runs in a thread pool with a few batches in flight, so decoding (issue 10's video datasets
call ffmpeg and numpy, which release the GIL) overlaps the training step. Grain's
`MapDataset`/`IndexSampler` does the same job, but its element function sees only the index, its
resumable state is its own opaque dict, and it shuffles with its own generator; with `load(index,
epoch, seed)` and a position of two integers a thread pool of ~100 lines gives the same overlap
with nothing to translate.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from vmz_jax.errors import VMZError, one_line

__all__ = [
    "ArrayDataset",
    "Batch",
    "BatchLoader",
    "Dataset",
    "Position",
    "epoch_permutation",
    "steps_per_epoch",
]


@runtime_checkable
class Dataset(Protocol):
    """What `fit` trains on: a length and a deterministic `load`."""

    def __len__(self) -> int: ...

    def load(self, index: int, epoch: int, seed: int) -> tuple[Any, int]:
        """Clip `index` as drawn in `epoch` of a run seeded `seed`: (float32 (T, H, W, 3), label),
        or ((clip, logmels (F, 40)), label) for the audio-visual models."""
        ...


class ArrayDataset:
    """Clips already in memory: `clips` (N, T, H, W, 3), `labels` (N,) int class indices, and for the
    audio-visual models `logmels` (N, F, 40) (then `load` gives ((clip, logmels), label)).

    `load` ignores `epoch` and `seed` (no augmentation). The arrays are kept, not copied.
    """

    def __init__(self, clips: Any, labels: Any, *, class_names: Sequence[str] | None = None,
                 logmels: Any = None):
        clips = np.asarray(clips)
        labels = np.asarray(labels)
        if clips.ndim != 5 or clips.shape[-1] != 3:
            raise VMZError(f"ArrayDataset: clips must be (N, T, H, W, 3), got shape {clips.shape}")
        if labels.shape != (clips.shape[0],):
            raise VMZError(f"ArrayDataset: labels must be ({clips.shape[0]},) to match the clips, "
                           f"got shape {labels.shape}")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise VMZError(f"ArrayDataset: labels must be integer class indices, got {labels.dtype}")
        if labels.size and labels.min() < 0:
            raise VMZError(f"ArrayDataset: negative label {labels.min()}")
        if logmels is not None:
            logmels = np.asarray(logmels)
            if logmels.ndim != 3 or logmels.shape[0] != clips.shape[0]:
                raise VMZError(f"ArrayDataset: logmels must be ({clips.shape[0]}, F, bins) to match the "
                               f"clips, got shape {logmels.shape}")
        self.clips = clips
        self.labels = labels
        self.logmels = logmels
        self.class_names = list(class_names) if class_names is not None else None

    def __len__(self) -> int:
        return int(self.clips.shape[0])

    def load(self, index: int, epoch: int, seed: int) -> tuple[Any, int]:
        del epoch, seed
        clip = np.asarray(self.clips[index], np.float32)
        if self.logmels is not None:
            return (clip, np.asarray(self.logmels[index], np.float32)), int(self.labels[index])
        return clip, int(self.labels[index])


@dataclasses.dataclass(frozen=True, order=True)
class Position:
    """The next training batch: batch `batch` of epoch `epoch` (both from 0)."""

    epoch: int = 0
    batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Position:
        return cls(int(data["epoch"]), int(data["batch"]))

    def advance(self, batches_per_epoch: int) -> Position:
        """The position after this batch has been consumed."""
        if self.batch + 1 >= batches_per_epoch:
            return Position(self.epoch + 1, 0)
        return Position(self.epoch, self.batch + 1)


class Batch(NamedTuple):
    """A batch: clips (B, T, H, W, 3) float32 (audio-visual: the pair (clips, logmels (B, F, 40))),
    labels (B,) int32, mask (B,) bool (False = padding), and the position it was drawn at (training)
    or its index (validation, epoch -1)."""

    clips: Any
    labels: np.ndarray
    mask: np.ndarray
    position: Position


def epoch_permutation(size: int, epoch: int, seed: int) -> np.ndarray:
    """The order of epoch `epoch`: a permutation of range(size) drawn from (seed, epoch) alone."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch)]).permutation(size)


def steps_per_epoch(size: int, batch_size: int) -> int:
    """Training steps per epoch: full batches only (the last partial batch is dropped)."""
    if batch_size <= 0:
        raise VMZError(f"batch_size must be positive, got {batch_size}")
    if size < batch_size:
        raise VMZError(f"the training set has {size} clip(s), fewer than one batch of {batch_size}")
    return size // batch_size


def default_workers() -> int:
    """Loader threads: one per core, at most 8 (decoding releases the GIL; more only adds memory)."""
    return max(1, min(8, os.cpu_count() or 1))


class BatchLoader:
    """Loads the batches of one dataset in a thread pool, `prefetch` batches ahead of the consumer.

    `part=(i, n)` loads only part `i` of `n` equal parts of every batch (one process of `n`
    training together); `batch_size` is the whole batch and must be a multiple of `n`.

    Items are checked as they arrive: every clip must be float (T, H, W, 3) (or the pair (clip,
    logmels (F, bins))) of one shape (the first item's), every label an int in [0, num_classes). A
    failing `load` or a bad item raises a one-line `VMZError` naming the item, when the consumer
    reaches its batch.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int = 0,
                 num_classes: int | None = None, workers: int | None = None, prefetch: int = 2,
                 name: str = "dataset", part: tuple[int, int] = (0, 1)):
        if not isinstance(dataset, Dataset):
            raise VMZError(f"{name}: {type(dataset).__name__} is not a dataset (it needs __len__ and "
                           f"load(index, epoch, seed) -> (clip, label))")
        if batch_size <= 0:
            raise VMZError(f"batch_size must be positive, got {batch_size}")
        index, count = (int(v) for v in part)
        if count <= 0 or not 0 <= index < count or batch_size % count:
            raise VMZError(f"{name}: part {index} of {count} of a batch of {batch_size} clips "
                           f"(the batch must split into {count} equal parts)")
        self.rows = slice(index * batch_size // count, (index + 1) * batch_size // count)
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_classes = num_classes
        self.prefetch = max(1, int(prefetch))
        self.name = name
        self.clip_shape: tuple[int, ...] | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(workers or default_workers(),
                                                           thread_name_prefix="vmz-load")

    # ---------------------------------------------------------------------------------------------

    def train_batches(self, start: Position, epochs: int) -> Iterator[Batch]:
        """Every training batch from `start` up to the end of epoch `epochs - 1`."""
        per_epoch = steps_per_epoch(len(self.dataset), self.batch_size)

        def plan() -> Iterator[tuple[Position, np.ndarray, int]]:
            for epoch in range(start.epoch, epochs):
                order = epoch_permutation(len(self.dataset), epoch, self.seed)
                first = start.batch if epoch == start.epoch else 0
                for b in range(first, per_epoch):
                    indices = order[b * self.batch_size:(b + 1) * self.batch_size]
                    yield Position(epoch, b), indices, epoch

        return self._run(plan())

    def eval_batches(self) -> Iterator[Batch]:
        """Every item once, in order; the last batch padded (mask False) to full size."""
        size = len(self.dataset)

        def plan() -> Iterator[tuple[Position, np.ndarray, int]]:
            for b, lo in enumerate(range(0, size, self.batch_size)):
                yield Position(-1, b), np.arange(lo, min(lo + self.batch_size, size)), 0

        return self._run(plan())

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------

    def _run(self, plan: Iterator[tuple[Position, np.ndarray, int]]) -> Iterator[Batch]:
        """Load the planned batches (global index lists, shorter than a batch only at the end of
        validation) in order; each batch is padded to full size with the last real item, masked,
        and cut to this loader's rows."""
        Pending = tuple[Position, np.ndarray, np.ndarray, dict[int, concurrent.futures.Future[Any]]]
        queue: collections.deque[Pending] = collections.deque()

        def submit_next() -> bool:
            item = next(plan, None)
            if item is None:
                return False
            position, indices, epoch = item
            real = len(indices)
            padded = np.concatenate([indices, np.repeat(indices[-1:], self.batch_size - real)])
            mask = (np.arange(self.batch_size) < real)[self.rows]
            # one load per distinct index (the padding repeats the last one)
            futures: dict[int, concurrent.futures.Future[Any]] = {}
            for i in padded[self.rows]:
                if int(i) not in futures:
                    futures[int(i)] = self._pool.submit(self._load, int(i), epoch)
            queue.append((position, padded[self.rows], mask, futures))
            return True

        try:
            for _ in range(self.prefetch):
                if not submit_next():
                    break
            while queue:
                position, rows, mask, futures = queue.popleft()
                submit_next()
                loaded = {i: f.result() for i, f in futures.items()}
                yield self._assemble([loaded[int(i)] for i in rows], mask, position)
        finally:
            for *_, futures in queue:
                for f in futures.values():
                    f.cancel()

    def _load(self, index: int, epoch: int) -> tuple[Any, int, int]:
        where = f"{self.name} item {index}"
        try:
            clip, label = self.dataset.load(index, epoch, self.seed)
        except VMZError as exc:
            raise VMZError(f"{where}: {one_line(exc)}") from None
        except Exception as exc:
            raise VMZError(f"{where}: cannot load ({type(exc).__name__}: {one_line(exc)})") from None
        logmels = None
        if isinstance(clip, tuple):
            if len(clip) != 2:
                raise VMZError(f"{where}: expected a clip or the pair (clip, logmels), "
                               f"got {len(clip)} arrays")
            clip, logmels = np.asarray(clip[0]), np.asarray(clip[1])
            if logmels.ndim != 2 or not np.issubdtype(logmels.dtype, np.floating):
                raise VMZError(f"{where}: expected float log-mels (F, bins), got {logmels.dtype} "
                               f"{logmels.shape}")
        clip = np.asarray(clip)
        if clip.ndim != 4 or clip.shape[-1] != 3 or not np.issubdtype(clip.dtype, np.floating):
            raise VMZError(f"{where}: expected a float clip (T, H, W, 3), got {clip.dtype} {clip.shape}")
        if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
            raise VMZError(f"{where}: the label must be an int class index, got {label!r}")
        if label < 0 or (self.num_classes is not None and label >= self.num_classes):
            raise VMZError(f"{where}: label {label} is outside [0, {self.num_classes}) "
                           f"(the model's class count)")
        clip = clip.astype(np.float32, copy=False)
        if logmels is not None:
            return (clip, logmels.astype(np.float32, copy=False)), int(label), index
        return clip, int(label), index

    def _assemble(self, items: list[tuple[Any, int, int]], mask: np.ndarray, position: Position) -> Batch:
        def shape(clip: Any) -> Any:
            return tuple(x.shape for x in clip) if isinstance(clip, tuple) else clip.shape

        if self.clip_shape is None:
            self.clip_shape = shape(items[0][0])
        for clip, _, index in items:
            if shape(clip) != self.clip_shape:
                raise VMZError(f"{self.name} item {index}: clip shape {shape(clip)}, but the batches "
                               f"hold {self.clip_shape} (every clip must have the same shape)")
        if isinstance(items[0][0], tuple):
            clips: Any = tuple(np.stack(part) for part in zip(*(clip for clip, _, _ in items), strict=True))
        else:
            clips = np.stack([clip for clip, _, _ in items])
        labels = np.array([label for _, label, _ in items], np.int32)
        return Batch(clips, labels, mask, position)
