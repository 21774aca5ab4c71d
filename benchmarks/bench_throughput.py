"""Throughput of every algorithm and phase, measured in one run so the numbers compare as ratios.

    python benchmarks/bench_throughput.py [--only off2on_balanced sac] [--out FILE] [--quick]

Each figure times compiled update chunks (after a warm-up call that compiles them) on synthetic
hopper-sized data of the real sizes (1M offline transitions; 1.25M-slot prioritized buffer), so
it measures the algorithm, not the dataset. `--memory` additionally runs `off2on_balanced.py`
end to end (tiny budgets) on the generated hopper-medium-v2 and reports its peak resident memory.
Prints JSON; a full run (every algorithm, not --quick) also writes
benchmarks/results/throughput.json, and `--out FILE` writes any run to FILE.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.machine import machine_info
from common.checkpoints import atomic_write_text

REPO = pathlib.Path(__file__).resolve().parents[1]

OBS_DIM, ACTION_DIM, NUM_OFFLINE = 11, 3, 1_000_000
ALGORITHMS = ("off2on_balanced", "bred", "td3_c", "aca", "sac")


def synthetic_offline(num=NUM_OFFLINE, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "observations": jnp.asarray(rng.normal(size=(num, OBS_DIM)), jnp.float32),
        "actions": jnp.asarray(rng.uniform(-1, 1, (num, ACTION_DIM)), jnp.float32),
        "rewards": jnp.asarray(rng.normal(size=num), jnp.float32),
        "next_observations": jnp.asarray(rng.normal(size=(num, OBS_DIM)), jnp.float32),
        "terminals": jnp.zeros(num, jnp.float32),
        "timeouts": jnp.zeros(num, jnp.float32),
    }


def time_calls(fn, calls: int) -> float:
    """Seconds per call of `fn()` (which must block), after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def collect_rate(explore, params, steps: int) -> float:
    """Env steps/s of the host collection loop (Hopper-v5, one jitted policy sample per step)."""
    from common.envs import OnlineEnv

    env = OnlineEnv("hopper", 0)
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(0), steps))

    def run():
        for t in range(steps):
            env.step(np.asarray(explore(params, env.obs, keys[t])))

    return steps / time_calls(run, 1)


def end_to_end(collect_per_s: float, updates_per_s: float) -> float:
    """Env steps/s of an epoch that collects n steps and then runs n updates."""
    return round(1.0 / (1.0 / collect_per_s + 1.0 / updates_per_s), 1)


def bench_off2on(data, quick: bool) -> dict:
    from algorithms import off2on_balanced as o2o
    from common.networks import Critic, TanhGaussianPolicy

    results = {}
    actor, critic = TanhGaussianPolicy(ACTION_DIM), Critic()
    for n in (1, 5):
        args = o2o.Args(ensemble_size=n, log_every=10 if quick else 50)
        members = o2o.create_cql_members(
            args, actor, critic, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0)
        )
        chunk = o2o.make_offline_chunk(args, o2o.make_cql_update(args, actor, critic, ACTION_DIM))
        state = {"members": members, "key": jax.random.PRNGKey(1)}

        def run(state=state, chunk=chunk):
            state["members"], state["key"], metrics = chunk(
                state["members"], data, state["key"], jnp.int32(10**6)
            )
            jax.block_until_ready(metrics)

        seconds = time_calls(run, 1 if quick else 3)
        results[f"offline_cql_N{n}_updates_per_s"] = round(args.log_every / seconds, 2)

    args = o2o.Args(ensemble_size=5)
    members = o2o.create_cql_members(
        args, actor, critic, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0)
    )
    density_ratio = o2o.DensityRatio()
    online = o2o.create_online_state(
        args, members, data, density_ratio, jax.random.PRNGKey(2), jax.random.PRNGKey(3)
    )
    train = o2o.make_online_update(args, actor, critic, density_ratio, ACTION_DIM, NUM_OFFLINE)
    epoch = jax.tree_util.tree_map(lambda x: x[:1000], synthetic_offline(1000, seed=1))
    updates = 100 if quick else 500
    holder = {"state": online}

    def run_online():
        holder["state"], metrics = train(holder["state"], epoch, jnp.int32(updates))
        jax.block_until_ready(metrics)

    seconds = time_calls(run_online, 1 if quick else 2)
    results["online_balanced_N5_updates_per_s"] = round(updates / seconds, 1)
    results["online_buffer_capacity"] = int(holder["state"].buffer.capacity)
    explore = jax.jit(
        lambda p, o, k: o2o.ensemble_policy(actor, p, o[None])[0].sample(seed=k)[0]
    )  # the script's collection policy: a sample of the moment-matched ensemble
    collect = collect_rate(explore, holder["state"].actor.params, 300 if quick else 2000)
    results["online_collect_env_steps_per_s"] = round(collect, 1)
    results["online_N5_env_steps_per_s_end_to_end"] = end_to_end(
        collect, results["online_balanced_N5_updates_per_s"]
    )
    return results


