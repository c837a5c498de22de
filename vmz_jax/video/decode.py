"""Reading videos with the ffmpeg binary that imageio-ffmpeg ships: `probe` for what a file holds,
`decode` for its frames as RGB24 arrays, streamed (one frame in memory at a time).

Frames come out as ffmpeg's default decode gives them: rotated upright when the file has a display
rotation, at the native frame rate unless `fps` is given (ffmpeg's ``fps`` filter, which drops or
repeats frames by timestamp). Every problem with a file is a `VideoError` whose message names it.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from vmz_jax.errors import VMZError

#: Demuxer messages that mean the file stops before its own end (ffmpeg still exits with 0).
TRUNCATION_MESSAGES = ("partial file", "File ended prematurely", "Truncated", "truncated",
                       "Packet corrupt", "EOF")
#: Fewer decoded frames than this share of duration x fps means frames are missing at the end.
MIN_DECODED_SHARE = 0.9


class VideoError(VMZError):
    """A video file that cannot be read; the message starts with the file's path."""


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` reads from a file. `width`/`height` are those of the decoded (upright) frames."""

    path: str
    codec: str
    width: int
    height: int
    fps: float
    duration: float | None
    rotation: int
    coded_size: tuple[int, int]

    def expected_frames(self, fps: float | None = None) -> int | None:
        """duration x frame rate (`fps` if resampled), rounded: what the container promises (None
        if it does not say)."""
        rate = fps or self.fps
        if not self.duration or rate <= 0:
            return None
        return round(self.duration * rate)


@dataclass
class DecodeReport:
    """Filled in by `decode` as it runs: frames delivered and ffmpeg's complaints."""

    frames: int = 0
    warnings: list[str] = field(default_factory=list)


def ffmpeg_exe() -> str:
    try:
        import imageio_ffmpeg
    except ImportError as exc:  # a dependency of the package, so only a broken install gets here
        raise VMZError(f"imageio-ffmpeg is not installed ({exc}); pip install imageio-ffmpeg") from None
    return imageio_ffmpeg.get_ffmpeg_exe()


def _check_readable(path: str) -> None:
    if not os.path.exists(path):
        raise VideoError(f"{path}: no such file")
    if os.path.isdir(path):
        raise VideoError(f"{path}: is a directory, not a video")
    if not os.access(path, os.R_OK):
        raise VideoError(f"{path}: permission denied")
    if os.path.getsize(path) == 0:
        raise VideoError(f"{path}: empty file (0 bytes)")


_PREFIXES = re.compile(r"^(?:\[[^\]]*\]\s*)+")
_LEVEL = re.compile(r"\[(warning|error|fatal|panic)\]")


def _lines(stderr: str) -> list[tuple[str, str]]:
    """ffmpeg's messages as (level, text), without the ``[demuxer @ 0x..] [level]`` prefixes."""
    out = []
    for line in stderr.splitlines():
        prefix = _PREFIXES.match(line)
        level = _LEVEL.search(prefix.group(0)) if prefix else None
        text = line[prefix.end():].strip() if prefix else line.strip()
        if text:
            out.append((level.group(1) if level else "error", text))
    return out


def _ffmpeg_complaint(stderr: str) -> str:
    """The most telling of ffmpeg's error messages."""
    lines = [text for _, text in _lines(stderr) if not text.startswith("Error opening input file")]
    if not lines:
        return "ffmpeg failed without a message"
    for line in lines:
        if "moov atom not found" in line:
            return "not a complete MP4 (moov atom not found; truncated?)"
        if "matches no streams" in line:
            return "no video stream"
        if any(m in line for m in TRUNCATION_MESSAGES):
            return f"truncated or damaged ({line})"
    last = lines[-1]
    if "Invalid data found when processing input" in last:
        return "not a video ffmpeg can read (invalid data)"
    return last.removeprefix("Error opening input files: ").removeprefix("Error opening input: ")


_STREAM = re.compile(r"^\s*Stream #0:(\d+)[^:]*: Video: (\S+)(.*)$")
_SIZE = re.compile(r",\s*(\d+)x(\d+)[\s,]")
_FPS = re.compile(r",\s*([\d.]+)(k?) fps")
_TBR = re.compile(r",\s*([\d.]+)(k?) tbr")
_ROTATION = re.compile(r"(?:rotation of|rotate\s*:)\s*(-?[\d.]+)")
_DURATION = re.compile(r"Duration:\s*(\d+):(\d+):([\d.]+)")


def _rate(match: re.Match[str] | None) -> float:
    if match is None:
        return 0.0
    return float(match.group(1)) * (1000.0 if match.group(2) else 1.0)


def probe(path: str | os.PathLike[str]) -> VideoInfo:
    """The first video stream of `path`: size (after rotation), frame rate, duration, rotation."""
    path = os.fsdecode(path)
    _check_readable(path)
    try:
        result = subprocess.run([ffmpeg_exe(), "-nostdin", "-hide_banner", "-i", path],
                                capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise VideoError(f"{path}: ffmpeg did not finish reading the header in 60 s") from None
    text = result.stderr.decode("utf-8", "replace")
    if "Input #0" not in text:
        raise VideoError(f"{path}: {_ffmpeg_complaint(text)}")
    if "Input #0, tty," in text:  # ffmpeg renders any text file as ANSI art
        raise VideoError(f"{path}: a text file, not a video")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _STREAM.match(line)
        if m is None or "(attached pic)" in line:
            continue
        size = _SIZE.search(m.group(3) + ",")
        if size is None:
            raise VideoError(f"{path}: the video stream has no frame size")
        rotation = 0
        for follow in lines[i + 1:]:
            if _STREAM.match(follow) or re.match(r"^\s*Stream #", follow):
                break
            r = _ROTATION.search(follow)
            if r:
                rotation = round(float(r.group(1))) % 360
                break
        width, height = int(size.group(1)), int(size.group(2))
        coded = (width, height)
        if rotation in (90, 270):
            width, height = height, width
        fps = _rate(_FPS.search(m.group(3))) or _rate(_TBR.search(m.group(3)))
        d = _DURATION.search(text)
        duration = (int(d.group(1)) * 3600 + int(d.group(2)) * 60 + float(d.group(3))) if d else None
        return VideoInfo(path=path, codec=m.group(2).rstrip(","), width=width, height=height, fps=fps,
                         duration=duration, rotation=rotation, coded_size=coded)
    kinds = sorted({k for k in re.findall(r"Stream #0:\d+[^:]*: (\w+):", text)})
    has = f" (it has {', '.join(k.lower() for k in kinds)} only)" if kinds else ""
    raise VideoError(f"{path}: no video stream{has}")


def count_frames(path: str | os.PathLike[str], fps: float | None = None, threads: int = 1) -> int:
    """The number of frames `decode(path, fps=fps)` will give, read from the packets without decoding
    (or, with `fps`, by running the decoder and the fps filter into a null sink)."""
    path = os.fsdecode(path)
    _check_readable(path)
    cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-nostats", "-threads", str(threads), "-i", path,
           "-map", "0:v:0"]
    cmd += ["-vf", f"fps={fps}", "-f", "null", "-"] if fps else ["-c", "copy", "-f", "null", "-"]
    result = subprocess.run([*cmd, "-progress", "pipe:1"], capture_output=True)
    if result.returncode != 0:
        raise VideoError(f"{path}: {_ffmpeg_complaint(result.stderr.decode('utf-8', 'replace'))}")
    counts = re.findall(rb"^frame=(\d+)", result.stdout, flags=re.M)
    if not counts:
        raise VideoError(f"{path}: ffmpeg reported no frame count")
    return int(counts[-1])


def decode(info: VideoInfo, *, fps: float | None = None, size: tuple[int, int] | None = None,
           scale_flags: str = "bilinear", threads: int = 1, report: DecodeReport | None = None,
           strict: bool = True, start: float | None = None,
           max_frames: int | None = None) -> Iterator[np.ndarray]:
    """The frames of `info.path` as (H, W, 3) uint8 RGB arrays, one at a time.

    `fps` resamples the frame rate. `size` = (width, height) lets ffmpeg scale the frames (its
    `scale_flags` filter; not what PyTorch's interpolate computes: see `vmz_jax.video.preprocess`).
    With `strict`, a file whose demuxer reports it truncated, or that yields fewer than
    `MIN_DECODED_SHARE` of the frames its header promises, raises `VideoError` after the last frame;
    otherwise that is recorded in `report.warnings`. Decoder errors inside the stream (damaged
    macroblocks, which ffmpeg conceals) are always warnings.

    `start` (seconds from the file's start) seeks before decoding: ffmpeg jumps to the keyframe
    before it and drops the frames until `start` (its accurate input seek), so only one GOP is
    decoded in vain; the frames then come as decoded, none repeated to fill the time before the
    first one, and with `fps` they are those a decode from the start gives (for the containers with
    an index; MPEG-TS seeks are approximate). `max_frames` stops ffmpeg after that many frames.
    Either one is a part of the video, so the check against the frame count of the whole file is
    skipped.
    """
    report = report if report is not None else DecodeReport()
    width, height = size or (info.width, info.height)
    filters = []
    if fps:
        filters.append(f"fps={fps}")
    if size:
        filters.append(f"scale={width}:{height}:flags={scale_flags}")
    # Warnings too: some demuxers (AVI) report a cut-off file only at warning level.
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-v", "level+warning", "-nostats", "-threads",
           str(threads)]
    if start:
        cmd += ["-ss", f"{start:.6f}"]
    cmd += ["-i", info.path, "-map", "0:v:0", "-an", "-sn", "-dn"]
    if filters:
        cmd += ["-vf", ",".join(filters)]
    if start:
        # Frames as decoded: the default constant-rate output repeats the first frame when the seek
        # point of another stream (an audio track) starts the output clock earlier than the video.
        # The file's own timestamps: the fps filter then keeps the frame grid of a decode from the
        # start, instead of one anchored at the seek point.
        cmd += ["-fps_mode", "passthrough", "-copyts"]
    if max_frames is not None:
        cmd += ["-frames:v", str(max(0, int(max_frames)))]
    cmd += ["-pix_fmt", "rgb24", "-f", "rawvideo", "-"]
    frame_bytes = width * height * 3
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors)
        assert process.stdout is not None
        try:
            while True:
                frame = np.empty((height, width, 3), np.uint8)
                view = memoryview(frame).cast("B")
                got = 0
                while got < frame_bytes:
                    n = process.stdout.readinto(view[got:])
                    if not n:
                        break
                    got += n
                if got == 0:
                    break
                if got < frame_bytes:
                    raise VideoError(f"{info.path}: ffmpeg's output ends inside a frame "
                                     f"({got} of {frame_bytes} bytes; wrong frame size?)")
                report.frames += 1
                yield frame
            returncode = process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stdout.close()
        errors.seek(0)
        stderr = errors.read().decode("utf-8", "replace")
    if returncode != 0:
        raise VideoError(f"{info.path}: ffmpeg failed after {report.frames} frames: "
                         f"{_ffmpeg_complaint(stderr)}")
    _judge(info, stderr, fps, report, strict, whole=not start and max_frames is None)


def _judge(info: VideoInfo, stderr: str, fps: float | None, report: DecodeReport, strict: bool,
           whole: bool = True) -> None:
    messages = _lines(stderr)
    if report.frames == 0:
        detail = f": {_ffmpeg_complaint(stderr)}" if messages else ""
        where = "" if whole else " in the part asked for"
        raise VideoError(f"{info.path}: no frames could be decoded{where}{detail}")
    problems = [text for _, text in messages if any(m in text for m in TRUNCATION_MESSAGES)]
    expected = info.expected_frames(fps) if whole else None
    if expected and report.frames < MIN_DECODED_SHARE * expected:
        problems.append(f"decoded {report.frames} of the {expected} frames its header promises")
    if problems:
        message = f"{info.path}: truncated or damaged ({problems[0]})"
        if strict:
            raise VideoError(message)
        report.warnings.append(message)
    errors = [text for level, text in messages if level != "warning" and text not in problems]
    if errors:
        report.warnings.append(f"{info.path}: {len(errors)} decoder error(s), concealed by ffmpeg "
                               f"(first: {errors[0]})")


def fps_or_default(info: VideoInfo, fps: float | None) -> float:
    """The frame rate of the decoded frames (`fps` if resampled), or NaN if the file does not say."""
    rate = fps or info.fps
    return rate if rate > 0 else math.nan
