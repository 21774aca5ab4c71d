"""BRED: Balanced Replay with Ensemble Distillation.

Lee, Seo, Lee, Abbeel, Shin. "Addressing Distribution Shift in Online Reinforcement Learning with
Offline Datasets", NeurIPS 2020 Offline RL workshop. No public code: Sections 4.1-4.2 and
Appendix A are the specification. Documentation: docs/bred.md.

1. Offline: N CQL agents (Eq. 4) as one `vmap`ped program (the block is shared verbatim with
   off2on_balanced.py, and a test checks it).
2. Ensemble distillation (Eq. 8-9, `distill`): one tanh-Gaussian policy regressed onto the
   mixture's pre-tanh mean and standard deviation on offline states, with early stopping.
3. Online, the paper's contribution: balanced replay with a linearly annealed online fraction
   (Eq. 7, `online_fraction`, `balanced_batch`): each batch takes B (1 - rho_t) offline and
   B rho_t online samples. The distilled policy is updated against the mean of the Q-ensemble
   (Eq. 10-11); each critic trains independently with the SAC loss (Eq. 1-2), no CQL term.
   Schedule: 10x updates after the first 1000 online samples, then 1000 updates per 1000.
Ablations of the paper: `--no-distill` (Fig. 5), `--replay uniform | online-only` (Fig. 4),
`--online-cql` (Fig. 10).

Choices where the paper is silent (details: docs/bred.md):
- Distillation epochs of 1000 steps, up to 1000, patience 10, 10% of the offline data held out.
- Online temperature auto-tuned from 1.0 (target entropy -|A|); policy learning rate 3e-4.
- Critic targets share one next action of the distilled policy; each member takes the min of its
  own twin targets.
- `--ensemble-size 1` skips distillation (as the paper does).
- Otherwise fine-tuning follows the same authors' Off2On code: online target critics start as
  copies of the critics; the actor loss uses the critics before this step's critic update.
- `--online-cql` uses the fixed weight `--cql-weight` (no Lagrange tuning online).

Usage:
    python algorithms/bred.py --env hopper-medium-v2
    python algorithms/bred.py --env hopper-medium-v2 \
        --offline-checkpoint hopper-medium-v2/cql_n5_200k                  # a committed ensemble
    python algorithms/bred.py --env walker2d-medium-replay-v2 --no-distill
"""

import dataclasses
import math
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training.train_state import TrainState

