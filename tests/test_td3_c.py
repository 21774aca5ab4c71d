import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from conftest import TINY_FLAGS, assert_same_run, run_script

from algorithms import td3_c
from common.buffers import ReplayBuffer

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_td3bc_loss_averages_the_bc_term_over_batch_and_action_dimensions():
    """Eq. (3) as TD3-BC's code computes it: -lambda mean Q + mean over batch *and* action
    dimensions of (pi - a)^2 (F.mse_loss); a sum over dimensions would be |A| times stronger."""
    rng = np.random.default_rng(0)
    q = rng.normal(5.0, 2.0, size=16)
    pi, a = rng.uniform(-1, 1, (16, 3)), rng.uniform(-1, 1, (16, 3))
    ours = td3_c.td3bc_actor_loss(jnp.asarray(q), jnp.asarray(pi), jnp.asarray(a), 2.5)
    lam = 2.5 / np.abs(q).mean()
    mse = np.mean([np.mean([(pi[i, j] - a[i, j]) ** 2 for j in range(3)]) for i in range(16)])
    assert float(ours) == pytest.approx(-lam * q.mean() + mse, rel=1e-5)
    # lambda carries no gradient: dL/dq = -lambda / B exactly
    grad_q = jax.grad(lambda q_: td3_c.td3bc_actor_loss(q_, jnp.asarray(pi), jnp.asarray(a), 2.5))(
        jnp.asarray(q)
    )
    np.testing.assert_allclose(grad_q, np.full(16, -lam / 16), rtol=1e-5)


def test_dual_step_is_projected_sgd_on_lambda():
    """Eq. (5)'s dual step for L = lambda (epsilon - c), computed by hand: plain SGD on lambda,
    projected onto lambda >= 0 after each step."""
    eps, lr = 1e-5, 0.1
    constraints = [3e-5, 2e-5, 1e-6, 4e-5, 0.0]
    args = td3_c.Args(dual_lr=lr, init_dual=0.5)
    actor, critic = td3_c.make_networks(args, 3)
    dual = td3_c.create_state(args, actor, critic, 11, 3, jax.random.PRNGKey(0), None).dual
    assert float(td3_c.dual_value(dual.params)) == pytest.approx(0.5, rel=1e-5)
    lam = 0.5
    for c in constraints:
        dual = td3_c.dual_step(dual, c, eps)
        lam = max(lam - lr * (eps - c), 0.0)
        assert float(td3_c.dual_value(dual.params)) == pytest.approx(lam, rel=1e-4)


def test_projected_dual_grows_when_violated_and_returns_to_zero_when_slack():
    args = td3_c.Args(dual_lr=0.1)
    actor, critic = td3_c.make_networks(args, 3)
    state = td3_c.create_state(args, actor, critic, 11, 3, jax.random.PRNGKey(0), None)
    dual, eps, values = state.dual, 1e-5, []
    for _ in range(50):  # violated: the constraint is twice the trust region
        dual = td3_c.dual_step(dual, 2 * eps, eps)
        values.append(float(dual.params["v"]))
    assert all(b > a for a, b in zip(values, values[1:], strict=False))
    for _ in range(100):  # slack: well inside the trust region
        dual = td3_c.dual_step(dual, 0.0, eps)
        assert float(dual.params["v"]) >= 0.0
    assert float(dual.params["v"]) == 0.0


def test_dual_defaults_are_the_studied_reading():
    """The default is the td3c_dual study's choice: projected plain SGD on lambda at lr 1e3 from
    0: the first step moves lambda by lr (c - epsilon)."""
    args = td3_c.Args()
    assert (args.dual_lr, args.init_dual) == (1e3, 0.0)
    actor, critic = td3_c.make_networks(args, 3)
    dual = td3_c.create_state(args, actor, critic, 11, 3, jax.random.PRNGKey(0), None).dual
    c, eps = 3e-4, 1e-5
    stepped = float(td3_c.dual_value(td3_c.dual_step(dual, c, eps).params))
    assert stepped == pytest.approx(1e3 * (c - eps), rel=1e-4)


