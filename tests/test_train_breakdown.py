"""benchmarks/train_breakdown.py: operations are put in the right kind, and the script runs end to end."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_breakdown.py"

# optimized HLO as XLA dumps it, long lines and all
HLO = """\
%fused_conv (p0: f32[2,8,8,4], p1: f32[3,3,4,5]) -> f32[2,8,8,5] {
  %p0 = f32[2,8,8,4]{3,2,1,0} parameter(0)
  %p1 = f32[3,3,4,5]{3,2,1,0} parameter(1)
  ROOT %c = f32[2,8,8,5]{3,2,1,0} convolution(%p0, %p1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
}

%fused_sum (p0: f32[2,8,8,5]) -> f32[5] {
  %p0 = f32[2,8,8,5]{3,2,1,0} parameter(0)
  %z = f32[] constant(0)
  ROOT %r = f32[5]{0} reduce(%p0, %z), dimensions={0,1,2}, to_apply=%add
}

%fused_relu (p0: f32[2,8,8,5]) -> f32[2,8,8,5] {
  %p0 = f32[2,8,8,5]{3,2,1,0} parameter(0)
  %z = f32[] constant(0)
  %b = f32[2,8,8,5]{3,2,1,0} broadcast(%z), dimensions={}
  ROOT %m = f32[2,8,8,5]{3,2,1,0} maximum(%p0, %b)
}

ENTRY %main (x: f32[2,8,8,4], w: f32[3,3,4,5], a: f32[100,7], b: f32[100,9]) -> f32[5] {
  %x = f32[2,8,8,4]{3,2,1,0} parameter(0)
  %w = f32[3,3,4,5]{3,2,1,0} parameter(1)
  %a = f32[100,7]{1,0} parameter(2)
  %b = f32[100,9]{1,0} parameter(3)
  %ynn_fusion.3 = f32[2,8,8,5]{3,2,1,0} fusion(%x, %w), kind=kCustom, calls=%fused_conv, metadata={op_name="jit(_train_step)/jvp()/conv_general_dilated"}
  %dot.1 = f32[7,9]{1,0} dot(%a, %b), lhs_contracting_dims={0}, rhs_contracting_dims={0}, metadata={op_name="jit(_train_step)/transpose(jvp())/dot_general"}
  %relu_fusion = f32[2,8,8,5]{3,2,1,0} fusion(%ynn_fusion.3), kind=kLoop, calls=%fused_relu
  %pad.2 = f32[2,10,10,4]{3,2,1,0} pad(%x, %z), padding=0_0x1_1x1_1x0_0
  %while.7 = (s32[], f32[5]{0}) while(%t), condition=%cond, body=%body
  ROOT %sum_fusion = f32[5]{0} fusion(%relu_fusion), kind=kLoop, calls=%fused_sum
}
"""  # noqa: E501


@pytest.fixture(scope="module")
def breakdown():
    flags = os.environ.get("XLA_FLAGS")
    spec = importlib.util.spec_from_file_location("train_breakdown", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # sets XLA_FLAGS for its own process: not for later tests
    finally:
        if flags is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = flags
    yield module
    import shutil

    shutil.rmtree(module._DUMP, ignore_errors=True)


def test_operations_are_classified_by_what_their_hlo_computes(breakdown):
    kinds = breakdown.hlo_instructions(HLO)
    assert kinds["ynn_fusion.3"] == ("convolution", "jit(_train_step)/jvp()/conv_general_dilated")
    assert kinds["dot.1"][0] == "matrix product"
    assert kinds["relu_fusion"][0] == "elementwise"
    assert kinds["pad.2"][0] == "data movement"
    assert kinds["sum_fusion"][0] == "reduction"
    assert kinds["while.7"][0] == "container"


def test_gaps_after_an_eigen_dot_count_as_its_work_and_convolution_wall_merges_overlaps(breakdown):
    instructions = breakdown.hlo_instructions(HLO)

    def op(name, ts, dur):
        return {"name": name, "ts": ts, "dur": dur}

    events = [op("ynn_fusion.3", 0, 100), op("relu_fusion", 50, 100),  # overlapping: wall 0..150
              op("dot.1", 150, 10), op("sum_fusion", 200, 20),        # 40 us gap after the Eigen dot
              op("pad.2", 300, 10),                                   # 80 us idle gap
              op("while.7", 0, 310)]                                  # spans its body: not counted
    row = breakdown.breakdown(events, instructions)
    s = {k: round(v * 1e6) for k, v in row["seconds"].items()}
    assert s["convolution"] == 100 and s["elementwise"] == 100 and s["matrix product"] == 10
    assert s["async matrix product"] == 40 and s["idle"] == 80
    assert s["reduction"] == 20 and s["data movement"] == 10
    assert round(row["span_s"] * 1e6) == 310
    assert round(row["convolution_wall_s"] * 1e6) == 100 + 10 + 40


def test_script_traces_a_real_training_step(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}
    result = subprocess.run([sys.executable, str(SCRIPT), "r2plus1d_10", "--shape", "2x2x16x16",
                             "--repeats", "1", "--no-torch", "--top", "3", "--json", str(out)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = json.loads(out.read_text())
    assert row["arch"] == "r2plus1d_10" and row["jax_step_s"] > 0 and row["torch_step_s"] is None
    # a real step has convolutions, matrix products (1x1x1 shortcut, classifier) and BatchNorm sums
    assert row["seconds"]["convolution"] > 0 and row["seconds"]["matrix product"] > 0
    assert row["seconds"]["reduction"] > 0
    assert 0 < row["convolution_wall_s"] <= row["span_s"]
    assert sum(row["seconds"].values()) >= row["span_s"] * 0.5
    assert len(row["top"]) == 3 and "| r2plus1d_10 |" in result.stdout
