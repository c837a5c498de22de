"""`vmz-jax finetune` of an audio-visual model with the Gradient-Blending loss, on videos made with
ffmpeg at test time whose class needs both the sound and the picture: 4 classes = 2 tone pitches x 2
motion directions (a bright square moving left or right on a torus from a random start, so a single
frame says nothing; a sine tone of about 400 or 1800 Hz, jittered, at a random volume).

CPU budget (the shared 2-core machine): the fast suite runs the blended step against
`blended_loss` computed directly and the bad-input checks (~60 s: one compile of av_r2plus1d_18's
train step on 4-frame 16x16 clips; 115 s there under load). The learning run (av_r2plus1d_18 from
random initialisation, 180 steps, ~15 min wall there; see docs/audio_visual.md) and the SIGKILL/resume
check (three CLI processes sharing a compilation cache, ~7 min) are marked slow.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import vmz_jax
from tests.test_finetune import cli, motion_frames
from tests.videos import FORMATS
from vmz_jax.cli import main
from vmz_jax.errors import VMZError
from vmz_jax.train import TrainConfig
from vmz_jax.train.blend import blended_loss
from vmz_jax.train.data import ArrayDataset, BatchLoader
from vmz_jax.train.fit import read_metrics
from vmz_jax.train.step import train_step
from vmz_jax.video import audio
from vmz_jax.video.datasets import VideoClipDataset, from_folders
from vmz_jax.video.decode import ffmpeg_exe

ARCH = "av_r2plus1d_18"
PITCHES = {"high": 1800.0, "low": 400.0}
MOTIONS = ("left", "right")
CLASSES = tuple(f"{p}_{m}" for p in sorted(PITCHES) for m in MOTIONS)  # sorted, as the folders list them


def encode_with_tone(frames: np.ndarray, path: Path, hz: float, volume: float, fps: int = 25) -> Path:
    """`frames` (N, H, W, 3) uint8 as H.264 with an AAC sine tone of `hz` as long as the video."""
    _, height, width, _ = frames.shape
    seconds = len(frames) / fps
    subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
                    "-s", f"{width}x{height}", "-r", str(fps), "-i", "-", "-f", "lavfi", "-i",
                    f"sine=f={hz:.1f}:r=16000:d={seconds:.3f},volume={volume:.3f}", "-map", "0:v",
                    "-map", "1:a", *FORMATS["h264_mp4"][1], "-c:a", "aac", "-threads", "1", str(path)],
                   input=frames.tobytes(), check=True)
    return path


def make_set(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for label in CLASSES:
        pitch, motion = label.split("_")
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            frames = motion_frames(motion, rng, (24, 20))
            hz = PITCHES[pitch] * rng.uniform(0.9, 1.1)
            encode_with_tone(frames, root / label / f"{label}_{i:02d}.mp4", hz, rng.uniform(0.5, 2.0))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ (12 videos per class plus one corrupt file), val/ (5 per class, held apart: other
    random starts, pitches and volumes)."""
    base = tmp_path_factory.mktemp("av_finetune")
    make_set(base / "train", 12, 0)
    make_set(base / "val", 5, 1)
    (base / "train" / "low_left" / "low_left_broken.mp4").write_bytes(
        np.random.default_rng(2).integers(0, 256, 3000, np.uint8).tobytes())
    return base


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", str(data / "train"), "--val", str(data / "val"), "--arch", ARCH, "--from-scratch",
            "--out", str(out), "--clip-len", "4", "--sampling-rate", "2", "--frame-size", "18,20",
            "--crop-size", "16", "--no-flip", "--batch-size", "8", "--workers", "2", "--quiet", *extra]


# ------------------------------------------------------------------------------------------------
# the pieces


