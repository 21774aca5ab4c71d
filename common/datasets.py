"""Offline datasets by D4RL name (`hopper-medium-v2`), stored in Minari's format.

Name resolution, in order (the first that exists wins):
  1. official Minari dataset on disk      `mujoco/<env>/<split>-v*`   (only medium and expert exist)
  2. official Minari dataset on the hub   (same ids; only where the network allows)
  3. project-generated dataset on disk    `o2o/<env>/<split>-v*`      (D4RL recipe, see issue #3)
otherwise a one-line error naming the command that generates it. The Minari root is Minari's own
(`$MINARI_DATASETS_PATH`, default `~/.minari/datasets`).

Loaded data are device arrays: observations, actions, rewards, next_observations, terminals,
timeouts. Minari stores T+1 observations per episode, so `next_observations` is exact at every
step, including the last one of a time-limit-truncated episode; such a step has `timeouts=1` and
`terminals=0` (a truncation is never a termination, so the critic still bootstraps through it).

CLI:  python -m common.datasets list | info NAME | verify NAME
"""

import dataclasses
import hashlib
import os
import pathlib
import re
import shutil
import socket
import sys
import uuid

import gymnasium as gym
import jax.numpy as jnp
import numpy as np

from common.checkpoints import atomic_write_bytes
from common.validation import ArgumentParser, UsageError

# D4RL reference returns (random, expert) per environment; every split of an env shares them.
D4RL_REF_SCORES: dict[str, tuple[float, float]] = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
}
GYM_ENV_IDS: dict[str, str] = {
    "hopper": "Hopper-v5",
    "halfcheetah": "HalfCheetah-v5",
    "walker2d": "Walker2d-v5",
    "ant": "Ant-v5",
}
SPLITS = ("random", "medium", "medium-replay", "medium-expert", "expert")
# Splits that Minari's hub holds as `mujoco/<env>/<split>-v0` (random/medium-replay/medium-expert
# do not exist there).
OFFICIAL_SPLITS = ("medium", "expert")
OFFICIAL_NAMESPACE = "mujoco"
GENERATED_NAMESPACE = "o2o"
TRANSITION_KEYS = (
    "observations",
    "actions",
    "rewards",
    "next_observations",
    "terminals",
    "timeouts",
)
AUTO_GENERATE_STEPS = 1_000_000  # steps per rollout split when a dataset is generated on first use
GENERATE_COMMAND = "make datasets ENV={env}  (or: python benchmarks/make_datasets.py --env {env})"


class DatasetError(UsageError):
    """A user-facing dataset problem; its message is one line that says how to fix it."""


def known_names() -> list[str]:
    return [f"{env}-{split}-v2" for env in GYM_ENV_IDS for split in SPLITS]


def parse_name(name: str) -> tuple[str, str]:
    """`hopper-medium-replay-v2` -> ("hopper", "medium-replay")."""
    match = re.fullmatch(r"([a-z0-9]+)-([a-z-]+)-v2", name)
    if match is None or match.group(1) not in GYM_ENV_IDS or match.group(2) not in SPLITS:
        raise DatasetError(f"unknown dataset {name!r}; known names: {', '.join(known_names())}")
    return match.group(1), match.group(2)


def minari_root() -> pathlib.Path:
    """Minari's local dataset root (honours $MINARI_DATASETS_PATH at call time)."""
    root = os.environ.get("MINARI_DATASETS_PATH")
    return pathlib.Path(root) if root else pathlib.Path.home() / ".minari" / "datasets"


def minari_id(namespace: str, env: str, split: str, version: int = 0) -> str:
    return f"{namespace}/{env}/{split}-v{version}"


