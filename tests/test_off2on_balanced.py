import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from conftest import TINY_FLAGS, assert_same_run, run_script
from flax.training.train_state import TrainState
from scipy.special import logsumexp

from algorithms import off2on_balanced as o2o
from common.buffers import PrioritizedBuffer

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_density_ratio_recovers_a_known_gaussian_ratio(net=None):
    """d_on = N(0.5, 1), d_off = N(0, 1) in one dimension (s = x, empty action):
    w* = exp(0.5 x - 0.125). Within 15% on [-1, 1.5] after JS training (Eq. 4). (`net`: the
    study studies/off2on_dr_output runs the same check on its softplus net.)"""
    net = net or o2o.DensityRatio((64, 64))
    key = jax.random.PRNGKey(0)
    params = net.init(key, jnp.zeros((1, 1)), jnp.zeros((1, 0)))
    state = TrainState.create(apply_fn=None, params=params, tx=optax.adam(1e-3))

    @jax.jit
    def step(state, key):
        k1, k2 = jax.random.split(key)
        off = jax.random.normal(k1, (512, 1))
        on = jax.random.normal(k2, (512, 1)) + 0.5
        none = jnp.zeros((512, 0))

        def loss(p):
            return o2o.js_density_ratio_loss(net.apply(p, off, none), net.apply(p, on, none))

        return state.apply_gradients(grads=jax.grad(loss)(state.params)), None

    state, _ = jax.lax.scan(step, state, jax.random.split(key, 3000))
    x = jnp.linspace(-1.0, 1.5, 11)[:, None]
    w = net.apply(state.params, x, jnp.zeros((11, 0)))
    true = jnp.exp(0.5 * x[:, 0] - 0.125)
    np.testing.assert_allclose(w, true, rtol=0.15)


def test_ensemble_policy_has_the_mixture_moments():
    """Eq. (5) on a hand-made 3-member ensemble: the mean and variance of the moment-matched
    Gaussian equal those of samples from the equal-weight mixture."""
    means = jnp.array([[[-1.0, 0.0]], [[0.5, 2.0]], [[2.0, -1.0]]])  # [N=3, B=1, A=2]
    stds = jnp.array([[[0.3, 1.0]], [[0.5, 0.2]], [[1.0, 0.1]]])
    mean, std = o2o.ensemble_moments(means, jnp.log(stds))
    expected_mean = means.mean(0)
    expected_var = (stds**2 + means**2).mean(0) - expected_mean**2
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-6)
    np.testing.assert_allclose(std**2, expected_var, rtol=1e-5)
    # Against Monte Carlo samples of the mixture itself.
    rng = np.random.default_rng(0)
    member = rng.integers(0, 3, 400_000)
    samples = rng.normal(np.asarray(means)[member, 0], np.asarray(stds)[member, 0])
    np.testing.assert_allclose(mean[0], samples.mean(0), atol=0.01)
    np.testing.assert_allclose(std[0], samples.std(0), rtol=0.01)
    # The clamp of the authors' code.
    _, tiny = o2o.ensemble_moments(jnp.zeros((2, 1, 1)), jnp.full((2, 1, 1), -30.0))
    assert float(tiny[0, 0]) == pytest.approx(math.exp(-20), rel=1e-4)


def test_cql_regularizer_matches_a_direct_computation():
    rng = np.random.default_rng(1)
    n, b, a = 4, 3, 2
    q_data = rng.normal(size=(2, b))
    q_rand, q_curr, q_next = (rng.normal(size=(2, n, b)) for _ in range(3))
    logp_curr, logp_next = rng.normal(size=(n, b)), rng.normal(size=(n, b))
    temperature = 0.7
    ours = o2o.cql_regularizer(
        *(
            jnp.asarray(x, jnp.float32)
            for x in (q_data, q_rand, q_curr, q_next, logp_curr, logp_next)
        ),
        a,
        temperature,
    )
    expected = []
    for j in range(2):  # each critic, loop over states: log-sum-exp of importance-weighted Q
        per_state = []
        for s in range(b):
            terms = [q_rand[j, i, s] - a * np.log(0.5) for i in range(n)]
            terms += [q_next[j, i, s] - logp_next[i, s] for i in range(n)]
            terms += [q_curr[j, i, s] - logp_curr[i, s] for i in range(n)]
            per_state.append(temperature * logsumexp(np.array(terms) / temperature) - q_data[j, s])
        expected.append(np.mean(per_state))
    np.testing.assert_allclose(ours, expected, rtol=1e-5)


