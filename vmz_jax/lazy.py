"""Lazy subpackage access (PEP 562): `vmz_jax.<package>.<module>` without importing it up front."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from typing import Any


def lazy_submodules(package: str, attributes: dict[str, str] | None = None) -> Callable[[str], Any]:
    """A module `__getattr__` for `package` that imports its submodules (and `attributes`, name ->
    defining module) on first access; unknown names raise AttributeError as usual."""

    def __getattr__(name: str) -> Any:
        module = sys.modules[package]
        if attributes and name in attributes:
            value = getattr(importlib.import_module(attributes[name]), name)
        elif not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}") is not None:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module.__dict__[name] = value
        return value

    return __getattr__
