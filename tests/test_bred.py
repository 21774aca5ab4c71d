import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from conftest import TINY_FLAGS, assert_same_run, run_script

from algorithms import bred
from common.buffers import ReplayBuffer
from common.logger import Logger
from common.networks import Critic, TanhGaussianPolicy, init_ensemble, tanh_gaussian

REPO = pathlib.Path(__file__).resolve().parents[1]


def members(n=3, action_dim=2, obs_dim=4, hidden=(16,)):
    actor = TanhGaussianPolicy(action_dim, hidden)
    params = init_ensemble(actor, jax.random.PRNGKey(0), n, jnp.zeros((1, obs_dim)))
    return actor, params


def test_distillation_targets_are_the_mixture_moments_of_eq9():
    actor, params = members()
    obs = jax.random.normal(jax.random.PRNGKey(1), (7, 4))
    mu_hat, sigma_hat = bred.distillation_targets(actor, params, obs)
    mus, sigmas = [], []
    for i in range(3):  # each member on its own
        mean, log_std = actor.apply(jax.tree_util.tree_map(lambda x, i=i: x[i], params), obs)
        mus.append(np.asarray(mean, np.float64))
        sigmas.append(np.exp(np.asarray(log_std, np.float64)))
    mus, sigmas = np.stack(mus), np.stack(sigmas)
    expected_mu = mus.mean(0)
    expected_var = (sigmas**2 + mus**2).mean(0) - expected_mu**2  # Eq. (9)
    np.testing.assert_allclose(mu_hat, expected_mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma_hat, np.sqrt(expected_var), rtol=1e-4)


def test_distillation_fits_the_mixture_and_stops_early(tmp_path):
    actor, params = members(hidden=(32,))
    obs = jax.random.normal(jax.random.PRNGKey(2), (3000, 4))
    args = bred.Args(
        distill_epochs=200, distill_steps_per_epoch=100, distill_patience=3, batch_size=128
    )
    logger = Logger(tmp_path)
    policy, summary = bred.distill(args, actor, params, obs, jax.random.PRNGKey(3), logger, 0)
    logger.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    vals = [r["distill/val_loss"] for r in rows]
    assert summary["val_loss"] == min(vals) and vals[0] > 10 * summary["val_loss"]
    assert summary["epochs_run"] < 200  # early stopping fired
    assert summary["epochs_run"] - summary["best_epoch"] == args.distill_patience
    mu_hat, _ = bred.distillation_targets(actor, params, obs[:100])
    mean, _ = actor.apply(policy, obs[:100])
    spread = float(jnp.abs(mu_hat - mu_hat.mean(0)).mean())
    assert float(jnp.abs(mean - mu_hat).mean()) < 0.3 * spread  # most of the variation is fit


def test_batch_composition_follows_eq7():
    args = bred.Args(batch_size=256, initial_online_fraction=0.5, anneal_steps=1000)
    offline = {"rewards": jnp.zeros(5000), "observations": jnp.zeros((5000, 2))}
    online = ReplayBuffer.create({"rewards": jnp.float32(0), "observations": jnp.zeros(2)}, 100)
    online = online.add_batch({"rewards": jnp.ones(50), "observations": jnp.ones((50, 2))})
    key = jax.random.PRNGKey(0)
    for t, rho in ((0, 0.5), (500, 0.75), (1000, 1.0), (5000, 1.0)):
        batch, is_online = bred.balanced_batch(offline, online, key, t, args)
        assert float(bred.online_fraction(t, 0.5, 1000)) == pytest.approx(rho)
        assert int(is_online.sum()) == round(256 * rho)
        # the online rows really come from the online buffer (reward 1), the rest offline (0)
        np.testing.assert_array_equal(batch["rewards"], is_online.astype(np.float32))
        np.testing.assert_array_equal(batch["observations"][:, 0], is_online.astype(np.float32))
    only = bred.balanced_batch(offline, online, key, 0, bred.Args(replay="online-only"))[1]
    assert bool(only.all())
    pooled = jax.vmap(
        lambda k: bred.balanced_batch(offline, online, k, 0, bred.Args(replay="uniform"))[1].mean()
    )(jax.random.split(key, 50))
    assert float(pooled.mean()) == pytest.approx(50 / 5050, abs=0.003)  # uniform over the pool


