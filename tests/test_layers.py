"""The import-linter contracts in pyproject.toml hold on this tree and catch the imports they forbid.

`lint-imports` runs on a copy of the packages, so that the violating edits never touch the checkout
(and the copy, first on the path, is what the editable install would otherwise shadow).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"


def lint_imports(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LINT_IMPORTS, "--no-cache", "--no-logo", "pyproject.toml"], cwd=directory,
                          capture_output=True, text=True, timeout=120)


def copy_tree(tmp_path: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "data")
    for package in ("vmz_jax", "porting"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


def test_contracts_hold_and_catch_upward_and_reference_imports(tmp_path):
    tree = copy_tree(tmp_path)
    clean = lint_imports(tree)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "0 broken" in clean.stdout

    append(tree / "vmz_jax" / "models" / "conv.py", "import vmz_jax.video  # noqa: E402")
    append(tree / "vmz_jax" / "reference" / "vmz_torch.py", "from vmz_jax.models import build  # noqa")
    broken = lint_imports(tree)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "vmz_jax.models is not allowed to import vmz_jax.video" in broken.stdout
    assert "vmz_jax.reference is not allowed to import vmz_jax.models" in broken.stdout
    assert "2 broken" in broken.stdout


def test_reference_imports_nothing_of_ours_but_the_error_type():
    """Drift-proof companion of the forbidden contract (which lists modules by name): whatever is
    added to vmz_jax later, the reference reaches, directly or not, only vmz_jax.errors."""
    graph = grimp.build_graph("vmz_jax", "porting", cache_dir=None)
    reached = graph.find_upstream_modules("vmz_jax.reference", as_package=True)
    assert reached == {"vmz_jax.errors"}, sorted(reached)
