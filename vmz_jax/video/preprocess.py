"""Frames to network input: short-side resize, crops, normalization.

The resize is the one ig65m-pytorch's `extract` runs, `torch.nn.functional.interpolate(clip,
scale_factor=s, mode="bilinear", align_corners=False)` with ``s = short_side / min(H, W)``,
reproduced in NumPy: output ``floor(dim * s)`` per axis, sampling grid ``(dest + 0.5) / s - 0.5``
with the same ``s`` on both axes (clamped at 0, in float32 as torch computes it), bilinear weights,
no antialiasing, float32 output. The ffmpeg resize (`Preprocess(resize="ffmpeg")`) scales inside
the decoder instead: much less data leaves ffmpeg for large videos, but its bilinear filter widens
when it shrinks (it averages, like antialiasing) and it rounds to uint8, so its pixels differ; see
``docs/video.md`` for the measured difference. Crops go where Caffe2's `VideoInputOp` puts VMZ's
test crops (`crop_origins`), on every path that crops.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from vmz_jax.errors import VMZError

#: Caffe2 `VideoInputOp` normalization of every released model, RGB, on 0-255 values.
MEAN = np.array([110.201, 100.64, 95.9966], np.float32)
STD = np.array([58.1489, 56.4701, 55.3324], np.float32)

Crop = Literal["none", "center", "three"]
Resize = Literal["exact", "ffmpeg"]


def resized_size(height: int, width: int, short_side: int) -> tuple[float, int, int]:
    """(scale, out_height, out_width) for a short-side resize, as `interpolate(scale_factor=...)`."""
    scale = short_side / min(height, width)
    return scale, math.floor(height * scale), math.floor(width * scale)


@functools.lru_cache(maxsize=256)
def _axis_taps(in_size: int, out_size: int, scale: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights along one axis, as torch's upsample_bilinear2d computes them."""
    step = np.float32(1.0 / scale)
    centres = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    # torch's compiled kernel fuses step * centre - 0.5 into one FMA: a single rounding to float32
    # (the float64 product of two float32 values is exact).
    real = (np.float64(step) * centres.astype(np.float64) - 0.5).astype(np.float32)
    real = np.maximum(real, np.float32(0.0))
    i0 = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
    w1 = np.clip(real - i0.astype(np.float32), np.float32(0.0), np.float32(1.0)).astype(np.float32)
    i1 = i0 + (i0 < in_size - 1)
    return i0, i1, (np.float32(1.0) - w1).astype(np.float32), w1


@functools.lru_cache(maxsize=256)
def _resize_plan(height: int, width: int, channels: int, short_side: int,
                 window: tuple[int, int, int, int] | None) -> tuple[np.ndarray, ...]:
    """Row taps and weights, and column taps and weights over the flattened (W * C) axis."""
    scale, out_h, out_w = resized_size(height, width, short_side)
    if out_h < 1 or out_w < 1:
        raise VMZError(f"resizing {height}x{width} to short side {short_side} leaves no pixels")
    top, left, h, w = window or (0, 0, out_h, out_w)
    if min(top, left) < 0 or top + h > out_h or left + w > out_w:
        raise VMZError(f"window {window} is outside the {out_h}x{out_w} resized frame")
    y0, y1, hy0, hy1 = (a[top:top + h] for a in _axis_taps(height, out_h, scale))
    x0, x1, wx0, wx1 = (a[left:left + w] for a in _axis_taps(width, out_w, scale))
    c = np.arange(channels)
    return (y0, y1, hy0[:, None], hy1[:, None], (x0[:, None] * channels + c).ravel(),
            (x1[:, None] * channels + c).ravel(), np.repeat(wx0, channels), np.repeat(wx1, channels))


