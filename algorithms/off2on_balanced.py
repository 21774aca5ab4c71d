"""Offline-to-online RL via balanced replay and a pessimistic Q-ensemble.

Lee, Seo, Lee, Abbeel, Shin. "Offline-to-Online Reinforcement Learning via Balanced Replay and
Pessimistic Q-Ensemble", CoRL 2021. Documentation: docs/off2on_balanced.md.

Offline: N CQL agents trained as one `vmap`ped program, CQL(H) regulariser of Eq. (3), a BC warm
start and a deterministic backup. Online: the ensemble policy of Eq. (5) (mixture moments in
pre-tanh space) and the mean-of-members critic, SAC updates (Eq. 1-2) without the CQL term.
The paper's contribution, balanced replay (Sec. 4.1): a density-ratio network w(s, a) trained
with the JS bound of Eq. (4) (`js_density_ratio_loss`), whose w^(1/T) become the sampled
transitions' priorities, self-normalised over the offline batch (Eq. 6, `balanced_priorities`),
both in `make_online_update`. `--replay uniform | online-only` are the paper's Fig. 4c
ablations; `--online-cql` its Appendix E one.
Schedule (authors' code): each epoch collects 1000 env steps, then runs 1000 updates.

Deviations and choices (details: docs/off2on_balanced.md):
- The first epoch runs 10x the updates (the authors' code; the appendix says 5x).
- Minari stores exact next observations, so time-out transitions are kept (the authors' code
  drops D4RL's, whose next observations are wrong).
- New online samples enter at the largest priority seen (authors' code); the initial one gives
  the first 1000 online samples about `--initial-online-fraction` of a batch.
- `--online-cql` uses the fixed weight --cql-weight online (no Lagrange tuning).
- The FQE initialisation of Sec. 3 is not implemented.
- Hidden layers use Flax's default initialisation (rlkit: fan-in uniform).
- Q AUROC (Fig. 4b) is logged every epoch on a uniform sample of 5000 online (s, a) pairs.
- One optimizer state over the stacked members (Adam is elementwise: one Adam per member).
- `--cql-lagrange` is not the paper's method (a diagnostic, see the documentation); the
  studies of the density ratio's output and of the new samples' priority: studies/off2on_dr_output/.

Usage:
    python algorithms/off2on_balanced.py --env hopper-medium-v2
    python algorithms/off2on_balanced.py --env hopper-medium-v2 \
        --offline-checkpoint hopper-medium-v2/cql_n5_200k                  # a committed ensemble
    python algorithms/off2on_balanced.py --env walker2d-random-v2 --replay online-only
"""

import dataclasses
import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training.train_state import TrainState

from common import flags, lifecycle
from common.buffers import PrioritizedBuffer
from common.checkpoints import (
    CheckpointError,
    load_checkpoint,
    load_offline_agent,
    read_checkpoint_metadata,
    save_checkpoint,
)
from common.datasets import TRANSITION_KEYS, load_d4rl, pretrained_data_note
from common.envs import OnlineEnv
from common.evaluation import evaluate
from common.networks import Critic, TanhGaussianPolicy, tanh_gaussian


@dataclasses.dataclass
class Args(lifecycle.RunFlags):
    env: str = "hopper-medium-v2"
    """D4RL dataset name; the online phase runs its gymnasium v5 environment"""
    seed: flags.Seed = 0
    """seed of everything (parameters, sampling, environments)"""
    ensemble_size: flags.Count = 5
    """N, the number of CQL agents (paper: 5; ablation 1, 2, 5)"""
    hidden_dims: flags.Widths | None = None
    """hidden layers of every network (default: the papers' 256-256; 256-256-256 on
    halfcheetah-medium-expert)"""
    batch_size: flags.Count = 256
    """minibatch size of every gradient step"""
    gamma: flags.Discount = 0.99
    """discount factor"""
    tau: flags.PolyakRate = 5e-3
    """Polyak rate of the target critics, every update"""

    # --- offline CQL (the CQL authors' defaults) ---
    offline_steps: flags.Steps = 1_000_000
    """offline gradient steps per member (CQL: 1000 epochs x 1000)"""
    offline_checkpoint: flags.CheckpointPath = None
    """a saved CQL ensemble (a run's `offline.npz` or an exported `ensemble.npz`) or a committed
    one by name, e.g. hopper-medium-v2/cql_n5_200k (pretrained/README.md)"""
    offline_policy_lr: flags.LearningRate = 1e-4
    """offline (CQL) policy and temperature learning rate"""
    offline_q_lr: flags.LearningRate = 3e-4
    """offline (CQL) critic and Lagrange-multiplier learning rate"""
    cql_weight: flags.NonNegative = 5.0
    """alpha' of Eq. (3) (CQL's min_q_weight; the CQL authors use 1.0 with --cql-lagrange)"""
    cql_lagrange: bool = False
    """scale the CQL term by a dual variable tuned to keep weight * gap at --cql-target-gap"""
    cql_target_gap: flags.NonNegative = 5.0
    """the Lagrange threshold (CQL's target_action_gap)"""
    cql_n_actions: flags.Count = 10
    """actions sampled per state for each of the uniform / pi(s) / pi(s') terms of Eq. (3)"""
    cql_temperature: flags.Positive = 1.0
    """temperature of CQL's log-sum-exp (1 = the CQL(H) objective)"""
    bc_steps: flags.Steps = 40_000
    """offline steps of behaviour cloning for the policy before the SAC policy loss"""
    deterministic_backup: bool = True
    """offline target without the entropy term (CQL's default for MuJoCo)"""
    offline_eval_every: flags.Count = 50_000
    """offline steps between evaluations"""
    log_every: flags.Count = 1_000
    """offline steps compiled into one call and logged together"""

    # --- online fine-tuning (the authors' code) ---
    online_steps: flags.Steps = 250_000
    """environment steps of fine-tuning"""
    steps_per_epoch: flags.Count = 1_000
    """env steps collected per epoch; the epoch then runs as many updates"""
    first_epoch_multiplier: flags.Count = 10
    """the first epoch runs this many times more updates (paper appendix: 5; code: 10)"""
    policy_lr: flags.LearningRate = 3e-4
    """online policy and temperature learning rate (the authors' temperature shares it)"""
    q_lr: flags.LearningRate = 3e-4
    """online critic learning rate"""
    online_buffer_size: flags.Count = 250_000
    """online slots of the replay buffer (the offline data are kept besides)"""
    replay: Literal["balanced", "uniform", "online-only"] = "balanced"
    """balanced: density-ratio priorities; uniform: one buffer, uniform; online-only: online data"""
    temperature: flags.Positive = 5.0
    """T of Eq. (6): priorities are w^(1/T)"""
    initial_online_fraction: flags.Fraction = 0.5
    """f: the online share of a batch right after the first epoch's samples enter"""
    dr_lr: flags.LearningRate = 3e-4
    """learning rate of the density-ratio network"""
    dr_batch_size: flags.Count = 256
    """offline and online batch size of each density-ratio step"""
    online_cql: bool = False
    """keep the CQL regulariser during fine-tuning (Appendix E ablation)"""
    eval_episodes: flags.Count = 5
    """deterministic evaluation episodes (authors: 5 per epoch)"""
    auroc_samples: flags.Count = 5_000
    """online (s, a) pairs drawn uniformly from all online data so far for the Q AUROC (Fig. 4b)"""
    auroc_random_actions: flags.Count = 10
    """uniformly random actions per sampled state: the unseen pairs of the Q AUROC (Fig. 4b)"""
    checkpoint_every: flags.Count = 10_000
    """steps (offline gradient steps, online env steps) between full checkpoints"""


