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
import bred  # noqa: E402

from common.buffers import ReplayBuffer  # noqa: E402
from common.logger import Logger  # noqa: E402
from common.networks import Critic, TanhGaussianPolicy, init_ensemble, tanh_gaussian  # noqa: E402


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


TINY = [
    "--env",
    "hopper-medium-v2",
    "--ensemble-size",
    "2",
    "--hidden-dims",
    "32",
    "32",
    "--batch-size",
    "32",
    "--offline-steps",
    "200",
    "--log-every",
    "100",
    "--offline-eval-every",
    "200",
    "--bc-steps",
    "100",
    "--distill-epochs",
    "4",
    "--distill-steps-per-epoch",
    "50",
    "--distill-patience",
    "2",
    "--online-steps",
    "400",
    "--steps-per-epoch",
    "100",
    "--first-epoch-multiplier",
    "2",
    "--online-buffer-size",
    "1000",
    "--anneal-steps",
    "200",
    "--eval-episodes",
    "1",
    "--checkpoint-every",
    "100",
    "--no-generate",
]


def run(run_dir, minari_root, *extra, ok=True):
    return run_script("bred.py", TINY, run_dir, minari_root, *extra, ok=ok)


def test_tiny_run_and_exact_resume(tiny_root, tmp_path):
    full = tmp_path / "full"
    proc = run(full, tiny_root)
    assert "before fine-tuning" in proc.stdout and "distillation: validation loss" in proc.stdout
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
