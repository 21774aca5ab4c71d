import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from common.buffers import PrioritizedBuffer, ReplayBuffer


def items(values):
    values = jnp.asarray(values, jnp.float32)
    return {"x": values, "pair": jnp.stack([values, -values], axis=-1)}


EXAMPLE = {"x": jnp.float32(0), "pair": jnp.zeros(2)}


def test_wrap_around_keeps_newest_items():
    buf = ReplayBuffer.create(EXAMPLE, capacity=10)
    for v in range(7):
        buf = buf.add({"x": jnp.float32(v), "pair": jnp.array([v, -v], jnp.float32)})
    buf = buf.add_batch(items(np.arange(7, 25)))  # 25 items into 10 slots
    assert int(buf.size) == 10 and int(buf.ptr) == 25 % 10
    assert sorted(np.asarray(buf.data["x"]).tolist()) == list(range(15, 25))
    # The slot written last holds the newest item, and fields stay aligned.
    assert float(buf.data["x"][(int(buf.ptr) - 1) % 10]) == 24
    np.testing.assert_array_equal(buf.data["pair"][:, 0], -buf.data["pair"][:, 1])


def test_add_batch_larger_than_capacity_keeps_newest():
    buf = ReplayBuffer.create(EXAMPLE, capacity=8).add_batch(items(np.arange(3)))
    buf = buf.add_batch(items(np.arange(100, 120)))
    assert sorted(np.asarray(buf.data["x"]).tolist()) == list(range(112, 120))
    assert int(buf.size) == 8


def test_uniform_sampling_only_returns_filled_slots():
    buf = ReplayBuffer.create(EXAMPLE, capacity=100).add_batch(items(np.arange(1, 8)))
    batch, idx = jax.jit(lambda b, k: b.sample(k, 20_000))(buf, jax.random.PRNGKey(0))
    assert int(idx.max()) < 7
    values = np.asarray(batch["x"])
    assert set(values.tolist()) == set(range(1, 8))  # every filled slot, and nothing else
    counts = np.bincount(values.astype(int))[1:]
    assert stats.chisquare(counts).pvalue > 1e-3


def test_from_data_matches_incremental_adds():
    data = items(np.arange(13))
    a = ReplayBuffer.from_data(data, capacity=20)
    b = ReplayBuffer.create(EXAMPLE, 20).add_batch(data)
    np.testing.assert_array_equal(a.data["x"], b.data["x"])
    assert int(a.ptr) == int(b.ptr) and int(a.size) == int(b.size)
    pa = PrioritizedBuffer.from_data(data, capacity=20, priority=1.0)
    pb = PrioritizedBuffer.create(EXAMPLE, 20, default_priority=1.0).add_batch(data)
    np.testing.assert_allclose(pa.tree, pb.tree)


def test_prioritized_sampling_frequencies_match_priorities():
    n = 20
    priorities = np.arange(1, n + 1, dtype=np.float32)
    buf = PrioritizedBuffer.create(EXAMPLE, capacity=32).add_batch(
        items(np.arange(n)), jnp.asarray(priorities)
    )
    keys = jax.random.split(jax.random.PRNGKey(1), 200)
    batch, idx, probs = jax.jit(jax.vmap(lambda k: buf.sample(k, 256)))(keys)
    counts = np.bincount(np.asarray(idx).ravel(), minlength=n)
    expected = priorities.astype(np.float64) / priorities.sum() * counts.sum()
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    # The returned data and probabilities belong to the sampled slots.
    np.testing.assert_array_equal(batch["x"], idx.astype(np.float32))
    np.testing.assert_allclose(probs, priorities[np.asarray(idx)] / priorities.sum(), rtol=1e-5)
    # And a uniform assumption would be clearly rejected: the test has power.
    assert stats.chisquare(counts).pvalue < 1e-6


def tree_is_consistent(buf):
    tree = np.asarray(buf.tree, np.float64)
    internal = np.arange(1, buf.num_leaves)
    return np.allclose(tree[internal], tree[2 * internal] + tree[2 * internal + 1], rtol=1e-5)


