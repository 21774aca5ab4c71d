"""Evaluation: K deterministic episodes of a gymnasium MuJoCo v5 env, run in lockstep so the
policy is called once per step on a [K, obs_dim] batch (one jit compilation, K x fewer calls)."""

import dataclasses

import gymnasium as gym
import numpy as np

from common.d4rl import GYM_ENV_IDS, normalized_score


@dataclasses.dataclass(frozen=True)
class EvalResult:
    returns: np.ndarray  # [K] undiscounted episode returns
    lengths: np.ndarray  # [K] episode lengths
    normalized: np.ndarray  # [K] D4RL normalized scores (0 = random, 100 = expert)

    @property
    def mean_return(self) -> float:
        return float(self.returns.mean())

    @property
    def mean_normalized(self) -> float:
        return float(self.normalized.mean())

    def metrics(self) -> dict[str, float]:
        return {
            "return": self.mean_return,
            "return_std": float(self.returns.std()),
            "normalized_score": self.mean_normalized,
            "episode_length": float(self.lengths.mean()),
        }


def evaluate(env: str, act, num_episodes: int, seed: int) -> EvalResult:
    """Run `num_episodes` episodes of `env` ("hopper", ...) with `act(obs[K, d]) -> actions[K, a]`
    (a jitted deterministic policy, including any observation normalisation). Episode i is
    reset with seed `seed + i`, so results are reproducible."""
    envs = [gym.make(GYM_ENV_IDS[env]) for _ in range(num_episodes)]
    obs = np.stack([e.reset(seed=seed + i)[0] for i, e in enumerate(envs)]).astype(np.float32)
    returns = np.zeros(num_episodes)
    lengths = np.zeros(num_episodes, np.int64)
    running = np.ones(num_episodes, bool)
    while running.any():
        actions = np.asarray(act(obs))  # the whole batch every step keeps the shape static
        for i in np.flatnonzero(running):
            next_obs, reward, terminated, truncated, _ = envs[i].step(actions[i])
            obs[i] = next_obs
            returns[i] += reward
            lengths[i] += 1
            running[i] = not (terminated or truncated)
    for e in envs:
        e.close()
    return EvalResult(returns, lengths, normalized_score(env, returns))
