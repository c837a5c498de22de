"""Training-step speed of vmz_jax against the PyTorch reference (same input, interleaved rounds).

    python benchmarks/bench_train.py                        # the issue's targets, CPU, 2x8x112x112
    python benchmarks/bench_train.py r2plus1d_18 --shape 2x8x56x56 --repeats 5

Same as `vmz-jax bench --train`: one forward + backward + SGD (momentum 0.9) step per side, each
side in its own process; prints a markdown table (median seconds, speed-up, JAX compile seconds,
peak RSS per side).
"""

import sys

from vmz_jax.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(not a.startswith("-") for a in args):
        args = ["r2plus1d_18", "r2plus1d_34", "ir_csn_152", *args]
    sys.exit(main(["bench", "--train", *args]))