def resize_short_side(frames: np.ndarray, short_side: int,
                      window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """(..., H, W, C) frames, any real dtype, to float32 with the short side `short_side`.

    Equal (to float32 rounding) to torch's ``interpolate(scale_factor=short_side / min(H, W),
    mode="bilinear", align_corners=False)``. `window` = (top, left, height, width) computes only that
    part of the output (a crop of it), reading only the source pixels it needs.
    """
    *lead, height, width, channels = frames.shape
    y0, y1, hy0, hy1, c0, c1, wx0, wx1 = _resize_plan(height, width, channels, short_side, window)
    # Rows of W * C values: every operation below runs along long contiguous rows.
    flat = frames.reshape(*lead, height, width * channels)

    # Width first, then height: the nesting of torch's kernel, h0 * (w0 a + w1 b) + h1 * (w0 c + w1 d).
    def across(rows: np.ndarray) -> np.ndarray:
        return (np.take(rows, c0, axis=-1).astype(np.float32) * wx0
                + np.take(rows, c1, axis=-1).astype(np.float32) * wx1)

    out = (across(np.take(flat, y0, axis=-2)) * hy0 + across(np.take(flat, y1, axis=-2)) * hy1)
    return out.reshape(*lead, len(y0), len(c0) // channels, channels)


#: Where crops go, for every path that crops (see ``crop_origins``): recorded with evaluations.
CROP_RULE = "caffe2-video-input-op"


def crop_origins(height: int, width: int, crop: Crop, size: int) -> list[tuple[int, int]]:
    """(top, left) of each `size` crop of a `height` x `width` frame, placed as Caffe2's
    `VideoInputOp::DecodeAndTransform` places VMZ's test crops, in its integer arithmetic (the
    operands are non-negative, so C++'s division floors):

    * "center": ``((H - c) // 2, (W - c) // 2)``;
    * "three": crop j = 0, 1, 2 at ``j * (L - c) // 2`` along the long side and centred across it;
      only a frame wider than high (``H < W``) slides horizontally, so a square frame's crops slide
      vertically, as a portrait one's do.

    The middle of three crops is the centre crop. torchvision's and ig65m-pytorch's ``CenterCrop``
    round half to even instead, one pixel further when the excess ``L - c`` is 3 mod 4."""
    if crop == "none":
        return [(0, 0)]
    if size > min(height, width):
        raise VMZError(f"a {size}x{size} crop does not fit {height}x{width} frames")
    top, left = (height - size) // 2, (width - size) // 2
    if crop == "center":
        return [(top, left)]
    if height < width:
        return [(top, j * (width - size) // 2) for j in range(3)]
    return [(j * (height - size) // 2, left) for j in range(3)]


@functools.lru_cache(maxsize=64)
def _tiled(width: int) -> tuple[np.ndarray, np.ndarray]:
    return np.tile(MEAN, width), np.tile(STD, width)


def normalize(frames: np.ndarray) -> np.ndarray:
    """(..., W, 3) 0-255 RGB values to the networks' input, float32: (x - MEAN) / STD."""
    frames = np.asarray(frames, np.float32)
    if frames.ndim < 2:
        return (frames - MEAN) / STD
    mean, std = _tiled(frames.shape[-2])
    flat = frames.reshape(*frames.shape[:-2], -1)  # long rows instead of a 3-wide inner loop
    return ((flat - mean) / std).reshape(frames.shape)


@dataclass(frozen=True)
class Preprocess:
    """What happens to each decoded frame. `short_side` None keeps the decoded size; `crop_size`
    None means square crops of the resized short side (which can be `short_side` - 1: the resize
    floors ``dim * scale``, and 239 * (128 / 239) is just under 128 in floating point)."""

    short_side: int | None = 128
    crop: Crop = "none"
    crop_size: int | None = None
    resize: Resize = "exact"

    def __post_init__(self) -> None:
        if self.crop not in ("none", "center", "three"):
            raise VMZError(f"crop must be none, center or three, not {self.crop!r}")
        if self.resize not in ("exact", "ffmpeg"):
            raise VMZError(f"resize must be exact or ffmpeg, not {self.resize!r}")
        if self.short_side is not None and self.short_side < 1:
            raise VMZError(f"the frame size must be positive, not {self.short_side}")
        if self.crop == "none" and self.crop_size is not None:
            raise VMZError("a crop size needs a crop (center or three)")

    @property
    def num_views(self) -> int:
        return 3 if self.crop == "three" else 1

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize."""
        if self.short_side is None:
            return height, width
        _, h, w = resized_size(height, width, self.short_side)
        return h, w

    def view_shape(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of each view of a frame of `height` x `width`."""
        h, w = self.resized(height, width)
        if self.crop == "none":
            return h, w
        size = self.crop_size or min(h, w)
        crop_origins(h, w, self.crop, size)  # raises if it does not fit
        return size, size

    def ffmpeg_size(self, height: int, width: int) -> tuple[int, int] | None:
        """(width, height) to ask ffmpeg to scale to, or None when the resize is done here."""
        if self.resize != "ffmpeg" or self.short_side is None:
            return None
        h, w = self.resized(height, width)
        return w, h

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """One decoded (H, W, 3) uint8 frame (already scaled, if ffmpeg scaled it) to its views,
        (views, h, w, 3) float32, normalized."""
        exact = self.short_side is not None and self.resize == "exact"
        h, w = self.resized(*frame.shape[:2]) if exact else frame.shape[:2]
        if self.crop == "none":
            return normalize(resize_short_side(frame, self.short_side) if exact else frame)[None]
        size = self.crop_size or min(h, w)
        views = []
        for top, left in crop_origins(h, w, self.crop, size):
            if exact:
                assert self.short_side is not None
                view = resize_short_side(frame, self.short_side, (top, left, size, size))
            else:
                view = frame[top:top + size, left:left + size]
            views.append(normalize(view))
        return np.stack(views)
