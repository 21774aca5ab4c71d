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

This module resolves names and loads; the rest of the dataset code has one module per concern:
`d4rl` (names, constants, scores), `minari_io` (reading and writing Minari files),
`dataset_checks` (integrity), `d4rl_recipe` (the generator) and `dataset_cli` (the command line,
which imports this module and is not imported by it: `python -m common.dataset_cli list | info
NAME | verify NAME`). The names other code imports from here are re-exported below.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import socket

import jax.numpy as jnp
import numpy as np

from common.d4rl import (  # noqa: F401 - re-exported
    D4RL_REF_SCORES,
    GYM_ENV_IDS,
    SPLITS,
    DatasetError,
    known_names,
    normalized_score,
    parse_name,
)
from common.dataset_checks import check_arrays, verify_dataset  # noqa: F401 - re-exported
from common.minari_io import (  # noqa: F401 - re-exported
    GENERATED_NAMESPACE,
    TRANSITION_KEYS,
    minari_id,
    minari_root,
    read_episodes,
    write_minari_dataset,
)

# Splits that Minari's hub holds as `mujoco/<env>/<split>-v0` (random/medium-replay/medium-expert
# do not exist there).
OFFICIAL_SPLITS = ("medium", "expert")
OFFICIAL_NAMESPACE = "mujoco"
AUTO_GENERATE_STEPS = 1_000_000  # steps per rollout split when a dataset is generated on first use
GENERATE_COMMAND = "make datasets ENV={env}  (or: python benchmarks/make_datasets.py --env {env})"


def __getattr__(name: str):
    """The generator's helpers, imported on first use (they load flax): `make_tiny_dataset`,
    `rollout_episodes`."""
    if name in ("make_tiny_dataset", "rollout_episodes"):
        from common import d4rl_recipe

        return getattr(d4rl_recipe, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    # sha256 of the transitions' float32 bytes (`transitions_checksum`): a dataset generated on
    # another machine follows the same recipe but need not be the same bytes; runs record it
    transitions_sha256: str

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


def generate_on_first_use(name: str) -> tuple[str, str]:
    """Build a missing dataset with the project's generator (common/d4rl_recipe.py, from the
    committed behaviour policies). Raises DatasetError where that is impossible."""
    env, split = parse_name(name)
    from common import d4rl_recipe  # lazy: it loads flax

    if split != "random":  # the random split needs no behaviour policy
        d4rl_recipe.read_manifest(env)  # raises a clear error if the policies are missing
    print(
        f"[datasets] {name} is not on disk and not downloadable: generating it now with the D4RL "
        f"recipe into {minari_root()} (a few minutes; --no-generate forbids this)"
    )
    d4rl_recipe.generate(env, split, AUTO_GENERATE_STEPS, 20, 0, None, overwrite=False)
    return resolve(name, allow_download=False)


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
            f"check it with `python -m common.dataset_cli verify {name}` and re-create it"
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
        transitions_sha256=transitions_checksum({k: arrays[k] for k in TRANSITION_KEYS}),
    )
    if verbose:
        print(info.describe())
    transitions = {k: jnp.asarray(arrays[k]) for k in TRANSITION_KEYS}
    return OfflineData(transitions, episode_ids, returns, info)


# --- Content checksum and normalisation ---------------------------------------------------


def transitions_checksum(transitions: dict) -> str:
    """sha256 of a dataset's content: the transition arrays in TRANSITION_KEYS order, as float32
    bytes (independent of the files that hold them)."""
    digest = hashlib.sha256()
    for key in TRANSITION_KEYS:
        digest.update(np.ascontiguousarray(np.asarray(transitions[key], np.float32)).tobytes())
    return digest.hexdigest()


def pretrained_data_note(checkpoint, transitions: dict) -> str | None:
    """A one-line note when `checkpoint` has a manifest beside it (`benchmarks/export_pretrained`)
    whose dataset checksum differs from the data loaded here (a dataset generated on another
    machine or by another version of the recipe: the same recipe, not the same bytes), else
    None. Fine-tuning still runs; the note says that its offline data are not the ones the
    ensemble was pretrained on."""
    manifest = pathlib.Path(checkpoint).parent / "manifest.json"
    if not manifest.is_file():
        return None
    expected = json.loads(manifest.read_text()).get("dataset_transitions_sha256")
    found = transitions_checksum(transitions)
    if expected is None or expected == found:
        return None
    return (
        f"note: the loaded dataset (sha256 {found[:12]}) is not the one {checkpoint} was "
        f"pretrained on ({expected[:12]}, its manifest): regenerated elsewhere or by another "
        "recipe version; fine-tuning goes on with the data loaded here"
    )


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
