"""vmz_jax.video: probe, count_frames and decode on videos made here with ffmpeg, in four formats,
odd sizes, three frame rates, rotation, resampling, streaming, and every kind of bad input."""

from __future__ import annotations

import inspect
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.videos import FORMATS, make_audio_only, make_video, truncate
from vmz_jax.errors import VMZError
from vmz_jax.video.decode import DecodeReport, VideoError, count_frames, decode, ffmpeg_exe, probe

CODECS = {"h264_mp4": "h264", "mpeg4_avi": "mpeg4", "vp9_webm": "vp9", "mjpeg_mkv": "mjpeg"}
#: frames written at each rate (different counts, to catch an off-by-one tied to one rate)
FRAMES = {24: 13, 25: 11, 30: 17}
#: odd on both sides; mpeg4 in AVI (4:2:0) keeps odd sizes too (checked: it decodes 321x239)
ODD = (321, 239)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Made once per module, on first use: (fmt, fps, size, rotation, frames) -> path."""
    directory = tmp_path_factory.mktemp("videos")
    made: dict[tuple, Path] = {}

    def get(fmt: str, fps: int = 25, size: tuple[int, int] = (64, 48), rotation: int = 0,
            frames: int = 10) -> Path:
        key = (fmt, fps, size, rotation, frames)
        if key not in made:
            name = f"{fmt}_{fps}_{size[0]}x{size[1]}_r{rotation % 360}_{frames}"
            made[key] = make_video(directory, name, frames=frames, size=size, fps=fps, fmt=fmt,
                                   rotation=rotation)
        return made[key]

    return get


def _reference_frames(size: tuple[int, int], fps: int, frames: int) -> np.ndarray:
    """The frames of `make_video`'s lavfi source, straight from ffmpeg as rgb24 (no codec)."""
    width, height = size
    source = (f"testsrc2=size={width + width % 2}x{height + height % 2}:rate={fps},format=rgb24,"
              f"crop={width}:{height}:0:0")
    raw = subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-f", "lavfi", "-i", source,
                          "-frames:v", str(frames), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(frames, height, width, 3)


def _ffmpeg_children() -> list[int]:
    """Pids of this process's children that run ffmpeg (zombies included: a child not reaped)."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == me and comm.startswith("ffmpeg"):
            found.append(int(entry))
    return found


def _mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# --------------------------------------------------------------------------------------------
# formats, sizes, rates


@pytest.mark.parametrize("fps", sorted(FRAMES))
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_probe_count_decode(videos, fmt, fps):
    frames = FRAMES[fps]
    path = videos(fmt, fps, ODD, frames=frames)
    info = probe(path)
    assert (info.path, info.codec, info.width, info.height) == (str(path), CODECS[fmt], *ODD)
    assert info.fps == fps
    assert (info.rotation, info.coded_size) == (0, ODD)
    assert info.expected_frames() == frames
    assert count_frames(path) == frames
    report = DecodeReport()
    decoded = list(decode(info, report=report))
    assert len(decoded) == frames == report.frames
    assert report.warnings == []
    for frame in decoded:
        assert frame.shape == (ODD[1], ODD[0], 3) and frame.dtype == np.uint8
    assert any(not np.array_equal(decoded[0], f) for f in decoded[1:])  # the pattern moves


@pytest.mark.parametrize("fmt", ["h264_mp4", "mjpeg_mkv", "vp9_webm"])
def test_decoded_pixels_match_the_source(videos, fmt):
    """4:4:4 encodes at an odd size: the decoded RGB is the source's, up to codec error."""
    frames = 3
    decoded = list(decode(probe(videos(fmt, 25, ODD, frames=frames))))
    reference = _reference_frames(ODD, 25, frames)
    for got, want in zip(decoded, reference, strict=True):
        assert _mean_abs(got, want) < 2.0
        # what the same check says about wrong frames: channels swapped, flipped, shifted one pixel
        assert _mean_abs(got, want[..., ::-1]) > 10
        assert _mean_abs(got, want[::-1]) > 10
        assert _mean_abs(got[:, 1:], want[:, :-1]) > 3 * _mean_abs(got, want)


def test_portrait(videos):
    path = videos("h264_mp4", size=(48, 64), frames=4)
    info = probe(path)
    assert (info.width, info.height, info.rotation, info.coded_size) == (48, 64, 0, (48, 64))
    frames = list(decode(info))
    assert len(frames) == 4 and all(f.shape == (64, 48, 3) for f in frames)


