"""The studies' own code (studies/): each variant that is not a paper's method is tested here,
beside the check that its default is the method's code."""

import jax
import jax.numpy as jnp
import numpy as np
import reference as ref
import test_off2on_balanced as method_tests

from algorithms import off2on_balanced as o2o
from studies.off2on_dr_output.dr_output import (
    SoftplusDensityRatio,
    density_ratio_class,
    priorities_at_one,
)

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