# ================================================================================================
# Networks
# ================================================================================================


def uniform_init(scale: float):
    """U(-scale, scale), rlkit's `init_w` for last layers."""
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -scale, scale
    )


class DensityRatio(nn.Module):
    """w(s, a) >= 0: MLP with a ReLU output; the last layer's bias starts at 1 and its weights in
    U(-3e-3, 3e-3) (authors' code), so w(s, a) ~ 1 everywhere at the start (with Flax's default
    last-layer init, 1-23% of raw-observation inputs start at w = 0: zero gradient there; the
    study studies/off2on_dr_output/ replaces the ReLU by a softplus)."""

    hidden_dims: tuple[int, ...] = (256, 256)

    @nn.compact
    def __call__(self, obs, action):
        x = jnp.concatenate([obs, action], -1)
        for width in self.hidden_dims:
            x = nn.relu(nn.Dense(width)(x))
        last = nn.Dense(1, kernel_init=uniform_init(3e-3), bias_init=nn.initializers.ones)
        return nn.relu(last(x)).squeeze(-1)


# ==== BEGIN SHARED BLOCK: CQL ensemble pretraining ============================================
# Identical in algorithms/off2on_balanced.py and algorithms/bred.py (tests/test_shared_blocks.py
# checks it): an ensemble of N CQL agents, vmapped over the member axis, each member on its own
# minibatches. Equation numbers: [CoRL] = Lee et al. 2021 (CQL Eq. 3, SAC actor Eq. 2, mixture
# Eq. 5); [BRED] = Lee et al. 2020 (CQL Eq. 4, SAC actor Eq. 3, mixture Eq. 9).


def paper_hidden_dims(env: str) -> tuple[int, ...]:
    """The papers' networks: 2-layer MLPs of 256 units, 3 layers on halfcheetah-medium-expert
    ([BRED] Appendix A: "3-layer MLPs is more effective for training CQL agents" there)."""
    return (256, 256, 256) if env.startswith("halfcheetah-medium-expert") else (256, 256)


def twin_q(critic: Critic, params, obs, actions):
    """Both critics of one member: params [2, ...], inputs [..., d] -> [2, ...]."""
    return jax.vmap(critic.apply, in_axes=(0, None, None))(params, obs, actions)


def ensemble_moments(means, log_stds):
    """[CoRL] Eq. (5) / [BRED] Eq. (9): mean and std of the Gaussian matched to the mixture
    (1/N) sum_i N(mu_i, sigma_i^2) in pre-tanh space. means, log_stds [N, ..., A] -> mean,
    std [..., A]; std clamped to [e^-20, e^2] as in the CoRL authors' code. The variance is
    computed as mean(sigma_i^2) + mean((mu_i - mu)^2), which equals the papers'
    mean(sigma_i^2 + mu_i^2) - mu^2 but does not cancel in float32 (no sqrt(0), no NaN gradient)."""
    mean = means.mean(0)
    var = jnp.exp(2 * log_stds).mean(0) + ((means - mean) ** 2).mean(0)
    return mean, jnp.clip(jnp.sqrt(var), math.exp(-20), math.exp(2))


@struct.dataclass
class CQLMember:
    actor: TrainState
    critic: TrainState  # twin critics: leading axis 2
    critic_target: dict
    log_alpha: TrainState
    log_alpha_prime: TrainState


def cql_regularizer(q_data, q_rand, q_curr, q_next, logp_curr, logp_next, action_dim, temperature):
    """[CoRL] Eq. (3) / [BRED] Eq. (4): the CQL(H) gap E_s[log sum_a exp Q(s,a) - E_data Q(s,a)],
    with the log-sum-exp estimated
    by importance sampling as in the CQL authors' code (CQL(H)): uniform actions (density
    0.5^|A| on [-1,1]^|A|), actions of pi(.|s) and of pi(.|s') evaluated at s.
    q_data [2, B]; q_rand, q_curr, q_next [2, n, B]; logp_* [n, B]. Returns [2] (per critic)."""
    log_uniform_density = action_dim * math.log(0.5)
    stacked = jnp.concatenate(
        [q_rand - log_uniform_density, q_next - logp_next[None], q_curr - logp_curr[None]], axis=1
    )  # [2, 3n, B]
    logsumexp = temperature * jax.nn.logsumexp(stacked / temperature, axis=1)  # [2, B]
    return logsumexp.mean(-1) - q_data.mean(-1)


