"""`vmz_jax.train.fit` and its data loop: batch order, learning, exact resume after SIGKILL, NaN stop.

CPU budget (fast suite): about 100 CPU-seconds in all, in three places: the learning run (r3d_10
on 4x16x16 clips, 64 steps of 16 clips, plus its compile), the resume chain (three short processes
on 4x8x8 clips; the later two reuse the first one's compiled steps through a persistent
compilation cache) and the in-process runs on 4x8x8 clips (SIGINT, NaN), which share one compile.
The rest takes well under a second. More kill points: -m slow.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import vmz_jax
from vmz_jax.errors import VMZError
from vmz_jax.models.variables import get_variables
from vmz_jax.train import ArrayDataset, TrainConfig, fit
from vmz_jax.train.data import BatchLoader, Position, epoch_permutation, steps_per_epoch
from vmz_jax.train.fit import read_metrics
from vmz_jax.weights import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# data


def motion_clips(n: int, seed: int | np.random.Generator, *, labels: np.ndarray | None = None,
                 frames: int = 4, size: int = 16, square: int = 4, speed: int = 2
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A bright square moving right, left, down or up (class 0..3) on a torus, plus noise.

    The start is uniform and the motion wraps around, so the square's position in any single frame
    is uniform whatever the class: a frame alone says nothing, only motion tells the classes apart.
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 4) if labels is None else labels
    moves = [(0, 1), (0, -1), (1, 0), (-1, 0)]
    clips = rng.normal(0.0, 0.2, (n, frames, size, size, 3)).astype(np.float32)
    for i, label in enumerate(labels):
        frame = np.zeros((size, size), np.float32)
        frame[:square, :square] = 1.5
        frame = np.roll(frame, tuple(rng.integers(0, size, 2)), (0, 1))
        dy, dx = moves[label]
        for t in range(frames):
            clips[i, t] += np.roll(frame, (dy * speed * t, dx * speed * t), (0, 1))[..., None]
    return clips, labels


class MotionClips:
    """`motion_clips` as a dataset that draws new clips every epoch: clip `index` of `epoch` is a function
    of (seed, epoch, index), as the dataset protocol asks, so it never repeats and never overfits."""

    def __init__(self, n: int, salt: int, **kw: int):
        self.n, self.salt, self.kw = n, salt, kw

    def __len__(self) -> int:
        return self.n

    def load(self, index: int, epoch: int, seed: int) -> tuple[np.ndarray, int]:
        rng = np.random.default_rng([self.salt, seed, epoch, index])
        clips, labels = motion_clips(1, rng, labels=np.array([index % 4]), **self.kw)
        return clips[0], int(labels[0])


def test_motion_clips_need_motion():
    """The premise of the learning test: per frame, every class has the same position distribution."""
    clips, labels = motion_clips(4000, 0, size=8, square=1, speed=1)
    brightest = clips.mean(-1).reshape(len(clips), clips.shape[1], -1).argmax(-1)  # (n, frames)
    for t in range(clips.shape[1]):
        counts = np.stack([np.bincount(brightest[labels == c, t], minlength=64) for c in range(4)])
        # every class covers every position at every frame, at about the same rate
        assert counts.min() > 0 and counts.max() < 3 * counts.mean()


class Recorder:
    """A dataset that records the (index, epoch, seed) of every load."""

    def __init__(self, n: int):
        self.n = n
        self.calls: list[tuple[int, int, int]] = []

    def __len__(self) -> int:
        return self.n

    def load(self, index: int, epoch: int, seed: int) -> tuple[np.ndarray, int]:
        self.calls.append((index, epoch, seed))
        return np.full((2, 2, 2, 3), index, np.float32), index % 3


def test_batch_order_and_positions():
    assert steps_per_epoch(10, 4) == 2
    with pytest.raises(VMZError, match="fewer than one batch"):
        steps_per_epoch(3, 4)
    orders = [epoch_permutation(10, epoch, 5) for epoch in range(3)]
    assert all(sorted(o) == list(range(10)) for o in orders)
    assert not np.array_equal(orders[0], orders[1])
    np.testing.assert_array_equal(orders[1], epoch_permutation(10, 1, 5))  # (seed, epoch) only
    assert not np.array_equal(orders[0], epoch_permutation(10, 0, 6))

    data = Recorder(10)
    with BatchLoader(data, 4, seed=5, workers=3, prefetch=2) as loader:
        batches = list(loader.train_batches(Position(), 3))
        assert [b.position for b in batches] == [Position(e, b) for e in range(3) for b in range(2)]
        for batch in batches:  # full batches in the epoch's order; the last 2 clips of each epoch dropped
            order = orders[batch.position.epoch]
            expected = order[batch.position.batch * 4:(batch.position.batch + 1) * 4]
            np.testing.assert_array_equal(batch.clips[:, 0, 0, 0, 0], expected)
            np.testing.assert_array_equal(batch.labels, expected % 3)
            assert batch.clips.dtype == np.float32 and batch.mask.all()
        assert {(e, s) for _, e, s in data.calls} == {(0, 5), (1, 5), (2, 5)}
        # a saved position restarts the sequence where it was
        resumed = list(loader.train_batches(Position(1, 1), 3))
        assert [b.position for b in resumed] == [b.position for b in batches[3:]]
        for a, b in zip(resumed, batches[3:], strict=True):
            np.testing.assert_array_equal(a.clips, b.clips)
        # validation: everything once, in order, the last batch padded and masked
        val = list(loader.eval_batches())
        assert [len(b.labels) for b in val] == [4, 4, 4]
        np.testing.assert_array_equal(np.concatenate([b.clips[b.mask, 0, 0, 0, 0] for b in val]),
                                      np.arange(10))
        assert val[-1].mask.tolist() == [True, True, False, False]


def test_loader_errors_name_the_item():
    class Bad(Recorder):
        def __init__(self, n: int, bad: int):
            super().__init__(n)
            self.bad = bad

        def load(self, index: int, epoch: int, seed: int) -> tuple[np.ndarray, int]:
            clip, label = super().load(index, epoch, seed)
            if index != self.bad:
                return clip, label
            if index == 7:
                return np.zeros((3, 2, 2, 3), np.float32), label
            if index == 8:
                return clip, 5
            raise OSError("disk on fire")

    for bad, message in ((7, "data item 7: clip shape .3, 2, 2, 3., but the batches hold .2, 2, 2, 3."),
                         (8, r"data item 8: label 5 is outside \[0, 3\)"),
                         (9, "data item 9: cannot load .OSError: disk on fire.")):
        with BatchLoader(Bad(10, bad), 2, num_classes=3, name="data") as loader:
            with pytest.raises(VMZError, match=message):
                list(loader.eval_batches())
    with pytest.raises(VMZError, match="not a dataset"):
        BatchLoader(np.zeros(3), 2)
    with pytest.raises(VMZError, match="clips must be"):
        ArrayDataset(np.zeros((2, 4, 4, 3)), [0, 1])


# ------------------------------------------------------------------------------------------------
# learning


def check_learns_motion(model: nnx.Module, run: Path) -> None:
    """`fit` on freshly drawn moving-square clips (64 steps of 16): >= 95% on held-apart clips."""
    train = MotionClips(256, salt=0)
    train.class_names = ["right", "left", "down", "up"]
    val = ArrayDataset(*motion_clips(64, 1))
    config = TrainConfig(lr=0.02, epochs=4, batch_size=16, seed=3, checkpoint_every=1000, eval_every=2)
    result = fit(model, train, val, config, run, progress=False)

    assert result.best_val_accuracy is not None and result.best_val_accuracy >= 0.95, result.history
    assert result.step == 4 * 16 and result.epoch == 4 and not result.interrupted
    # the saved result is the best validation's weights, with the dataset's class names
    saved = vmz_jax.load("r3d_10", checkpoint=result.model_dir)
    clips, labels = motion_clips(64, 1)
    accuracy = float((np.asarray(saved(clips)).argmax(1) == labels).mean())
    assert accuracy == result.best_val_accuracy
    assert ckpt.read_metadata(result.model_dir)["labels"] == ["right", "left", "down", "up"]
    records = read_metrics(run)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 65))
    assert [r["epoch"] for r in records if "val_loss" in r] == [1, 3]
    assert all({"loss", "accuracy", "lr", "clips_per_s", "epoch", "batch"} <= set(r)
               for r in records if "loss" in r)
    lrs = [r["lr"] for r in records if "loss" in r]
    assert lrs[0] == pytest.approx(0.02) and lrs == sorted(lrs, reverse=True)  # cosine decay
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run / "config.json").read_text())["config"] == config.to_dict()


def test_learns_motion_from_a_checkpoint_with_a_new_head(tmp_path):
    """Random 400-class "pretrained" r3d_10 weights as a VMZ-named PyTorch `.pth` (what the released
    weights are), ported by `load(..., new_head=True)` with a new 4-class head (eval mode: `fit`
    puts it in training mode), fine-tuned."""
    from porting.convert import export_params

    pretrained = vmz_jax.models.r3d_10(num_classes=400, rngs=nnx.Rngs(1))
    export_params(get_variables(pretrained), "r3d_10", tmp_path / "r3d_10_kinetics.pth", "pth")
    model = vmz_jax.load("r3d_10", checkpoint=tmp_path / "r3d_10_kinetics.pth", num_classes=4, new_head=True)
    backbone = get_variables(pretrained)
    assert all(np.array_equal(v, backbone[k]) for k, v in get_variables(model).items() if k[0] != "fc")
    check_learns_motion(model, tmp_path / "run")


@pytest.mark.slow
def test_learns_motion_from_scratch(tmp_path):
    check_learns_motion(vmz_jax.models.r3d_10(num_classes=4, rngs=nnx.Rngs(2)), tmp_path / "run")


# ------------------------------------------------------------------------------------------------
# resume


CHILD = textwrap.dedent("""
    import json, os, signal, sys, threading, time
    import jax
    jax.config.update("jax_disable_most_optimizations", True)
    jax.config.update("jax_compilation_cache_dir", sys.argv[2])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    import numpy as np
    from flax import nnx
    import vmz_jax
    from vmz_jax.train import ArrayDataset, TrainConfig, fit

    run_dir, kill_at, how, delay = sys.argv[1], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
    rng = np.random.default_rng(0)
    train = ArrayDataset(rng.normal(size=(13, 4, 8, 8, 3)).astype(np.float32), np.arange(13) % 3)
    val = ArrayDataset(rng.normal(size=(5, 4, 8, 8, 3)).astype(np.float32), np.arange(5) % 3)
    model = vmz_jax.models.r3d_10(num_classes=3, rngs=nnx.Rngs(0))
    config = TrainConfig(lr=0.02, epochs=3, batch_size=3, dropout=0.5, checkpoint_every=3, keep=2, seed=7,
                         eval_every=2)

    def on_step(record):
        if record.get("step") == kill_at and "loss" in record:
            sig = signal.SIGKILL if how == "kill" else signal.SIGTERM
            def fire():
                time.sleep(delay)
                os.kill(os.getpid(), sig)
            if delay:
                threading.Thread(target=fire, daemon=True).start()
            else:
                fire()

    result = fit(model, train, val, config, run_dir, progress=False, on_step=on_step)
    print(json.dumps({"interrupted": result.interrupted, "step": result.step,
                      "resumed_from": result.resumed_from}))
