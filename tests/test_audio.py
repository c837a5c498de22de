"""The audio front end (vmz_jax.video.audio) against an independent NumPy transcription of VMZ's C++:
``ops/LogMels.cc`` (``LogSpectrum``, with FFmpeg's ``av_rdft_calc`` packing done by an explicit DFT)
and ``ops/av_io.cc`` (``ClipTransformAudioLogmel``, with OpenCV's ``cv::resize`` rules), written here
statement by statement, sharing no code with the module under test."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.videos import make_video
from vmz_jax.errors import VMZError
from vmz_jax.video import audio
from vmz_jax.video.decode import VideoError, ffmpeg_exe

RTOL = 1e-5
f32 = np.float32


# --- the transcription of ops/LogMels.cc -------------------------------------------------------------

K_GAIN = 1080674186.3482928


def hz2mel(hz: np.float32) -> np.float32:
    return f32(1127) * f32(np.log(f32(1) + f32(hz) / f32(700)))


def mel2hz(mel: np.float32) -> np.float32:
    return f32(700) * (f32(np.exp(f32(mel) / f32(1127))) - f32(1))


class LogSpectrum:
    """ops/LogMels.cc, one frame at a time, a list for the AVAudioFifo."""

    def __init__(self, num_channels: int, sampling_rate: float, window_length: int, window_step: int):
        self.num_channels = num_channels
        self.sampling_rate = f32(sampling_rate)
        self.window_length = int(f32(window_length) * self.sampling_rate / f32(1000.0))
        self.window_step = int(f32(window_step) * self.sampling_rate / f32(1000.0))
        self.start_freq = f32(0)
        self.end_freq = self.sampling_rate * f32(0.5)
        bits = int(math.log2(self.window_length))
        if 2**bits != self.window_length:
            bits += 1
        self.fft_size = 2**bits
        self.filter_length = self.fft_size // 2 + 1
        self.filters = np.zeros(num_channels * self.filter_length, f32)
        self.window = np.zeros(self.window_length, f32)
        for i in range(self.window_length):
            self.window[i] = 0.5 * (1 - math.cos(2 * math.pi * i / (self.window_length - 1)))
        self.fifo: list[float] = []
        self.ranges: list[tuple[int, int]] = []
        self.init()

    def init(self) -> None:
        start_mel = hz2mel(self.start_freq)
        end_mel = hz2mel(self.end_freq)
        dx = (end_mel - start_mel) / f32(self.num_channels + 1)
        freq_step = self.sampling_rate / f32(2) / f32(self.filter_length)
        for filt in range(self.num_channels):
            start = mel2hz(f32(filt) * dx) / freq_step
            mid = mel2hz(f32(filt + 1) * dx) / freq_step
            end = mel2hz(f32(filt + 2) * dx) / freq_step
            frm = int(start)
            to = int(end) + 1
            left_width = max(f32(1.0), f32(mid - start))
            right_width = max(f32(1.0), f32(end - mid))
            total = f32(0)
            frm = max(0, frm)
            to = min(self.filter_length - 1, to)
            self.ranges.append((frm, to))
            for i in range(frm, to + 1):
                fi = f32(i)
                value = f32(1) - ((mid - fi) / left_width if fi < mid else (fi - mid) / right_width)
                if value > 0:
                    self.filters[filt * self.filter_length + i] = value
                    total = f32(total + value)
            if total > 0:
                for i in range(frm, to + 1):
                    self.filters[filt * self.filter_length + i] = (
                        self.filters[filt * self.filter_length + i] / total)

    def write(self, samples: np.ndarray) -> None:
        self.fifo.extend(np.asarray(samples, f32).tolist())

    def read(self) -> np.ndarray | None:
        if len(self.fifo) > self.window_length:
            frame = np.zeros(self.fft_size, f32)
            frame[:self.window_length] = self.fifo[:self.window_length]
            del self.fifo[:self.window_step]
            return self.apply(frame)
        return None

    def rdft(self, data: np.ndarray) -> np.ndarray:
        """av_rdft_calc(DFT_R2C)'s packed layout: [X0, X(N/2), Re X1, Im X1, ...], from a plain DFT."""
        n = self.fft_size
        k = np.arange(n // 2 + 1)[:, None]
        t = np.arange(n)[None, :]
        x = data.astype(np.float64)[None, :]
        re = (x * np.cos(2 * np.pi * k * t / n)).sum(axis=1)
        im = -(x * np.sin(2 * np.pi * k * t / n)).sum(axis=1)
        out = np.zeros(n, f32)
        out[0], out[1] = re[0], re[n // 2]
        for b in range(1, n // 2):
            out[2 * b], out[2 * b + 1] = re[b], im[b]
        return out

    def apply(self, frame: np.ndarray) -> np.ndarray:
        for i in range(self.window_length):
            frame[i] = frame[i] * self.window[i]
        frame = self.rdft(frame)
        for i in range(self.fft_size // 2):
            re, im = frame[2 * i], frame[2 * i + 1]
            frame[i] = re * re + im * im
        feat = np.zeros(self.num_channels, f32)
        for c in range(self.num_channels):
            acc = 0.0
            first, last = self.ranges[c]
            for j in range(first, last):
                acc += float(f32(frame[j] * self.filters[c * self.filter_length + j])) * K_GAIN
            feat[c] = math.log(acc) if acc > math.e else acc / math.e
        return feat


def reference_log_mels(samples: np.ndarray) -> np.ndarray:
    spectrum = LogSpectrum(40, 16000, 16, 10)
    spectrum.write(samples)
    rows = []
    while (row := spectrum.read()) is not None:
        rows.append(row)
    return np.array(rows, f32).reshape(-1, 40)


def max_rel(ours: np.ndarray, ref: np.ndarray) -> float:
    scale = np.maximum(np.abs(ref), 1e-30)
    return float((np.abs(ours.astype(np.float64) - ref) / scale).max()) if ref.size else 0.0


def check(samples: np.ndarray) -> np.ndarray:
    ours, ref = audio.log_mels(samples), reference_log_mels(samples)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=0)
    return ours


# --- the op ------------------------------------------------------------------------------------------

def test_frames_and_bins_as_the_op():
    spectrum = LogSpectrum(40, 16000, 16, 10)
    assert (spectrum.window_length, spectrum.window_step, spectrum.fft_size) == (256, 160, 256)
    for n, frames in [(0, 0), (256, 0), (257, 1), (416, 1), (417, 2), (16000, 99), (16096, 99), (16097, 100)]:
        assert audio.num_frames(n) == frames
        assert audio.log_mels(np.zeros(n, f32)).shape == (frames, 40)
    assert reference_log_mels(np.zeros(417, f32)).shape == (2, 40)
    dense = np.zeros((40, 129), f32)
    for c, (first, last) in enumerate(spectrum.ranges):
        dense[c, first:last] = spectrum.filters[c * 129 + first:c * 129 + last]
    np.testing.assert_array_equal(audio.mel_filters(), dense)


@pytest.mark.parametrize("mel_bin", [3, 12, 25, 38])
def test_pure_tone_lands_in_its_mel_bin(mel_bin):
    # The op reads FFT bin k as frequency k * (8000 / 129) Hz (its freqStep) and peaks filter m at mel
    # (m + 1) * dx: a tone on the FFT bin nearest that peak lands in filter m.
    spectrum = LogSpectrum(40, 16000, 16, 10)
    dx = hz2mel(f32(8000)) / f32(41)
    k = round(float(mel2hz(f32(mel_bin + 1) * dx)) / (8000 / 129))
    freq = k * 16000 / 256
    t = np.arange(4000) / 16000
    tone = (0.5 * np.sin(2 * np.pi * freq * t + 0.3)).astype(f32)
    ours = check(tone)
    assert ours.shape == (24, 40)
    assert (ours.argmax(axis=1) == mel_bin).all()
    weights = spectrum.filters.reshape(40, 129)[:, k]
    assert weights.argmax() == mel_bin


def test_silence():
    ours = check(np.zeros(1600, f32))
    assert ours.shape == (9, 40) and not ours.any()
    # Dither-level noise stays below e: the op's linear branch x / e.
    quiet = (1e-6 * np.random.default_rng(1).standard_normal(1600)).astype(f32)
    ours = check(quiet)
    assert 0 < ours.max() < 1


def test_white_noise():
    noise = (0.1 * np.random.default_rng(2).standard_normal(8000)).astype(f32)
    ours = check(noise)
    assert ours.min() > 1  # all on the log branch


def test_clipping():
    t = np.arange(4800) / 16000
    loud = np.clip(4 * np.sin(2 * np.pi * 700 * t), -1, 1).astype(f32)
    check(loud)
    full_scale = np.where(np.arange(4800) % 32 < 16, 1.0, -1.0).astype(f32)  # square wave at the rails
    check(full_scale)


def _ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-y", *args], check=True)


@pytest.mark.parametrize("suffix,codec", [(".m4a", "aac"), (".mp3", "libmp3lame")])
def test_real_decode(tmp_path, suffix, codec):
    path = tmp_path / f"tone{suffix}"
    # Stereo at 44.1 kHz: a chirp-like pair of tones in the two channels plus noise, through a lossy codec.
    _ffmpeg("-f", "lavfi", "-i", "sine=f=440:r=44100:d=1", "-f", "lavfi", "-i", "sine=f=2500:r=44100:d=1",
            "-f", "lavfi", "-i", "anoisesrc=r=44100:d=1:a=0.05:seed=3", "-filter_complex",
            "[0][2]amix=inputs=2[l];[l][1]amerge=inputs=2", "-c:a", codec, "-b:a", "128k", str(path))
    track = audio.decode_audio(path)
    assert track.present and track.rate == 16000 and track.samples.dtype == np.float32
    assert track.source_rate == 44100 and track.channels == "stereo"
    assert abs(track.duration - 1.0) < 0.06, track.duration
    ours = check(track.samples)
    assert ours.shape == (audio.num_frames(len(track.samples)), 40)


def test_stereo_is_mixed_as_libswresample_does(tmp_path):
    path = tmp_path / "st.wav"
    _ffmpeg("-f", "lavfi", "-i", "sine=f=440:r=16000:d=0.5", "-f", "lavfi", "-i", "sine=f=1000:r=16000:d=0.5",
            "-filter_complex", "[0][1]amerge=inputs=2", "-c:a", "pcm_f32le", str(path))
    stereo = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "f32le", "-"],
                            capture_output=True, check=True).stdout
    left, right = np.frombuffer(stereo, "<f4").reshape(-1, 2).T.astype(np.float64)
    track = audio.decode_audio(path)
    np.testing.assert_allclose(track.samples, (left + right) / np.sqrt(2), atol=1e-6)


# --- the transcription of ops/av_io.cc ClipTransformAudioLogmel (align_audio=1, audio_length=0) ---------

def cv_resize_rows(src: np.ndarray, rows: int) -> np.ndarray:
    """cv::resize(src, dst, Size(cols, rows)): INTER_LINEAR when enlarging, INTER_NEAREST otherwise."""
    old = src.shape[0]
    inv = rows / old
    scale = 1.0 / inv
    out = np.zeros((rows, src.shape[1]), f32)
    for dy in range(rows):
        if rows >= old:
            fy = f32((dy + 0.5) * scale - 0.5)
            sy = math.floor(fy)
            fy = f32(fy - f32(sy))
            r0, r1 = min(max(sy, 0), old - 1), min(max(sy + 1, 0), old - 1)
            out[dy] = src[r0] * (f32(1) - fy) + src[r1] * fy
        else:
            out[dy] = src[min(math.floor(dy * scale), old - 1)]
    return out


def reference_clips(logmels: list[np.ndarray], number_of_frames: int, required: int, clip_per_video: int,
                    uniform: bool, clip_start_frame: int = 0) -> np.ndarray:
    frames_read, mel_frames, filters = len(logmels), 100, 40
    if number_of_frames and frames_read:
        new_length = required
        frames_read = math.ceil(number_of_frames * mel_frames // new_length)
        interpolated = cv_resize_rows(np.array(logmels, f32), frames_read)
        if uniform:
            logmels = list(interpolated)
        else:
            start = math.floor(clip_start_frame * frames_read // number_of_frames)
            end = min(interpolated.shape[0], start + mel_frames)
            logmels = [interpolated[i] for i in range(start, end)]
        frames_read = len(logmels)
    frame_step = f32(max(f32(0), f32(frames_read + 0.0 - mel_frames))) / f32(max(1, clip_per_video - 1))
    out = np.zeros((clip_per_video, mel_frames, filters), f32)
    for i in range(clip_per_video):
        start_frame = max(math.floor(f32(i) * frame_step - f32(0.0)), 0)
        end_frame = min(start_frame + mel_frames, frames_read)
        for j in range(start_frame, end_frame):
            out[i, j - start_frame] = logmels[j]
    return out


@pytest.mark.parametrize("raw_rows,video_frames,span,clips", [
    (150, 64, 32, 2),    # enlarged (200 rows), two clips back to back
    (299, 75, 32, 10),   # 3 s at 25 fps: enlarged to 234 rows, 10 overlapping clips
    (500, 90, 32, 3),    # shrunk (281 rows): nearest rows
    (80, 40, 32, 5),     # enlarged to 125 rows
    (40, 20, 32, 1),     # video shorter than a clip: 62 rows, zero-padded
    (0, 50, 32, 4),      # no audio: zeros
    (120, 0, 32, 3),     # no frame count: the raw rows, uniformly spaced
])
def test_uniform_alignment_as_av_io(raw_rows, video_frames, span, clips):
    raw = np.random.default_rng(raw_rows).standard_normal((raw_rows, 40)).astype(f32) + 10
    ours = audio.clip_log_mels(raw, video_frames=video_frames, clip_span=span, num_clips=clips)
    ref = reference_clips(list(raw), video_frames, span, clips, uniform=True)
    assert ours.shape == (clips, 100, 40) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=0)


@pytest.mark.parametrize("raw_rows,video_frames,start", [(299, 75, 0), (299, 75, 43), (500, 90, 58),
                                                         (150, 64, 63), (120, 0, 5)])
def test_start_frame_alignment_as_av_io(raw_rows, video_frames, start):
    raw = np.random.default_rng(start).standard_normal((raw_rows, 40)).astype(f32)
    (ours,) = audio.clip_log_mels(raw, video_frames=video_frames, clip_span=32, starts=[start])
    ref = reference_clips(list(raw), video_frames, 32, 1, uniform=False, clip_start_frame=start)
    np.testing.assert_allclose(ours, ref[0], rtol=RTOL, atol=0)


def test_alignment_on_a_known_clip():
    # 64 video frames, clips of 32: 200 stretched rows from 150 raw ones (1.5 s of audio over the video):
    # clip 0 is rows 0-99, clip 1 rows 100-199; row r sits at raw position (r + 0.5) * 0.75 - 0.5.
    raw = np.repeat(np.arange(150, dtype=f32)[:, None], 40, axis=1)
    blocks = audio.clip_log_mels(raw, video_frames=64, clip_span=32, num_clips=2)
    expected = np.clip((np.arange(200) + 0.5) * 0.75 - 0.5, 0, 149)
    np.testing.assert_allclose(blocks[0, :, 0], expected[:100], atol=1e-5)
    np.testing.assert_allclose(blocks[1, :, 0], expected[100:], atol=1e-5)
    # A clip starting at video frame 16 starts at row 16 * 200 // 64 = 50.
    (at16,) = audio.clip_log_mels(raw, video_frames=64, clip_span=32, starts=[16])
    np.testing.assert_allclose(at16[:, 0], expected[50:150], atol=1e-5)
    # Raw frames by time: 1.2 s is row 120 (frame r starts at sample 160 r); zeros past the 150th.
    by_time = audio.clip_at_seconds(raw, 1.2)
    np.testing.assert_array_equal(by_time[:30, 0], np.arange(120, 150))
    assert not by_time[30:].any()


# --- files without audio, with a short track, bad files ---------------------------------------------------

def _with_track(video: Path, out: Path, source: str) -> Path:
    _ffmpeg("-i", str(video), "-f", "lavfi", "-i", source, "-map", "0:v", "-map", "1:a", "-c:v", "copy",
            "-c:a", "aac", str(out))
    return out


def test_video_without_audio(tmp_path):
    video = make_video(tmp_path, "silent", frames=50)
    track = audio.decode_audio(video)
    assert not track.present and track.samples.shape == (0,) and track.status(2.0) == "missing"
    blocks = audio.clip_log_mels(audio.log_mels(track.samples), video_frames=50, clip_span=32, num_clips=3)
    assert blocks.shape == (3, 100, 40) and not blocks.any()  # VMZ's op hands the model zeros


def test_short_track_is_stretched_over_the_video(tmp_path):
    video = make_video(tmp_path, "v", frames=50)  # 2 s at 25 fps
    path = _with_track(video, tmp_path / "short.mp4", "sine=f=1000:r=16000:d=1")
    track = audio.decode_audio(path)
    assert track.present and track.status(2.0) == "short" and track.status(1.0) == "present"
    meta = track.metadata(2.0)
    assert meta["audio"] == "short" and meta["audio_codec"] == "aac"
    raw = audio.log_mels(track.samples)
    assert raw.shape[0] < 101
    blocks = audio.clip_log_mels(raw, video_frames=50, clip_span=25, num_clips=2)
    # VMZ stretches the 1 s of log-mels over the 2 s of video: both clips hold the tone.
    assert blocks.shape == (2, 100, 40) and (blocks.max(axis=(1, 2)) > 10).all()


def test_known_clip_from_a_file(tmp_path):
    # 2 s of video, 1 s of silence then 1 s of a tone: of two 25-frame clips only the second hears it.
    video = make_video(tmp_path, "v", frames=50)
    path = _with_track(video, tmp_path / "half.mp4",
                       "sine=f=1000:r=16000:d=2,volume='if(lt(t,1),0,1)':eval=frame")
    track = audio.decode_audio(path)
    assert track.status(2.0) == "present"
    blocks = audio.clip_log_mels(audio.log_mels(track.samples), video_frames=50, clip_span=25, num_clips=2)
    loud = blocks.max(axis=2)
    assert loud[0, :90].max() < 1 < loud[1, 10:].min()


def test_bad_files(tmp_path):
    with pytest.raises(VideoError, match="no such file"):
        audio.decode_audio(tmp_path / "nope.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(VideoError, match=str(junk)) as err:
        audio.decode_audio(junk)
    assert "\n" not in str(err.value)
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(VideoError, match="not a video"):
        audio.decode_audio(text)
    with pytest.raises(VMZError, match="mono"):
        audio.log_mels(np.zeros((2, 100), f32))