def test_mean_q_actor_loss_matches_a_direct_computation():
    actor = TanhGaussianPolicy(2, (16,))
    critic = Critic((16,))
    obs = jax.random.normal(jax.random.PRNGKey(0), (8, 4))
    policy = actor.init(jax.random.PRNGKey(1), obs)
    critics = jax.vmap(lambda k: init_ensemble(critic, k, 2, obs, jnp.zeros((8, 2))))(
        jax.random.split(jax.random.PRNGKey(2), 3)
    )  # [N=3, 2, ...]
    key, alpha = jax.random.PRNGKey(3), 0.3
    loss, _ = bred.distilled_actor_loss(actor, critic, policy, critics, obs, key, alpha)
    actions, logp = tanh_gaussian(*actor.apply(policy, obs)).sample_and_log_prob(seed=key)
    q_members = []
    for i in range(3):
        twins = [
            critic.apply(jax.tree_util.tree_map(lambda x, i=i, j=j: x[i, j], critics), obs, actions)
            for j in range(2)
        ]
        q_members.append(np.minimum(*map(np.asarray, twins)))
    direct = np.mean(alpha * np.asarray(logp) - np.mean(q_members, axis=0))
    assert float(loss) == pytest.approx(direct, rel=1e-5)


def test_distillation_loss_is_eq8():
    """Eq. (8): E_s[ ||mu_pd(s) - mu_hat(s)||^2 + ||sigma_pd(s) - sigma_hat(s)||^2 ], in NumPy."""
    actor = TanhGaussianPolicy(2, (8, 8))
    rng = np.random.default_rng(0)
    obs = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    params = actor.init(jax.random.PRNGKey(0), obs)
    mu_hat = jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)
    sigma_hat = jnp.asarray(rng.uniform(0.1, 2.0, (6, 2)), jnp.float32)
    ours = bred.distillation_loss(actor, params, obs, mu_hat, sigma_hat)
    mean, log_std = ref.gaussian_policy(ref.np_tree(params), np.asarray(obs, np.float64))
    expected = np.mean(
        ((mean - np.asarray(mu_hat)) ** 2).sum(-1)
        + ((np.exp(log_std) - np.asarray(sigma_hat)) ** 2).sum(-1)
    )
    assert float(ours) == pytest.approx(expected, rel=1e-5)


def one_row_bred(args, seed=0):
    """BRED's fine-tuning state for N=2 tiny members (obs 3, actions 2) whose offline data and
    online buffer hold one and the same transition, so every batch is that row.
    -> (state, insert_and_train, offline, online rows, the row)."""
    actor, critic = TanhGaussianPolicy(2, args.hidden_dims), Critic(args.hidden_dims)
    rng = np.random.default_rng(seed)
    row = {
        "observations": rng.normal(size=3), "actions": rng.uniform(-0.9, 0.9, 2),
        "rewards": rng.normal(), "next_observations": rng.normal(size=3), "terminals": 0.0,
        "timeouts": 0.0,
    }  # fmt: skip
    tile = lambda n: {k: jnp.asarray(np.tile(v, (n, 1)).squeeze(), jnp.float32)  # noqa: E731
                      for k, v in row.items()}  # fmt: skip
    key = jax.random.PRNGKey(seed)
    members = bred.create_cql_members(args, actor, critic, 3, 2, key)
    independent = args.no_distill
    policy = members.actor.params if independent else jax.tree_util.tree_map(
        lambda x: x[0], members.actor.params
    )  # fmt: skip
    state = bred.create_online_state(args, members, policy, 3, 2, key)
    state = state.replace(
        critic_target=jax.tree_util.tree_map(lambda x: x - 0.05, state.critic_target)
    )
    train, _ = bred.make_online_update(args, actor, critic, 2)
    return state, train, tile(16), tile(8), row