def test_initial_online_priority_gives_the_intended_online_share():
    """M offline items at priority 1, then 1000 online items at the default priority:
    batches are then about f online."""
    num_offline, fraction = 20_000, 0.5
    buf = PrioritizedBuffer.from_data(
        {"x": jnp.zeros(num_offline)}, capacity=num_offline + 2000, keep=True
    )
    buf = buf.set_default_priority(o2o.initial_online_priority(num_offline, fraction, 1000))
    buf = buf.add_batch({"x": jnp.ones(1000)})
    keys = jax.random.split(jax.random.PRNGKey(0), 200)
    _, idx, _ = jax.vmap(lambda k: buf.sample(k, 256))(keys)
    online_share = float((idx >= num_offline).mean())
    assert online_share == pytest.approx(fraction, abs=0.01)
    # And f = 0.75 (the authors' README demo) gives three quarters.
    buf = PrioritizedBuffer.from_data({"x": jnp.zeros(num_offline)}, num_offline + 2000, keep=True)
    buf = buf.set_default_priority(o2o.initial_online_priority(num_offline, 0.75, 1000))
    _, idx, _ = jax.vmap(lambda k: buf.add_batch({"x": jnp.ones(1000)}).sample(k, 256))(keys)
    assert float((idx >= num_offline).mean()) == pytest.approx(0.75, abs=0.01)


def test_balanced_priorities_self_normalise_and_clamp():
    w = jnp.array([0.0, 1.0, 32.0, 1e20])
    ref = jnp.full(8, 32.0)  # w^(1/5) = 2 on the offline reference batch
    p = o2o.balanced_priorities(w, ref, temperature=5.0)
    np.testing.assert_allclose(p, [1e-3, 0.5, 1.0, 1e3], rtol=1e-5)


def test_auroc_by_hand():
    assert float(o2o.auroc(jnp.array([3.0, 4.0]), jnp.array([1.0, 2.0]))) == 1.0
    assert float(o2o.auroc(jnp.array([1.0, 4.0]), jnp.array([2.0, 3.0]))) == 0.5
    assert float(o2o.auroc(jnp.array([1.0]), jnp.array([2.0, 0.0, 3.0]))) == pytest.approx(1 / 3)


def test_ensemble_moments_gradient_is_finite_where_the_variance_would_cancel():
    """Identical members with a large mean and a small std: E[sigma^2 + mu^2] - mu_bar^2
    cancels in float32 (sqrt(0), NaN gradient); mean(sigma^2) + mean((mu_i - mu_bar)^2) does
    not. d std / d log_sigma_i = sigma_i^2 / (N std) by hand."""
    means = jnp.full((3, 1, 2), 300.0)
    log_stds = jnp.log(jnp.array([[[4e-3, 1e-2]], [[6e-3, 2e-2]], [[5e-3, 3e-2]]]))
    _, std = o2o.ensemble_moments(means, log_stds)
    sig = np.exp(np.asarray(log_stds, np.float64))
    expected_std = np.sqrt((sig**2).mean(0))
    np.testing.assert_allclose(std, expected_std, rtol=1e-5)
    grads = jax.grad(lambda m, ls: o2o.ensemble_moments(m, ls)[1].sum(), argnums=(0, 1))(
        means, log_stds
    )
    assert all(bool(jnp.isfinite(g).all()) for g in grads)
    np.testing.assert_allclose(grads[1], sig**2 / (3 * expected_std), rtol=1e-4)
    np.testing.assert_allclose(grads[0], 0.0, atol=1e-6)  # equal means: no spread gradient


def test_density_ratio_starts_near_one_everywhere(net=None):
    """Last layer U(-3e-3, 3e-3), bias 1 (authors' init): w(s, a) ~ 1 even for raw,
    large-scale observations, so no input starts in the dead region of the output ReLU.
    (`net`: the study's softplus net, bias log(e - 1), is checked the same way.)"""
    net = net or o2o.DensityRatio()
    rng = np.random.default_rng(0)
    obs = jnp.asarray(rng.normal(0.0, 10.0, (4096, 17)), jnp.float32)
    act = jnp.asarray(rng.uniform(-1, 1, (4096, 6)), jnp.float32)
    for seed in range(3):
        w = net.apply(net.init(jax.random.PRNGKey(seed), obs[:1], act[:1]), obs, act)
        assert float(w.min()) > 0.5 and float(w.max()) < 1.5


def small_online(args, num_offline=64, num_online=32, seed=0):
    """A fine-tuning state of N=2 tiny members (obs 3, actions 2) whose every observation is the
    same s0 (so losses do not depend on which rows a batch draws); offline rows share one action
    a0, online rows have distinct actions. -> (state, insert_and_train, nets, online rows)."""
    actor = o2o.TanhGaussianPolicy(2, args.hidden_dims)
    critic = o2o.Critic(args.hidden_dims)
    density_ratio = o2o.DensityRatio(args.hidden_dims)
    rng = np.random.default_rng(seed)
    s0 = rng.normal(size=3).astype(np.float32)

    def rows(n, actions):
        return {
            "observations": jnp.asarray(np.tile(s0, (n, 1))),
            "actions": jnp.asarray(actions, jnp.float32),
            "rewards": jnp.asarray(rng.normal(size=n), jnp.float32),
            "next_observations": jnp.asarray(np.tile(s0, (n, 1))),
            "terminals": jnp.zeros(n, jnp.float32),
        }

    offline = rows(num_offline, np.tile(rng.uniform(-1, 1, 2), (num_offline, 1)))
    online = rows(num_online, rng.uniform(-1, 1, (num_online, 2)))
    key = jax.random.PRNGKey(seed)
    members = o2o.create_cql_members(args, actor, critic, 3, 2, key)
    state = o2o.create_online_state(args, members, offline, density_ratio, key, key)
    update = o2o.make_online_update(args, actor, critic, density_ratio, 2, num_offline)
    return state, update, (actor, critic, density_ratio), online