""")


def run_child(run_dir: Path, cache: Path, kill_at: int = 0, how: str = "kill", delay: float = 0.0
              ) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", CHILD, str(run_dir), str(cache), str(kill_at), how,
                           str(delay)], env=env, capture_output=True, text=True, timeout=600)


def check_resume(tmp_path: Path, seed: int) -> None:
    """A run killed by SIGKILL at a random moment (at a step boundary, or later: mid-step,
    mid-validation, mid-checkpoint) and started again writes the same per-step losses, validations and
    final weights as an uninterrupted run, bit for bit. 13 clips in batches of 3: 4 steps per epoch, a
    different clip dropped each epoch; dropout 0.5, so the restored RNG matters too."""
    rng = random.Random(seed)
    step = rng.randrange(1, 12)
    delay = rng.choice([0.0, rng.uniform(0.0, 0.5)])
    where = f"(seed {seed}: SIGKILL {delay:.2f} s after step {step})"
    cache = tmp_path / "xla"

    reference = run_child(tmp_path / "reference", cache)
    assert reference.returncode == 0, reference.stderr
    assert json.loads(reference.stdout.splitlines()[-1]) == {"interrupted": False, "step": 12,
                                                             "resumed_from": None}
    run = tmp_path / "run"
    killed = run_child(run, cache, step, "kill", delay)
    assert killed.returncode in (-9, 0), (where, killed.stderr)  # 0: it ended before the kill came
    finished = run_child(run, cache)
    assert finished.returncode == 0, (where, finished.stderr)
    status = json.loads(finished.stdout.splitlines()[-1])
    # checkpoints: every 3 steps and at each epoch end (4 steps), written in the background, so the
    # newest complete one may be older than the last one begun
    assert status["step"] == 12 and status["resumed_from"] in {None, 3, 4, 6, 8, 9, 12}, (where, status)

    def drop_speed(records):
        return [{k: v for k, v in r.items() if k != "clips_per_s"} for r in records]

    expected = drop_speed(read_metrics(tmp_path / "reference"))
    assert len(expected) == 12 + 2 and len({r["loss"] for r in expected if "loss" in r}) == 12
    got = drop_speed(read_metrics(run))
    assert got == expected, (where, [(a, b) for a, b in zip(got, expected, strict=False) if a != b][:2])
    ours, _ = ckpt.restore(run / "model")
    theirs, _ = ckpt.restore(tmp_path / "reference" / "model")
    for path, value in theirs.items():
        assert np.array_equal(ours[path], value), (where, path)


def test_resume_after_sigkill_repeats_every_step_bitwise(tmp_path):
    """Kill points from a random seed (named on failure; VMZ_FIT_KILL_SEED=N repeats it)."""
    check_resume(tmp_path, int(os.environ.get("VMZ_FIT_KILL_SEED", random.randrange(1 << 30))))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(8))
def test_resume_at_more_kill_points(tmp_path, seed):
    check_resume(tmp_path, seed)


# ------------------------------------------------------------------------------------------------
# failures


class PoisonedAfterFirstEpoch(ArrayDataset):
    def load(self, index: int, epoch: int, seed: int) -> tuple[np.ndarray, int]:
        clip, label = super().load(index, epoch, seed)
        return (clip * np.nan if epoch >= 1 else clip), label


def test_sigint_stops_with_a_checkpoint_and_the_run_resumes(tmp_path):
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.normal(size=(4, 4, 8, 8, 3)).astype(np.float32), [0, 1, 2, 0])
    config = TrainConfig(epochs=2, batch_size=2, checkpoint_every=100)
    run = tmp_path / "run"

    def interrupt(record: dict) -> None:
        if record.get("step") == 1:
            os.kill(os.getpid(), signal.SIGINT)

    result = fit(vmz_jax.models.r3d_10(num_classes=3, rngs=nnx.Rngs(0)), data, None, config, run,
                 progress=False, on_step=interrupt)
    assert result.interrupted and result.step == 1 and result.model_dir is None
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    result = fit(vmz_jax.models.r3d_10(num_classes=3, rngs=nnx.Rngs(5)), data, None, config, run,
                 progress=False)
    assert not result.interrupted and result.resumed_from == 1 and result.step == 4
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert result.best_step is None and result.model_dir == run / "model"  # no validation: final weights
    assert ckpt.read_metadata(run / "model")["training"]["step"] == 4


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    data = PoisonedAfterFirstEpoch(rng.normal(size=(4, 4, 8, 8, 3)).astype(np.float32), [0, 1, 2, 0])
    model = vmz_jax.models.r3d_10(num_classes=3, rngs=nnx.Rngs(0))
    config = TrainConfig(epochs=3, batch_size=2, checkpoint_every=1, keep=5)
    run = tmp_path / "run"
    with pytest.raises(VMZError) as info:
        fit(model, data, None, config, run, progress=False)
    message = str(info.value)
    assert "\n" not in message and "step 3 (epoch 2)" in message and "nan" in message
    assert f"last good checkpoint is step 2 in {run / 'checkpoints'}" in message
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2]
    assert not (run / "model").exists()
    assert [r["step"] for r in read_metrics(run)] == [1, 2]

    # the run directory belongs to its configuration
    with pytest.raises(VMZError, match=r"another configuration \(differs in config.lr \(0.01 -> 0.5\)\)"):
        fit(model, data, None, config.replace(lr=0.5), run, progress=False)
    with pytest.raises(VMZError, match="holds checkpoints .newest: step 2.; pass resume=True"):
        fit(model, data, None, config, run, progress=False, resume=False)
    with pytest.raises(VMZError, match="no run to resume there"):
        fit(model, data, None, config, tmp_path / "other", progress=False, resume=True)


DATA_PARALLEL_FIT = textwrap.dedent("""
import json, os, signal, sys, warnings
import jax, numpy as np
from flax import nnx
import vmz_jax
from vmz_jax.train import ArrayDataset, TrainConfig, fit
from vmz_jax.train.fit import read_metrics

