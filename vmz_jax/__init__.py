"""vmz-jax: Facebook's VMZ video models (R(2+1)D, R3D, MCx, rMCx, ir-CSN, ip-CSN, C3D) in Flax NNX.

`import vmz_jax` loads almost nothing: every subpackage (`vmz_jax.train`, `vmz_jax.video`,
`vmz_jax.weights`, ...) and the functions below (`load`, `compare`, `evaluate`, `export`, ...) are
imported on first use (PEP 562 module `__getattr__`), so a script pays only for what it touches.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from vmz_jax.errors import CheckpointError, DownloadError, VMZError
from vmz_jax.lazy import lazy_submodules
from vmz_jax.version import __version__

#: Public names that live in a submodule: name -> module that defines it.
_LAZY_ATTRIBUTES = {
    "compare": "vmz_jax.compare",
    "evaluate": "vmz_jax.evaluation",
    "list_pretrainings": "vmz_jax.weights.loading",
    "load": "vmz_jax.weights.loading",
    "save": "vmz_jax.weights.loading",
}




__getattr__ = lazy_submodules(__name__, _LAZY_ATTRIBUTES)


class _Package(types.ModuleType):
    """`vmz_jax.compare` is both a submodule and the function it defines: importing the submodule
    (`from vmz_jax.compare import ...`) must not rebind the package's `compare` to the module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY_ATTRIBUTES and isinstance(value, types.ModuleType):
            self.__dict__.pop(name, None)  # resolved again, to the function, by __getattr__
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def list_models() -> list[str]:
    """Every architecture name `vmz_jax.models.build` accepts."""
    from vmz_jax import models

    return list(models.ARCHS)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "__version__",
    "CheckpointError",
    "DownloadError",
    "VMZError",
    "compare",
    "evaluate",
    "export",
    "list_models",
    "list_pretrainings",
    "load",
    "models",
    "save",
]