def test_new_online_samples_enter_at_the_max_priority(entry="max"):
    """The first epoch's samples enter at the initial-fraction priority M f / ((1 - f) k) (here
    64 * 0.5 / (0.5 * 32) = 2); later epochs' at the running maximum (the authors'). Read off the
    sum-tree's leaves. (studies/off2on_dr_output enters them at 1: `entry="one"`.)"""
    args = o2o.Args(ensemble_size=2, hidden_dims=(8,), batch_size=8, dr_batch_size=8,
                    steps_per_epoch=32)  # fmt: skip
    state, update, _, online = small_online(args)
    half = jax.tree_util.tree_map(lambda x: x[:16], online)
    state, _ = update(state, half, 0)  # the first epoch (env_steps 0), no updates
    state = state.replace(env_steps=state.env_steps + 32)
    state, _ = update(state, jax.tree_util.tree_map(lambda x: x[16:], online), 0)
    leaves = np.asarray(state.buffer.tree[state.buffer.num_leaves :])
    np.testing.assert_allclose(leaves[:64], 1.0)  # the offline data
    np.testing.assert_allclose(leaves[64:80], 2.0)
    np.testing.assert_allclose(leaves[80:96], 2.0 if entry == "max" else 1.0)


def np_density_ratio(params, obs, actions):
    p = ref.np_tree(params)["params"]
    x = np.concatenate([obs, actions], -1)
    for i in range(len(p) - 1):
        x = np.maximum(ref.dense(p[f"Dense_{i}"], x), 0.0)
    return np.maximum(ref.dense(p[f"Dense_{len(p) - 1}"], x)[..., 0], 0.0)


def test_priorities_come_from_the_density_ratio_before_its_step():
    """Eq. (6) as the authors compute it: the sampled rows get w^(1/T) of the density-ratio net
    *before* its update, normalised by the mean w^(1/T) over that step's offline batch
    (here every offline row is (s0, a0), so the norm is w(s0, a0)^(1/T)), clamped; every other
    slot keeps its priority."""
    args = o2o.Args(ensemble_size=2, hidden_dims=(8, 8), batch_size=16, dr_batch_size=16,
                    dr_lr=0.05, temperature=2.0)  # fmt: skip
    state, update, _, online = small_online(args)
    rng = np.random.default_rng(1)
    dr = jax.tree_util.tree_map(  # a random net (w far from 1), positive output bias
        lambda x: jnp.asarray(rng.normal(0, 0.7, x.shape), jnp.float32), state.density_ratio.params
    )
    dr["params"]["Dense_2"]["bias"] = jnp.array([2.0])
    state = state.replace(density_ratio=state.density_ratio.replace(params=dr))
    before_update = np.asarray(state.buffer.add_batch(online).priorities)
    dr = ref.np_tree(dr)  # the update donates (deletes) the state's arrays
    new, _ = update(state, online, jnp.int32(1))
    after = np.asarray(new.buffer.priorities, np.float64)
    data = {k: np.asarray(v, np.float64) for k, v in new.buffer.storage.data.items()}
    obs, act = data["observations"][:96], data["actions"][:96]
    norm = np_density_ratio(dr, obs[:1], act[:1]) ** 0.5
    expected = np.clip(np_density_ratio(dr, obs, act) ** 0.5 / (norm + 1e-10), 1e-3, 1e3)
    stepped = np.clip(
        np_density_ratio(new.density_ratio.params, obs, act) ** 0.5
        / (np_density_ratio(new.density_ratio.params, obs[:1], act[:1]) ** 0.5 + 1e-10),
        1e-3,
        1e3,
    )
    changed = ~np.isclose(after[:96], np.asarray(before_update[:96]), rtol=1e-6)
    assert changed[64:].sum() >= 3  # some online rows were sampled and re-prioritised
    np.testing.assert_allclose(after[:96][changed], expected[changed], rtol=1e-4)
    assert not np.allclose(after[:96][changed], stepped[changed], rtol=1e-3)
    assert np.all(after[96:] == 0.0)


