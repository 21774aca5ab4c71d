"""The online environment of a run: one gymnasium MuJoCo v5 env whose time limit is handled here
(so a time-limit cut is reported as a truncation, never a termination) and whose full simulator
state can be saved in a checkpoint and restored, so a resumed run continues the exact trajectory
it was on."""

import gymnasium as gym
import mujoco
import numpy as np

from common.d4rl import GYM_ENV_IDS


class OnlineEnv:
    def __init__(self, env: str, seed: int):
        gym_id = GYM_ENV_IDS[env]
        self.env = gym.make(gym_id).unwrapped  # no TimeLimit wrapper: the limit is counted here
        self.max_episode_steps = gym.spec(gym_id).max_episode_steps
        self.observation_dim = self.env.observation_space.shape[0]
        self.action_dim = self.env.action_space.shape[0]
        self.seed = seed
        self.episodes = 0  # finished episodes; episode k is reset with seed + 7919 k
        self._reset()

    def _reset(self):
        obs, _ = self.env.reset(seed=self.seed + 7919 * self.episodes)
        self.obs = np.asarray(obs, np.float32)
        self.episode_return, self.episode_length = 0.0, 0

    def step(self, action) -> tuple[dict, dict | None]:
        """Take `action` from the current observation. Returns the transition and, when the
        episode ended (and the env was reset), its {"return", "length"}."""
        action = np.asarray(action, np.float32)
        next_obs, reward, terminated, _, _ = self.env.step(action)
        self.episode_return += float(reward)
        self.episode_length += 1
        truncated = not terminated and self.episode_length >= self.max_episode_steps
        transition = {
            "observations": self.obs,
            "actions": action,
            "rewards": np.float32(reward),
            "next_observations": np.asarray(next_obs, np.float32),
            "terminals": np.float32(terminated),
            "timeouts": np.float32(truncated),
        }
        finished = None
        if terminated or truncated:
            finished = {"return": self.episode_return, "length": self.episode_length}
            self.episodes += 1
            self._reset()
        else:
            self.obs = transition["next_observations"]
        return transition, finished

    def state_dict(self) -> dict:
        """JSON-serialisable snapshot: MuJoCo's full integration state and the episode counters."""
        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        sim = np.empty(mujoco.mj_stateSize(self.env.model, spec))
        mujoco.mj_getState(self.env.model, self.env.data, sim, spec)
        return {
            "sim": sim.tolist(),
            "obs": self.obs.tolist(),
            "episodes": self.episodes,
            "episode_return": self.episode_return,
            "episode_length": self.episode_length,
        }

    def load_state_dict(self, state: dict) -> None:
        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        mujoco.mj_setState(self.env.model, self.env.data, np.asarray(state["sim"]), spec)
        mujoco.mj_forward(self.env.model, self.env.data)
        self.obs = np.asarray(state["obs"], np.float32)
        self.episodes = state["episodes"]
        self.episode_return = state["episode_return"]
        self.episode_length = state["episode_length"]