@pytest.mark.parametrize("fmt", ["h264_mp4", "mjpeg_mkv"])
@pytest.mark.parametrize(("rotation", "turns"), [(90, 1), (-90, -1)])
def test_rotation_gives_upright_frames(videos, fmt, rotation, turns):
    """A 64x48 coded video with a display rotation (counterclockwise, as ffmpeg's -display_rotation
    takes it) decodes to 48x64 frames: np.rot90(unrotated, turns), and not the other way round."""
    info = probe(videos(fmt, size=(64, 48), rotation=rotation, frames=4))
    assert (info.width, info.height, info.coded_size) == (48, 64, (64, 48))
    assert info.rotation == rotation % 360
    rotated = list(decode(info))
    plain = list(decode(probe(videos(fmt, size=(64, 48), frames=4))))
    assert len(rotated) == len(plain) == count_frames(info.path) == 4
    for got, upright in zip(rotated, plain, strict=True):
        assert got.shape == (64, 48, 3)
        assert _mean_abs(got, np.rot90(upright, turns)) < 1.0
        assert _mean_abs(got, np.rot90(upright, -turns)) > 30


# --------------------------------------------------------------------------------------------
# resampling and scaling


@pytest.mark.parametrize(("fmt", "fps", "expected"), [
    ("h264_mp4", 10, 20), ("h264_mp4", 12.5, 25), ("h264_mp4", 50, 100), ("mjpeg_mkv", 10, 20),
    ("vp9_webm", 7, 14), ("mpeg4_avi", 10, 20),
])
def test_decode_fps(videos, fmt, fps, expected):
    """2 s at 25 fps resampled by ffmpeg's fps filter: duration x rate frames (checked with ffmpeg)."""
    path = videos(fmt, 25, frames=50)
    info = probe(path)
    report = DecodeReport()
    assert sum(1 for _ in decode(info, fps=fps, report=report)) == expected
    assert report.warnings == []
    assert count_frames(path, fps=fps) == expected


@pytest.mark.parametrize("size", [(33, 17), (128, 96), (64, 48)])
def test_decode_size(videos, size):
    info = probe(videos("h264_mp4", frames=5))
    frames = list(decode(info, size=size))
    assert len(frames) == 5
    assert all(f.shape == (size[1], size[0], 3) and f.dtype == np.uint8 for f in frames)


def test_decode_fps_and_size_together(videos):
    info = probe(videos("mjpeg_mkv", 25, frames=50))
    frames = list(decode(info, fps=5, size=(20, 14)))
    assert len(frames) == 10 and all(f.shape == (14, 20, 3) for f in frames)


# --------------------------------------------------------------------------------------------
# streaming


def test_decode_is_a_lazy_generator_and_closing_it_ends_ffmpeg(videos):
    info = probe(videos("h264_mp4", frames=200))
    before = _ffmpeg_children()
    assert before == []
    report = DecodeReport()
    frames = decode(info, report=report)
    assert inspect.isgenerator(frames)
    assert _ffmpeg_children() == []  # nothing runs before the first frame is asked for
    got = []
    for frame in frames:
        got.append(frame)
        if len(got) == 2:
            assert len(_ffmpeg_children()) == 1  # ffmpeg is running, blocked on the pipe
            break
    frames.close()
    assert report.frames == 2
    assert _ffmpeg_children() == []  # killed and reaped
    # a full decode leaves nothing behind either
    assert sum(1 for _ in decode(info)) == 200
    assert _ffmpeg_children() == []


def test_frames_are_independent_arrays(videos):
    """Each frame is its own buffer: keeping frames does not let later ones overwrite them."""
    info = probe(videos("h264_mp4", frames=10))
    frames = list(decode(info))
    again = [f.copy() for f in decode(info)]
    for a, b in zip(frames, again, strict=True):
        assert np.array_equal(a, b)
    assert len({f.ctypes.data for f in frames}) == len(frames)


# --------------------------------------------------------------------------------------------
# bad inputs


def _raises(path: Path, function, match: str) -> str:
    with pytest.raises(VideoError) as caught:
        result = function(path)
        if inspect.isgenerator(result):
            list(result)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert match.lower() in message.lower(), message
    assert isinstance(caught.value, VMZError)
    return message


@pytest.mark.parametrize("function", [probe, count_frames])
def test_missing_file(tmp_path, function):
    _raises(tmp_path / "missing.mp4", function, "no such file")


@pytest.mark.parametrize("function", [probe, count_frames])
def test_directory(tmp_path, function):
    _raises(tmp_path, function, "is a directory")


@pytest.mark.parametrize("function", [probe, count_frames])
def test_empty_file(tmp_path, function):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    _raises(path, function, "empty file")


@pytest.mark.parametrize("function", [probe, count_frames])
def test_random_bytes(tmp_path, function):
    path = tmp_path / "noise.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    message = _raises(path, function, "")
    assert "moov atom not found" in message or "invalid data" in message