def _latest_local(namespace: str, env: str, split: str) -> str | None:
    folder = minari_root() / namespace / env
    versions = []
    if folder.is_dir():
        for child in folder.iterdir():
            match = re.fullmatch(re.escape(split) + r"-v(\d+)", child.name)
            if match and (child / "data").is_dir():
                versions.append(int(match.group(1)))
    return minari_id(namespace, env, split, max(versions)) if versions else None


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve(name: str, allow_download: bool = True) -> tuple[str, str]:
    """Map a D4RL name to (minari_id, source); source is "official", "official-download" or
    "generated". Raises DatasetError naming the generate command when nothing is available."""
    env, split = parse_name(name)
    if split in OFFICIAL_SPLITS:
        local = _latest_local(OFFICIAL_NAMESPACE, env, split)
        if local:
            return local, "official"
    generated = _latest_local(GENERATED_NAMESPACE, env, split)
    if split in OFFICIAL_SPLITS and allow_download and generated is None and _hub_reachable():
        import minari  # imported lazily: loading minari's hub client is slow

        official = minari_id(OFFICIAL_NAMESPACE, env, split)
        try:
            minari.download_dataset(official)
            return official, "official-download"
        except Exception as err:  # noqa: BLE001 - any hub failure falls through to generation
            print(f"[datasets] download of {official} failed ({err}); trying local data")
    if generated:
        return generated, "generated"
    raise DatasetError(
        f"dataset {name!r} is not in {minari_root()} and cannot be downloaded here; "
        f"generate it with: {GENERATE_COMMAND.format(env=env)}"
    )


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str  # D4RL name, e.g. hopper-medium-v2
    env: str  # hopper
    gym_id: str  # Hopper-v5
    minari_id: str
    source: str
    num_transitions: int
    num_episodes: int
    behaviour_return: float  # from the dataset's metadata if recorded, else mean episode return
    ref_min_score: float
    ref_max_score: float

    def describe(self) -> str:
        return (
            f"dataset {self.name} -> {self.minari_id} [{self.source}]: "
            f"{self.num_transitions} transitions, {self.num_episodes} episodes, behaviour return "
            f"{self.behaviour_return:.1f} (normalized "
            f"{normalized_score(self.env, self.behaviour_return):.1f})"
        )


@dataclasses.dataclass(frozen=True)
class OfflineData:
    transitions: dict  # TRANSITION_KEYS -> device arrays with a leading axis of size n
    episode_ids: np.ndarray  # [n] int32, index of the episode each transition belongs to
    episode_returns: np.ndarray  # [num_episodes] undiscounted return of each episode
    info: DatasetInfo


def read_episodes(path: pathlib.Path) -> tuple[dict, dict]:
    """Concatenate every episode of the Minari dataset at `path` (the folder holding `data/`).
    Returns (numpy arrays keyed like TRANSITION_KEYS plus "episode_ids", Minari metadata).

    Reading a Minari hdf5 file costs a few ms per episode (a random split has ~40k episodes), so
    the flat arrays are cached beside `data/` in `o2o_flat_cache.npz`, keyed by the data file's
    size and modification time; a changed dataset invalidates the cache."""
    from minari import MinariDataset  # lazy: keeps `import common` light

    dataset = MinariDataset(path / "data")
    metadata = dataset.storage.metadata
    if not isinstance(dataset.observation_space, gym.spaces.Box):
        raise DatasetError(f"{path}: only flat Box observations are supported")
    stamp = np.asarray(
        [(f.stat().st_size, f.stat().st_mtime_ns) for f in sorted((path / "data").iterdir())]
    )
    cache = path / "o2o_flat_cache.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as f:
            if np.array_equal(f["stamp"], stamp):
                return {k: f[k] for k in (*TRANSITION_KEYS, "episode_ids")}, metadata
    parts: dict[str, list] = {k: [] for k in (*TRANSITION_KEYS, "episode_ids")}
    for i, episode in enumerate(dataset.iterate_episodes()):
        obs = np.asarray(episode.observations, np.float32)
        steps = len(episode.rewards)
        parts["observations"].append(obs[:-1])
        parts["next_observations"].append(obs[1:])
        parts["actions"].append(np.asarray(episode.actions, np.float32))
        parts["rewards"].append(np.asarray(episode.rewards, np.float32))
        terminations = np.asarray(episode.terminations, bool)
        # A step that both terminates and hits the time limit is a termination (D4RL convention).
        truncations = np.asarray(episode.truncations, bool) & ~terminations
        parts["terminals"].append(terminations.astype(np.float32))
        parts["timeouts"].append(truncations.astype(np.float32))
        parts["episode_ids"].append(np.full(steps, i, np.int32))
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    try:
        atomic_write_bytes(cache, lambda f: np.savez(f, stamp=stamp, **arrays))
    except OSError:  # a read-only dataset folder: no cache, no harm
        pass
    return arrays, metadata