from common import flags, lifecycle
from common.buffers import ReplayBuffer
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
    """B of Eq. (7)"""
    gamma: flags.Discount = 0.99
    """discount factor"""
    tau: flags.PolyakRate = 5e-3
    """Polyak rate of the target critics, every update"""

    # --- offline CQL (the CQL authors' defaults, as in off2on_balanced.py) ---
    offline_steps: flags.Steps = 1_000_000
    """offline gradient steps per member (CQL: 1000 epochs x 1000)"""
    offline_checkpoint: flags.CheckpointPath = None
    """a saved CQL ensemble (a run's `offline.npz`, also off2on's, or an exported `ensemble.npz`)
    or a committed one by name, e.g. hopper-medium-v2/cql_n5_200k (pretrained/README.md)"""
    offline_policy_lr: flags.LearningRate = 1e-4
    """offline (CQL) policy and temperature learning rate"""
    offline_q_lr: flags.LearningRate = 3e-4
    """offline (CQL) critic and Lagrange-multiplier learning rate"""
    cql_weight: flags.NonNegative = 5.0
    """alpha' of Eq. (4) (CQL's min_q_weight; the CQL authors use 1.0 with --cql-lagrange)"""
    cql_lagrange: bool = False
    """scale the CQL term by a dual variable tuned to keep weight * gap at --cql-target-gap"""
    cql_target_gap: flags.NonNegative = 5.0
    """the Lagrange threshold (CQL's target_action_gap)"""
    cql_n_actions: flags.Count = 10
    """actions sampled per state for each of the uniform / pi(s) / pi(s') terms of Eq. (4)"""
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

    # --- ensemble distillation (Eq. 8-9) ---
    no_distill: bool = False
    """keep N independent policies instead of distilling them (Fig. 5 ablation)"""
    distill_epochs: flags.Count = 1_000
    """maximum distillation epochs (paper: 1000, with early stopping)"""
    distill_steps_per_epoch: flags.Count = 1_000
    """gradient steps per distillation epoch"""
    distill_patience: flags.Count = 10
    """stop after this many epochs without a better validation loss"""
    distill_validation_fraction: flags.OpenFraction = 0.1
    """share of offline transitions held out for early stopping"""
    distill_lr: flags.LearningRate = 3e-4
    """learning rate of the distilled policy (Eq. 8)"""

    # --- online fine-tuning ---
    online_steps: flags.Steps = 250_000
    """environment steps of fine-tuning (paper: 250k)"""
    steps_per_epoch: flags.Count = 1_000
    """env steps collected per epoch; the epoch then runs as many updates"""
    first_epoch_multiplier: flags.Count = 10
    """the first epoch runs this many times more updates (paper: 10x)"""
    policy_lr: flags.LearningRate = 3e-4
    """paper: chosen per task from {3e-4, 3e-5, 5e-6}"""
    q_lr: flags.LearningRate = 3e-4
    """online critic learning rate"""
    alpha_lr: flags.LearningRate = 3e-4
    """temperature learning rate"""
    init_alpha: flags.Positive = 1.0
    """online temperature at the start of fine-tuning (auto-tuned after)"""
    online_buffer_size: flags.Count = 250_000
    """capacity of the online buffer"""
    replay: Literal["balanced", "uniform", "online-only"] = "balanced"
    """balanced: Eq. (7) mix; uniform: pooled buffer; online-only: online samples alone"""
    initial_online_fraction: flags.Fraction = 0.5
    """rho_0 of Eq. (7) (paper: 0.5 or 0.75)"""
    anneal_steps: flags.Count = 125_000
    """t_final of Eq. (7): online steps until batches are fully online"""
    online_cql: bool = False
    """keep the CQL regulariser during fine-tuning with the fixed weight --cql-weight (Fig. 10)"""
    eval_episodes: flags.Count = 5
    """deterministic evaluation episodes per epoch"""
    checkpoint_every: flags.Count = 10_000
    """steps (offline gradient steps, online env steps) between full checkpoints"""


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
# Ensemble distillation (Eq. 8-9)
# ================================================================================================


def distillation_targets(actor: TanhGaussianPolicy, member_params, obs):
    """Eq. (9): the mixture's mean mu_hat and std sigma_hat at `obs` (pre-tanh)."""
    means, log_stds = jax.vmap(actor.apply, in_axes=(0, None))(member_params, obs)
    return ensemble_moments(means, log_stds)


def distillation_loss(actor: TanhGaussianPolicy, params, obs, mu_hat, sigma_hat):
    """Eq. (8): E_s[ ||mu_pd(s) - mu_hat(s)||^2 + ||sigma_pd(s) - sigma_hat(s)||^2 ]."""
    mean, log_std = actor.apply(params, obs)
    return (((mean - mu_hat) ** 2).sum(-1) + ((jnp.exp(log_std) - sigma_hat) ** 2).sum(-1)).mean()


