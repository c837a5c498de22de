"""`evaluate` with audio: VMZ's audio-visual test protocol (``test_net.py --input_type 3``) against an
independent computation: the PyTorch reference written from the Caffe2 builder
(`vmz_jax.reference.av_torch`), fed the clips `tests/torch_protocol.py` decodes and cuts and each
clip's log-mels from the audio front end (`vmz_jax.video.audio`, checked on its own in
tests/test_audio.py), scored as Caffe2's test net scores them: the fusion head's softmax, or with the
convolutional prediction, ``create_av_resnet``'s ``use_convolutional_pred`` branch (the audio
features expanded and tiled 2 x 2 over the visual positions, ``av_fc1``/``av_fc2``/``last_out`` as
1x1x1 convolutions) and Caffe2's Softmax over classes x positions, reduced over the positions."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vmz_jax
from porting import readers
from tests import torch_protocol
from tests.test_audio_visual import random_blobs
from tests.videos import make_video
from vmz_jax.cli import main
from vmz_jax.errors import VMZError
from vmz_jax.evaluation import Protocol, vmz_protocol
from vmz_jax.reference import av_torch
from vmz_jax.video import audio
from vmz_jax.video.decode import ffmpeg_exe
from vmz_jax.weights import download as dl

CLASSES = ["high", "low", "mute"]
AV_ARCH = "av_r2plus1d_18"
CLIP_LEN = 8


@pytest.fixture(autouse=True)
def home(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(dl.HOME_ENV, str(tmp_path / "home"))


def _with_track(video: Path, name: str, source: str) -> Path:
    out = video.with_name(name)
    subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-i", str(video), "-f", "lavfi", "-i",
                    source, "-map", "0:v", "-map", "1:a", "-c:v", "copy", "-c:a", "aac", str(out)],
                   check=True)
    video.unlink()
    return out


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Three classes: a tone over the whole video, a short noise burst (the track ends 0.7 s before
    the 1.2 s video: "short"), no audio track ("missing"). 64x48 frames: three 48 crops along the
    long side."""
    root = tmp_path_factory.mktemp("av_eval") / "data"
    for name in CLASSES:
        (root / name).mkdir(parents=True)
    _with_track(make_video(root / "high", "tone_src", frames=34, size=(64, 48)), "tone.mp4",
                "sine=f=1500:r=44100:d=1.36,volume=3")
    _with_track(make_video(root / "low", "burst_src", frames=30, size=(64, 48), fmt="h264_mp4"), "burst.mp4",
                "anoisesrc=r=16000:d=0.5:a=0.4:seed=2")
    make_video(root / "mute", "silent", frames=27, size=(64, 48))
    return root


@pytest.fixture(scope="module")
def av_model(tmp_path_factory):
    """(reference net with the blobs, our model loaded from the same random Caffe2 .pkl, its path)."""
    net = av_torch.build(AV_ARCH, len(CLASSES), clip_length=CLIP_LEN)
    blobs = sharpen(random_blobs(net, seed=5))
    path = tmp_path_factory.mktemp("weights") / f"{AV_ARCH}.pkl"
    readers.write_caffe2_pkl(path, blobs)
    net.load_blobs({k: torch.from_numpy(v) for k, v in blobs.items()})
    return net.eval(), vmz_jax.load(AV_ARCH, checkpoint=path), path


