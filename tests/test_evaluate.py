"""`vmz-jax evaluate` / `vmz_jax.evaluate`: the protocol against an independent PyTorch implementation,
the convolutional head against Caffe2's convolutionalized FC in torch, reports with known answers,
failures, class matching, the pinned run record, and resuming after SIGKILL."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import imageio_ffmpeg
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import vmz_jax
from tests import torch_protocol
from tests.parity import make_pair
from tests.test_checkpoint import random_params
from tests.videos import make_video
from vmz_jax.cli import main
from vmz_jax.errors import VMZError
from vmz_jax.evaluation import Protocol, match_classes, vmz_protocol
from vmz_jax.evaluation import run as evaluation_run
from vmz_jax.evaluation.metrics import compute, most_confused
from vmz_jax.models.forward import make_forward
from vmz_jax.video.preprocess import MEAN, STD
from vmz_jax.weights import checkpoint
from vmz_jax.weights import download as dl

REPO = Path(__file__).resolve().parents[1]
ARCH = "r3d_10"
NAMES = ["a", "b", "c", "d", "e"]


@pytest.fixture(autouse=True)
def home(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(dl.HOME_ENV, str(tmp_path / "home"))


@pytest.fixture(scope="module")
def pair():
    """The torch reference and our model with the same random weights and BN statistics."""
    ref, model = make_pair(ARCH, seed=3, num_classes=5)
    return ref, model


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """A landscape, a portrait and a square video in three classes, lengths that make the uniform clip
    starts uneven, and sizes where crop placement matters: resized to short side 64, 48 or 40 the
    long side is 75, 56 or 47 (a 49x49 frame floors to 63 at 64), so 56, 45 and 32 crops leave an
    excess of 19, 11 and 15 pixels (and the square's 7 and 3): 3 mod 4, where Caffe2's floored half
    and Python's half-to-even rounding of it differ by one pixel (see tests/torch_protocol.py)."""
    root = tmp_path_factory.mktemp("eval") / "data"
    for name in "bcd":
        (root / name).mkdir(parents=True)
    make_video(root / "b", "wide", frames=23, size=(80, 68))
    make_video(root / "d", "tall", frames=30, size=(68, 80), fmt="mpeg4_avi")
    make_video(root / "c", "square", frames=19, size=(49, 49))
    return root


# --- the convolutional head -----------------------------------------------------------------------

def test_conv_head_equals_caffe2s_convolutional_fc_in_torch(pair):
    ref, model = pair
    x = np.random.default_rng(0).standard_normal((2, 8, 48, 64, 3)).astype(np.float32)
    xt = torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy())
    # (the logits form is checked end to end in test_protocol_equals_torch)
    for softmax, head, average in (("position", "conv", "softmax"), ("joint", "conv-joint", "softmax")):
        forward = make_forward(model, "conv_head", conv_window=2, conv_softmax=softmax)
        got = np.asarray(forward(jnp.asarray(x)))
        want = torch_protocol.head_scores(ref, xt, head, average, 2).numpy()
        assert got.shape == (2, 5)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # a 3x4 map pooled by 2x2 windows: 2x3 positions, so the three forms really differ
    per_position = make_forward(model, "conv_head", conv_window=2)(jnp.asarray(x))
    joint = make_forward(model, "conv_head", conv_window=2, conv_softmax="joint")(jnp.asarray(x))
    assert np.abs(np.asarray(per_position) - np.asarray(joint)).max() > 1e-4
    np.testing.assert_allclose(np.asarray(joint).sum(axis=1), 1.0, rtol=1e-6)


def test_conv_head_on_a_1x1_map_is_the_pooled_head(pair):
    _, model = pair
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 8, 32, 32, 3)), jnp.float32)  # 2x2 map
    probabilities = np.asarray(make_forward(model, "probabilities")(x))
    got = np.asarray(make_forward(model, "conv_head", conv_window=2, conv_softmax="joint")(x))
    np.testing.assert_allclose(got, probabilities, rtol=0, atol=2e-6)
    with pytest.raises(VMZError, match="3x3 pooling window does not fit the 2x2 layer4 map"):
        make_forward(model, "conv_head", conv_window=3)(x)


# --- the protocol against PyTorch ------------------------------------------------------------------

