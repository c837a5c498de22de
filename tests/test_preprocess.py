"""vmz_jax.preprocess: the short-side resize against torch's interpolate, crops, normalization and
the Preprocess pipeline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.torch_protocol import crop_boxes
from vmz_jax.errors import VMZError
from vmz_jax.video.preprocess import (
    MEAN,
    STD,
    Preprocess,
    crop_origins,
    normalize,
    resize_short_side,
    resized_size,
)

#: the normalization of the Caffe2 VideoInputOp specs of the released models
SPEC_MEAN = (110.201, 100.64, 95.9966)
SPEC_STD = (58.1489, 56.4701, 55.3324)
TOL = 1e-4


def torch_resize(frames: np.ndarray, short_side: int) -> np.ndarray:
    """ig65m-pytorch's resize: interpolate(scale_factor=short_side / min(H, W), bilinear,
    align_corners=False) on (N, C, H, W) float32, back to (..., H, W, C)."""
    lead = frames.shape[:-3]
    h, w, c = frames.shape[-3:]
    x = torch.from_numpy(np.ascontiguousarray(frames, np.float32).reshape(-1, h, w, c)).permute(0, 3, 1, 2)
    y = F.interpolate(x, scale_factor=short_side / min(h, w), mode="bilinear", align_corners=False)
    y = y.permute(0, 2, 3, 1).numpy()
    return y.reshape(*lead, *y.shape[1:])


def _check(frames: np.ndarray, short_side: int) -> np.ndarray:
    got = resize_short_side(frames, short_side)
    want = torch_resize(frames, short_side)
    h, w = frames.shape[-3:-1]
    scale = short_side / min(h, w)
    assert got.dtype == np.float32
    assert got.shape == (*frames.shape[:-3], math.floor(h * scale), math.floor(w * scale), frames.shape[-1])
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    return got


@pytest.mark.parametrize(("height", "width", "short_side", "out"), [
    (239, 321, 128, (127, 171)),  # 239 * (128 / 239) = 127.99999999999999: floor gives 127
    (240, 320, 112, (112, 149)),
    (240, 320, 128, (128, 170)),
    (321, 239, 128, (171, 127)),
    (100, 130, 256, (256, 332)),  # upscaling
    (128, 171, 128, (128, 171)),  # identity
    (112, 112, 112, (112, 112)),
    (360, 640, 128, (128, 227)),
    (5, 7, 11, (11, 15)),
    (1, 1, 3, (3, 3)),
])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_resize_equals_torch(height, width, short_side, out, dtype):
    rng = np.random.default_rng(height * 1000 + width)
    frames = rng.integers(0, 256, (height, width, 3)).astype(dtype)
    if dtype != np.uint8:
        frames = frames + rng.random(frames.shape)  # non-integer 0-256 values
    got = _check(frames, short_side)
    assert got.shape[:2] == out
    assert resized_size(height, width, short_side)[1:] == out


def test_resize_identity_is_exact():
    frames = np.random.default_rng(0).integers(0, 256, (2, 128, 171, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_short_side(frames, 128), frames.astype(np.float32))


def test_resize_full_hd_batch():
    frames = np.random.default_rng(1).integers(0, 256, (2, 1080, 1920, 3), dtype=np.uint8)
    got = _check(frames, 128)
    assert got.shape == (2, 128, 227, 3)


@pytest.mark.parametrize("lead", [(4,), (2, 3), ()])
def test_resize_batches(lead):
    """(T, H, W, C) and more leading axes: each frame as if alone."""
    frames = np.random.default_rng(2).integers(0, 256, (*lead, 45, 61, 3), dtype=np.uint8)
    got = _check(frames, 32)
    flat = frames.reshape(-1, 45, 61, 3)
    for i, frame in enumerate(flat):
        np.testing.assert_array_equal(got.reshape(-1, *got.shape[-3:])[i], resize_short_side(frame, 32))


def test_resize_does_not_change_its_input():
    frames = np.random.default_rng(3).integers(0, 256, (3, 30, 40, 3), dtype=np.uint8)
    before = frames.copy()
    resize_short_side(frames, 17)
    np.testing.assert_array_equal(frames, before)


def test_resize_to_nothing_raises_like_torch():
    """49 * (1 / 49) = 0.9999999999999999: torch's output has no rows, and it refuses."""
    frames = np.zeros((49, 60, 3), np.uint8)
    with pytest.raises(RuntimeError):
        torch_resize(frames, 1)
    with pytest.raises(VMZError, match="leaves no pixels"):
        resize_short_side(frames, 1)


@settings(max_examples=150, deadline=None)
@given(height=st.integers(1, 40), width=st.integers(1, 40), short_side=st.integers(1, 48),
       channels=st.integers(1, 4), frames=st.integers(1, 3), as_float=st.booleans(),
       seed=st.integers(0, 2**16))
