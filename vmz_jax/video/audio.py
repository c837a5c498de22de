"""The audio side of VMZ's audio-visual models: a file's sound track as the samples VMZ's decoder hands
its ``LogMels`` operator, that operator's log-mel spectrogram, and the per-clip block of log-mels
aligned to a visual clip, each reproduced from the Caffe2 ops (facebookresearch/VMZ, ``ops/``).

* `decode_audio(path)`: the first audio stream, decoded by the ffmpeg binary imageio-ffmpeg ships,
  mixed to mono and resampled to 16 kHz float samples by libswresample with its default options, as
  ``ops/av_decoder.cc`` (``AVDecoder::decodeLoop`` / ``getAudioSample``) does with ``swr_convert``.
  A file without an audio stream is no error: the track says ``present=False`` and has no samples.
* `log_mels(samples)`: ``ops/LogMels.cc`` (``LogSpectrum``), frames x 40, float32.
* `stretch_to_video`, `uniform_clips`, `clip_at`, `clip_log_mels`: how ``ops/av_io.cc``
  (``ClipTransformAudioLogmel``) turns those frames into one (100, 40) block per clip.

Upstream, step by step (defaults of ``ops/av_input_op.h``, the values VMZ's tools run with):

1. the whole track is decoded (``decode_type=1``, uniform sampling, decodes every packet), mono float
   in [-1, 1] (``AV_SAMPLE_FMT_FLT``, ``AV_CH_LAYOUT_MONO``: stereo is mixed as (L + R) / sqrt(2),
   libswresample's matrix for float output);
2. a 16 ms Hann window (256 samples) every 10 ms (160 samples), while *more than* 256 samples remain;
   a 256-point real FFT; power spectrum; 40 triangular mel filters; times ``kGain``; ``log(x)`` above
   e, ``x / e`` below (continuous at e, 0 for silence);
3. with video (``get_rgb``) and the container's frame count ``nb_frames`` known, the log-mel frames
   are resized (``cv::resize``: linear when enlarging, nearest when shrinking) to
   ``nb_frames * 100 // span`` rows, span = the clip's frame span (``align_audio=1``: "perfect
   alignment"), so that a visual clip of `span` frames covers 100 rows; the audio track is stretched
   over the video whatever its own length;
4. clip k of K (uniform sampling) takes rows ``floor(k * max(0, rows - 100) / (K - 1))`` onwards, 100
   of them, zeros where the rows run out; one clip at video frame s (``decode_type=2``) takes rows
   from ``s * rows // nb_frames``.

Missing or short audio: a file with no audio stream (or fewer than 257 samples, not one window) has no
log-mel frames, and VMZ's op then hands the model zeros for every clip; we do the same, and
`AudioTrack.status` says "missing" so that the pipeline reports it. A track shorter than the video is
stretched over the video's frames (step 3, VMZ's behaviour); `status` then says "short".
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from vmz_jax.errors import VMZError
from vmz_jax.video.decode import (
    TRUNCATION_MESSAGES,
    VideoError,
    _check_readable,
    _ffmpeg_complaint,
    _lines,
    ffmpeg_exe,
)

__all__ = ["FRAMES_PER_CLIP", "GAIN", "NUM_MEL_FILTERS", "SAMPLE_RATE", "SHORT_TOLERANCE_S", "STEP_MS",
           "WINDOW_MS", "AudioStatus", "AudioTrack", "clip_at", "clip_at_seconds", "clip_log_mels",
           "decode_audio", "log_mels", "mel_filters", "num_frames", "stretch_to_video", "uniform_clips"]

# --- the constants, with the upstream file each comes from ----------------------------------------

#: Output sample rate of the decoder: ops/av_input_op.h ``kAudioSamplingRate`` (op argument
#: ``logmel_audio_sr``), handed to ops/av_decoder.h ``Params::outrate_`` (whose own default is 16000 too).
SAMPLE_RATE = 16000
#: Mel filters (bins): ops/av_input_op.h ``kNumLogMelFilters`` (``logmel_filters``).
NUM_MEL_FILTERS = 40
#: Log-mel frames per clip: ops/av_input_op.h ``kNumLogMelFrames`` (``logmel_frames``).
FRAMES_PER_CLIP = 100
#: Window length in ms: ops/av_input_op.h ``kWindowLength`` (``logmel_winsize_ms``); 256 samples at 16 kHz,
#: ops/LogMels.cc ``LogSpectrum::LogSpectrum`` (``windowLength * samplingRate / 1000.0f``, truncated).
WINDOW_MS = 16
#: Window step in ms: ops/av_input_op.h ``kWindowStep`` (``logmel_winstep_ms``); 160 samples at 16 kHz.
STEP_MS = 10
#: ops/LogMels.cc ``kGain``: the mel energies are multiplied by it before the log.
GAIN = 1080674186.3482928
#: ops/LogMels.cc ``hz2Mel``/``mel2Hz``: mel = 1127 ln(1 + hz / 700).
MEL_FACTOR = 1127.0
MEL_BREAK_HZ = 700.0
#: A track that ends this many seconds (or more) before the video is reported "short" (our choice:
#: encoders routinely leave the audio a few tens of ms shorter or longer than the video).
SHORT_TOLERANCE_S = 0.1

AudioStatus = Literal["present", "short", "missing"]


# --- decoding ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AudioTrack:
    """A file's first audio stream as mono float32 samples at `rate` Hz (what VMZ's decoder gives the
    LogMels op). `present` is False when the file has no audio stream (then `samples` is empty and
    `codec`, `source_rate` and `channels` are None). `duration` is the decoded length in seconds."""

    path: str
    samples: np.ndarray
    rate: int
    present: bool
    codec: str | None = None
    source_rate: int | None = None
    channels: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return len(self.samples) / self.rate

    def status(self, video_seconds: float | None = None) -> AudioStatus:
        """"missing" (no stream, or too short for one log-mel window), "short" (ends at least
        `SHORT_TOLERANCE_S` before `video_seconds`) or "present"."""
        if not self.present or num_frames(len(self.samples), self.rate) == 0:
            return "missing"
        if video_seconds is not None and self.duration < video_seconds - SHORT_TOLERANCE_S:
            return "short"
        return "present"

    def metadata(self, video_seconds: float | None = None) -> dict[str, object]:
        """The fields an index line records about the track."""
        return {"audio": self.status(video_seconds), "audio_duration": round(self.duration, 6),
                "audio_codec": self.codec, "audio_rate": self.source_rate, "audio_channels": self.channels}


_HEADER_STREAM = re.compile(r"^\s*Stream #0:(\d+)[^:]*: Audio: (\S+)(.*)$")
_HZ = re.compile(r"(\d+) Hz,\s*([^,]+)")


def decode_audio(path: str | os.PathLike[str], *, rate: int = SAMPLE_RATE, strict: bool = True) -> AudioTrack:
    """The first audio stream of `path`, mono, resampled to `rate` Hz, as float32 samples in [-1, 1].

    A file without an audio stream gives ``present=False`` and no samples (not an error). A file that
    cannot be read at all, or whose audio stream fails to decode, raises `VideoError` naming it; a
    truncated track raises too with `strict`, and is otherwise a warning with the samples decoded."""
    path = os.fsdecode(path)
    _check_readable(path)
    if rate < 1:
        raise VMZError(f"the audio sample rate must be positive, not {rate}")
    header = _run([ffmpeg_exe(), "-nostdin", "-hide_banner", "-i", path], path, "reading the header")
    text = header.stderr.decode("utf-8", "replace")
    if "Input #0" not in text:
        raise VideoError(f"{path}: {_ffmpeg_complaint(text)}")
    if "Input #0, tty," in text:
        raise VideoError(f"{path}: a text file, not a video")
    stream = next((m for m in map(_HEADER_STREAM.match, text.splitlines()) if m), None)
    if stream is None:
        return AudioTrack(path, np.zeros(0, np.float32), rate, present=False)
    hz = _HZ.search(stream.group(3))
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-v", "level+warning", "-nostats", "-threads", "1",
           "-i", path, "-map", "0:a:0", "-vn", "-sn", "-dn", "-ac", "1", "-ar", str(rate),
           "-c:a", "pcm_f32le", "-f", "f32le", "-"]
    result = _run(cmd, path, "decoding the audio")
    stderr = result.stderr.decode("utf-8", "replace")
    if result.returncode != 0:
        raise VideoError(f"{path}: the audio stream could not be decoded: {_ffmpeg_complaint(stderr)}")
    samples = np.frombuffer(result.stdout, "<f4").astype(np.float32)
    warnings = []
    problems = [text for _, text in _lines(stderr) if any(m in text for m in TRUNCATION_MESSAGES)]
    if problems:
        message = f"{path}: the audio stream is truncated or damaged ({problems[0]})"
        if strict:
            raise VideoError(message)
        warnings.append(message)
    return AudioTrack(path, samples, rate, present=True, codec=stream.group(2).rstrip(","),
                      source_rate=int(hz.group(1)) if hz else None,
                      channels=hz.group(2).strip() if hz else None, warnings=warnings)


def _run(cmd: list[str], path: str, doing: str) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise VideoError(f"{path}: ffmpeg did not finish {doing} in 600 s") from None


# --- ops/LogMels.cc -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Frame:
    """LogSpectrum's sizes: window and step in samples, FFT size (ops/LogMels.cc, constructor)."""

    window: int
    step: int
    fft: int

    @classmethod
    def of(cls, rate: float, window_ms: int, step_ms: int) -> _Frame:
        f32 = np.float32
        window = int(f32(window_ms) * f32(rate) / f32(1000.0))  # int(windowLength * samplingRate / 1000.0f)
        step = int(f32(step_ms) * f32(rate) / f32(1000.0))
        if window < 2 or step < 1:
            raise VMZError(f"a {window_ms} ms window every {step_ms} ms at {rate} Hz is {window} samples "
                           f"every {step}: too short")
        bits = int(math.log2(window))
        if 2**bits != window:
            bits += 1
        return cls(window, step, 2**bits)


