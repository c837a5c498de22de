"""VMZ's test protocol written independently in PyTorch, for the evaluation parity tests.

Imports nothing of vmz_jax's JAX code: frames are decoded by the ffmpeg binary (imageio-ffmpeg)
through a pipe, resized with ig65m-pytorch's `interpolate(scale_factor=...)`, cut into VMZ's
uniformly spaced clips (clip k starts at floor(k * (N - span) / (clips - 1))), cropped where Caffe2's
VideoInputOp crops (centre, or three along the long side: `crop_boxes`), normalized with Caffe2's
mean/std and scored by `vmz_jax.reference.vmz_torch` with a pooled or a convolutional head (Caffe2's
convolutionalized FC).
"""

from __future__ import annotations

import json
import subprocess

import imageio_ffmpeg
import numpy as np
import torch
import torch.nn.functional as F

MEAN = torch.tensor([110.201, 100.64, 95.9966]).reshape(3, 1, 1, 1)
STD = torch.tensor([58.1489, 56.4701, 55.3324]).reshape(3, 1, 1, 1)


def decode(path: str) -> np.ndarray:
    """All frames of `path` as (N, H, W, 3) uint8 RGB."""
    exe = imageio_ffmpeg.get_ffmpeg_exe()
    out = subprocess.run([exe, "-nostdin", "-v", "error", "-i", path, "-f", "rawvideo", "-pix_fmt", "rgb24",
                          "-fps_mode", "passthrough", "-"], capture_output=True, check=True).stdout
    size = _size(path)
    return np.frombuffer(out, np.uint8).reshape(-1, size[1], size[0], 3)


def _size(path: str) -> tuple[int, int]:
    """(width, height) from ffmpeg's stream description."""
    exe = imageio_ffmpeg.get_ffmpeg_exe()
    info = subprocess.run([exe, "-nostdin", "-i", path], capture_output=True, text=True).stderr
    for line in info.splitlines():
        if "Video:" in line:
            for token in line.replace(",", " ").split():
                if "x" in token and token.split("x")[0].isdigit() and token.split("x")[1].isdigit():
                    w, h = token.split("x")
                    return int(w), int(h)
    raise ValueError(f"no video size in ffmpeg's description of {path}: {json.dumps(info[-300:])}")


def uniform_starts(num_frames: int, span: int, clips: int) -> list[int]:
    if num_frames < span:
        return [0] * clips
    room = num_frames - span
    return [room // 2] if clips == 1 else [k * room // (clips - 1) for k in range(clips)]


def _cpp_div(a: int, b: int) -> int:
    """C++'s int division: truncates toward zero."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def crop_boxes(h: int, w: int, size: int, crops: int) -> list[tuple[int, int]]:
    """(h_off, w_off) of each crop, transcribed from Caffe2's VideoInputOp::DecodeAndTransform
    (caffe2/video/video_input_op.h), in its int arithmetic:

        if (crop_per_clip_ > 1) {
          if (height < width) {
            h_off = (height - crop_size_) / 2;
            w_off = j * (width - crop_size_) / (crop_per_clip_ - 1);
          } else {
            h_off = j * (height - crop_size_) / (crop_per_clip_ - 1);
            w_off = (width - crop_size_) / 2;
          }
        } else { h_off = (height - crop_size_) / 2; w_off = (width - crop_size_) / 2; }
    """
    if crops == 1:
        return [(_cpp_div(h - size, 2), _cpp_div(w - size, 2))]
    if h < w:
        return [(_cpp_div(h - size, 2), _cpp_div(j * (w - size), crops - 1)) for j in range(crops)]
    return [(_cpp_div(j * (h - size), crops - 1), _cpp_div(w - size, 2)) for j in range(crops)]


def head_scores(ref: torch.nn.Module, clip: torch.Tensor, head: str, average: str,
                window: int) -> torch.Tensor:
    """Views (B, 3, T, H, W) -> (B, classes): the pooled head's softmax/logits, or the convolutional
    head: layer4 average-pooled at stride 1 over (T//8 or 1, window, window), the FC as a 1x1x1
    convolution, then Caffe2's Softmax over classes x positions ("conv-joint", summed over
    positions), a softmax per position ("conv", mean), or the mean of the logits."""
    with torch.no_grad():
        stages = ref.stage_outputs(clip)
        if head == "pool":
            logits = stages["logits"].double()
            return torch.softmax(logits, 1) if average == "softmax" else logits
        layer4 = stages["layer4"]
        frames = clip.shape[2]
        kt = min(frames // 8 if frames >= 8 else 1, layer4.shape[2])
        pooled = F.avg_pool3d(layer4, (kt, window, window), stride=1)
        fc = ref.fc
        weight = fc.weight.reshape(*fc.weight.shape, 1, 1, 1)
        logits = F.conv3d(pooled, weight, fc.bias).double()  # (B, classes, T', H', W')
        if average == "logits":
            return logits.mean(dim=(2, 3, 4))
        if head == "conv":
            return torch.softmax(logits, 1).mean(dim=(2, 3, 4))
        # Caffe2's Softmax(axis=1) on the 5-D blob: one softmax over classes x positions per view
        joint = torch.softmax(logits.reshape(len(logits), -1), 1).reshape(logits.shape)
        return joint.sum(dim=(2, 3, 4))


def clip_views(path: str, *, clips: int, crops: int, frame_size: int, crop_size: int, clip_len: int,
               sampling_rate: int = 1) -> tuple[torch.Tensor, int]:
    """(the views (clips x crops, 3, T, H, W), clip by clip, normalized; the number of frames)."""
    frames = decode(path)
    n = len(frames)
    span = (clip_len - 1) * sampling_rate + 1
    views = []
    for start in uniform_starts(n, span, clips):
        index = [min(start + j * sampling_rate, n - 1) for j in range(clip_len)]
        clip = torch.from_numpy(frames[index].copy()).float().permute(3, 0, 1, 2)  # (3, T, H, W)
        scale = frame_size / min(clip.shape[-2:])
        clip = F.interpolate(clip, scale_factor=scale, mode="bilinear", align_corners=False)
        clip = (clip - MEAN) / STD
        h, w = clip.shape[-2:]
        for top, left in crop_boxes(h, w, crop_size, crops):
            views.append(clip[:, :, top:top + crop_size, left:left + crop_size])
    return torch.stack(views).contiguous(), n


def video_scores(ref: torch.nn.Module, path: str, *, clips: int, crops: int, frame_size: int, crop_size: int,
                 clip_len: int, sampling_rate: int = 1, head: str = "pool", average: str = "softmax",
                 window: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """(video score (classes,), per-view scores (views, classes)) of one video under the protocol."""
    views, _ = clip_views(path, clips=clips, crops=crops, frame_size=frame_size, crop_size=crop_size,
                          clip_len=clip_len, sampling_rate=sampling_rate)
    scores = head_scores(ref, views, head, average, window).numpy()
    return scores.mean(axis=0), scores
