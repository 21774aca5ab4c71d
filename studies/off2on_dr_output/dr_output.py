"""Study: what makes balanced replay trail uniform replay on hopper-medium?

`algorithms/off2on_balanced.py` with one of two pieces replaced (defaults: the method's own):
- `--dr-output`: `relu` is the method (the authors' w(s, a) = ReLU(z), whose w = 0 region has
  zero gradient, so a transition that reaches it stays there and out of the RL batches);
  `softplus` gives w = log(1 + e^z) > 0 everywhere, its last bias at log(e - 1) so that w ~ 1 at
  the start as with the ReLU.
- `--new-online-priority`: `max` is the method (each epoch's new online samples enter at the
  running maximum priority, the initial-fraction one); `one` enters them at 1, the offline mean,
  after the first epoch.
Every other flag is the algorithm file's (`--help`). The question, commands and findings:
README.md beside this file; the suite `off2on_dr_output` runs it.

    python studies/off2on_dr_output/dr_output.py --env hopper-medium-v2 --dr-output softplus \
        --offline-checkpoint hopper-medium-v2/cql_n5_200k --online-steps 30000
"""

import dataclasses
from typing import Literal

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from algorithms import off2on_balanced as o2o
from common import lifecycle


class SoftplusDensityRatio(nn.Module):
    """w(s, a) = softplus(z): the algorithm's density-ratio net (`o2o.DensityRatio`: same layers,
    names and initialisation, so the replay probe reads either) with a softplus for its output
    ReLU, the last bias at log(e - 1) so that w ~ 1 at the start."""

    hidden_dims: tuple[int, ...] = (256, 256)

    @nn.compact
    def __call__(self, obs, action):
        x = jnp.concatenate([obs, action], -1)
        for width in self.hidden_dims:
            x = nn.relu(nn.Dense(width)(x))
        bias = nn.initializers.constant(np.log(np.e - 1.0))  # softplus(bias) = 1
        last = nn.Dense(1, kernel_init=o2o.uniform_init(3e-3), bias_init=bias)
        return nn.softplus(last(x)).squeeze(-1)


def density_ratio_class(output: str):
    """`--dr-output`'s net: the method's own for relu, the softplus one otherwise."""
    return o2o.DensityRatio if output == "relu" else SoftplusDensityRatio


def priorities_at_one(state: o2o.OnlineState, num_new: int):
    """New online samples at priority 1 after the first epoch (whose samples keep the
    initial-fraction priority, the buffer's maximum then)."""
    first_epoch = state.env_steps == 0
    return jnp.full(num_new, jnp.where(first_epoch, state.buffer.max_priority, 1.0))


@dataclasses.dataclass
class Args(o2o.Args):
    dr_output: Literal["relu", "softplus"] = "relu"
    """w's output layer: relu (the authors', the method) or softplus (w > 0 everywhere)"""
    new_online_priority: Literal["max", "one"] = "max"
    """priority of each epoch's new online samples after the first: max (the authors', the
    method) or one (the offline mean)"""


def main(args: Args) -> dict:
    """`off2on_balanced.main` with this study's density-ratio net and new-sample priority."""
    method = o2o.DensityRatio, o2o.new_online_priorities
    o2o.DensityRatio = density_ratio_class(args.dr_output)
    if args.new_online_priority == "one":
        o2o.new_online_priorities = priorities_at_one
    try:
        return o2o.main(args)
    finally:
        o2o.DensityRatio, o2o.new_online_priorities = method


if __name__ == "__main__":
    lifecycle.cli(main, Args)
