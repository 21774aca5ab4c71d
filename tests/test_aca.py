import ast
import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from conftest import TINY_FLAGS, assert_same_run, run_script

from algorithms import aca
from common.networks import Critic, TanhGaussianPolicy, ValueNet, tanh_gaussian

REPO = pathlib.Path(__file__).resolve().parents[1]

OBS, ACT = 11, 3


def nets(hidden=(32, 32), action_dim=ACT):
    return TanhGaussianPolicy(action_dim, hidden), Critic(hidden), ValueNet(hidden)


def random_batch(n=64, obs_dim=OBS, action_dim=ACT, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return {
        "observations": f(rng.normal(size=(n, obs_dim))),
        "actions": f(rng.uniform(-0.99, 0.99, (n, action_dim))),
        "rewards": f(rng.normal(size=n)),
        "next_observations": f(rng.normal(size=(n, obs_dim))),
        "terminals": f(rng.uniform(size=n) < 0.1),
        "timeouts": jnp.zeros(n),
    }


def offline_state(args, action_dim=ACT, seed=0):
    actor, critic, baseline = nets(args.hidden_dims, action_dim)
    state = aca.create_offline_state(
        args, actor, critic, baseline, OBS, action_dim, jax.random.PRNGKey(seed)
    )
    return state, actor, critic, baseline


def test_log_density_from_the_pre_tanh_sample_matches_distrax():
    rng = np.random.default_rng(0)
    mean, log_std = rng.normal(size=(8, ACT)), rng.uniform(-2, 0.5, (8, ACT))
    u = mean + np.exp(log_std) * rng.normal(size=(8, ACT))
    ours = aca.squashed_log_prob(jnp.asarray(u), jnp.asarray(mean), jnp.asarray(log_std))
    ref = tanh_gaussian(jnp.asarray(mean), jnp.asarray(log_std)).log_prob(jnp.tanh(u))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    # ...and stays finite where tanh saturates in float32 (distrax would need atanh(1) = inf)
    far = aca.squashed_log_prob(jnp.full((1, ACT), 30.0), jnp.zeros((1, ACT)), jnp.zeros((1, ACT)))
    assert np.isfinite(far).all()


def test_ml_actor_loss_matches_a_direct_computation():
    rng = np.random.default_rng(1)
    logp_data, q, logp = rng.normal(size=16), rng.normal(50, 10, 16), rng.normal(size=16)
    loss, lam = aca.ml_actor_loss(*map(jnp.asarray, (logp_data, q, logp)), 0.2, 30.0)
    lam_ref = 30.0 / np.abs(q).mean()
    ref = -logp_data.mean() - lam_ref * (q - 0.2 * logp).mean()  # Eq. (4)
    assert float(lam) == pytest.approx(lam_ref, rel=1e-5)
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    # lambda is held fixed: dL/dQ = -lambda / B
    grad = jax.grad(lambda q_: aca.ml_actor_loss(jnp.asarray(logp_data), q_, jnp.asarray(logp), 0.2, 30.0)[0])(jnp.asarray(q))  # fmt: skip  # noqa: E501
    np.testing.assert_allclose(grad, np.full(16, -lam_ref / 16), rtol=1e-5)


def test_baseline_target_and_loss_match_eq_8():
    rng = np.random.default_rng(2)
    r, d = rng.normal(size=5), np.array([0, 0, 1, 0, 1.0])
    logp_next, z_next = rng.normal(size=5), rng.normal(size=(2, 5))
    y = aca.baseline_target(*map(jnp.asarray, (r, d, logp_next, z_next)), 0.3, 0.99)
    ref = r + 0.99 * (1 - d) * (logp_next + z_next.min(0) - 0.3 * logp_next)
    np.testing.assert_allclose(y, ref, rtol=1e-5)
    z, logp_data = rng.normal(size=(2, 5)), rng.normal(size=5)
    loss = aca.baseline_loss(jnp.asarray(z), jnp.asarray(logp_data), jnp.asarray(ref))
    assert float(loss) == pytest.approx(((logp_data + z - ref) ** 2).mean(1).sum(), rel=1e-5)


@pytest.mark.parametrize("backup_entropy", [True, False])
def test_offline_update_drops_the_entropy_from_z_target_with_the_critics(
    backup_entropy, monkeypatch
):
    # --no-offline-backup-entropy removes -alpha log pi(a'|s') from every offline backup: Z's
    # target is then Eq. (8) as printed, r + gamma (1-d) [log pi(a'|s') + min_i Z_i(s')]. A spy
    # on Z's target hands its inputs and output out of the jitted update (a debug callback),
    # checked against NumPy from those inputs.
    args = aca.Args(hidden_dims=(32, 32), offline_backup_entropy=backup_entropy)
    state, actor, critic, baseline = offline_state(args)
    seen = {}

    def spy(rewards, terminals, log_pi_next, z_next, alpha, gamma):
        y = aca_baseline_target(rewards, terminals, log_pi_next, z_next, alpha, gamma)
        record = lambda *a: seen.update(zip(("r", "d", "logp", "z", "y"), a, strict=True))  # noqa: E731
        jax.debug.callback(record, rewards, terminals, log_pi_next, z_next, y)
        return y

    aca_baseline_target = aca.baseline_target
    monkeypatch.setattr(aca, "baseline_target", spy)
    batch = random_batch()
    new, _ = jax.jit(aca.make_offline_update(args, actor, critic, baseline, ACT))(state, batch)
    jax.effects_barrier()
    r, d, logp, z = (np.asarray(seen[k], np.float64) for k in ("r", "d", "logp", "z"))
    alpha = float(np.exp(new.log_alpha.params["v"]))
    assert alpha > 0.5  # far from 0, so the two readings differ
    ref_y = r + 0.99 * (1 - d) * (logp + z.min(0) - (alpha * logp if backup_entropy else 0.0))
    np.testing.assert_allclose(seen["y"], ref_y, rtol=1e-5, atol=1e-5)


def test_cql_regularizer_is_the_same_function_as_off2on_balanced():
    def source(path):
        tree = ast.parse(path.read_text())
        (fn,) = [n for n in tree.body if getattr(n, "name", None) == "cql_regularizer"]
        return ast.get_source_segment(path.read_text(), fn)

    assert source(REPO / "algorithms/aca.py") == source(REPO / "algorithms/off2on_balanced.py")


def test_alignment_makes_r_equal_z_for_every_action():
    args = aca.Args(hidden_dims=(32, 32))
    state, _, critic, baseline = offline_state(args)
    r_params = aca.align_critic(state.baseline.params, OBS, ACT)
    rng = np.random.default_rng(3)
    obs = jnp.asarray(rng.normal(size=(20, OBS)), jnp.float32)
    z = aca.twin(baseline, state.baseline.params, obs)  # [2, 20]
    for _ in range(5):
        actions = jnp.asarray(rng.uniform(-1, 1, (20, ACT)), jnp.float32)
        np.testing.assert_allclose(aca.twin(critic, r_params, obs, actions), z, atol=1e-5)
    # the online state of ACA starts from exactly these critics (and targets), alpha = 1
    online = aca.create_online_state(args, state, OBS, ACT, None, jax.random.PRNGKey(0))
    for a, b in zip(jax.tree_util.tree_leaves(online.critic.params), jax.tree_util.tree_leaves(r_params), strict=True):  # fmt: skip  # noqa: E501
        np.testing.assert_array_equal(a, b)
    assert float(online.log_alpha.params["v"]) == 0.0


def test_the_sac_optimal_policy_of_the_aligned_critic_is_pi0():
    """With k = 1 and alpha = 1, softmax(Q(s, .)) over an action grid equals pi_0 on the grid
    (SAC's optimal policy, Eq. 2, of the aligned critic, Eq. 10/19)."""
    args = aca.Args(hidden_dims=(32, 32))
    state, actor, critic, baseline = offline_state(args, action_dim=1, seed=4)
    r_params = aca.align_critic(state.baseline.params, OBS, 1)
    grid = jnp.linspace(-0.995, 0.995, 401)[:, None]  # [G, 1] actions
    obs = jnp.asarray(np.random.default_rng(4).normal(size=(3, OBS)), jnp.float32)
    for s in obs:
        s_rep = jnp.broadcast_to(s, (grid.shape[0], OBS))
        mean, log_std = actor.apply(state.actor.params, s_rep)
        log_pi0 = aca.squashed_log_prob(aca.pre_tanh(grid), mean, log_std)
        clipped = aca.beta_clip(log_pi0, aca.beta_clip_point(mean, log_std, 20.0))
        q = 1.0 * clipped + aca.twin(critic, r_params, s_rep, grid).min(0)  # Eq. (19), k = 1
        soft_optimal = jax.nn.softmax(q / 1.0)
        density = jnp.exp(tanh_gaussian(mean, log_std).log_prob(grid))  # independent pi_0
        np.testing.assert_allclose(soft_optimal, density / density.sum(), rtol=2e-3, atol=1e-7)


def test_actor_gradient_vanishes_at_pi0_right_after_alignment():
    """One real online update (k = 1, alpha = 1) on a large batch: the actor gradient at pi_0
    is only Monte-Carlo noise, far smaller than when pi_0 differs from the actor."""
    args = aca.Args(hidden_dims=(32, 32), batch_size=8192, beta=20.0, k_init=1.0, k_min=1.0)
    settings = aca.online_settings(args, "medium")
    state, actor, critic, _ = offline_state(args, seed=5)
    online = aca.create_online_state(args, state, OBS, ACT, None, jax.random.PRNGKey(0))
    update = jax.jit(aca.make_online_update(args, settings, actor, critic, ACT))
    batch = random_batch(8192, seed=5)
    _, aligned = update(online, batch, jax.random.PRNGKey(1))
    shifted = online.replace(
        actor_0=jax.tree_util.tree_map(lambda x: x + 0.05, online.actor_0)  # pi_0 != pi
    )
    _, misaligned = update(shifted, batch, jax.random.PRNGKey(1))
    assert float(aligned["k"]) == 1.0 and float(aligned["alpha"]) == pytest.approx(1.0, abs=1e-3)
    assert float(aligned["actor_grad_norm"]) < 0.1 * float(misaligned["actor_grad_norm"])


def test_beta_clip_keeps_large_values_and_bounds_small_ones():
    args = aca.Args(hidden_dims=(32, 32))
    state, actor, _, _ = offline_state(args, seed=6)
    rng = np.random.default_rng(6)
    obs = jnp.asarray(rng.normal(size=(256, OBS)), jnp.float32)
    mean, log_std = actor.apply(state.actor.params, obs)
    clip_at = aca.beta_clip_point(mean, log_std, 7.0)
    # pre-tanh points from the mode out to 12 standard deviations: log pi_0 spans the clip point
    u = mean + jnp.exp(log_std) * jnp.asarray(rng.uniform(-12, 12, (256, ACT)), jnp.float32)
    log_pi0 = aca.squashed_log_prob(u, mean, log_std)
    clipped = aca.beta_clip(log_pi0, clip_at)
    above, below = log_pi0 > clip_at + 6, log_pi0 < clip_at
    assert above.sum() > 20 and below.sum() > 20
    np.testing.assert_array_less(np.abs(clipped - log_pi0)[above], 0.003)  # softplus(-6)
    assert (clipped[below] >= clip_at[below]).all()
    assert (clipped[below] <= clip_at[below] + np.log(2) + 1e-5).all()
    assert (clipped >= log_pi0 - 1e-5).all()  # a lower clip never lowers a value


def test_k_schedule_follows_the_authors_decay():
    k0, big_k, k_min = 1.0, 40.0, 0.5
    k, iterated = k0, [k0]
    for _ in range(30_000):
        k = max(k - k0 / (big_k * 1000), k_min)
        iterated.append(k)
    for step in (0, 1, 10_000, 19_999, 20_000, 25_000, 30_000):
        assert float(aca.k_schedule(jnp.float32(step), k0, big_k, k_min)) == pytest.approx(
            iterated[step], abs=1e-6
        )
    assert float(aca.k_schedule(jnp.float32(10_000), k0, big_k, k_min)) == pytest.approx(0.75)
    assert float(aca.k_schedule(jnp.float32(20_000), k0, big_k, k_min)) == pytest.approx(0.5)
    assert float(aca.k_schedule(jnp.float32(5_000), 1.0, 10.0, 0.0)) == pytest.approx(0.5)
    assert float(aca.k_schedule(jnp.float32(50_000), 1.0, 100.0, 1.0)) == 1.0  # expert: fixed


def test_per_dataset_defaults_and_overrides():
    s = aca.online_settings(aca.Args(), "medium-replay")
    assert (s.beta, s.k_init, s.k_decay_episodes, s.k_min, s.top_n) == (7.0, 1.0, 40.0, 0.5, 50)
    assert s.offline_data == "topn"
    s = aca.online_settings(aca.Args(offline_data="none"), "expert")
    assert s.beta == 22.5 and s.offline_data == "none"  # Appendix C.4: 1.5 beta without data
    s = aca.online_settings(aca.Args(finetune="sac", beta=3.0, top_n=7), "random")
    assert (s.beta, s.top_n, s.offline_data, s.k_min) == (3.0, 7, "all", 0.0)


def test_top_trajectories_selects_the_best_episodes():
    ids = np.repeat(np.arange(5), 3)
    transitions = {"rewards": jnp.arange(15.0)}
    returns = np.array([5.0, 1.0, 9.0, 3.0, 7.0])
    picked = aca.top_trajectories(transitions, ids, returns, 2)
    np.testing.assert_array_equal(picked["rewards"], [6, 7, 8, 12, 13, 14])  # episodes 2 and 4


def test_offline_update_learns_z_toward_its_fixed_point():
    """Many Algorithm-1 steps on one batch shrink the Eq. (8) residual."""
    args = aca.Args(hidden_dims=(32, 32))
    state, actor, critic, baseline = offline_state(args, seed=7)
    update = jax.jit(aca.make_offline_update(args, actor, critic, baseline, ACT))
    batch = random_batch(128, seed=7)
    first = None
    for _ in range(300):
        state, metrics = update(state, batch)
        first = first if first is not None else float(metrics["z_loss"])
    assert float(metrics["z_loss"]) < 0.5 * first
    assert np.isfinite([float(v) for v in metrics.values()]).all()


TINY = TINY_FLAGS["aca"]


def run(run_dir, minari_root, *extra, ok=True):
    return run_script("aca.py", TINY, run_dir, minari_root, *extra, ok=ok)


def test_tiny_run_and_exact_resume(tiny_root, tmp_path, tiny_run):
    # TINY's --k-decay-episodes 0.4: k falls by 1/400 per update, to k_min = 0.5 within the run
    full, stdout, _ = tiny_run("aca")
    assert "before fine-tuning" in stdout
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    k = [r["online/k"] for r in rows if "online/k" in r]
    assert len(k) == 6 and k[0] > k[1] > k[2] and k[-1] == pytest.approx(0.5)
    assert any(r.get("offline/z_loss", 0) > 0 for r in rows)
    part = tmp_path / "part"
    stopped = run(part, tiny_root, "--stop-after", "200", ok=False)
    assert "stopped after offline step 200" in stopped.stderr
    stopped = run(part, tiny_root, "--resume", "--stop-after", "800", ok=False)
    assert "stopped after global step 800" in stopped.stderr
    # the resumed offline bar counts from the checkpoint's step, out of the whole phase
    assert "200/400 [" in stopped.stderr and "0/200 [" not in stopped.stderr
    run(part, tiny_root, "--resume")
    assert_same_run(full, part)  # bit-identical state, same logged steps


def test_cql_pretraining_and_baselines_from_the_same_offline_checkpoint(tiny_root, tmp_path):
    cql = tmp_path / "cql"
    proc = run(cql, tiny_root, "--offline-algo", "cql", "--offline-data", "none")
    assert "buffer starts with 0 offline transitions" in proc.stdout
    rows = [json.loads(x) for x in (cql / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("offline/cql_gap", 0) != 0 for r in rows)
    # SAC -> SAC from that checkpoint: all 2000 offline transitions in the buffer, k unused
    sac = tmp_path / "sac"
    ckpt = str(cql / "offline.npz")
    proc = run(sac, tiny_root, "--offline-checkpoint", ckpt, "--finetune", "sac")
    assert "buffer starts with 2000 offline transitions (all)" in proc.stdout
    rows = [json.loads(x) for x in (sac / "metrics.jsonl").read_text().splitlines()]
    assert all(r["online/log_pi0"] == 0 for r in rows if "online/log_pi0" in r)
    topn = tmp_path / "topn"
    proc = run(topn, tiny_root, "--offline-checkpoint", ckpt, "--finetune", "r-init-q",
               "--top-n", "5")  # fmt: skip
    assert "top 5 episodes" in proc.stdout
    assert int(proc.stdout.split("buffer starts with ")[1].split()[0]) > 0


# ---- Independent NumPy checks of the equations (tests/reference.py) ----


def np_log_pi(params, obs, u):
    """log pi(tanh(u)|s) of the tanh-Gaussian policy `params`, from the pre-tanh u."""
    mean, log_std = ref.gaussian_policy(params, obs)
    return ref.tanh_gaussian_log_prob(u, mean, np.exp(log_std))


def np_clip_log_pi0(params0, obs, u, beta):
    """Eq. (12)-(13): softplus(log pi_0 - C) + C, C = min(log pi_0(mu -+ beta sigma))."""
    mean, log_std = ref.gaussian_policy(params0, obs)
    std = np.exp(log_std)
    c = np.minimum(
        ref.tanh_gaussian_log_prob(mean - beta * std, mean, std),
        ref.tanh_gaussian_log_prob(mean + beta * std, mean, std),
    )
    return np.logaddexp(0.0, np_log_pi(params0, obs, u) - c) + c


def test_temperature_loss_is_eq6_on_log_alpha():
    """Eq. (6): d/d log alpha of -log alpha (log pi + H_target) = -(E log pi + H_target), the
    same at every alpha (through exp(log alpha) it would shrink with alpha)."""
    logp = jnp.asarray(np.random.default_rng(0).normal(size=32), jnp.float32)
    expected = -(float(np.mean(np.asarray(logp, np.float64))) - 3.0)
    for log_alpha in (0.0, -5.0, -20.0):
        grad = jax.grad(lambda x: aca.temperature_loss(x, logp, -3.0))(jnp.float32(log_alpha))
        assert float(grad) == pytest.approx(expected, rel=1e-5)


def test_beta_clip_is_eq13():
    rng = np.random.default_rng(2)
    mean = rng.normal(size=(16, ACT))
    log_std = rng.uniform(-2, 0.5, (16, ACT))
    u = mean + np.exp(log_std) * rng.uniform(-10, 10, (16, ACT))
    std = np.exp(log_std)
    c = np.minimum(
        ref.tanh_gaussian_log_prob(mean - 7 * std, mean, std),
        ref.tanh_gaussian_log_prob(mean + 7 * std, mean, std),
    )
    f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    ours_c = aca.beta_clip_point(f(mean), f(log_std), 7.0)
    np.testing.assert_allclose(ours_c, c, rtol=1e-4, atol=1e-4)
    log_pi0 = ref.tanh_gaussian_log_prob(u, mean, std)
    np.testing.assert_allclose(
        aca.beta_clip(f(log_pi0), ours_c), np.logaddexp(0.0, log_pi0 - c) + c, rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("backup_entropy", [True, False])
def test_offline_critic_loss_is_eq5_with_the_updated_temperature(backup_entropy):
    """Eq. (5): y = r + gamma (1 - d) (min_j Q'_j(s', a') - alpha log pi(a'|s')), a' = tanh(u'),
    u' ~ N(mu(s'), sigma(s')), alpha after this step's Eq. (6) update; loss = sum_j mean
    (Q_j(s, a) - y)^2; without the entropy backup y drops its alpha log pi term. Draws use the
    update's key convention; the rest is NumPy."""
    args = aca.Args(hidden_dims=(8, 8), offline_backup_entropy=backup_entropy)
    state, actor, critic, baseline = offline_state(args, seed=3)
    shift = lambda t, d: jax.tree_util.tree_map(lambda x: x + d, t)  # noqa: E731
    state = state.replace(critic_target=shift(state.critic_target, 0.05))
    batch = random_batch(32, seed=3)
    b = {k: np.asarray(v, np.float64) for k, v in batch.items()}
    snapshot = ref.np_tree({"actor": state.actor.params, "target": state.critic_target,
                            "critic": state.critic.params})  # fmt: skip
    _, k_alpha, k_next, *_ = jax.random.split(state.key, 7)
    new, metrics = jax.jit(aca.make_offline_update(args, actor, critic, baseline, ACT))(
        state, batch
    )
    alpha = float(np.exp(float(new.log_alpha.params["v"])))
    mean, log_std = ref.gaussian_policy(snapshot["actor"], b["next_observations"])
    u = mean + np.exp(log_std) * np.asarray(jax.random.normal(k_next, mean.shape), np.float64)
    logp = ref.tanh_gaussian_log_prob(u, mean, np.exp(log_std))
    next_q = np.minimum(*[
        ref.critic(ref.member(snapshot["target"], j), b["next_observations"], np.tanh(u))
        for j in range(2)
    ])  # fmt: skip
    bonus = -alpha * logp if backup_entropy else 0.0
    y = b["rewards"] + 0.99 * (1 - b["terminals"]) * (next_q + bonus)
    loss = sum(
        np.mean(
            (ref.critic(ref.member(snapshot["critic"], j), b["observations"], b["actions"]) - y)
            ** 2
        )
        for j in range(2)
    )
    assert float(metrics["critic_loss"]) == pytest.approx(loss, rel=1e-4)


@pytest.mark.parametrize("offline_backup_entropy", [True, False])
def test_online_critic_and_actor_losses_are_eq20_to_22(offline_backup_entropy):
    """Eq. (21)-(22): Q_j(s, a) = k CLIP(log pi_0(a|s)) + R_j(s, a), target y = r + gamma (1-d)
    [min_j R'_j(s', a') + k CLIP(log pi_0(a'|s')) - alpha log pi(a'|s')]; Eq. (20): actor loss
    E[alpha log pi(b|s) - (min_j R_j(s, b) + k CLIP(log pi_0(b|s)))] with the updated R. The
    online target keeps its entropy term whatever --offline-backup-entropy says."""
    args = aca.Args(hidden_dims=(8, 8), k_init=0.8, offline_backup_entropy=offline_backup_entropy)
    settings = aca.online_settings(args, "medium")
    state, actor, critic, _ = offline_state(args, seed=4)
    online = aca.create_online_state(args, state, OBS, ACT, None, jax.random.PRNGKey(0))
    rng = np.random.default_rng(4)
    noisy = lambda t: jax.tree_util.tree_map(  # noqa: E731
        lambda x: x + jnp.asarray(rng.normal(0, 0.1, x.shape), jnp.float32), t
    )
    online = online.replace(
        actor=online.actor.replace(params=noisy(online.actor.params)),
        critic=online.critic.replace(params=noisy(online.critic.params)),
        critic_target=noisy(online.critic_target),
    )
    batch = random_batch(32, seed=4)
    b = {k: np.asarray(v, np.float64) for k, v in batch.items()}
    snap = ref.np_tree(
        {"actor": online.actor.params, "actor_0": online.actor_0,
         "critic": online.critic.params, "target": online.critic_target}
    )  # fmt: skip
    key = jax.random.PRNGKey(9)
    new, metrics = aca.make_online_update(args, settings, actor, critic, ACT)(online, batch, key)
    _, k_next, k_pi = jax.random.split(key, 3)
    alpha, k, beta = float(metrics["alpha"]), 0.8, settings.beta
    assert float(metrics["k"]) == pytest.approx(k)
    obs, nobs = b["observations"], b["next_observations"]

    mean, log_std = ref.gaussian_policy(snap["actor"], nobs)
    u_next = mean + np.exp(log_std) * np.asarray(jax.random.normal(k_next, mean.shape), np.float64)
    r_next = np.minimum(*[
        ref.critic(ref.member(snap["target"], j), nobs, np.tanh(u_next)) for j in range(2)
    ])  # fmt: skip
    y = b["rewards"] + 0.99 * (1 - b["terminals"]) * (
        r_next
        + k * np_clip_log_pi0(snap["actor_0"], nobs, u_next, beta)
        - alpha * np_log_pi(snap["actor"], nobs, u_next)
    )
    u_data = np.arctanh(np.clip(b["actions"], -1 + 1e-6, 1 - 1e-6))
    prior_data = k * np_clip_log_pi0(snap["actor_0"], obs, u_data, beta)
    critic_loss = sum(
        np.mean(
            (prior_data + ref.critic(ref.member(snap["critic"], j), obs, b["actions"]) - y) ** 2
        )
        for j in range(2)
    )
    assert float(metrics["critic_loss"]) == pytest.approx(critic_loss, rel=1e-4)

    mean, log_std = ref.gaussian_policy(snap["actor"], obs)
    u = mean + np.exp(log_std) * np.asarray(jax.random.normal(k_pi, mean.shape), np.float64)
    r_new = ref.np_tree(new.critic.params)
    r_pi = np.minimum(*[ref.critic(ref.member(r_new, j), obs, np.tanh(u)) for j in range(2)])
    actor_loss = np.mean(
        alpha * np_log_pi(snap["actor"], obs, u)
        - (r_pi + k * np_clip_log_pi0(snap["actor_0"], obs, u, beta))
    )
    assert float(metrics["actor_loss"]) == pytest.approx(actor_loss, rel=1e-4, abs=1e-4)


def test_sacml_divergence_branches_continue_the_run_exactly(tiny_root, tmp_path):
    """studies/sacml_divergence: the control branch reproduces the run it starts from (same
    metrics, bit for bit) and fixed-alpha holds the temperature at its checkpoint value, also
    after resuming from its own checkpoint."""
    import shutil
    import subprocess

    run_dir, saved = tmp_path / "run", tmp_path / "at200"
    flags = ("--online-steps", "0")
    run(run_dir, tiny_root, *flags, "--stop-after", "200", ok=False)
    shutil.copytree(run_dir, saved)  # the mid-pretraining checkpoint (step 200)
    run(run_dir, tiny_root, *flags, "--resume")  # the run itself, on to step 400

    def branch(variant, steps=200):
        out = tmp_path / variant
        proc = subprocess.run(
            [sys.executable, "-m", "studies.sacml_divergence.sacml_divergence", "--checkpoint",
             str(saved / "checkpoint.npz"), "--variant", variant, "--steps", str(steps),
             "--eval-every", "200", "--out", str(out)],
            cwd=REPO, capture_output=True, text=True,
            env={**os.environ, "MINARI_DATASETS_PATH": str(tiny_root)},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    original = {r["step"]: r for r in logged if "offline/critic_loss" in r and r["step"] > 200}
    control = branch("control")
    assert [r["step"] for r in control] == [300, 400] == sorted(original)
    for row in control:
        for key in ("critic_loss", "actor_loss", "alpha", "z_loss"):
            assert row[f"train/{key}"] == original[row["step"]][f"offline/{key}"], key
    assert control[-1]["eval/normalized_score"] == pytest.approx(
        next(
            r["eval/normalized_score"]
            for r in logged
            if r["step"] == 400 and "eval/normalized_score" in r
        )
    )
    fixed = branch("fixed-alpha")
    with np.load(saved / "checkpoint.npz") as ckpt:
        alpha = float(np.exp(ckpt[".log_alpha.params['v']"]))
    assert [r["train/alpha"] for r in fixed] == pytest.approx([alpha, alpha], rel=1e-6)
    assert control[0]["train/alpha"] != pytest.approx(alpha, rel=1e-6)  # it does move
    resumed = branch("fixed-alpha", steps=400)  # resumes its own (frozen) checkpoint at 400
    assert [r["step"] for r in resumed] == [300, 400, 500, 600]
    assert [r["train/alpha"] for r in resumed] == pytest.approx([alpha] * 4, rel=1e-6)
