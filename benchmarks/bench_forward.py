"""Forward-pass speed of vmz_jax against the PyTorch reference (same input, same run, interleaved).

    python benchmarks/bench_forward.py                       # the issue's two targets, CPU
    python benchmarks/bench_forward.py r2plus1d_152 ip_csn_152 --shape 2x8x112x112

Same as `vmz-jax bench`; prints a markdown table (median seconds, clips/s, GFLOP/s, speed-up).
"""

import sys

from vmz_jax.cli import main

if __name__ == "__main__":
    args = sys.argv[1:] or ["ir_csn_152", "r2plus1d_34"]
    sys.exit(main(["bench", *args]))