def bench_bred(data, quick: bool) -> dict:
    """Distillation and online updates/s (the offline phase is off2on_balanced's CQL block)."""
    from algorithms import bred
    from common.networks import Critic, TanhGaussianPolicy

    args = bred.Args(ensemble_size=5, distill_steps_per_epoch=100 if quick else 500)
    actor, critic = TanhGaussianPolicy(ACTION_DIM), Critic()
    members = bred.create_cql_members(
        args, actor, critic, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0)
    )
    results = {}
    # Distillation: steps/s over the epochs after the first (which compiles), validation included.
    from common.logger import Logger

    logger = Logger(pathlib.Path("/tmp") / f"bench_bred_{os.getpid()}")
    timing_args = dataclasses.replace(args, distill_epochs=3 if quick else 6, distill_patience=100)
    _, summary = bred.distill(
        timing_args, actor, members.actor.params, data["observations"], jax.random.PRNGKey(1),
        logger, 0,
    )  # fmt: skip
    logger.close()
    results["distill_steps_per_s"] = round(summary["steps_per_s"], 1)

    state = bred.create_online_state(
        args, members, jax.tree_util.tree_map(lambda x: x[0], members.actor.params),
        OBS_DIM, ACTION_DIM, jax.random.PRNGKey(2),
    )  # fmt: skip
    train, _ = bred.make_online_update(args, actor, critic, ACTION_DIM)
    epoch = synthetic_offline(1000, seed=1)
    updates = 100 if quick else 500
    holder = {"state": state}

    def run_online():
        holder["state"], metrics = train(holder["state"], data, epoch, jnp.int32(updates))
        jax.block_until_ready(metrics)

    seconds = time_calls(run_online, 1 if quick else 2)
    results["online_N5_distilled_updates_per_s"] = round(updates / seconds, 1)
    _, policy_dist = bred.make_online_update(args, actor, critic, ACTION_DIM)
    explore = jax.jit(lambda p, o, k: policy_dist(p, o[None]).sample(seed=k)[0])
    collect = collect_rate(explore, holder["state"].policy.params, 300 if quick else 2000)
    results["online_collect_env_steps_per_s"] = round(collect, 1)
    results["online_N5_env_steps_per_s_end_to_end"] = end_to_end(
        collect, results["online_N5_distilled_updates_per_s"]
    )
    return results


