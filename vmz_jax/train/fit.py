"""`fit`: train a model on a dataset, with checkpoints, resume, metrics and curves in one run directory.

A run directory holds::

    config.json       the TrainConfig, the model (arch, classes, clip length) and the dataset sizes;
                      a run directory belongs to one configuration, another one is refused
    checkpoints/      Orbax CheckpointManager: every `checkpoint_every` steps and at each epoch end,
                      the newest `keep`; each holds the whole model state (parameters, BatchNorm
                      statistics, dropout RNG), the optimizer state and the data position
    metrics.jsonl     one line per training step and one per validation
    curves.png        loss and accuracy, training and validation, redrawn at each epoch end
    best/             the weights of the best validation so far (`vmz_jax.save`)
    model/            the result: the best (or, without validation, the final) weights, `vmz_jax.save`

Resume is exact: the batch order and every clip are functions of (seed, epoch, index) (see
`vmz_jax.train.data`), and a checkpoint restores every array the step reads, so a run killed at any
point (SIGKILL included: Orbax writes a checkpoint under a temporary name and renames it when it is
complete) and started again with the same arguments repeats the same steps with the same losses, bit
for bit on CPU. Lines of metrics.jsonl newer than the restored checkpoint are dropped on resume.

Several processes (hosts): after `jax.distributed.initialize()` in each, every process calls `fit`
with the same arguments and the same `run_dir` (a shared file system). They train one model
data-parallel over every device of every process: each process loads its own rows of every batch,
the steps, checkpoints (Orbax writes them together) and stops (a signal or a loading failure in one
process stops all of them at the same step) are agreed, and process 0 alone writes metrics.jsonl,
curves.png, best/ and model/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from vmz_jax.errors import CheckpointError, VMZError, one_line
from vmz_jax.files import pin_json
from vmz_jax.models.variables import set_variables
from vmz_jax.runtime import sync_processes
from vmz_jax.train.checkpointing import Checkpoints, all_finite, set_state_leaves, state_leaves, storable
from vmz_jax.train.config import TrainConfig
from vmz_jax.train.data import Batch, BatchLoader, Dataset, Position, steps_per_epoch
from vmz_jax.train.optim import apply_train_mode, learning_rate, make_optimizer
from vmz_jax.train.reporting import METRICS_FILE, draw_curves, progress_bar, read_metrics, truncate_metrics
from vmz_jax.train.step import (
    data_mesh,
    eval_step,
    local_rows,
    replicate,
    shard_batch,
    spans_processes,
    train_step,
)
from vmz_jax.weights import checkpoint as ckpt
from vmz_jax.weights.loading import save

__all__ = ["FitResult", "fit", "read_metrics"]

StrPath = str | os.PathLike[str]

CONFIG_FILE = "config.json"
CURVES_FILE = "curves.png"
CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
MODEL_DIR = "model"
_STATE_FORMAT = 1


@dataclasses.dataclass
class FitResult:
    """What a `fit` call did. `model_dir` is None when the run was interrupted before its end."""

    run_dir: Path
    step: int
    epoch: int
    train_loss: float | None
    train_accuracy: float | None
    val_loss: float | None
    val_accuracy: float | None
    best_step: int | None
    best_val_accuracy: float | None
    model_dir: Path | None
    resumed_from: int | None
    interrupted: bool
    history: list[dict[str, Any]]


def fit(model: nnx.Module, train_data: Dataset, val_data: Dataset | None, config: TrainConfig,
        run_dir: StrPath, *, progress: bool = True,
        on_step: Callable[[dict[str, Any]], object] | None = None, resume: bool | None = None,
        workers: int | None = None, devices: Sequence[jax.Device] | None = None) -> FitResult:
    """Train `model` in place on `train_data` with `config`, validating on `val_data` (or None).

    `run_dir` is created if needed. If it holds a checkpoint of the same configuration the run resumes
    from its newest checkpoint (`resume=None`, the default, or True); `resume=True` with no checkpoint
    and `resume=False` with one are errors, as is a run directory of another configuration. `on_step`
    is called with every record written to metrics.jsonl (a dict: each step's, each validation's).
    `workers` is the number of loading threads (default: one per core, at most 8).

    `devices` (default: every device, of every process when there are several) train
    data-parallel: the model and optimizer are replicated, each batch is split along its first axis,
    and BatchNorm and the gradients see the whole batch, so the steps compute what one device would
    (up to summation order). In one process a batch that does not split evenly uses the largest
    count of devices it splits over (with a warning); over several processes the batch must split
    over all their devices. The next batch is copied to the devices while the current step runs.

    SIGINT and SIGTERM stop the run after the current step, with a checkpoint to resume from
    (`FitResult.interrupted`); a second SIGINT interrupts at once. A non-finite loss, or non-finite
    weights at a checkpoint, stops with a one-line `VMZError` naming the step; the checkpoints written
    before stay. At the end the model holds the weights written to `run_dir/model/` (the best
    validation accuracy, ties to the lower loss; the final weights without validation data), in eval
    mode. Errors are one-line `VMZError`s.

    Each step donates the model's and optimizer's arrays (`vmz_jax.train.step`): one copy of the
    weights and optimizer state on the device; arrays taken out of the model before `fit` are deleted
    by its first step (the model and optimizer objects stay usable).

    On CPU, call `vmz_jax.runtime.reuse_host_memory()` before the model is made (as `vmz-jax finetune`
    does): each step then reuses the memory the last one freed. Its single-device steps run
    synchronously, so the next batch's (small) copy to the device follows the step instead.
    """
    run = _Run(model, train_data, val_data, config, Path(os.fsdecode(run_dir)), progress, on_step,
               workers, devices)
    return run.execute(resume)


# ------------------------------------------------------------------------------------------------
# the run


class _Run:
    def __init__(self, model: nnx.Module, train_data: Dataset, val_data: Dataset | None,
                 config: TrainConfig, run_dir: Path, progress: bool,
                 on_step: Callable[[dict[str, Any]], object] | None, workers: int | None,
                 devices: Sequence[jax.Device] | None = None):
        if not isinstance(config, TrainConfig):
            raise VMZError(f"fit: config must be a TrainConfig, not {type(config).__name__}")
        for attr in ("arch", "num_classes", "clip_length"):
            if not hasattr(model, attr):
                raise VMZError(f"fit: {type(model).__name__} is not a vmz_jax model (no .{attr})")
        if config.blend_weights is not None and not callable(getattr(model, "heads", None)):
            raise VMZError(f"fit: blend_weights weigh the audio, visual and av heads of an audio-visual "
                           f"model; {model.arch} has one head")  # type: ignore[attr-defined]
        self.model = model
        self.train_data = train_data
        self.val_data = val_data if val_data is not None and len(val_data) else None
        self.config = config
        self.run_dir = run_dir
        self.progress = progress
        self.on_step = on_step
        self.workers = workers
        self.mesh = _training_mesh(devices, config.batch_size)
        processes = (sorted({d.process_index for d in self.mesh.devices.flat})
                     if self.mesh is not None and spans_processes(self.mesh) else [jax.process_index()])
        self.part = (processes.index(jax.process_index()), len(processes))
        self.lead = self.part[0] == 0  # the process that writes metrics, curves and weights
        self.progress = progress and self.lead
        self.num_classes = int(model.num_classes)  # type: ignore[attr-defined]
        self.per_epoch = steps_per_epoch(len(train_data), config.batch_size)
        self.total_steps = self.per_epoch * config.epochs
        self.signalled: str | None = None  # set by the signal handler, at any moment
        self.stop_signal: str | None = None  # acted on: set at one point of each step, agreed

    # -- identity -------------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "model": {"arch": self.model.arch, "num_classes": self.num_classes,  # type: ignore[attr-defined]
                      "clip_length": int(self.model.clip_length)},  # type: ignore[attr-defined]
            "data": {"train": len(self.train_data),
                     "val": len(self.val_data) if self.val_data is not None else 0},
        }

    def claim_run_dir(self) -> None:
        """Write config.json, or check that the one there describes this run."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            differences = pin_json(self.run_dir / CONFIG_FILE, self.identity())
        except ValueError as exc:
            raise VMZError(one_line(exc)) from None
        except OSError as exc:
            raise VMZError(f"{self.run_dir}: cannot write ({exc.strerror or exc})") from None
        if differences:
            raise VMZError(one_line(
                f"{self.run_dir}: holds a run of another configuration (differs in "
                f"{', '.join(differences)}); use a new run directory, or the same configuration to resume"))

    # -- main -----------------------------------------------------------------------------------

    def execute(self, resume: bool | None) -> FitResult:
        if resume is True and not (self.run_dir / CONFIG_FILE).exists():
            raise VMZError(f"{self.run_dir}: resume=True, but there is no run to resume there")
        self.claim_run_dir()
        apply_train_mode(self.model, self.config)
        self.optimizer = make_optimizer(self.model, self.config, self.per_epoch)
        with Checkpoints(self.run_dir / CHECKPOINT_DIR, self.config.keep) as checkpoints:
            self.checkpoints = checkpoints
            latest = checkpoints.latest()
            if latest is None and resume is True:
                raise VMZError(f"{self.run_dir}: resume=True, but there is no checkpoint to resume from")
            if latest is not None and resume is False:
                raise VMZError(f"{self.run_dir}: holds checkpoints (newest: step {latest}); pass "
                               f"resume=True, or use a new run directory")
            self.step, self.position, self.best = 0, Position(), None
            if latest is not None:
                self.restore(latest)
            if self.mesh is not None:
                replicate(self.mesh, self.model, self.optimizer)
            self.history = truncate_metrics(self.run_dir / METRICS_FILE, self.step, rewrite=self.lead)
            with contextlib.ExitStack() as stack:
                stack.enter_context(self.catch_signals())
                loader = stack.enter_context(BatchLoader(
                    self.train_data, self.config.batch_size, seed=self.config.seed,
                    num_classes=self.num_classes, workers=self.workers, name="train_data",
                    part=self.part))
                self.val_loader = None if self.val_data is None else stack.enter_context(BatchLoader(
                    self.val_data, self.config.batch_size, seed=self.config.seed,
                    num_classes=self.num_classes, workers=self.workers, name="val_data",
                    part=self.part))
                metrics_file = (stack.enter_context(open(self.run_dir / METRICS_FILE, "a",
                                                         encoding="utf-8")) if self.lead else None)
                bar = stack.enter_context(progress_bar(self.progress, self.total_steps, self.step))
                self.train(loader, metrics_file, bar)
            checkpoints.wait()
        return self.finish(latest)

    def train(self, loader: BatchLoader, metrics_file: Any, bar: Any) -> None:
        cfg = self.config
        last_time = time.perf_counter()
        feed = self.on_devices(loader.train_batches(self.position, cfg.epochs))
        current = next(feed, None)
        while current is not None:
            batch, clips, labels = current
            lr = learning_rate(self.optimizer, self.step)  # the rate of this step's update
            metrics = train_step(self.model, self.optimizer, clips, labels, **self._step_kwargs())
            # the next batch is awaited and copied to the devices while this step runs; a failure
            # to load it is raised after this step is recorded and saved, as without the overlap
            try:
                current, failure = next(feed, None), None
            except Exception as exc:
                current, failure = None, exc
            loss, accuracy = float(metrics["loss"]), float(metrics["accuracy"])
            self.step += 1
            seconds = time.perf_counter() - last_time  # loading wait + step, not saving or validating
            if not math.isfinite(loss):
                raise VMZError(f"step {self.step} (epoch {batch.position.epoch + 1}): the loss is {loss}; "
                               f"stopped{self.checkpoints.kept_message()}")
            record = {"step": self.step, "epoch": batch.position.epoch, "batch": batch.position.batch,
                      "loss": loss, "accuracy": accuracy, "lr": lr,
                      "clips_per_s": round(cfg.batch_size / max(seconds, 1e-9), 3)}
            self.write(metrics_file, record)
            bar.update(loss, record["clips_per_s"])
            if self.on_step is not None:
                self.on_step(record)
            failure = self.agree(failure)
            self.position = batch.position.advance(self.per_epoch)
            epoch_end = self.position.batch == 0
            if epoch_end:
                self.end_epoch(batch.position.epoch, metrics_file, bar)
            if self.part[1] == 1:  # one process acts on a signal as soon as it sees it
                self.stop_signal = self.signalled
            if epoch_end or self.step % cfg.checkpoint_every == 0 or self.stop_signal:
                self.save()
            if self.stop_signal:
                bar.write(f"{self.stop_signal}: stopped at step {self.step}; checkpoint in "
                          f"{self.checkpoints.directory}")
                return
            if failure is not None:
                raise failure
            last_time = time.perf_counter()

    def end_epoch(self, epoch: int, metrics_file: Any, bar: Any) -> None:
        cfg = self.config
        done = epoch + 1
        steps = [r for r in self.history if r.get("epoch") == epoch and "loss" in r]
        summary = (f"epoch {done}/{cfg.epochs}: loss {np.mean([r['loss'] for r in steps]):.4f}, "
                   f"accuracy {np.mean([r['accuracy'] for r in steps]):.4f}, "
                   f"{np.median([r['clips_per_s'] for r in steps]):.1f} clips/s" if steps
                   else f"epoch {done}/{cfg.epochs}")
        if self.val_loader is not None and (done % max(1, cfg.eval_every) == 0 or done == cfg.epochs):
            val_loss, val_accuracy = self.validate()
            record = {"step": self.step, "epoch": epoch, "val_loss": val_loss,
                      "val_accuracy": val_accuracy}
            self.write(metrics_file, record)
            if self.on_step is not None:
                self.on_step(record)
            if self.best is None or (val_accuracy, -val_loss) > (self.best["val_accuracy"],
                                                                 -self.best["val_loss"]):
                self.best = {"step": self.step, "val_accuracy": val_accuracy, "val_loss": val_loss}
                if self.lead:
                    self.save_weights(self.run_dir / BEST_DIR, self.step)
            summary += f"; val_loss {val_loss:.4f}, val_accuracy {val_accuracy:.4f}"
        bar.write(summary)
        self.draw_curves()

    def validate(self) -> tuple[float, float]:
        """Mean loss and accuracy over every validation clip (padding excluded), in eval mode."""
        assert self.val_loader is not None
        self.model.eval()
        try:
            total_loss, correct, count = 0.0, 0, 0
            for batch, clips, labels in self.on_devices(self.val_loader.eval_batches()):
                out = eval_step(self.model, clips, labels)
                if "logits" not in out:
                    raise VMZError("eval_step returned no logits: validation needs per-clip results")
                logits = local_rows(out["logits"]).astype(np.float64)[batch.mask]
                labels = batch.labels[batch.mask]
                shifted = logits - logits.max(axis=1, keepdims=True)
                log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
                total_loss -= float(log_probs[np.arange(len(labels)), labels].sum())
                correct += int((logits.argmax(axis=1) == labels).sum())
                count += len(labels)
        finally:
            apply_train_mode(self.model, self.config)
        if self.part[1] > 1:
            total_loss, correct, count = _sum_over_processes([total_loss, correct, count])
        if not math.isfinite(total_loss):
            raise VMZError(f"step {self.step}: the validation loss is not finite; "
                           f"stopped{self.checkpoints.kept_message()}")
        return total_loss / count, correct / count

    def on_devices(self, batches: Iterator[Batch]) -> Iterator[tuple[Batch, jax.Array, jax.Array]]:
        """Each batch with its clips and labels put on the training devices (asynchronously)."""
        for batch in batches:
            if self.mesh is not None:
                yield (batch, *shard_batch(self.mesh, batch.clips, batch.labels))
            else:
                yield batch, jax.device_put(batch.clips), jax.device_put(batch.labels)

    def _step_kwargs(self) -> dict[str, Any]:
        smoothing = getattr(self.config, "label_smoothing", 0.0)
        blend = self.config.blend_weights
        return {**({"label_smoothing": smoothing} if smoothing else {}),
                **({"blend_weights": blend} if blend is not None else {})}

    def write(self, metrics_file: Any, record: dict[str, Any]) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        self.history.append(record)

    def agree(self, failure: BaseException | None) -> BaseException | None:
        """With several processes, decide together once per step whether to stop after it: all stop
        when one was signalled (a signal arriving later counts at the next step), and all fail when
        one could not load its part of the next batch (else the others would wait for it)."""
        if self.part[1] == 1:
            return failure
        flags = _gather_flags([self.signalled is not None, failure is not None])
        if flags[:, 0].any():
            self.stop_signal = self.signalled or f"process {int(np.argmax(flags[:, 0]))}'s signal"
        if flags[:, 1].any() and failure is None:
            failure = VMZError(f"process {int(np.argmax(flags[:, 1]))} could not load its part of the "
                               f"batch after step {self.step + 1}; see its error")
        return failure

    def barrier(self, name: str) -> None:
        sync_processes(f"vmz_jax.fit:{name}", self.part[1])

    # -- state ------------------------------------------------------------------------------------

    def save(self) -> None:
        if self.checkpoints.latest() == self.step:
            return
        model_leaves = state_leaves(self.model)
        if not all_finite([x for _, x in model_leaves]):
            raise VMZError(f"step {self.step}: the weights are not finite; "
                           f"stopped{self.checkpoints.kept_message()}")
        meta = {"format": _STATE_FORMAT, "step": self.step, "position": self.position.to_dict(),
                "best": self.best}
        self.checkpoints.save(self.step, {"model": model_leaves, "optimizer": state_leaves(self.optimizer)},
                              meta)

    def restore(self, step: int) -> None:
        state, meta = self.checkpoints.restore(
            step, {"model": state_leaves(self.model), "optimizer": state_leaves(self.optimizer)})
        if meta.get("format") != _STATE_FORMAT:
            raise CheckpointError(f"{self.checkpoints.directory}/{step}: unknown checkpoint format "
                                  f"{meta.get('format')!r}")
        set_state_leaves(self.model, state["model"])
        set_state_leaves(self.optimizer, state["optimizer"])
        self.step = int(meta["step"])
        self.position = Position.from_dict(meta["position"])
        self.best = meta.get("best")

    def save_weights(self, path: Path, step: int) -> None:
        """`vmz_jax.save` of the model, with the dataset's class names and where the weights come from."""
        names = getattr(self.train_data, "class_names", None)
        if names is not None and len(names) != self.num_classes:
            names = None
        save(self.model, path, labels=names, overwrite=True,
             metadata={"training": {"run_dir": str(self.run_dir.absolute()), "step": step,
                                    "config": self.config.to_dict()}})

    def finish(self, resumed_from: int | None) -> FitResult:
        interrupted = self.stop_signal is not None
        model_dir = None
        if self.part[1] > 1:
            # every process leaves with the model on its own devices, usable without the others
            set_state_leaves(self.model, [np.asarray(storable(x)) for _, x in state_leaves(self.model)])
            self.barrier("best")  # best/ is complete before anyone reads it
        if not interrupted:
            step = self.step
            if self.best is not None:
                params, _ = ckpt.restore(self.run_dir / BEST_DIR)
                set_variables(self.model, params, source=str(self.run_dir / BEST_DIR))
                step = self.best["step"]
            self.model.eval()
            model_dir = self.run_dir / MODEL_DIR
            if self.lead:
                self.save_weights(model_dir, step)
                self.draw_curves()
            self.barrier("model")
        train = [r for r in self.history if "loss" in r]
        val = [r for r in self.history if "val_loss" in r]
        return FitResult(
            run_dir=self.run_dir, step=self.step, epoch=self.position.epoch,
            train_loss=train[-1]["loss"] if train else None,
            train_accuracy=train[-1]["accuracy"] if train else None,
            val_loss=val[-1]["val_loss"] if val else None,
            val_accuracy=val[-1]["val_accuracy"] if val else None,
            best_step=self.best["step"] if self.best else None,
            best_val_accuracy=self.best["val_accuracy"] if self.best else None,
            model_dir=model_dir, resumed_from=resumed_from, interrupted=interrupted,
            history=list(self.history))

    def draw_curves(self) -> None:
        if not self.lead:
            return
        try:
            draw_curves(self.history, self.run_dir / CURVES_FILE)
        except OSError as exc:
            raise VMZError(f"{self.run_dir / CURVES_FILE}: cannot write ({exc.strerror or exc})") from None

    # -- signals ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def catch_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM set a flag the loop checks after each step; the previous handlers come
        back at once, so a second signal acts as it would have (Ctrl-C twice interrupts now)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous: dict[int, Any] = {}

        def handler(signum: int, frame: Any) -> None:
            self.signalled = signal.Signals(signum).name
            for sig, old in previous.items():
                signal.signal(sig, old)

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def _training_mesh(devices: Sequence[jax.Device] | None, batch_size: int) -> Any:
    """The data-parallel mesh over `devices` (default: every device of every process), or None for
    one device."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise VMZError("fit: devices is empty")
    processes = sorted({d.process_index for d in devices})
    if len(processes) > 1:
        if jax.process_index() not in processes:
            raise VMZError(f"fit: none of the devices belongs to this process ({jax.process_index()})")
        per_process = {p: sum(d.process_index == p for d in devices) for p in processes}
        if len(set(per_process.values())) > 1:
            raise VMZError(f"fit: every process must train on as many devices as the others, got "
                           f"{per_process} (process: devices)")
        if batch_size % len(devices):
            raise VMZError(f"a batch of {batch_size} clips does not split over the {len(devices)} "
                           f"devices of {len(processes)} processes; use a multiple of {len(devices)}")
        # each process's devices side by side: its rows of the batch are one contiguous block
        return data_mesh(sorted(devices, key=lambda d: (d.process_index, d.id)))
    count = max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)
    if count < len(devices):
        warnings.warn(f"a batch of {batch_size} clips does not split over {len(devices)} devices; "
                      f"training on {count} of them (use a batch size divisible by {len(devices)})",
                      stacklevel=3)
    return data_mesh(devices[:count]) if count > 1 else None


def _gather_flags(flags: Sequence[bool]) -> np.ndarray:
    """(processes, len(flags)) bool: every process's flags."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(flags, np.int32))).astype(bool)


def _sum_over_processes(values: Sequence[float]) -> list[float]:
    """Each value summed over the processes, in float64 (sent as its bytes: under jax's default
    float32 a gathered float64 would be rounded)."""
    from jax.experimental import multihost_utils

    bits = np.asarray(values, np.float64).view(np.uint32)
    gathered = np.asarray(multihost_utils.process_allgather(bits)).astype(np.uint32)
    return [float(v) for v in gathered.view(np.float64).sum(axis=0)]
