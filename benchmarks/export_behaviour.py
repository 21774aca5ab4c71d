"""Export the behaviour policies of a finished `algorithms/sac.py` run into the repository.

Writes `benchmarks/behaviour_policies/<env>/`:
  medium.npz         the actor snapshot whose stochastic return is closest to the medium target
                     (penalising an erratic one: distance + half the return std)
  expert.npz         SAC trained to completion: the best late snapshot (last 30% of training) by
                     stochastic return, since SAC's evaluation return oscillates
  medium_replay.npz  the run's replay buffer from step 0 up to the medium snapshot (insertion
                     order, observations stored T+1 per episode), compressed
  manifest.json      env, SAC step, returns over >= 10 episodes (deterministic and stochastic),
                     seed, network sizes, file names

Usage:
    python benchmarks/export_behaviour.py --env hopper --run-dir RUN [--medium-target 1420]
"""

import argparse
import json
import pathlib

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np

from common.checkpoints import atomic_write_bytes, atomic_write_text, load_checkpoint
from common.d4rl import GYM_ENV_IDS, normalized_score
from common.evaluation import evaluate
from common.networks import TanhGaussianPolicy, tanh_gaussian, tanh_gaussian_mode

REPO = pathlib.Path(__file__).resolve().parents[1]

POLICY_DIR = REPO / "benchmarks" / "behaviour_policies"
# D4RL's medium behaviour returns (-v2 datasets), the targets of the medium policy.
MEDIUM_TARGETS = {"hopper": 1422.0, "halfcheetah": 4770.0, "walker2d": 2852.0, "ant": 3051.0}


def load_actor(path: pathlib.Path, env: str, hidden_dims=(256, 256)):
    spec_env = gym.make(GYM_ENV_IDS[env])
    obs_dim, action_dim = spec_env.observation_space.shape[0], spec_env.action_space.shape[0]
    actor = TanhGaussianPolicy(action_dim, hidden_dims)
    template = {"params": actor.init(jax.random.PRNGKey(0), jnp.zeros((1, obs_dim)))}
    state, meta = load_checkpoint(path, template)
    return actor, state["params"], meta


def policy_returns(env: str, actor, params, episodes: int, seed: int) -> dict:
    deterministic = jax.jit(lambda o: tanh_gaussian_mode(actor.apply(params, o)[0]))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 100_000))
    stochastic_fn = jax.jit(lambda o, k: tanh_gaussian(*actor.apply(params, o)).sample(seed=k))
    det = evaluate(env, deterministic, episodes, seed)
    sto = evaluate(env, lambda o: stochastic_fn(o, next(keys)), episodes, seed + 1000)
    return {
        "deterministic_return": det.mean_return,
        "deterministic_return_std": float(det.returns.std()),
        "stochastic_return": sto.mean_return,
        "stochastic_return_std": float(sto.returns.std()),
        "stochastic_normalized": float(normalized_score(env, sto.mean_return)),
        "eval_episodes": episodes,
    }


def buffer_arrays(checkpoint: pathlib.Path) -> dict[str, np.ndarray]:
    """The replay buffer's arrays and size, read straight from a SAC checkpoint."""
    with np.load(checkpoint, allow_pickle=False) as f:
        out = {}
        for key in f.files:
            if ".buffer.data[" in key:
                out[key.split("data['")[1].rstrip("']")] = f[key]
            elif key.endswith(".buffer.size"):
                out["size"] = int(f[key])
    return out