def bench_td3_c(data, quick: bool) -> dict:
    """Offline TD3-BC updates/s (plain MLPs and the paper's LayerNorm network) and online TD3-C
    env steps/s end to end (Hopper-v5 stepping, one update per step, 1M-item buffer)."""
    from algorithms import td3_c
    from common.buffers import ReplayBuffer
    from common.envs import OnlineEnv

    results = {}
    chunk = 200 if quick else 1000
    for layer_norm in (False, True):
        args = td3_c.Args(layer_norm=layer_norm, log_every=chunk)
        actor, critic = td3_c.make_networks(args, ACTION_DIM)
        state = td3_c.create_state(
            args, actor, critic, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0), None
        )
        update = td3_c.make_update(args, actor, critic, "td3bc")

        @jax.jit
        def offline_chunk(state, data, update=update):
            def body(state, _):
                key, batch_key, update_key = jax.random.split(state.key, 3)
                idx = jax.random.randint(batch_key, (256,), 0, NUM_OFFLINE)
                batch = jax.tree_util.tree_map(lambda x: x[idx], data)
                return update(state.replace(key=key), batch, update_key)

            return jax.lax.scan(body, state, None, length=chunk)

        holder = {"state": state}

        def run(holder=holder, offline_chunk=offline_chunk):
            holder["state"], metrics = offline_chunk(holder["state"], data)
            jax.block_until_ready(metrics)

        name = "layernorm" if layer_norm else "plain_mlp"
        results[f"offline_td3bc_{name}_updates_per_s"] = round(
            chunk / time_calls(run, 1 if quick else 3)
        )

    args = td3_c.Args(finetune="td3c")
    actor, critic = td3_c.make_networks(args, ACTION_DIM)
    buffer = ReplayBuffer.from_data(data, 1_000_000)
    state = td3_c.create_state(
        args, actor, critic, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0), buffer
    )
    step_fn = td3_c.make_env_step(args, actor, critic, ACTION_DIM, 0)
    env = OnlineEnv("hopper", 0)
    steps = 500 if quick else 3000
    holder = {"state": state, "action": np.zeros(ACTION_DIM, np.float32)}

    def run_online():
        for _ in range(steps):
            transition, _ = env.step(holder["action"])
            holder["state"], action, _ = step_fn(holder["state"], transition, env.obs, data)
            holder["action"] = np.asarray(action)

    results["online_td3c_env_steps_per_s"] = round(steps / time_calls(run_online, 1))
    return results


def bench_aca(data, quick: bool) -> dict:
    """Offline SAC+ML updates/s (with the Z baselines) and online ACA env steps/s end to end
    (Hopper-v5 stepping, one update per step, 1M-item FIFO buffer)."""
    from algorithms import aca
    from common.buffers import ReplayBuffer
    from common.envs import OnlineEnv
    from common.networks import Critic, TanhGaussianPolicy, ValueNet

    chunk = 200 if quick else 1000
    args = aca.Args(log_every=chunk)
    actor, critic, baseline = TanhGaussianPolicy(ACTION_DIM), Critic(), ValueNet()
    state = aca.create_offline_state(
        args, actor, critic, baseline, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0)
    )
    update = aca.make_offline_update(args, actor, critic, baseline, ACTION_DIM)

    @jax.jit
    def offline_chunk(state, data):
        def body(state, _):
            key, batch_key = jax.random.split(state.key)
            idx = jax.random.randint(batch_key, (256,), 0, NUM_OFFLINE)
            batch = jax.tree_util.tree_map(lambda x: x[idx], data)
            return update(state.replace(key=key), batch)

        return jax.lax.scan(body, state, None, length=chunk)

    holder = {"state": state}

    def run():
        holder["state"], metrics = offline_chunk(holder["state"], data)
        jax.block_until_ready(metrics)

    results = {"offline_sacml_z_updates_per_s": round(chunk / time_calls(run, 1 if quick else 3))}

    settings = aca.online_settings(args, "medium")
    buffer = ReplayBuffer.from_data(jax.tree_util.tree_map(lambda x: x[:50_000], data), 1_000_000)
    online = aca.create_online_state(
        args, holder["state"], OBS_DIM, ACTION_DIM, buffer, jax.random.PRNGKey(1)
    )
    step_fn = aca.make_env_step(args, settings, actor, critic, ACTION_DIM)
    env = OnlineEnv("hopper", 0)
    steps = 500 if quick else 3000
    online_holder = {"state": online, "action": np.zeros(ACTION_DIM, np.float32)}

    def run_online():
        for _ in range(steps):
            transition, _ = env.step(online_holder["action"])
            online_holder["state"], action, _ = step_fn(online_holder["state"], transition, env.obs)
            online_holder["action"] = np.asarray(action)

    results["online_aca_env_steps_per_s"] = round(steps / time_calls(run_online, 1))
    return results


