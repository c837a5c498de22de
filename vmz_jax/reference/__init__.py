"""An independent pure-PyTorch implementation of the VMZ models with VMZ's `state_dict` names.

Optional (needs torch: ``pip install 'vmz-jax[torch]'``): parity tests, `vmz-jax bench` and
`vmz-jax compare` use it as the second implementation to check this package against. It must stay
independent: it imports nothing of vmz_jax or porting but the error type below (an import-linter
contract in pyproject.toml enforces it), so a bug shared by both implementations cannot hide.
"""

from __future__ import annotations

from vmz_jax.errors import VMZError

INSTALL_HINT = "pip install 'vmz-jax[torch]'"


class TorchMissingError(VMZError, ImportError):
    """torch is not installed. Both a VMZError (the CLI prints one line, exit 2) and an ImportError
    (callers that treat the reference as optional, like `vmz_jax.bench`, just skip it)."""


__all__ = ["INSTALL_HINT", "TorchMissingError"]
