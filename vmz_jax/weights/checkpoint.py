"""Orbax checkpoints of a model's weights, independent of the NNX object layout.

A checkpoint is a directory::

    DIR/vmz_jax.json     metadata: arch, num_classes, clip_length, pretraining, source file and its
                         sha256, vmz_jax version, format version
    DIR/params/          an Orbax PyTree checkpoint of {"params": nested dict of float32 arrays}

The nested dict is built from the flat path tuples of `vmz_jax.models.variables` (`("layer2", "rest", "conv1",
"spatial", "kernel")` -> `tree["params"]["layer2"]["rest"]["conv1"]["spatial"]["kernel"]`), so it does
not depend on how the modules are laid out as objects. `save` writes everything into a temporary
sibling directory and renames it into place, so `DIR` either does not exist or is complete.
`restore` checks the metadata and the stored tree against the abstract tree of the architecture
(`vmz_jax.models.variables.abstract_shapes`) before reading any array, so a foreign or mismatched directory
fails with a one-line `CheckpointError`. Neither imports torch nor unpickles anything; Orbax is
imported only when a checkpoint is written or read.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vmz_jax.errors import CheckpointError, VMZError, one_line
from vmz_jax.files import atomic_dir, atomic_write
from vmz_jax.models.variables import check_params, expected_shapes
from vmz_jax.version import __version__

__all__ = [
    "FORMAT_VERSION",
    "METADATA_FILE",
    "flatten",
    "is_checkpoint",
    "nest",
    "read_metadata",
    "restore",
    "save",
]

ParamPath = tuple[str, ...]
StrPath = str | os.PathLike[str]

FORMAT_VERSION = 1
METADATA_FILE = "vmz_jax.json"
ITEM_DIR = "params"
_KIND = "vmz_jax.checkpoint"
_REQUIRED = {"arch": str, "num_classes": int}
_RESERVED = ("kind", "format_version", "vmz_jax_version", "num_arrays", "num_parameters")  # set by save


def _version() -> str:
    return __version__


# --------------------------------------------------------------------------------------------
# flat <-> nested


def nest(flat: Mapping[ParamPath, Any]) -> dict[str, Any]:
    """{("a", "b"): x} -> {"a": {"b": x}}."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ValueError(f"path {'.'.join(path)} runs through a leaf")
            node = child
        if path[-1] in node:
            raise ValueError(f"duplicate or conflicting path {'.'.join(path)}")
        node[path[-1]] = value
    return out


def flatten(tree: Mapping[str, Any], prefix: ParamPath = ()) -> dict[ParamPath, Any]:
    """The inverse of `nest`: nested dicts -> {path tuple: leaf}."""
    out: dict[ParamPath, Any] = {}
    for key, value in tree.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping):
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


# --------------------------------------------------------------------------------------------
# metadata


def is_checkpoint(path: StrPath) -> bool:
    """True if `path` is a directory holding a vmz_jax checkpoint (complete: it is renamed into
    place only once everything is written)."""
    return os.path.isfile(os.path.join(os.fsdecode(path), METADATA_FILE))


def read_metadata(directory: StrPath) -> dict[str, Any]:
    """The metadata of a checkpoint directory, checked; CheckpointError if it is not one."""
    name = os.fsdecode(directory)
    if not os.path.exists(name):
        raise CheckpointError(f"{name}: no such file or directory")
    if not os.path.isdir(name):
        raise CheckpointError(f"{name}: not a directory")
    meta_path = os.path.join(name, METADATA_FILE)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{name}: not a vmz_jax checkpoint directory (no {METADATA_FILE})")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{name}: unreadable {METADATA_FILE} ({one_line(exc)})") from None
    if not isinstance(meta, dict) or meta.get("kind") != _KIND:
        raise CheckpointError(f"{name}: {METADATA_FILE} does not describe a vmz_jax checkpoint")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise CheckpointError(
            f"{name}: checkpoint format version {version!r} is not supported (this vmz_jax "
            f"{_version()} reads version {FORMAT_VERSION}); port the original file again"
        )
    for key, kind in _REQUIRED.items():
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{name}: {METADATA_FILE} lacks a valid {key!r}")
    clip = meta.get("clip_length")
    if clip is not None and (not isinstance(clip, int) or clip <= 0):
        raise CheckpointError(f"{name}: {METADATA_FILE} has an invalid 'clip_length'")
    labels = meta.get("labels")  # class names written by vmz_jax.save(..., labels=)
    if labels is not None and (not isinstance(labels, list) or len(labels) != meta["num_classes"]
                               or not all(isinstance(x, str) for x in labels)):
        raise CheckpointError(f"{name}: {METADATA_FILE} has invalid 'labels' (expected a list of "
                              f"{meta['num_classes']} strings)")
    return meta


