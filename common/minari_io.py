"""Reading and writing Minari datasets: the local root, the flat-array read of every episode
(cached beside the data), and the atomic write of episodes as a Minari hdf5 dataset."""

import os
import pathlib
import shutil
import uuid

import gymnasium as gym
import numpy as np

from common.checkpoints import atomic_write_bytes
from common.d4rl import D4RL_REF_SCORES, DatasetError

GENERATED_NAMESPACE = "o2o"  # the project's generated datasets: o2o/<env>/<split>-v<k>
TRANSITION_KEYS = (
    "observations",
    "actions",
    "rewards",
    "next_observations",
    "terminals",
    "timeouts",
)


def minari_root() -> pathlib.Path:
    """Minari's local dataset root (honours $MINARI_DATASETS_PATH at call time)."""
    root = os.environ.get("MINARI_DATASETS_PATH")
    return pathlib.Path(root) if root else pathlib.Path.home() / ".minari" / "datasets"


def minari_id(namespace: str, env: str, split: str, version: int = 0) -> str:
    return f"{namespace}/{env}/{split}-v{version}"


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
