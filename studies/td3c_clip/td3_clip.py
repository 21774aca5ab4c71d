"""Study: which of TD3-C's two changes to TD3 prevents the early collapse, the trust region or the
dQ/da clipping?

`algorithms/td3_c.py` with one more fine-tuning mode, `--finetune td3_clip`: TD3 whose actor
follows TD3-C's clipped dQ/da (Table B2's "clipping", `td3_c.clipped_dpg_loss`) without the trust
region of Eq. (4)-(5). Every other flag and mode is the algorithm file's (`--help`). The question,
commands and findings: README.md beside this file; the td3_clip variant of the suite
`td3c_table1` runs it.

    python studies/td3c_clip/td3_clip.py --env hopper-medium-v2 --finetune td3_clip \
        --offline-checkpoint runs/td3bc/offline.npz
"""

import contextlib
import dataclasses
from typing import Literal

from algorithms import td3_c
from common import lifecycle


@dataclasses.dataclass
class Args(td3_c.Args):
    finetune: Literal["td3c", "td3", "td3_clip", "td3bc"] = "td3c"
    """the online policy update: the method's modes, or td3_clip (TD3 with TD3-C's dQ/da clipping
    and no constraint)"""


def clips_dqda(mode: str) -> bool:
    """TD3-C's clipping for td3c (the method) and td3_clip."""
    return mode in ("td3c", "td3_clip")


@contextlib.contextmanager
def clipping_td3():
    """Within it, td3_c's updates clip dQ/da for td3_clip too (and, as for td3, add no
    constraint: only td3c does)."""
    method = td3_c.clips_dqda
    td3_c.clips_dqda = clips_dqda
    try:
        yield
    finally:
        td3_c.clips_dqda = method


def main(args: Args) -> dict:
    """`td3_c.main` with the td3_clip mode."""
    with clipping_td3():
        return td3_c.main(args)


if __name__ == "__main__":
    lifecycle.cli(main, Args)
