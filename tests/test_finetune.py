"""`vmz-jax finetune` end to end on videos made with ffmpeg at test time.

CPU budget: the fast suite runs only the bad-input checks, ~26 s on the loaded 2-core machine (making
~80 small videos in four codecs, a few seconds, and a random 400-class r3d_10 checkpoint; every error
comes before any compile). The learning run (r3d_10 on 4-frame 16x16 clips, 192 steps of 8 clips,
~325 s there) and the SIGKILL/resume check (three CLI processes sharing a compilation cache, ~295 s)
are marked slow: neither fits the fast budget on this machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import vmz_jax
from tests.videos import FORMATS
from vmz_jax.cli import main
from vmz_jax.models.variables import get_variables
from vmz_jax.train.fit import read_metrics
from vmz_jax.video.decode import ffmpeg_exe
from vmz_jax.weights import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("down", "left", "right", "up")  # sorted, as a folder per class lists them
MOVES = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}
#: (width, height) and codec of the videos, in turn: several sizes and codecs in every class.
KINDS = (((24, 20), "h264_mp4"), ((22, 20), "mpeg4_avi"), ((20, 22), "mjpeg_mkv"), ((24, 22), "vp9_webm"))


def motion_frames(label: str, rng: np.random.Generator, size: tuple[int, int], frames: int = 12,
                  square: int = 6, speed: int = 2) -> np.ndarray:
    """A bright square moving one way on a torus from a random start: a single frame says nothing
    about the class (the position is uniform), only the motion does."""
    width, height = size
    base = np.full((height, width), 40.0)
    base[:square, :square] = 220.0
    base = np.roll(base, (int(rng.integers(height)), int(rng.integers(width))), (0, 1))
    dy, dx = MOVES[label]
    out = np.stack([np.roll(base, (dy * speed * t, dx * speed * t), (0, 1)) for t in range(frames)])
    out = out + rng.normal(0, 6, out.shape)
    return np.repeat(np.clip(out, 0, 255).astype(np.uint8)[..., None], 3, -1)


def encode(frames: np.ndarray, path_stem: Path, fmt: str, fps: int = 25) -> Path:
    suffix, codec = FORMATS[fmt]
    path = path_stem.with_suffix(suffix)
    _, height, width, _ = frames.shape
    subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
                    "-s", f"{width}x{height}", "-r", str(fps), "-i", "-", *codec, "-threads", "1",
                    str(path)], input=frames.tobytes(), check=True)
    return path


def make_set(root: Path, per_class: int, seed: int) -> Path:
    """root/<class>/<video>: `per_class` videos of each class, sizes and codecs in turn."""
    rng = np.random.default_rng(seed)
    for c, label in enumerate(CLASSES):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size, fmt = KINDS[(i + c) % len(KINDS)]
            encode(motion_frames(label, rng, size), root / label / f"{label}_{i:02d}", fmt)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ (16 videos per class plus one corrupt file), val/ (4 per class), and 400-class random
    "pretrained" r3d_10 weights in an Orbax directory."""
    base = tmp_path_factory.mktemp("finetune")
    make_set(base / "train", 16, 0)
    make_set(base / "val", 4, 1)
    rng = np.random.default_rng(2)
    (base / "train" / "left" / "left_broken.mp4").write_bytes(rng.integers(0, 256, 3000, np.uint8).tobytes())
    pretrained = vmz_jax.models.r3d_10(num_classes=400, rngs=nnx.Rngs(1))
    ckpt.save(base / "pretrained", get_variables(pretrained),
              {"arch": "r3d_10", "num_classes": 400, "clip_length": 4})
    return base


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", str(data / "train"), "--val", str(data / "val"), "--arch", "r3d_10",
            "--checkpoint", str(data / "pretrained"), "--out", str(out), "--clip-len", "4",
            "--sampling-rate", "2", "--frame-size", "18,20", "--crop-size", "16", "--no-flip",
            "--batch-size", "8", "--workers", "2", "--quiet", *extra]


LEARN = ("--epochs", "24", "--lr", "0.01", "--schedule", "cosine", "--weight-decay", "1e-4")


