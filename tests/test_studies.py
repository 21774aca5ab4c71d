"""The studies' own code (studies/): each variant that is not a paper's method is tested here,
beside the check that its default is the method's code."""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
import test_off2on_balanced as method_tests
import test_td3_c as td3_tests

from algorithms import off2on_balanced as o2o
from algorithms import td3_c
from studies.off2on_dr_output.dr_output import (
    SoftplusDensityRatio,
    density_ratio_class,
    priorities_at_one,
)
from studies.td3c_clip import td3_clip
from studies.td3c_dual import dual_readings, dual_table

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

    budget = budget or {"steps": 200_000, "eval_every": 20_000, "eval_episodes": 10,
                        "checkpoint_every": 5_000}  # fmt: skip
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


# --- studies/td3c_dual: four readings of TD3-C's dual update --------------------------------------


def dual_of(reading: str, **overrides):
    """The dual state `reading` starts from, and the study's Args."""
    args = dual_readings.Args(dual_update=reading, **overrides)
    actor, critic = td3_c.make_networks(args, 3)
    with dual_readings.reading(args):
        state = td3_c.create_state(args, actor, critic, 11, 3, jax.random.PRNGKey(0), None)
    return state.dual, args


def test_dual_steps_match_each_reading():
    """The dual step of Eq. (5) for L = lambda (epsilon - c), each reading computed by hand:
    projected Adam and projected SGD on lambda, Adam on eta with lambda = softplus(eta) + 1e-8."""
    eps, lr = 1e-5, 0.1
    constraints = [3e-5, 2e-5, 1e-6, 4e-5, 0.0]
    for reading in ("adam", "sgd", "mpo"):
        dual, _ = dual_of(reading, dual_lr=lr, init_dual=0.5)
        assert float(dual_readings.dual_value(dual.params, reading)) == pytest.approx(0.5, rel=1e-5)
        for c in constraints:
            dual = dual_readings.dual_step(dual, c, eps, reading)
        if reading == "sgd":
            lam = 0.5
            for c in constraints:
                lam = max(lam - lr * (eps - c), 0.0)
        elif reading == "adam":  # projection between the steps: replay it step by step
            lam, m, v = 0.5, 0.0, 0.0
            for t, c in enumerate(constraints, start=1):
                g = eps - c
                m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
                lam -= lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
                lam = max(lam, 0.0)
        else:
            eta0 = np.log(np.expm1(0.5 - 1e-8))
            eta, m, v = eta0, 0.0, 0.0
            for t, c in enumerate(constraints, start=1):
                g = (1 / (1 + np.exp(-eta))) * (eps - c)  # d softplus(eta)/d eta = sigmoid(eta)
                m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
                eta -= lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
            lam = np.logaddexp(0.0, eta) + 1e-8
        assert float(dual_readings.dual_value(dual.params, reading)) == pytest.approx(lam, rel=1e-4)


def test_projected_adam_dual_grows_when_violated_and_decays_to_zero_when_slack():
    dual, _ = dual_of("adam", dual_lr=0.1)
    eps, values = 1e-5, []
    for _ in range(50):  # violated: the constraint is twice the trust region
        dual = dual_readings.dual_step(dual, 2 * eps, eps, "adam")
        values.append(float(dual.params["v"]))
    assert all(b > a for a, b in zip(values, values[1:], strict=False)) and values[-1] > 1.0
    for _ in range(500):  # slack: well inside the trust region
        dual = dual_readings.dual_step(dual, 0.0, eps, "adam")
        assert float(dual.params["v"]) >= 0.0
    assert float(dual.params["v"]) == 0.0


