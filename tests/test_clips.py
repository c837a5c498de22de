"""vmz_jax.clips: clip starts for both plans, short videos, and the streaming assembler."""

from __future__ import annotations

import math
import weakref

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmz_jax.errors import VMZError
from vmz_jax.video.clips import Clip, ClipSampling, assemble, stack

# --------------------------------------------------------------------------------------------
# starts and frame_indices


@pytest.mark.parametrize(("num_frames", "clip_len", "rate", "stride", "starts"), [
    (100, 8, 1, None, list(range(0, 89, 8))),  # 12 clips, 4 frames left over
    (96, 8, 1, None, list(range(0, 89, 8))),  # exactly 12
    (95, 8, 1, None, list(range(0, 81, 8))),  # one short of the 12th: 11
    (100, 8, 2, None, [0, 16, 32, 48, 64, 80]),  # span 15, step 16
    (100, 8, 1, 4, list(range(0, 93, 4))),  # overlapping
    (100, 4, 3, 50, [0, 50]),  # span 10, gaps between clips
    (8, 8, 1, None, [0]),
    (32, 32, 1, None, [0]),
])
def test_consecutive_starts(num_frames, clip_len, rate, stride, starts):
    sampling = ClipSampling(clip_len=clip_len, sampling_rate=rate, stride=stride)
    assert sampling.starts(num_frames) == starts
    assert len(starts) == (num_frames - sampling.span) // sampling.step + 1


def test_consecutive_defaults():
    sampling = ClipSampling()
    assert (sampling.clip_len, sampling.sampling_rate, sampling.span, sampling.step) == (32, 1, 32, 32)
    assert ClipSampling(clip_len=8, sampling_rate=4).span == 29
    assert ClipSampling(clip_len=8, sampling_rate=4).step == 32


@settings(deadline=None)
@given(num_frames=st.integers(0, 400), clip_len=st.integers(1, 40), rate=st.integers(1, 5),
       stride=st.none() | st.integers(1, 50))