@pytest.mark.parametrize("function", [probe, count_frames])
def test_text_file_with_a_video_suffix(tmp_path, function):
    path = tmp_path / "notes.mp4"
    path.write_text("just some notes\n" * 100)
    _raises(path, function, "")


def test_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("just some notes\n" * 100)
    _raises(path, probe, "not a video")


def test_audio_only_probe(tmp_path):
    _raises(make_audio_only(tmp_path), probe, "no video stream (it has audio only)")


def test_audio_only_count_frames(tmp_path):
    _raises(make_audio_only(tmp_path), count_frames, "no video stream")


def test_unreadable_file(videos, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    path = tmp_path / "locked.mp4"
    path.write_bytes(videos("h264_mp4").read_bytes())
    path.chmod(0)
    try:
        _raises(path, probe, "permission denied")
        _raises(path, count_frames, "permission denied")
    finally:
        path.chmod(0o600)


def test_unreadable_file_as_the_os_reports_it(videos, monkeypatch):
    """The same check, for root too: os.access saying no."""
    path = videos("h264_mp4")
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    _raises(path, probe, "permission denied")
    _raises(path, count_frames, "permission denied")


def test_file_gone_between_probe_and_decode(videos, tmp_path):
    path = tmp_path / "gone.mp4"
    path.write_bytes(videos("h264_mp4").read_bytes())
    info = probe(path)
    path.unlink()
    _raises(path, lambda _: decode(info), "ffmpeg failed after 0 frames")


# --------------------------------------------------------------------------------------------
# truncated files


def test_truncated_mp4_fails_at_probe(videos):
    """A plain mp4 has its index (moov) at the end: half of it has none."""
    path = truncate(videos("h264_mp4", frames=20))
    _raises(path, probe, "moov atom not found")
    _raises(path, count_frames, "moov atom not found")


@pytest.fixture(scope="module")
def faststart_half(videos):
    """Half of an mp4 whose moov comes first: it opens, and ends inside its frame data."""
    plain = videos("h264_mp4", frames=20)
    faststart = plain.with_name("faststart.mp4")
    subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-i", str(plain), "-movflags",
                    "+faststart", "-c", "copy", str(faststart)], check=True)
    return truncate(faststart)


def test_truncated_faststart_mp4_strict(faststart_half):
    info = probe(faststart_half)
    assert info.expected_frames() == 20
    _raises(faststart_half, lambda _: decode(info), "truncated or damaged")
    assert _ffmpeg_children() == []


def test_truncated_faststart_mp4_lenient(faststart_half):
    info = probe(faststart_half)
    report = DecodeReport()
    frames = list(decode(info, strict=False, report=report))
    assert 0 < len(frames) < 20 and report.frames == len(frames)
    assert all(f.shape == (48, 64, 3) for f in frames)
    assert report.warnings and report.warnings[0].startswith(f"{faststart_half}: truncated or damaged")


@pytest.mark.parametrize(("fmt", "frames", "keep"), [
    ("vp9_webm", 40, 0.5), ("vp9_webm", 20, 0.9), ("mjpeg_mkv", 20, 0.5), ("mjpeg_mkv", 20, 0.9),
    ("mpeg4_avi", 40, 0.5), ("mpeg4_avi", 20, 0.7),
])
def test_truncated_strict_and_lenient(videos, fmt, frames, keep):
    """Cut where some frames still decode: strict raises after them, lenient warns."""
    path = truncate(videos(fmt, frames=frames), keep, name=f"cut{keep}_{fmt}_{frames}{FORMATS[fmt][0]}")
    info = probe(path)
    _raises(path, lambda _: decode(info), "truncated or damaged")
    report = DecodeReport()
    got = sum(1 for _ in decode(info, strict=False, report=report))
    assert 0 < got < frames
    assert report.warnings[0].startswith(f"{path}: truncated or damaged")


def test_truncated_avi_header_gone(videos):
    """Half of a short AVI: ffmpeg cannot open it at all."""
    path = truncate(videos("mpeg4_avi", frames=20), name="half_short.avi")
    _raises(path, probe, "invalid data")


def test_truncated_avi_near_the_end_strict(videos):
    path = truncate(videos("mpeg4_avi", frames=40), 0.9, name="cut0.9_avi_40.avi")
    info = probe(path)
    _raises(path, lambda _: decode(info), "truncated or damaged")


def test_truncated_webm_no_frames(videos):
    path = truncate(videos("vp9_webm", frames=20), 0.5, name="half_webm_20.webm")
    info = probe(path)
    _raises(path, lambda _: decode(info), "truncated")
