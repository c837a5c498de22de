"""Test videos made at test time with the ffmpeg binary that imageio-ffmpeg ships."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from vmz_jax.video.decode import ffmpeg_exe

#: name -> (suffix, encoder arguments). yuv444p keeps odd frame sizes (4:2:0 would round them).
FORMATS: dict[str, tuple[str, list[str]]] = {
    "h264_mp4": (".mp4", ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv444p"]),
    "mpeg4_avi": (".avi", ["-c:v", "mpeg4", "-q:v", "3", "-pix_fmt", "yuv420p"]),
    "vp9_webm": (".webm", ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8",
                           "-pix_fmt", "yuv444p"]),
    "mjpeg_mkv": (".mkv", ["-c:v", "mjpeg", "-q:v", "3", "-pix_fmt", "yuvj444p"]),
}


def _run(args: list[str]) -> None:
    subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-y", *args], check=True)


def make_video(directory: str | os.PathLike[str], name: str, *, frames: int, size: tuple[int, int] = (64, 48),
               fps: int = 25, fmt: str = "h264_mp4", rotation: int = 0, gop: int | None = None) -> Path:
    """`frames` frames of ffmpeg's moving test pattern, `size` = (width, height) as coded; with
    `rotation`, the file carries a display rotation (decoded frames are then turned upright); `gop`
    sets the keyframe interval (many keyframes make a seek land on one)."""
    suffix, codec = FORMATS[fmt]
    path = Path(directory) / f"{name}{suffix}"
    width, height = size
    # testsrc2 draws in 4:2:0 and rounds odd sizes: draw one pixel larger and crop in RGB.
    source = (f"testsrc2=size={width + width % 2}x{height + height % 2}:rate={fps},format=rgb24,"
              f"crop={width}:{height}:0:0")
    target = path if not rotation else path.with_name(f"{name}.unrotated{suffix}")
    keyframes = ["-g", str(gop)] if gop else []
    _run(["-f", "lavfi", "-i", source, "-frames:v", str(frames), *codec, *keyframes, "-threads", "1",
          str(target)])
    if rotation:
        _run(["-display_rotation", str(rotation), "-i", str(target), "-c", "copy", str(path)])
        target.unlink()
    return path


def make_audio_only(directory: str | os.PathLike[str], name: str = "audio") -> Path:
    path = Path(directory) / f"{name}.m4a"
    _run(["-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac", str(path)])
    return path


def truncate(path: Path, keep: float = 0.5, name: str | None = None) -> Path:
    """A copy of `path` cut to `keep` of its bytes."""
    data = path.read_bytes()
    out = path.with_name(name or f"truncated_{path.name}")
    out.write_bytes(data[: int(len(data) * keep)])
    return out


def with_audio(path: Path, seconds: float, name: str) -> Path:
    """A copy of `path` (an .mp4) with a `seconds`-long audio track: longer than the video, it makes
    the container's duration (so duration x fps) promise more frames than the video stream has."""
    out = path.with_name(name)
    _run(["-i", str(path), "-f", "lavfi", "-i", f"sine=duration={seconds}", "-map", "0:v", "-map", "1:a",
          "-c:v", "copy", "-c:a", "aac", str(out)])
    return out
