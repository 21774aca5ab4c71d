"""Generate D4RL-recipe MuJoCo datasets on the gymnasium v5 envs, stored as Minari datasets.

The recipe (D4RL, Fu et al. 2020; `../shared/docs/ALGORITHM_FACTS.md`):
  random         1M steps of a randomly initialised SAC policy network (sampled; not uniform)
  medium         1M steps of a SAC policy stopped early at about 1/3 of expert return
  medium-replay  the replay buffer of that SAC run up to the medium point (exact, see below)
  expert         1M steps of SAC trained to completion
  medium-expert  medium and expert concatenated
Episodes last at most 1000 steps; the time-limit cut is a truncation, never a termination.

The behaviour policies are committed under `benchmarks/behaviour_policies/<env>/` with a
`manifest.json` (SAC step, evaluation return over >= 10 episodes, seed), trained by
`algorithms/sac.py`. `medium_replay.npz` there holds the SAC run's replay buffer up to the medium
point, in insertion order, so medium-replay is exactly D4RL's construction, not an approximation.

Policies act stochastically (samples of the tanh-Gaussian), as D4RL's SAC data collection did.
Collection runs `--num-envs` environments in lockstep with one batched policy call per step; each
environment collects steps/num_envs steps, and its last, cut episode is marked truncated.

Usage:
    python benchmarks/make_datasets.py --env hopper                  # all five splits
    python benchmarks/make_datasets.py --env hopper --splits medium  # one split
    make datasets ENV=hopper
"""

import argparse
import json
import pathlib
import subprocess
import sys
import time

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import common  # noqa: E402
from common.checkpoints import atomic_write_text, load_checkpoint  # noqa: E402
from common.datasets import (  # noqa: E402
    GENERATED_NAMESPACE,
    GYM_ENV_IDS,
    SPLITS,
    DatasetError,
    minari_id,
    minari_root,
    normalized_score,
    write_minari_dataset,
)
from common.networks import TanhGaussianPolicy, tanh_gaussian  # noqa: E402

POLICY_DIR = REPO / "benchmarks" / "behaviour_policies"
EPISODE_KEYS = ("observations", "actions", "rewards", "terminations", "truncations")


def project_version() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    return f"o2o-jax {common.__version__}" + (f" ({commit})" if commit else "")


def read_manifest(env: str) -> dict:
    path = POLICY_DIR / env / "manifest.json"
    if not path.exists():
        raise DatasetError(
            f"no behaviour policies for {env!r} in {POLICY_DIR}; train them with "
            f"algorithms/sac.py (see {POLICY_DIR / 'README.md'})"
        )
    return json.loads(path.read_text())


def load_policy(env: str, level: str, seed: int):
    """(actor module, params, description) for level "random", "medium" or "expert"."""
    gym_env = gym.make(GYM_ENV_IDS[env])
    obs_dim, action_dim = gym_env.observation_space.shape[0], gym_env.action_space.shape[0]
    if level == "random":
        actor = TanhGaussianPolicy(action_dim, (256, 256))
        params = actor.init(jax.random.PRNGKey(seed), jnp.zeros((1, obs_dim)))
        return actor, params, {"policy": f"randomly initialised SAC actor (seed {seed})"}
    entry = read_manifest(env)["policies"][level]
    actor = TanhGaussianPolicy(action_dim, tuple(entry["hidden_dims"]))
    template = {"params": actor.init(jax.random.PRNGKey(0), jnp.zeros((1, obs_dim)))}
    restored, _ = load_checkpoint(POLICY_DIR / env / entry["file"], template)
    return actor, restored["params"], entry


