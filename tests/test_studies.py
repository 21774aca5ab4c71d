"""The studies' own code (studies/): each variant that is not a paper's method is tested here,
beside the check that its default is the method's code."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import reference as ref
import test_off2on_balanced as method_tests

from algorithms import off2on_balanced as o2o
from studies.off2on_dr_output.dr_output import (
    SoftplusDensityRatio,
    density_ratio_class,
    priorities_at_one,
)

REPO = pathlib.Path(__file__).resolve().parents[1]

# --- studies/off2on_dr_output: the density-ratio net with a softplus output ----------------------


def test_dr_output_relu_is_the_methods_density_ratio():
    """`--dr-output relu` (the study's default) runs the method's own net; softplus keeps its
    parameter layout, so one set of parameters feeds either (checked below)."""
    assert density_ratio_class("relu") is o2o.DensityRatio
    assert density_ratio_class("softplus") is SoftplusDensityRatio
    rng = np.random.default_rng(0)
    obs = jnp.asarray(rng.normal(0.0, 3.0, (64, 11)), jnp.float32)
    act = jnp.asarray(rng.uniform(-1, 1, (64, 3)), jnp.float32)
    a = SoftplusDensityRatio((32, 32)).init(jax.random.PRNGKey(3), obs[:1], act[:1])
    b = o2o.DensityRatio((32, 32)).init(jax.random.PRNGKey(3), obs[:1], act[:1])
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)


def test_softplus_density_ratio_recovers_a_known_gaussian_ratio():
    method_tests.test_density_ratio_recovers_a_known_gaussian_ratio(SoftplusDensityRatio((64, 64)))


def test_softplus_density_ratio_starts_near_one_everywhere():
    method_tests.test_density_ratio_starts_near_one_everywhere(SoftplusDensityRatio())


def test_softplus_density_ratio_is_positive_where_relu_is_zero():
    """The study's softplus net: w = log(1 + exp(z)) of the same last-layer pre-activation z that
    the ReLU net clips at 0 (checked in NumPy), so no transition has w = 0."""
    rng = np.random.default_rng(1)
    obs = rng.normal(0.0, 3.0, (256, 5)).astype(np.float32)
    act = rng.uniform(-1, 1, (256, 2)).astype(np.float32)
    relu_net, soft_net = o2o.DensityRatio((16,)), SoftplusDensityRatio((16,))
    params = relu_net.init(jax.random.PRNGKey(0), obs[:1], act[:1])
    params = jax.tree_util.tree_map(  # spread the last layer so that z < 0 for many inputs
        lambda x: jnp.asarray(rng.normal(0.0, 1.0, x.shape), jnp.float32), params
    )
    p = ref.np_tree(params)["params"]
    z = ref.dense(p["Dense_1"], np.maximum(ref.dense(p["Dense_0"], np.hstack([obs, act])), 0))
    z = z[:, 0]
    assert (z < 0).mean() > 0.2  # the ReLU net's w = 0 region
    np.testing.assert_allclose(relu_net.apply(params, obs, act), np.maximum(z, 0), atol=1e-5)
    w = np.asarray(soft_net.apply(params, obs, act))
    np.testing.assert_allclose(w, np.log1p(np.exp(z)), rtol=1e-5, atol=1e-6)
    assert w.min() > 0


def test_new_online_samples_enter_at_one_after_the_first_epoch(monkeypatch):
    """`--new-online-priority one`: the method's test with the study's priorities, expecting 1
    for the second epoch's samples (the first epoch's keep the initial-fraction priority)."""
    monkeypatch.setattr(o2o, "new_online_priorities", priorities_at_one)
    method_tests.test_new_online_samples_enter_at_the_max_priority(entry="one")


# --- studies/cql_peer: our CQL beside d3rlpy's ---------------------------------------------------


def study_arm(name):
    from studies.cql_peer import run as cql_peer

    return next(arm for arm in cql_peer.ARMS if arm.name == name)


def our_args_of(arm_name, budget=None):
    """The o2o.Args our study job runs with, parsed from the command the driver builds."""
    import tyro

    from studies.cql_peer import run as cql_peer

    budget = budget or {"steps": 200_000, "eval_every": 20_000, "eval_episodes": 10}
    argv = cql_peer.command(study_arm(arm_name), 0, REPO / "runs/x", "peer-python", budget)
    assert argv[1] == "algorithms/off2on_balanced.py"
    return tyro.cli(o2o.Args, args=argv[2:])


def test_cql_peer_ours_runs_the_authors_settings_the_peer_runs():
    """The comparison holds the hyperparameters fixed: every d3rlpy setting of the `authors` arm
    (peer_cql.AUTHORS_SETTINGS) has its counterpart in our job's parsed flags, and both run one
    agent offline for the same steps with the same evaluations."""
    from studies.cql_peer.peer_cql import AUTHORS_SETTINGS as peer

    ours = our_args_of("ours")
    assert ours.offline_policy_lr == peer["actor_learning_rate"] == peer["temp_learning_rate"]
    assert ours.offline_q_lr == peer["critic_learning_rate"]
    assert ours.cql_weight == peer["conservative_weight"] * peer["initial_alpha"]
    assert not ours.cql_lagrange and peer["alpha_learning_rate"] == 0
    assert ours.cql_n_actions == peer["n_action_samples"]
    assert ours.deterministic_backup and not peer["soft_q_backup"] and not peer["max_q_backup"]
    assert (ours.gamma, ours.tau) == (peer["gamma"], peer["tau"])
    assert ours.cql_temperature == 1.0 and peer["n_critics"] == 2
    assert ours.bc_steps == 0  # d3rlpy has no warm start
    assert ours.ensemble_size == 1 and ours.online_steps == 0
    assert (ours.offline_steps, ours.offline_eval_every, ours.eval_episodes) == (
        200_000,
        20_000,
        10,
    )
    assert ours.batch_size == 256 and o2o.paper_hidden_dims(ours.env) == (256, 256)
    assert ours.hidden_dims is None  # the paper's widths, which the peer's default encoder uses
    warm = our_args_of("ours_warm_start")
    assert warm.bc_steps == 40_000 and dataclasses_equal_but(warm, ours, "bc_steps", "run_dir")


def dataclasses_equal_but(a, b, *fields):
    import dataclasses

    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    return all(da[k] == db[k] for k in da if k not in fields)


def test_cql_peer_runs_seed_by_seed():
    """The first pair of the comparison runs first, the one-seed arms next, d3rlpy at its own
    defaults last; every arm's seed appears once."""
    from studies.cql_peer import run as cql_peer

    order = [(arm.name, seed) for arm, seed in cql_peer.jobs(None, None)]
    assert order[:2] == [("ours", 0), ("d3rlpy", 0)]
    assert order[-1] == ("d3rlpy_defaults", 0)
    assert sorted(order) == sorted((a.name, s) for a in cql_peer.ARMS for s in a.seeds)
    assert [s for a, s in order if a == "d3rlpy"] == [0, 1, 2]


