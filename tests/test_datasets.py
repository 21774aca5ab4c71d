import os
import pathlib
import subprocess
import sys

import minari
import numpy as np
import pytest

from common import datasets
from common.datasets import (
    D4RL_REF_SCORES,
    DatasetError,
    load_d4rl,
    make_tiny_dataset,
    normalized_score,
)

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_transitions_are_right_across_episode_boundaries(minari_env):
    data = load_d4rl("hopper-medium-v2", verbose=False)
    t = {k: np.asarray(v) for k, v in data.transitions.items()}
    ids = data.episode_ids
    raw = list(minari.MinariDataset(minari_env / "o2o/hopper/medium-v0/data").iterate_episodes())
    assert len(raw) == data.info.num_episodes and len(ids) == sum(len(e.rewards) for e in raw)

    same_episode = ids[1:] == ids[:-1]
    # Inside an episode, s'_t is s_{t+1}; and no flag is set before the episode's last step.
    np.testing.assert_array_equal(
        t["next_observations"][:-1][same_episode], t["observations"][1:][same_episode]
    )
    ends = np.flatnonzero(np.append(~same_episode, True))
    assert not t["terminals"][np.setdiff1d(np.arange(len(ids)), ends)].any()
    assert not t["timeouts"][np.setdiff1d(np.arange(len(ids)), ends)].any()
    for episode, end in zip(raw, ends, strict=True):
        # At the last step s' is the episode's own final observation, not the next reset.
        np.testing.assert_allclose(t["next_observations"][end], episode.observations[-1], rtol=1e-6)
        length = len(episode.rewards)
        assert t["terminals"][end] + t["timeouts"][end] == 1  # exactly one, never both
        # Timeouts come only from the 30-step time limit (or the budget cut of the last episode).
        if t["timeouts"][end]:
            assert length == 30 or end == len(ids) - 1
        elif length == 30:
            assert t["terminals"][end] == 1  # fell on the very last allowed step
    assert t["timeouts"].sum() >= 2 and t["terminals"].sum() >= 2  # both kinds occur


def test_normalized_score_of_reference_returns_is_0_and_100(minari_env):
    for env, (low, high) in D4RL_REF_SCORES.items():
        assert normalized_score(env, low) == pytest.approx(0.0)
        assert normalized_score(env, high) == pytest.approx(100.0)
    dataset = minari.MinariDataset(minari_env / "o2o/hopper/medium-v0/data")
    returns = np.array([-20.272305, 500.0, 3234.3])
    np.testing.assert_allclose(
        100 * minari.get_normalized_score(dataset, returns), normalized_score("hopper", returns)
    )