def test_no_distill_update_is_eq1_to_3_per_member():
    """--no-distill (Fig. 5): member i bootstraps with a' ~ pi_i(.|s') against its own twin
    target critics, y_i = r + gamma (1 - d) (min_j Q'_ij(s', a'_i) - alpha_i log pi_i(a'_i|s'));
    its policy minimises E[alpha_i log pi_i(b|s) - min_j Q_ij(s, b)] (Eq. 3) with the critics
    before this step's update; the losses are summed over members. NumPy, draws by the
    update's key convention."""
    args = bred.Args(ensemble_size=2, hidden_dims=(8, 8), batch_size=8, no_distill=True)
    state, train, offline, online, row = one_row_bred(args)
    snap = ref.np_tree({"policy": state.policy.params, "critic": state.critic.params,
                        "target": state.critic_target})  # fmt: skip
    _, loop_key = jax.random.split(state.key)
    _, k_next, k_pi, _ = jax.random.split(jax.random.fold_in(loop_key, 0), 4)
    _, metrics = train(state, offline, online, jnp.int32(1))
    obs, nobs = np.tile(row["observations"], (8, 1)), np.tile(row["next_observations"], (8, 1))
    act = np.tile(row["actions"], (8, 1))
    eps_next = np.asarray(jax.random.normal(k_next, (2, 8, 2)), np.float64)
    critic_loss, actor_loss = 0.0, 0.0
    for i, k_i in enumerate(jax.random.split(k_pi, 2)):
        pol, c, t = (ref.member(snap[x], i) for x in ("policy", "critic", "target"))
        mean, log_std = ref.gaussian_policy(pol, nobs)
        u = mean + np.exp(log_std) * eps_next[i]
        logp = ref.tanh_gaussian_log_prob(u, mean, np.exp(log_std))
        next_q = np.minimum(*[ref.critic(ref.member(t, j), nobs, np.tanh(u)) for j in range(2)])
        y = row["rewards"] + 0.99 * (next_q - 1.0 * logp)  # alpha_i = 1 before its step
        critic_loss += sum(np.mean((ref.critic(ref.member(c, j), obs, act) - y) ** 2)
                           for j in range(2))  # fmt: skip
        mean, log_std = ref.gaussian_policy(pol, obs)
        u = mean + np.exp(log_std) * np.asarray(jax.random.normal(k_i, (8, 2)), np.float64)
        logp = ref.tanh_gaussian_log_prob(u, mean, np.exp(log_std))
        q = np.minimum(*[ref.critic(ref.member(c, j), obs, np.tanh(u)) for j in range(2)])
        actor_loss += np.mean(logp - q)
    assert float(metrics["critic_loss"]) == pytest.approx(critic_loss, rel=1e-4)
    assert float(metrics["actor_loss"]) == pytest.approx(actor_loss, rel=1e-4, abs=1e-4)