VARIANTS = {
    "10x1 at 56 of 64, pooled head": Protocol(clips=10, crops=1, frame_size=64, crop_size=56, clip_len=8),
    "10x3 at 45 of 48, conv-joint head": Protocol(clips=10, crops=3, frame_size=48, crop_size=45, clip_len=8,
                                                  sampling_rate=2, head="conv-joint", conv_window=2),
    "3x3 at 48, conv head, logits": Protocol(clips=3, crops=3, frame_size=48, crop_size=48, clip_len=8,
                                             head="conv", conv_window=2, average="logits"),
    "4x1 at 32 of 40, pooled head, logits": Protocol(clips=4, crops=1, frame_size=40, crop_size=32,
                                                     clip_len=4, sampling_rate=3, average="logits"),
    "10x1 at 112 of 128, pooled head": Protocol(clips=10, crops=1, frame_size=128, crop_size=112, clip_len=8),
}
SLOW_VARIANTS = {"10x1 at 112 of 128, pooled head"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_VARIANTS else n
                                  for n in VARIANTS])
def test_protocol_equals_torch(pair, videos, name):
    ref, model = pair
    protocol = VARIANTS[name]
    result = vmz_jax.evaluate(model, videos, None, protocol, labels=NAMES, progress=False, batch_size=10)
    assert result.metrics["videos"] == 3 and not result.failures
    assert result.metrics["views"] == 3 * protocol.views
    correct = 0
    for row, path, label in zip(result.scores, result.paths, result.labels, strict=True):
        want, views = torch_protocol.video_scores(
            ref, path, clips=protocol.clips, crops=protocol.crops, frame_size=protocol.frame_size,
            crop_size=protocol.crop_size, clip_len=protocol.clip_len, sampling_rate=protocol.sampling_rate,
            head=protocol.head, average=protocol.average, window=protocol.conv_window)
        assert len(views) == protocol.views
        np.testing.assert_allclose(row, want, rtol=0, atol=1e-5)
        correct += int(np.sum(np.argmax(views, axis=1) == label))
    assert result.metrics["clip@1"] == correct / (3 * protocol.views)


@pytest.mark.slow
def test_csn_protocol_at_full_size_equals_torch(tmp_path):
    """VMZ's test_net_large protocol at its real size: 10 clips x 3 crops of 256, sampling rate 2,
    the conv-joint head with its 7x7 window (2x2 positions on ir-CSN's 8x8 layer4 map). 347 wide:
    an excess of 91, so Caffe2's middle crop is at 45 (rounding would put it at 46)."""
    ref, model = make_pair("ir_csn_26", seed=2, num_classes=6, clip_length=8)
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    make_video(root / "a", "v", frames=40, size=(347, 256))
    protocol = vmz_protocol("ir_csn_26", clip_len=8)
    got = (protocol.crops, protocol.crop_size, protocol.sampling_rate, protocol.head, protocol.conv_window)
    assert got == (3, 256, 2, "conv-joint", 7)
    result = vmz_jax.evaluate(model, root, None, protocol, labels=list("abcdef"), progress=False)
    want, views = torch_protocol.video_scores(ref, result.paths[0], clips=10, crops=3, frame_size=256,
                                              crop_size=256, clip_len=8, sampling_rate=2, head="conv-joint",
                                              window=7)
    assert len(views) == 30
    # measured 8e-9; the rounded middle crop (46) moves the scores by 6.5e-6 on this 256-pixel view
    np.testing.assert_allclose(result.scores[0], want, rtol=0, atol=2e-6)


def test_vmz_protocols():
    small = vmz_protocol("r2plus1d_34", clip_len=32)
    assert (small.clips, small.crops, small.frame_size, small.crop_size, small.head, small.sampling_rate) == \
        (10, 1, 128, 112, "pool", 1)
    large = vmz_protocol("ip_csn_152", clip_len=32)
    got = (large.crops, large.frame_size, large.crop_size, large.sampling_rate, large.head, large.conv_window)
    assert got == (3, 256, 256, 2, "conv-joint", 7)
    assert vmz_protocol("r2plus1d_34", trained_crop=224).conv_window == 14  # no pool1: 16x16 map
    assert vmz_protocol("c3d").clip_len == 16
    with pytest.raises(VMZError, match="crops must be 1"):
        Protocol(crops=2)
    with pytest.raises(VMZError, match="does not fit"):
        Protocol(frame_size=100, crop_size=112)


# --- known answers ---------------------------------------------------------------------------------

LEVELS = {"ape": 40, "bee": 90, "cat": 140, "dog": 190, "eel": 240}
MODEL_CLASSES = ["ape", "bee", "cat", "dog", "eel", "fox"]


def _gray_video(directory: Path, name: str, level: int, frames: int = 9) -> Path:
    path = directory / f"{name}.mp4"
    colour = f"0x{level:02x}{level:02x}{level:02x}"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"color=c={colour}:size=40x32:rate=25", "-frames:v", str(frames), "-c:v", "libx264",
                    "-preset", "ultrafast", "-pix_fmt", "yuv444p", str(path)], check=True)
    return path


