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