def collect(env: str, actor, params, num_steps: int, num_envs: int, seed: int, desc: str):
    """Roll out the stochastic policy in `num_envs` lockstep envs; returns Minari episodes."""
    if num_steps % num_envs:
        raise ValueError(f"--steps {num_steps} must be divisible by --num-envs {num_envs}")
    quota = num_steps // num_envs
    envs = [gym.make(GYM_ENV_IDS[env]) for _ in range(num_envs)]
    rng = np.random.default_rng(seed)

    @jax.jit
    def act(obs, key):
        return tanh_gaussian(*actor.apply(params, obs)).sample(seed=key)

    def new_episode(i):
        obs, _ = envs[i].reset(seed=int(rng.integers(2**31)))
        return {k: [] for k in EPISODE_KEYS} | {"observations": [obs]}

    current = [new_episode(i) for i in range(num_envs)]
    taken = np.zeros(num_envs, np.int64)
    episodes = []
    key = jax.random.PRNGKey(seed)
    with tqdm(total=num_steps, desc=desc, unit="step", mininterval=1.0) as bar:
        while (taken < quota).any():
            key, act_key = jax.random.split(key)
            obs = np.stack([ep["observations"][-1] for ep in current]).astype(np.float32)
            actions = np.asarray(act(obs, act_key))
            active = np.flatnonzero(taken < quota)
            for i in active:
                next_obs, reward, terminated, truncated, _ = envs[i].step(actions[i])
                taken[i] += 1
                # A fall is a termination; the time limit or the end of the quota, a truncation.
                truncated = (truncated or taken[i] == quota) and not terminated
                ep = current[i]
                for k, v in zip(
                    EPISODE_KEYS, (next_obs, actions[i], reward, terminated, truncated), strict=True
                ):
                    ep[k].append(v)
                if terminated or truncated:
                    episodes.append({k: np.asarray(v) for k, v in ep.items()})
                    if taken[i] < quota:
                        current[i] = new_episode(i)
            bar.update(len(active))
    return episodes