def distill(args: Args, actor, member_params, observations, key, logger, global_step: int):
    """Fit one policy to the ensemble mixture on offline states, with early stopping on a
    held-out split. Returns (best params, summary)."""
    num = observations.shape[0]
    key, perm_key, init_key = jax.random.split(key, 3)
    order = jax.random.permutation(perm_key, num)
    num_val = max(1, int(num * args.distill_validation_fraction))
    val_obs, train_obs = observations[order[:num_val]], observations[order[num_val:]]
    val_obs = val_obs[:20_000]  # a fixed validation set of at most 20k states
    val_mu, val_sigma = distillation_targets(actor, member_params, val_obs)
    params = actor.init(init_key, observations[:1])
    state = TrainState.create(apply_fn=None, params=params, tx=optax.adam(args.distill_lr))

    @jax.jit
    def epoch(state, key, train_obs, member_params):  # data as arguments, not constants
        def step(state, step_key):
            obs = train_obs[jax.random.randint(step_key, (args.batch_size,), 0, train_obs.shape[0])]
            mu_hat, sigma_hat = distillation_targets(actor, member_params, obs)
            loss, grads = jax.value_and_grad(
                lambda p: distillation_loss(actor, p, obs, mu_hat, sigma_hat)
            )(state.params)
            return state.apply_gradients(grads=grads), loss

        state, losses = jax.lax.scan(
            step, state, jax.random.split(key, args.distill_steps_per_epoch)
        )
        val = distillation_loss(actor, state.params, val_obs, val_mu, val_sigma)
        return state, losses.mean(), val

    best = (float("inf"), 0, state.params)
    bar = lifecycle.progress_bar(range(args.distill_epochs), desc="distill")
    start = time.perf_counter()
    for i in bar:
        if i == 1:  # the first epoch includes compilation
            start = time.perf_counter()
        key, epoch_key = jax.random.split(key)
        state, train_loss, val_loss = epoch(state, epoch_key, train_obs, member_params)
        val_loss = float(val_loss)
        logger.log(
            global_step + i + 1, {"train_loss": train_loss, "val_loss": val_loss}, prefix="distill/"
        )
        bar.set_postfix(val=f"{val_loss:.4f}")
        if val_loss < best[0]:
            best = (val_loss, i + 1, state.params)
        elif i + 1 - best[1] >= args.distill_patience:
            break
    steps_per_s = i * args.distill_steps_per_epoch / (time.perf_counter() - start) if i else None
    summary = {
        "val_loss": best[0],
        "best_epoch": best[1],
        "epochs_run": i + 1,
        "steps_per_s": steps_per_s,
    }
    print(f"distillation: validation loss {best[0]:.5f} at epoch {best[1]} ({i + 1} epochs run)")
    return best[2], summary


# ================================================================================================
# Online: balanced replay (Eq. 7) and the distilled policy against the Q-ensemble (Eq. 10-11)
# ================================================================================================


def online_fraction(t, rho_0: float, t_final: int):
    """Eq. (7): rho_t = rho_0 + (1 - rho_0) min(t, t_final) / t_final."""
    return rho_0 + (1.0 - rho_0) * jnp.minimum(t, t_final) / t_final


def balanced_batch(offline: dict, online: ReplayBuffer, key, t, args: Args):
    """B (1 - rho_t) offline and B rho_t online transitions (fixed shapes: both sources are
    sampled B times and the first round(B rho_t) rows are taken from the online sample).
    Returns (batch, is_online [B])."""
    k_off, k_on = jax.random.split(key)
    num_offline = offline["rewards"].shape[0]
    b = args.batch_size
    if args.replay == "uniform":  # offline and online pooled, every transition equally likely
        idx = jax.random.randint(k_off, (b,), 0, num_offline + online.size)
        is_online = idx >= num_offline
        off_rows = jax.tree_util.tree_map(lambda x: x[jnp.minimum(idx, num_offline - 1)], offline)
        on_rows = jax.tree_util.tree_map(
            lambda x: x[jnp.maximum(idx - num_offline, 0)], online.data
        )
    else:
        rho = (
            1.0
            if args.replay == "online-only"
            else online_fraction(t, args.initial_online_fraction, args.anneal_steps)
        )
        is_online = jnp.arange(b) < jnp.round(b * rho)
        off_rows = jax.tree_util.tree_map(
            lambda x: x[jax.random.randint(k_off, (b,), 0, num_offline)], offline
        )
        on_rows, _ = online.sample(k_on, b)
    pick = lambda on, off: jnp.where(is_online.reshape(-1, *[1] * (on.ndim - 1)), on, off)  # noqa: E731
    return jax.tree_util.tree_map(pick, on_rows, off_rows), is_online