def test_clips_carry_their_log_mels(data):
    """VideoClipDataset(audio=True): each clip's (100, 40) block is `vmz_jax.video.audio`'s for the
    clip's first frame (stretched over the video), and the tone's pitch shows in it."""
    videos = from_folders(data / "val")
    dataset = VideoClipDataset(videos, clip_len=4, sampling_rate=2, frame_size=(18, 20), crop_size=16,
                               flip=False, audio=True)
    plain = VideoClipDataset(videos, clip_len=4, sampling_rate=2, frame_size=(18, 20), crop_size=16,
                             flip=False)
    (clip, logmels), label = dataset.load(0, 3, 7)
    same, label_again = plain.load(0, 3, 7)
    assert label == label_again and np.array_equal(clip, same)  # the picture is unchanged
    path = videos[0].path
    _, frames = dataset.inspect(path)
    start = dataset.draw(0, 3, 7, frames, 20, 24).start
    rows = audio.log_mels(audio.decode_audio(path).samples)
    want = audio.clip_log_mels(rows, video_frames=frames, clip_span=dataset.span, starts=[start])[0]
    assert logmels.shape == (100, 40) and logmels.dtype == np.float32
    np.testing.assert_array_equal(logmels, want)
    low, high = (int(np.argmax(dataset.load(i, 0, 0)[0][1].mean(axis=0)))
                 for i in (videos.classes.index("low_left") * 5, videos.classes.index("high_left") * 5))
    assert high > low + 5, (low, high)  # the loudest mel bin follows the pitch


def test_blended_step_and_batches():
    """BatchLoader stacks (clip, logmels) items into the pair of arrays; one train step with
    `blend_weights` reports Gradient-Blending's loss of the three heads, as `blended_loss` gives it,
    and moves the audio and visual heads (each has its own loss term)."""
    rng = np.random.default_rng(0)
    clips = rng.standard_normal((4, 4, 16, 16, 3)).astype(np.float32)
    logmels = (rng.standard_normal((4, 100, 40)) * 3 - 5).astype(np.float32)
    labels = np.array([0, 1, 2, 3])
    with BatchLoader(ArrayDataset(clips, labels, logmels=logmels), 4, workers=1) as loader:
        (batch,) = list(loader.eval_batches())
    assert isinstance(batch.clips, tuple) and batch.clips[1].shape == (4, 100, 40)
    np.testing.assert_array_equal(batch.clips[1], logmels)

    model = vmz_jax.models.av_r2plus1d_18(num_classes=4, rngs=nnx.Rngs(0), clip_length=4)
    model.train()
    weights = (0.2, 0.3, 0.5)
    before = {name: np.array(getattr(model, name).fc.kernel[...]) for name in ("audio", "visual")}
    heads = {k: np.asarray(v, np.float64) for k, v in model.heads(*batch.clips).items()}
    want = float(blended_loss({k: jnp.asarray(v) for k, v in heads.items()}, jnp.asarray(labels), weights)[0])
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    metrics = train_step(model, optimizer, batch.clips, jnp.asarray(batch.labels), blend_weights=weights)
    assert abs(float(metrics["loss"]) - want) < 1e-5 * max(1.0, abs(want)), (float(metrics["loss"]), want)
    assert float(metrics["accuracy"]) == float(np.mean(np.argmax(heads["av"], 1) == labels))
    for name, kernel in before.items():
        assert np.abs(np.asarray(getattr(model, name).fc.kernel[...]) - kernel).max() > 1e-6, name


class BadLogMels(ArrayDataset):
    def load(self, index: int, epoch: int, seed: int):
        (clip, logmels), label = super().load(index, epoch, seed)
        return (clip, logmels[..., None]), label


def test_a_bad_pair_is_one_line():
    rng = np.random.default_rng(0)
    bad = BadLogMels(rng.standard_normal((2, 4, 8, 8, 3)), np.array([0, 1]), logmels=np.zeros((2, 100, 40)))
    with BatchLoader(bad, 2, workers=1) as loader:
        with pytest.raises(VMZError, match="item 0: expected float log-mels"):
            list(loader.eval_batches())


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vmz-jax finetune: error: "), err
    return err[0]