def test_consecutive_starts_count(num_frames, clip_len, rate, stride):
    sampling = ClipSampling(clip_len=clip_len, sampling_rate=rate, stride=stride, short="skip")
    starts = sampling.starts(num_frames)
    span, step = (clip_len - 1) * rate + 1, stride or clip_len * rate
    assert len(starts) == ((num_frames - span) // step + 1 if num_frames >= span else 0)
    assert starts == [k * step for k in range(len(starts))]
    if starts:  # the last clip fits, one more would not
        assert starts[-1] + span <= num_frames < starts[-1] + step + span


@pytest.mark.parametrize(("num_frames", "clip_len", "rate", "num_clips", "starts"), [
    (100, 8, 1, 10, [0, 10, 20, 30, 40, 51, 61, 71, 81, 92]),
    (100, 8, 1, 2, [0, 92]),
    (100, 8, 1, 1, [46]),  # centred: 46 + 8 / 2 = 50
    (101, 8, 1, 1, [46]),
    (100, 8, 2, 3, [0, 42, 85]),  # span 15, room 85
    (8, 8, 1, 3, [0, 0, 0]),  # no room: all at 0
    (10, 8, 1, 5, [0, 0, 1, 1, 2]),
])
def test_uniform_starts(num_frames, clip_len, rate, num_clips, starts):
    sampling = ClipSampling(clip_len=clip_len, sampling_rate=rate, num_clips=num_clips)
    assert sampling.starts(num_frames) == starts


@settings(deadline=None)
@given(num_frames=st.integers(1, 5000), clip_len=st.integers(1, 64), rate=st.integers(1, 4),
       num_clips=st.integers(1, 30))
def test_uniform_starts_formula(num_frames, clip_len, rate, num_clips):
    """VMZ's test protocol: clip k at floor(k (N - span) / (num_clips - 1)); one clip centred."""
    sampling = ClipSampling(clip_len=clip_len, sampling_rate=rate, num_clips=num_clips)
    starts = sampling.starts(num_frames)
    span = sampling.span
    if num_frames < span:
        assert starts == [0] * num_clips
        return
    room = num_frames - span
    if num_clips == 1:
        assert starts == [room // 2]
    else:
        assert starts == [math.floor(k * room / (num_clips - 1)) for k in range(num_clips)]
        assert starts[0] == 0 and starts[-1] == room  # first and last frames covered
    assert starts == sorted(starts) and all(0 <= s and s + span <= num_frames for s in starts)


@pytest.mark.parametrize("num_clips", [None, 1, 4])
def test_short_video_pad_and_skip(num_clips):
    pad = ClipSampling(clip_len=16, sampling_rate=2, num_clips=num_clips)
    skip = ClipSampling(clip_len=16, sampling_rate=2, num_clips=num_clips, short="skip")
    assert pad.span == 31
    for n in (1, 5, 30):
        assert pad.starts(n) == [0] * (num_clips or 1)
        assert skip.starts(n) == []
    for sampling in (pad, skip):
        assert sampling.starts(0) == []
        assert len(sampling.starts(31)) == (num_clips or 1)


def test_frame_indices():
    sampling = ClipSampling(clip_len=4, sampling_rate=2)
    assert sampling.frame_indices(0, 100) == [0, 2, 4, 6]
    assert sampling.frame_indices(10, 100) == [10, 12, 14, 16]
    assert sampling.frame_indices(0, 5) == [0, 2, 4, 4]  # past the end: the last frame
    assert sampling.frame_indices(0, 6) == [0, 2, 4, 5]
    assert sampling.frame_indices(0, 1) == [0, 0, 0, 0]
    assert ClipSampling(clip_len=3).frame_indices(7, 100) == [7, 8, 9]


# --------------------------------------------------------------------------------------------
# assemble


def _expected(sampling: ClipSampling, streamed: int, announced: int | None) -> list[tuple[int, list[int]]]:
    """(start, frame indices) of the clips that a stream of `streamed` frames gives, `announced`
    being the count given beforehand (uniform plan only; the consecutive plan goes by the stream)."""
    if streamed == 0:
        return []
    if sampling.num_clips is None:
        starts = sampling.starts(streamed)
    else:
        if streamed < sampling.span and sampling.short == "skip":
            return []
        starts = sampling.starts(announced)
    return [(s, sampling.frame_indices(s, streamed)) for s in starts]


def _check_clips(clips: list[Clip], sampling: ClipSampling, streamed: int, announced: int | None) -> None:
    expected = _expected(sampling, streamed, announced)
    assert [clip.index for clip in clips] == list(range(len(expected)))
    assert [clip.frames for clip in clips] == [indices for _, indices in expected]
    for clip, (start, _) in zip(clips, expected, strict=True):
        if start < streamed:
            assert clip.start == start
            real = min(sampling.clip_len, (streamed - 1 - start) // sampling.sampling_rate + 1)
        else:  # the stream ended before this clip began: it is the last frame, repeated
            assert clip.start == streamed - 1
            real = 1
        assert clip.padded == sampling.clip_len - real
        assert clip.end == clip.start + (real - 1) * sampling.sampling_rate + 1


plans = st.builds(
    lambda clip_len, rate, stride, num_clips, use_clips, short: ClipSampling(
        clip_len=clip_len, sampling_rate=rate, stride=None if use_clips else stride,
        num_clips=num_clips if use_clips else None, short=short),
    clip_len=st.integers(1, 8), rate=st.integers(1, 4), stride=st.none() | st.integers(1, 12),
    num_clips=st.integers(1, 6), use_clips=st.booleans(), short=st.sampled_from(["pad", "skip"]))


@settings(max_examples=400, deadline=None)
@given(sampling=plans, num_frames=st.integers(0, 60), announce=st.booleans())
def test_assemble_whole_stream(sampling, num_frames, announce):
    """Every plan: the clips are those that starts() and frame_indices() describe, in order."""
    announced = num_frames if announce or sampling.num_clips else None
    clips = list(assemble(iter(range(num_frames)), sampling, announced))
    _check_clips(clips, sampling, num_frames, announced)


@settings(max_examples=300, deadline=None)
@given(sampling=plans, num_frames=st.integers(1, 60), cut=st.floats(0, 1))
def test_assemble_stream_ends_early(sampling, num_frames, cut):
    """The stream stops before the announced count: the clips planned from the count are all
    there, their missing frames the last one (uniform plan); the consecutive plan goes by the
    frames that came."""
    streamed = int(num_frames * cut)
    clips = list(assemble(iter(range(streamed)), sampling, num_frames))
    _check_clips(clips, sampling, streamed, num_frames)


def test_assemble_pads_with_the_last_frame():
    sampling = ClipSampling(clip_len=4, sampling_rate=2, num_clips=3)
    clips = list(assemble(iter("abcdefghij"[:7]), sampling, num_frames=20))  # planned: 0, 6, 13
    assert sampling.starts(20) == [0, 6, 13]
    assert [c.frames for c in clips] == [list("aceg"), list("gggg"), list("gggg")]
    assert [(c.start, c.end, c.padded) for c in clips] == [(0, 7, 0), (6, 7, 3), (6, 7, 3)]


def test_assemble_short_video():
    frames = list("abcde")
    pad = ClipSampling(clip_len=4, sampling_rate=2)  # span 7
    [clip] = assemble(iter(frames), pad)
    assert (clip.frames, clip.start, clip.end, clip.padded) == (list("acee"), 0, 5, 1)
    assert list(assemble(iter(frames), ClipSampling(clip_len=4, sampling_rate=2, short="skip"))) == []
    clips = list(assemble(iter(frames), ClipSampling(clip_len=4, sampling_rate=2, num_clips=2), 5))
    assert [c.frames for c in clips] == [list("acee")] * 2
    assert list(assemble(iter(frames), ClipSampling(clip_len=4, sampling_rate=2, num_clips=2,
                                                    short="skip"), 5)) == []


def test_assemble_empty_stream():
    assert list(assemble(iter([]), ClipSampling(clip_len=4))) == []
    assert list(assemble(iter([]), ClipSampling(clip_len=4, num_clips=3), 0)) == []
    assert list(assemble(iter([]), ClipSampling(clip_len=4, num_clips=3), 10)) == []


def test_assemble_takes_any_frames():
    frames = [np.full((2, 3, 3, 3), i, np.float32) for i in range(8)]
    [a, b] = assemble(iter(frames), ClipSampling(clip_len=4))
    assert all(x is y for x, y in zip(a.frames + b.frames, frames, strict=True))
    stacked = stack(b)
    assert stacked.shape == (2, 4, 3, 3, 3)
    np.testing.assert_array_equal(stacked[:, :, 0, 0, 0], [[4, 5, 6, 7]] * 2)


class _Frame:
    __slots__ = ("index", "__weakref__")

    def __init__(self, index: int) -> None:
        self.index = index


@pytest.mark.parametrize("sampling", [
    ClipSampling(clip_len=8),
    ClipSampling(clip_len=8, sampling_rate=3),
    ClipSampling(clip_len=8, stride=2),
    ClipSampling(clip_len=4, sampling_rate=2, stride=40),
    ClipSampling(clip_len=8, sampling_rate=2, num_clips=10),
    ClipSampling(clip_len=16, num_clips=1),
])
def test_assemble_streams(sampling):
    """Each clip comes out as soon as its last frame has been read, and only frames of clips still
    open (plus the clip just handed out) are alive."""
    num_frames = 600
    live: weakref.WeakSet[_Frame] = weakref.WeakSet()
    consumed = 0
    most_alive = 0

    def stream():
        nonlocal consumed, most_alive
        for i in range(num_frames):
            most_alive = max(most_alive, len(live))
            frame = _Frame(i)
            live.add(frame)
            consumed += 1
            yield frame
            del frame

    starts = sampling.starts(num_frames)
    got = []
    for clip in assemble(stream(), sampling, num_frames):
        k = len(got)
        assert (clip.index, clip.start) == (k, starts[k])
        assert consumed == starts[k] + sampling.span  # not one frame later
        assert [f.index for f in clip.frames] == sampling.frame_indices(starts[k], num_frames)
        assert clip.padded == 0 and clip.end == starts[k] + sampling.span
        got.append(clip.index)
        del clip
    assert got == list(range(len(starts)))
    open_at_once = math.ceil(sampling.span / sampling.step) if sampling.num_clips is None else 2
    assert most_alive <= (open_at_once + 1) * sampling.clip_len + 1
    assert most_alive < num_frames // 10


def test_assemble_is_lazy():
    consumed = []

    def stream():
        for i in range(10**9):  # endless for practical purposes
            consumed.append(i)
            yield i

    clips = assemble(stream(), ClipSampling(clip_len=4))
    assert consumed == []
    first = next(clips)
    assert first.frames == [0, 1, 2, 3] and len(consumed) == 4
    assert next(clips).frames == [4, 5, 6, 7] and len(consumed) == 8
    clips.close()


# --------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"clip_len": 0}, "clip-len must be at least 1, not 0"),
    ({"sampling_rate": 0}, "sampling-rate must be at least 1"),
    ({"stride": -1}, "stride must be at least 1, not -1"),
    ({"num_clips": 0}, "num-clips must be at least 1"),
    ({"stride": 4, "num_clips": 3}, "give one of them"),
    ({"short": "drop"}, "short must be pad or skip"),
])
def test_sampling_validation(kwargs, match):
    with pytest.raises(VMZError, match=match):
        ClipSampling(**kwargs)


def test_uniform_assemble_needs_the_count():
    with pytest.raises(VMZError, match="need the frame count"):
        next(assemble(iter(range(10)), ClipSampling(clip_len=2, num_clips=3)))