def replay_episodes(path: pathlib.Path) -> list[dict]:
    """Episodes of a stored replay buffer (observations are stored T+1 per episode)."""
    with np.load(path, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    episodes, obs_start, step_start = [], 0, 0
    for length in data["episode_lengths"]:
        episodes.append(
            {
                "observations": data["observations"][obs_start : obs_start + length + 1],
                **{
                    k: data[k][step_start : step_start + length]
                    for k in ("actions", "rewards", "terminations", "truncations")
                },
            }
        )
        obs_start, step_start = obs_start + length + 1, step_start + length
    return episodes


def summarize(env: str, episodes: list[dict]) -> dict:
    returns = np.array([ep["rewards"].sum() for ep in episodes])
    # Partial episodes (cut by the step budget) would bias the return low: leave them out unless
    # every episode is partial.
    full = np.array([ep["terminations"][-1] or len(ep["rewards"]) == 1000 for ep in episodes])
    ref = returns[full] if full.any() else returns
    return {
        "behaviour_return": float(ref.mean()),
        "behaviour_return_std": float(ref.std()),
        "behaviour_normalized_score": float(normalized_score(env, ref.mean())),
        "num_transitions": int(sum(len(ep["rewards"]) for ep in episodes)),
        "num_episodes": len(episodes),
    }


def generate(env: str, split: str, steps: int, num_envs: int, seed: int, root, overwrite: bool):
    """Build one split and write it as the generated Minari dataset. Returns its summary."""
    gym_id = GYM_ENV_IDS[env]
    start = time.perf_counter()
    if split in ("random", "medium", "expert"):
        actor, params, source = load_policy(env, split, seed)
        episodes = collect(env, actor, params, steps, num_envs, seed, f"{env}-{split}")
        how = f"{steps} steps of the stochastic {split} policy in {num_envs} lockstep envs"
    elif split == "medium-replay":
        source = read_manifest(env)["medium_replay"]
        episodes = replay_episodes(POLICY_DIR / env / source["file"])
        how = "the SAC run's replay buffer up to the medium point, in insertion order"
    else:  # medium-expert: the two generated datasets, concatenated
        episodes, source = [], {}
        for part in ("medium", "expert"):
            part_id = minari_id(GENERATED_NAMESPACE, env, part)
            part_root = minari_root() if root is None else pathlib.Path(root)
            if not (part_root / part_id).exists():
                generate(env, part, steps, num_envs, seed, root, overwrite=False)
            from minari import MinariDataset

            dataset = MinariDataset(part_root / part_id / "data")
            episodes += [
                {
                    "observations": e.observations,
                    "actions": e.actions,
                    "rewards": e.rewards,
                    "terminations": e.terminations,
                    "truncations": e.truncations,
                }
                for e in dataset.iterate_episodes()
            ]
            source[part] = part_id
        how = "medium and expert concatenated"
    summary = summarize(env, episodes)
    metadata = {
        "description": f"D4RL-recipe {env}-{split} on {gym_id}: {how}. Generated by "
        f"{project_version()} (benchmarks/make_datasets.py).",
        "algorithm_name": "SAC behaviour policy (o2o-jax algorithms/sac.py)"
        if split != "random"
        else "randomly initialised policy",
        "author": {"o2o-jax"},
        "code_permalink": "benchmarks/make_datasets.py",
        "d4rl_name": f"{env}-{split}-v2",
        "behaviour_policy": json.dumps(source),
        "project_version": project_version(),
        "generation_seed": seed,
        **summary,
    }
    dataset_id = minari_id(GENERATED_NAMESPACE, env, split)
    path = write_minari_dataset(
        dataset_id, episodes, gym_id, metadata, root=root, overwrite=overwrite
    )
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["path"] = str(path)
    return summary


# Typical behaviour returns of D4RL's medium datasets, from ../shared/docs/ALGORITHM_FACTS.md
# (the only D4RL behaviour statistics in the project's sources).
D4RL_TYPICAL_MEDIUM_RETURN = {"hopper": 1400.0, "halfcheetah": 4700.0, "walker2d": 3000.0}


def dataset_table(root=None) -> tuple[str, list[dict]]:
    """Markdown table (and rows) of every generated dataset under the Minari root."""
    from minari.dataset.minari_storage import MinariStorage

    root = minari_root() if root is None else pathlib.Path(root)
    rows = []
    for env in GYM_ENV_IDS:
        for split in SPLITS:
            path = root / minari_id(GENERATED_NAMESPACE, env, split)
            if not (path / "data").exists():
                continue
            meta = MinariStorage.read_raw_metadata(path / "data")
            typical = D4RL_TYPICAL_MEDIUM_RETURN.get(env) if split == "medium" else None
            rows.append(
                {
                    "name": f"{env}-{split}-v2",
                    "transitions": meta["total_steps"],
                    "episodes": meta["total_episodes"],
                    "behaviour_return": round(meta["behaviour_return"], 1),
                    "behaviour_return_std": round(
                        meta.get("behaviour_return_std", float("nan")), 1
                    ),
                    "normalized": round(meta["behaviour_normalized_score"], 1),
                    "d4rl_typical_return": typical,
                    "d4rl_typical_normalized": None
                    if typical is None
                    else round(float(normalized_score(env, typical)), 1),
                }
            )
    lines = [
        "| dataset | transitions | episodes | behaviour return (± std) | normalized "
        "| D4RL typical return (normalized) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        d4rl = (
            "n/a"
            if r["d4rl_typical_return"] is None
            else (f"~{r['d4rl_typical_return']:.0f} ({r['d4rl_typical_normalized']:.1f})")
        )
        lines.append(
            f"| {r['name']} | {r['transitions']:,} | {r['episodes']:,} | "
            f"{r['behaviour_return']:.1f} ± {r['behaviour_return_std']:.1f} | "
            f"{r['normalized']:.1f} | {d4rl} |"
        )
    return "\n".join(lines) + "\n", rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", choices=sorted(GYM_ENV_IDS), help="generate this env's splits")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--steps", type=int, default=1_000_000, help="steps per rollout split")
    parser.add_argument("--num-envs", type=int, default=20, help="lockstep environments")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=pathlib.Path, help="Minari root (default: Minari's)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing datasets")
    parser.add_argument(
        "--table", type=pathlib.Path, help="write a Markdown table of all generated datasets here"
    )
    args = parser.parse_args(argv)
    if args.env is None and args.table is None:
        parser.error("nothing to do: pass --env ENV to generate, --table FILE to tabulate, or both")
    # medium-expert is built from medium and expert: build those first.
    order = ("random", "medium", "expert", "medium-replay", "medium-expert")
    try:
        for split in sorted(set(args.splits), key=order.index) if args.env else ():
            target = (args.root or minari_root()) / minari_id(GENERATED_NAMESPACE, args.env, split)
            if target.exists() and not args.overwrite:
                print(f"{args.env}-{split}-v2: exists at {target} (use --overwrite to rebuild)")
                continue
            summary = generate(
                args.env, split, args.steps, args.num_envs, args.seed, args.root, args.overwrite
            )
            print(f"{args.env}-{split}-v2: " + json.dumps(summary))
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.table:
        text, rows = dataset_table(args.root)
        atomic_write_text(args.table, text)
        atomic_write_text(args.table.with_suffix(".json"), json.dumps(rows, indent=2) + "\n")
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