def ensemble_q(critic: Critic, critic_params, obs, actions):
    """Q_i(s, a) = min of member i's twin critics, for every member: [N, B]."""
    return jax.vmap(twin_q, in_axes=(None, 0, None, None))(critic, critic_params, obs, actions).min(
        1
    )


def distilled_actor_loss(actor, critic, policy_params, critic_params, obs, key, alpha):
    """Eq. (10-11): E_s E_{a~pi_pd}[ alpha log pi_pd(a|s) - (1/N) sum_i Q_i(s, a) ]."""
    dist = tanh_gaussian(*actor.apply(policy_params, obs))
    actions, logp = dist.sample_and_log_prob(seed=key)
    return (alpha * logp - ensemble_q(critic, critic_params, obs, actions).mean(0)).mean(), logp


@struct.dataclass
class OnlineState:
    policy: TrainState  # the distilled policy; with --no-distill the N member policies [N, ...]
    critic: TrainState  # [N, 2, ...], each member trained independently
    critic_target: dict
    log_alpha: TrainState  # [1] (distilled) or [N] (independent policies)
    online: ReplayBuffer
    key: jax.Array
    env_steps: jax.Array


# Online updates per compiled call: an epoch's updates (10x longer in the first) run in chunks
# so the progress bar moves every few seconds on a CPU; on an accelerator a call's overhead is
# still small next to 100 N=5 updates.
UPDATES_PER_CALL = 100


