import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_same_run, run_script  # noqa: E402
from flax.training.train_state import TrainState
from scipy.special import logsumexp

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "algorithms"))
import off2on_balanced as o2o  # noqa: E402

from common.buffers import PrioritizedBuffer  # noqa: E402


def test_density_ratio_recovers_a_known_gaussian_ratio():
    """d_on = N(0.5, 1), d_off = N(0, 1) in one dimension (s = x, empty action):
    w* = exp(0.5 x - 0.125). Within 15% on [-1, 1.5] after JS training (Eq. 4)."""
    net = o2o.DensityRatio((64, 64))
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
    "--online-steps",
    "400",
    "--steps-per-epoch",
    "100",
    "--first-epoch-multiplier",
    "2",
    "--online-buffer-size",
    "1000",
    "--eval-episodes",
    "1",
    "--auroc-samples",
    "50",
    "--dr-batch-size",
    "32",
    "--checkpoint-every",
    "100",
    "--no-generate",
]


def run(run_dir, minari_root, *extra, ok=True):
    return run_script("off2on_balanced.py", TINY, run_dir, minari_root, *extra, ok=ok)


def test_tiny_run_and_exact_resume(tiny_root, tmp_path):
    full = tmp_path / "full"
    proc = run(full, tiny_root)
    assert "before fine-tuning" in proc.stdout and "after 400 online steps" in proc.stdout
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


def test_offline_checkpoint_skips_pretraining(tiny_root, tmp_path):
    first = tmp_path / "first"
    run(first, tiny_root, "--online-steps", "100", "--steps-per-epoch", "100")
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
