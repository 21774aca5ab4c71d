"""Blocks shared verbatim between algorithm files (each file stays self-contained)."""

import pathlib
import re

ALGORITHMS = pathlib.Path(__file__).resolve().parents[1] / "algorithms"


def shared_block(path: pathlib.Path, name: str) -> str:
    text = path.read_text()
    match = re.search(
        rf"# ==== BEGIN SHARED BLOCK: {re.escape(name)} =+\n(.*?)# ==== END SHARED BLOCK",
        text,
        re.S,
    )
    assert match, f"{path.name} has no shared block {name!r}"
    return match.group(1)


def test_cql_pretraining_block_is_identical_in_off2on_and_bred():
    a = shared_block(ALGORITHMS / "off2on_balanced.py", "CQL ensemble pretraining")
    b = shared_block(ALGORITHMS / "bred.py", "CQL ensemble pretraining")
    assert "def make_cql_update" in a and "def pretrain_cql_ensemble" in a
    assert a == b, "the CQL pretraining blocks of off2on_balanced.py and bred.py differ"