def test_actor_uses_the_critics_before_their_step_and_targets_start_as_online_copies():
    """Eq. (2) against the mean over members of min(Q1, Q2) of the critics *before* this
    step's update (authors' code); with near-zero policy std the action is tanh(mu(s0)), so
    -actor_loss - alpha * entropy = mean_i min_j Q_ij(s0, tanh(mu(s0))). The temperature
    takes its first Adam step (~ +-lr) at the policy's learning rate."""
    args = o2o.Args(ensemble_size=2, hidden_dims=(8, 8), batch_size=16, q_lr=0.5,
                    policy_lr=0.01, replay="uniform")  # fmt: skip
    state, update, (actor, critic, _), online = small_online(args)
    ref.assert_tree_close(ref.np_tree(state.critic_target), ref.np_tree(state.critic.params))
    params = jax.tree_util.tree_map(lambda x: jnp.stack([x[0], x[0]]), state.actor.params)
    params["params"]["Dense_1"]["bias"] = jnp.full((2, 2), -100.0)  # log std clamped to -20
    params["params"]["Dense_1"]["kernel"] = jnp.zeros_like(params["params"]["Dense_1"]["kernel"])
    state = state.replace(actor=state.actor.replace(params=params))
    critics_before, params = ref.np_tree(state.critic.params), ref.np_tree(params)
    new, metrics = update(state, online, jnp.int32(1))  # donates (deletes) `state`
    s0 = np.asarray(online["observations"][:1], np.float64)
    mean, _ = ref.gaussian_policy(ref.member(ref.np_tree(params), 0), s0)
    action = np.tanh(mean)

    def q_ensemble(critic_params):
        c = ref.np_tree(critic_params)
        return np.mean([
            min(ref.critic(ref.member(ref.member(c, i), j), s0, action)[0] for j in range(2))
            for i in range(2)
        ])  # fmt: skip

    q_term = -float(metrics["actor_loss"]) - float(metrics["alpha"]) * float(metrics["entropy"])
    assert q_term == pytest.approx(q_ensemble(critics_before), abs=2e-3)
    assert abs(q_ensemble(new.critic.params) - q_ensemble(critics_before)) > 0.05
    assert abs(float(new.log_alpha.params["v"])) == pytest.approx(0.01, rel=1e-3)


def test_uniform_replay_draws_offline_in_proportion_to_its_share():
    """--replay uniform: one buffer, every filled slot equally likely, so the offline share of
    the batches is M / (M + online) = 64 / 96."""
    args = o2o.Args(ensemble_size=2, hidden_dims=(8, 8), batch_size=256, replay="uniform")
    state, update, _, online = small_online(args)
    _, metrics = update(state, online, jnp.int32(50))
    assert float(metrics["offline_fraction"]) == pytest.approx(64 / 96, abs=0.02)


def test_online_cql_gap_is_eq3_with_the_policy_actions():
    """--online-cql (CoRL Appendix E, BRED Fig. 10): for each twin critic, the mean over states
    of log[ sum_i exp(Q(s, u_i) - log 0.5^|A|) + sum_i exp(Q(s, a'_i) - log pi(a'_i|s'))
    + sum_i exp(Q(s, a_i) - log pi(a_i|s)) ] - mean Q(s, a_data), with u_i uniform on [-1, 1]^|A|,
    a_i ~ pi(.|s), a'_i ~ pi(.|s'). The draws use the function's key convention (split into
    uniform / pi(s) / pi(s') keys; tanh-Gaussian = tanh(mean + std * normal)); the rest is NumPy."""
    args = o2o.Args(hidden_dims=(8, 8), cql_n_actions=3, cql_temperature=1.0)
    actor, critic = o2o.TanhGaussianPolicy(2, (8, 8)), o2o.Critic((8, 8))
    key = jax.random.PRNGKey(0)
    rng = np.random.default_rng(0)
    obs = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    next_obs = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    data_actions = jnp.asarray(rng.uniform(-1, 1, (5, 2)), jnp.float32)
    a_params = actor.init(key, obs)
    c_params = jax.vmap(lambda k: critic.init(k, obs, data_actions))(jax.random.split(key))
    q_data = jax.vmap(critic.apply, in_axes=(0, None, None))(c_params, obs, data_actions)
    gap = o2o.online_cql_gap(args, actor, critic, a_params, c_params, obs, next_obs, q_data, key)

    k_rand, k_curr, k_next = jax.random.split(key, 3)
    pa, pc = ref.np_tree(a_params), ref.np_tree(c_params)
    o, o2 = np.asarray(obs, np.float64), np.asarray(next_obs, np.float64)

    def draw(k, at):
        mean, log_std = ref.gaussian_policy(pa, at)
        u = mean + np.exp(log_std) * np.asarray(jax.random.normal(k, (3, 5, 2)), np.float64)
        return np.tanh(u), ref.tanh_gaussian_log_prob(u, mean, np.exp(log_std))

    curr, logp_curr = draw(k_curr, o)
    nxt, logp_next = draw(k_next, o2)
    unif = np.asarray(jax.random.uniform(k_rand, (3, 5, 2), minval=-1, maxval=1), np.float64)
    expected = []
    for j in range(2):
        cj = ref.member(pc, j)
        per_state = []
        for s in range(5):
            terms = [ref.critic(cj, o[s], unif[i, s]) - 2 * np.log(0.5) for i in range(3)]
            terms += [ref.critic(cj, o[s], nxt[i, s]) - logp_next[i, s] for i in range(3)]
            terms += [ref.critic(cj, o[s], curr[i, s]) - logp_curr[i, s] for i in range(3)]
            per_state.append(logsumexp(terms) - ref.critic(cj, o[s], data_actions[s]))
        expected.append(np.mean(per_state))
    np.testing.assert_allclose(gap, expected, rtol=1e-4)