def online_cql_gap(args, actor, critic, actor_params, critic_params, obs, next_obs, q_data, key):
    """[CoRL] Appendix E / [BRED] Fig. 10: the CQL gap of one member's twin critics during
    fine-tuning (Eq. 3 / Eq. 4), its policy actions drawn from `actor_params` at s and s'.
    q_data [2, B] (the critics at the batch's actions) -> [2]."""
    n = args.cql_n_actions
    k_rand, k_curr, k_next = jax.random.split(key, 3)
    dist_s = tanh_gaussian(*actor.apply(actor_params, obs))
    dist_next = tanh_gaussian(*actor.apply(actor_params, next_obs))
    curr, logp_curr = dist_s.sample_and_log_prob(seed=k_curr, sample_shape=(n,))
    nxt, logp_next = dist_next.sample_and_log_prob(seed=k_next, sample_shape=(n,))
    action_dim = curr.shape[-1]
    rand = jax.random.uniform(k_rand, curr.shape, minval=-1, maxval=1)
    acts = jax.lax.stop_gradient(jnp.concatenate([rand, curr, nxt]))
    q = twin_q(critic, critic_params, jnp.broadcast_to(obs, (3 * n, *obs.shape)), acts)
    return cql_regularizer(
        q_data, q[:, :n], q[:, n : 2 * n], q[:, 2 * n :],
        jax.lax.stop_gradient(logp_curr), jax.lax.stop_gradient(logp_next),
        action_dim, args.cql_temperature,
    )  # fmt: skip


def make_cql_update(args: Args, actor: TanhGaussianPolicy, critic: Critic, action_dim: int):
    target_entropy = -float(action_dim)
    n = args.cql_n_actions

    def member_update(member: CQLMember, batch: dict, key, step):
        k_pi, k_next, k_rand, k_curr, k_cnext = jax.random.split(key, 5)
        obs, actions, next_obs = batch["observations"], batch["actions"], batch["next_observations"]
        alpha = jnp.exp(member.log_alpha.params["v"])

        # Policy: behaviour cloning for the first bc_steps, then the SAC loss ([CoRL] Eq. 2).
        def actor_loss_fn(params):
            dist = tanh_gaussian(*actor.apply(params, obs))
            new_actions, logp = dist.sample_and_log_prob(seed=k_pi)
            q_new = twin_q(critic, member.critic.params, obs, new_actions).min(0)
            bc_logp = dist.log_prob(jnp.clip(actions, -1 + 1e-6, 1 - 1e-6))
            loss = jnp.where(step < args.bc_steps, alpha * logp - bc_logp, alpha * logp - q_new)
            return loss.mean(), logp

        (actor_loss, logp), grads = jax.value_and_grad(actor_loss_fn, has_aux=True)(
            member.actor.params
        )
        new_actor = member.actor.apply_gradients(grads=grads)
        alpha_grads = jax.grad(
            lambda p: -(p["v"] * jax.lax.stop_gradient(logp + target_entropy)).mean()
        )(member.log_alpha.params)
        log_alpha = member.log_alpha.apply_gradients(grads=alpha_grads)

        # Critic: Bellman error with a (deterministic) backup, plus the CQL term ([CoRL] Eq. 3).
        dist_s = tanh_gaussian(*actor.apply(member.actor.params, obs))
        dist_next = tanh_gaussian(*actor.apply(member.actor.params, next_obs))
        next_actions, next_logp = dist_next.sample_and_log_prob(seed=k_next)
        next_q = twin_q(critic, member.critic_target, next_obs, next_actions).min(0)
        if not args.deterministic_backup:
            next_q = next_q - alpha * next_logp
        target = jax.lax.stop_gradient(
            batch["rewards"] + args.gamma * (1 - batch["terminals"]) * next_q
        )
        rand_actions = jax.random.uniform(k_rand, (n, *actions.shape), minval=-1, maxval=1)
        curr_actions, logp_curr = dist_s.sample_and_log_prob(seed=k_curr, sample_shape=(n,))
        cnext_actions, logp_next = dist_next.sample_and_log_prob(seed=k_cnext, sample_shape=(n,))
        # One critic call over all 3n+1 action sets: [3n+1, B, A] actions at the batch states.
        all_actions = jax.lax.stop_gradient(
            jnp.concatenate([actions[None], rand_actions, curr_actions, cnext_actions])
        )
        all_obs = jnp.broadcast_to(obs, (3 * n + 1, *obs.shape))
        alpha_prime = jnp.clip(jnp.exp(member.log_alpha_prime.params["v"]), 0.0, 1e6)

        def critic_loss_fn(params):
            q_all = twin_q(critic, params, all_obs, all_actions)  # [2, 3n+1, B]
            q_data = q_all[:, 0]
            bellman = ((q_data - target[None]) ** 2).mean(-1).sum()
            gap = cql_regularizer(
                q_data,
                q_all[:, 1 : n + 1],
                q_all[:, n + 1 : 2 * n + 1],
                q_all[:, 2 * n + 1 :],
                jax.lax.stop_gradient(logp_curr),
                jax.lax.stop_gradient(logp_next),
                action_dim,
                args.cql_temperature,
            )  # [2]
            cql = args.cql_weight * gap
            if args.cql_lagrange:  # CQL code: alpha' (weight * gap - threshold)
                cql = alpha_prime * (cql - args.cql_target_gap)
            return bellman + cql.sum(), (bellman, gap, q_all)

        (critic_loss, (bellman, gap, q_all)), grads = jax.value_and_grad(
            critic_loss_fn, has_aux=True
        )(member.critic.params)
        new_critic = member.critic.apply_gradients(grads=grads)
        critic_target = optax.incremental_update(new_critic.params, member.critic_target, args.tau)
        log_alpha_prime = member.log_alpha_prime
        if args.cql_lagrange:  # dual ascent: raise alpha' while the gap exceeds the threshold
            excess = jax.lax.stop_gradient(args.cql_weight * gap - args.cql_target_gap)
            prime_grads = jax.grad(lambda p: -(jnp.exp(p["v"]) * excess).sum() * 0.5)(
                member.log_alpha_prime.params
            )
            log_alpha_prime = member.log_alpha_prime.apply_gradients(grads=prime_grads)

        metrics = {
            "critic_loss": critic_loss,
            "bellman_loss": bellman,
            "cql_gap": gap.mean(),
            "actor_loss": actor_loss,
            "alpha": alpha,
            "alpha_prime": alpha_prime,
            "entropy": -logp.mean(),
            "q_data": q_all[:, 0].mean(),
            "q_random_actions": q_all[:, 1 : n + 1].mean(),
        }
        member = CQLMember(new_actor, new_critic, critic_target, log_alpha, log_alpha_prime)
        return member, metrics

    def ensemble_update(members: CQLMember, data: dict, key, step):
        """One CQL step for every member, each on its own minibatch. -> members, metrics [N]"""
        num = jax.tree_util.tree_leaves(data)[0].shape[0]

        def one(member, member_key):
            batch_key, update_key = jax.random.split(member_key)
            idx = jax.random.randint(batch_key, (args.batch_size,), 0, num)
            batch = jax.tree_util.tree_map(lambda x: x[idx], data)
            return member_update(member, batch, update_key, step)

        return jax.vmap(one)(members, jax.random.split(key, args.ensemble_size))

    return ensemble_update