root = sys.argv[1]
assert len(jax.devices()) == 2
rng = np.random.default_rng(0)
data = ArrayDataset(rng.normal(size=(12, 4, 8, 8, 3)).astype(np.float32), np.arange(12) % 3)
val = ArrayDataset(rng.normal(size=(6, 4, 8, 8, 3)).astype(np.float32), np.arange(6) % 3)
config = TrainConfig(lr=0.005, epochs=2, batch_size=4, checkpoint_every=2, seed=3)

def run(name, devices=None, on_step=None):
    model = vmz_jax.models.r3d_10(num_classes=3, rngs=nnx.Rngs(0))
    result = fit(model, data, val, config, f"{root}/{name}", progress=False, devices=devices,
                 on_step=on_step)
    return result, [r for r in read_metrics(f"{root}/{name}")]

def interrupt(record):
    if record.get("step") == 2 and "loss" in record:
        os.kill(os.getpid(), signal.SIGINT)

_, one = run("one", devices=jax.devices()[:1])
two_result, two = run("two")
first, _ = run("resumed", on_step=interrupt)
assert first.interrupted and first.step == 2, first
_, resumed = run("resumed")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    odd = TrainConfig(lr=0.05, epochs=1, batch_size=3, seed=3)
    fit(vmz_jax.models.r3d_10(num_classes=3, rngs=nnx.Rngs(0)), data, None, odd, f"{root}/odd",
        progress=False)
