"""Every algorithm's `--help` documents every flag (tyro builds it from the Args docstrings)."""

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

SCRIPTS = ["off2on_balanced.py", "bred.py", "td3_c.py", "aca.py", "sac.py"]


def flag_help(script: str) -> dict[str, str]:
    """--flag -> its help text, from the rendered `--help` (wide terminal, one box)."""
    out = subprocess.run(
        [sys.executable, f"algorithms/{script}", "--help"],
        cwd=REPO, capture_output=True, text=True, check=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout  # fmt: skip
    flags, current = {}, None
    for line in out.splitlines():
        body = line.strip("│ ").rstrip()
        match = re.match(r"^(--[a-z0-9-]+)(?: \S+)?\s*(.*)$", body)
        if match and line.startswith("│ --"):
            current = match.group(1)
            flags[current] = match.group(2)
        elif current and line.startswith("│   "):
            flags[current] += " " + body
    flags.pop("--help", None)
    return flags


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_documents_every_flag(script):
    flags = flag_help(script)
    assert len(flags) >= 15 and "--env" in flags and "--seed" in flags
    bare = [f for f, text in flags.items() if not re.sub(r"\(default: [^)]*\)", "", text).strip()]
    assert not bare, f"{script}: flags without a description: {bare}"


BENCHMARK_SCRIPTS = sorted(
    path.relative_to(REPO).with_suffix("").as_posix().replace("/", ".")
    for path in [*(REPO / "benchmarks").glob("*.py"), *(REPO / "studies").glob("*/*.py")]
    if 'if __name__ == "__main__":' in path.read_text()
)


@pytest.mark.parametrize("module", BENCHMARK_SCRIPTS)
@pytest.mark.filterwarnings("ignore:.*found in sys.modules after import:RuntimeWarning")
def test_benchmark_help_prints_usage(module, monkeypatch, capsys):
    """`python -m benchmarks.<module> --help` (and each study's script) prints its usage and
    exits 0 (argparse formats every help string only here: a bare % in one once made `report
    --help` a traceback)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [module.replace(".", "/") + ".py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(module, run_name="__main__")
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
