"""Exported pretrained CQL ensembles (benchmarks/export_pretrained.py): what they hold, that both
algorithm files load them as the run's own offline checkpoint, and the one-line errors."""

import hashlib
import importlib
import json
import os
import pathlib

import jax
import numpy as np
import pytest
from conftest import TINY_FLAGS, run_script

from algorithms import off2on_balanced as o2o
from benchmarks import export_pretrained
from common.checkpoints import CheckpointError

REPO = pathlib.Path(__file__).resolve().parents[1]


def members_of(n, hidden=(32, 32), obs_dim=11, action_dim=3):
    args = o2o.Args(ensemble_size=n, hidden_dims=hidden)
    actor, critic = o2o.TanhGaussianPolicy(action_dim, hidden), o2o.Critic(hidden)
    return o2o.create_cql_members(args, actor, critic, obs_dim, action_dim, jax.random.PRNGKey(9))


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_export_holds_the_ensemble_and_both_files_load_it(
    tiny_root, tmp_path, monkeypatch, tiny_run
):
    run_dir = tiny_run("off2on_balanced").dir  # read only: the export writes under --out
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tiny_root))
    out = tmp_path / "pretrained"
    assert export_pretrained.main([str(run_dir), "--out", str(out)]) == 0
    ensemble = out / "ensemble.npz"
    manifest = json.loads((out / "manifest.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert manifest["dataset"] == "hopper-medium-v2" and manifest["ensemble_size"] == 2
    assert manifest["offline_steps"] == 200 and manifest["hidden_dims"] == [32, 32]
    assert manifest["normalized_score"] == summary["normalized_score_before_finetuning"]
    assert manifest["ensemble_sha256"] == hashlib.sha256(ensemble.read_bytes()).hexdigest()
    assert (
        len(manifest["dataset_transitions_sha256"]) == 64
        and "--online-steps 0" in (manifest["recreate"])
    )
    with np.load(ensemble) as stored:  # parameters only: no optimizer, temperature, key
        assert not any(k for k in stored.files if "opt_state" in k or "alpha" in k)
        assert ensemble.stat().st_size < 0.6 * (run_dir / "offline.npz").stat().st_size

    offline = run_dir / "offline.npz"
    full = o2o.load_offline_ensemble(offline, members_of(2), "hopper-medium-v2", 11, 3)
    mine = o2o.load_offline_ensemble(ensemble, members_of(2), "hopper-medium-v2", 11, 3)
    for a, b in zip(leaves((mine.actor.params, mine.critic.params, mine.critic_target)),
                    leaves((full.actor.params, full.critic.params, full.critic.params)),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)
    # N=1 from an N=2 export: member 0, an independently trained CQL agent
    one = o2o.load_offline_ensemble(ensemble, members_of(1), "hopper-medium-v2", 11, 3)
    for a, b in zip(leaves(one.actor.params), leaves(full.actor.params), strict=True):
        np.testing.assert_array_equal(a[0], b[0])

    with pytest.raises(
        CheckpointError, match="pretrained on hopper-medium-v2, not walker2d-medium-v2"
    ):
        o2o.load_offline_ensemble(ensemble, members_of(2), "walker2d-medium-v2", 11, 3)
    with pytest.raises(CheckpointError, match="holds 2 members, fewer than --ensemble-size 3"):
        o2o.load_offline_ensemble(ensemble, members_of(3), "hopper-medium-v2", 11, 3)
    with pytest.raises(CheckpointError, match="does not fit this run.*hidden dims \\[32, 32\\]"):
        o2o.load_offline_ensemble(ensemble, members_of(2, (16, 16)), "hopper-medium-v2", 11, 3)

    # BRED fine-tunes from it as from the run's own offline.npz (no offline phase logged)
    bred_dir = tmp_path / "bred"
    proc = run_script(
        "bred.py", TINY_FLAGS["bred"], bred_dir, tiny_root, "--offline-checkpoint", str(ensemble),
        "--online-steps", "100", "--steps-per-epoch", "100",
    )  # fmt: skip
    assert "offline ensemble loaded from" in proc.stdout
    rows = [json.loads(x) for x in (bred_dir / "metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith("offline/") for r in rows for k in r)


def test_export_of_a_run_without_an_offline_phase_is_a_one_line_error(tmp_path, capsys):
    assert export_pretrained.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "offline.npz does not exist" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


COMMITTED = sorted((REPO / "pretrained").glob("*/*/manifest.json"))


def stored_file(manifest_path) -> str:
    return json.loads(manifest_path.read_text())["file"]  # every manifest names its file


ENSEMBLES = [p for p in COMMITTED if stored_file(p) == "ensemble.npz"]


@pytest.mark.parametrize("manifest_path", ENSEMBLES, ids=lambda p: p.parent.name)
def test_committed_ensembles_match_their_manifests_and_load(manifest_path):
    """Every ensemble under pretrained/ is the file its manifest names (sha256), has the
    manifest's shapes, and loads into a run of the manifest's dataset, sizes and members."""
    folder = manifest_path.parent
    manifest = json.loads(manifest_path.read_text())
    ensemble = folder / "ensemble.npz"
    assert manifest["ensemble_sha256"] == hashlib.sha256(ensemble.read_bytes()).hexdigest()
    assert folder.parent.name == manifest["dataset"]
    assert manifest["flags"]["env"] == manifest["dataset"]
    assert manifest["flags"]["offline_steps"] == manifest["offline_steps"]
    n, hidden = manifest["ensemble_size"], tuple(manifest["hidden_dims"])
    obs_dim, action_dim = manifest["obs_dim"], manifest["action_dim"]
    with np.load(ensemble, allow_pickle=False) as stored:
        arrays = {k: stored[k] for k in stored.files}  # each array read once
    arrays = {k: a for k, a in arrays.items() if a.ndim >= 2}
    assert arrays and all(a.shape[0] == n for a in arrays.values())
    # The first layers read the observation (policy) and observation + action (critics).
    first = {k.split("]")[0]: a.shape[-2] for k, a in arrays.items()
             if k.endswith("['MLP_0']['Dense_0']['kernel']")}  # fmt: skip
    assert first == {"['actor'": obs_dim, "['critic'": obs_dim + action_dim}, first
    members = members_of(n, hidden, obs_dim, action_dim)
    loaded = o2o.load_offline_ensemble(ensemble, members, manifest["dataset"], obs_dim, action_dim)
    assert all(np.isfinite(x).all() for x in leaves(loaded.actor.params))
    fresh, mine = leaves(members.actor.params), leaves(loaded.actor.params)
    assert any(not np.array_equal(a, b) for a, b in zip(fresh, mine, strict=True))
    other = (
        "walker2d-medium-v2" if manifest["dataset"] != "walker2d-medium-v2" else "hopper-medium-v2"
    )
    with pytest.raises(CheckpointError, match=f"pretrained on {manifest['dataset']}, not {other}"):
        o2o.load_offline_ensemble(ensemble, members, other, obs_dim, action_dim)


def assert_refused_on_another_dataset(algorithm, name, dataset, other, tmp_path):
    """`algorithms/<algorithm>.py --env <other> --offline-checkpoint <name>` ends in one line
    naming the agent's dataset and the agents of `other`, before anything is written."""
    from common import lifecycle

    module = importlib.import_module(f"algorithms.{algorithm}")
    cwd = pathlib.Path.cwd()
    try:
        os.chdir(tmp_path)
        with pytest.raises(SystemExit) as exit_info:
            lifecycle.cli(module.main, module.Args, ["--env", other, "--offline-checkpoint", name])
    finally:
        os.chdir(cwd)
    message = exit_info.value.code
    assert message.startswith(f"error: --offline-checkpoint {name} was pretrained on {dataset}, "
                              f"not {other}: pass the agents of {other}: "), message  # fmt: skip
    assert "\n" not in message and not list(tmp_path.iterdir())


@pytest.mark.parametrize("manifest_path", ENSEMBLES, ids=lambda p: p.parent.name)
@pytest.mark.parametrize("algorithm", ["off2on_balanced", "bred"])
def test_committed_ensembles_load_by_name_and_refuse_another_dataset(
    manifest_path, algorithm, tmp_path
):
    """`--offline-checkpoint <dataset>/<name>` is the folder's ensemble.npz for the manifest's
    dataset, and one line naming that dataset's agents for another --env, with nothing written."""
    from common.checkpoints import resolve_pretrained

    folder = manifest_path.parent
    dataset = json.loads(manifest_path.read_text())["dataset"]
    name = f"{folder.parent.name}/{folder.name}"
    assert pathlib.Path(resolve_pretrained(name, dataset)) == folder / "ensemble.npz"
    other = "walker2d-medium-v2" if dataset != "walker2d-medium-v2" else "hopper-medium-v2"
    assert_refused_on_another_dataset(algorithm, name, dataset, other, tmp_path)


# --- TD3-BC and SAC+ML agents (the runs' own offline.npz), loaded by name ----------------------

WHOLE_RUN_AGENTS = [p.parent for p in COMMITTED if stored_file(p) == "offline.npz"]


def whole_run_target(algorithm: str, hidden, obs_dim: int, action_dim: int):
    """The structure the algorithm file loads an offline.npz into (as its `main` builds it)."""
    key = jax.random.PRNGKey(0)
    if algorithm == "td3_c":
        from algorithms import td3_c
        from common.buffers import ReplayBuffer

        args = td3_c.Args(hidden_dims=hidden)
        actor, critic = td3_c.make_networks(args, action_dim)
        example = {"x": np.zeros(obs_dim, np.float32)}
        state = td3_c.create_state(
            args, actor, critic, obs_dim, action_dim, key, ReplayBuffer.create(example, 1)
        )
        return (state.actor, state.actor_target, state.critic, state.critic_target, state.key)
    from algorithms import aca

    args = aca.Args(hidden_dims=hidden)
    nets = aca.TanhGaussianPolicy(action_dim, hidden), aca.Critic(hidden), aca.ValueNet(hidden)
    return aca.create_offline_state(args, *nets, obs_dim, action_dim, key)


@pytest.mark.parametrize("folder", WHOLE_RUN_AGENTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_agents_load_by_name_and_refuse_another_dataset(folder, tmp_path):
    from common.checkpoints import load_offline_agent, resolve_pretrained

    manifest = json.loads((folder / "manifest.json").read_text())
    name, dataset = f"{folder.parent.name}/{folder.name}", manifest["dataset"]
    path = pathlib.Path(resolve_pretrained(name, dataset))
    assert path == folder / "offline.npz"
    assert manifest["offline_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert folder.parent.name == dataset == manifest["flags"]["env"]
    algorithm, hidden = manifest["algorithm"], tuple(manifest["hidden_dims"])
    obs_dim, action_dim = manifest["obs_dim"], manifest["action_dim"]
    target = whole_run_target(algorithm, hidden, obs_dim, action_dim)
    loaded, meta = load_offline_agent(path, target, algorithm, dataset, obs_dim, action_dim)
    assert meta["offline_steps"] == manifest["offline_steps"]
    fresh, mine = leaves(target), leaves(loaded)
    assert all(np.isfinite(x).all() for x in mine if x.dtype.kind == "f")
    assert any(not np.array_equal(a, b) for a, b in zip(fresh, mine, strict=True))
    # by name on another dataset: one line, before any dataset is read or anything written
    other = "hopper-medium-v2" if dataset != "hopper-medium-v2" else "walker2d-medium-v2"
    assert_refused_on_another_dataset(algorithm, name, dataset, other, tmp_path)