@pytest.mark.slow  # ~190 steps: 325 s on the loaded 2-core machine (first >= 0.9 at step 112)
def test_learns_motion_from_videos_and_logs_the_corrupt_file(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(data, out, *LEARN)) == 0
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("vmz-jax finetune: best validation accuracy"), line
    records = read_metrics(out)
    val = [r for r in records if "val_accuracy" in r]
    best = max(r["val_accuracy"] for r in val)
    assert best >= 0.9, val
    assert f"{best:.4f}" in line[0] and f"model: {out / 'model'}" in line[0]
    assert "vmz-jax evaluate" in line[0]
    # 65 training files, one unreadable: logged once (though drawn in every epoch), nothing else
    failures = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["set"], Path(f["path"]).name) for f in failures] == [("train", "left_broken.mp4")], failures
    assert json.loads((out / "labels.json").read_text()) == list(CLASSES)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 24 * 8 + 1))  # 65 // 8 an epoch
    for name in ("config.json", "finetune.json", "curves.png", "metrics.jsonl"):
        assert (out / name).is_file(), name
    saved = vmz_jax.load("r3d_10", checkpoint=out / "model")
    assert saved.labels == CLASSES and saved.num_classes == 4


# ------------------------------------------------------------------------------------------------
# resume


def cli(argv: list[str], cache: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", VMZ_JAX_HOME=str(cache))
    code = "import sys; from vmz_jax.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def kill_and_resume(command, tmp_path: Path, cache: Path, kill_after: int, timeout: int):
    """Run `command(out_dir)` to the end, run it again, SIGKILL it after `kill_after` step losses,
    resume it; return (the uninterrupted run's records, the resumed run's, the resume's stdout), each
    record (step, loss or validation loss, validation accuracy)."""
    reference = cli(command(tmp_path / "reference"), cache)
    _, err = reference.communicate(timeout=timeout)
    assert reference.returncode == 0, err

    run = tmp_path / "run"
    killed = cli(command(run), cache)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and killed.poll() is None:
        if sum(1 for r in read_metrics(run) if "loss" in r) >= kill_after:
            break
        time.sleep(0.05)
    killed.kill()
    killed.communicate()
    assert killed.returncode == -9, "the run ended before it could be killed"
    resumed = cli([*command(run), "--resume"], cache)
    out, err = resumed.communicate(timeout=timeout)
    assert resumed.returncode == 0, err

    def losses(records):
        return [(r["step"], r.get("loss", r.get("val_loss")), r.get("val_accuracy")) for r in records]

    return losses(read_metrics(tmp_path / "reference")), losses(read_metrics(run)), out


@pytest.mark.slow  # three CLI processes: 295 s on the loaded 2-core machine
def test_sigkill_then_resume_repeats_the_losses(data, tmp_path):
    """The CLI killed (SIGKILL) in the middle of training, then run again with --resume, writes the same
    per-step losses and validations as a run that was never interrupted, bit for bit."""
    short = ("--epochs", "3", "--checkpoint-every", "2", "--lr", "0.02", "--schedule", "cosine")
    expected, got, out = kill_and_resume(lambda d: args(data, d, *short), tmp_path, tmp_path / "home",
                                         kill_after=7, timeout=600)
    assert len(expected) == 3 * 8 + 3 and len({x[1] for x in expected}) > 1
    assert got == expected
    assert out.count("\n") == 1 and "best validation accuracy" in out


# ------------------------------------------------------------------------------------------------
# bad input


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vmz-jax finetune: error: "), err
    return err[0]


def test_bad_input_is_one_line_before_training(data, tmp_path, capsys):
    # a validation class that training lacks
    val = tmp_path / "val_extra"
    make_set(val, 2, 5)
    (val / "sideways").mkdir()
    first = next((val / "left").iterdir())
    first.rename(val / "sideways" / first.name)
    argv = args(data, tmp_path / "a", "--epochs", "1")
    argv[argv.index("--val") + 1] = str(val)
    assert main(argv) == 2
    assert "sideways" in one_error(capsys)
    # an empty class folder
    train = tmp_path / "train_empty"
    make_set(train, 1, 6)
    (train / "still").mkdir()
    argv = args(data, tmp_path / "b", "--epochs", "1")
    argv[1] = str(train)
    assert main(argv) == 2
    assert "still" in one_error(capsys)
    # an unknown label in a list file
    listing = tmp_path / "list.csv"
    up, left = next((data / "train" / "up").iterdir()), next((data / "train" / "left").iterdir())
    listing.write_text(f"{up},up\n{left},sideways\n")
    argv = args(data, tmp_path / "c", "--epochs", "1")
    argv[argv.index("--val") + 1] = str(listing)
    assert main(argv) == 2
    assert "sideways" in one_error(capsys)
    # a run directory of another run, and --resume with nothing to resume
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    assert main(args(data, other, "--epochs", "1")) == 2
    assert "--resume" in one_error(capsys)
    assert main(args(data, tmp_path / "nothing", "--epochs", "1", "--resume")) == 2
    assert "no run to resume" in one_error(capsys)
    # a crop larger than the frames
    assert main(args(data, tmp_path / "d", "--epochs", "1", "--crop-size", "64")) == 2
    assert "--crop-size" in one_error(capsys)
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_eval_protocol_scores_the_validation_videos_with_ten_clips(data, tmp_path, capsys):
    """--eval-protocol vmz: after training, the validation videos are evaluated with VMZ's protocol at
    the run's clip size (10 clips, centre crop, softmaxes averaged) into RUN_DIR/evaluation, and the
    last line gives that video accuracy; frames scaled by ffmpeg (--resize) are recorded in the run."""
    out = tmp_path / "run"
    assert main(args(data, out, "--epochs", "1", "--eval-protocol", "vmz", "--resize", "ffmpeg")) == 0
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1 and "10x1-view video accuracy" in line[0], line
    report = json.loads((out / "evaluation" / "report.json").read_text())
    protocol = report["protocol"]
    assert (protocol["clips"], protocol["crops"], protocol["clip_len"], protocol["sampling_rate"],
            protocol["frame_size"], protocol["crop_size"], protocol["head"], protocol["resize"]) == (
        10, 1, 4, 2, 18, 16, "pool", "ffmpeg")
    assert f"{report['metrics']['video@1']:.4f}" in line[0]
    assert report["metrics"]["videos"] == 16
    assert json.loads((out / "finetune.json").read_text())["clips"]["resize"] == "ffmpeg"


# ------------------------------------------------------------------------------------------------
# several processes


@pytest.mark.slow  # a two-device reference and two pairs of processes: ~4 min on the 2-core machine
def test_two_processes_train_together_and_resume(data, tmp_path):
    """`vmz-jax finetune` in two processes (jax.distributed on 127.0.0.1, one CPU device each): they
    train one model, each decoding half of every batch, with the losses of one process with two
    devices; --max-steps stops both, --resume finishes; process 0 alone prints and writes the run's
    files, and each process logs the unreadable videos it met in its own file."""
    import socket

    cache = tmp_path / "home"
    short = ("--epochs", "1", "--lr", "0.02", "--checkpoint-every", "2")
    reference = subprocess.run(
        [sys.executable, "-c", "import sys; from vmz_jax.cli import main; sys.exit(main(sys.argv[1:]))",
         *args(data, tmp_path / "reference", *short)],
        env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", VMZ_JAX_HOME=str(cache),
                 XLA_FLAGS="--xla_force_host_platform_device_count=2"),
        capture_output=True, text=True, timeout=900)
    assert reference.returncode == 0, reference.stderr[-3000:]
    run = tmp_path / "run"

    def pair(*extra: str) -> list[tuple[str, str]]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [cli(args(data, run, *short, *extra, "--coordinator", f"127.0.0.1:{port}",
                          "--num-processes", "2", "--process-id", str(i)), cache) for i in range(2)]
        outs = [p.communicate(timeout=900) for p in procs]
        for p, (_, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err[-3000:]
        # gloo's C++ side announces its connection on stdout
        return [("".join(x for x in out.splitlines(True) if not x.startswith("[Gloo]")), err)
                for out, err in outs]

    (out0, _), (out1, _) = pair("--max-steps", "3")
    assert "stopped at step 3 (--max-steps)" in out0 and out1 == ""
    (out0, _), (out1, _) = pair("--resume")
    assert "best validation accuracy" in out0 and out1 == ""

    def losses(records):
        return [(r["step"], r.get("loss", r.get("val_loss")), r.get("val_accuracy")) for r in records]

    got, expected = losses(read_metrics(run)), losses(read_metrics(tmp_path / "reference"))
    assert [x[0] for x in got] == [x[0] for x in expected] == list(range(1, 9)) + [8]
    assert [x[1] for x in got] == pytest.approx([x[1] for x in expected], rel=1e-4)
    assert [x[2] for x in got] == [x[2] for x in expected]
    logs = sorted(run.glob("failures*.jsonl"))
    names = [Path(json.loads(line)["path"]).name for log in logs for line in log.read_text().splitlines()]
    assert names == ["left_broken.mp4"]  # logged by whichever process drew it
    assert vmz_jax.load("r3d_10", checkpoint=run / "model").labels == CLASSES