def make_offline_chunk(args: Args, cql_update, length: int | None = None):
    """`length` (default `log_every`) CQL steps as one compiled scan: (members, data, key,
    first_step) -> (members, key, metrics averaged over steps and members)."""

    def offline_chunk(members, data, key, start_step):
        def body(carry, step):
            members, key = carry
            key, step_key = jax.random.split(key)
            members, metrics = cql_update(members, data, step_key, step)
            return (members, key), metrics

        steps = start_step + jnp.arange(args.log_every if length is None else length)
        (members, key), metrics = jax.lax.scan(body, (members, key), steps)
        return members, key, jax.tree_util.tree_map(jnp.mean, metrics)

    return jax.jit(offline_chunk, donate_argnums=(0, 2))


def create_cql_members(args, actor, critic, obs_dim, action_dim, key) -> CQLMember:
    obs, act = jnp.zeros((1, obs_dim)), jnp.zeros((1, action_dim))

    def create(member_key):
        actor_key, critic_key = jax.random.split(member_key)
        critic_params = jax.vmap(lambda k: critic.init(k, obs, act))(jax.random.split(critic_key))
        scalar = lambda v: {"v": jnp.float32(v)}  # noqa: E731
        return CQLMember(
            actor=TrainState.create(
                apply_fn=None,
                params=actor.init(actor_key, obs),
                tx=optax.adam(args.offline_policy_lr),
            ),
            critic=TrainState.create(
                apply_fn=None, params=critic_params, tx=optax.adam(args.offline_q_lr)
            ),
            critic_target=jax.tree_util.tree_map(jnp.copy, critic_params),
            log_alpha=TrainState.create(
                apply_fn=None, params=scalar(0.0), tx=optax.adam(args.offline_policy_lr)
            ),
            log_alpha_prime=TrainState.create(
                apply_fn=None, params=scalar(0.0), tx=optax.adam(args.offline_q_lr)
            ),
        )

    return jax.vmap(create)(jax.random.split(key, args.ensemble_size))


PROGRESS_CHUNK = 100  # offline CQL steps per compiled call (the progress bar's resolution)


def pretrain_cql_ensemble(args, members, key, offline, cql_update, run, eval_fn, start):
    """The offline phase: CQL steps [start, args.offline_steps) through `run.train_offline` (its
    logs, evaluations of `eval_fn(actor_params, seed) -> EvalResult` and checkpoints of (members,
    key)), in compiled chunks of up to PROGRESS_CHUNK steps so that the bar moves (and shows an
    ETA) within seconds even for N=5 on a CPU (~7 steps/s); the logged metrics are still the mean
    over each `log_every` window, and the updates are the same as in one scan."""
    chunk = math.gcd(args.log_every, PROGRESS_CHUNK)
    offline_chunk = make_offline_chunk(args, cql_update, chunk)

    def run_chunk(carry, step):
        members, key = carry
        members, key, metrics = offline_chunk(members, offline, key, jnp.int32(step))
        return (members, key), metrics

    return run.train_offline(
        args, (members, key), run_chunk,
        lambda carry, step: eval_fn(carry[0].actor.params, args.seed + step),
        start, chunk=chunk, desc="offline CQL",
    )  # fmt: skip


# The metadata `kind` of an exported ensemble (benchmarks/export_pretrained.py).
PRETRAINED_KIND = "cql_ensemble_params"
CQL_ENSEMBLE = "cql_ensemble"  # the `algorithm` of both files' offline.npz: either can load it