def test_cql_peer_keeps_every_transition(minari_env, tmp_path):
    """d3rlpy's episodes built by peer_cql.load_episodes give the same transitions as our loader
    (time-out transitions kept with their true next observation). Runs in the d3rlpy environment
    when one exists (.venv-peer, studies/cql_peer/peer_cql.py); skipped otherwise."""
    import os
    import subprocess

    import pytest

    from common.datasets import load_d4rl

    peer_python = REPO / ".venv-peer/bin/python"
    if not peer_python.exists():
        pytest.skip("no d3rlpy environment (.venv-peer)")
    out = tmp_path / "peer.npz"
    script = (
        "import sys, numpy as np, d3rlpy\n"
        "from studies.cql_peer.peer_cql import load_episodes\n"
        "eps = load_episodes(d3rlpy, 'hopper-medium-v2')\n"
        "picker = d3rlpy.dataset.BasicTransitionPicker()\n"
        "ts = [picker(e, i) for e in eps for i in range(e.transition_count)]\n"
        "np.savez(sys.argv[1], obs=np.stack([t.observation for t in ts]),\n"
        "  act=np.stack([t.action for t in ts]), rew=np.array([t.reward[0] for t in ts]),\n"
        "  nxt=np.stack([t.next_observation for t in ts]),\n"
        "  term=np.array([t.terminal for t in ts]))\n"
    )
    proc = subprocess.run(
        [str(peer_python), "-c", script, str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    peer = np.load(out)
    ours = {k: np.asarray(v) for k, v in load_d4rl("hopper-medium-v2").transitions.items()}
    assert ours["timeouts"].any() and ours["terminals"].any()  # both kinds of episode end
    np.testing.assert_array_equal(peer["obs"], ours["observations"])
    np.testing.assert_array_equal(peer["act"], ours["actions"])
    np.testing.assert_array_equal(peer["rew"], ours["rewards"])
    np.testing.assert_array_equal(peer["term"], ours["terminals"])
    live = ours["terminals"] == 0  # d3rlpy zeroes s' after a termination (unused: 1 - d = 0)
    np.testing.assert_array_equal(peer["nxt"][live], ours["next_observations"][live])
