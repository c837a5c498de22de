"""`vmz-jax bench --train`: both sides really train, in their own processes, and the numbers add up."""

import json
import math

import pytest

from vmz_jax import bench_train
from vmz_jax.cli import main
from vmz_jax.errors import VMZError


def test_bench_train_reports_steps_ratio_compile_and_peak_memory(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert main(["bench", "r2plus1d_10", "--train", "--shape", "2x2x16x16", "--repeats", "2",
                 "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| r2plus1d_10 | 2x2x16x16x3 |" in table
    (row,) = json.loads(out.read_text())
    assert row["jax_s"] > 0 and row["torch_s"] > 0 and row["compile_s"] >= 0
    assert math.isclose(row["ratio"], row["torch_s"] / row["jax_s"])
    # each side's own process: at least its runtime's import footprint, and not the same number
    assert row["jax_peak_mb"] > 100 and row["torch_peak_mb"] > 100
    for losses in (row["jax_losses"], row["torch_losses"]):
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
        # a random 400-way head starts near ln(400); each step updates the weights, so the loss moves
        assert abs(losses[0] - math.log(400)) < 2.5 and losses[0] != losses[1]


def test_worker_failure_is_one_line_error():
    with pytest.raises(VMZError, match="jax benchmark worker failed: ValueError: unknown conv") as e:
        bench_train.run("r2plus1d_10", (1, 1, 8, 8), repeats=1, torch=False, conv_impl="winograd")
    assert "\n" not in str(e.value)


def test_peak_rss_reads_this_process():
    assert bench_train.peak_rss_mb() > 10