# --------------------------------------------------------------------------------------------
# save


def save(directory: StrPath, params: Mapping[ParamPath, Any], metadata: Mapping[str, Any], *,
         overwrite: bool = False) -> Path:
    """Write `params` (flat path -> array) and `metadata` as a checkpoint at `directory`, atomically.

    `metadata` needs `arch` and `num_classes` (`clip_length`, `pretraining`, `source`,
    `source_sha256`, ... are recorded as given); `params` must fit exactly the abstract tree of
    that architecture. The version fields are added here. An existing `directory` is an error unless
    `overwrite`. Returns the absolute path. Raises CheckpointError.
    """
    target = os.path.abspath(os.fsdecode(directory))
    for key, kind in _REQUIRED.items():
        if not isinstance(metadata.get(key), kind):
            raise ValueError(f"metadata needs {key!r} ({kind.__name__})")
    meta = {**{k: v for k, v in metadata.items() if k not in _RESERVED},
            "kind": _KIND, "format_version": FORMAT_VERSION, "vmz_jax_version": _version()}
    meta.setdefault("clip_length", None)
    shapes = expected_shapes(meta["arch"], meta["num_classes"], meta["clip_length"])
    check_params(params, shapes, f"{target}: weights for {meta['arch']}")
    meta["num_arrays"] = len(shapes)
    meta["num_parameters"] = int(sum(math.prod(s) for s in shapes.values()))
    try:
        text = json.dumps(meta, indent=1, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata is not JSON-serialisable: {exc}") from None
    if os.path.lexists(target) and not overwrite:
        raise CheckpointError(f"{target}: already exists (remove it, or pass overwrite)")

    try:
        with atomic_dir(target, overwrite=overwrite) as tmp:
            tree = {"params": nest({p: np.asarray(params[p], np.float32) for p in shapes})}
            _orbax_save(os.path.join(tmp, ITEM_DIR), tree)
            atomic_write(os.path.join(tmp, METADATA_FILE), text + "\n", "w")
    except FileExistsError:
        raise CheckpointError(f"{target}: already exists (remove it, or pass overwrite)") from None
    except OSError as exc:
        raise CheckpointError(f"{target}: cannot write ({exc.strerror or exc})") from None
    except CheckpointError:
        raise
    except Exception as exc:  # an Orbax failure: one line, nothing left behind
        raise CheckpointError(f"{target}: cannot write ({type(exc).__name__}: {one_line(exc)})") from None
    return Path(target)


def _checkpointer() -> Any:
    """An Orbax PyTree checkpointer of this process alone: a weights directory is written and read
    by one process, without the barriers Orbax otherwise holds with every process of a
    `jax.distributed` job (which would wait forever when only one of them saves)."""
    import jax
    import orbax.checkpoint as ocp

    this = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                              active_processes={jax.process_index()})
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=this),
                            multiprocessing_options=this)


def _orbax_save(path: str, tree: dict[str, Any]) -> None:
    with _checkpointer() as checkpointer:
        checkpointer.save(path, tree)


# --------------------------------------------------------------------------------------------
# restore


