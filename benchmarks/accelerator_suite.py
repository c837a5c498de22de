"""The accelerator suite: `python benchmarks/accelerator_suite.py --out DIR [--budget S] [--tiny]`.

The same as `vmz-jax bench --suite accelerator ...` (see `vmz_jax/bench_accelerator.py` and the "GPU path"
section of docs/benchmarks.md): on a GPU, within the budget (default 480 s), forward and training step of
r2plus1d_34 and ir_csn_152 against torch in float32 (no TF32) and bfloat16, every convolution form A/B'd,
and the recommended `AUTO_IMPL` row, written to DIR/accelerator.json and DIR/accelerator.md.
"""

import sys

from vmz_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--suite", "accelerator", *sys.argv[1:]]))
