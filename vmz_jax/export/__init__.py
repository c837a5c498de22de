"""Export for deployment: `vmz_jax.export(weights, out, arch=..., format=...)` and `vmz_jax.export.load`.

`vmz_jax.export` is this package, made callable: `vmz_jax.export(...)` is `vmz_jax.export.export(...)`,
and `vmz_jax.export.load(path)` runs an artifact. The module object's class is swapped for a
`types.ModuleType` subclass with `__call__` (assigning `__class__` of a module is supported since
Python 3.5), so `import vmz_jax.export` and `from vmz_jax.export import load` keep working as for
any package. See `docs/export.md` and `vmz_jax.export.api` for the formats.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from vmz_jax.export.api import (
    DTYPES,
    FORMATS,
    MODEL_FORMATS,
    OUTPUTS,
    SUFFIXES,
    ExportResult,
    export,
    format_of,
)
from vmz_jax.export.loader import ExportedModel, load, metadata_path, weights_path

__all__ = [
    "DTYPES",
    "FORMATS",
    "MODEL_FORMATS",
    "OUTPUTS",
    "SUFFIXES",
    "ExportResult",
    "ExportedModel",
    "export",
    "format_of",
    "load",
    "metadata_path",
    "weights_path",
]


class _CallableModule(types.ModuleType):
    """This package as a function: calling it calls `export`."""

    def __call__(self, *args: Any, **kwargs: Any) -> ExportResult:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