def replay_prefix_as_episodes(buffer: dict, steps: int) -> dict[str, np.ndarray]:
    """First `steps` transitions as Minari-style episodes. An episode ends at a termination or
    a time-out, or where s'_t != s_{t+1} (a resumed run restarted the env): marked truncated."""
    obs, next_obs = buffer["observations"][:steps], buffer["next_observations"][:steps]
    terminals = buffer["terminals"][:steps].astype(bool)
    timeouts = buffer["timeouts"][:steps].astype(bool)
    broken = np.zeros(steps, bool)
    broken[:-1] = np.any(next_obs[:-1] != obs[1:], axis=1)
    ends = terminals | timeouts | broken
    ends[-1] = True
    truncations = (timeouts | broken | (np.arange(steps) == steps - 1)) & ~terminals
    lengths = np.diff(np.concatenate([[-1], np.flatnonzero(ends)]))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    observations = np.concatenate(
        [
            np.concatenate([obs[s : s + n], next_obs[s + n - 1 : s + n]])
            for s, n in zip(starts, lengths, strict=True)
        ]
    )
    return {
        "observations": observations.astype(np.float32),
        "actions": buffer["actions"][:steps].astype(np.float32),
        "rewards": buffer["rewards"][:steps].astype(np.float32),
        "terminations": terminals,
        "truncations": truncations,
        "episode_lengths": lengths.astype(np.int64),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", required=True, choices=sorted(GYM_ENV_IDS))
    parser.add_argument("--run-dir", type=pathlib.Path, required=True)
    parser.add_argument("--medium-target", type=float, help="default: D4RL's medium return")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--candidates", type=int, default=6, help="snapshots evaluated")
    parser.add_argument("--out", type=pathlib.Path, default=POLICY_DIR)
    args = parser.parse_args(argv)
    target = args.medium_target or MEDIUM_TARGETS[args.env]
    config = json.loads((args.run_dir / "config.json").read_text())
    hidden = tuple(config["hidden_dims"])

    # Medium: among step snapshots, shortlist those whose logged deterministic return is
    # nearest the target, then pick by measured stochastic return (the data are sampled).
    # "Stopped early": only snapshots before the run first evaluates well above the target
    # (1.5x) count, so a late dip of a near-expert policy is never taken for the medium policy.
    snapshots = []  # (|logged return - target|, step, path, logged return)
    for path in sorted((args.run_dir / "actors").glob("step_*.npz")):
        _, _, meta = load_actor(path, args.env, hidden)
        if "eval/return" in meta:
            logged = meta["eval/return"]
            snapshots.append((abs(logged - target), meta["step"], path, logged))
    above = [step for _, step, _, logged in snapshots if logged >= 1.5 * target]
    stop = min(above) if above else float("inf")
    shortlist = sorted(m[:3] for m in snapshots if m[1] < stop)[: args.candidates]
    measured = []
    for _, step, path in shortlist:
        actor, params, _ = load_actor(path, args.env, hidden)
        stats = policy_returns(args.env, actor, params, args.episodes, seed=step)
        print(f"candidate step {step}: {stats}")
        # Closest to the target, penalising erratic policies (half the episode-return std):
        # D4RL's medium policies are consistent (hopper-medium-v2: 1422 +- 378).
        score = abs(stats["stochastic_return"] - target) + 0.5 * stats["stochastic_return_std"]
        measured.append((score, step, path, stats))
    _, medium_step, medium_path, medium_stats = min(measured, key=lambda m: m[:2])
    out = args.out / args.env
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest |= {
        "env": GYM_ENV_IDS[args.env],
        "trainer": "algorithms/sac.py",
        "seed": config["seed"],
        "sac_total_steps": config["total_steps"],
    }
    policies = manifest.setdefault("policies", {})

    atomic_write_bytes(out / "medium.npz", lambda f: f.write(medium_path.read_bytes()))
    policies["medium"] = {
        "file": "medium.npz",
        "sac_step": medium_step,
        "hidden_dims": list(hidden),
        "target_return": target,
        **medium_stats,
    }
    replay = replay_prefix_as_episodes(buffer_arrays(args.run_dir / "checkpoint.npz"), medium_step)
    atomic_write_bytes(out / "medium_replay.npz", lambda f: np.savez_compressed(f, **replay))
    manifest["medium_replay"] = {
        "file": "medium_replay.npz",
        "sac_steps": medium_step,
        "transitions": int(replay["episode_lengths"].sum()),
        "episodes": len(replay["episode_lengths"]),
    }
    final = args.run_dir / "actors" / "final.npz"
    if final.exists():  # the expert exists once the SAC run has finished
        # SAC's evaluation return oscillates (hopper dips from ~3300 to ~1300 and back), so the
        # expert is the best of the late snapshots (last 30% of training), by stochastic return.
        late_returns = [
            (-logged, step, path)
            for _, step, path, logged in snapshots
            if step >= 0.7 * config["total_steps"]
        ]
        candidates = []
        for _, step, path in sorted(late_returns)[: args.candidates]:
            actor, params, _ = load_actor(path, args.env, hidden)
            stats = policy_returns(args.env, actor, params, args.episodes, seed=step + 1)
            print(f"expert candidate step {step}: {stats}")
            candidates.append((-stats["stochastic_return"], step, path, stats))
        _, expert_step, expert_path, expert_stats = min(candidates, key=lambda m: m[:2])
        atomic_write_bytes(out / "expert.npz", lambda f: f.write(expert_path.read_bytes()))
        policies["expert"] = {
            "file": "expert.npz",
            "sac_step": expert_step,
            "hidden_dims": list(hidden),
            "selection": "best stochastic return among the 6 best-evaluated snapshots of the "
            "last 30% of SAC training",
            **expert_stats,
        }
    else:
        print(f"{final} does not exist yet: exported medium and medium-replay only")
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