def load_offline_ensemble(path, members: CQLMember, env: str, obs_dim: int, action_dim: int):
    """--offline-checkpoint: a run's `offline.npz` (the whole CQL state, written by either file)
    or an exported ensemble (`ensemble.npz` of benchmarks/export_pretrained.py: each member's
    policy and twin critics; the rest starts fresh and the target critics as copies of the
    critics, which is all fine-tuning reads). An exported ensemble of more members than
    `members` gives its first N (member 0 alone is an N=1 CQL agent: the members were trained
    independently). A file that does not fit raises one CheckpointError line."""
    try:
        meta = read_checkpoint_metadata(path)
    except CheckpointError as err:
        raise CheckpointError(f"--offline-checkpoint {path}: {err}") from None
    if meta.get("kind") != PRETRAINED_KIND:
        target = (members, jax.random.PRNGKey(0))
        (members, _), _ = load_offline_agent(path, target, CQL_ENSEMBLE, env, obs_dim, action_dim)
        return members
    n, saved = jax.tree_util.tree_leaves(members.actor.params)[0].shape[0], meta["ensemble_size"]
    if meta["dataset"] != env:
        raise CheckpointError(
            f"--offline-checkpoint {path} was pretrained on {meta['dataset']}, not {env}: pass "
            f"--env {meta['dataset']} or an ensemble pretrained on {env}"
        )
    if saved < n:
        raise CheckpointError(
            f"--offline-checkpoint {path} holds {saved} members, fewer than --ensemble-size {n}"
        )
    template = jax.tree_util.tree_map(
        lambda x: jnp.zeros((saved, *x.shape[1:]), x.dtype),
        {"actor": members.actor.params, "critic": members.critic.params},
    )
    try:
        params, _ = load_checkpoint(path, template)
    except CheckpointError as err:
        raise CheckpointError(
            f"--offline-checkpoint {path} does not fit this run ({err}); it holds networks of "
            f"hidden dims {meta['hidden_dims']} for {meta['obs_dim']} observation and "
            f"{meta['action_dim']} action dimensions"
        ) from None
    actor, critic = jax.tree_util.tree_map(lambda x: x[:n], (params["actor"], params["critic"]))
    return members.replace(
        actor=members.actor.replace(params=actor),
        critic=members.critic.replace(params=critic),
        critic_target=jax.tree_util.tree_map(jnp.copy, critic),
    )


# ==== END SHARED BLOCK ==========================================================================


# ================================================================================================
# Online: the ensemble agent (Eq. 5) with SAC updates, and balanced replay (Eq. 4, 6)
# ================================================================================================


def ensemble_policy(actor: TanhGaussianPolicy, params, obs):
    """The ensemble agent's tanh-Gaussian policy at `obs`, and its deterministic action."""
    means, log_stds = jax.vmap(actor.apply, in_axes=(0, None))(params, obs)
    mean, std = ensemble_moments(means, log_stds)
    return tanh_gaussian(mean, jnp.log(std)), jnp.tanh(mean)


@struct.dataclass
class OnlineState:
    actor: TrainState  # stacked member policies [N, ...], one optimizer (Adam is elementwise)
    critic: TrainState  # [N, 2, ...]
    critic_target: dict
    log_alpha: TrainState  # one temperature for the ensemble policy, reset to 1
    density_ratio: TrainState
    buffer: PrioritizedBuffer  # offline data in slots [0, M) (kept) + online ring
    key: jax.Array
    env_steps: jax.Array


def js_density_ratio_loss(w_offline, w_online):
    """Negative JS lower bound of Eq. (4) with P = d_on, Q = d_off (authors' form): minimised
    at w = d_on / d_off."""
    return (
        -jnp.log(2.0 / (w_offline + 1.0) + 1e-10).mean()
        - jnp.log(2.0 * w_online / (w_online + 1.0) + 1e-10).mean()
    )


def balanced_priorities(w_batch, w_offline_reference, temperature):
    """Eq. (6): w^(1/T) self-normalised by its mean over a uniform offline batch (the
    density-ratio step's own offline batch, as in the authors' code), clamped to [1e-3, 1e3]."""
    scaled = w_batch ** (1.0 / temperature)
    norm = (w_offline_reference ** (1.0 / temperature)).mean()
    return jnp.clip(scaled / (norm + 1e-10), 1e-3, 1e3)


def initial_online_priority(num_offline: int, online_fraction: float, steps_per_epoch: int):
    """Priority of new online samples such that after the first `steps_per_epoch` of them their
    share of a batch is `online_fraction` (offline items have priority 1):
    k p / (k p + M) = f  <=>  p = M f / ((1 - f) k)."""
    return num_offline * online_fraction / ((1.0 - online_fraction) * steps_per_epoch)