def _anchor(level: float) -> float:
    return float(np.mean((level - MEAN) / STD))


def _level_classifier(net, x):
    """Scores from the mean normalized pixel: a softmax over minus the distance to each class's grey
    level (fox: no level, always last)."""
    del net
    anchors = jnp.asarray([_anchor(v) for v in LEVELS.values()] + [1e3], jnp.float32)
    m = jnp.mean(x, axis=(1, 2, 3, 4))
    return jax.nn.softmax(-10.0 * jnp.abs(m[:, None] - anchors[None, :]), axis=-1)


@pytest.fixture(scope="module")
def grey_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grey") / "data"
    plan = {"ape": ["ape", "ape", "bee"], "bee": ["bee"], "dog": ["dog", "cat"], "fox": ["ape"]}
    for label, shown in plan.items():
        (root / label).mkdir(parents=True)
        for i, level in enumerate(shown):
            _gray_video(root / label, f"{label}{i}", LEVELS[level])
    (root / "dog" / "zz_corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200)
    return root


def test_known_answers_to_the_last_digit(grey_data, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation_run, "view_forward",
                        lambda model, protocol: make_forward(model, _level_classifier))
    model = vmz_jax.models.build(ARCH, 6, clip_length=4, rngs=nnx.Rngs(0))
    protocol = Protocol(clips=3, crops=1, frame_size=32, crop_size=32, clip_len=4)
    out = tmp_path / "out"
    result = vmz_jax.evaluate(model, grey_data, out, protocol, labels=MODEL_CLASSES, progress=False)
    report = json.loads((out / "report.json").read_text())
    # ape: ape ape bee -> 2 of 3; bee: 1 of 1; dog: dog cat -> 1 of 2; fox (shown ape): 0 of 1, and
    # fox is ranked last, outside the top 5 of 6; the corrupt video is excluded.
    assert report["metrics"] == {"videos": 7, "views": 21, "clip@1": 12 / 21, "video@1": 4 / 7,
                                 "video@5": 6 / 7, "mean_class@1": math.fsum([2 / 3, 1.0, 1 / 2, 0.0]) / 4}
    assert result.metrics == report["metrics"]
    assert report["failed"] == 1 and report["failures"][0]["path"].endswith("zz_corrupt.mp4")
    assert "zz_corrupt.mp4" in report["failures"][0]["error"]
    assert report["protocol"]["clips"] == 3 and report["weights"]["labels"] == "given"
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["top5"][0][0] for p in predictions] == ["ape", "ape", "bee", "bee", "dog", "cat", "ape"]
    assert [p["label"] for p in predictions] == ["ape", "ape", "ape", "bee", "dog", "dog", "fox"]
    assert all(p["top5"][-1][0] != "fox" for p in predictions)
    scores = np.load(out / "scores.npy")
    assert scores.shape == (7, 6) and scores.dtype == np.float32
    np.testing.assert_array_equal(scores, result.scores)
    assert json.loads((out / "classes.json").read_text()) == MODEL_CLASSES
    rows = (out / "per_class.csv").read_text().splitlines()
    assert rows[0].startswith("class,index,videos,top1_correct,top1,top5,most_confused_with")
    assert rows[1].startswith("ape,0,3,2,") and ",bee,1" in rows[1]
    assert rows[4].startswith("fox,5,1,0,0.0,0.0,ape,1")
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["most_confused"][0] == ["ape", "bee", 1]
    table = result.table()
    assert "video@1       57.14%" in table and "1 failed (excluded)" in table


def test_metrics_recomputed_from_scores():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]], np.float32)
    labels = np.array([1, 1, 0, 2])
    m = compute(scores, labels, np.array([3, 1, 0, 2]), np.array([3, 3, 3, 3]), ["x", "y", "z"])
    # row 1 ties 0.5/0.5: the lower index (x) wins
    assert (m.video_top1, m.video_top5, m.clip_top1, m.top5_k) == (2 / 4, 1.0, 6 / 12, 3)
    assert m.mean_class_top1 == math.fsum([0.0, 0.5, 1.0]) / 3
    assert most_confused(m.confusion, ["x", "y", "z"]) == [("x", "z", 1), ("y", "x", 1)]


# --- classes ---------------------------------------------------------------------------------------