def sharpen(blobs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Classifiers 5x larger: scores far from uniform, so that a wrong view or block shows."""
    return {k: v * 5 if "last_out" in k else v for k, v in blobs.items()}


def clip_log_mels(path: str, num_frames: int, span: int, clips: int, aligned: bool) -> np.ndarray:
    """Each uniformly spaced clip's (100, 40) log-mels: stretched over the video (audio-visual
    models) or cut from the raw frames (audio ResNets)."""
    track = audio.decode_audio(path)
    rows = audio.log_mels(track.samples)
    if aligned:
        return audio.clip_log_mels(rows, video_frames=num_frames, clip_span=span, num_clips=clips)
    return audio.uniform_clips(rows, clips)


def _conv1x1(x: torch.Tensor, net: av_torch.Caffe2Net, name: str) -> torch.Tensor:
    weight = net.blobs[f"{name}_w"]
    return F.conv3d(x, weight.reshape(*weight.shape, 1, 1, 1), net.blobs[f"{name}_b"])


def caffe2_view_scores(net: av_torch.Caffe2Net, views: torch.Tensor, logmels: np.ndarray, protocol: Protocol,
                       num_classes: int) -> np.ndarray:
    """(views, classes): Caffe2's test net on each view. Pool: the softmax of the head's blob. Conv-joint
    (av head): ``create_av_resnet``'s ``use_convolutional_pred`` branch, then loss_creator's Softmax
    (axis 1: classes x positions) and ReduceBackMean over the 3 position axes, times the positions
    (vmz_jax reports the sum over positions, so that a row sums to 1; the ranking is the same)."""
    with torch.no_grad():
        blobs = net(data=views, logmels=torch.from_numpy(logmels)[:, None])
        if protocol.head == "pool":
            name = {"av": "last_out", "audio": "a_last_out", "visual": "v_last_out"}[protocol.model_head]
            return torch.softmax(blobs[f"{name}_L{num_classes}"].double(), 1).numpy()
        assert protocol.head == "conv-joint" and protocol.model_head == "av"
        order = list(blobs)
        last_v = blobs[order[order.index("v_final_avg") - 1]]  # the visual tower's last map
        kt = min(views.shape[2] // 8 if views.shape[2] >= 8 else 1, last_v.shape[2])
        w = protocol.conv_window
        v_final_avg = F.avg_pool3d(last_v, (kt, w, w), stride=1)
        assert v_final_avg.shape[2:] == (1, 2, 2)  # Caffe2's Tile(2) x Tile(2) needs a 1x2x2 map
        a_3d = blobs["a_final_avg"].unsqueeze(4)  # ExpandDims dims=[4]: (N, C, 1, 1, 1)
        a_tiled = torch.cat([a_3d, a_3d], dim=3)  # Tile tiles=2 axis=3
        a_tiled = torch.cat([a_tiled, a_tiled], dim=4)  # Tile tiles=2 axis=4
        x = torch.cat([v_final_avg, a_tiled], dim=1)  # Concat axis 1: [visual, audio]
        x = torch.relu(_conv1x1(x, net, "av_fc1"))
        x = torch.relu(_conv1x1(x, net, "av_fc2"))
        last_out = _conv1x1(x, net, f"last_out_L{num_classes}").double()  # (N, classes, 1, 2, 2)
        n = last_out.shape[0]
        softmax_unreduced = torch.softmax(last_out.reshape(n, -1), 1).reshape(last_out.shape)
        softmax = softmax_unreduced.mean(dim=(2, 3, 4))  # ReduceBackMean, num_reduce_dim=3
        return (softmax * 4).numpy()


def reference_video(net: av_torch.Caffe2Net, path: str, protocol: Protocol, num_classes: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    views, num_frames = torch_protocol.clip_views(
        path, clips=protocol.clips, crops=protocol.crops, frame_size=protocol.frame_size,
        crop_size=protocol.crop_size, clip_len=protocol.clip_len, sampling_rate=protocol.sampling_rate)
    span = (protocol.clip_len - 1) * protocol.sampling_rate + 1
    blocks = clip_log_mels(path, num_frames, span, protocol.clips, protocol.audio == "aligned")
    per_view = np.repeat(blocks, protocol.crops, axis=0)  # every crop of a clip hears the same block
    scores = caffe2_view_scores(net, views, per_view, protocol, num_classes)
    return scores.mean(axis=0), scores


CONV_JOINT = Protocol(clips=2, crops=3, frame_size=48, crop_size=48, clip_len=CLIP_LEN, head="conv-joint",
                      conv_window=2, model_head="av", audio="aligned")


def test_av_conv_joint_protocol_equals_caffe2s_test_net_in_torch(av_model, videos, tmp_path):
    net, model, _ = av_model
    out = tmp_path / "report"
    result = vmz_jax.evaluate(model, videos, out, CONV_JOINT, labels=CLASSES, progress=False, batch_size=6)
    assert result.metrics["videos"] == 3 and not result.failures
    correct = 0
    for row, path, label in zip(result.scores, result.paths, result.labels, strict=True):
        want, views = reference_video(net, path, CONV_JOINT, len(CLASSES))
        assert views.shape == (6, 3)
        np.testing.assert_allclose(row, want, rtol=0, atol=1e-5)
        correct += int(np.sum(np.argmax(views, axis=1) == label))
    assert result.metrics["clip@1"] == correct / 18
    assert result.audio == {"present": 1, "short": [str(videos / "low" / "burst.mp4")],
                            "missing": [str(videos / "mute" / "silent.mp4")]}
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"]["model_head"] == "av" and report["protocol"]["audio"] == "aligned"
    assert report["audio"] == result.audio
    assert "the av classifier" in report["protocol_text"]
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [line["audio"] for line in lines] == ["present", "short", "missing"]
    assert any("no audio track" in w for w in lines[2]["warnings"])


def test_the_audio_decides_the_scores(av_model, videos):
    """The same video scored with its tone and with its track dropped: the log-mels reach the model."""
    net, model, _ = av_model
    protocol = CONV_JOINT.replace(clips=1, crops=1, frame_size=48, head="pool")
    tone = videos / "high" / "tone.mp4"
    with_sound = reference_video(net, str(tone), protocol, len(CLASSES))[0]
    blocks = np.zeros((1, 100, 40), np.float32)
    views, _ = torch_protocol.clip_views(str(tone), clips=1, crops=1, frame_size=48, crop_size=48,
                                         clip_len=CLIP_LEN)
    silent = caffe2_view_scores(net, views, blocks, protocol, len(CLASSES))[0]
    assert np.abs(with_sound - silent).max() > 1e-3


def test_audio_resnet_through_the_cli(videos, tmp_path):
    """`vmz-jax evaluate --arch a_resnet_18`: VMZ's audio-only input (10 uniformly spaced blocks of the
    raw log-mels, no stretching), its one head, softmax and mean, equal to the reference's."""
    arch = "a_resnet_18"
    net = av_torch.build(arch, len(CLASSES))
    blobs = sharpen(random_blobs(net, seed=7))
    weights = tmp_path / "a.pkl"
    readers.write_caffe2_pkl(weights, blobs)
    net.load_blobs({k: torch.from_numpy(v) for k, v in blobs.items()})
    net.eval()
    (tmp_path / "labels.json").write_text(json.dumps(CLASSES))
    out = tmp_path / "report"
    args = ["evaluate", str(videos), "--out", str(out), "--arch", arch, "--checkpoint", str(weights),
            "--labels", str(tmp_path / "labels.json"), "--quiet", "--frame-size", "48", "--crop-size", "48",
            "--clip-len", "8", "--batch-size", "10"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"]["model_head"] == "audio" and report["protocol"]["audio"] == "raw"
    assert report["protocol"]["clips"] == 10 and report["protocol"]["name"] == "custom"
    scores = np.load(out / "scores.npy")
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    for row, line in zip(scores, lines, strict=True):
        blocks = audio.uniform_clips(audio.log_mels(audio.decode_audio(line["path"]).samples), 10)
        with torch.no_grad():
            logits = net(logmels=torch.from_numpy(blocks)[:, None])["last_out_L3"].double()
        np.testing.assert_allclose(row, torch.softmax(logits, 1).mean(0).numpy(), rtol=0, atol=1e-5)
    assert main([*args, "--head", "visual"]) == 2  # an audio ResNet has only its audio head


def test_protocols_and_heads():
    av = vmz_protocol("av_ip_csn_152", clip_len=32)
    got = (av.clips, av.crops, av.crop_size, av.sampling_rate, av.head, av.conv_window)
    assert got == (10, 3, 256, 2, "conv-joint", 7) and (av.model_head, av.audio) == ("av", "aligned")
    assert vmz_protocol("av_r2plus1d_101", clip_len=16, trained_crop=224).conv_window == 14
    small = vmz_protocol("av_r2plus1d_18", clip_len=8)
    assert (small.crops, small.crop_size, small.head, small.model_head) == (1, 112, "pool", "av")
    a = vmz_protocol("a_resnet_50")
    assert (a.clips, a.crops, a.head, a.model_head, a.audio) == (10, 1, "pool", "audio", "raw")
    assert "model_head" not in vmz_protocol("ip_csn_152").record()  # visual records are unchanged
    with pytest.raises(VMZError, match="go together"):
        Protocol(model_head="av")
    with pytest.raises(VMZError, match="model head must be one of"):
        Protocol(model_head="fusion", audio="aligned")  # type: ignore[arg-type]


def test_visual_model_refuses_an_audio_head(videos):
    from flax import nnx

    model = vmz_jax.models.r3d_10(num_classes=3, rngs=nnx.Rngs(0))
    with pytest.raises(VMZError, match="r3d_10 is a visual model"):
        vmz_jax.evaluate(model, videos, None, CONV_JOINT.replace(crops=1, head="pool"), labels=CLASSES,
                         progress=False)
    assert main(["evaluate", str(videos), "--out", "x", "--arch", "r3d_10", "--checkpoint", "none.pth",
                 "--head", "av"]) == 2
    assert main(["evaluate", str(videos), "--out", "x", "--arch", AV_ARCH, "--checkpoint", "none.pkl",
                 "--head", "av", "--head", "audio"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("head", ["av", "audio", "visual"])
def test_every_head_pooled_through_the_cli(av_model, videos, tmp_path, head):
    """`--head HEAD` on the pooled protocol (test_net.py's 10 clips x 1 centre crop, at 40 of 48): the
    head's softmax, mean over the clips, equal to the reference's; the head is in report.json."""
    net, _, weights = av_model
    (tmp_path / "labels.json").write_text(json.dumps(CLASSES))
    out = tmp_path / "report"
    assert main(["evaluate", str(videos), "--out", str(out), "--arch", AV_ARCH, "--checkpoint", str(weights),
                 "--labels", str(tmp_path / "labels.json"), "--quiet", "--frame-size", "48", "--crop-size",
                 "40", "--clip-len", str(CLIP_LEN), "--head", head, "--batch-size", "10"]) == 0
    report = json.loads((out / "report.json").read_text())
    protocol = Protocol(**{k: v for k, v in report["protocol"].items()})
    assert (protocol.model_head, protocol.head, protocol.clips, protocol.crops) == (head, "pool", 10, 1)
    scores = np.load(out / "scores.npy")
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    for row, line in zip(scores, lines, strict=True):
        want, _ = reference_video(net, line["path"], protocol, len(CLASSES))
        np.testing.assert_allclose(row, want, rtol=0, atol=1e-5)
