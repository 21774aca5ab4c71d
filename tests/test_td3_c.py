import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_same_run, run_script  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "algorithms"))
import td3_c  # noqa: E402

from common.buffers import ReplayBuffer  # noqa: E402


def test_td3bc_loss_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    q = rng.normal(5.0, 2.0, size=16)
    pi, a = rng.uniform(-1, 1, (16, 3)), rng.uniform(-1, 1, (16, 3))
    ours = td3_c.td3bc_actor_loss(jnp.asarray(q), jnp.asarray(pi), jnp.asarray(a), 2.5)
    lam = 2.5 / np.abs(q).mean()
    assert float(ours) == pytest.approx(-lam * q.mean() + ((pi - a) ** 2).sum(-1).mean(), rel=1e-5)
    # lambda carries no gradient: dL/dq = -lambda / B exactly
    grad_q = jax.grad(lambda q_: td3_c.td3bc_actor_loss(q_, jnp.asarray(pi), jnp.asarray(a), 2.5))(
        jnp.asarray(q)
    )
    np.testing.assert_allclose(grad_q, np.full(16, -lam / 16), rtol=1e-5)


def test_dual_grows_when_violated_and_decays_to_zero_when_slack():
    args = td3_c.Args(dual_lr=0.1)
    actor, critic = td3_c.make_networks(args, 3)
    state = td3_c.create_state(args, actor, critic, 11, 3, jax.random.PRNGKey(0), None)
    dual, eps, values = state.dual, 1e-5, []
    for _ in range(50):  # violated: the constraint is twice the trust region
        dual = td3_c.dual_step(dual, 2 * eps, eps)
        values.append(float(dual.params["v"]))
    assert all(b > a for a, b in zip(values, values[1:], strict=False)) and values[-1] > 1.0
    for _ in range(500):  # slack: well inside the trust region
        dual = td3_c.dual_step(dual, 0.0, eps)
        assert float(dual.params["v"]) >= 0.0
    assert float(dual.params["v"]) == 0.0


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


TINY = [
    "--env",
    "hopper-medium-v2",
    "--hidden-dims",
    "32",
    "32",
    "--batch-size",
    "32",
    "--offline-steps",
    "400",
    "--log-every",
    "100",
    "--offline-eval-every",
    "200",
    "--online-steps",
    "600",
    "--eval-every",
    "300",
    "--eval-episodes",
    "1",
    "--checkpoint-every",
    "200",
    "--no-generate",
]


def run(run_dir, minari_root, *extra, ok=True):
    return run_script("td3_c.py", TINY, run_dir, minari_root, *extra, ok=ok)


def test_tiny_run_and_exact_resume(tiny_root, tmp_path):
    full = tmp_path / "full"
    proc = run(full, tiny_root)
    assert "before fine-tuning" in proc.stdout
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
    run(part, tiny_root, "--resume")
    assert_same_run(full, part)  # bit-identical state, same logged steps


def test_offline_ratio_and_no_offline_data_variants(tiny_root, tmp_path):
    ratio = tmp_path / "ratio"
    run(ratio, tiny_root, "--finetune", "td3bc", "--offline-ratio", "0.5", "--online-steps", "200",
        "--eval-every", "100")  # fmt: skip
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
