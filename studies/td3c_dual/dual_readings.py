"""Study: which reading of TD3-C's dual update (Eq. 5) makes lambda a Lagrange multiplier?

`algorithms/td3_c.py` with its dual and constraint replaced by one of the readings the paper's
"jointly optimized by stochastic gradient descent ... MPO-like" (Sec. 3.4) allows (defaults: the
method's own, `--dual-update sgd --constraint-reduce mean`):
- `--dual-update sgd`: projected plain SGD on lambda >= 0 (the method); `adam`: projected Adam on
  lambda; `mpo`: lambda = softplus(eta) + 1e-8 with Adam on eta (Acme's MPO duals).
- `--constraint-reduce mean`: Eq. (4)'s (pi - pi_targ)^2 averaged over the action dimensions
  (the method); `sum`: summed (|A| times larger).
Every other flag is the algorithm file's (`--help`). The question, commands and findings:
README.md beside this file; the suite `td3c_dual` runs it.

    python studies/td3c_dual/dual_readings.py --env hopper-medium-expert-v2 --dual-update adam \
        --constraint-reduce sum --offline-checkpoint runs/td3bc/offline.npz
"""

import contextlib
import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

from algorithms import td3_c
from common import flags, lifecycle

MPO_DUAL_FLOOR = 1e-8  # Acme's MPO keeps each dual at softplus(param) + this constant

# `--dual-lr`'s default per reading: SGD's as the method's (1e3, see td3_c.make_dual); Adam's
# steps are ~lr whatever the violation, so 1e-2 (Acme's MPO dual learning rate).
DEFAULT_DUAL_LR = {"sgd": 1e3, "adam": 1e-2, "mpo": 1e-2}


@dataclasses.dataclass
class Args(td3_c.Args):
    dual_update: Literal["sgd", "adam", "mpo"] = "sgd"
    """how lambda_c learns: sgd (the method) / adam: projected steps on lambda >= 0; mpo: lambda =
    softplus(eta) + 1e-8 with Adam on eta (Acme's MPO duals)"""
    dual_lr: flags.LearningRate | None = None
    """step size of the dual update; default 1e3 for sgd (the method's), 1e-2 for adam and mpo"""
    constraint_reduce: Literal["sum", "mean"] = "mean"
    """Eq. (4)'s (pi(s) - pi_targ(s))^2: averaged (the method) or summed over action dimensions"""


def dual_optimizer(dual_update: str, dual_lr: float | None):
    """The dual's optimizer: plain SGD for `sgd`, Adam on lambda (adam) or on eta (mpo)."""
    lr = DEFAULT_DUAL_LR[dual_update] if dual_lr is None else dual_lr
    return optax.sgd(lr) if dual_update == "sgd" else optax.adam(lr)


def dual_value(dual_params, dual_update: str):
    """lambda_c from the dual's parameter: itself (adam, sgd) or softplus(eta) + 1e-8 (mpo)."""
    if dual_update == "mpo":
        return jax.nn.softplus(dual_params["v"]) + MPO_DUAL_FLOOR
    return dual_params["v"]


def initial_dual_param(init_dual: float, dual_update: str) -> float:
    """The parameter whose `dual_value` is `init_dual` (mpo: the inverse softplus, floored)."""
    if dual_update == "mpo":
        return float(np.log(np.expm1(max(init_dual - MPO_DUAL_FLOOR, MPO_DUAL_FLOOR))))
    return init_dual


def make_dual(args: Args) -> TrainState:
    """The dual's state for `args.dual_update`, starting at lambda_c = `args.init_dual`."""
    params = {"v": jnp.float32(initial_dual_param(args.init_dual, args.dual_update))}
    tx = dual_optimizer(args.dual_update, args.dual_lr)
    return TrainState.create(apply_fn=None, params=params, tx=tx)


def dual_step(dual: TrainState, constraint, epsilon, dual_update: str):
    """One gradient step on the dual's parameter for L = lambda_c (epsilon - c). adam / sgd step
    on lambda_c itself and project onto lambda_c >= 0; mpo steps on eta with lambda_c =
    softplus(eta) + 1e-8 (always > 0)."""
    slack = epsilon - jax.lax.stop_gradient(constraint)
    grads = jax.grad(lambda p: dual_value(p, dual_update) * slack)(dual.params)
    dual = dual.apply_gradients(grads=grads)
    if dual_update == "mpo":
        return dual
    return dual.replace(params={"v": jnp.maximum(dual.params["v"], 0.0)})


def summed_constraint(pi_actions, target_actions):
    """Eq. (4)'s E_s[(pi(s) - pi_targ(s))^2] with the squared distance summed over the action
    dimensions (`--constraint-reduce sum`; the method averages)."""
    sq = (pi_actions - jax.lax.stop_gradient(target_actions)) ** 2
    return sq.sum(-1).mean()


@contextlib.contextmanager
def reading(args: Args):
    """Within it, td3_c's dual and constraint are `args`'s reading (its updates trace them)."""
    method = td3_c.make_dual, td3_c.dual_value, td3_c.dual_step, td3_c.trust_region_constraint
    td3_c.make_dual = lambda _: make_dual(args)
    td3_c.dual_value = lambda params: dual_value(params, args.dual_update)
    td3_c.dual_step = lambda dual, c, eps: dual_step(dual, c, eps, args.dual_update)
    if args.constraint_reduce == "sum":
        td3_c.trust_region_constraint = summed_constraint
    try:
        yield
    finally:
        (td3_c.make_dual, td3_c.dual_value, td3_c.dual_step,
         td3_c.trust_region_constraint) = method  # fmt: skip


def main(args: Args) -> dict:
    """`td3_c.main` with this study's dual update and constraint."""
    with reading(args):
        return td3_c.main(args)


if __name__ == "__main__":
    lifecycle.cli(main, Args)
