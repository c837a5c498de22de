"""Examples in, grouped results out: fixed-size batches through a forward, kept asynchronous.

The video commands all do the same thing with different groupings: many examples (clip views) per
group (a video), computed in batches that mix groups, each group's results wanted together once all
of its examples are computed. `Batcher` does that part and nothing else:

* examples are bucketed by shape; a bucket runs when it holds `batch_size` examples, or, padded with
  zeros, when flushed. One jitted function per input shape then compiles once;
* a batch is dispatched asynchronously and its result collected only when the next batch is
  dispatched (or when it is ready), so the device computes while the host assembles the next batch;
* per group it counts the examples still outstanding; a group is complete once it is `close`d (no
  more examples) and they are all computed, and `take()` then hands over its outputs by key.

`Engine` is the device side: a `Forward` jitted for a fixed batch size, the batch split over the local
devices (a 1-D "data" mesh; the batch size is rounded up to a multiple of the device count).

`vmz_jax.video.pipeline` runs it per video with (clip, view) keys; an evaluation that averages many
clips x views per video, or a classifier of in-memory clips, can use it the same way.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vmz_jax.models.forward import Forward

__all__ = ["Batcher", "Done", "Engine"]

G = TypeVar("G", bound=Hashable)
K = TypeVar("K", bound=Hashable)


class Engine:
    """`forward` as one jitted function of a (batch_size, ...) batch, split over `devices` (default:
    all local devices), its weights replicated on each."""

    def __init__(self, forward: Forward, batch_size: int, devices: Sequence[jax.Device] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, not {batch_size}")
        devices = list(devices) if devices is not None else jax.local_devices()
        self.forward = forward
        self.mesh = Mesh(np.array(devices), ("data",))
        self.batch_size = math.ceil(batch_size / len(devices)) * len(devices)
        self.input_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.state = jax.device_put(forward.state, replicated)
        self._fn = forward.jit(in_shardings=(replicated, self.input_sharding),
                               out_shardings=self.input_sharding)

    def __call__(self, batch: np.ndarray | tuple[np.ndarray, ...]) -> Any:
        """Dispatch a (batch_size, ...) batch (or a tuple of them, one per input of the forward); the
        result (array or pytree) is computed asynchronously."""
        return self._fn(self.state, jax.device_put(batch, self.input_sharding))


@dataclass
class Done(Generic[G, K]):
    """A complete group: its outputs by key (each a numpy array, or a pytree of them, without the
    batch axis). A group closed without examples has no outputs."""

    group: G
    outputs: dict[K, Any]


@dataclass
class _Group:
    outputs: dict[Any, Any] = field(default_factory=dict)
    outstanding: int = 0
    closed: bool = False


def _shape_of(example: np.ndarray | tuple[np.ndarray, ...]) -> tuple[bool, tuple[tuple[Any, str], ...]]:
    """The bucket of an example: whether it is a tuple, and the (shape, dtype) of each array."""
    parts = example if isinstance(example, tuple) else (example,)
    return isinstance(example, tuple), tuple((part.shape, part.dtype.str) for part in parts)


def _is_ready(result: Any) -> bool:
    return all(leaf.is_ready() for leaf in jax.tree.leaves(result))


class Batcher(Generic[G, K]):
    """Buckets, pads, dispatches and collects examples for `engine`; see the module docstring.

    Single-threaded: call it from one thread. `max_in_flight` batches may be computing while the
    next one is assembled (1 overlaps host and device; more only queue more device work)."""

    def __init__(self, engine: Engine, *, max_in_flight: int = 1):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self.engine = engine
        self.max_in_flight = max_in_flight
        self._groups: dict[G, _Group] = {}
        self._buckets: dict[Any, list[tuple[G, K, Any]]] = {}
        self._in_flight: collections.deque[tuple[list[tuple[G, K]], Any]] = collections.deque()
        self._done: list[Done[G, K]] = []
        self.batches = 0  # dispatched so far
        self.padded_rows = 0  # rows of zeros among them

    @property
    def batch_size(self) -> int:
        return self.engine.batch_size

    @property
    def busy(self) -> bool:
        """Whether a dispatched batch has not been collected yet."""
        return bool(self._in_flight)

    @property
    def queued(self) -> int:
        """Examples waiting in partly filled buckets."""
        return sum(len(items) for items in self._buckets.values())

    def add(self, group: G, key: K, example: Any) -> None:
        """Queue one example (no batch axis) of `group`: an array, or a tuple of arrays for a forward
        of several inputs (clips and log-mels); runs its bucket when that is full."""
        state = self._groups.setdefault(group, _Group())
        if state.closed:
            raise ValueError(f"group {group!r} is closed")
        example = tuple(map(np.asarray, example)) if isinstance(example, tuple) else np.asarray(example)
        shape = _shape_of(example)
        bucket = self._buckets.setdefault(shape, [])
        bucket.append((group, key, example))
        state.outstanding += 1
        if len(bucket) == self.batch_size:
            self._dispatch(shape)

    def close(self, group: G) -> None:
        """No more examples for `group`: it completes once the queued ones are computed."""
        state = self._groups.setdefault(group, _Group())
        state.closed = True
        self._complete_if_done(group)

    def discard(self, group: G) -> None:
        """Forget `group`: its queued examples are dropped and results still in flight ignored."""
        if self._groups.pop(group, None) is None:
            return
        for shape in list(self._buckets):
            kept = [item for item in self._buckets[shape] if item[0] != group]
            if kept:
                self._buckets[shape] = kept
            else:
                del self._buckets[shape]

    def poll(self) -> None:
        """Collect the batches that have finished computing, without waiting."""
        while self._in_flight and _is_ready(self._in_flight[0][1]):
            self._collect()

    def flush(self, *, closed_only: bool = False) -> None:
        """Run the partly filled buckets now, padded: all of them, or with `closed_only` only those
        whose groups are all closed (those nobody waits for more examples of)."""
        for shape in list(self._buckets):
            if not closed_only or all(self._groups[g].closed for g, _, _ in self._buckets[shape]):
                self._dispatch(shape)

    def finish(self) -> None:
        """Flush everything and wait for every batch."""
        self.flush()
        while self._in_flight:
            self._collect()

    def take(self) -> list[Done[G, K]]:
        """The groups completed since the last call, in order of completion."""
        done, self._done = self._done, []
        return done

    def _dispatch(self, shape: Any) -> None:
        items = self._buckets.pop(shape)
        is_tuple, parts = shape
        stacked = [np.zeros((self.batch_size, *dims), np.dtype(dtype)) for dims, dtype in parts]
        for row, (_, _, example) in enumerate(items):
            for part, value in zip(stacked, example if is_tuple else (example,), strict=True):
                part[row] = value
        batch = tuple(stacked) if is_tuple else stacked[0]
        self._in_flight.append(([(g, k) for g, k, _ in items], self.engine(batch)))
        self.batches += 1
        self.padded_rows += self.batch_size - len(items)
        while len(self._in_flight) > self.max_in_flight:
            self._collect()

    def _collect(self) -> None:
        keys, result = self._in_flight.popleft()
        values = jax.tree.map(np.asarray, result)
        for row, (group, key) in enumerate(keys):
            state = self._groups.get(group)
            if state is None:  # discarded
                continue
            state.outputs[key] = jax.tree.map(lambda a, r=row: a[r], values)
            state.outstanding -= 1
            self._complete_if_done(group)

    def _complete_if_done(self, group: G) -> None:
        state = self._groups.get(group)
        if state is not None and state.closed and not state.outstanding:
            del self._groups[group]
            self._done.append(Done(group, state.outputs))