def num_frames(num_samples: int, rate: float = SAMPLE_RATE, window_ms: int = WINDOW_MS,
               step_ms: int = STEP_MS) -> int:
    """Log-mel frames of `num_samples` samples: ``LogSpectrum::Read`` gives one while the FIFO holds
    *more* than a window, then drops a step; so ``ceil((n - window) / step)`` for n > window, else 0."""
    frame = _Frame.of(rate, window_ms, step_ms)
    return max(0, -(-(num_samples - frame.window) // frame.step))


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    f32 = np.float32
    return f32(MEL_FACTOR) * np.log(f32(1) + hz / f32(MEL_BREAK_HZ))


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    f32 = np.float32
    return f32(MEL_BREAK_HZ) * (np.exp(mel / f32(MEL_FACTOR)) - f32(1))


def mel_filters(rate: float = SAMPLE_RATE, num_filters: int = NUM_MEL_FILTERS, window_ms: int = WINDOW_MS,
                step_ms: int = STEP_MS) -> np.ndarray:
    """The (num_filters, fft // 2 + 1) float32 filter bank ``LogSpectrum::Init`` builds, as ``Apply``
    uses it: zero outside [from, to) of each filter.

    Upstream's quirks, kept: the filters are placed on a bin spacing of ``rate / 2 / (fft / 2 + 1)``
    (62.02 Hz at 16 kHz, not the FFT's 62.5 Hz); widths below one bin count as one; each filter is
    normalised to sum 1 over [from, to] but applied over [from, to), the last bin left out; all in
    float32 (``float`` in the C++)."""
    f32 = np.float32
    frame = _Frame.of(rate, window_ms, step_ms)
    length = frame.fft // 2 + 1
    end_freq = f32(rate) * f32(0.5)  # endFreq = samplingRate * .5f (the default endFreq = -1)
    start_mel, end_mel = _hz_to_mel(f32(0)), _hz_to_mel(end_freq)
    dx = (end_mel - start_mel) / f32(num_filters + 1)
    freq_step = f32(rate) / f32(2) / f32(length)
    index = np.arange(num_filters, dtype=np.int64)
    edges = [_mel_to_hz((index + k).astype(f32) * dx) / freq_step for k in range(3)]
    start, mid, end = (e.astype(f32)[:, None] for e in edges)
    left = np.maximum(f32(1), mid - start)
    right = np.maximum(f32(1), end - mid)
    lo = np.maximum(0, start.astype(np.int64))  # int(start): truncation (start >= 0)
    hi = np.minimum(length - 1, end.astype(np.int64) + 1)
    bins = np.arange(length, dtype=np.int64)[None, :]
    binf = bins.astype(f32)
    value = f32(1) - np.where(binf < mid, (mid - binf) / left, (binf - mid) / right)
    value = np.where((bins >= lo) & (bins <= hi) & (value > 0), value, f32(0)).astype(f32)
    total = np.zeros((num_filters, 1), f32)
    for b in range(length):  # the C++ sums in bin order, in float
        total += value[:, b:b + 1]
    value = np.where(total > 0, value / np.where(total > 0, total, f32(1)), value).astype(f32)
    return np.where(bins < hi, value, f32(0)).astype(f32)


def _hann(window: int) -> np.ndarray:
    # window_[i] = .5f * (1 - cos(2 * M_PI * i / (windowLength_ - 1))): computed in double, stored as float
    i = np.arange(window, dtype=np.float64)
    return (0.5 * (1.0 - np.cos(2.0 * np.pi * i / (window - 1)))).astype(np.float32)


def log_mels(samples: np.ndarray, *, rate: float = SAMPLE_RATE, num_filters: int = NUM_MEL_FILTERS,
             window_ms: int = WINDOW_MS, step_ms: int = STEP_MS) -> np.ndarray:
    """VMZ's LogMels op (ops/LogMels.cc, ``LogSpectrum::Write``/``Read``/``Apply``) on mono `samples`:
    (frames, num_filters) float32, frames = `num_frames` (0 rows for fewer than window + 1 samples).

    Per frame: the window's samples (float32) times a Hann window, zero-padded to the FFT size; the
    power spectrum of ``av_rdft_calc``'s packed output, whose bin 0 holds DC^2 + Nyquist^2 (the Nyquist
    bin is otherwise unused); the filter bank of `mel_filters`; times `GAIN`, summed in double; then
    ``log(x)`` if x > e else ``x / e``. The FFT is taken in float64 here (the op's is FFmpeg's float32
    one), a difference at float32 rounding level."""
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim != 1:
        raise VMZError(f"log_mels takes mono samples (one axis), not an array of shape {x.shape}")
    frame = _Frame.of(rate, window_ms, step_ms)
    count = num_frames(len(x), rate, window_ms, step_ms)
    filters = mel_filters(rate, num_filters, window_ms, step_ms).astype(np.float64).T
    if count == 0:
        return np.zeros((0, num_filters), np.float32)
    windows = np.lib.stride_tricks.sliding_window_view(x, frame.window)[::frame.step][:count]
    spectrum = np.fft.rfft(windows * _hann(frame.window), n=frame.fft, axis=-1)
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
    power[:, 0] += power[:, -1]  # packed DC + Nyquist in bin 0
    power[:, -1] = 0.0  # never read (each filter's range stops before the last bin)
    energy = (power.astype(np.float64) @ filters) * GAIN
    out = np.where(energy > math.e, np.log(np.maximum(energy, math.e)), energy / math.e)
    return out.astype(np.float32)


# --- ops/av_io.cc ClipTransformAudioLogmel ----------------------------------------------------------

def stretch_to_video(logmels: np.ndarray, video_frames: int, clip_span: int,
                     frames_per_clip: int = FRAMES_PER_CLIP) -> np.ndarray:
    """The log-mel frames resized in time so that `clip_span` video frames cover `frames_per_clip` rows
    (``align_audio=1``): ``video_frames * frames_per_clip // clip_span`` rows, by ``cv::resize``'s
    linear interpolation (half-pixel centres, edges clamped) when that enlarges, its nearest neighbour
    (row ``floor(r * old / new)``) when it shrinks. Unchanged when there are no frames or no video
    frame count (upstream then skips the alignment)."""
    logmels = np.asarray(logmels, dtype=np.float32)
    old = logmels.shape[0]
    if clip_span < 1:
        raise VMZError(f"the clip span must be at least one frame, not {clip_span}")
    if old == 0 or video_frames <= 0:
        return logmels
    new = video_frames * frames_per_clip // clip_span
    if new == old:
        return logmels.copy()
    if new < old:
        ify = 1.0 / (new / old)  # cv::resize (resizeNN): 1 / inv_scale_y
        rows = np.minimum(np.floor(np.arange(new) * ify).astype(np.int64), old - 1)
        return logmels[rows]
    scale = 1.0 / (new / old)  # cv::resize: scale_y = 1 / inv_scale_y
    pos = ((np.arange(new) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(pos).astype(np.int64)
    frac = (pos - first).astype(np.float32)[:, None]
    below = logmels[np.clip(first, 0, old - 1)]
    above = logmels[np.clip(first + 1, 0, old - 1)]
    return (below * (np.float32(1) - frac) + above * frac).astype(np.float32)


def _block(rows: np.ndarray, start: int, frames_per_clip: int) -> np.ndarray:
    """Rows [start, start + frames_per_clip) of `rows`, zeros past the end."""
    out = np.zeros((frames_per_clip, rows.shape[1]), np.float32)
    part = rows[max(start, 0):max(start, 0) + frames_per_clip]
    out[:len(part)] = part
    return out


def uniform_clips(logmels: np.ndarray, num_clips: int, frames_per_clip: int = FRAMES_PER_CLIP) -> np.ndarray:
    """(num_clips, frames_per_clip, bins): clip k starts at row ``floor(k * step)``, step =
    ``max(0, rows - frames_per_clip) / max(1, num_clips - 1)`` in float32, and is zero-padded where the
    rows run out (all zeros without rows). VMZ's copy loop at the end of ``ClipTransformAudioLogmel``
    for ``align_audio=1``, whether or not the rows were stretched to the video."""
    if num_clips < 1:
        raise VMZError(f"num_clips must be at least 1, not {num_clips}")
    logmels = np.asarray(logmels, dtype=np.float32)
    f32 = np.float32
    step = f32(max(0, logmels.shape[0] - frames_per_clip)) / f32(max(1, num_clips - 1))
    starts = [max(int(np.floor(f32(k) * step)), 0) for k in range(num_clips)]
    return np.stack([_block(logmels, s, frames_per_clip) for s in starts])


def clip_at(logmels: np.ndarray, start_frame: int, video_frames: int,
            frames_per_clip: int = FRAMES_PER_CLIP) -> np.ndarray:
    """(frames_per_clip, bins): the block of the clip whose first video frame is `start_frame`, of
    stretched rows (`stretch_to_video`): from row ``start_frame * rows // video_frames``, zeros past
    the end (``ClipTransformAudioLogmel`` with one clip per video, ``decode_type=2``)."""
    logmels = np.asarray(logmels, dtype=np.float32)
    if video_frames <= 0 or logmels.shape[0] == 0:
        return _block(logmels, 0, frames_per_clip)
    return _block(logmels, start_frame * logmels.shape[0] // video_frames, frames_per_clip)


def clip_at_seconds(logmels: np.ndarray, start_s: float, frames_per_clip: int = FRAMES_PER_CLIP,
                    step_ms: int = STEP_MS) -> np.ndarray:
    """(frames_per_clip, bins): the block of raw (not stretched) log-mel frames starting at `start_s`
    seconds, row ``floor(start_s * 1000 / step_ms)`` (frame r starts at sample r x step), zeros past the
    end. For audio-only models on clips placed in time (upstream's audio-only input has no video, and
    spaces its clips uniformly: `uniform_clips` of the raw frames)."""
    return _block(np.asarray(logmels, dtype=np.float32), math.floor(start_s * 1000 / step_ms + 1e-9),
                  frames_per_clip)


def clip_log_mels(logmels: np.ndarray, *, video_frames: int, clip_span: int, num_clips: int | None = None,
                  starts: Sequence[int] | None = None, frames_per_clip: int = FRAMES_PER_CLIP) -> np.ndarray:
    """The model input ``logmels``: (clips, frames_per_clip, bins) float32, one block per visual clip.

    `logmels` are `log_mels` of the whole track; they are stretched over the video's `video_frames`
    frames (`stretch_to_video`) for clips spanning `clip_span` frames, then cut either for
    `num_clips` uniformly spaced clips (VMZ's test protocol, `uniform_clips`) or for clips starting
    at the video frames `starts` (`clip_at`). Give exactly one of the two."""
    if (num_clips is None) == (starts is None):
        raise VMZError("give either num_clips (uniformly spaced clips) or starts (clip start frames)")
    rows = stretch_to_video(logmels, video_frames, clip_span, frames_per_clip)
    if num_clips is not None:
        return uniform_clips(rows, num_clips, frames_per_clip)
    assert starts is not None
    bins = rows.shape[1] if rows.ndim == 2 else NUM_MEL_FILTERS
    if not starts:
        return np.zeros((0, frames_per_clip, bins), np.float32)
    return np.stack([clip_at(rows, s, video_frames, frames_per_clip) for s in starts])
