"""Where a JAX training step's time goes on CPU, by kind of XLA operation, next to torch's whole step.

    python benchmarks/train_breakdown.py r2plus1d_18 ir_csn_152           # 2x8x112x112, with torch
    python benchmarks/train_breakdown.py r2plus1d_10 --shape 1x2x16x16 --no-torch --json out.json

One `vmz_jax.train.train_step` (forward + backward + SGD-momentum, train mode, float32, the setup of
`vmz-jax bench --train`) is traced with XLA's per-operation trace events, and every operation is put in
a kind by what its compiled HLO computes:

* convolution: a convolution kernel (forward, input gradient; YNNPACK or Eigen), or a fused
  depthwise multiply-add loop over the window slices (its weight gradient counts as a reduction);
* matrix product: a dot -- 1x1x1 convolutions, patches x kernel, weight gradients, the classifier;
* reduction; elementwise: floating-point arithmetic (BatchNorm, ReLU, residual adds, optimizer
  update), even where a dynamic slice of a scan's stacked values is fused into it; data movement
  (pad, concatenate, slice, copy, transpose, broadcast); scan bookkeeping: dynamic slices and
  updates of stacked values (with loop-index arithmetic) and nothing else. Loops themselves are not
  counted: their trace events span their bodies' operations, which are;
* async matrix product: wall time when no operation event is open right after an Eigen dot, whose
  kernel runs on the thread pool after its event has closed (the weight gradients' transposed dots).

"convolution wall" is the wall-clock time during which a convolution, a matrix product or an async
matrix product is running. When it exceeds torch's whole step, no change outside those kernels can
bring the JAX step to torch's speed. The torch step (`vmz_jax/reference`, its own worker process as
in `vmz-jax bench --train`) is timed in rounds interleaved with the untraced JAX steps; medians.
"""

from __future__ import annotations

import os
import sys
import tempfile

_DUMP = tempfile.mkdtemp(prefix="vmz_breakdown_")
# Before jax is imported: per-operation trace events, and the optimized HLO of the step to classify them.
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), "--xla_cpu_enable_xprof_traceme=true", f"--xla_dump_to={_DUMP}",
    "--xla_dump_hlo_as_text", "--xla_dump_hlo_module_re=train_step"]).strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402

from vmz_jax import bench_train  # noqa: E402
from vmz_jax.cli.common import check_arch, positive, shape_arg  # noqa: E402
from vmz_jax.runtime import reuse_host_memory  # noqa: E402

CONVOLUTION_KINDS = ("convolution", "matrix product", "async matrix product")
KINDS = (*CONVOLUTION_KINDS, "reduction", "elementwise", "data movement", "scan bookkeeping", "idle")


MOVEMENT = {"fusion", "copy", "pad", "concatenate", "slice", "bitcast", "transpose", "reshape", "broadcast",
            "parameter", "constant", "tuple", "get-tuple-element", "iota", "convert"}
BOOKKEEPING = {"dynamic-slice", "dynamic-update-slice"}
CONTAINERS = {"while", "conditional", "call"}


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """(kind, JAX source operation) of every instruction of an optimized HLO module; the kind from
    what the instruction (or the fusion it calls) computes."""
    bodies: dict[str, str] = {}
    for m in re.finditer(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo_text, re.S | re.M):
        bodies[m.group(1)] = m.group(2)
    instructions: dict[str, tuple[str, str]] = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (?:\([^)]*\)|\S+) ([\w\-]+)\((.*)$", hlo_text, re.M):
        name, opcode, rest = m.groups()
        called = re.search(r"calls=%([\w.\-]+)", rest)
        body = bodies.get(called.group(1), "") if called else ""
        source = re.search(r'op_name="([^"]*)"', rest)
        ops = set(re.findall(r"= \S+ ([\w\-]+)\(", body)) | {opcode}
        # arithmetic on floating-point values (integer adds and compares are loop-index bookkeeping)
        arithmetic = set(re.findall(r"= (?:f|bf)\d+\[[^\]]*\]\S* ([\w\-]+)\(", body + "\n" + m.group(0)))
        arithmetic -= MOVEMENT | BOOKKEEPING
        if opcode in CONTAINERS:
            kind = "container"  # its trace event spans its body's operations, which have their own
        elif "convolution" in ops:
            kind = "convolution"
        elif "dot" in ops:
            kind = "matrix product"
        elif "multiply" in ops and "reduce" not in ops and body.count(" slice(") >= 8:
            kind = "convolution"  # a depthwise convolution: multiply-adds over the window slices
        elif "reduce" in ops:
            kind = "reduction"
        elif arithmetic:
            kind = "elementwise"
        elif ops & BOOKKEEPING:
            kind = "scan bookkeeping"
        else:
            kind = "data movement"
        instructions[name] = (kind, source.group(1) if source else "")
    return instructions


def _kind(instructions: dict[str, tuple[str, str]], name: str) -> str:
    return instructions.get(name, ("elementwise", ""))[0]


def breakdown(events: list[dict[str, Any]], instructions: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """Seconds per kind over one traced step's operation events ("X" events with an hlo_op)."""
    ops = sorted((e for e in events if _kind(instructions, e["name"]) != "container"),
                 key=lambda e: e["ts"])
    seconds: collections.Counter[str] = collections.Counter()
    conv_intervals = []
    end = ops[0]["ts"]
    last = None
    for e in ops:
        kind = _kind(instructions, e["name"])
        if e["ts"] > end:  # nothing open: an async (Eigen) dot still running, or the executor idle
            after_eigen_dot = last is not None and not last["name"].startswith("ynn") \
                and _kind(instructions, last["name"]) == "matrix product"
            gap = "async matrix product" if after_eigen_dot else "idle"
            seconds[gap] += (e["ts"] - end) / 1e6
            if gap != "idle":
                conv_intervals.append((end, e["ts"]))
        seconds[kind] += e["dur"] / 1e6
        if kind in CONVOLUTION_KINDS:
            conv_intervals.append((e["ts"], e["ts"] + e["dur"]))
        if e["ts"] + e["dur"] > end:
            end, last = e["ts"] + e["dur"], e
    conv_wall, reach = 0.0, None
    for start, stop in sorted(conv_intervals):
        if reach is None or start > reach:
            conv_wall += stop - start
            reach = stop
        elif stop > reach:
            conv_wall += stop - reach
            reach = stop
    return {"span_s": (end - ops[0]["ts"]) / 1e6, "convolution_wall_s": conv_wall / 1e6,
            "seconds": {k: seconds.get(k, 0.0) for k in KINDS}, "operations": len(ops)}


def traced_step(run: Any, trace_dir: str) -> list[dict[str, Any]]:
    """The operation events of one step of `run`, traced with jax.profiler."""
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    try:
        run()
    finally:
        jax.profiler.stop_trace()
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    return [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})
            and "train_step" in e["args"].get("hlo_module", "")]


