"""Process-wide JAX settings that make repeated runs cheaper, and waiting for the other processes."""

from __future__ import annotations

import os
from pathlib import Path

import jax

from vmz_jax.weights.download import cache_dir


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path:
    """Keep compiled XLA executables on disk, so a second process skips the jit compile.

    Defaults to `$VMZ_JAX_HOME/xla` (`~/.cache/vmz_jax/xla`). Returns the directory used.
    """
    path = Path(directory) if directory is not None else cache_dir() / "xla"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


def sync_processes(name: str, count: int) -> None:
    """Wait until each of the `count` processes of a run has reached the point called `name` (a name
    every process passes in the same order); nothing to wait for with one process."""
    if count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