def np_tanh_gaussian_draw(params, obs, key, shape):
    """tanh-Gaussian draws as distrax makes them (u = mean + std * normal(key, shape)) and
    their log-densities, in NumPy: -> (actions, log_probs)."""
    mean, log_std = ref.gaussian_policy(params, obs)
    u = mean + np.exp(log_std) * np.asarray(jax.random.normal(key, shape), np.float64)
    return np.tanh(u), ref.tanh_gaussian_log_prob(u, mean, np.exp(log_std))


def np_cql_gap(critic_j, obs, data_actions, unif, curr, logp_curr, nxt, logp_next):
    """Eq. (3)'s CQL(H) gap of one critic: mean_s logsumexp(importance-weighted Q) - Q(s, a)."""
    n, per_state = unif.shape[0], []
    for s in range(obs.shape[0]):
        terms = [ref.critic(critic_j, obs[s], unif[i, s]) - unif.shape[-1] * np.log(0.5)
                 for i in range(n)]  # fmt: skip
        terms += [ref.critic(critic_j, obs[s], nxt[i, s]) - logp_next[i, s] for i in range(n)]
        terms += [ref.critic(critic_j, obs[s], curr[i, s]) - logp_curr[i, s] for i in range(n)]
        per_state.append(logsumexp(terms) - ref.critic(critic_j, obs[s], data_actions[s]))
    return np.mean(per_state)


