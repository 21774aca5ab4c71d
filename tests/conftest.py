import os
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Tests never touch the network (the Minari hub).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """A Minari root holding a tiny generated `hopper-medium-v2` (30-step time limit, so both
    terminations and truncations occur)."""
    from common.datasets import make_tiny_dataset

    root = tmp_path_factory.mktemp("minari")
    make_tiny_dataset(root, "hopper-medium-v2", num_steps=2000, max_episode_steps=30, seed=0)
    return root


@pytest.fixture
def minari_env(tiny_root, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tiny_root))
    return tiny_root


def run_script(script: str, args: list, run_dir, minari_root, *extra, ok: bool = True):
    """Run `algorithms/<script>` as a user would, on the tiny datasets; asserts success unless
    `ok` is False. Returns the CompletedProcess."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, f"algorithms/{script}", *args, "--run-dir", str(run_dir), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "MINARI_DATASETS_PATH": str(minari_root)},
    )
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_same_run(a: pathlib.Path, b: pathlib.Path):
    """Two runs ended with bit-identical checkpoints and logged the same steps."""
    import json

    import numpy as np

    with np.load(a / "checkpoint.npz") as x, np.load(b / "checkpoint.npz") as y:
        assert x.files == y.files
        for k in x.files:
            if k != "__metadata__":
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)

    def steps(d):
        return [json.loads(line)["step"] for line in (d / "metrics.jsonl").read_text().splitlines()]

    assert steps(a) == steps(b)