def auroc(positive_scores, negative_scores):
    """P(score of a positive > score of a negative), by the Mann-Whitney rank statistic."""
    scores = jnp.concatenate([positive_scores, negative_scores])
    ranks = jnp.argsort(jnp.argsort(scores)) + 1.0
    n_pos, n_neg = positive_scores.shape[0], negative_scores.shape[0]
    return (ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def create_online_state(args, members: CQLMember, offline: dict, density_ratio, key, dr_key):
    """The fine-tuning state: the pretrained members with fresh optimizers (online learning
    rates), target critics copied from the online critics (authors' code), temperature reset to
    1 and learned at the policy's learning rate, and the buffer holding the offline data
    (priority 1) with the default priority of new online samples set for the initial online
    fraction."""
    num_offline, action_dim = offline["actions"].shape
    buffer = PrioritizedBuffer.from_data(
        offline, capacity=num_offline + args.online_buffer_size, priority=1.0, keep=True
    )
    buffer = buffer.set_default_priority(
        initial_online_priority(num_offline, args.initial_online_fraction, args.steps_per_epoch)
    )
    obs_dim = offline["observations"].shape[1]
    dr_params = density_ratio.init(dr_key, jnp.zeros((1, obs_dim)), jnp.zeros((1, action_dim)))
    return OnlineState(
        actor=TrainState.create(
            apply_fn=None, params=members.actor.params, tx=optax.adam(args.policy_lr)
        ),
        critic=TrainState.create(
            apply_fn=None, params=members.critic.params, tx=optax.adam(args.q_lr)
        ),
        critic_target=jax.tree_util.tree_map(jnp.copy, members.critic.params),
        log_alpha=TrainState.create(
            apply_fn=None, params={"v": jnp.float32(0.0)}, tx=optax.adam(args.policy_lr)
        ),
        density_ratio=TrainState.create(apply_fn=None, params=dr_params, tx=optax.adam(args.dr_lr)),
        buffer=buffer,
        key=key,
        env_steps=jnp.int32(0),
    )


# Online updates per compiled call: an epoch's updates (10x longer in the first) run in chunks
# so the progress bar moves every few seconds on a CPU; on an accelerator a call's overhead is
# still small next to 100 N=5 updates.
UPDATES_PER_CALL = 100


def new_online_priorities(state: OnlineState, num_new: int):
    """Priorities of an epoch's new online samples: None, i.e. the buffer's running maximum (the
    authors' code: the initial-fraction priority M f / ((1 - f) 1000), which never falls; the
    study studies/off2on_dr_output/ tries 1 instead)."""
    return None


def make_online_update(args, actor, critic, density_ratio, action_dim, num_offline):
    target_entropy = -float(action_dim)

    def rows(buffer, idx):
        return jax.tree_util.tree_map(lambda x: x[idx], buffer.storage.data)

    def sample_rl_batch(buffer: PrioritizedBuffer, key):
        if args.replay == "balanced":
            _, idx, _ = buffer.sample(key, args.batch_size)
        elif args.replay == "uniform":  # one buffer, every filled slot equally likely
            idx = jax.random.randint(key, (args.batch_size,), 0, buffer.size)
        else:  # online-only: the online slots
            idx = jax.random.randint(key, (args.batch_size,), num_offline, buffer.size)
        return rows(buffer, idx), idx

    def update(state: OnlineState, key):
        k_batch, k_next, k_pi, k_cql, k_off, k_on = jax.random.split(key, 6)
        batch, idx = sample_rl_batch(state.buffer, k_batch)
        obs, actions, next_obs = batch["observations"], batch["actions"], batch["next_observations"]
        alpha = jnp.exp(state.log_alpha.params["v"])

        # Critics (Eq. 1): one next action from the ensemble policy, shared by all members;
        # each member's target is the min of its own twin target critics.
        next_dist, _ = ensemble_policy(actor, state.actor.params, next_obs)
        next_actions, next_logp = next_dist.sample_and_log_prob(seed=k_next)
        next_q = jax.vmap(twin_q, in_axes=(None, 0, None, None))(
            critic, state.critic_target, next_obs, next_actions
        ).min(1)  # [N, B]
        target = batch["rewards"] + args.gamma * (1 - batch["terminals"]) * (
            next_q - alpha * next_logp
        )

        def critic_loss_fn(params):
            q = jax.vmap(twin_q, in_axes=(None, 0, None, None))(critic, params, obs, actions)
            bellman = ((q - target[:, None]) ** 2).mean(-1).sum()  # summed over members, twins
            if not args.online_cql:
                return bellman, q
            gap = lambda a, c, q_i, k: online_cql_gap(  # noqa: E731
                args, actor, critic, a, c, obs, next_obs, q_i, k
            )
            gaps = jax.vmap(gap)(
                state.actor.params, params, q, jax.random.split(k_cql, args.ensemble_size)
            )
            return bellman + args.cql_weight * gaps.sum(), q

        (critic_loss, q), grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(
            state.critic.params
        )
        critic_state = state.critic.apply_gradients(grads=grads)
        critic_target = optax.incremental_update(critic_state.params, state.critic_target, args.tau)

        # Actor (Eq. 2) through the ensemble policy of Eq. (5), against the mean-of-members Q
        # of the critics before this step's update (the authors' code computes both losses
        # first, then steps).
        def actor_loss_fn(params):
            dist, _ = ensemble_policy(actor, params, obs)
            new_actions, logp = dist.sample_and_log_prob(seed=k_pi)
            q_new = jax.vmap(twin_q, in_axes=(None, 0, None, None))(
                critic, state.critic.params, obs, new_actions
            ).min(1)  # [N, B]
            return (alpha * logp - q_new.mean(0)).mean(), logp

        (actor_loss, logp), grads = jax.value_and_grad(actor_loss_fn, has_aux=True)(
            state.actor.params
        )
        actor_state = state.actor.apply_gradients(grads=grads)
        alpha_grads = jax.grad(
            lambda p: -(p["v"] * jax.lax.stop_gradient(logp + target_entropy)).mean()
        )(state.log_alpha.params)
        log_alpha = state.log_alpha.apply_gradients(grads=alpha_grads)

        metrics = {
            "critic_loss": critic_loss,
            "actor_loss": actor_loss,
            "alpha": alpha,
            "entropy": -logp.mean(),
            "q_mean": q.mean(),
            "q_member_std": q.min(1).std(0).mean(),
            "offline_fraction": (idx < num_offline).mean(),
        }

        # Balanced replay: new priorities of the sampled transitions (Eq. 6) from the
        # density-ratio net before its step, normalised over that step's offline batch; then
        # the density-ratio step (Eq. 4) on a uniform offline and a uniform online batch.
        buffer, dr_state = state.buffer, state.density_ratio
        if args.replay == "balanced":
            size = buffer.size
            off = rows(buffer, jax.random.randint(k_off, (args.dr_batch_size,), 0, num_offline))
            on = rows(buffer, jax.random.randint(k_on, (args.dr_batch_size,), num_offline, size))

            def dr_loss_fn(params):
                w_off = density_ratio.apply(params, off["observations"], off["actions"])
                w_on = density_ratio.apply(params, on["observations"], on["actions"])
                return js_density_ratio_loss(w_off, w_on), (w_off, w_on)

            (dr_loss, (w_off, w_on)), grads = jax.value_and_grad(dr_loss_fn, has_aux=True)(
                dr_state.params
            )
            w_batch = density_ratio.apply(dr_state.params, obs, actions)
            priorities = balanced_priorities(w_batch, w_off, args.temperature)
            buffer = buffer.update_priorities(idx, priorities)
            dr_state = dr_state.apply_gradients(grads=grads)
            metrics |= {
                "dr_loss": dr_loss,
                "w_offline": w_off.mean(),
                "w_online": w_on.mean(),
                "priority_mean": priorities.mean(),
                "default_priority": buffer.max_priority,
            }
        state = state.replace(
            actor=actor_state,
            critic=critic_state,
            critic_target=critic_target,
            log_alpha=log_alpha,
            density_ratio=dr_state,
            buffer=buffer,
        )
        return state, metrics

    def insert(state: OnlineState, transitions: dict):
        """Add one epoch of online transitions at `new_online_priorities`. Returns the state and
        the key of the epoch's updates."""
        key, loop_key = jax.random.split(state.key)
        priorities = new_online_priorities(state, transitions["actions"].shape[0])
        buffer = state.buffer.add_batch(transitions, priorities)
        return state.replace(buffer=buffer, key=key), loop_key

    def train(state: OnlineState, loop_key, first, last):
        """Updates first..last-1 of an epoch (update i draws fold_in(loop_key, i)) in one
        compiled loop; the bounds are traced, so every chunk and the longer first epoch share one
        program. Returns the state and the updates' summed metrics."""
        _, zero_metrics = jax.eval_shape(update, state, loop_key)
        zero_metrics = jax.tree_util.tree_map(lambda m: jnp.zeros(m.shape, m.dtype), zero_metrics)

        def body(i, carry):
            state, totals = carry
            state, metrics = update(state, jax.random.fold_in(loop_key, i))
            return state, jax.tree_util.tree_map(jnp.add, totals, metrics)

        return jax.lax.fori_loop(first, last, body, (state, zero_metrics))

    insert, train = jax.jit(insert, donate_argnums=0), jax.jit(train, donate_argnums=0)

    def insert_and_train(state: OnlineState, transitions: dict, num_updates, on_progress=None):
        """One epoch: add its transitions, then `num_updates` updates, UPDATES_PER_CALL per
        compiled call so that a progress bar moves between calls (`on_progress(n)` after each,
        once its updates are done); the split does not change the updates. Returns the state
        and the updates' mean metrics."""
        num_updates = int(num_updates)
        state, loop_key = insert(state, transitions)
        totals = None
        for first in range(0, num_updates, UPDATES_PER_CALL):
            last = min(first + UPDATES_PER_CALL, num_updates)
            state, sums = train(state, loop_key, jnp.int32(first), jnp.int32(last))
            totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
            if on_progress is not None:
                jax.block_until_ready(sums)
                on_progress(last - first)
        return state, jax.tree_util.tree_map(lambda t: t / num_updates, totals)

    return insert_and_train


def q_auroc(critic, critic_params, obs, seen_actions, key, random_per_state: int):
    """Fig. 4b: Q as a classifier of seen (s, a) pairs against (s, a_uniform) at online states,
    `random_per_state` uniform actions per state. Returns (AUROC of the ensemble's Q, the mean
    over members of each member's own AUROC); Q of a member is the min of its twin critics, the
    ensemble's Q their mean (the Q of Eq. 2). The paper's single-Q comparison is a separate N=1
    agent: a run with --ensemble-size 1."""
    random_actions = jax.random.uniform(
        key, (random_per_state, *seen_actions.shape), minval=-1, maxval=1
    )
    q_of = lambda o, a: jax.vmap(twin_q, in_axes=(None, 0, None, None))(  # noqa: E731
        critic, critic_params, o, a
    ).min(1)
    q_seen = q_of(obs, seen_actions)  # [N, S]
    q_rand = q_of(jnp.broadcast_to(obs, random_actions.shape[:-1] + obs.shape[-1:]), random_actions)
    q_rand = q_rand.reshape(q_rand.shape[0], -1)  # [N, k S]
    members = jax.vmap(auroc)(q_seen, q_rand)
    return auroc(q_seen.mean(0), q_rand.mean(0)), members.mean()


# ================================================================================================
# Main: offline phase, then online phase
# ================================================================================================


def main(args: Args) -> dict:
    if args.hidden_dims is None:
        args = dataclasses.replace(args, hidden_dims=paper_hidden_dims(args.env))
    lifecycle.check_args(
        args, online_unit="steps_per_epoch", online_eval=None, offline_intervals=("bc_steps",)
    )
    data = load_d4rl(args.env, allow_generate=not args.no_generate)
    env_name = data.info.env
    offline = {k: data.transitions[k] for k in TRANSITION_KEYS}
    num_offline = data.info.num_transitions
    obs_dim, action_dim = offline["observations"].shape[1], offline["actions"].shape[1]
    networks = 2 * args.ensemble_size * (1 + 3 * args.cql_n_actions)  # CQL's action sets
    lifecycle.check_batch_fits(args, num_offline, networks, obs_dim + action_dim)

    actor = TanhGaussianPolicy(action_dim, args.hidden_dims)
    critic = Critic(args.hidden_dims)
    density_ratio = DensityRatio(args.hidden_dims)
    key = jax.random.PRNGKey(args.seed)
    key, members_key, online_key, dr_key = jax.random.split(key, 4)
    members = create_cql_members(args, actor, critic, obs_dim, action_dim, members_key)

    deterministic_action = jax.jit(lambda p, o: ensemble_policy(actor, p, o)[1])

    def eval_metrics(actor_params, seed):
        act = lambda obs: deterministic_action(actor_params, obs)  # noqa: E731
        return evaluate(env_name, act, args.eval_episodes, seed)

    if args.offline_checkpoint:  # before the run directory exists: a wrong file writes nothing
        members = load_offline_ensemble(
            args.offline_checkpoint, members, args.env, obs_dim, action_dim
        )
        print(f"offline ensemble loaded from {args.offline_checkpoint}")
        if note := pretrained_data_note(args.offline_checkpoint, data.transitions):
            print(note)

    # ---------------------------------------------------------------- offline phase
    run = lifecycle.open_run(args, "off2on_balanced")
    progress = run.progress
    if args.offline_checkpoint or run.offline_done:
        if not args.offline_checkpoint:
            members = load_offline_ensemble(
                run.offline_path, members, args.env, obs_dim, action_dim
            )
            print(f"offline ensemble loaded from {run.offline_path}")
        if not run.resumed:
            progress = {"phase": "online", "env_steps": 0}
    else:
        if run.resumed:
            (members, key), progress = load_checkpoint(run.checkpoint_path, (members, key))
            print(f"resumed offline phase at step {progress['offline_step']}")
        cql_update = make_cql_update(args, actor, critic, action_dim)
        members, key = pretrain_cql_ensemble(
            args, members, key, offline, cql_update, run, eval_metrics, progress["offline_step"]
        )
        offline_meta = {"algorithm": CQL_ENSEMBLE, "env": args.env, "obs_dim": obs_dim,
                        "action_dim": action_dim, "offline_steps": args.offline_steps}  # fmt: skip
        save_checkpoint(run.offline_path, (members, key), offline_meta)
        progress = {"phase": "online", "env_steps": 0}
    before = eval_metrics(members.actor.params, seed=args.seed + 10**6)
    print(f"after offline pretraining: normalized score {before.mean_normalized:.1f}")

    # ---------------------------------------------------------------- online phase
    state = create_online_state(args, members, offline, density_ratio, online_key, dr_key)
    env = OnlineEnv(env_name, args.seed)
    if run.resumed and progress.get("env_steps", 0) > 0:
        state, progress = load_checkpoint(run.checkpoint_path, state)
        env.load_state_dict(progress["env"])
        print(f"resumed online phase at env step {progress['env_steps']}")
    insert_and_train = make_online_update(
        args, actor, critic, density_ratio, action_dim, num_offline
    )

    q_auroc_jit = jax.jit(q_auroc, static_argnums=(0, 5))

    @jax.jit
    def explore(actor_params, obs, key):
        dist, _ = ensemble_policy(actor, actor_params, obs[None])
        return dist.sample(seed=key)[0]

    epochs = args.online_steps // args.steps_per_epoch
    first_epoch = progress["env_steps"] // args.steps_per_epoch

    def updates_in(epoch):  # the first epoch takes first_epoch_multiplier x the updates
        return args.steps_per_epoch * (args.first_epoch_multiplier if epoch == 0 else 1)

    # Counted in gradient updates, the online phase's cost (an epoch's 1000 env steps take a
    # second or two; its updates minutes on a CPU), so the ETA holds from the first chunk.
    bar = lifecycle.progress_bar(
        None, initial=sum(map(updates_in, range(first_epoch))),
        total=sum(map(updates_in, range(epochs))), desc="online updates", unit="update",
    )  # fmt: skip
    for epoch in range(first_epoch, epochs):
        env_steps = epoch * args.steps_per_epoch
        global_step = args.offline_steps + env_steps
        run.log_eval(global_step, eval_metrics(state.actor.params, args.seed + epoch), bar)

        # Collect one epoch of experience with the ensemble's exploration policy.
        act_key, auroc_key = jax.random.split(jax.random.fold_in(state.key, epoch))
        step_keys = np.asarray(jax.random.split(act_key, args.steps_per_epoch))
        transitions = []
        for t in range(args.steps_per_epoch):
            action = explore(state.actor.params, env.obs, step_keys[t])
            transition, finished = env.step(np.asarray(action))
            transitions.append(transition)
            if finished:
                run.logger.log(global_step + t + 1, finished, prefix="train/")
        batch = {k: jnp.asarray(np.stack([tr[k] for tr in transitions])) for k in TRANSITION_KEYS}
        state, metrics = insert_and_train(state, batch, updates_in(epoch), bar.update)
        state = state.replace(env_steps=state.env_steps + args.steps_per_epoch)
        env_steps += args.steps_per_epoch
        global_step += args.steps_per_epoch

        # Fig. 4b over the online data so far: a uniform sample of `auroc_samples` pairs.
        sample_key, action_key = jax.random.split(auroc_key)
        online_stored = min(env_steps, args.online_buffer_size)
        pairs = num_offline + jax.random.randint(
            sample_key, (args.auroc_samples,), 0, online_stored
        )
        stored = state.buffer.storage.data
        auc_ens, auc_member = q_auroc_jit(
            critic, state.critic.params, stored["observations"][pairs], stored["actions"][pairs],
            action_key, args.auroc_random_actions,
        )  # fmt: skip
        run.logger.log(
            global_step,
            {**metrics, "auroc_ensemble": auc_ens, "auroc_member_mean": auc_member},
            prefix="online/",
        )
        if env_steps % args.checkpoint_every == 0 or env_steps == args.online_steps:
            progress = {"phase": "online", "env_steps": env_steps, "env": env.state_dict()}
            run.save(state, progress, global_step, args.stop_after)

    bar.close()
    after = eval_metrics(state.actor.params, seed=args.seed + 2 * 10**6)
    return run.finish(
        args, before, after, dataset=data.info.minari_id,
        dataset_sha256=data.info.transitions_sha256,
    )  # fmt: skip


if __name__ == "__main__":
    lifecycle.cli(main, Args)