def test_clipped_action_gradient_is_bounded():
    actions = jnp.zeros((4, 3))
    q_fn = lambda a: 100.0 * a.sum(-1) - 50.0 * a[:, 0]  # noqa: E731 - dQ/da = (50, 100, 100)
    grad = jax.grad(lambda a: td3_c.clipped_dpg_loss(q_fn, a, clip=1.0))(actions)
    np.testing.assert_allclose(grad, -np.ones((4, 3)) / 4)  # -clip(dQ/da) per sample, batch mean
    unclipped = jax.grad(lambda a: -q_fn(a).mean())(actions)
    np.testing.assert_allclose(unclipped, -np.array([[50.0, 100, 100]] * 4) / 4)
    small = lambda a: 0.3 * a.sum(-1)  # noqa: E731 - inside the clip range: unchanged
    np.testing.assert_allclose(
        jax.grad(lambda a: td3_c.clipped_dpg_loss(small, a, 1.0))(actions),
        jax.grad(lambda a: -small(a).mean())(actions),
    )


def test_td3c_with_a_huge_epsilon_updates_like_td3():
    args = td3_c.Args(
        epsilon=1e9, init_dual=0.0, dqda_clip=0.0, hidden_dims=(32, 32), batch_size=16
    )
    actor, critic = td3_c.make_networks(args, 3)
    key = jax.random.PRNGKey(0)
    buffer = ReplayBuffer.create({"x": jnp.zeros(1)}, 1)
    state = td3_c.create_state(args, actor, critic, 11, 3, key, buffer)
    rng = np.random.default_rng(0)
    batch = {
        "observations": jnp.asarray(rng.normal(size=(16, 11)), jnp.float32),
        "actions": jnp.asarray(rng.uniform(-1, 1, (16, 3)), jnp.float32),
        "rewards": jnp.asarray(rng.normal(size=16), jnp.float32),
        "next_observations": jnp.asarray(rng.normal(size=(16, 11)), jnp.float32),
        "terminals": jnp.zeros(16),
    }
    td3c = td3_c.make_update(args, actor, critic, "td3c")
    td3 = td3_c.make_update(args, actor, critic, "td3")
    a, b = state, state
    for i in range(3):  # actor steps at updates 0 and 2 (policy delay 2)
        a, metrics = td3c(a, batch, jax.random.fold_in(key, i))
        b, _ = td3(b, batch, jax.random.fold_in(key, i))
        assert float(metrics["dual"]) == 0.0  # the slack constraint keeps lambda at 0
    for x, y in zip(
        jax.tree_util.tree_leaves(a.actor.params),
        jax.tree_util.tree_leaves(b.actor.params),
        strict=True,
    ):
        np.testing.assert_array_equal(x, y)
    # ... while a tight epsilon changes the update once lambda is positive and the policy has
    # moved away from its target (at pi = pi_targ the penalty's gradient is zero).
    args_tight = td3_c.Args(epsilon=0.0, dqda_clip=0.0, hidden_dims=(32, 32), batch_size=16)
    moved = state.replace(
        actor_target=jax.tree_util.tree_map(lambda x: x + 0.05, state.actor_target),
        dual=state.dual.replace(params={"v": jnp.float32(10.0)}),
    )
    c, _ = td3_c.make_update(args_tight, actor, critic, "td3c")(moved, batch, key)
    d, _ = td3(moved, batch, key)
    kernel = lambda s: s.actor.params["params"]["Dense_0"]["kernel"]  # noqa: E731
    assert not np.allclose(kernel(c), kernel(d))


def small_td3(seed=0, **overrides):
    """Plain ReLU networks (hidden 8-8) on a random batch of 16: (args, actor, critic, state,
    batch) for the equation tests."""
    args = td3_c.Args(layer_norm=False, hidden_dims=(8, 8), batch_size=16, **overrides)
    actor, critic = td3_c.make_networks(args, 3)
    state = td3_c.create_state(args, actor, critic, 5, 3, jax.random.PRNGKey(seed), None)
    # give the targets their own values, so a test can tell online from target networks
    shift = lambda t, d: jax.tree_util.tree_map(lambda x: x + d, t)  # noqa: E731
    state = state.replace(
        actor_target=shift(state.actor_target, 0.03), critic_target=shift(state.critic_target, 0.02)
    )
    rng = np.random.default_rng(seed)
    batch = {
        "observations": jnp.asarray(rng.normal(size=(16, 5)), jnp.float32),
        "actions": jnp.asarray(rng.uniform(-1, 1, (16, 3)), jnp.float32),
        "rewards": jnp.asarray(rng.normal(size=16), jnp.float32),
        "next_observations": jnp.asarray(rng.normal(size=(16, 5)), jnp.float32),
        "terminals": jnp.asarray(rng.integers(0, 2, 16), jnp.float32),
    }
    return args, actor, critic, state, batch


