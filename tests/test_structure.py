"""The layering the project promises: `common/` imports nothing from `algorithms/` or
`benchmarks/`, and an algorithm file copied out with `common/` beside it still runs."""

import ast
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

TINY_FLAGS = ["--hidden-dims", "16", "16", "--batch-size", "16", "--no-generate"]
# No offline phase (fine-tuning from the initial networks): the point is that it runs at all.
OFFLINE = ["--offline-steps", "0", "--log-every", "100", "--offline-eval-every", "100"]
ENSEMBLE = ["--ensemble-size", "2", "--bc-steps", "50", "--steps-per-epoch", "100",
            "--first-epoch-multiplier", "1", "--online-steps", "100"]  # fmt: skip
RUNS = {
    "td3_c.py": [*TINY_FLAGS, *OFFLINE, "--online-steps", "100", "--eval-every", "100"],
    "aca.py": [*TINY_FLAGS, *OFFLINE, "--online-steps", "100", "--eval-every", "100"],
    "off2on_balanced.py": [*TINY_FLAGS, *OFFLINE, *ENSEMBLE, "--auroc-samples", "10"],
    "bred.py": [
        *TINY_FLAGS,
        *OFFLINE,
        *ENSEMBLE,
        "--distill-epochs",
        "2",
        "--distill-steps-per-epoch",
        "10",
        "--anneal-steps",
        "100",
    ],  # fmt: skip
}


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_common_imports_nothing_from_algorithms_or_benchmarks():
    files = sorted((REPO / "common").glob("*.py"))
    assert len(files) >= 10
    for path in files:
        above = {
            m for m in imported_modules(path) if m.split(".")[0] in ("algorithms", "benchmarks")
        }
        assert not above, f"common/{path.name} imports {sorted(above)}"


@pytest.mark.parametrize("script", sorted(RUNS))
def test_an_algorithm_file_copied_out_with_common_runs(script, tmp_path, tiny_root):
    project = tmp_path / "my_project"
    project.mkdir()
    shutil.copy(REPO / "algorithms" / script, project / script)
    shutil.copytree(
        REPO / "common", project / "common", ignore=shutil.ignore_patterns("__pycache__")
    )
    proc = subprocess.run(
        [sys.executable, script, "--env", "hopper-medium-v2", *RUNS[script], "--eval-episodes",
         "1", "--checkpoint-every", "100", "--run-dir", "run"],
        cwd=project, capture_output=True, text=True, timeout=600,
        env={**os.environ, "MINARI_DATASETS_PATH": str(tiny_root), "PYTHONPATH": ""},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((project / "run" / "summary.json").read_text())
    assert summary["env"] == "hopper-medium-v2"
    assert sorted(p.name for p in project.iterdir()) == sorted(["common", "run", script])