def generate_on_first_use(name: str) -> tuple[str, str]:
    """Build a missing dataset with the project's generator (benchmarks/make_datasets.py, from
    the committed behaviour policies). Raises DatasetError where that is impossible."""
    env, split = parse_name(name)
    try:
        from benchmarks import make_datasets
    except ImportError as err:
        raise DatasetError(
            f"dataset {name!r} is missing and the generator is not importable ({err}); run "
            f"{GENERATE_COMMAND.format(env=env)} from an o2o-jax checkout"
        ) from None
    if split != "random":  # the random split needs no behaviour policy
        make_datasets.read_manifest(env)  # raises a clear error if the policies are missing
    print(
        f"[datasets] {name} is not on disk and not downloadable: generating it now with the D4RL "
        f"recipe into {minari_root()} (a few minutes; --no-generate forbids this)"
    )
    make_datasets.generate(env, split, AUTO_GENERATE_STEPS, 20, 0, None, overwrite=False)
    return resolve(name, allow_download=False)


def check_arrays(arrays: dict, metadata: dict, dataset_id: str, name: str) -> None:
    """The cheap part of `verify_dataset`, on every load: finite values and the spaces' shapes,
    so a damaged dataset stops the run with one line instead of training on NaN."""
    fix = f"check it with `python -m common.datasets verify {name}` and re-create it"
    obs_shape = tuple(metadata["observation_space"].shape)
    action_shape = tuple(metadata["action_space"].shape)
    n = len(arrays["rewards"])
    if n == 0:
        raise DatasetError(f"{dataset_id} is damaged: it holds no transitions; {fix}")
    for key, shape in (
        ("observations", obs_shape), ("next_observations", obs_shape), ("actions", action_shape),
        ("rewards", ()), ("terminals", ()), ("timeouts", ()),
    ):  # fmt: skip
        if arrays[key].shape != (n, *shape):
            raise DatasetError(
                f"{dataset_id} is damaged: {key} have shape {arrays[key].shape}, expected "
                f"{(n, *shape)}; {fix}"
            )
        bad = int(np.sum(~np.isfinite(arrays[key]).reshape(n, -1).all(-1)))
        if bad:
            raise DatasetError(
                f"{dataset_id} is damaged: {bad} transitions with non-finite {key}; {fix}"
            )


def load_d4rl(
    name: str, allow_download: bool = True, allow_generate: bool = True, verbose: bool = True
) -> OfflineData:
    """Load a dataset by D4RL name onto the default device. Prints which dataset was used.
    A dataset that is neither on disk nor downloadable is generated on first use unless
    `allow_generate` is False."""
    env, _ = parse_name(name)
    try:
        dataset_id, source = resolve(name, allow_download)
    except DatasetError:
        if not allow_generate:
            raise
        dataset_id, source = generate_on_first_use(name)
    try:
        arrays, metadata = read_episodes(minari_root() / dataset_id)
    except DatasetError:
        raise
    except Exception as err:  # noqa: BLE001 - any read failure means a damaged dataset
        raise DatasetError(
            f"{dataset_id} cannot be read ({type(err).__name__}: {str(err).splitlines()[0]}); "
            f"check it with `python -m common.datasets verify {name}` and re-create it"
        ) from None
    check_arrays(arrays, metadata, dataset_id, name)
    action_high = np.asarray(metadata["action_space"].high)
    if not np.allclose(np.abs(action_high), 1.0):
        raise DatasetError(f"{dataset_id}: actions must lie in [-1, 1], got bounds {action_high}")
    episode_ids = arrays.pop("episode_ids")
    returns = np.bincount(episode_ids, weights=arrays["rewards"].astype(np.float64))
    ref_min, ref_max = D4RL_REF_SCORES[env]
    info = DatasetInfo(
        name=name,
        env=env,
        gym_id=GYM_ENV_IDS[env],
        minari_id=dataset_id,
        source=source,
        num_transitions=len(episode_ids),
        num_episodes=len(returns),
        behaviour_return=float(metadata.get("behaviour_return", returns.mean())),
        ref_min_score=ref_min,
        ref_max_score=ref_max,
    )
    if verbose:
        print(info.describe())
    transitions = {k: jnp.asarray(arrays[k]) for k in TRANSITION_KEYS}
    return OfflineData(transitions, episode_ids, returns, info)


# --- Scores and normalisation -------------------------------------------------------------


def transitions_checksum(transitions: dict) -> str:
    """sha256 of a dataset's content: the transition arrays in TRANSITION_KEYS order, as float32
    bytes (independent of the files that hold them)."""
    digest = hashlib.sha256()
    for key in TRANSITION_KEYS:
        digest.update(np.ascontiguousarray(np.asarray(transitions[key], np.float32)).tobytes())
    return digest.hexdigest()


