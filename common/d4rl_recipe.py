"""The D4RL recipe: MuJoCo datasets generated on the gymnasium v5 envs, stored as Minari datasets.

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

Library code: `common.datasets.load_d4rl` generates a missing dataset with it on first use, and
`benchmarks/make_datasets.py` is its command line (`make datasets ENV=hopper`). Outside a checkout
(a file copied out with `common/`), point `$O2O_BEHAVIOUR_POLICIES` at a copy of the policies.
`make_tiny_dataset` (uniform-random actions, seconds) builds the test datasets.
"""

import json
import os
import pathlib
import subprocess
import time

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import common
from common.checkpoints import load_checkpoint
from common.d4rl import GYM_ENV_IDS, DatasetError, normalized_score, parse_name
from common.minari_io import GENERATED_NAMESPACE, minari_id, minari_root, write_minari_dataset
from common.networks import TanhGaussianPolicy, tanh_gaussian

REPO = pathlib.Path(__file__).resolve().parents[1]
# Data, not code: the committed policies of a checkout, or wherever $O2O_BEHAVIOUR_POLICIES says.
POLICY_DIR = pathlib.Path(
    os.environ.get("O2O_BEHAVIOUR_POLICIES", REPO / "benchmarks" / "behaviour_policies")
)
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

    # The policy runs on the CPU device even where an accelerator is the default: a dataset is
    # then the same on a GPU machine as on a CPU one (an H200's rollouts of hopper-medium
    # diverged in floating point: 2577 episodes against 2589), and a GPU gains nothing on one
    # small batch per env step.
    cpu = jax.devices("cpu")[0]
    params = jax.device_put(params, cpu)

    @jax.jit
    def act(obs, key):
        return tanh_gaussian(*actor.apply(params, obs)).sample(seed=key)

    def new_episode(i):
        obs, _ = envs[i].reset(seed=int(rng.integers(2**31)))
        return {k: [] for k in EPISODE_KEYS} | {"observations": [obs]}

    current = [new_episode(i) for i in range(num_envs)]
    taken = np.zeros(num_envs, np.int64)
    episodes = []
    key = jax.device_put(jax.random.PRNGKey(seed), cpu)
    with tqdm(total=num_steps, desc=desc, unit="step", mininterval=1.0) as bar:
        while (taken < quota).any():
            key, act_key = jax.random.split(key)
            obs = np.stack([ep["observations"][-1] for ep in current]).astype(np.float32)
            actions = np.asarray(act(jax.device_put(obs, cpu), act_key))
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
        f"{project_version()} (common/d4rl_recipe.py).",
        "algorithm_name": "SAC behaviour policy (o2o-jax algorithms/sac.py)"
        if split != "random"
        else "randomly initialised policy",
        "author": {"o2o-jax"},
        "code_permalink": "common/d4rl_recipe.py",
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


# --- Tiny datasets for tests: uniform-random actions, one process ----------------------


def rollout_episodes(
    gym_id: str, policy, num_steps: int, seed: int, max_episode_steps: int | None = None
) -> list[dict]:
    """Run `policy(obs, rng) -> action` for `num_steps` env steps; the last episode is cut and
    marked truncated. Time-limit ends are truncations, falls are terminations."""
    kwargs = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
    env = gym.make(gym_id, **kwargs)
    rng = np.random.default_rng(seed)
    episodes, steps = [], 0
    while steps < num_steps:
        obs, _ = env.reset(seed=int(rng.integers(2**31)))
        ep = {k: [] for k in ("observations", "actions", "rewards", "terminations", "truncations")}
        ep["observations"].append(obs)
        terminated = truncated = False
        while not (terminated or truncated):
            action = np.asarray(policy(obs, rng), np.float32)
            obs, reward, terminated, truncated, _ = env.step(action)
            steps += 1
            # Cut by the time limit or by the step budget, and not a fall: a truncation.
            truncated = (truncated or steps == num_steps) and not terminated
            for key, value in zip(
                ("observations", "actions", "rewards", "terminations", "truncations"),
                (obs, action, reward, terminated, truncated),
                strict=True,
            ):
                ep[key].append(value)
        episodes.append({k: np.asarray(v) for k, v in ep.items()})
    env.close()
    return episodes


def make_tiny_dataset(
    root: pathlib.Path,
    name: str = "hopper-medium-v2",
    num_steps: int = 3000,
    max_episode_steps: int = 100,
    seed: int = 0,
) -> str:
    """A tiny dataset for tests, in seconds: uniform-random actions, short time limit (so both
    terminations and truncations occur), stored as the generated dataset for `name` under
    `root`. Point MINARI_DATASETS_PATH at `root` to load it by name. Returns its Minari id."""
    env, split = parse_name(name)
    action_shape = gym.make(GYM_ENV_IDS[env]).action_space.shape

    def random_policy(obs, rng):
        return rng.uniform(-1.0, 1.0, size=action_shape)

    episodes = rollout_episodes(GYM_ENV_IDS[env], random_policy, num_steps, seed, max_episode_steps)
    dataset_id = minari_id(GENERATED_NAMESPACE, env, split)
    write_minari_dataset(
        dataset_id,
        episodes,
        GYM_ENV_IDS[env],
        {"description": f"tiny test dataset: {num_steps} uniform-random steps"},
        root=root,
    )
    return dataset_id
