"""`vmz-jax finetune` of an audio-visual model with the Gradient-Blending loss, on videos made with
ffmpeg at test time whose class needs both the sound and the picture: 4 classes = 2 tone pitches x 2
motion directions (a sawtooth drifting left or right from a random phase, so a single frame says
nothing; a sine tone of about 400 or 1800 Hz, jittered, at a random volume), drawn independently.

CPU budget (the shared 2-core machine): the fast suite (the blended train step on a two-layer
stand-in model against `blended_loss`, clips with their log-mels, the bad-input checks) took 30 s
wall there under load, most of it making the videos. The learning run (av_r2plus1d_18 from random
initialisation, 120 steps: 212 CPU s, 7 min wall there) and the SIGKILL/resume check (three CLI
processes sharing a compilation cache, compiling as the tests do: 4 min wall there) are marked slow.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import vmz_jax
from tests.test_finetune import kill_and_resume
from tests.videos import FORMATS
from vmz_jax.cli import main
from vmz_jax.errors import VMZError
from vmz_jax.train import TrainConfig
from vmz_jax.train.blend import blended_loss
from vmz_jax.train.data import ArrayDataset, BatchLoader, steps_per_epoch
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


def drift_frames(direction: str, rng: np.random.Generator, size: tuple[int, int] = (24, 20),
                 frames: int = 12, speed: int = 2) -> np.ndarray:
    """A horizontal sawtooth (dark to bright across the width, wrapping) drifting `speed` pixels a
    frame left or right from a random phase, with noise: every pixel of every crop sees the motion
    (it brightens or darkens steadily), while a single frame says nothing about the direction."""
    width, height = size
    step = speed if direction == "right" else -speed
    x = np.arange(width) - int(rng.integers(width))
    rows = np.stack([40.0 + 180.0 * ((x - step * t) % width) / width for t in range(frames)])
    out = rows[:, None, :] + rng.normal(0, 6, (frames, height, width))
    return np.repeat(np.clip(out, 0, 255).astype(np.uint8)[..., None], 3, -1)


def make_set(root: Path, per_class: int, seed: int) -> Path:
    """The pitch (jittered +-10%), the volume and the drift's phase are drawn independently of each
    other, so the picture says nothing about the pitch and the sound nothing about the direction."""
    rng = np.random.default_rng(seed)
    for label in CLASSES:
        pitch, motion = label.split("_")
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            hz = PITCHES[pitch] * rng.uniform(0.9, 1.1)
            encode_with_tone(drift_frames(motion, rng), root / label / f"{label}_{i:02d}.mp4", hz,
                             rng.uniform(0.5, 2.0))
    return root


TRAIN_PER_CLASS, VAL_PER_CLASS = 16, 10


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ (16 videos per class plus one corrupt file), val/ (10 per class, held apart: other
    random phases, pitches and volumes)."""
    base = tmp_path_factory.mktemp("av_finetune")
    make_set(base / "train", TRAIN_PER_CLASS, 0)
    make_set(base / "val", VAL_PER_CLASS, 1)
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
                 for i in (videos.classes.index(c) * VAL_PER_CLASS for c in ("low_left", "high_left")))
    assert high > low + 5, (low, high)  # the loudest mel bin follows the pitch


class Tower(nnx.Module):
    def __init__(self, channels: int, rngs: nnx.Rngs):
        self.proj = nnx.Linear(channels, 8, rngs=rngs)
        self.fc = nnx.Linear(8, 4, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.proj(x.reshape(x.shape[0], -1, x.shape[-1]).mean(axis=1)))


class TinyAudioVisual(nnx.Module):
    """`AudioVisualResNet.heads` on two one-layer towers (the fusion head reads their features, as
    there; the audio and visual classifiers are used by their own heads only): the train step's
    blending compiles in a second, where av_r3d_18's takes ~40 s."""

    def __init__(self, rngs: nnx.Rngs):
        self.visual, self.audio = Tower(3, rngs), Tower(40, rngs)
        self.fc = nnx.Linear(16, 4, rngs=rngs)

    def heads(self, clips: jax.Array, logmels: jax.Array) -> dict[str, jax.Array]:
        visual, sound = self.visual.features(clips), self.audio.features(logmels)
        return {"av": self.fc(jnp.concatenate([visual, sound], -1)), "audio": self.audio.fc(sound),
                "visual": self.visual.fc(visual)}