def test_unknown_name_is_a_one_line_error_listing_known_names():
    proc = subprocess.run(
        [sys.executable, "-m", "common.dataset_cli", "info", "hopper-mediocre-v2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "hopper-mediocre-v2" in lines[0]
    assert all(name in lines[0] for name in ("hopper-medium-v2", "walker2d-medium-replay-v2"))
    with pytest.raises(DatasetError, match="known names"):
        datasets.parse_name("humanoid-medium-v2")


def test_missing_dataset_error_names_the_generate_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    with pytest.raises(DatasetError, match="make datasets ENV=walker2d"):
        load_d4rl("walker2d-medium-replay-v2", allow_generate=False)
    # Generation allowed but impossible (no behaviour policy for this env): a clear error too.
    from common import d4rl_recipe  # the generator (was benchmarks/make_datasets.py, #19)

    monkeypatch.setattr(d4rl_recipe, "POLICY_DIR", tmp_path / "no-policies")
    with pytest.raises(DatasetError, match="no behaviour policies for 'walker2d'"):
        load_d4rl("walker2d-medium-replay-v2")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_official_dataset_takes_precedence_over_generated(minari_env, monkeypatch, tmp_path):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    make_tiny_dataset(tmp_path, "hopper-expert-v2", num_steps=200, max_episode_steps=20)
    assert datasets.resolve("hopper-expert-v2") == ("o2o/hopper/expert-v0", "generated")
    official = tmp_path / "mujoco/hopper/expert-v0"
    official.parent.mkdir(parents=True)
    (tmp_path / "o2o/hopper/expert-v0").rename(official)
    make_tiny_dataset(tmp_path, "hopper-expert-v2", num_steps=200, max_episode_steps=20)
    assert datasets.resolve("hopper-expert-v2") == ("mujoco/hopper/expert-v0", "official")


def test_interrupted_write_leaves_nothing_behind(tmp_path):
    bad = [
        {
            "observations": np.zeros((3, 11)),
            "actions": np.zeros((2, 3)),
            "rewards": [0.0, 0.0],
            "terminations": [False, False],
            "truncations": [False, True],
        },
        {"observations": None},
    ]  # malformed second episode: the write fails half-way
    with pytest.raises(KeyError):  # raised after the storage files were created
        datasets.write_minari_dataset("o2o/hopper/medium-v0", bad, "Hopper-v5", {}, root=tmp_path)
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == []


def test_observation_stats_normalise(minari_env):
    data = load_d4rl("hopper-medium-v2", verbose=False)
    mean, std = datasets.observation_stats(data.transitions["observations"])
    normed = np.asarray(
        datasets.normalize_observations(data.transitions["observations"], mean, std)
    )
    np.testing.assert_allclose(normed.mean(0), 0, atol=1e-4)
    assert np.all(normed.std(0) <= 1.0 + 1e-4) and np.all(normed.std(0) > 0.5)
    scale = datasets.return_range_reward_scale(data)
    returns = data.episode_returns * scale
    assert returns.max() - returns.min() == pytest.approx(1000.0)


def test_info_cli_prints_which_dataset_was_used(minari_env):
    proc = subprocess.run(
        [sys.executable, "-m", "common.dataset_cli", "info", "hopper-medium-v2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ},
    )
    assert proc.returncode == 0, proc.stderr
    assert "o2o/hopper/medium-v0 [generated]: 2000 transitions" in proc.stdout


def test_flat_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    import h5py

    make_tiny_dataset(tmp_path, "hopper-medium-v2", num_steps=300, max_episode_steps=50)
    path = tmp_path / "o2o/hopper/medium-v0"
    first, _ = datasets.read_episodes(path)
    assert (path / "o2o_flat_cache.npz").exists()

    def no_reading(self, *args, **kwargs):
        raise AssertionError("episodes were re-read despite a valid cache")

    monkeypatch.setattr(minari.MinariDataset, "iterate_episodes", no_reading)
    cached, _ = datasets.read_episodes(path)
    for key in first:
        np.testing.assert_array_equal(first[key], cached[key])
    with h5py.File(path / "data/main_data.hdf5", "a") as f:  # the dataset changes on disk
        f["episode_0/rewards"][0] = 123.0
    monkeypatch.undo()
    changed, _ = datasets.read_episodes(path)
    assert changed["rewards"][0] == 123.0


def test_a_relative_root_works(tmp_path, monkeypatch):
    """Minari's storage mis-joins relative paths; the writer makes the root absolute."""
    monkeypatch.chdir(tmp_path)
    dataset_id = make_tiny_dataset(pathlib.Path("rel"), "walker2d-random-v2", num_steps=200)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "rel"))
    data = datasets.load_d4rl("walker2d-random-v2", allow_download=False, allow_generate=False)
    assert data.info.minari_id == dataset_id and data.info.num_transitions == 200


def test_pretrained_data_note_compares_the_manifests_dataset_checksum(tmp_path):
    """--offline-checkpoint with a manifest beside it: a note when the loaded transitions'
    float32 bytes (TRANSITION_KEYS order; hashed here with hashlib) differ from the manifest's."""
    import hashlib
    import json

    rng = np.random.default_rng(0)
    sizes = {"observations": 3, "actions": 2, "rewards": 0, "next_observations": 3,
             "terminals": 0, "timeouts": 0}  # fmt: skip
    data = {k: rng.normal(size=(5, d) if d else 5) for k, d in sizes.items()}
    digest = hashlib.sha256()
    for key in ("observations", "actions", "rewards", "next_observations", "terminals",
                "timeouts"):  # fmt: skip
        digest.update(data[key].astype(np.float32).tobytes())
    ensemble = tmp_path / "ensemble.npz"
    assert datasets.pretrained_data_note(ensemble, data) is None  # no manifest: nothing to say
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"dataset_transitions_sha256": digest.hexdigest()}))
    assert datasets.pretrained_data_note(ensemble, data) is None
    changed = {**data, "rewards": data["rewards"] + 1e-3}
    note = datasets.pretrained_data_note(ensemble, changed)
    assert note.startswith("note:") and "\n" not in note
    assert digest.hexdigest()[:12] in note and str(ensemble) in note


@pytest.mark.parametrize("script", ["td3_c", "off2on_balanced", "bred", "aca"])
def test_runs_record_their_datasets_bytes(script, minari_env, tiny_run):
    """A dataset generated on another machine follows the same recipe, not the same bytes: the
    loader gives the sha256 of the transitions' float32 bytes (recomputed here key by key) and
    every run's summary.json records it."""
    import hashlib
    import json

    data = load_d4rl("hopper-medium-v2", verbose=False)
    digest = hashlib.sha256()
    for key in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts"):
        digest.update(np.asarray(data.transitions[key], np.float32).tobytes())
    assert data.info.transitions_sha256 == digest.hexdigest()
    summary = json.loads((tiny_run(script).dir / "summary.json").read_text())
    assert summary["dataset_sha256"] == digest.hexdigest()
