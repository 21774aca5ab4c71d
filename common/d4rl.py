"""The D4RL names and constants every other dataset module shares: the environments and their
gymnasium v5 ids, the five splits, the reference returns of the normalized score, and the name
parser. No I/O: importing it is cheap."""

import re

import numpy as np

from common.flags import UsageError

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


def normalized_score(env: str, returns):
    """D4RL normalized score: 100 * (return - random) / (expert - random). Equals 100 times
    `minari.get_normalized_score` on datasets that carry the same reference scores."""
    ref_min, ref_max = D4RL_REF_SCORES[env]
    return 100.0 * (np.asarray(returns, np.float64) - ref_min) / (ref_max - ref_min)
