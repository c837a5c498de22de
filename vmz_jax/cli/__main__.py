"""`python -m vmz_jax.cli`."""

import sys

from vmz_jax.cli import main

sys.exit(main())
