"""Checking a dataset: `check_arrays` (cheap, on every load: finite values and the spaces'
shapes) and `verify_dataset` (the whole file, for `python -m common.dataset_cli verify`)."""

import pathlib

import gymnasium as gym
import numpy as np

from common.d4rl import D4RL_REF_SCORES, GYM_ENV_IDS, DatasetError, normalized_score


def check_arrays(arrays: dict, metadata: dict, dataset_id: str, name: str) -> None:
    """The cheap part of `verify_dataset`, on every load: finite values and the spaces' shapes,
    so a damaged dataset stops the run with one line instead of training on NaN."""
    fix = f"check it with `python -m common.dataset_cli verify {name}` and re-create it"
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