def test_resize_equals_torch_fuzz(height, width, short_side, channels, frames, as_float, seed):
    rng = np.random.default_rng(seed)
    shape = (frames, height, width, channels)
    x = rng.uniform(0, 255, shape).astype(np.float32) if as_float else rng.integers(0, 256, shape, np.uint8)
    scale = short_side / min(height, width)
    if math.floor(height * scale) < 1 or math.floor(width * scale) < 1:
        with pytest.raises(VMZError):
            resize_short_side(x, short_side)
        return
    _check(x, short_side)


# --------------------------------------------------------------------------------------------
# crops


# Crops go where Caffe2's VideoInputOp::DecodeAndTransform puts them, in C++ int arithmetic: one crop
# at ((H - c) / 2, (W - c) / 2); crop j of three at j * (L - c) / 2 along the long side, which is the
# width only when H < W (a square frame slides vertically). All operands are >= 0, so "/" floors.
# Python's round (torchvision's, ig65m-pytorch's CenterCrop) differs where the excess L - c is 3 mod 4.


def test_crop_origins_landscape():
    # excess 59 (3 mod 4): 59 // 2 = 29; round(29.5) would be 30
    assert crop_origins(128, 171, "center", 112) == [(8, 29)]
    # excess 57 (1 mod 4): 57 // 2 = 28, which round(28.5) (half to even) gives too
    assert crop_origins(128, 169, "center", 112) == [(8, 28)]
    # three crops: 0 * 59 // 2, 1 * 59 // 2, 2 * 59 // 2; top 16 // 2
    assert crop_origins(128, 171, "three", 112) == [(8, 0), (8, 29), (8, 59)]
    assert crop_origins(128, 170, "three", 128) == [(0, 0), (0, 21), (0, 42)]
    # the 147x128 frame at 128: excess 19, middle crop 19 // 2 = 9 (not 10)
    assert crop_origins(128, 147, "three", 128) == [(0, 0), (0, 9), (0, 19)]
    assert crop_origins(128, 228, "three", 128) == [(0, 0), (0, 50), (0, 100)]
    assert crop_origins(128, 171, "none", 112) == [(0, 0)]


def test_crop_origins_portrait():
    assert crop_origins(171, 128, "center", 112) == [(29, 8)]  # 59 // 2, 16 // 2
    assert crop_origins(171, 128, "three", 112) == [(0, 8), (29, 8), (59, 8)]
    # the portrait 128x171 at 128: excess 43, middle crop 43 // 2 = 21 (not 22)
    assert crop_origins(171, 128, "three", 128) == [(0, 0), (21, 0), (43, 0)]
    assert crop_origins(170, 128, "three", 128) == [(0, 0), (21, 0), (42, 0)]


def test_crop_origins_square():
    assert crop_origins(128, 128, "center", 112) == [(8, 8)]
    assert crop_origins(128, 128, "three", 128) == [(0, 0)] * 3
    # H < W is false: the three crops slide vertically (tops 0, 16 // 2, 16), left 16 // 2
    assert crop_origins(128, 128, "three", 112) == [(0, 8), (8, 8), (16, 8)]
    # excess 19 on both axes: 19 // 2 = 9
    assert crop_origins(131, 131, "center", 112) == [(9, 9)]
    assert crop_origins(131, 131, "three", 112) == [(0, 9), (9, 9), (19, 9)]


def test_crop_origins_equal_the_torch_protocols_transcription():
    """Against tests/torch_protocol.py's own transcription of Caffe2's lines, on every shape around
    a 112 crop; and the centre is the middle of three crops."""
    for height in range(112, 124):
        for width in range(112, 124):
            centre = crop_origins(height, width, "center", 112)
            assert centre == crop_boxes(height, width, 112, 1)
            assert crop_origins(height, width, "three", 112) == crop_boxes(height, width, 112, 3)
            assert crop_origins(height, width, "three", 112)[1] == centre[0]


@pytest.mark.parametrize(("height", "width"), [(128, 171), (171, 128), (127, 171)])
@pytest.mark.parametrize("crop", ["center", "three"])
def test_crop_origins_every_crop_fits(height, width, crop):
    for top, left in crop_origins(height, width, crop, 112):
        assert 0 <= top and top + 112 <= height and 0 <= left and left + 112 <= width


@pytest.mark.parametrize("crop", ["center", "three"])
def test_crop_that_does_not_fit(crop):
    with pytest.raises(VMZError, match="does not fit"):
        crop_origins(127, 171, crop, 128)
    with pytest.raises(VMZError, match="does not fit"):
        crop_origins(300, 100, crop, 101)


# --------------------------------------------------------------------------------------------
# normalization


def test_normalize_uses_the_spec_values():
    np.testing.assert_array_equal(MEAN, np.array(SPEC_MEAN, np.float32))
    np.testing.assert_array_equal(STD, np.array(SPEC_STD, np.float32))
    frames = np.random.default_rng(4).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    got = normalize(frames)
    assert got.dtype == np.float32 and got.shape == frames.shape
    want = (frames.astype(np.float64) - np.array(SPEC_MEAN)) / np.array(SPEC_STD)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(normalize(np.array(SPEC_MEAN, np.float32)), 0, atol=1e-6)


