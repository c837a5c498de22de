"""`vmz-jax bench` runs end to end on a tiny input and reports numbers that add up."""

import json

from vmz_jax import bench
from vmz_jax.cli import main


def test_bench_reports_medians_ratios_and_flops(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "r2plus1d_10", "--shape", "1x4x32x32", "--repeats", "2",
                 "--torch-variants", "eager", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| r2plus1d_10 | 1x4x32x32x3 |" in table
    (row,) = json.loads(out.read_text())
    assert row["jax_s"] > 0 and row["torch_s"]["eager"] > 0
    assert abs(row["ratios"]["eager"] - row["torch_s"]["eager"] / row["jax_s"]) < 1e-9
    assert row["gflop"] > 0


def test_flop_count_matches_published_r2plus1d_34():
    import torch

    vmz_torch = bench.torch_reference()
    model = vmz_torch.build("r2plus1d_34").eval()
    # 2 clips x 8 x 112 x 112: the spec's 152 GFLOP (multiply-adds x 2)
    assert abs(bench.count_flops(model, torch.zeros(2, 3, 8, 112, 112)) / 1e9 - 152.4) < 0.5


def test_bench_rejects_unknown_arch(capsys):
    assert main(["bench", "resnet50", "--no-torch"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown architecture" in err


def test_bench_warns_on_a_busy_machine():
    from vmz_jax.cli.bench import busy_warning

    assert busy_warning(0.9, 2) is None
    message = busy_warning(3.2, 2)
    assert message is not None and "load average 3.2 on 2 cores" in message and "\n" not in message