def test_critic_target_is_td3_eq1_with_target_policy_smoothing():
    """TD3 Eq. (1): y = r + gamma (1 - d) min_i Q'_i(s', clip(pi'(s') + clip(N(0, 0.2), -0.5,
    0.5), -1, 1)); the critic loss is the twins' summed mean squared errors to y."""
    args, actor, critic, state, batch = small_td3()
    key = jax.random.PRNGKey(7)
    _, metrics = td3_c.make_update(args, actor, critic, "td3")(state, batch, key)
    b = {k: np.asarray(v, np.float64) for k, v in batch.items()}
    noise = np.clip(0.2 * np.asarray(jax.random.normal(key, (16, 3)), np.float64), -0.5, 0.5)
    next_a = np.clip(
        ref.deterministic_actor(ref.np_tree(state.actor_target), b["next_observations"]) + noise,
        -1,
        1,
    )
    targets = ref.np_tree(state.critic_target)
    next_q = np.minimum(
        ref.critic(ref.member(targets, 0), b["next_observations"], next_a),
        ref.critic(ref.member(targets, 1), b["next_observations"], next_a),
    )
    y = b["rewards"] + 0.99 * (1 - b["terminals"]) * next_q
    online = ref.np_tree(state.critic.params)
    loss = sum(
        np.mean((ref.critic(ref.member(online, i), b["observations"], b["actions"]) - y) ** 2)
        for i in range(2)
    )
    assert float(metrics["critic_loss"]) == pytest.approx(loss, rel=1e-4)


def test_td3c_actor_loss_is_eq4_eq5(reduce="mean"):
    """TD3-C Eq. (4)-(5) on an actor step: loss = -mean Q1(s, pi(s)) + lambda (c - epsilon),
    c = E_s[(pi(s) - pi'(s))^2] averaged over the action dimensions (`reduce="sum"`: summed, the
    td3c_dual study's reading, tests/test_studies.py); Q1 is the first critic after this step's
    critic update."""
    args, actor, critic, state, batch = small_td3(dqda_clip=0.0)
    state = state.replace(dual=state.dual.replace(params={"v": jnp.float32(3.0)}))
    new, metrics = td3_c.make_update(args, actor, critic, "td3c")(
        state, batch, jax.random.PRNGKey(1)
    )
    obs = np.asarray(batch["observations"], np.float64)
    pi = ref.deterministic_actor(ref.np_tree(state.actor.params), obs)
    pi_targ = ref.deterministic_actor(ref.np_tree(state.actor_target), obs)
    sq = (pi - pi_targ) ** 2
    c = (sq.sum(-1) if reduce == "sum" else sq.mean(-1)).mean()
    q1 = ref.critic(ref.member(ref.np_tree(new.critic.params), 0), obs, pi)
    assert float(metrics["actor_step"]) == 1.0
    assert float(metrics["constraint"]) == pytest.approx(c, rel=1e-4)
    assert float(metrics["actor_loss"]) == pytest.approx(-q1.mean() + 3.0 * (c - 1e-5), rel=1e-4)


