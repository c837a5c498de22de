"""Porting speed and peak memory on a generated 152-layer checkpoint, and `load()` time from Orbax.

    python benchmarks/bench_port.py                        # r2plus1d_152 (474 MB), 3 runs each
    python benchmarks/bench_port.py --arch ip_csn_152 --repeats 5 --keep /tmp/bench_port

Random float32 weights for ARCH (400 classes) are written as a zip `.pth` (VMZ names, what torch.save
writes), as a Caffe2 `.pkl` laid out like the released ones (pickled by Python 2: array bytes as
BINSTRING), and as the protocol-2 `.pkl` that Python 3 (our `export`) writes, whose bytes are latin-1
text re-encoded as UTF-8 (1.5x larger, and slower to read).

Every measurement runs in a fresh subprocess: `porting.convert.read_params` with the model's shapes
already traced ("warm": the port itself) and in a process that has traced nothing ("cold": what
`vmz-jax port` pays, the trace of a 152-layer model included). Peak RSS is the child's high-water
mark (VmHWM), total and above the child's baseline (interpreter + numpy + jax + the traced model,
measured just before the port); `getrusage(RUSAGE_CHILDREN).ru_maxrss`, the largest over all
children, is printed as a cross-check. This process imports nothing heavy and generates the files in
a child: Linux carries a parent's RSS over into its children's ru_maxrss. Then
`vmz_jax.load(arch, checkpoint=ORBAX_DIR)` is timed in a fresh process (first call: with the model
trace) and again in the same process. Prints markdown tables: medians over `--repeats` runs, the
largest peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TARGET_MB_S = 300.0
TARGET_RSS_RATIO = 1.5

_GENERATE_CHILD = r"""
import pickle, struct, sys, time
from pathlib import Path
import numpy as np
from porting.caffe2_names import params_to_caffe2
from porting.convert import export_params
from vmz_jax.weights.checkpoint import expected_shapes, save


class Python2Pickler(pickle._Pickler):
    # pickles bytes the way Python 2 pickled str (BINSTRING), as Caffe2's snapshots are
    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes_as_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes_as_str


arch, directory = sys.argv[1], Path(sys.argv[2])
rng = np.random.default_rng(0)
params = {path: rng.standard_normal(shape, dtype=np.float32)
          for path, shape in expected_shapes(arch, 400).items()}
for name, fmt in [(f"{arch}.pth", "pth"), (f"{arch}.pkl", "py2"), (f"{arch}.py3.pkl", "pkl")]:
    path = directory / name
    if path.exists():
        continue
    t = time.perf_counter()
    if fmt == "py2":
        with open(path, "wb") as f:
            Python2Pickler(f, protocol=2).dump({"blobs": params_to_caffe2(params, arch)})
    else:
        export_params(params, arch, path, fmt)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.1f} s",
          file=sys.stderr)
if not (directory / f"{arch}.orbax").exists():
    save(directory / f"{arch}.orbax", params, {"arch": arch, "num_classes": 400})
"""

_PORT_CHILD = r"""
import json, re, sys, time
arch, path, warm = sys.argv[1], sys.argv[2], sys.argv[3] == "warm"


def hwm():  # this process's peak RSS
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


import jax, numpy as np
from porting.convert import read_params
from vmz_jax.weights.checkpoint import expected_shapes

if warm:
    expected_shapes(arch, 400)
base = hwm()
t = time.perf_counter()
params, info = read_params(path, arch, num_classes=400)
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "base": base, "peak": hwm(), "format": info.format}))
"""

_LOAD_CHILD = r"""
import json, sys, time
t = time.perf_counter()
import jax, numpy as np
import vmz_jax
imported = time.perf_counter() - t
arch, directory = sys.argv[1], sys.argv[2]
times = []
for _ in range(2):
    t = time.perf_counter()
    model = vmz_jax.load(arch, checkpoint=directory)
    jax.block_until_ready(model.fc.kernel.get_value())
    times.append(time.perf_counter() - t)
print(json.dumps({"import": imported, "first": times[0], "second": times[1],
                  "device": str(jax.devices()[0])}))
"""


def _child(script: str, *args: str) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                            env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    sys.stderr.write(result.stderr)
    lines = result.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def generate(arch: str, directory: Path) -> dict[str, Path]:
    _child(_GENERATE_CHILD, arch, str(directory))
    return {".pth (zip)": directory / f"{arch}.pth",
            ".pkl (Python 2, as released)": directory / f"{arch}.pkl",
            ".pkl (Python 3 protocol 2)": directory / f"{arch}.py3.pkl",
            "orbax": directory / f"{arch}.orbax"}


def bench_port(arch: str, path: Path, warm: bool, repeats: int) -> dict[str, float]:
    runs = [_child(_PORT_CHILD, arch, str(path), "warm" if warm else "cold") for _ in range(repeats)]
    size = path.stat().st_size
    seconds = statistics.median(r["seconds"] for r in runs)
    return {"size": size, "seconds": seconds, "mb_s": size / 1e6 / seconds,
            "peak": max(r["peak"] for r in runs), "base": statistics.median(r["base"] for r in runs),
            "above": max(r["peak"] - r["base"] for r in runs)}


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--arch", default="r2plus1d_152",
                        choices=["r2plus1d_152", "ip_csn_152", "ir_csn_152"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="generate (or reuse) the files in this directory")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        directory = args.keep or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        files = generate(args.arch, directory)
        rows = []
        for label, path in files.items():
            if label == "orbax":
                continue
            for warm in (True, False):
                result = bench_port(args.arch, path, warm, args.repeats)
                rows.append((label, "warm" if warm else "cold (+ model trace)", result))
                print(f"{label} {rows[-1][1]}: {result['seconds']:.2f} s", file=sys.stderr)
        loads = [_child(_LOAD_CHILD, args.arch, str(files["orbax"])) for _ in range(args.repeats)]
        orbax_mb = sum(p.stat().st_size for p in files["orbax"].rglob("*") if p.is_file()) / 1e6

    mb = 1e6
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n### Porting {args.arch} (400 classes): median of {args.repeats} fresh processes, "
          f"{os.cpu_count()} CPUs, load average {load}\n")
    print("| file | model shapes | size MB | read_params s | MB/s | peak RSS MB | baseline MB "
          "| above baseline MB | peak / size | above / size |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, kind, r in rows:
        print(f"| {label} | {kind} | {r['size'] / mb:.0f} | {r['seconds']:.2f} | {r['mb_s']:.0f} "
              f"| {r['peak'] / mb:.0f} | {r['base'] / mb:.0f} | {r['above'] / mb:.0f} "
              f"| {r['peak'] / r['size']:.2f} | {r['above'] / r['size']:.2f} |")
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / mb
    print(f"\nTargets: >= {TARGET_MB_S:.0f} MB/s, peak RSS <= {TARGET_RSS_RATIO}x the file size. "
          f"getrusage(RUSAGE_CHILDREN).ru_maxrss, largest child (the generator included): {children:.0f} MB.")
    print(f"\n### vmz_jax.load({args.arch!r}, checkpoint=ORBAX_DIR) ({orbax_mb:.0f} MB): median of "
          f"{args.repeats} processes, device {loads[0]['device']}\n")
    print("| import vmz_jax s | first load s (incl. model trace) | second load s (same process) |")
    print("|---:|---:|---:|")
    print(f"| {statistics.median(x['import'] for x in loads):.2f} "
          f"| {statistics.median(x['first'] for x in loads):.2f} "
          f"| {statistics.median(x['second'] for x in loads):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