def test_dual_reading_defaults_follow_the_update():
    """The study's defaults are the method's (sgd, mean, lr 1e3); --dual-lr's default follows
    --dual-update (Adam's first step is lr g / (|g| + 1e-8) for the gradient g: on lambda g =
    eps - c; mpo, on eta: g = sigmoid(eta) (eps - c), tiny at lambda ~ 1e-8)."""
    args = dual_readings.Args()
    assert (args.dual_update, args.constraint_reduce, args.dual_lr) == ("sgd", "mean", None)
    for reading, lr in (("sgd", 1e3), ("adam", 1e-2), ("mpo", 1e-2), ("sgd", 7.0)):
        explicit = lr if (reading, lr) == ("sgd", 7.0) else None
        dual, _ = dual_of(reading, dual_lr=explicit)
        c, eps = 3e-4, 1e-5
        stepped = dual_readings.dual_step(dual, c, eps, reading).params
        stepped = float(dual_readings.dual_value(stepped, reading))
        start = float(dual_readings.dual_value(dual.params, reading))
        if reading == "sgd":
            assert stepped - start == pytest.approx(lr * (c - eps), rel=1e-4)
        elif reading == "adam":
            g = eps - c
            assert stepped - start == pytest.approx(-lr * g / (abs(g) + 1e-8), rel=1e-4)
        else:
            eta0 = np.log(np.expm1(1e-8))
            g = 1 / (1 + np.exp(-eta0)) * (eps - c)
            expected = np.logaddexp(0.0, eta0 - lr * g / (abs(g) + 1e-8)) + 1e-8
            assert stepped == pytest.approx(expected, rel=1e-4)


def test_dual_readings_sgd_is_the_methods_dual():
    """The study's sgd reading (its default) builds and steps the dual exactly as td3_c does."""
    study, _ = dual_of("sgd", dual_lr=0.1, init_dual=0.5)
    args = td3_c.Args(dual_lr=0.1, init_dual=0.5)
    method = td3_c.create_state(args, *td3_c.make_networks(args, 3), 11, 3,
                                jax.random.PRNGKey(0), None).dual  # fmt: skip
    for c in (3e-5, 0.0, 1e-3):
        study = dual_readings.dual_step(study, c, 1e-5, "sgd")
        method = td3_c.dual_step(method, c, 1e-5)
        assert float(study.params["v"]) == float(method.params["v"])


def test_td3c_actor_loss_with_the_summed_constraint():
    """`--constraint-reduce sum`: Eq. (4)'s distance summed over the action dimensions, checked by
    the method's Eq. (4)-(5) test with the sum in its NumPy reference."""
    with dual_readings.reading(dual_readings.Args(constraint_reduce="sum")):
        td3_tests.test_td3c_actor_loss_is_eq4_eq5("sum")
    td3_tests.test_td3c_actor_loss_is_eq4_eq5("mean")  # and the method again, unpatched


