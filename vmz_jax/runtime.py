"""Process-wide settings that make repeated runs cheaper, and waiting for the other processes."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def reuse_host_memory() -> bool:
    """Make repeated CPU steps reuse the memory they free instead of faulting in fresh pages.

    Each run of a compiled step allocates one temporary buffer the size of its activations (826 MB
    for r2plus1d_18's training step at 2x8x112x112). glibc serves a block that large with a fresh
    `mmap` and unmaps it when freed, so every step faults every page in again: 0.5 s of system time
    per step on a 2-core VM, and a fresh 100 MB im2col buffer cost more to fault in than to fill.
    This keeps freed blocks in the heap (`M_MMAP_MAX=0`, no trimming) and has JAX run single-device
    CPU computations on the calling thread (`jax_cpu_enable_async_dispatch=False`): only the main
    thread's heap can hold such a block, glibc's per-thread arenas map it regardless. The process
    then keeps its peak memory until it exits, as a training process does anyway.

    Call it before the first JAX computation. Returns whether it applied: False, changing nothing,
    where the C library is not glibc or JAX's backends have already started.
    """
    from jax._src import xla_bridge

    libc_name = ctypes.util.find_library("c")
    if platform.libc_ver()[0] != "glibc" or libc_name is None or xla_bridge.backends_are_initialized():
        return False
    libc = ctypes.CDLL(libc_name)
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)):
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True