def test_online_cql_adds_the_weighted_gap_of_each_member():
    """--online-cql (Fig. 10): the critic loss gains cql_weight times the members' CQL gaps
    (the gap itself is checked against NumPy in test_off2on_balanced), computed with the
    distilled policy's actions."""
    base = bred.Args(ensemble_size=2, hidden_dims=(8, 8), batch_size=8, cql_weight=3.0)
    with_cql = dataclasses.replace(base, online_cql=True)
    state, train, offline, online, row = one_row_bred(base)
    copy = lambda t: jax.tree_util.tree_map(jnp.array, t)  # noqa: E731 - the update donates
    critics, policy = copy(state.critic.params), copy(state.policy.params)
    _, loop_key = jax.random.split(state.key)
    *_, k_cql = jax.random.split(jax.random.fold_in(loop_key, 0), 4)
    _, plain = train(state, offline, online, jnp.int32(1))
    state, train_cql, *_ = one_row_bred(with_cql)
    _, cql = train_cql(state, offline, online, jnp.int32(1))
    actor, critic = TanhGaussianPolicy(2, (8, 8)), Critic((8, 8))
    obs = jnp.asarray(np.tile(row["observations"], (8, 1)), jnp.float32)
    nobs = jnp.asarray(np.tile(row["next_observations"], (8, 1)), jnp.float32)
    act = jnp.asarray(np.tile(row["actions"], (8, 1)), jnp.float32)
    gaps = [
        bred.online_cql_gap(
            with_cql, actor, critic, policy, jax.tree_util.tree_map(lambda x, i=i: x[i], critics),
            obs, nobs, bred.twin_q(critic, jax.tree_util.tree_map(lambda x, i=i: x[i], critics),
                                   obs, act), k,
        ).sum()
        for i, k in enumerate(jax.random.split(k_cql, 2))
    ]  # fmt: skip
    assert float(cql["critic_loss"]) == pytest.approx(
        float(plain["critic_loss"]) + 3.0 * float(sum(gaps)), rel=1e-4
    )


TINY = TINY_FLAGS["bred"]


def run(run_dir, minari_root, *extra, ok=True):
    return run_script("bred.py", TINY, run_dir, minari_root, *extra, ok=ok)


def test_tiny_run_and_exact_resume(tiny_root, tmp_path, tiny_run):
    full, stdout, _ = tiny_run("bred")
    assert "before fine-tuning" in stdout and "distillation: validation loss" in stdout
    assert {"offline.npz", "distilled.npz", "checkpoint.npz", "summary.json"} <= {
        p.name for p in full.iterdir()
    }
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    fractions = [r["online/online_fraction"] for r in rows if "online/online_fraction" in r]
    assert fractions == pytest.approx([0.75, 1.0, 1.0, 1.0])  # Eq. (7) with t_final = 200

    part = tmp_path / "part"
    assert (
        "stopped after offline step 100"
        in run(part, tiny_root, "--stop-after", "100", ok=False).stderr
    )
    stopped = run(part, tiny_root, "--resume", "--stop-after", "400", ok=False)
    assert "stopped after global step 400" in stopped.stderr
    run(part, tiny_root, "--resume")
    assert_same_run(full, part)  # bit-identical state, same logged steps


def test_independent_policies_with_pooled_replay(tiny_root, tmp_path):
    run_dir = tmp_path / "nodistill"
    proc = run(run_dir, tiny_root, "--no-distill", "--replay", "uniform", "--online-steps", "200")
    assert "distillation" not in proc.stdout
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    fractions = [r["online/online_fraction"] for r in rows if "online/online_fraction" in r]
    # uniform over 2000 offline + 100 (then 200) online transitions
    assert fractions[0] == pytest.approx(100 / 2100, abs=0.02)
    assert fractions[1] == pytest.approx(200 / 2200, abs=0.02)


def test_an_epochs_updates_in_chunks_equal_one_loop_and_report_progress(monkeypatch):
    """As in off2on_balanced: 7 updates in chunks of 3 (progress after each) leave the same
    state and mean metrics as one call of 7 (update i draws the same key in any split)."""
    args = bred.Args(ensemble_size=2, hidden_dims=(8, 8), batch_size=8)
    results = {}
    for chunk in (7, 3):
        monkeypatch.setattr(bred, "UPDATES_PER_CALL", chunk)
        state, train, offline, online, _ = one_row_bred(args)
        done = []
        new, metrics = train(state, offline, online, 7, done.append)
        results[chunk] = (ref.np_tree(new.policy.params), ref.np_tree(new.critic.params),
                          {k: float(v) for k, v in metrics.items()}, done)  # fmt: skip
    (policy7, critic7, metrics7, done7), (policy3, critic3, metrics3, done3) = results.values()
    assert done7 == [7] and done3 == [3, 3, 1]
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves((policy7, critic7)), leaves((policy3, critic3)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert metrics7 == pytest.approx(metrics3, rel=1e-5)
