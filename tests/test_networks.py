import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from common.networks import (
    MLP,
    Critic,
    DeterministicActor,
    TanhGaussianPolicy,
    apply_ensemble,
    init_ensemble,
    tanh_gaussian,
    tanh_gaussian_mode,
)


def test_tanh_gaussian_log_prob_matches_change_of_variables():
    """log pi(a) = log N(atanh(a); mu, sigma) - sum log(1 - a^2), computed here with scipy."""
    mean = np.array([0.3, -1.2, 0.0])
    log_std = np.array([-0.5, 0.2, -2.0])
    actions = np.array([[0.1, -0.9, 0.05], [-0.7, 0.3, 0.0], [0.95, -0.99, -0.2]])
    dist = tanh_gaussian(jnp.asarray(mean, jnp.float32), jnp.asarray(log_std, jnp.float32))
    ours = np.asarray(dist.log_prob(jnp.asarray(actions, jnp.float32)))
    u = np.arctanh(actions)
    ref = (stats.norm.logpdf(u, mean, np.exp(log_std)) - np.log1p(-(actions**2))).sum(-1)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_tanh_gaussian_density_integrates_to_one():
    dist = tanh_gaussian(jnp.array([0.7]), jnp.array([0.1]))
    grid = jnp.linspace(-1 + 1e-6, 1 - 1e-6, 200_001)[:, None]
    density = jnp.exp(dist.log_prob(grid))
    assert float(jnp.trapezoid(density, grid[:, 0])) == pytest.approx(1.0, abs=1e-3)


def test_policy_samples_in_bounds_and_mode_is_tanh_mean():
    policy = TanhGaussianPolicy(action_dim=4)
    obs = jax.random.normal(jax.random.PRNGKey(0), (64, 11))
    params = policy.init(jax.random.PRNGKey(1), obs)
    mean, log_std = policy.apply(params, obs)
    actions, log_probs = tanh_gaussian(mean, log_std).sample_and_log_prob(
        seed=jax.random.PRNGKey(2)
    )
    assert actions.shape == (64, 4) and log_probs.shape == (64,)
    assert bool(jnp.all(jnp.abs(actions) < 1))
    np.testing.assert_allclose(tanh_gaussian_mode(mean), np.tanh(mean), rtol=1e-6)
    # sample_and_log_prob agrees with log_prob of the same sample
    np.testing.assert_allclose(
        log_probs, tanh_gaussian(mean, log_std).log_prob(actions), rtol=1e-3, atol=1e-3
    )


def test_deterministic_actor_near_zero_init_and_layer_norm_mlp():
    actor = DeterministicActor(
        action_dim=3, activation="elu", layer_norm="first_tanh", final_init_scale=1e-4
    )
    obs = jax.random.normal(jax.random.PRNGKey(0), (32, 17)) * 5
    params = actor.init(jax.random.PRNGKey(1), obs)
    actions = actor.apply(params, obs)
    assert actions.shape == (32, 3) and float(jnp.abs(actions).max()) < 0.05
    names = set(params["params"]["MLP_0"].keys())
    assert "LayerNorm_0" in names  # LayerNorm only after the first layer in this layout
    assert "LayerNorm_1" not in names
    # Every hidden layer normalised with layer_norm="all"
    mlp = MLP((8, 8), layer_norm="all", activate_final=True)
    assert set(mlp.init(jax.random.PRNGKey(0), obs)["params"]) >= {"LayerNorm_0", "LayerNorm_1"}


def test_ensemble_members_start_different():
    critic = Critic(hidden_dims=(32, 32))
    obs, act = jnp.ones((5, 11)), jnp.zeros((5, 3))
    params = init_ensemble(critic, jax.random.PRNGKey(0), 4, obs, act)
    kernel = params["params"]["Dense_0"]["kernel"]
    assert kernel.shape[0] == 4
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.allclose(kernel[i], kernel[j])
    q = apply_ensemble(critic, params, obs, act)
    assert q.shape == (4, 5) and len(np.unique(np.asarray(q[:, 0]))) == 4


def test_ensemble_members_stay_independent_under_vmap():
    """Training member i of a vmapped ensemble on its own targets gives exactly the parameters
    of training that member alone: no gradient leaks between members."""
    critic = Critic(hidden_dims=(16, 16))
    n, key = 3, jax.random.PRNGKey(0)
    obs = jax.random.normal(key, (8, 5))
    act = jax.random.normal(jax.random.PRNGKey(1), (8, 2))
    targets = jax.random.normal(jax.random.PRNGKey(2), (n, 8))
    params = init_ensemble(critic, key, n, obs, act)
    opt = optax.adam(1e-2)

    def ensemble_loss(p):
        q = apply_ensemble(critic, p, obs, act)  # [N, B]
        return ((q - targets) ** 2).mean(axis=1).sum()  # summed over members

    # Gradient of member 0's loss alone is zero for every other member.
    grads = jax.grad(lambda p: ((apply_ensemble(critic, p, obs, act)[0] - targets[0]) ** 2).mean())(
        params
    )
    for leaf in jax.tree_util.tree_leaves(grads):
        assert float(jnp.abs(leaf[1:]).max()) == 0.0 and float(jnp.abs(leaf[0]).max()) > 0

    state = opt.init(params)
    for _ in range(5):
        updates, state = opt.update(jax.grad(ensemble_loss)(params), state)
        params = optax.apply_updates(params, updates)

    member = jax.tree_util.tree_map(lambda x: x[1], init_ensemble(critic, key, n, obs, act))
    single_state = opt.init(member)
    for _ in range(5):
        g = jax.grad(lambda p: ((critic.apply(p, obs, act) - targets[1]) ** 2).mean())(member)
        updates, single_state = opt.update(g, single_state)
        member = optax.apply_updates(member, updates)
    for a, b in zip(
        jax.tree_util.tree_leaves(member),
        jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x: x[1], params)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