def test_blended_step_and_batches():
    """BatchLoader stacks (clip, logmels) items into the pair of arrays; one train step with
    `blend_weights` reports Gradient-Blending's loss of the three heads, as `blended_loss` gives it,
    and the av head's accuracy; a head's classifier moves exactly when its loss term has weight."""
    rng = np.random.default_rng(0)
    clips = rng.standard_normal((4, 4, 16, 16, 3)).astype(np.float32)
    logmels = (rng.standard_normal((4, 100, 40)) * 3 - 5).astype(np.float32)
    labels = np.array([0, 1, 2, 3])
    with BatchLoader(ArrayDataset(clips, labels, logmels=logmels), 4, workers=1) as loader:
        (batch,) = list(loader.eval_batches())
    assert isinstance(batch.clips, tuple) and batch.clips[1].shape == (4, 100, 40)
    np.testing.assert_array_equal(batch.clips[1], logmels)

    model = TinyAudioVisual(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    def kernels() -> dict[str, np.ndarray]:
        return {name: np.array(getattr(model, name).fc.kernel[...]) for name in ("audio", "visual")}

    for weights, moved in (((0.2, 0.3, 0.5), {"audio", "visual"}), ((0.0, 0.3, 0.7), {"visual"})):
        before = kernels()
        heads = {k: np.asarray(v, np.float64) for k, v in model.heads(*batch.clips).items()}
        want = float(blended_loss({k: jnp.asarray(v) for k, v in heads.items()}, jnp.asarray(labels),
                                  weights)[0])
        assert abs(want - float(optax.softmax_cross_entropy_with_integer_labels(
            jnp.asarray(heads["av"]), jnp.asarray(labels)).mean())) > 1e-3  # the blend is not the av loss
        metrics = train_step(model, optimizer, batch.clips, jnp.asarray(batch.labels), blend_weights=weights)
        assert abs(float(metrics["loss"]) - want) < 1e-5 * max(1.0, abs(want)), (float(metrics["loss"]), want)
        assert float(metrics["accuracy"]) == float(np.mean(np.argmax(heads["av"], 1) == labels))
        after = kernels()
        assert {name for name in after if np.abs(after[name] - before[name]).max() > 1e-6} == moved, weights


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
LEARN = ("--epochs", "15", "--lr", "0.015", "--schedule", "cosine", "--weight-decay", "1e-4",
         "--blend-weights", "0.1,0.5,0.4")


def swapped_predictions(model, val: Path) -> dict[str, float]:
    """The av head's class for each validation clip as it is, with the log-mels of a video of the
    other pitch, and with the picture of a video of the other direction: the fraction of clips
    whose predicted pitch follows the sound and whose predicted direction follows the picture."""
    videos = from_folders(val)
    dataset = VideoClipDataset(videos, clip_len=4, sampling_rate=2, frame_size=(18, 20), crop_size=16,
                               train=False, audio=True)
    items = [dataset.load(i, 0, 0)[0] for i in range(len(videos))]
    clips, logmels = (np.stack(x) for x in zip(*items, strict=True))
    labels = videos.labels
    per_class = len(videos) // len(CLASSES)
    # CLASSES is (high_left, high_right, low_left, low_right): +2 classes flips the pitch, +-1 the direction
    other_pitch = (np.arange(len(videos)) + 2 * per_class) % len(videos)
    other_motion = np.where(labels % 2 == 0, np.arange(len(videos)) + per_class,
                            np.arange(len(videos)) - per_class)
    model.eval()
    logits = nnx.jit(lambda m, c, a: m(c, a))(
        model, jnp.asarray(np.concatenate([clips, clips, clips[other_motion]])),
        jnp.asarray(np.concatenate([logmels, logmels[other_pitch], logmels])))
    plain, sound, picture = np.split(np.argmax(np.asarray(logits), 1), 3)
    return {"accuracy": float(np.mean(plain == labels)),
            "pitch_follows_sound": float(np.mean(plain // 2 != sound // 2)),
            "direction_follows_picture": float(np.mean(plain % 2 != picture % 2))}


@pytest.mark.slow  # 120 steps of av_r2plus1d_18 on 4x16x16 clips: 212 CPU s (the run prints it)
def test_learns_pitch_and_motion_together(data, tmp_path, capsys):
    """The final validation accuracy (the av head, one centre clip per held-apart video, 40 videos)
    >= 95%. Pitch and direction are drawn independently, so a classifier that ignores the sound
    (or the picture) is right on at most half the videos in expectation; the trained model's
    prediction also flips pitch when the sound is swapped for another pitch's and flips direction
    when the picture is swapped, so it reads both."""
    out = tmp_path / "run"
    started = time.process_time()
    assert main(args(data, out, *LEARN)) == 0
    cpu = time.process_time() - started
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("vmz-jax finetune: best validation accuracy"), line
    records = read_metrics(out)
    val = [(r["step"], r["val_accuracy"]) for r in records if "val_accuracy" in r]
    steps = len([r for r in records if "loss" in r])
    with capsys.disabled():
        print(f"\nlearning run: {steps} steps, CPU {cpu:.0f} s, validation (step, accuracy): {val}")
    assert val[-1][1] >= 0.95, val
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["blend_weights"] == [0.1, 0.5, 0.4]
    finetune = json.loads((out / "finetune.json").read_text())
    assert finetune["audio"]["blend_weights_from"] == "--blend-weights"
    failures = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert [Path(f["path"]).name for f in failures] == ["low_left_broken.mp4"]
    saved = vmz_jax.load(ARCH, checkpoint=out / "model")
    assert saved.labels == CLASSES
    swaps = swapped_predictions(saved, data / "val")
    with capsys.disabled():
        print(f"swapped inputs: {swaps}")
    assert swaps["pitch_follows_sound"] >= 0.9 and swaps["direction_follows_picture"] >= 0.9, swaps


@pytest.mark.slow  # three CLI processes: 242 s wall as pytest on the loaded 2-core machine
def test_sigkill_then_resume_repeats_the_losses(data, tmp_path, monkeypatch):
    """The CLI killed (SIGKILL) in the middle of training, then run again with --resume, writes the
    same per-step losses and validations as a run that was never interrupted, bit for bit."""
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # compile as this process does (conftest)
    short = ("--epochs", "2", "--checkpoint-every", "2", "--lr", "0.02", *BLEND)
    expected, got, out = kill_and_resume(lambda d: args(data, d, *short), tmp_path, tmp_path / "home",
                                         kill_after=5, timeout=900)
    per_epoch = steps_per_epoch(len(CLASSES) * TRAIN_PER_CLASS + 1, 8)  # + the corrupt video
    assert len(expected) == 2 * per_epoch + 2 and len({x[1] for x in expected}) > 1
    assert got == expected
    assert out.count("\n") == 1 and "best validation accuracy" in out