def bench_sac(quick: bool) -> dict:
    from algorithms import sac

    args = sac.Args(learning_starts=0, buffer_size=1_000_000)
    state = sac.create_state(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    step = sac.make_train_step(args, ACTION_DIM)
    transition = {k: np.asarray(v[0]) for k, v in synthetic_offline(1).items()}
    obs = jnp.zeros(OBS_DIM)
    holder = {"state": state}

    def run():
        for _ in range(100):
            holder["state"], action, _ = step(holder["state"], transition, obs)
        jax.block_until_ready(action)

    seconds = time_calls(run, 1 if quick else 5)
    return {"online_updates_per_s_without_env": round(100 / seconds, 1)}


def bench_memory() -> dict:
    """Peak RSS of a whole off2on_balanced run (both phases) on the 1M hopper-medium-v2."""
    code = (
        "import resource, runpy, sys; sys.argv = ['off2on_balanced.py', '--env', "
        "'hopper-medium-v2', '--offline-steps', '1000', '--log-every', '500', "
        "'--offline-eval-every', '1000', '--online-steps', '2000', '--eval-episodes', '1', "
        "'--checkpoint-every', '1000', '--run-dir', sys.argv[1], '--no-generate']\n"
        "try:\n    runpy.run_path('algorithms/off2on_balanced.py', run_name='__main__')\n"
        "finally:\n    print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    run_dir = pathlib.Path("/tmp") / f"bench_memory_{os.getpid()}"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(run_dir)], cwd=REPO, capture_output=True, text=True
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MAXRSS_KB")]
    if proc.returncode != 0 or not lines:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "no output"}
    return {"off2on_balanced_peak_rss_gb": round(int(lines[0].split()[1]) / 2**20, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=list(ALGORITHMS))
    parser.add_argument("--quick", action="store_true", help="short timings (a smoke check)")
    parser.add_argument("--memory", action="store_true", help="also measure a run's peak RSS")
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        help="JSON file to write (default: benchmarks/results/throughput.json, only for a full "
        "run, so the committed file always holds every algorithm measured together)",
    )
    args = parser.parse_args()
    report = {
        "machine": machine_info(),
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "quick": args.quick,
        "results": {},
    }
    data = synthetic_offline()
    benches = {
        "off2on_balanced": lambda: bench_off2on(data, args.quick),
        "bred": lambda: bench_bred(data, args.quick),
        "td3_c": lambda: bench_td3_c(data, args.quick),
        "aca": lambda: bench_aca(data, args.quick),
        "sac": lambda: bench_sac(args.quick),
    }
    for name in ALGORITHMS:
        if name in args.only:
            report["results"][name] = benches[name]()
            if args.out:  # an interrupted run (a time-limited accelerator lease) keeps what it has
                atomic_write_text(args.out, json.dumps({**report, "partial": True}, indent=2))
    if args.memory:
        report["results"].setdefault("off2on_balanced", {}).update(bench_memory())
    report["bench_process_peak_rss_gb"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2
    )
    text = json.dumps(report, indent=2)
    print(text)
    full_run = set(args.only) == set(ALGORITHMS) and not args.quick
    out = args.out or (REPO / "benchmarks/results/throughput.json" if full_run else None)
    if out:
        atomic_write_text(out, text + "\n")


if __name__ == "__main__":
    main()