def test_priority_updates_take_effect_and_keep_the_tree_consistent():
    buf = PrioritizedBuffer.create(EXAMPLE, capacity=50).add_batch(items(np.arange(50)))
    # Duplicated indices in one update (as in a sampled batch) must not corrupt the sums.
    idx = jnp.array([3, 3, 7, 7, 7, 10])
    buf = jax.jit(PrioritizedBuffer.update_priorities)(buf, idx, jnp.array([9, 9, 0, 0, 0, 5.0]))
    assert tree_is_consistent(buf)
    p = np.asarray(buf.priorities)
    assert p[3] == 9 and p[7] == 0 and p[10] == 5 and p[0] == 1
    assert float(buf.total_priority) == pytest.approx(p.sum())
    _, sampled, _ = buf.sample(jax.random.PRNGKey(0), 4096)
    freq = np.bincount(np.asarray(sampled), minlength=50) / 4096
    assert freq[7] == 0  # zero priority: never sampled
    assert freq[3] == pytest.approx(9 / p.sum(), abs=0.01)


def test_max_priority_default_for_new_items():
    buf = PrioritizedBuffer.create(EXAMPLE, capacity=16, default_priority=1.0)
    buf = buf.add_batch(items(np.arange(4)))
    assert np.asarray(buf.priorities)[:4].tolist() == [1, 1, 1, 1]
    buf = buf.update_priorities(jnp.array([0, 1]), jnp.array([0.5, 6.0]))
    buf = buf.add(
        {"x": jnp.float32(9), "pair": jnp.zeros(2)}
    )  # a new item enters at the max seen so far
    assert float(buf.priorities[4]) == 6.0
    assert float(buf.set_default_priority(2.0).max_priority) == 6.0  # never decreases
    assert float(buf.set_default_priority(8.0).add(EXAMPLE).priorities[5]) == 8.0


def test_prioritized_buffer_inside_a_scan():
    """Add, sample and update inside one compiled program, wrapping the buffer around."""
    buf = PrioritizedBuffer.create(EXAMPLE, capacity=8)

    def step(buf, key):
        buf = buf.add_batch(items(jnp.arange(3.0)))
        batch, idx, _ = buf.sample(key, 4)
        return buf.update_priorities(idx, batch["x"] + 1.0), idx

    buf, idx = jax.jit(lambda b, k: jax.lax.scan(step, b, jax.random.split(k, 10)))(
        buf, jax.random.PRNGKey(0)
    )
    assert int(buf.size) == 8 and int(idx.max()) < 8
    assert tree_is_consistent(buf)


def test_kept_prefix_is_never_overwritten():
    """Offline data loaded with keep=True survives any number of online adds, which wrap
    within the remaining slots; uniform sampling still covers both parts."""
    offline = items(np.arange(100, 105))
    for buf in (
        ReplayBuffer.from_data(offline, capacity=8, keep=True),
        PrioritizedBuffer.from_data(offline, capacity=8, keep=True).storage,
    ):
        buf = buf.add_batch(items(np.arange(7)))  # 7 online items into 3 online slots
        x = np.asarray(buf.data["x"]).tolist()
        assert x[:5] == [100, 101, 102, 103, 104] and sorted(x[5:]) == [4, 5, 6]
        assert int(buf.size) == 8
        buf = buf.add({"x": jnp.float32(7), "pair": jnp.zeros(2)})  # replaces the oldest, 4
        x = np.asarray(buf.data["x"]).tolist()
        assert x[:5] == [100, 101, 102, 103, 104] and sorted(x[5:]) == [5, 6, 7]
    pb = PrioritizedBuffer.from_data(offline, capacity=8, priority=1.0, keep=True)
    pb = pb.add_batch(items(np.arange(3)), jnp.full(3, 3.0))
    np.testing.assert_allclose(pb.priorities, [1, 1, 1, 1, 1, 3, 3, 3])
    assert tree_is_consistent(pb)