def make_online_update(args: Args, actor, critic, action_dim: int):
    target_entropy = -float(action_dim)
    independent = args.no_distill or args.ensemble_size == 1

    def policy_dist(params, obs):
        """The acting distribution: the distilled policy, or N(mu_hat, sigma_hat) of Eq. (9)."""
        if not independent:
            return tanh_gaussian(*actor.apply(params, obs))
        mean, std = distillation_targets(actor, params, obs)
        return tanh_gaussian(mean, jnp.log(std))

    def update(state: OnlineState, offline: dict, key):
        k_batch, k_next, k_pi, k_cql = jax.random.split(key, 4)
        batch, is_online = balanced_batch(offline, state.online, k_batch, state.env_steps, args)
        obs, actions, next_obs = batch["observations"], batch["actions"], batch["next_observations"]
        alpha = jnp.exp(state.log_alpha.params["v"])  # [P]

        # Critics (Eq. 1-2): each member against its own target critics.
        if independent:  # member i bootstraps with its own policy pi_i
            next_dist = tanh_gaussian(
                *jax.vmap(actor.apply, in_axes=(0, None))(state.policy.params, next_obs)
            )
            next_actions, next_logp = next_dist.sample_and_log_prob(seed=k_next)  # [N, B, A]
            next_q = jax.vmap(lambda p, a: twin_q(critic, p, next_obs, a).min(0))(
                state.critic_target, next_actions
            )
            next_v = next_q - alpha[:, None] * next_logp
        else:  # one next action of the distilled policy, shared by all members
            next_actions, next_logp = policy_dist(
                state.policy.params, next_obs
            ).sample_and_log_prob(seed=k_next)
            next_v = (
                ensemble_q(critic, state.critic_target, next_obs, next_actions) - alpha * next_logp
            )
        target = batch["rewards"] + args.gamma * (1 - batch["terminals"]) * next_v  # [N, B]

        def critic_loss_fn(params):
            q = jax.vmap(twin_q, in_axes=(None, 0, None, None))(critic, params, obs, actions)
            bellman = ((q - target[:, None]) ** 2).mean(-1).sum()  # summed over members, twins
            if not args.online_cql:
                return bellman, q
            # Fig. 10: each member's CQL gap with the acting policy's actions (the distilled
            # policy, or the member's own policy with --no-distill)
            gap = lambda a, c, q_i, k: online_cql_gap(  # noqa: E731
                args, actor, critic, a, c, obs, next_obs, q_i, k
            )
            policy_axis = 0 if independent else None
            gaps = jax.vmap(gap, in_axes=(policy_axis, 0, 0, 0))(
                state.policy.params, params, q, jax.random.split(k_cql, args.ensemble_size)
            )
            return bellman + args.cql_weight * gaps.sum(), q

        (critic_loss, q), grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(
            state.critic.params
        )
        critic_state = state.critic.apply_gradients(grads=grads)
        critic_target = optax.incremental_update(critic_state.params, state.critic_target, args.tau)

        # Actor: the distilled policy against the mean Q (Eq. 10-11), or each policy with its Q;
        # the critics before this step's update (as in the same authors' Off2On code).
        if independent:

            def actor_loss_fn(params):
                def member_loss(p, c, a, k):
                    dist = tanh_gaussian(*actor.apply(p, obs))
                    acts, logp = dist.sample_and_log_prob(seed=k)
                    return (a * logp - twin_q(critic, c, obs, acts).min(0)).mean(), logp

                keys = jax.random.split(k_pi, args.ensemble_size)
                losses, logp = jax.vmap(member_loss)(params, state.critic.params, alpha, keys)
                return losses.sum(), logp  # [N, B]
        else:

            def actor_loss_fn(params):
                loss, logp = distilled_actor_loss(
                    actor, critic, params, state.critic.params, obs, k_pi, alpha[0]
                )
                return loss, logp[None]

        (actor_loss, logp), grads = jax.value_and_grad(actor_loss_fn, has_aux=True)(
            state.policy.params
        )
        policy = state.policy.apply_gradients(grads=grads)
        alpha_grads = jax.grad(
            lambda p: (
                -(p["v"][:, None] * jax.lax.stop_gradient(logp + target_entropy)).mean(1).sum()
            )
        )(state.log_alpha.params)
        log_alpha = state.log_alpha.apply_gradients(grads=alpha_grads)
        metrics = {
            "critic_loss": critic_loss,
            "actor_loss": actor_loss,
            "alpha": alpha.mean(),
            "entropy": -logp.mean(),
            "q_mean": q.mean(),
            "q_member_std": q.min(1).std(0).mean(),
            "online_fraction": is_online.mean(),
        }
        state = state.replace(
            policy=policy, critic=critic_state, critic_target=critic_target, log_alpha=log_alpha
        )
        return state, metrics

    def insert(state: OnlineState, transitions: dict):
        """Add one epoch of online transitions. Returns the state and the key of the epoch's
        updates."""
        key, loop_key = jax.random.split(state.key)
        return state.replace(online=state.online.add_batch(transitions), key=key), loop_key

    def train(state: OnlineState, offline: dict, loop_key, first, last):
        """Updates first..last-1 of an epoch (update i draws fold_in(loop_key, i)) in one
        compiled loop; the bounds are traced, so every chunk and the longer first epoch share one
        program. Returns the state and the updates' summed metrics."""
        _, zero_metrics = jax.eval_shape(update, state, offline, loop_key)
        zero_metrics = jax.tree_util.tree_map(lambda m: jnp.zeros(m.shape, m.dtype), zero_metrics)

        def body(i, carry):
            state, totals = carry
            state, metrics = update(state, offline, jax.random.fold_in(loop_key, i))
            return state, jax.tree_util.tree_map(jnp.add, totals, metrics)

        return jax.lax.fori_loop(first, last, body, (state, zero_metrics))

    insert, train = jax.jit(insert, donate_argnums=0), jax.jit(train, donate_argnums=0)

    def insert_and_train(state, offline: dict, transitions: dict, num_updates, on_progress=None):
        """One epoch: add its transitions, then `num_updates` updates, UPDATES_PER_CALL per
        compiled call so that a progress bar moves between calls (`on_progress(n)` after each,
        once its updates are done); the split does not change the updates. Returns the state
        and the updates' mean metrics."""
        num_updates = int(num_updates)
        state, loop_key = insert(state, transitions)
        totals = None
        for first in range(0, num_updates, UPDATES_PER_CALL):
            last = min(first + UPDATES_PER_CALL, num_updates)
            state, sums = train(state, offline, loop_key, jnp.int32(first), jnp.int32(last))
            totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
            if on_progress is not None:
                jax.block_until_ready(sums)
                on_progress(last - first)
        return state, jax.tree_util.tree_map(lambda t: t / num_updates, totals)

    return insert_and_train, policy_dist


