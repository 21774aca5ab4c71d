"""Independent NumPy re-implementations for the equation tests.

Everything here is written from the papers (and the networks' definitions), in float64 NumPy, so
that a test compares the JAX code under test with a second computation that shares none of its
code. Network parameters are read from the Flax parameter trees (plain nested dicts of arrays).
"""

import numpy as np


def np_tree(tree):
    """A Flax/JAX parameter tree as nested dicts of float64 NumPy arrays."""
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: np_tree(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)


def member(tree, i):
    """Member / twin `i` of a tree whose leaves carry a leading ensemble axis."""
    if isinstance(tree, dict):
        return {k: member(v, i) for k, v in tree.items()}
    return tree[i]


def relu(x):
    return np.maximum(x, 0.0)


def dense(p, x):
    return x @ p["kernel"] + p["bias"]


def hidden(params, x):
    """The ReLU MLP trunk (common.networks.MLP with activate_final=True, no LayerNorm)."""
    layers = params["MLP_0"]
    for i in range(len(layers)):
        x = relu(dense(layers[f"Dense_{i}"], x))
    return x


def critic(params, obs, actions):
    """Q(s, a): trunk on [s, a], then a linear output."""
    p = params["params"]
    return dense(p["Dense_0"], hidden(p, np.concatenate([obs, actions], -1)))[..., 0]


def deterministic_actor(params, obs):
    """a = tanh(f(s))."""
    p = params["params"]
    return np.tanh(dense(p["Dense_0"], hidden(p, obs)))


def gaussian_policy(params, obs):
    """Pre-tanh mean and log std (clipped to [-20, 2]) of the tanh-Gaussian policy."""
    p = params["params"]
    h = hidden(p, obs)
    return dense(p["Dense_0"], h), np.clip(dense(p["Dense_1"], h), -20.0, 2.0)


def value(params, obs):
    """V(s) / Z(s): trunk on s, then a linear output."""
    p = params["params"]
    return dense(p["Dense_0"], hidden(p, obs))[..., 0]


def gaussian_log_prob(x, mean, std):
    """log N(x; mean, diag(std^2)), summed over the last axis."""
    return (-0.5 * ((x - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)).sum(-1)


def tanh_gaussian_log_prob(pre_tanh, mean, std):
    """log-density of a = tanh(u), u ~ N(mean, std^2), at a = tanh(pre_tanh): the Gaussian's
    log-density minus sum log(1 - tanh(u)^2), the latter as 2 (log 2 - u - softplus(-2u))."""
    correction = 2.0 * (np.log(2.0) - pre_tanh - np.logaddexp(0.0, -2.0 * pre_tanh))
    return gaussian_log_prob(pre_tanh, mean, std) - correction.sum(-1)


def adam_steps(x0, grads, lr, b1=0.9, b2=0.999, eps=1e-8):
    """Adam (Kingma & Ba) from a fresh state, applied to the scalar x0 with the given grads."""
    x, m, v = float(x0), 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        x -= lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return x


def polyak(new, old, tau):
    """Target <- tau * new + (1 - tau) * target, leaf by leaf."""
    if isinstance(new, dict):
        return {k: polyak(new[k], old[k], tau) for k in new}
    return tau * new + (1 - tau) * old


def assert_tree_close(a, b, **kwargs):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_tree_close(a[k], b[k], **kwargs)
    else:
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), **kwargs)