def test_normalize_channel_order_is_rgb():
    red = np.zeros((1, 1, 3), np.uint8)
    red[..., 0] = 255
    np.testing.assert_allclose(normalize(red)[0, 0],
                               [(255 - SPEC_MEAN[0]) / SPEC_STD[0], -SPEC_MEAN[1] / SPEC_STD[1],
                                -SPEC_MEAN[2] / SPEC_STD[2]], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Preprocess


def _manual(frame: np.ndarray, short_side: int | None, crop: str, size: int | None) -> np.ndarray:
    """torch's resize, then crops (`size` None: the resized short side), then the spec's mean/std."""
    image = torch_resize(frame, short_side) if short_side else frame.astype(np.float32)
    h, w = image.shape[:2]
    size = size or min(h, w)
    if crop == "none":
        views = [image]
    else:
        views = [image[t:t + size, s:s + size] for t, s in crop_origins(h, w, crop, size)]
    return np.stack([(v - np.array(SPEC_MEAN)) / np.array(SPEC_STD) for v in views])


@pytest.mark.parametrize(("kwargs", "frame_hw", "views", "view_hw"), [
    ({}, (240, 320), 1, (128, 170)),
    ({"short_side": 128, "crop": "center", "crop_size": 112}, (240, 320), 1, (112, 112)),
    ({"short_side": 128, "crop": "three", "crop_size": 112}, (240, 320), 3, (112, 112)),
    ({"short_side": 128, "crop": "three"}, (320, 240), 3, (128, 128)),
    ({"short_side": 112, "crop": "center"}, (239, 321), 1, (112, 112)),
    ({"short_side": None}, (47, 63), 1, (47, 63)),
    ({"short_side": None, "crop": "center", "crop_size": 40}, (47, 63), 1, (40, 40)),
    ({"short_side": 64, "crop": "three", "crop_size": 48}, (239, 321), 3, (48, 48)),
])
def test_preprocess(kwargs, frame_hw, views, view_hw):
    pre = Preprocess(**kwargs)
    assert pre.num_views == views
    assert pre.view_shape(*frame_hw) == view_hw
    assert pre.ffmpeg_size(*frame_hw) is None
    frame = np.random.default_rng(5).integers(0, 256, (*frame_hw, 3), dtype=np.uint8)
    got = pre(frame)
    assert got.dtype == np.float32
    assert got.shape == (views, *view_hw, 3)
    want = _manual(frame, pre.short_side, pre.crop, pre.crop_size)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_preprocess_ffmpeg_resize():
    """resize="ffmpeg": ffmpeg is asked for the resized (width, height); the frame is taken as is."""
    pre = Preprocess(short_side=128, crop="center", crop_size=112, resize="ffmpeg")
    assert pre.ffmpeg_size(240, 320) == (170, 128)
    assert pre.ffmpeg_size(239, 321) == (171, 127)
    assert pre.view_shape(240, 320) == (112, 112)
    scaled = np.random.default_rng(6).integers(0, 256, (128, 170, 3), dtype=np.uint8)
    got = pre(scaled)
    np.testing.assert_allclose(got, normalize(scaled[8:120, 29:141])[None], rtol=0, atol=0)
    assert Preprocess(short_side=None, resize="ffmpeg").ffmpeg_size(240, 320) is None


def test_preprocess_crop_too_big_for_the_frame():
    pre = Preprocess(short_side=None, crop="center", crop_size=64)
    with pytest.raises(VMZError, match="does not fit"):
        pre.view_shape(48, 100)
    with pytest.raises(VMZError, match="does not fit"):
        pre(np.zeros((48, 100, 3), np.uint8))


@pytest.mark.parametrize(("short_side", "frame_hw", "side"), [
    (128, (239, 321), 127),  # 239 * (128 / 239) floors to 127: the crop is 127, not 128
    (128, (321, 239), 127),
    (128, (240, 320), 128),
    (None, (47, 63), 47),
])
def test_default_crop_is_the_resized_short_side(short_side, frame_hw, side):
    for crop, views in (("center", 1), ("three", 3)):
        pre = Preprocess(short_side=short_side, crop=crop)
        assert pre.view_shape(*frame_hw) == (side, side)
        frame = np.random.default_rng(7).integers(0, 256, (*frame_hw, 3), dtype=np.uint8)
        got = pre(frame)
        assert got.shape == (views, side, side, 3)
        np.testing.assert_allclose(got, _manual(frame, short_side, crop, None), rtol=0, atol=TOL)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"crop": "corners"}, "crop must be"),
    ({"resize": "bicubic"}, "resize must be"),
    ({"short_side": 0}, "positive"),
    ({"short_side": -3}, "positive"),
    ({"crop_size": 112}, "needs a crop"),
])
def test_preprocess_validation(kwargs, match):
    with pytest.raises(VMZError, match=match):
        Preprocess(**kwargs)