def create_online_state(args, members: CQLMember, policy_params, obs_dim, action_dim, key):
    independent = args.no_distill or args.ensemble_size == 1
    example = {
        "observations": jnp.zeros(obs_dim),
        "actions": jnp.zeros(action_dim),
        "rewards": jnp.float32(0),
        "next_observations": jnp.zeros(obs_dim),
        "terminals": jnp.float32(0),
        "timeouts": jnp.float32(0),
    }
    num_alphas = args.ensemble_size if independent else 1
    return OnlineState(
        policy=TrainState.create(
            apply_fn=None, params=policy_params, tx=optax.adam(args.policy_lr)
        ),
        critic=TrainState.create(
            apply_fn=None, params=members.critic.params, tx=optax.adam(args.q_lr)
        ),
        critic_target=jax.tree_util.tree_map(jnp.copy, members.critic.params),
        log_alpha=TrainState.create(
            apply_fn=None,
            params={"v": jnp.full(num_alphas, math.log(args.init_alpha), jnp.float32)},
            tx=optax.adam(args.alpha_lr),
        ),
        online=ReplayBuffer.create(example, args.online_buffer_size),
        key=key,
        env_steps=jnp.int32(0),
    )


# ================================================================================================
# Main: offline phase, distillation, online phase
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
    obs_dim, action_dim = offline["observations"].shape[1], offline["actions"].shape[1]
    networks = 2 * args.ensemble_size * (1 + 3 * args.cql_n_actions)  # CQL's action sets
    lifecycle.check_batch_fits(args, data.info.num_transitions, networks, obs_dim + action_dim)
    independent = args.no_distill or args.ensemble_size == 1

    actor = TanhGaussianPolicy(action_dim, args.hidden_dims)
    critic = Critic(args.hidden_dims)
    key = jax.random.PRNGKey(args.seed)
    key, members_key, distill_key, online_key = jax.random.split(key, 4)
    members = create_cql_members(args, actor, critic, obs_dim, action_dim, members_key)

    ensemble_action = jax.jit(lambda p, o: jnp.tanh(distillation_targets(actor, p, o)[0]))
    single_action = jax.jit(lambda p, o: jnp.tanh(actor.apply(p, o)[0]))

    def eval_policy(params, seed, ensemble=True):
        fn = ensemble_action if ensemble else single_action
        return evaluate(env_name, lambda obs: fn(params, obs), args.eval_episodes, seed)

    if args.offline_checkpoint:  # before the run directory exists: a wrong file writes nothing
        members = load_offline_ensemble(
            args.offline_checkpoint, members, args.env, obs_dim, action_dim
        )
        print(f"offline ensemble loaded from {args.offline_checkpoint}")
        if note := pretrained_data_note(args.offline_checkpoint, data.transitions):
            print(note)

    # ---------------------------------------------------------------- offline phase
    run = lifecycle.open_run(args, "bred")
    progress, distilled_path = run.progress, run.dir / "distilled.npz"
    if args.offline_checkpoint or run.offline_done:
        if not args.offline_checkpoint:
            members = load_offline_ensemble(
                run.offline_path, members, args.env, obs_dim, action_dim
            )
            print(f"offline ensemble loaded from {run.offline_path}")
    else:
        if run.resumed:
            (members, key), progress = load_checkpoint(run.checkpoint_path, (members, key))
            print(f"resumed offline phase at step {progress['offline_step']}")
        cql_update = make_cql_update(args, actor, critic, action_dim)
        members, key = pretrain_cql_ensemble(
            args, members, key, offline, cql_update, run, eval_policy, progress["offline_step"]
        )
        offline_meta = {"algorithm": CQL_ENSEMBLE, "env": args.env, "obs_dim": obs_dim,
                        "action_dim": action_dim, "offline_steps": args.offline_steps}  # fmt: skip
        save_checkpoint(run.offline_path, (members, key), offline_meta)
    if not run.offline_done:
        progress = {"phase": "online", "env_steps": 0}

    # ---------------------------------------------------------------- distillation
    summary = {"dataset": data.info.minari_id, "dataset_sha256": data.info.transitions_sha256}
    if independent:
        policy_params = members.actor.params
        before = eval_policy(policy_params, args.seed + 10**6)
    else:
        template = members.actor.params
        single = jax.tree_util.tree_map(lambda x: x[0], template)
        if run.resumed and distilled_path.exists():
            (policy_params, _), meta = load_checkpoint(distilled_path, (single, key))
        else:
            policy_params, meta = distill(
                args, actor, members.actor.params, offline["observations"], distill_key,
                run.logger, args.offline_steps,
            )  # fmt: skip
            save_checkpoint(distilled_path, (policy_params, key), meta)
        summary["distillation"] = meta
        ensemble_before = eval_policy(members.actor.params, args.seed + 10**6)
        before = eval_policy(policy_params, args.seed + 10**6, ensemble=False)
        summary["normalized_score_ensemble_before_distillation"] = ensemble_before.mean_normalized
        print(
            f"ensemble before distillation: normalized score {ensemble_before.mean_normalized:.1f}"
        )
    print(f"after offline pretraining: normalized score {before.mean_normalized:.1f}")

    # ---------------------------------------------------------------- online phase
    state = create_online_state(args, members, policy_params, obs_dim, action_dim, online_key)
    env = OnlineEnv(env_name, args.seed)
    if run.resumed and progress.get("env_steps", 0) > 0:
        state, progress = load_checkpoint(run.checkpoint_path, state)
        env.load_state_dict(progress["env"])
        print(f"resumed online phase at env step {progress['env_steps']}")
    insert_and_train, policy_dist = make_online_update(args, actor, critic, action_dim)
    explore = jax.jit(lambda p, o, k: policy_dist(p, o[None]).sample(seed=k)[0])
    evaluate_online = lambda params, seed: eval_policy(params, seed, ensemble=independent)  # noqa: E731

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
        run.log_eval(global_step, evaluate_online(state.policy.params, args.seed + epoch), bar)

        step_keys = np.asarray(
            jax.random.split(jax.random.fold_in(state.key, epoch), args.steps_per_epoch)
        )
        transitions = []
        for t in range(args.steps_per_epoch):
            transition, finished = env.step(
                np.asarray(explore(state.policy.params, env.obs, step_keys[t]))
            )
            transitions.append(transition)
            if finished:
                run.logger.log(global_step + t + 1, finished, prefix="train/")
        batch = {k: jnp.asarray(np.stack([tr[k] for tr in transitions])) for k in TRANSITION_KEYS}
        # Eq. (7)'s t counts the online samples collected so far (this epoch's included).
        state = state.replace(env_steps=state.env_steps + args.steps_per_epoch)
        state, metrics = insert_and_train(state, offline, batch, updates_in(epoch), bar.update)
        env_steps += args.steps_per_epoch
        run.logger.log(global_step + args.steps_per_epoch, metrics, prefix="online/")
        if env_steps % args.checkpoint_every == 0 or env_steps == args.online_steps:
            progress = {"phase": "online", "env_steps": env_steps, "env": env.state_dict()}
            run.save(state, progress, global_step + args.steps_per_epoch, args.stop_after)

    bar.close()
    after = evaluate_online(state.policy.params, args.seed + 2 * 10**6)
    return run.finish(args, before, after, **summary)


if __name__ == "__main__":
    lifecycle.cli(main, Args)
