"""Networks shared by the algorithm files: MLP, tanh-Gaussian policy, deterministic actor, critic,
and the one ensemble representation used everywhere (a leading parameter axis of size N, built and
applied with `jax.vmap`).

Actions are assumed to lie in [-1, 1]^d (true for every gymnasium MuJoCo locomotion env; the
dataset loader checks it).
"""

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable] = {
    "relu": nn.relu,
    "elu": nn.elu,
    "tanh": jnp.tanh,
    "gelu": nn.gelu,
    "silu": nn.silu,
}

# SAC/CQL convention for the policy's log standard deviation (authors' rlkit code).
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


class MLP(nn.Module):
    """Linear layers of width `hidden_dims`, each followed by optional LayerNorm and `activation`.

    `layer_norm="all"` puts LayerNorm after every hidden layer; `layer_norm="first_tanh"` is the
    TD3-C/Acme layout (Linear -> LayerNorm -> tanh, then the chosen activation for the rest).
    """

    hidden_dims: Sequence[int]
    activation: str = "relu"
    layer_norm: str | None = None  # None, "all", "first_tanh"
    activate_final: bool = False
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        for i, width in enumerate(self.hidden_dims):
            x = nn.Dense(width, kernel_init=self.kernel_init)(x)
            is_last = i == len(self.hidden_dims) - 1
            if is_last and not self.activate_final:
                break
            if self.layer_norm == "first_tanh" and i == 0:
                x = jnp.tanh(nn.LayerNorm()(x))
                continue
            if self.layer_norm == "all":
                x = nn.LayerNorm()(x)
            x = act(x)
        return x


class TanhGaussianPolicy(nn.Module):
    """pi(a|s) = tanh(N(mu(s), sigma(s))). Returns the pre-tanh (mean, log_std); build the
    distribution with `tanh_gaussian` so ensembles can moment-match in pre-tanh space."""

    action_dim: int
    hidden_dims: Sequence[int] = (256, 256)
    activation: str = "relu"
    layer_norm: str | None = None

    @nn.compact
    def __call__(self, obs):
        h = MLP(self.hidden_dims, self.activation, self.layer_norm, activate_final=True)(obs)
        mean = nn.Dense(self.action_dim)(h)
        log_std = nn.Dense(self.action_dim)(h)
        return mean, jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)


def tanh_gaussian(mean, log_std) -> "distrax.Distribution":  # noqa: F821
    """The tanh-squashed diagonal Gaussian. Its `log_prob` includes the tanh change-of-variables
    correction  -sum log(1 - tanh(u)^2)  (computed stably by distrax)."""
    import distrax  # here, not at the top: it brings TensorFlow Probability (0.5 s per start),
    # which the files that never build this distribution (TD3-C, ACA, SAC) need not load

    base = distrax.MultivariateNormalDiag(mean, jnp.exp(log_std))
    return distrax.Transformed(base, distrax.Block(distrax.Tanh(), ndims=1))


def tanh_gaussian_mode(mean):
    """Deterministic action of a tanh-Gaussian policy: tanh of the pre-tanh mean."""
    return jnp.tanh(mean)


class DeterministicActor(nn.Module):
    """a = tanh(f(s)). `final_init_scale` > 0 makes the output layer near-zero at initialisation
    (variance scaling, TD3-C's Acme network uses 1e-4)."""

    action_dim: int
    hidden_dims: Sequence[int] = (256, 256)
    activation: str = "relu"
    layer_norm: str | None = None
    final_init_scale: float | None = None

    @nn.compact
    def __call__(self, obs):
        h = MLP(self.hidden_dims, self.activation, self.layer_norm, activate_final=True)(obs)
        if self.final_init_scale is None:
            init = nn.initializers.lecun_normal()
        else:
            init = nn.initializers.variance_scaling(self.final_init_scale, "fan_in", "uniform")
        return jnp.tanh(nn.Dense(self.action_dim, kernel_init=init)(h))


class Critic(nn.Module):
    """Q(s, a) -> scalar (shape [...] for inputs [..., dim])."""

    hidden_dims: Sequence[int] = (256, 256)
    activation: str = "relu"
    layer_norm: str | None = None

    @nn.compact
    def __call__(self, obs, action):
        x = jnp.concatenate([obs, action], axis=-1)
        h = MLP(self.hidden_dims, self.activation, self.layer_norm, activate_final=True)(x)
        return nn.Dense(1)(h).squeeze(-1)


class ValueNet(nn.Module):
    """V(s) -> scalar."""

    hidden_dims: Sequence[int] = (256, 256)
    activation: str = "relu"
    layer_norm: str | None = None

    @nn.compact
    def __call__(self, obs):
        h = MLP(self.hidden_dims, self.activation, self.layer_norm, activate_final=True)(obs)
        return nn.Dense(1)(h).squeeze(-1)


# --- Ensembles: parameters with a leading axis of size N, one independent init per member. ---


def init_ensemble(module: nn.Module, key: jax.Array, n: int, *example_inputs):
    """Initialise N independent copies of `module`; every leaf gets a leading axis of size N."""
    keys = jax.random.split(key, n)
    return jax.vmap(lambda k: module.init(k, *example_inputs))(keys)


def apply_ensemble(module: nn.Module, params, *inputs, shared_inputs: bool = True):
    """Apply every member. With `shared_inputs` all members see the same inputs ([N, ...] out);
    otherwise each input carries its own leading member axis."""
    in_axes = (0,) + ((None,) if shared_inputs else (0,)) * len(inputs)
    return jax.vmap(module.apply, in_axes=in_axes)(params, *inputs)


def ensemble_size(params) -> int:
    return jax.tree_util.tree_leaves(params)[0].shape[0]
