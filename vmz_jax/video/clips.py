"""Which frames make each clip, and assembling clips from a stream of frames.

A clip is `clip_len` frames taken every `sampling_rate` frames, so it spans
``span = (clip_len - 1) * sampling_rate + 1`` frames. Two plans:

* consecutive (the default, ig65m-pytorch's `extract`): clips start every `stride` frames (default
  ``clip_len * sampling_rate``: back to back, not overlapping); a clip that would run past the last
  frame is dropped, so a video of N frames gives ``(N - span) // stride + 1`` clips.
* uniform (`num_clips` set; VMZ's test protocol): clip k starts at
  ``floor(k * (N - span) / (num_clips - 1))``; one clip is centred. This needs N before decoding.

A video shorter than one clip (N < span): with ``short="pad"`` (the default) it gives one clip (or
`num_clips` identical clips) starting at frame 0, whose missing frames repeat the last frame; with
``short="skip"`` it gives no clips. Either way the caller warns.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

import numpy as np

from vmz_jax.errors import VMZError

Frame = TypeVar("Frame")
Short = Literal["pad", "skip"]


@dataclass(frozen=True)
class ClipSampling:
    clip_len: int = 32
    sampling_rate: int = 1
    stride: int | None = None
    num_clips: int | None = None
    short: Short = "pad"

    def __post_init__(self) -> None:
        for name in ("clip_len", "sampling_rate", "stride", "num_clips"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise VMZError(f"{name.replace('_', '-')} must be at least 1, not {value}")
        if self.stride is not None and self.num_clips is not None:
            raise VMZError("stride and num-clips are two different plans: give one of them")
        if self.short not in ("pad", "skip"):
            raise VMZError(f"short must be pad or skip, not {self.short!r}")

    @property
    def span(self) -> int:
        return (self.clip_len - 1) * self.sampling_rate + 1

    @property
    def step(self) -> int:
        """Frames between consecutive clip starts (consecutive plan)."""
        return self.stride or self.clip_len * self.sampling_rate

    def starts(self, num_frames: int) -> list[int]:
        """First frame of each clip of a video of `num_frames` frames."""
        if num_frames < self.span:
            if num_frames <= 0 or self.short == "skip":
                return []
            return [0] * (self.num_clips or 1)
        if self.num_clips is None:
            return list(range(0, num_frames - self.span + 1, self.step))
        room = num_frames - self.span
        if self.num_clips == 1:
            return [room // 2]
        return [k * room // (self.num_clips - 1) for k in range(self.num_clips)]

    def frame_indices(self, start: int, num_frames: int) -> list[int]:
        """The frames of the clip starting at `start`, past-the-end ones replaced by the last."""
        return [min(start + j * self.sampling_rate, num_frames - 1) for j in range(self.clip_len)]


@dataclass
class Clip(Generic[Frame]):
    """One assembled clip: its number, the frames it holds, and how many of them are padding."""

    index: int
    start: int
    end: int  # one past the last real frame it covers
    frames: list[Frame] = field(default_factory=list)
    padded: int = 0


def assemble(frames: Iterable[Frame], sampling: ClipSampling,
             num_frames: int | None = None) -> Iterator[Clip[Frame]]:
    """Clips from a stream of frames, in order, each as soon as its last frame arrives.

    Holds only the frames of clips still open. `num_frames` (needed for `num_clips`) is the count
    announced before decoding; if the stream ends early, the missing frames repeat the last one and
    the clips say so in `padded`.
    """
    if sampling.num_clips is not None and num_frames is None:
        raise VMZError("uniformly spaced clips need the frame count")
    planned = sampling.starts(num_frames) if num_frames is not None and sampling.num_clips else None
    rate, step = sampling.sampling_rate, sampling.step
    open_clips: list[Clip[Frame]] = []
    opened = 0
    seen = 0
    last: Frame | None = None
    for i, frame in enumerate(frames):
        seen, last = i + 1, frame
        if planned is not None:
            while opened < len(planned) and planned[opened] == i:
                open_clips.append(Clip(opened, i, i))
                opened += 1
        elif i % step == 0:
            open_clips.append(Clip(opened, i, i))
            opened += 1
        for clip in open_clips:
            if (i - clip.start) % rate == 0 and len(clip.frames) < sampling.clip_len:
                clip.frames.append(frame)
                clip.end = i + 1
        while open_clips and len(open_clips[0].frames) == sampling.clip_len:
            yield open_clips.pop(0)
    if last is None:
        return
    if planned is None:
        # Consecutive plan: incomplete clips are the dropped remainder, unless nothing was emitted.
        if opened == len(open_clips) and seen < sampling.span and sampling.short == "pad":
            yield _pad(open_clips[0], sampling.clip_len, last)
        return
    if seen < sampling.span and sampling.short == "skip":
        return
    for index in range(opened, len(planned)):  # the stream ended before these started
        open_clips.append(Clip(index, seen - 1, seen, [last]))
    for clip in open_clips:
        yield _pad(clip, sampling.clip_len, last)


def _pad(clip: Clip[Frame], clip_len: int, last: Frame) -> Clip[Frame]:
    clip.padded = clip_len - len(clip.frames)
    clip.frames.extend([last] * clip.padded)
    return clip


def stack(clip: Clip[np.ndarray]) -> np.ndarray:
    """A clip of per-frame views (views, H, W, C) as (views, T, H, W, C)."""
    return np.stack(clip.frames, axis=1)
