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