def test_bad_blend_weights_are_one_line(data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(args(data, tmp_path / "a", "--blend-weights", "1,2"))
    assert "expected three weights >= 0" in capsys.readouterr().err
    visual = ["finetune", str(data / "train"), "--arch", "r3d_10", "--from-scratch", "--out",
              str(tmp_path / "b"), "--blend-weights", "0.2,0.3,0.5", "--quiet"]
    assert main(visual) == 2
    assert "r3d_10 is not an audio-visual model" in one_error(capsys)
    assert main(args(data, tmp_path / "c")) == 2  # no published weights for a random av_r2plus1d_18
    assert "pass --blend-weights A,V,AV" in one_error(capsys)
    with pytest.raises(VMZError, match="no label smoothing"):
        TrainConfig(blend_weights=(0.2, 0.3, 0.5), label_smoothing=0.1)
    model = vmz_jax.models.r3d_10(num_classes=2, rngs=nnx.Rngs(0))
    clips = ArrayDataset(np.zeros((2, 4, 8, 8, 3), np.float32), np.array([0, 1]))
    with pytest.raises(VMZError, match="r3d_10 has one head"):
        vmz_jax.train.fit(model, clips, None, TrainConfig(blend_weights=(0.2, 0.3, 0.5), batch_size=2),
                          tmp_path / "fit")


# ------------------------------------------------------------------------------------------------
# learning and resuming (slow)

BLEND = ("--blend-weights", "0.25,0.25,0.5")
LEARN = ("--epochs", "30", "--lr", "0.015", "--schedule", "cosine", "--weight-decay", "1e-4",
         "--blend-weights", "0.1,0.5,0.4")


@pytest.mark.slow  # 180 steps: ~15 min wall on the loaded 2-core machine; best 0.95 measured at step 78
def test_learns_pitch_and_motion_together(data, tmp_path, capsys):
    """Validation accuracy (the av head, one centre clip per held-apart video) >= 95%: neither the
    sound (2 pitches) nor the picture (2 directions) alone can pass 50%."""
    out = tmp_path / "run"
    started = time.process_time()
    assert main(args(data, out, *LEARN)) == 0
    cpu = time.process_time() - started
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("vmz-jax finetune: best validation accuracy"), line
    records = read_metrics(out)
    val = [r for r in records if "val_accuracy" in r]
    assert max(r["val_accuracy"] for r in val) >= 0.95, val
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["blend_weights"] == [0.1, 0.5, 0.4]
    finetune = json.loads((out / "finetune.json").read_text())
    assert finetune["audio"]["blend_weights_from"] == "--blend-weights"
    failures = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert [Path(f["path"]).name for f in failures] == ["low_left_broken.mp4"]
    saved = vmz_jax.load(ARCH, checkpoint=out / "model")
    assert saved.labels == CLASSES
    print(f"learning run: {len([r for r in records if 'loss' in r])} steps, CPU {cpu:.0f} s, val {val}")


@pytest.mark.slow
def test_sigkill_then_resume_repeats_the_losses(data, tmp_path):
    """The CLI killed (SIGKILL) in the middle of training, then run again with --resume, writes the
    same per-step losses and validations as a run that was never interrupted, bit for bit."""
    cache = tmp_path / "home"
    short = ("--epochs", "2", "--checkpoint-every", "2", "--lr", "0.02", *BLEND)
    reference = cli(args(data, tmp_path / "reference", *short), cache)
    _, err = reference.communicate(timeout=900)
    assert reference.returncode == 0, err

    run = tmp_path / "run"
    killed = cli(args(data, run, *short), cache)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and killed.poll() is None:
        if sum(1 for r in read_metrics(run) if "loss" in r) >= 5:
            break
        time.sleep(0.05)
    killed.kill()
    killed.communicate()
    assert killed.returncode == -9, "the run ended before it could be killed"
    resumed = cli(args(data, run, *short, "--resume"), cache)
    out, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err

    def losses(records):
        return [(r["step"], r.get("loss", r.get("val_loss")), r.get("val_accuracy")) for r in records]

    expected = losses(read_metrics(tmp_path / "reference"))
    got = losses(read_metrics(run))
    assert len(expected) == 2 * 6 + 2 and len({x[1] for x in expected}) > 1
    assert got == expected
    assert out.count("\n") == 1 and "best validation accuracy" in out
