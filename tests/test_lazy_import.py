"""`import vmz_jax` is cheap, and every subpackage and public function is reachable from it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# What a bare `import vmz_jax` must not load: the heavy third-party libraries and our own subpackages.
HEAVY = ("jax", "flax", "optax", "numpy", "torch", "orbax", "imageio_ffmpeg", "matplotlib", "tqdm",
         "vmz_jax.models", "vmz_jax.train", "vmz_jax.video", "vmz_jax.weights", "vmz_jax.export",
         "vmz_jax.evaluation", "vmz_jax.compare")


def run_python(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bare_import_loads_nothing_heavy():
    loaded = run_python("""
        import json, sys
        import vmz_jax
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in
                                {"jax", "flax", "optax", "numpy", "torch", "orbax", "imageio_ffmpeg",
                                 "matplotlib", "tqdm"} or m.startswith("vmz_jax."))))
    """)
    assert not [m for m in loaded if m in HEAVY or m.split(".")[0] in HEAVY], loaded
    assert set(loaded) <= {"vmz_jax.errors", "vmz_jax.lazy", "vmz_jax.version"}, loaded


def test_subpackages_and_functions_reachable_from_bare_import():
    found = run_python("""
        import json, types
        import vmz_jax
        names = {
            "train.train_step": vmz_jax.train.train_step,
            "train.make_optimizer": vmz_jax.train.make_optimizer,
            "video.pipeline.run": vmz_jax.video.pipeline.run,
            "weights.checkpoint": vmz_jax.weights.checkpoint,
            "models.forward.make_forward": vmz_jax.models.forward.make_forward,
            "runtime.reuse_host_memory": vmz_jax.runtime.reuse_host_memory,
            "export.load": vmz_jax.export.load,
            "evaluation": vmz_jax.evaluation,
            "load": vmz_jax.load, "save": vmz_jax.save, "evaluate": vmz_jax.evaluate,
            "list_pretrainings": vmz_jax.list_pretrainings,
        }
        import vmz_jax.compare  # the submodule named like the function must not shadow it
        names["compare"] = vmz_jax.compare
        try:
            vmz_jax.no_such_thing
            missing = "no error"
        except AttributeError as e:
            missing = str(e)
        print(json.dumps({
            "kinds": {k: type(v).__name__ for k, v in names.items()},
            "export_callable": callable(vmz_jax.export),
            "archs": len(vmz_jax.list_models()),
            "missing": missing,
            "dir": "train" in dir(vmz_jax) and "load" in dir(vmz_jax),
        }))
    """)
    kinds = found["kinds"]
    assert kinds["weights.checkpoint"] == kinds["evaluation"] == "module"
    assert all(kind == "function" for name, kind in kinds.items() if name not in
               ("weights.checkpoint", "evaluation")), kinds
    assert found["export_callable"] and found["archs"] > 10 and found["dir"]
    assert found["missing"] == "module 'vmz_jax' has no attribute 'no_such_thing'"


def test_compare_stays_the_function_when_its_module_is_imported_first():
    kind = run_python("""
        import json
        from vmz_jax.compare import compare as direct
        import vmz_jax
        print(json.dumps([type(vmz_jax.compare).__name__, vmz_jax.compare is direct]))
    """)
    assert kind == ["function", True]