@pytest.mark.parametrize(("step", "lagrange"), [(0, False), (10, False), (10, True)])
def test_whole_cql_update_by_hand(step, lagrange):
    """One CQL step of the shared block for N=2 members, each term in NumPy: the Bellman error
    with the deterministic backup y = r + gamma (1 - d) min_j Q'_j(s', a'), a' ~ pi(.|s'); the
    CQL(H) gap of Eq. (3) (fixed weight, or alpha' (w gap - threshold) with --cql-lagrange and
    its dual step); the actor loss, behaviour cloning -log pi(a|s) + alpha log pi before
    `bc_steps`, the SAC loss of Eq. (2) after; the Polyak step of the targets. The data is one
    transition (so every minibatch is that row); draws follow the update's key convention."""
    args = o2o.Args(
        ensemble_size=2, hidden_dims=(8, 8), batch_size=4, cql_n_actions=2, bc_steps=5,
        cql_lagrange=lagrange, cql_weight=2.0, cql_target_gap=0.5,
    )  # fmt: skip
    actor, critic = o2o.TanhGaussianPolicy(2, (8, 8)), o2o.Critic((8, 8))
    members = o2o.create_cql_members(args, actor, critic, 3, 2, jax.random.PRNGKey(0))
    members = members.replace(  # targets distinct from the critics
        critic_target=jax.tree_util.tree_map(lambda x: x + 0.05, members.critic_target)
    )
    rng = np.random.default_rng(0)
    row = {
        "observations": rng.normal(size=(1, 3)), "actions": rng.uniform(-0.9, 0.9, (1, 2)),
        "rewards": rng.normal(size=1), "next_observations": rng.normal(size=(1, 3)),
        "terminals": np.zeros(1),
    }  # fmt: skip
    data = {k: jnp.asarray(v, jnp.float32) for k, v in row.items()}
    snap = ref.np_tree({"actor": members.actor.params, "critic": members.critic.params,
                        "target": members.critic_target})  # fmt: skip
    key = jax.random.PRNGKey(5)
    update = jax.jit(o2o.make_cql_update(args, actor, critic, 2))
    new, metrics = update(members, data, key, jnp.int32(step))
    b = {k: np.repeat(v, 4, axis=0) for k, v in row.items()}
    obs, act, nobs = b["observations"], b["actions"], b["next_observations"]
    for i, member_key in enumerate(jax.random.split(key, 2)):
        _, update_key = jax.random.split(member_key)
        k_pi, k_next, k_rand, k_curr, k_cnext = jax.random.split(update_key, 5)
        pa, pc, pt = (ref.member(snap[x], i) for x in ("actor", "critic", "target"))
        a_next, _ = np_tanh_gaussian_draw(pa, nobs, k_next, (4, 2))
        y = b["rewards"] + 0.99 * (1 - b["terminals"]) * np.minimum(
            *[ref.critic(ref.member(pt, j), nobs, a_next) for j in range(2)]
        )  # deterministic backup: no entropy term
        unif = np.asarray(jax.random.uniform(k_rand, (2, 4, 2), minval=-1, maxval=1), np.float64)
        curr, logp_curr = np_tanh_gaussian_draw(pa, obs, k_curr, (2, 4, 2))
        nxt, logp_next = np_tanh_gaussian_draw(pa, nobs, k_cnext, (2, 4, 2))
        bellman = sum(np.mean((ref.critic(ref.member(pc, j), obs, act) - y) ** 2) for j in range(2))
        gaps = np.array([
            np_cql_gap(ref.member(pc, j), obs, act, unif, curr, logp_curr, nxt, logp_next)
            for j in range(2)
        ])  # fmt: skip
        cql = 2.0 * gaps - 0.5 if lagrange else 2.0 * gaps  # alpha' = exp(0) = 1 before its step
        np.testing.assert_allclose(metrics["critic_loss"][i], bellman + cql.sum(), rtol=1e-4)
        np.testing.assert_allclose(metrics["cql_gap"][i], gaps.mean(), rtol=1e-4)

        # actor: alpha = exp(0) = 1 before its step
        a_pi, logp = np_tanh_gaussian_draw(pa, obs, k_pi, (4, 2))
        if step < args.bc_steps:
            mean, log_std = ref.gaussian_policy(pa, obs)
            clipped = np.clip(act, -1 + 1e-6, 1 - 1e-6)
            bc = ref.tanh_gaussian_log_prob(np.arctanh(clipped), mean, np.exp(log_std))
            expected_actor = np.mean(logp - bc)
        else:
            q_new = np.minimum(*[ref.critic(ref.member(pc, j), obs, a_pi) for j in range(2)])
            expected_actor = np.mean(logp - q_new)
        np.testing.assert_allclose(metrics["actor_loss"][i], expected_actor, rtol=1e-4, atol=1e-4)

        # Polyak step of the targets towards the updated critics
        ref.assert_tree_close(
            ref.member(ref.np_tree(new.critic_target), i),
            ref.polyak(ref.member(ref.np_tree(new.critic.params), i), pt, 0.005),
            rtol=1e-5, atol=1e-7,
        )  # fmt: skip
        # the Lagrange dual's first Adam step: +lr while w gap > threshold, else -lr
        v = float(new.log_alpha_prime.params["v"][i])
        if lagrange:
            # d/dv of -exp(v) sum(w gap - threshold) / 2 at v = 0; Adam's first step is -lr sign
            assert v == pytest.approx(3e-4 * np.sign((2.0 * gaps - 0.5).sum()), rel=1e-3)
        else:
            assert v == 0.0


def two_row_online(args, terminal=0.0, seed=0):
    """A fine-tuning state (N=2 tiny members, obs 3, actions 2) whose 64 offline rows are all
    one transition and whose 32 online rows are all another, so any batch drawn from either
    part is known exactly. -> (state, insert_and_train, online rows, (offline row, online row))."""
    actor = o2o.TanhGaussianPolicy(2, args.hidden_dims)
    critic = o2o.Critic(args.hidden_dims)
    density_ratio = o2o.DensityRatio(args.hidden_dims)
    rng = np.random.default_rng(seed)

    def row():
        return {
            "observations": rng.normal(size=3), "actions": rng.uniform(-0.9, 0.9, 2),
            "rewards": rng.normal(), "next_observations": rng.normal(size=3),
            "terminals": terminal,
        }  # fmt: skip

    off_row, on_row = row(), row()
    tile = lambda r, n: {k: jnp.asarray(np.tile(v, (n, 1)).squeeze(), jnp.float32)  # noqa: E731
                         for k, v in r.items()}  # fmt: skip
    key = jax.random.PRNGKey(seed)
    members = o2o.create_cql_members(args, actor, critic, 3, 2, key)
    members = members.replace(  # targets distinct from the critics (the state copies critics)
        critic=members.critic.replace(
            params=jax.tree_util.tree_map(lambda x: x + 0.03, members.critic.params)
        )
    )
    state = o2o.create_online_state(args, members, tile(off_row, 64), density_ratio, key, key)
    state = state.replace(  # give the targets their own values
        critic_target=jax.tree_util.tree_map(lambda x: x - 0.05, state.critic_target)
    )
    update = o2o.make_online_update(args, actor, critic, density_ratio, 2, 64)
    return state, update, tile(on_row, 32), (off_row, on_row)