def test_classes_match_by_name():
    model = ["abseiling", "playing cards", "petting animal (not cat)", "a", "A"]
    assert match_classes(["playing_cards", "abseiling", "petting_animal_not_cat"], model, "x") == [1, 0, 2]
    assert match_classes(["a"], model, "x") == [3]  # exact names first
    with pytest.raises(VMZError, match=r"^list.csv: 2 class\(es\) of the dataset are not among the model's 5 "
                                       r"classes: 'juggling', 'surfing'$"):
        match_classes(["juggling", "abseiling", "surfing"], model, "list.csv")


# --- the command line: checkpoint, errors, pinning, resume -----------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ck") / "model"
    checkpoint.save(directory, random_params(ARCH, 5, seed=4), {"arch": ARCH, "num_classes": 5,
                                                              "clip_length": 8, "labels": NAMES})
    return directory


SMALL = ["--clips", "3", "--frame-size", "32", "--crop-size", "32", "--clip-len", "4", "--quiet"]


def test_cli_errors_are_one_line(videos, ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(videos), "--arch", ARCH, "--checkpoint", str(ckpt), "--out", str(out), *SMALL]
    assert main(["evaluate", *args]) == 0
    captured = capsys.readouterr()
    assert "video@1" in captured.out and "mean class@1" in captured.out
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"]["name"] == "custom" and report["weights"]["labels"].startswith("saved")
    # a different protocol in the same directory
    assert main(["evaluate", *args, "--clips", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds an evaluation with a different protocol" in err[0] and "clips" in err[0]
    assert main(["evaluate", *args, "--clips", "2", "--overwrite"]) == 0
    assert json.loads((out / "report.json").read_text())["metrics"]["views"] == 4
    capsys.readouterr()
    # a class the model does not know
    (videos.parent / "more" / "zebra").mkdir(parents=True, exist_ok=True)
    make_video(videos.parent / "more" / "zebra", "z", frames=5)
    assert main(["evaluate", str(videos.parent / "more"), "--arch", ARCH, "--checkpoint", str(ckpt),
                 "--out", str(tmp_path / "o2"), *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vmz-jax evaluate: error: {videos.parent / 'more'}: 1 class(es) of the dataset are not "
                   "among the model's 5 classes: 'zebra'"]
    # no names for a 5-class head without saved labels
    bare = tmp_path / "bare"
    checkpoint.save(bare, random_params(ARCH, 5, seed=4), {"arch": ARCH, "num_classes": 5})
    assert main(["evaluate", str(videos), "--arch", ARCH, "--checkpoint", str(bare), "--out",
                 str(tmp_path / "o3"), *SMALL]) == 2
    assert "have no names" in capsys.readouterr().err


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, ckpt):
    root = tmp_path / "data"
    for i in range(8):
        label = NAMES[i % 3]
        (root / label).mkdir(parents=True, exist_ok=True)
        make_video(root / label, f"v{i}", frames=12 + 3 * i, size=(40, 32))
    command = [sys.executable, "-m", "vmz_jax.cli", "evaluate", str(root), "--arch", ARCH, "--checkpoint",
               str(ckpt), *SMALL, "--workers", "1", "--batch-size", "3"]
    # the same compiler settings as this process (tests/conftest.py), so the numbers can be equal
    env = {**os.environ, "VMZ_JAX_HOME": str(tmp_path / "home"), "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
           "JAX_ENABLE_X64": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*command, "--out", str(killed)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = killed / "progress.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.exists() and progress.read_text().count("\n") >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, "the evaluation finished before it could be killed"
    finished = progress.read_text().count("\n")
    assert 2 <= finished < 8 and not (killed / "report.json").exists()
    with progress.open("a") as f:  # a line torn by the kill is cut off on resume
        f.write('{"index": 7, "pa')
    rerun = subprocess.run([*command, "--out", str(killed)], cwd=REPO, env=env, capture_output=True,
                           text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    whole = tmp_path / "whole"
    model = vmz_jax.load(ARCH, checkpoint=ckpt, progress=False)
    protocol = vmz_jax.evaluation.default_protocol(model).replace(clips=3, frame_size=32, crop_size=32,
                                                                 clip_len=4)
    vmz_jax.evaluate(model, root, whole, protocol, progress=False, batch_size=3)
    np.testing.assert_array_equal(np.load(killed / "scores.npy"), np.load(whole / "scores.npy"))
    a, b = (json.loads((d / "report.json").read_text()) for d in (killed, whole))
    assert a["metrics"] == b["metrics"] and a["protocol"] == b["protocol"] and a["weights"] == b["weights"]
    assert (killed / "predictions.jsonl").read_text() == (whole / "predictions.jsonl").read_text()
    assert len((killed / "progress.jsonl").read_text().splitlines()) == 8