def normalized_score(env: str, returns):
    """D4RL normalized score: 100 * (return - random) / (expert - random). Equals 100 times
    `minari.get_normalized_score` on datasets that carry the same reference scores."""
    ref_min, ref_max = D4RL_REF_SCORES[env]
    return 100.0 * (np.asarray(returns, np.float64) - ref_min) / (ref_max - ref_min)


def observation_stats(observations, eps: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of the offline observations (std floored at `eps`), computed
    once and applied identically offline, online and at evaluation."""
    obs = np.asarray(observations, np.float64)
    return obs.mean(0).astype(np.float32), (obs.std(0) + eps).astype(np.float32)


def normalize_observations(observations, mean, std):
    return (observations - mean) / std


def return_range_reward_scale(data: OfflineData, target_range: float = 1000.0) -> float:
    """The IQL/CORL locomotion reward scale: target_range / (max - min episode return)."""
    spread = float(data.episode_returns.max() - data.episode_returns.min())
    return target_range / max(spread, 1e-6)


def scale_rewards(rewards, scale: float = 1.0, bias: float = 0.0):
    return rewards * scale + bias


# --- Writing Minari datasets (used by the generator and by the tiny test datasets) ---------


def write_minari_dataset(
    dataset_id: str,
    episodes: list[dict],
    gym_id: str,
    metadata: dict,
    root: pathlib.Path | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write `episodes` (dicts with observations [T+1, d], actions [T, a], rewards, terminations,
    truncations [T]) as a Minari hdf5 dataset. Written into a hidden temporary folder and renamed
    into place, so an interrupted write never leaves a half-written dataset behind."""
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer
    from minari.dataset.minari_storage import MinariStorage

    # absolute: Minari's hdf5 storage mis-joins relative paths
    root = (minari_root() if root is None else pathlib.Path(root)).resolve()
    final = root / dataset_id
    if final.exists() and not overwrite:
        raise DatasetError(f"{final} already exists; delete it or pass overwrite")
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        env = gym.make(gym_id)
        storage = MinariStorage.new(
            tmp / "data",
            observation_space=env.observation_space,
            action_space=env.action_space,
            env_spec=env.spec,
            data_format="hdf5",
        )
        env.close()
        env_name = dataset_id.split("/")[1]
        ref_min, ref_max = D4RL_REF_SCORES[env_name]
        storage.update_metadata(
            {
                "dataset_id": dataset_id,
                "minari_version": minari.__version__,
                "eval_env_spec": gym.spec(gym_id).to_json(),
                "ref_min_score": ref_min,
                "ref_max_score": ref_max,
                **metadata,
            }
        )
        buffers = [
            EpisodeBuffer(
                id=i,
                observations=np.asarray(ep["observations"], np.float64),
                actions=np.asarray(ep["actions"], np.float32),
                rewards=np.asarray(ep["rewards"], np.float64),
                terminations=np.asarray(ep["terminations"], bool),
                truncations=np.asarray(ep["truncations"], bool),
            )
            for i, ep in enumerate(episodes)
        ]
        storage.update_episodes(buffers)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


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


# --- Verification ----------------------------------------------------------------------


def verify_dataset(path: pathlib.Path, env: str) -> tuple[list[str], dict]:
    """Check a Minari dataset folder: readable, shapes, finite values, action bounds, episode
    boundaries, step counts and return statistics against its metadata.
    Returns (problems, statistics); no problems means it passed."""
    from minari import MinariDataset

    problems: list[str] = []
    try:
        dataset = MinariDataset(path / "data")
        metadata = dataset.storage.metadata
        episodes = list(dataset.iterate_episodes())
    except Exception as err:  # noqa: BLE001 - any read failure means a damaged dataset
        return [f"cannot read {path}: {type(err).__name__}: {err}"], {}
    obs_dim = dataset.observation_space.shape[0]
    action_space = dataset.action_space
    max_steps = gym.spec(GYM_ENV_IDS[env]).max_episode_steps
    returns, complete = [], []
    for i, ep in enumerate(episodes):
        steps = len(ep.rewards)
        where = f"episode {i}"
        shapes = {
            "observations": (np.shape(ep.observations), (steps + 1, obs_dim)),
            "actions": (np.shape(ep.actions), (steps, *action_space.shape)),
            "terminations": (np.shape(ep.terminations), (steps,)),
            "truncations": (np.shape(ep.truncations), (steps,)),
        }
        bad = [f"{k} {got} != {want}" for k, (got, want) in shapes.items() if got != want]
        if bad or steps == 0:
            problems.append(f"{where}: bad shapes ({'; '.join(bad) or 'no steps'})")
            continue
        for key in ("observations", "actions", "rewards"):
            if not np.all(np.isfinite(getattr(ep, key))):
                problems.append(f"{where}: non-finite {key}")
        if np.any(np.abs(ep.actions) > action_space.high + 1e-6):
            problems.append(f"{where}: actions outside the action space")
        ends = np.asarray(ep.terminations, bool) | np.asarray(ep.truncations, bool)
        if ends[:-1].any():
            problems.append(f"{where}: termination/truncation before the last step")
        if not ends[-1]:
            problems.append(f"{where}: last step is neither terminated nor truncated")
        if steps > max_steps:
            problems.append(f"{where}: {steps} steps exceed the time limit {max_steps}")
        returns.append(float(np.sum(ep.rewards)))
        complete.append(bool(ep.terminations[-1]) or steps == max_steps)
    total_steps = sum(len(ep.rewards) for ep in episodes)
    if metadata.get("total_steps") != total_steps:
        problems.append(f"metadata total_steps {metadata.get('total_steps')} != {total_steps}")
    if metadata.get("total_episodes") != len(episodes):
        problems.append(
            f"metadata total_episodes {metadata.get('total_episodes')} != {len(episodes)}"
        )
    returns_arr = np.asarray(returns)
    ref = returns_arr[np.asarray(complete)] if any(complete) else returns_arr
    stats = {
        "episodes": len(episodes),
        "steps": total_steps,
        "return_mean": float(ref.mean()) if len(ref) else float("nan"),
        "return_std": float(ref.std()) if len(ref) else float("nan"),
        "return_min": float(returns_arr.min()) if len(returns_arr) else float("nan"),
        "return_max": float(returns_arr.max()) if len(returns_arr) else float("nan"),
    }
    stats["normalized_mean"] = float(normalized_score(env, stats["return_mean"]))
    recorded = metadata.get("behaviour_return")
    if recorded is not None and not np.isclose(
        recorded, stats["return_mean"], rtol=1e-3, atol=1e-3
    ):
        problems.append(
            f"return mean {stats['return_mean']:.2f} != recorded behaviour_return {recorded:.2f}"
        )
    for key in ("ref_min_score", "ref_max_score"):
        expected = D4RL_REF_SCORES[env][key == "ref_max_score"]
        if key in metadata and not np.isclose(metadata[key], expected):
            problems.append(f"metadata {key} {metadata[key]} != D4RL's {expected}")
    return problems, stats


# --- CLI ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m common.datasets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the known D4RL names and where each resolves")
    info = sub.add_parser("info", help="load a dataset by name and describe it")
    info.add_argument("name")
    info.add_argument("--no-download", action="store_true", help="never contact the Minari hub")
    info.add_argument("--no-generate", action="store_true", help="never generate a missing one")
    check = sub.add_parser("verify", help="check a dataset's integrity; exit 1 if damaged")
    check.add_argument(
        "name", help="D4RL name (hopper-medium-v2) or Minari id (o2o/hopper/medium-v0)"
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            for name in known_names():
                try:
                    dataset_id, source = resolve(name, allow_download=False)
                    print(f"{name:32s} {dataset_id} [{source}]")
                except DatasetError:
                    print(f"{name:32s} (missing)")
        elif args.command == "info":
            load_d4rl(
                args.name,
                allow_download=not args.no_download,
                allow_generate=not args.no_generate,
            )
        elif args.command == "verify":
            if "/" in args.name:
                dataset_id, env = args.name, args.name.split("/")[1]
            else:
                env = parse_name(args.name)[0]
                dataset_id = resolve(args.name, allow_download=False)[0]
            problems, stats = verify_dataset(minari_root() / dataset_id, env)
            print(f"{dataset_id}: " + ", ".join(f"{k}={v:.6g}" for k, v in stats.items()))
            for problem in problems[:20]:
                print(f"FAIL {problem}", file=sys.stderr)
            if problems:
                print(f"error: {dataset_id} is damaged ({len(problems)} problems)", file=sys.stderr)
                return 1
            print(f"OK {dataset_id}")
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