@pytest.mark.parametrize("terminal", [0.0, 1.0])
def test_online_critic_loss_is_eq1_with_one_shared_next_action(terminal):
    """Eq. (1): y_i = r + gamma (1 - d) (min_j Q'_ij(s', a') - alpha log pi_E(a'|s')), one a'
    of the ensemble policy of Eq. (5) (moment-matched Gaussian, then tanh) shared by all
    members, each with its own twin target critics; loss = sum_ij mean (Q_ij(s, a) - y_i)^2.
    Online-only replay, so the batch is the online row; draws use the update's key convention."""
    args = o2o.Args(ensemble_size=2, hidden_dims=(8, 8), batch_size=8, replay="online-only")
    state, update, online, (_, row) = two_row_online(args, terminal)
    snap = ref.np_tree({"actor": state.actor.params, "critic": state.critic.params,
                        "target": state.critic_target})  # fmt: skip
    _, loop_key = jax.random.split(state.key)
    _, k_next, *_ = jax.random.split(jax.random.fold_in(loop_key, 0), 6)
    _, metrics = update(state, online, jnp.int32(1))
    nobs = np.tile(row["next_observations"], (8, 1))
    means, log_stds = zip(
        *[ref.gaussian_policy(ref.member(snap["actor"], i), nobs) for i in range(2)], strict=True
    )
    means, stds = np.stack(means), np.exp(np.stack(log_stds))
    mu = means.mean(0)
    std = np.clip(np.sqrt((stds**2).mean(0) + ((means - mu) ** 2).mean(0)), np.exp(-20), np.exp(2))
    u = mu + std * np.asarray(jax.random.normal(k_next, (8, 2)), np.float64)
    logp = ref.tanh_gaussian_log_prob(u, mu, std)
    obs, act = np.tile(row["observations"], (8, 1)), np.tile(row["actions"], (8, 1))
    loss = 0.0
    for i in range(2):
        t, c = ref.member(snap["target"], i), ref.member(snap["critic"], i)
        next_q = np.minimum(*[ref.critic(ref.member(t, j), nobs, np.tanh(u)) for j in range(2)])
        y = row["rewards"] + 0.99 * (1 - terminal) * (next_q - 1.0 * logp)  # alpha = 1 at start
        loss += sum(np.mean((ref.critic(ref.member(c, j), obs, act) - y) ** 2) for j in range(2))
    assert float(metrics["critic_loss"]) == pytest.approx(loss, rel=1e-4)


def test_density_ratio_trains_on_offline_slots_against_online_slots():
    """Eq. (4)'s batches: offline from the offline slots, online from the online slots. With
    one row in each part, the logged JS loss is exactly
    -log(2 / (w_off + 1)) - log(2 w_on / (w_on + 1)) at the two rows, with the net before
    its step."""
    args = o2o.Args(ensemble_size=2, hidden_dims=(8, 8), batch_size=8, dr_batch_size=8)
    state, update, online, (off_row, on_row) = two_row_online(args)
    rng = np.random.default_rng(2)
    dr = jax.tree_util.tree_map(  # a random net, so w is far from 1 and differs between rows
        lambda x: jnp.asarray(rng.normal(0, 0.7, x.shape), jnp.float32), state.density_ratio.params
    )
    dr["params"]["Dense_2"]["bias"] = jnp.array([2.0])
    state = state.replace(density_ratio=state.density_ratio.replace(params=dr))
    dr = ref.np_tree(dr)
    _, metrics = update(state, online, jnp.int32(1))
    w_off = np_density_ratio(dr, off_row["observations"][None], off_row["actions"][None])[0]
    w_on = np_density_ratio(dr, on_row["observations"][None], on_row["actions"][None])[0]
    assert float(metrics["w_offline"]) == pytest.approx(w_off, rel=1e-5)
    assert float(metrics["w_online"]) == pytest.approx(w_on, rel=1e-5)
    expected = -np.log(2 / (w_off + 1) + 1e-10) - np.log(2 * w_on / (w_on + 1) + 1e-10)
    assert abs(w_off - w_on) > 0.1  # the test can tell the two parts apart
    assert float(metrics["dr_loss"]) == pytest.approx(expected, rel=1e-5)


TINY = TINY_FLAGS["off2on_balanced"]


def run(run_dir, minari_root, *extra, ok=True):
    return run_script("off2on_balanced.py", TINY, run_dir, minari_root, *extra, ok=ok)