def test_dual_table_row_from_a_runs_metrics(tmp_path):
    """dual_table reads lambda, the constraint and the policy movement at full precision: values
    set by hand, the medians and shares counted by hand."""
    from benchmarks import report

    run = tmp_path / "run"
    run.mkdir()
    eps = 1e-5
    (run / "config.json").write_text(
        json.dumps({"offline_steps": 100, "online_steps": 4000, "epsilon": eps})
    )
    rows = [{"step": 100, "online/dual": 99.0}]  # an offline row: ignored
    for k, (dual, c, move) in enumerate(
        [(1.0, 5e-5, 9e-5), (2.0, 4e-5, 8e-5), (3.0, 1.2e-5, 3e-5), (4.0, 0.5e-5, 1e-5)], 1
    ):
        rows.append({"step": 100 + 1000 * k, "online/dual": dual, "online/constraint": c,
                     "online/policy_change": move})  # fmt: skip
    rows += [
        {"step": 100 + s, report.SCORE: v} for s, v in ((2000, 40.0), (3000, 20.0), (4000, 90.0))
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(  # a finished run's (read_run_dir reads the scores)
        json.dumps({"normalized_score_before_finetuning": 50.0,
                    "normalized_score_after_finetuning": 90.0})
    )  # fmt: skip
    row = dual_table.run_row(run)
    # second half = online steps 3000 and 4000: constraints 1.2e-5 and 0.5e-5, moves 3e-5, 1e-5
    assert row["c / ε"] == pytest.approx((1.2 + 0.5) / 2)
    assert row["step / ε"] == pytest.approx(2.0)
    assert row["c ≤ ε"] == 0.5
    assert (row["λ 10k"], row["λ end"]) == (4.0, 4.0)
    assert (row["lowest"], row["lowest_step"], row["final"]) == (20.0, 3000, 90.0)


# --- studies/td3c_clip: TD3 with TD3-C's dQ/da clipping, no constraint ----------------------------


def test_td3_clip_is_td3c_without_the_constraint():
    """td3_clip = TD3 + TD3-C's dQ/da clipping: the same actor as td3c with a slack trust region,
    a different one from plain td3 once dQ/da leaves [-c, c]."""
    args, actor, critic, state, batch = td3_tests.small_td3(dqda_clip=0.01)
    slack = dataclasses.replace(args, epsilon=1e9)
    key = jax.random.PRNGKey(3)
    with td3_clip.clipping_td3():
        a, _ = td3_c.make_update(args, actor, critic, "td3_clip")(state, batch, key)
        b, _ = td3_c.make_update(slack, actor, critic, "td3c")(state, batch, key)
        c, _ = td3_c.make_update(args, actor, critic, "td3")(state, batch, key)
    ref.assert_tree_close(ref.np_tree(a.actor.params), ref.np_tree(b.actor.params), rtol=1e-6)
    kernel = lambda s: np.asarray(s.actor.params["params"]["Dense_0"]["kernel"])  # noqa: E731
    assert not np.allclose(kernel(a), kernel(c))
    # outside the study, the method has no td3_clip mode: it would run as plain td3
    assert not td3_c.clips_dqda("td3_clip") and td3_c.clips_dqda("td3c")


def test_cql_update_equals_d3rlpys_on_the_same_batch():
    """Our CQL update's losses and gradients equal d3rlpy's (an independent implementation, in
    .venv-peer) on the same batch, parameters and noise: the Bellman and conservative losses,
    the actor loss, every critic and actor gradient tensor, and the temperature gradient (d3rlpy's
    is alpha times ours: it differentiates alpha, we log alpha)."""
    from studies.cql_peer import same_batch

    if not same_batch.PEER_PYTHON.exists():
        pytest.skip("no .venv-peer (studies/cql_peer/README.md)")
    rows, extra = same_batch.compare()
    assert len(rows) == 7
    for row in rows:
        assert row["error"] <= same_batch.RTOL, row
    # the comparison sees the next action: a sampled one (ours by default) changes the loss
    assert abs(extra["bellman_loss_sampled_backup"] - extra["bellman_loss_mean_backup"]) > 1e-3


def test_cql_peer_pins_its_dataset(tmp_path):
    """The first run records the dataset's checksum; a dataset with other bytes (generated on
    another machine) is refused with one line, the same one goes on."""
    from studies.cql_peer import run as cql_peer

    cql_peer.pin_dataset(tmp_path, "a" * 64)
    assert json.loads((tmp_path / "dataset.json").read_text())["transitions_sha256"] == "a" * 64
    cql_peer.pin_dataset(tmp_path, "a" * 64)  # the same bytes: nothing to say
    with pytest.raises(SystemExit, match="generated elsewhere"):
        cql_peer.pin_dataset(tmp_path, "b" * 64)


def test_cql_peer_tiny_study_runs_both_codes_end_to_end(minari_env, tmp_path):
    """Both arms of the comparison at a seconds-long budget: each writes its summary, evaluates
    at the same steps on the same episode seeds, and checkpoints (the d3rlpy arm's evaluation
    once failed only there, on a gymnasium import its environment lacked)."""
    import json as json_

    from studies.cql_peer import run as cql_peer
    from studies.cql_peer import same_batch

    if not same_batch.PEER_PYTHON.exists():
        pytest.skip("no .venv-peer (studies/cql_peer/README.md)")
    assert cql_peer.main(["--tiny", "--root", str(tmp_path), "--arms", "ours", "d3rlpy",
                          "--seeds", "0"]) == 0  # fmt: skip
    steps = {}
    for arm, checkpoint in (("ours", "offline.npz"), ("d3rlpy", "checkpoint.pt")):
        run_dir = tmp_path / arm / "seed0"
        assert (run_dir / "summary.json").exists() and (run_dir / checkpoint).exists()
        rows = [json_.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps[arm] = {r["step"] for r in rows if "eval/normalized_score" in r}
    assert steps["ours"] == steps["d3rlpy"] == {100, 200}  # ours adds its final one at 200