def top_sources(events: list[dict[str, Any]], instructions: dict[str, tuple[str, str]], count: int
                ) -> list[dict[str, Any]]:
    """The `count` JAX source operations (HLO op_name metadata) whose operations took longest."""
    seconds: collections.Counter[tuple[str, str]] = collections.Counter()
    calls: collections.Counter[tuple[str, str]] = collections.Counter()
    for e in events:
        kind, source = instructions.get(e["name"], ("elementwise", ""))
        if kind == "container":
            continue
        key = (kind, re.sub(r"^jit\(\w+\)/", "", source) or e["name"])
        seconds[key] += e["dur"] / 1e6
        calls[key] += 1
    return [{"kind": kind, "source": source, "s": s, "calls": calls[kind, source]}
            for (kind, source), s in seconds.most_common(count)]


def measure(arch: str, shape: tuple[int, ...], repeats: int, torch: bool, top: int = 0) -> dict[str, Any]:
    run = bench_train.jax_step(arch, shape)
    run()  # compile
    dumps = glob.glob(os.path.join(_DUMP, "*train_step*after_optimizations.txt"))
    if not dumps:
        raise SystemExit("no optimized HLO of the train step was dumped (XLA_FLAGS not honoured?)")
    with open(max(dumps, key=os.path.getmtime)) as f:  # the newest: this arch's step
        instructions = hlo_instructions(f.read())
    worker = bench_train._Worker("torch", arch, shape, "auto") if torch else None
    jax_s, torch_s = [], []
    try:
        if worker:
            worker.step()
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            jax_s.append(time.perf_counter() - start)
            if worker:
                torch_s.append(worker.step()["s"])
    finally:
        if worker:
            worker.close()
    with tempfile.TemporaryDirectory() as trace_dir:
        events = traced_step(run, trace_dir)
    row = {"arch": arch, "shape": list(shape), "jax_step_s": statistics.median(jax_s),
           "torch_step_s": statistics.median(torch_s) if torch_s else None, **breakdown(events, instructions),
           "top": top_sources(events, instructions, top)}
    return row


def format_rows(rows: list[dict[str, Any]]) -> str:
    head = ["arch", "JAX step s", "torch step s", "convolution wall s", "/ torch step", *KINDS]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        torch_s = r["torch_step_s"]
        cells = [r["arch"], f"{r['jax_step_s']:.3f}", "-" if torch_s is None else f"{torch_s:.3f}",
                 f"{r['convolution_wall_s']:.3f}",
                 "-" if torch_s is None else f"{r['convolution_wall_s'] / torch_s:.2f}",
                 *(f"{r['seconds'][k]:.3f}" for k in KINDS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _arch(name: str) -> str:
    try:
        return check_arch(name).name
    except ValueError as exc:  # the registry's one-line error, as argparse's message
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("arch", nargs="+", type=_arch)
    p.add_argument("--shape", type=shape_arg, default=(2, 8, 112, 112), help="NxTxHxW (default 2x8x112x112)")
    p.add_argument("--repeats", type=positive, default=3, help="untraced steps (and torch steps), median")
    p.add_argument("--no-torch", action="store_true", help="JAX only")
    p.add_argument("--top", type=int, default=0, help="also list the N costliest JAX source operations")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    reuse_host_memory()  # as the benchmark's and `vmz-jax finetune`'s processes run
    try:
        rows = [measure(arch, args.shape, args.repeats, not args.no_torch, args.top) for arch in args.arch]
    finally:
        shutil.rmtree(_DUMP, ignore_errors=True)
    print(format_rows(rows))
    for r in rows:
        if r["top"]:
            print(f"\n{r['arch']}: the {len(r['top'])} costliest source operations (seconds, calls, kind)")
            for t in r["top"]:
                print(f"  {t['s']:7.3f} {t['calls']:5d}  {t['kind']:<18} {t['source'][:110]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
