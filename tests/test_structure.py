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
from conftest import REPO, TINY_FLAGS, assert_same_run

SCRIPTS = ["td3_c.py", "aca.py", "off2on_balanced.py", "bred.py"]


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


def test_common_modules_import_each_other_without_a_cycle():
    """No module of common/ reaches itself through its imports (lazy ones included): each can be
    read, copied and tested on its own."""
    graph = {}
    for path in sorted((REPO / "common").glob("*.py")):
        mods = {m.split(".")[1] for m in imported_modules(path) if m.startswith("common.")}
        graph[path.stem] = mods
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            mod = todo.pop()
            assert mod != start, f"common/{start}.py imports itself through {sorted(seen)}"
            if mod not in seen:
                seen.add(mod)
                todo += graph.get(mod, ())


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_algorithm_file_copied_out_with_common_runs(script, tmp_path, tiny_root, tiny_run):
    """Copied out with common/ beside it (no repository, no PYTHONPATH), the file runs its tiny
    budget to the same parameters as in the repository (the same programs, compiled once)."""
    project = tmp_path / "my_project"
    project.mkdir()
    shutil.copy(REPO / "algorithms" / script, project / script)
    shutil.copytree(
        REPO / "common", project / "common", ignore=shutil.ignore_patterns("__pycache__")
    )
    name = script.removesuffix(".py")
    proc = subprocess.run(
        [sys.executable, script, *TINY_FLAGS[name], "--run-dir", "run"],
        cwd=project, capture_output=True, text=True, timeout=600,
        env={**os.environ, "MINARI_DATASETS_PATH": str(tiny_root), "PYTHONPATH": ""},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((project / "run" / "summary.json").read_text())
    assert summary["env"] == "hopper-medium-v2"
    assert sorted(p.name for p in project.iterdir()) == sorted(["common", "run", script])
    assert_same_run(tiny_run(name).dir, project / "run")
