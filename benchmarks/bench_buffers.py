"""Throughput of the on-device buffers at the Off2On scale: 1.25M capacity (1M offline + 250k
online), hopper-sized transitions, batch 256. Prints JSON; `--out FILE` also writes it.

    python benchmarks/bench_buffers.py [--capacity 1250000] [--batch-size 256] [--out F]

Each figure is timed over `--batches` consecutive batches compiled into one `lax.scan`, as an
algorithm's update loop runs them, after a warm-up call that compiles it.
"""

import argparse
import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp

from common.buffers import PrioritizedBuffer, ReplayBuffer
from common.checkpoints import atomic_write_text


def timed(fn, *args, repeats: int = 3) -> float:
    jax.block_until_ready(fn(*args))  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=int, default=1_250_000)
    parser.add_argument("--filled", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()

    obs_dim, act_dim, n, b = 11, 3, args.filled, args.batch_size
    key = jax.random.PRNGKey(0)
    data = {
        "observations": jax.random.normal(key, (n, obs_dim)),
        "actions": jax.random.uniform(key, (n, act_dim), minval=-1, maxval=1),
        "rewards": jax.random.normal(key, (n,)),
        "next_observations": jax.random.normal(key, (n, obs_dim)),
        "terminals": jnp.zeros(n),
    }
    uniform = ReplayBuffer.from_data(data, args.capacity)
    prioritized = PrioritizedBuffer.from_data(data, args.capacity, priority=1.0)
    keys = jax.random.split(key, args.batches)

    @jax.jit
    def uniform_sample(buf, keys):
        return jax.lax.scan(
            lambda c, k: (c + buf.sample(k, b)[0]["rewards"].sum(), None), 0.0, keys
        )

    @jax.jit
    def prioritized_sample(buf, keys):
        return jax.lax.scan(lambda c, k: (c + buf.sample(k, b)[2].sum(), None), 0.0, keys)

    @jax.jit
    def prioritized_sample_update(buf, keys):
        def step(buf, k):
            batch, idx, _ = buf.sample(k, b)
            new = jnp.abs(batch["rewards"]) + 0.1  # priorities that depend on the sample
            return buf.update_priorities(idx, new), None

        return jax.lax.scan(step, buf, keys)[0]

    @jax.jit
    def prioritized_add(buf, keys):
        one = jax.tree_util.tree_map(lambda x: x[:1000], data)
        return jax.lax.scan(lambda buf, k: (buf.add_batch(one), None), buf, keys[:10])[0]

    results = {}
    for name, fn, buf in [
        ("uniform_sample", uniform_sample, uniform),
        ("prioritized_sample", prioritized_sample, prioritized),
        ("prioritized_sample_and_update", prioritized_sample_update, prioritized),
    ]:
        seconds = timed(fn, buf, keys)
        results[name] = {
            "batches_per_s": round(args.batches / seconds, 1),
            "samples_per_s": round(args.batches * b / seconds),
            "us_per_batch": round(seconds / args.batches * 1e6, 1),
        }
    seconds = timed(prioritized_add, prioritized, keys)
    results["prioritized_add_1000"] = {"us_per_call": round(seconds / 10 * 1e6, 1)}
    report = {
        "capacity": args.capacity,
        "filled": n,
        "batch_size": b,
        "device": str(jax.devices()[0]),
        "machine": f"{platform.machine()} {jax.device_count()} device(s), cpu_count="
        f"{__import__('os').cpu_count()}",
        "jax": jax.__version__,
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