def restore(directory: StrPath, *, arch: str | None = None
            ) -> tuple[dict[ParamPath, np.ndarray], dict[str, Any]]:
    """Read a checkpoint: (flat path -> float32 numpy array, metadata).

    With `arch`, the checkpoint must hold weights of that architecture. The stored tree is checked
    against the abstract tree of the recorded architecture (paths, shapes, dtypes) before anything is
    read. Raises CheckpointError with one line naming the directory.
    """
    name = os.path.abspath(os.fsdecode(directory))
    meta = read_metadata(name)
    if arch is not None and meta["arch"] != arch:
        raise CheckpointError(
            f"{name}: holds {meta['arch']} weights, not {arch} (load it with arch={meta['arch']!r})"
        )
    try:
        shapes = expected_shapes(meta["arch"], meta["num_classes"], meta.get("clip_length"))
    except VMZError as exc:
        raise CheckpointError(f"{name}: {exc}") from None
    item = os.path.join(name, ITEM_DIR)
    if not os.path.isdir(item):
        raise CheckpointError(f"{name}: incomplete checkpoint (no {ITEM_DIR}/ directory)")
    try:
        stored = _orbax_metadata(item)
    except Exception as exc:
        raise CheckpointError(
            f"{name}: unreadable Orbax metadata ({type(exc).__name__}: {one_line(exc)})"
        ) from None
    _check_stored(name, stored, shapes)
    _drop_closed_loop_callbacks()
    try:
        tree = _orbax_restore(item, shapes)
    except Exception as exc:
        raise CheckpointError(f"{name}: cannot restore ({type(exc).__name__}: {one_line(exc)})") from None
    flat = flatten(tree.get("params", {})) if isinstance(tree, Mapping) else {}
    params = {path: np.asarray(flat.get(path)) for path in shapes}
    check_params(params, shapes, f"{name}: restored arrays")
    bad = [".".join(p) for p, v in params.items() if v.dtype != np.float32]
    if bad:
        raise CheckpointError(one_line(f"{name}: arrays that are not float32: {', '.join(bad)}"))
    return params, meta


_closed_loop_filter_installed = False


def _drop_closed_loop_callbacks() -> None:
    """When an Orbax restore fails (a damaged file), the reads still in flight complete afterwards
    and call back into Orbax's event loop, closed by then: each callback raises
    `RuntimeError("Event loop is closed")` in asyncio's `_check_closed`, which Python reports through
    `sys.unraisablehook` as a traceback on stderr, after our one-line error. Install (once) a hook
    that drops exactly those and passes everything else on."""
    global _closed_loop_filter_installed
    if _closed_loop_filter_installed:
        return
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        exc, tb = unraisable.exc_value, unraisable.exc_traceback
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
                and tb is not None and tb.tb_frame.f_code.co_name == "_check_closed"):
            return
        previous(unraisable)

    sys.unraisablehook = hook
    _closed_loop_filter_installed = True


def _orbax_metadata(item: str) -> dict[ParamPath, tuple[tuple[int, ...] | None, str | None]]:
    """Path -> (shape, dtype) of every array Orbax has stored."""
    with _checkpointer() as checkpointer:
        meta = checkpointer.metadata(item)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, Mapping):
        raise TypeError(f"the stored item is a {type(tree).__name__}, not a tree of arrays")
    out = {}
    for path, leaf in flatten(tree).items():
        shape = getattr(leaf, "shape", None)
        dtype = getattr(leaf, "dtype", None)
        out[path] = (tuple(shape) if shape is not None else None,
                     str(np.dtype(dtype)) if dtype is not None else None)
    return out


def _check_stored(name: str, stored: Mapping[ParamPath, tuple[tuple[int, ...] | None, str | None]],
                  shapes: Mapping[ParamPath, tuple[int, ...]]) -> None:
    wanted = {("params", *p): s for p, s in shapes.items()}
    problems = [f"missing {'.'.join(p[1:])}" for p in wanted if p not in stored]
    problems += [f"unexpected {'.'.join(p)}" for p in stored if p not in wanted]
    for path, (shape, dtype) in stored.items():
        if path not in wanted:
            continue
        if shape != wanted[path]:
            problems.append(f"{'.'.join(path[1:])} has shape {shape}, expected {wanted[path]}")
        elif dtype is not None and dtype != "float32":
            problems.append(f"{'.'.join(path[1:])} has dtype {dtype}, expected float32")
    if problems:
        raise CheckpointError(one_line(
            f"{name}: the stored arrays do not fit the recorded architecture: "
            f"{len(problems)} problem(s): " + "; ".join(problems)
        ))


def _orbax_restore(item: str, shapes: Mapping[ParamPath, tuple[int, ...]]) -> Any:
    import jax
    import orbax.checkpoint as ocp

    abstract = {"params": nest({p: jax.ShapeDtypeStruct(s, np.float32) for p, s in shapes.items()})}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.float32),
                                abstract)
    with _checkpointer() as checkpointer:
        return checkpointer.restore(item, item=abstract, restore_args=restore_args)
