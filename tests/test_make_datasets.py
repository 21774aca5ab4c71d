"""The D4RL-recipe generator, on tiny sizes, with stand-in behaviour policies."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import h5py
import jax
import jax.numpy as jnp
import minari
import numpy as np
import pytest

from benchmarks import export_behaviour, make_datasets
from common import d4rl_recipe, datasets
from common.checkpoints import save_checkpoint
from common.networks import TanhGaussianPolicy

REPO = pathlib.Path(__file__).resolve().parents[1]


def fake_buffer(num_steps: int, seed: int = 0) -> dict:
    """A SAC-like replay buffer: episodes of a random policy in insertion order, flat arrays."""
    episodes = datasets.rollout_episodes(
        "Hopper-v5", lambda o, rng: rng.uniform(-1, 1, 3), num_steps, seed, max_episode_steps=40
    )
    buf = {
        k: []
        for k in (
            "observations",
            "actions",
            "rewards",
            "next_observations",
            "terminals",
            "timeouts",
        )
    }
    for ep in episodes:
        buf["observations"].append(ep["observations"][:-1])
        buf["next_observations"].append(ep["observations"][1:])
        buf["actions"].append(ep["actions"])
        buf["rewards"].append(ep["rewards"])
        buf["terminals"].append(ep["terminations"])
        buf["timeouts"].append(ep["truncations"])
    return {k: np.concatenate(v).astype(np.float32) for k, v in buf.items()}


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """Stand-in behaviour policies (random-init actors) with a manifest and a replay buffer."""
    root = tmp_path_factory.mktemp("policies")
    out = root / "hopper"
    out.mkdir()
    actor = TanhGaussianPolicy(3, (32, 32))
    for i, name in enumerate(("medium", "expert")):
        params = actor.init(jax.random.PRNGKey(10 + i), jnp.zeros((1, 11)))
        save_checkpoint(out / f"{name}.npz", {"params": params}, {"step": 1000 * (i + 1)})
    replay = export_behaviour.replay_prefix_as_episodes(fake_buffer(500), 500)
    np.savez_compressed(out / "medium_replay.npz", **replay)
    manifest = {
        "policies": {
            name: {"file": f"{name}.npz", "hidden_dims": [32, 32], "sac_step": 1000}
            for name in ("medium", "expert")
        },
        "medium_replay": {"file": "medium_replay.npz", "sac_steps": 500},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def generated(policy_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("minari_gen")
    patch = pytest.MonkeyPatch()
    patch.setattr(d4rl_recipe, "POLICY_DIR", policy_dir)  # the generator's home since #19
    summaries = {
        split: make_datasets.generate("hopper", split, 400, 4, 0, root, overwrite=False)
        for split in ("random", "medium", "expert", "medium-replay", "medium-expert")
    }
    patch.undo()
    return root, summaries


def test_generator_writes_valid_minari_datasets(generated):
    root, summaries = generated
    for split in datasets.SPLITS:
        path = root / "o2o/hopper" / f"{split}-v0"
        problems, stats = datasets.verify_dataset(path, "hopper")
        assert problems == [], (split, problems)
        dataset = minari.MinariDataset(path / "data")
        meta = dataset.storage.metadata
        assert meta["d4rl_name"] == f"hopper-{split}-v2"
        assert "o2o-jax" in meta["project_version"] and "behaviour_return" in meta
        assert meta["behaviour_return"] == pytest.approx(stats["return_mean"])
        # Minari's normalisation and the project's agree (Minari's is a fraction, ours percent).
        np.testing.assert_allclose(
            100 * minari.get_normalized_score(dataset, np.array([meta["behaviour_return"]])),
            datasets.normalized_score("hopper", meta["behaviour_return"]),
        )
    assert summaries["random"]["num_transitions"] == 400
    assert summaries["medium-replay"]["num_transitions"] == 500
    assert summaries["medium-expert"]["num_transitions"] == 800


def test_generated_flags_separate_truncation_from_termination(generated):
    root, _ = generated
    dataset = minari.MinariDataset(root / "o2o/hopper/expert-v0/data")
    quota_cuts = 0
    for ep in dataset.iterate_episodes():
        assert not (ep.terminations[-1] and ep.truncations[-1])
        assert not (ep.terminations[:-1].any() or ep.truncations[:-1].any())
        if ep.truncations[-1]:
            quota_cuts += 1  # 100-step quota per env: the cut is a truncation, not a fall
        else:
            assert ep.terminations[-1]
    # At most one cut episode per lockstep env (fewer if an env fell exactly at its quota).
    assert 1 <= quota_cuts <= 4


def test_replay_export_splits_episodes_at_flags_and_restarts():
    buf = fake_buffer(300, seed=1)
    # Simulate a resumed SAC run: the env restarted in the middle of an episode at step 150.
    assert not (buf["terminals"][149] or buf["timeouts"][149])
    buf["observations"][150] += 1.0
    episodes = export_behaviour.replay_prefix_as_episodes(buf, 300)
    ends = np.cumsum(episodes["episode_lengths"]) - 1
    assert 149 in ends  # the restart became an episode boundary...
    assert episodes["truncations"][149] and not episodes["terminations"][149]  # ...a truncation
    assert episodes["episode_lengths"].sum() == 300
    assert len(episodes["observations"]) == 300 + len(episodes["episode_lengths"])
    # Within an episode the stored observations are the buffer's s_t, and the extra one is s'_T.
    np.testing.assert_array_equal(episodes["observations"][:10], buf["observations"][:10])


def test_missing_dataset_is_generated_on_first_use(policy_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    monkeypatch.setattr(d4rl_recipe, "POLICY_DIR", policy_dir)
    monkeypatch.setattr(datasets, "AUTO_GENERATE_STEPS", 200)
    with pytest.raises(datasets.DatasetError, match="make datasets ENV=hopper"):
        datasets.load_d4rl("hopper-medium-v2", allow_generate=False)
    data = datasets.load_d4rl("hopper-medium-v2")
    out = capsys.readouterr().out
    assert "generating it now" in out and "o2o/hopper/medium-v0 [generated]: 200 transitions" in out
    assert data.info.num_transitions == 200


def run_verify(root, name):
    return subprocess.run(
        [sys.executable, "-m", "common.dataset_cli", "verify", name],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "MINARI_DATASETS_PATH": str(root)},
    )


def test_verify_fails_on_a_damaged_dataset(generated, tmp_path):
    root, _ = generated
    assert run_verify(root, "hopper-medium-v2").returncode == 0
    import shutil

    for damage in ("nan", "bytes", "episode"):
        copy = tmp_path / damage
        shutil.copytree(root / "o2o/hopper/medium-v0", copy / "o2o/hopper/medium-v0")
        h5 = copy / "o2o/hopper/medium-v0/data/main_data.hdf5"
        if damage == "nan":
            with h5py.File(h5, "a") as f:
                f["episode_1/observations"][3, 2] = np.nan
            expect = "non-finite observations"
        elif damage == "bytes":
            raw = bytearray(h5.read_bytes())
            raw[: len(raw) // 2] = bytes(len(raw) // 2)  # wipe the header and half the file
            h5.write_bytes(bytes(raw))
            expect = "cannot read"
        else:
            with h5py.File(h5, "a") as f:
                del f["episode_2/truncations"]
                f["episode_2/truncations"] = np.zeros(len(f["episode_2/rewards"]), bool)
                f["episode_2/terminations"][...] = False
            expect = "neither terminated nor truncated"
        proc = run_verify(copy, "o2o/hopper/medium-v0")
        assert proc.returncode == 1, damage
        assert expect in proc.stderr and "is damaged" in proc.stderr, (damage, proc.stderr)


def test_reference_table_names_each_datasets_seed_and_checksum(generated, monkeypatch):
    """The reference table's checksum of each split is that of the transitions a run loads (the
    sum the pretrained manifests record), its seed the recipe's, its counts the dataset's."""
    root, summaries = generated
    text, rows = make_datasets.dataset_table(root)
    by_name = {r["name"]: r for r in rows}
    assert sorted(by_name) == sorted(f"hopper-{s}-v2" for s in summaries)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    for split in ("random", "medium-expert"):
        row = by_name[f"hopper-{split}-v2"]
        data = datasets.load_d4rl(f"hopper-{split}-v2", allow_download=False, verbose=False)
        # the checksum's definition, recomputed: float32 bytes of each transition array in turn
        expect = hashlib.sha256()
        keys = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")
        for key in keys:
            expect.update(np.asarray(data.transitions[key], np.float32).tobytes())
        assert row["transitions_sha256"] == expect.hexdigest()
        assert row["generation_seed"] == 0 and row["transitions"] == data.info.num_transitions
        assert f"`{expect.hexdigest()}`" in text.splitlines()[2 + list(by_name).index(row["name"])]


def test_committed_reference_table_matches_the_pretrained_agents_data():
    """benchmarks/results/datasets.json and every committed agent's manifest name the same
    transitions for the same dataset: an agent's score is comparable with the table's."""
    table = {
        r["name"]: r for r in json.loads((REPO / "benchmarks/results/datasets.json").read_text())
    }
    manifests = sorted((REPO / "pretrained").glob("*/*/manifest.json"))
    assert manifests
    for path in manifests:
        manifest = json.loads(path.read_text())
        row = table[manifest["dataset"]]
        assert row["minari_id"] == manifest["dataset_minari_id"], path
        assert row["transitions_sha256"] == manifest["dataset_transitions_sha256"], path
