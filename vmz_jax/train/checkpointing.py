"""Checkpoints of a training run: the model and optimizer state as path-named arrays in an Orbax
CheckpointManager (`Checkpoints`), restored only into the same structure, and the helpers `fit` saves
and restores through."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vmz_jax.errors import CheckpointError, VMZError, one_line

__all__ = ["Checkpoints", "all_finite", "set_state_leaves", "state_leaves", "storable"]


def state_leaves(obj: Any) -> list[tuple[str, jax.Array]]:
    """Every array of an NNX object's state with its path, in a fixed order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(nnx.state(obj))
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in flat]


def set_state_leaves(obj: Any, values: Sequence[Any]) -> None:
    state = nnx.state(obj)
    leaves, treedef = jax.tree.flatten(state)
    new = []
    for old, value in zip(leaves, values, strict=True):
        if jax.dtypes.issubdtype(old.dtype, jax.dtypes.prng_key):
            new.append(jax.random.wrap_key_data(jnp.asarray(value), impl=jax.random.key_impl(old)))
        else:
            new.append(jnp.asarray(value, dtype=old.dtype))
    nnx.update(obj, jax.tree.unflatten(treedef, new))


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def all_finite(leaves: Sequence[Any]) -> bool:
    floats = [x for x in leaves
              if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
              and jnp.issubdtype(x.dtype, jnp.inexact)]
    return not floats or bool(np.all(np.asarray(_finite_flags(floats))))


def storable(x: Any) -> Any:
    return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x


class Checkpoints:
    """Orbax CheckpointManager over `directory`: items `state` (lists of arrays) and `meta` (JSON)."""

    def __init__(self, directory: Path, keep: int):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.directory = directory.absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max(1, int(keep)), create=True,
                                               cleanup_tmp_directories=True)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options,
                                                 item_names=("state", "meta"))
        except OSError as exc:
            raise VMZError(f"{self.directory}: cannot open ({exc.strerror or exc})") from None
        except Exception as exc:
            raise CheckpointError(f"{self.directory}: cannot open "
                                  f"({type(exc).__name__}: {one_line(exc)})") from None

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.manager.wait_until_finished()
        self.manager.close()

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def kept_message(self) -> str:
        self.wait()
        latest = self.latest()
        if latest is None:
            return " (no checkpoint was written before)"
        return f"; the last good checkpoint is step {latest} in {self.directory}"

    def save(self, step: int, state: dict[str, list[tuple[str, Any]]], meta: dict[str, Any]) -> None:
        ocp = self.ocp
        arrays = {k: [storable(x) for _, x in v] for k, v in state.items()}
        meta = {**meta, "paths": {k: [p for p, _ in v] for k, v in state.items()}}
        try:
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(arrays),
                                                            meta=ocp.args.JsonSave(meta)))
        except Exception as exc:
            raise CheckpointError(f"{self.directory}: cannot save step {step} "
                                  f"({type(exc).__name__}: {one_line(exc)})") from None

    def restore(self, step: int, like: dict[str, list[tuple[str, Any]]]
                ) -> tuple[dict[str, list[np.ndarray]], dict[str, Any]]:
        ocp = self.ocp
        where = f"{self.directory}/{step}"
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as exc:
            raise CheckpointError(f"{where}: unreadable ({type(exc).__name__}: {one_line(exc)})") from None
        paths = meta.get("paths") if isinstance(meta, dict) else None
        expected = {k: [p for p, _ in v] for k, v in like.items()}
        if paths != expected:
            raise CheckpointError(one_line(
                f"{where}: the checkpoint holds another model or optimizer state "
                f"({_first_difference(paths, expected)})"))
        abstract = {k: [np.zeros(np.shape(storable(x)), storable(x).dtype) for _, x in v]
                    for k, v in like.items()}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args)))["state"]
        except Exception as exc:
            raise CheckpointError(
                f"{where}: cannot restore ({type(exc).__name__}: {one_line(exc)})") from None
        for key, arrays in restored.items():
            for (path, _), want, got in zip(like[key], abstract[key], arrays, strict=True):
                if np.shape(got) != want.shape or np.asarray(got).dtype != want.dtype:
                    raise CheckpointError(f"{where}: {key}{path} is {np.asarray(got).dtype}"
                                          f"{list(np.shape(got))}, expected {want.dtype}{list(want.shape)}")
        return restored, meta


def _first_difference(stored: Any, expected: dict[str, list[str]]) -> str:
    if not isinstance(stored, dict):
        return "no path list"
    for key, paths in expected.items():
        have = stored.get(key) or []
        for i, path in enumerate(paths):
            if i >= len(have):
                return f"{key}{path} missing"
            if have[i] != path:
                return f"{key}: {have[i]} where {path} was expected"
        if len(have) > len(paths):
            return f"{key}{have[len(paths)]} unexpected"
    return "different items"