print(json.dumps({"one": one, "two": two, "resumed": resumed,
                  "warnings": [str(w.message) for w in caught]}))
""")


@pytest.mark.slow
def test_fit_over_two_devices_equals_one_device_and_resumes(tmp_path):
    """`fit` splits each batch over every local device (two CPU devices here): the same losses and
    validations as on one device (summation order aside), and an interrupted two-device run resumes
    to exactly the uninterrupted run's records. A batch that does not split trains on fewer devices,
    with a warning."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", DATA_PARALLEL_FIT, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    def values(records, key):
        return [r[key] for r in records if key in r]

    assert len(values(out["two"], "loss")) == 6 and len(values(out["two"], "val_loss")) == 2
    for key in ("loss", "val_loss", "val_accuracy"):
        assert values(out["two"], key) == pytest.approx(values(out["one"], key), rel=1e-3, abs=1e-5), key

    def drop_speed(records):
        return [{k: v for k, v in r.items() if k != "clips_per_s"} for r in records]

    assert drop_speed(out["resumed"]) == drop_speed(out["two"])
    assert any("does not split over 2 devices; training on 1" in w for w in out["warnings"])


def test_loader_parts_make_up_the_whole_batch():
    """With several processes each loads its rows of every batch (`part`); together they are the
    batch one process loads, padding and mask included (a part may hold padding only)."""
    data = ArrayDataset(np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 1, 1, 2, 3), np.arange(5) % 3)
    kinds = ("train", "eval")

    def batches(kind, part):
        with BatchLoader(data, 4, seed=1, workers=2, part=part) as loader:
            return list(loader.train_batches(Position(), 2) if kind == "train" else loader.eval_batches())

    for kind in kinds:
        whole = batches(kind, (0, 1))
        halves = [batches(kind, (i, 2)) for i in range(2)]
        assert len(whole) == len(halves[0]) == len(halves[1]) == 2
        for b, first, second in zip(whole, *halves, strict=True):
            assert first.position == second.position == b.position
            for field in ("clips", "labels", "mask"):
                np.testing.assert_array_equal(np.concatenate([getattr(first, field), getattr(second, field)]),
                                              getattr(b, field))
    last = batches("eval", (1, 2))[-1]
    assert not last.mask.any() and last.clips.shape[0] == 2  # item 4 + three pads: rows 2, 3 are pad
    np.testing.assert_array_equal(last.clips[0], data.clips[4])
    with pytest.raises(VMZError, match="must split into 3 equal parts"):
        BatchLoader(data, 4, part=(0, 3))