def test_tiny_run_and_exact_resume(tiny_root, tmp_path, tiny_run):
    full, stdout, _ = tiny_run("off2on_balanced")
    assert "before fine-tuning" in stdout and "after 400 online steps" in stdout
    assert {"checkpoint.npz", "offline.npz", "metrics.jsonl", "config.json", "summary.json"} <= {
        p.name for p in full.iterdir()
    }
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    online = [r for r in rows if "online/offline_fraction" in r]
    assert len(online) == 4 and all(0 <= r["online/offline_fraction"] <= 1 for r in online)
    assert all(0 <= r["online/auroc_ensemble"] <= 1 for r in online)
    assert any("offline/cql_gap" in r for r in rows) and any(
        "eval/normalized_score" in r for r in rows
    )

    # Interrupted in the offline phase, then in the online phase; resumed each time.
    part = tmp_path / "part"
    stopped = run(part, tiny_root, "--stop-after", "100", ok=False)
    assert stopped.returncode != 0 and "stopped after offline step 100" in stopped.stderr
    stopped = run(part, tiny_root, "--resume", "--stop-after", "400", ok=False)
    assert "stopped after global step 400" in stopped.stderr
    run(part, tiny_root, "--resume")
    assert_same_run(full, part)  # bit-identical state, same logged steps


def test_offline_checkpoint_skips_pretraining(tiny_root, tmp_path, tiny_run):
    first = tiny_run("off2on_balanced").dir  # its offline.npz
    second = run(
        tmp_path / "second",
        tiny_root,
        "--online-steps",
        "100",
        "--steps-per-epoch",
        "100",
        "--offline-checkpoint",
        str(first / "offline.npz"),
        "--replay",
        "online-only",
    )
    assert "offline ensemble loaded from" in second.stdout
    rows = [json.loads(x) for x in (tmp_path / "second/metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith("offline/") for r in rows for k in r)
    online = [r for r in rows if "online/offline_fraction" in r]
    assert online[0]["online/offline_fraction"] == 0.0  # online-only never samples offline data


def test_offline_phase_in_progress_chunks_equals_one_scan_per_log_window():
    """The offline phase runs in chunks of gcd(log_every, PROGRESS_CHUNK) steps so the progress
    bar moves every few seconds: the same updates as one scan of `log_every` steps (the members
    and the key agree), and each logged value is the mean over the whole window."""
    args = o2o.Args(ensemble_size=2, hidden_dims=(8, 8), batch_size=4, cql_n_actions=2,
                    bc_steps=3, log_every=8)  # fmt: skip
    actor, critic = o2o.TanhGaussianPolicy(2, (8, 8)), o2o.Critic((8, 8))
    update = o2o.make_cql_update(args, actor, critic, 2)
    rng = np.random.default_rng(0)
    data = {
        "observations": rng.normal(size=(16, 3)), "actions": rng.uniform(-0.9, 0.9, (16, 2)),
        "rewards": rng.normal(size=16), "next_observations": rng.normal(size=(16, 3)),
        "terminals": np.zeros(16),
    }  # fmt: skip
    data = {k: jnp.asarray(v, jnp.float32) for k, v in data.items()}
    fresh = lambda: o2o.create_cql_members(args, actor, critic, 3, 2, jax.random.PRNGKey(0))  # noqa: E731
    whole, whole_key, whole_metrics = o2o.make_offline_chunk(args, update)(
        fresh(), data, jax.random.PRNGKey(1), jnp.int32(0)
    )
    piece = o2o.make_offline_chunk(args, update, 2)
    members, key, means = fresh(), jax.random.PRNGKey(1), []
    for start in range(0, 8, 2):
        members, key, metrics = piece(members, data, key, jnp.int32(start))
        means.append(metrics)
    np.testing.assert_array_equal(np.asarray(key), np.asarray(whole_key))
    for a, b in zip(jax.tree_util.tree_leaves(members), jax.tree_util.tree_leaves(whole),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    for name, value in whole_metrics.items():
        assert float(value) == pytest.approx(np.mean([float(m[name]) for m in means]), rel=1e-5)


def test_an_epochs_updates_in_chunks_equal_one_loop_and_report_progress(monkeypatch):
    """The online phase runs an epoch's updates UPDATES_PER_CALL per compiled call (so the
    progress bar moves); update i must draw the same key in any split, so 7 updates in chunks of
    3 (3 + 3 + 1, progress reported after each) leave the same state and mean metrics as one
    call of 7."""
    args = o2o.Args(ensemble_size=2, hidden_dims=(8, 8), batch_size=16, dr_batch_size=16)
    results = {}
    for chunk in (7, 3):
        monkeypatch.setattr(o2o, "UPDATES_PER_CALL", chunk)
        state, update, _, online = small_online(args)
        done = []
        new, metrics = update(state, online, 7, done.append)
        results[chunk] = (ref.np_tree(new.actor.params), ref.np_tree(new.buffer.priorities),
                          {k: float(v) for k, v in metrics.items()}, done)  # fmt: skip
    (actor7, prio7, metrics7, done7), (actor3, prio3, metrics3, done3) = results[7], results[3]
    assert done7 == [7] and done3 == [3, 3, 1]
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(actor7), leaves(actor3), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(prio7, prio3, rtol=1e-6)
    assert metrics7 == pytest.approx(metrics3, rel=1e-5)