def test_target_and_delay_schedule_follows_acme_td3():
    """Target critics take a Polyak step every update; the actor, its target (and the dual)
    only every policy_delay-th update."""
    args, actor, critic, state, batch = small_td3()
    update = jax.jit(td3_c.make_update(args, actor, critic, "td3c"))
    for i in range(4):
        new, metrics = update(state, batch, jax.random.PRNGKey(i))
        ref.assert_tree_close(
            ref.np_tree(new.critic_target),
            ref.polyak(ref.np_tree(new.critic.params), ref.np_tree(state.critic_target), 0.005),
            rtol=1e-5, atol=1e-7,
        )  # fmt: skip
        actor_step = i % 2 == 0
        assert float(metrics["actor_step"]) == float(actor_step)
        same = lambda a, b: all(  # noqa: E731
            np.array_equal(x, y)
            for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
        )
        assert same(new.actor.params, state.actor.params) != actor_step
        assert same(new.dual.params, state.dual.params) != actor_step
        if actor_step:
            ref.assert_tree_close(
                ref.np_tree(new.actor_target),
                ref.polyak(ref.np_tree(new.actor.params), ref.np_tree(state.actor_target), 0.005),
                rtol=1e-5, atol=1e-7,
            )  # fmt: skip
        else:
            assert same(new.actor_target, state.actor_target)
        state = new


def test_logged_actor_metrics_average_over_actor_steps_only():
    stacked = {
        "actor_step": jnp.array([1.0, 0.0, 1.0, 0.0]),
        "constraint": jnp.array([2.0, 0.0, 4.0, 0.0]),
        "policy_change": jnp.array([1.0, 0.0, 1.0, 0.0]),
        "actor_loss": jnp.array([-1.0, 0.0, -3.0, 0.0]),
        "critic_loss": jnp.array([1.0, 2.0, 3.0, 4.0]),
    }
    means = td3_c.mean_over_steps(stacked)
    assert "actor_step" not in means
    assert float(means["constraint"]) == 3.0 and float(means["policy_change"]) == 1.0
    assert float(means["actor_loss"]) == -2.0 and float(means["critic_loss"]) == 2.5


TINY = TINY_FLAGS["td3_c"]


def run(run_dir, minari_root, *extra, ok=True):
    return run_script("td3_c.py", TINY, run_dir, minari_root, *extra, ok=ok)


def test_tiny_run_and_exact_resume(tiny_root, tmp_path, tiny_run):
    full, stdout, _ = tiny_run("td3_c")
    assert "before fine-tuning" in stdout
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    online = [r for r in rows if "online/dual" in r]
    assert len(online) == 6 and all(r["online/dual"] >= 0 for r in online)
    assert any(r["online/constraint"] > 0 for r in online)
    part = tmp_path / "part"
    assert (
        "stopped after offline step 200"
        in run(part, tiny_root, "--stop-after", "200", ok=False).stderr
    )
    stopped = run(part, tiny_root, "--resume", "--stop-after", "800", ok=False)
    assert "stopped after global step 800" in stopped.stderr
    # the resumed offline bar counts from the checkpoint's step, out of the whole phase
    assert "200/400 [" in stopped.stderr and "0/200 [" not in stopped.stderr
    run(part, tiny_root, "--resume")
    assert_same_run(full, part)  # bit-identical state, same logged steps


def test_offline_ratio_and_no_offline_data_variants(tiny_root, tmp_path):
    ratio = tmp_path / "ratio"
    run(ratio, tiny_root, "--finetune", "td3bc", "--offline-ratio", "0.5", "--online-steps", "300",
        "--eval-every", "100", "--min-replay", "150")  # fmt: skip
    rows = [json.loads(x) for x in (ratio / "metrics.jsonl").read_text().splitlines()]
    online = [r for r in rows if "online/critic_loss" in r]
    # with a separate online buffer, no update before `min_replay` online samples (Acme)
    assert online[0]["online/critic_loss"] == 0.0 and online[1]["online/critic_loss"] > 0
    scratch = tmp_path / "scratch"
    proc = run(
        scratch, tiny_root, "--finetune", "td3", "--offline-steps", "0", "--offline-data", "none",
        "--online-steps", "300", "--eval-every", "100", "--min-replay", "200",
    )  # fmt: skip
    rows = [json.loads(x) for x in (scratch / "metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith("offline/") for r in rows for k in r)
    online = [r for r in rows if "online/critic_loss" in r]
    # no update before 200 online samples (min replay), then one per step
    assert online[0]["online/critic_loss"] == 0.0 and online[2]["online/critic_loss"] > 0
    assert "before fine-tuning" in proc.stdout