MULTI_PROCESS_FIT = textwrap.dedent("""
import json, os, signal, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
root, address, process, name = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if address != "-":
    jax.distributed.initialize(address, num_processes=2, process_id=process)
import numpy as np
from flax import nnx
import vmz_jax
from vmz_jax.train import ArrayDataset, TrainConfig, fit

assert len(jax.devices()) == 2
rng = np.random.default_rng(0)
data = ArrayDataset(rng.normal(size=(12, 4, 8, 8, 3)).astype(np.float32), np.arange(12) % 3)
val = ArrayDataset(rng.normal(size=(6, 4, 8, 8, 3)).astype(np.float32), np.arange(6) % 3)
config = TrainConfig(lr=0.005, epochs=2, batch_size=4, checkpoint_every=2, seed=3, dropout=0.5)

def on_step(record):  # only process 1 is signalled; both must stop after step 3
    if name == "interrupted" and process == 1 and record.get("step") == 3 and "loss" in record:
        os.kill(os.getpid(), signal.SIGTERM)

model = vmz_jax.models.r3d_10(num_classes=3, rngs=nnx.Rngs(0))
result = fit(model, data, val, config, f"{root}/run" if address != "-" else f"{root}/{name}",
             progress=False, on_step=on_step)
logits = np.asarray(model(val.clips[:2]))  # the model is usable in this process alone
print(json.dumps({"interrupted": result.interrupted, "step": result.step,
                  "resumed_from": result.resumed_from, "logits": logits.tolist(),
                  "history": result.history}))
""")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fit_over_two_processes_equals_two_devices_and_stops_together(tmp_path):
    """Two processes (jax.distributed on 127.0.0.1, one CPU device each, gloo collectives) train one
    model: each loads half of every batch, and the losses and validations equal one process with two
    devices. A SIGTERM to process 1 alone stops both after the same step with a checkpoint; the
    resumed pair finishes with exactly the records of the uninterrupted one-process run's shape, and
    each process ends with a model it can run alone."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    one = subprocess.run([sys.executable, "-c", MULTI_PROCESS_FIT, str(tmp_path), "-", "0", "one"],
                         env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2"),
                         capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    reference = json.loads(one.stdout.strip().splitlines()[-1])

    def pair(name):
        address = f"127.0.0.1:{_free_port()}"
        procs = [subprocess.Popen([sys.executable, "-c", MULTI_PROCESS_FIT, str(tmp_path), address, str(i),
                                   name], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
        outs = [p.communicate(timeout=900) for p in procs]
        for p, (_, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err[-3000:]
        return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]

    stopped = pair("interrupted")
    assert [(s["interrupted"], s["step"]) for s in stopped] == [(True, 3), (True, 3)]
    finished = pair("resumed")
    assert [(s["interrupted"], s["step"], s["resumed_from"]) for s in finished] == [(False, 6, 3)] * 2

    def values(records, key):
        return [r[key] for r in records if key in r]

    records = read_metrics(tmp_path / "run")  # written by process 0 alone, each step once
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    def drop_speed(records):
        return [{k: v for k, v in r.items() if k != "clips_per_s"} for r in records]

    assert drop_speed(finished[1]["history"]) == drop_speed(finished[0]["history"]) == drop_speed(records)
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        expected = values(reference["history"], key)
        assert values(records, key) == pytest.approx(expected, rel=1e-5, abs=1e-6), key
    np.testing.assert_allclose(finished[0]["logits"], reference["logits"], rtol=1e-4, atol=1e-5)
    assert finished[1]["logits"] == finished[0]["logits"]
    assert (tmp_path / "run" / "model").is_dir() and (tmp_path / "run" / "curves.png").is_file()
