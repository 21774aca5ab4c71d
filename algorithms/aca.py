"""Actor-critic alignment (ACA): SAC+ML pretraining, alignment, ACA fine-tuning.

Yu, Zhang. "Actor-Critic Alignment for Offline-to-Online Reinforcement Learning", ICML 2023.
Documentation: docs/aca.md.

Offline (Algorithm 1): SAC+ML, twin critics with the SAC target (Eq. 5), temperature (Eq. 6),
the actor loss of Eq. (4) with lambda = w / mean|Q|, w = 30, and two baselines Z(s) fitted by the
semi-gradient regression of Eq. (8)-(9). Alignment (Algorithm 2), the paper's contribution,
`align_critic`: the online critics R(s, a) take Z's weights, action columns zeroed, so R = Z;
pi_0 is the frozen offline actor. Online (Algorithm 3): Q(s, a) = k CLIP_beta(log pi_0(a|s)) +
R(s, a) (Eq. 12-13, 19), SAC updates (Eq. 20-22) once per env step, k decaying linearly, the
buffer seeded with the top-N offline trajectories. Per-dataset beta, k and top-N: Table 10.
`--finetune sac | bc-only | r-init-q`: SAC -> SAC and the Appendix D.1 ablations;
`--offline-algo cql` (Sec. 6.3); `--offline-data none` (Sec. 6.4).

Choices where the paper is silent (reasons and evidence: docs/aca.md):
- Eq. (8)'s target keeps -alpha log pi(a'|s') (the authors' code; the paper prints it without).
- lambda of Eq. (4) uses mean|min Q| at the policy's actions (d3rlpy's TD3+BC).
- Online optimisers start fresh; ACA's actor gradient norm is clipped to 0.25.
- The temperature loss is the standard one on log alpha; target entropy -|A| (Table 11).
- The k schedule is the authors' code: k drops by k0 / (K 1000) per gradient step.
- Log densities come from the pre-tanh sample (exact where the action saturates).
- CQL: fixed weight 10, 10 sampled actions, no Lagrange tuning (Table 9).
- Evaluation every 5000 offline and 1000 online steps.
- `--no-offline-backup-entropy` (ours, not the paper's default) drops -alpha log pi(a'|s') from
  every offline backup (Eq. 5 and Eq. 8): without it SAC+ML collapses offline on our
  halfcheetah-medium (docs/aca.md).
- Online diagnostics (ours): `pi0_log_std`, `grad_r` = E|dR/da| and `grad_prior` =
  k E|d CLIP(log pi_0)/da| at the policy's actions.

Usage:
    python algorithms/aca.py --env hopper-medium-v2
    python algorithms/aca.py --env walker2d-medium-v2 \
        --offline-checkpoint walker2d-medium-v2/sacml_500k --finetune sac  # a committed agent
    python algorithms/aca.py --env hopper-expert-v2 --offline-data none
"""

import dataclasses
import math
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
    load_checkpoint,
    load_offline_agent,
    save_checkpoint,
)
from common.datasets import TRANSITION_KEYS, load_d4rl, parse_name
from common.envs import OnlineEnv
from common.evaluation import evaluate
from common.networks import Critic, TanhGaussianPolicy, ValueNet

# Table 10 / the authors' code: beta, (k0, K, k_min), top-N trajectories, per dataset level.
ACA_DEFAULTS = {
    "random": {"beta": 7.0, "k": (1.0, 10.0, 0.0), "top_n": 0},
    "medium": {"beta": 7.0, "k": (1.0, 40.0, 0.5), "top_n": 0},
    "medium-replay": {"beta": 7.0, "k": (1.0, 40.0, 0.5), "top_n": 50},
    "medium-expert": {"beta": 15.0, "k": (1.0, 100.0, 1.0), "top_n": 50},
    "expert": {"beta": 15.0, "k": (1.0, 100.0, 1.0), "top_n": 50},
}


@dataclasses.dataclass
class Args(lifecycle.RunFlags):
    env: str = "hopper-medium-v2"
    """D4RL dataset name; the online phase runs its gymnasium v5 environment"""
    seed: flags.Seed = 0
    """seed of everything (parameters, sampling, environments)"""
    hidden_dims: flags.Widths = (256, 256)
    """hidden layers of the policy, critics and Z baselines (ReLU)"""
    batch_size: flags.Count = 256
    """minibatch size of every gradient step"""
    gamma: flags.Discount = 0.99
    """discount factor"""
    tau: flags.PolyakRate = 5e-3
    """Polyak rate of the target critics"""

    offline_algo: Literal["sacml", "cql"] = "sacml"
    """offline learner: SAC+ML (Eq. 4-6) or CQL(H) (Sec. 6.3)"""
    offline_steps: flags.Steps = 500_000
    """offline gradient steps (paper: 500 episodes x 1000)"""
    offline_checkpoint: flags.CheckpointPath = None
    """a saved offline agent (a run's `offline.npz`) or a committed one by name, e.g.
    hopper-medium-v2/sacml_500k (pretrained/README.md): skip pretraining"""
    offline_actor_lr: flags.LearningRate | None = None
    """offline policy lr (default 3e-4 for SAC+ML, 1e-4 for CQL, Table 11)"""
    offline_alpha_lr: flags.LearningRate | None = None
    """offline temperature lr (default 3e-4 for SAC+ML, 1e-4 for CQL)"""
    critic_lr: flags.LearningRate = 3e-4
    """offline Q lr"""
    z_lr: flags.LearningRate = 3e-4
    """lr of the Z baselines (Eq. 8)"""
    ml_weight: flags.NonNegative = 30.0
    """w of Eq. (4): lambda = w / mean|Q|"""
    offline_backup_entropy: bool = True
    """keep -alpha log pi(a'|s') in the offline backups: the critics' target (Eq. 5, SAC) and
    Z's (Eq. 8, authors' code); off: neither has it (CQL code's backup_entropy=False), see
    docs/aca.md on halfcheetah-medium"""
    cql_weight: flags.NonNegative = 10.0
    """CQL conservative weight (Table 9)"""
    cql_n_actions: flags.Count = 10
    """actions sampled per state for CQL's log-sum-exp (Table 9)"""
    offline_eval_every: flags.Count = 5_000
    """offline gradient steps between evaluations"""
    log_every: flags.Count = 1_000
    """offline steps compiled into one call and logged together; online steps between logs"""

    finetune: Literal["aca", "sac", "bc-only", "r-init-q"] = "aca"
    """online method: ACA, SAC->SAC, or the Appendix D.1 ablations"""
    online_steps: flags.Steps = 100_000
    """environment steps of fine-tuning, one update each (paper: 100k)"""
    offline_data: Literal["auto", "topn", "all", "none"] = "auto"
    """initial buffer: top-N offline trajectories, all offline data, or empty (Sec. 6.4); auto:
    topn for the ACA variants, all for SAC->SAC (Appendix E.1)"""
    top_n: flags.Count | None = None
    """trajectories pre-loaded with --offline-data topn (default: per dataset, Table 10)"""
    beta: flags.NonNegative | None = None
    """beta of the clip (Eq. 12-13) (default: per dataset, Table 10)"""
    k_init: flags.NonNegative | None = None
    """k0 of the critic interpolation (Eq. 19) (default: per dataset)"""
    k_decay_episodes: flags.Positive | None = None
    """K: k falls by k0 / (K x 1000) per gradient step (default: per dataset)"""
    k_min: flags.NonNegative | None = None
    """floor of k (default: per dataset)"""
    online_lr: flags.LearningRate = 3e-4
    """online actor, critic and temperature lr"""
    actor_grad_clip: flags.NonNegative = 0.25
    """global-norm clip of the online actor gradient (ACA variants; 0 disables)"""
    buffer_size: flags.Count = 1_000_000
    """online replay capacity (FIFO)"""
    eval_every: flags.Count = 1_000
    """online env steps between evaluations"""
    eval_episodes: flags.Count = 10
    """deterministic evaluation episodes"""
    checkpoint_every: flags.Count = 10_000
    """steps (offline gradient steps, online env steps) between full checkpoints"""


@dataclasses.dataclass(frozen=True)
class OnlineSettings:
    beta: float
    k_init: float
    k_decay_episodes: float
    k_min: float
    offline_data: str
    top_n: int


def online_settings(args: Args, split: str) -> OnlineSettings:
    """The per-dataset defaults of Table 10, overridden by any flag the user gave."""
    base = ACA_DEFAULTS[split]
    offline_data = args.offline_data
    if offline_data == "auto":
        offline_data = "all" if args.finetune == "sac" else "topn"
    beta = base["beta"]
    if offline_data == "none" and split in ("medium-replay", "medium-expert", "expert"):
        beta *= 1.5  # Appendix C.4: more conservative without offline data
    k0, big_k, k_min = base["k"]
    pick = lambda flag, default: default if flag is None else flag  # noqa: E731
    return OnlineSettings(
        beta=pick(args.beta, beta),
        k_init=pick(args.k_init, k0),
        k_decay_episodes=pick(args.k_decay_episodes, big_k),
        k_min=pick(args.k_min, k_min),
        offline_data=offline_data,
        top_n=pick(args.top_n, base["top_n"]),
    )


# ================================================================================================
# Tanh-Gaussian densities from the pre-tanh sample, beta-clipping, k schedule
# ================================================================================================


def squashed_log_prob(u, mean, log_std):
    """log pi(tanh(u)|s) of the tanh-Gaussian with pre-tanh (mean, log_std), from the pre-tanh
    value u: log N(u; mean, std) - sum log(1 - tanh(u)^2), the correction written stably as
    2 (log 2 - u - softplus(-2u)). [..., A] -> [...]."""
    z = (u - mean) * jnp.exp(-log_std)
    gauss = -0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)
    log_det = 2.0 * (math.log(2.0) - u - jax.nn.softplus(-2.0 * u))
    return (gauss - log_det).sum(-1)


def sample_pre_tanh(mean, log_std, key, sample_shape=()):
    """u ~ N(mean, std) (reparameterised); the action is tanh(u)."""
    eps = jax.random.normal(key, (*sample_shape, *mean.shape))
    return mean + jnp.exp(log_std) * eps


def pre_tanh(actions):
    """atanh of dataset actions, clipped inside (-1, 1) so boundary actions stay finite."""
    return jnp.arctanh(jnp.clip(actions, -1 + 1e-6, 1 - 1e-6))


def beta_clip_point(mean, log_std, beta):
    """Eq. (13): C_beta(s) = min(log pi_0(mu - beta sigma | s), log pi_0(mu + beta sigma | s))."""
    std = jnp.exp(log_std)
    low = squashed_log_prob(mean - beta * std, mean, log_std)
    high = squashed_log_prob(mean + beta * std, mean, log_std)
    return jnp.minimum(low, high)


def beta_clip(log_pi0, clip_at):
    """Eq. (12): CLIP_beta(log pi_0) = softplus(log pi_0 - C_beta) + C_beta, a smooth lower clip
    at C_beta (values well above it are unchanged, those below end in [C, C + log 2])."""
    return jax.nn.softplus(log_pi0 - clip_at) + clip_at


def k_schedule(step, k_init, k_decay_episodes, k_min):
    """Critic interpolation weight after `step` gradient steps of k <- max(k - k0/(K 1000), k_min)
    (Appendix A.2.2, the authors' decay), in closed form."""
    return jnp.maximum(k_init - step * k_init / (k_decay_episodes * 1000.0), k_min)


# ================================================================================================
# Offline phase: SAC+ML (or CQL) with the Z baselines (Algorithm 1)
# ================================================================================================


def twin(net, params, *inputs):
    """Both members of a twin pair: params [2, ...] -> outputs [2, ...]."""
    return jax.vmap(net.apply, in_axes=(0, *[None] * len(inputs)))(params, *inputs)


@struct.dataclass
class OfflineState:
    actor: TrainState
    critic: TrainState  # twin Q_mu: leading axis 2
    critic_target: dict
    log_alpha: TrainState
    baseline: TrainState  # twin Z_psi: leading axis 2
    key: jax.Array


def create_offline_state(args: Args, actor, critic, baseline, obs_dim, action_dim, key):
    actor_key, critic_key, z_key, key = jax.random.split(key, 4)
    obs, act = jnp.zeros((1, obs_dim)), jnp.zeros((1, action_dim))
    cql = args.offline_algo == "cql"
    actor_lr = args.offline_actor_lr or (1e-4 if cql else 3e-4)
    alpha_lr = args.offline_alpha_lr or (1e-4 if cql else 3e-4)
    critic_params = jax.vmap(lambda k: critic.init(k, obs, act))(jax.random.split(critic_key))
    z_params = jax.vmap(lambda k: baseline.init(k, obs))(jax.random.split(z_key))
    return OfflineState(
        actor=TrainState.create(
            apply_fn=None, params=actor.init(actor_key, obs), tx=optax.adam(actor_lr)
        ),
        critic=TrainState.create(
            apply_fn=None, params=critic_params, tx=optax.adam(args.critic_lr)
        ),
        critic_target=jax.tree_util.tree_map(jnp.copy, critic_params),
        log_alpha=TrainState.create(
            apply_fn=None, params={"v": jnp.float32(0.0)}, tx=optax.adam(alpha_lr)
        ),
        baseline=TrainState.create(apply_fn=None, params=z_params, tx=optax.adam(args.z_lr)),
        key=key,
    )


def temperature_loss(log_alpha, log_pi, target_entropy):
    """Eq. (6) on log alpha: -log alpha E[log pi(a|s) + target entropy] (no gradient through
    log pi), so its gradient does not shrink with alpha (see the header)."""
    return -(log_alpha * jax.lax.stop_gradient(log_pi + target_entropy)).mean()


def ml_actor_loss(log_prob_data, q_pi, log_pi, alpha, weight):
    """Eq. (4): E[-log pi(a|s) - lambda (Q(s,b) - alpha log pi(b|s))], lambda = w / mean|Q(s,b)|
    carrying no gradient. Returns (loss, lambda)."""
    lam = weight / jax.lax.stop_gradient(jnp.abs(q_pi).mean())
    return (-log_prob_data).mean() + lam * (alpha * log_pi - q_pi).mean(), lam


def baseline_target(rewards, terminals, log_pi_next, z_next, alpha, gamma):
    """y of Eq. (8)-(9) as in the authors' code: r + gamma (1-d) [log pi(a'|s') + min_i Z_i(s')
    - alpha log pi(a'|s')]. z_next [2, B] (no target network)."""
    return rewards + gamma * (1 - terminals) * (log_pi_next + z_next.min(0) - alpha * log_pi_next)


def baseline_loss(z, log_pi_data, target):
    """Eq. (8): sum_i E[(log pi(a|s) + Z_i(s) - y)^2], semi-gradient (y held fixed)."""
    return ((log_pi_data[None] + z - jax.lax.stop_gradient(target)[None]) ** 2).mean(-1).sum()


# The CQL(H) regulariser, identical to the one in off2on_balanced.py / bred.py (a test checks).
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


def make_offline_update(args: Args, actor, critic, baseline, action_dim: int):
    """(state, batch) -> (state, metrics): one step of Algorithm 1 (alpha, critics, actor, Z)."""
    target_entropy = -float(action_dim)
    cql, n = args.offline_algo == "cql", args.cql_n_actions

    def update(state: OfflineState, batch: dict):
        key, k_alpha, k_next, k_pi, k_rand, k_curr, k_cnext = jax.random.split(state.key, 7)
        obs, actions, next_obs = batch["observations"], batch["actions"], batch["next_observations"]
        mean, log_std = actor.apply(state.actor.params, obs)
        next_mean, next_log_std = actor.apply(state.actor.params, next_obs)

        # Temperature, Eq. (6).
        logp = squashed_log_prob(sample_pre_tanh(mean, log_std, k_alpha), mean, log_std)
        alpha_grads = jax.grad(lambda p: temperature_loss(p["v"], logp, target_entropy))(
            state.log_alpha.params
        )
        log_alpha = state.log_alpha.apply_gradients(grads=alpha_grads)
        alpha = jnp.exp(log_alpha.params["v"])

        # Critics, Eq. (5): clipped double-Q soft target (plus the CQL gap with --offline-algo cql).
        u_next = sample_pre_tanh(next_mean, next_log_std, k_next)
        logp_next = squashed_log_prob(u_next, next_mean, next_log_std)
        next_q = twin(critic, state.critic_target, next_obs, jnp.tanh(u_next)).min(0)
        entropy_bonus = -alpha * logp_next if args.offline_backup_entropy else 0.0
        target = jax.lax.stop_gradient(
            batch["rewards"] + args.gamma * (1 - batch["terminals"]) * (next_q + entropy_bonus)
        )
        if cql:  # 3n extra action sets at the batch states: uniform, pi(.|s), pi(.|s')
            u_curr = sample_pre_tanh(mean, log_std, k_curr, (n,))
            u_cnext = sample_pre_tanh(next_mean, next_log_std, k_cnext, (n,))
            rand = jax.random.uniform(k_rand, (n, *actions.shape), minval=-1, maxval=1)
            all_actions = jnp.concatenate(
                [actions[None], rand, jnp.tanh(u_curr), jnp.tanh(u_cnext)]
            )
            logp_curr = squashed_log_prob(u_curr, mean, log_std)
            logp_cnext = squashed_log_prob(u_cnext, next_mean, next_log_std)
            all_actions, logp_curr, logp_cnext = jax.lax.stop_gradient(
                (all_actions, logp_curr, logp_cnext)
            )
        else:
            all_actions = actions[None]

        def critic_loss_fn(params):
            all_obs = jnp.broadcast_to(obs, (all_actions.shape[0], *obs.shape))
            q_all = twin(critic, params, all_obs, all_actions)  # [2, 1 (+3n), B]
            q = q_all[:, 0]
            loss = ((q - target[None]) ** 2).mean(-1).sum()
            gap = jnp.zeros(2)
            if cql:
                gap = cql_regularizer(
                    q, q_all[:, 1 : n + 1], q_all[:, n + 1 : 2 * n + 1], q_all[:, 2 * n + 1 :],
                    logp_curr, logp_cnext, action_dim, 1.0,
                )  # fmt: skip
                loss = loss + args.cql_weight * gap.sum()
            return loss, (q, gap)

        (critic_loss, (q, gap)), grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(
            state.critic.params
        )
        critic_state = state.critic.apply_gradients(grads=grads)

        # Actor, Eq. (4) (SAC+ML) or the SAC actor loss (CQL).
        def actor_loss_fn(params):
            mean, log_std = actor.apply(params, obs)
            u = sample_pre_tanh(mean, log_std, k_pi)
            log_pi = squashed_log_prob(u, mean, log_std)
            q_pi = twin(critic, critic_state.params, obs, jnp.tanh(u)).min(0)
            nll = -squashed_log_prob(pre_tanh(actions), mean, log_std)
            if cql:
                return (alpha * log_pi - q_pi).mean(), (log_pi, nll, jnp.float32(1.0))
            loss, lam = ml_actor_loss(-nll, q_pi, log_pi, alpha, args.ml_weight)
            return loss, (log_pi, nll, lam)

        (actor_loss, (log_pi, nll, lam)), grads = jax.value_and_grad(actor_loss_fn, has_aux=True)(
            state.actor.params
        )
        actor_state = state.actor.apply_gradients(grads=grads)

        # Baselines Z, Eq. (8)-(9), on the current policy's log-densities (with CQL, log pi is
        # clipped at 0 from below, Sec. 6.3).
        log_pi_data = squashed_log_prob(pre_tanh(actions), mean, log_std)
        log_pi_next = logp_next
        if cql:
            log_pi_data, log_pi_next = jnp.maximum(log_pi_data, 0.0), jnp.maximum(logp_next, 0.0)
        # --no-offline-backup-entropy drops the bonus from every offline backup, Z's too (Eq. 8
        # as printed); else Z's target and the critics' would use different temperatures.
        z_alpha = alpha if args.offline_backup_entropy else 0.0
        z_next = twin(baseline, state.baseline.params, next_obs)
        y = baseline_target(
            batch["rewards"], batch["terminals"], log_pi_next, z_next, z_alpha, args.gamma
        )

        def z_loss_fn(params):
            z = twin(baseline, params, obs)  # [2, B]
            return baseline_loss(z, jax.lax.stop_gradient(log_pi_data), y), z

        (z_loss, z), grads = jax.value_and_grad(z_loss_fn, has_aux=True)(state.baseline.params)
        baseline_state = state.baseline.apply_gradients(grads=grads)

        metrics = {
            "critic_loss": critic_loss,
            "actor_loss": actor_loss,
            "nll": nll.mean(),  # -log pi(a_data|s), the ML term
            "lambda": lam,
            "alpha": alpha,
            "entropy": -log_pi.mean(),
            "q_mean": q.mean(),
            "z_loss": z_loss,
            "z_mean": z.mean(),
            "cql_gap": gap.mean(),
        }
        state = OfflineState(
            actor=actor_state,
            critic=critic_state,
            critic_target=optax.incremental_update(
                critic_state.params, state.critic_target, args.tau
            ),
            log_alpha=log_alpha,
            baseline=baseline_state,
            key=key,
        )
        return state, metrics

    return update


def make_offline_chunk(args: Args, actor, critic, baseline, action_dim: int):
    """jit (state, dataset) -> (state, mean metrics): args.log_every offline updates, each on a
    uniform minibatch of the dataset (one lax.scan)."""
    update = make_offline_update(args, actor, critic, baseline, action_dim)

    @jax.jit
    def chunk(state, data):
        def body(state, _):
            key, batch_key = jax.random.split(state.key)
            idx = jax.random.randint(batch_key, (args.batch_size,), 0, data["rewards"].shape[0])
            batch = jax.tree_util.tree_map(lambda x: x[idx], data)
            return update(state.replace(key=key), batch)

        state, metrics = jax.lax.scan(body, state, None, length=args.log_every)
        return state, jax.tree_util.tree_map(jnp.mean, metrics)

    return chunk


# ================================================================================================
# Alignment (Algorithm 2) and the online phase (Algorithm 3)
# ================================================================================================


def align_critic(z_params, obs_dim: int, action_dim: int):
    """Algorithm 2: critic parameters R(s,a) equal to Z(s) for every action: Z's weights, with
    zero first-layer rows for the action inputs (the critic reads concat[obs, action])."""

    def widen(kernel):  # [..., obs_dim, width] -> [..., obs_dim + action_dim, width]
        zeros = jnp.zeros((*kernel.shape[:-2], action_dim, kernel.shape[-1]), kernel.dtype)
        return jnp.concatenate([kernel, zeros], axis=-2)

    params = jax.tree_util.tree_map(jnp.copy, z_params)
    first = params["params"]["MLP_0"]["Dense_0"]
    assert first["kernel"].shape[-2] == obs_dim, "Z's first layer must read the observation"
    first["kernel"] = widen(first["kernel"])
    return params


@struct.dataclass
class OnlineState:
    actor: TrainState
    actor_0: dict  # the frozen offline policy pi_0
    critic: TrainState  # twin R_phi (or Q for sac/bc-only): leading axis 2
    critic_target: dict
    log_alpha: TrainState
    buffer: ReplayBuffer
    key: jax.Array
    step: jax.Array  # online gradient steps taken (drives k)


def create_online_state(args: Args, offline: OfflineState, obs_dim, action_dim, buffer, key):
    """Alignment (Algorithm 2) for the ACA variants; SAC -> SAC keeps the offline agent."""
    aca_critic = args.finetune == "aca"
    critic_params = (
        align_critic(offline.baseline.params, obs_dim, action_dim)
        if aca_critic
        else offline.critic.params
    )
    copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)  # noqa: E731 - own buffers (donation)
    if args.finetune == "sac":
        critic_target, log_alpha, actor_tx = offline.critic_target, offline.log_alpha.params, None
    else:  # reset the temperature to 1 (Algorithm 2)
        critic_target, log_alpha = critic_params, {"v": jnp.float32(0.0)}
        actor_tx = optax.clip_by_global_norm(args.actor_grad_clip) if args.actor_grad_clip else None
    adam = optax.adam(args.online_lr)
    return OnlineState(
        actor=TrainState.create(
            apply_fn=None,
            params=copy(offline.actor.params),
            tx=optax.chain(actor_tx, adam) if actor_tx else adam,
        ),
        actor_0=copy(offline.actor.params),
        critic=TrainState.create(apply_fn=None, params=copy(critic_params), tx=adam),
        critic_target=copy(critic_target),
        log_alpha=TrainState.create(apply_fn=None, params=copy(log_alpha), tx=adam),
        buffer=buffer,
        key=key,
        step=jnp.int32(0),
    )


def make_online_update(args: Args, settings: OnlineSettings, actor, critic, action_dim: int):
    """(state, batch, key) -> (state, metrics): one update of Algorithm 3 (or of a baseline)."""
    target_entropy = -float(action_dim)
    prior_in_critic = args.finetune in ("aca", "r-init-q")  # Q = k CLIP(log pi_0) + R, Eq. (19)
    prior_in_actor = args.finetune != "sac"

    def clipped_log_pi0(actor_0, obs, u):
        """CLIP_beta(log pi_0(tanh(u)|s)) (Eq. 12-13) and whether the clip is active."""
        mean0, log_std0 = actor.apply(actor_0, obs)
        log_pi0 = squashed_log_prob(u, mean0, log_std0)
        clip_at = beta_clip_point(mean0, log_std0, settings.beta)
        return beta_clip(log_pi0, clip_at), log_pi0 < clip_at

    def update(state: OnlineState, batch: dict, key):
        k_alpha, k_next, k_pi = jax.random.split(key, 3)
        obs, actions, next_obs = batch["observations"], batch["actions"], batch["next_observations"]
        k = k_schedule(
            state.step.astype(jnp.float32), settings.k_init, settings.k_decay_episodes,
            settings.k_min,
        )  # fmt: skip
        mean, log_std = actor.apply(state.actor.params, obs)

        # Temperature, Eq. (6).
        logp = squashed_log_prob(sample_pre_tanh(mean, log_std, k_alpha), mean, log_std)
        alpha_grads = jax.grad(lambda p: temperature_loss(p["v"], logp, target_entropy))(
            state.log_alpha.params
        )
        log_alpha = state.log_alpha.apply_gradients(grads=alpha_grads)
        alpha = jnp.exp(log_alpha.params["v"])

        # Critics, Eq. (21)-(22): y = r + gamma (1-d) [min R_targ(s',a') + k CLIP(log pi_0(a'|s'))
        # - alpha log pi(a'|s')], and Q_i(s,a) = k CLIP(log pi_0(a|s)) + R_i(s,a).
        next_mean, next_log_std = actor.apply(state.actor.params, next_obs)
        u_next = sample_pre_tanh(next_mean, next_log_std, k_next)
        logp_next = squashed_log_prob(u_next, next_mean, next_log_std)
        next_q = twin(critic, state.critic_target, next_obs, jnp.tanh(u_next)).min(0)
        prior_data = jnp.zeros_like(batch["rewards"])
        if prior_in_critic:
            next_q = next_q + k * clipped_log_pi0(state.actor_0, next_obs, u_next)[0]
            prior_data = k * clipped_log_pi0(state.actor_0, obs, pre_tanh(actions))[0]
        target = jax.lax.stop_gradient(
            batch["rewards"] + args.gamma * (1 - batch["terminals"]) * (next_q - alpha * logp_next)
        )

        def critic_loss_fn(params):
            r = twin(critic, params, obs, actions)  # [2, B]
            return (((prior_data[None] + r) - target[None]) ** 2).mean(-1).sum(), r

        (critic_loss, r), grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(
            state.critic.params
        )
        critic_state = state.critic.apply_gradients(grads=grads)

        # Diagnostics: the pull of R and of the prior k CLIP(log pi_0) on the policy's actions
        # (d/da; the prior through u = atanh(a), du/da = 1 / (1 - a^2)), and pi_0's sharpness.
        u_pi = sample_pre_tanh(mean, log_std, k_pi)
        grad_r = jax.grad(lambda a: twin(critic, critic_state.params, obs, a).min(0).sum())(
            jnp.tanh(u_pi)
        )
        grad_prior = jax.grad(lambda u: clipped_log_pi0(state.actor_0, obs, u)[0].sum())(u_pi)
        grad_prior = grad_prior / jnp.maximum(1.0 - jnp.tanh(u_pi) ** 2, 1e-6)
        pi0_log_std = actor.apply(state.actor_0, obs)[1]

        # Actor, Eq. (20): E[alpha log pi(b|s) - (min R(s,b) + k CLIP(log pi_0(b|s)))].
        def actor_loss_fn(params):
            mean, log_std = actor.apply(params, obs)
            u = sample_pre_tanh(mean, log_std, k_pi)
            log_pi = squashed_log_prob(u, mean, log_std)
            q_pi = twin(critic, critic_state.params, obs, jnp.tanh(u)).min(0)
            prior, clipped = jnp.zeros_like(log_pi), jnp.zeros_like(log_pi, bool)
            if prior_in_actor:
                prior, clipped = clipped_log_pi0(state.actor_0, obs, u)
                q_pi = q_pi + k * prior
            return (alpha * log_pi - q_pi).mean(), (log_pi, prior, clipped)

        (actor_loss, (log_pi, prior, clipped)), grads = jax.value_and_grad(
            actor_loss_fn, has_aux=True
        )(state.actor.params)
        actor_state = state.actor.apply_gradients(grads=grads)

        metrics = {
            "updated": jnp.float32(1.0),  # 0 on env steps before the buffer holds a batch
            "critic_loss": critic_loss,
            "actor_loss": actor_loss,
            "actor_grad_norm": optax.global_norm(grads),  # before the clip
            "alpha": alpha,
            "entropy": -log_pi.mean(),
            "k": k,
            "r_mean": r.mean(),  # R(s,a) at data actions
            "q_mean": (prior_data[None] + r).mean(),  # the full Q(s,a) of Eq. (19)
            "log_pi0": prior.mean(),  # CLIP(log pi_0) at the policy's actions
            "clip_active": clipped.mean(),  # share of those below C_beta(s)
            "pi0_log_std": pi0_log_std.mean(),
            "grad_r": jnp.abs(grad_r).mean(),  # E|dR/da| at the policy's actions
            "grad_prior": k * jnp.abs(grad_prior).mean(),  # k E|d CLIP(log pi_0)/da| there
        }
        state = state.replace(
            actor=actor_state,
            critic=critic_state,
            critic_target=optax.incremental_update(
                critic_state.params, state.critic_target, args.tau
            ),
            log_alpha=log_alpha,
            step=state.step + 1,
        )
        return state, metrics

    return update


def make_env_step(args: Args, settings: OnlineSettings, actor, critic, action_dim: int):
    """One jitted call per env step: store the transition, update once (once the buffer holds a
    batch, as d3rlpy does), and sample the next action from the policy."""
    online_update = make_online_update(args, settings, actor, critic, action_dim)

    def env_step_update(state: OnlineState, transition, next_obs):
        state = state.replace(buffer=state.buffer.add(transition))
        key, batch_key, update_key, act_key = jax.random.split(state.key, 4)
        state = state.replace(key=key)
        batch, _ = state.buffer.sample(batch_key, args.batch_size)
        update = lambda s: online_update(s, batch, update_key)  # noqa: E731
        zeros = jax.tree_util.tree_map(
            lambda m: jnp.zeros(m.shape, m.dtype), jax.eval_shape(update, state)[1]
        )
        state, metrics = jax.lax.cond(
            state.buffer.size >= args.batch_size, update, lambda s: (s, zeros), state
        )
        mean, log_std = actor.apply(state.actor.params, next_obs)
        next_action = jnp.tanh(sample_pre_tanh(mean, log_std, act_key))
        return state, next_action, metrics

    return jax.jit(env_step_update, donate_argnums=0)


def top_trajectories(transitions: dict, episode_ids, episode_returns, n: int) -> dict:
    """The transitions of the n offline episodes with the highest returns (Algorithm 3)."""
    best = np.argsort(-np.asarray(episode_returns), kind="stable")[:n]
    rows = np.flatnonzero(np.isin(np.asarray(episode_ids), best))
    return jax.tree_util.tree_map(lambda x: x[rows], transitions)


# ================================================================================================
# Main
# ================================================================================================


def main(args: Args) -> dict:
    lifecycle.check_args(args)
    _, split = parse_name(args.env)
    settings = online_settings(args, split)
    data = load_d4rl(args.env, allow_generate=not args.no_generate)
    env_name = data.info.env
    offline = {k: data.transitions[k] for k in TRANSITION_KEYS}
    obs_dim, action_dim = offline["observations"].shape[1], offline["actions"].shape[1]
    action_sets = 1 + 3 * args.cql_n_actions if args.offline_algo == "cql" else 1
    lifecycle.check_batch_fits(
        args, data.info.num_transitions, 2 * action_sets, obs_dim + action_dim
    )
    actor = TanhGaussianPolicy(action_dim, args.hidden_dims)
    critic, baseline = Critic(args.hidden_dims), ValueNet(args.hidden_dims)
    key = jax.random.PRNGKey(args.seed)
    key, init_key, online_key = jax.random.split(key, 3)
    state = create_offline_state(args, actor, critic, baseline, obs_dim, action_dim, init_key)
    deterministic = jax.jit(lambda p, o: jnp.tanh(actor.apply(p, o)[0]))
    agent_metadata = {"algorithm": "aca", "env": args.env, "obs_dim": obs_dim,
                      "action_dim": action_dim, "offline_steps": args.offline_steps,
                      "offline_algo": args.offline_algo}  # fmt: skip
    if args.offline_checkpoint:  # before the run directory exists: a wrong file writes nothing
        state, meta = load_offline_agent(
            args.offline_checkpoint, state, "aca", args.env, obs_dim, action_dim
        )
        print(f"offline agent loaded from {args.offline_checkpoint} ({meta.get('offline_algo')})")

    def eval_metrics(params, seed):
        return evaluate(env_name, lambda o: deterministic(params, o), args.eval_episodes, seed)

    run = lifecycle.open_run(args, "aca")
    progress = run.progress

    # ---------------------------------------------------------------- offline: Algorithm 1
    if args.offline_checkpoint:
        pass  # loaded above
    elif run.offline_done:
        state, meta = load_checkpoint(run.offline_path, state)
        print(f"offline agent loaded from {run.offline_path} ({meta.get('offline_algo', '?')})")
    elif args.offline_steps > 0:
        if run.resumed:
            state, progress = load_checkpoint(run.checkpoint_path, state)
            print(f"resumed offline phase at step {progress['offline_step']}")
        offline_chunk = make_offline_chunk(args, actor, critic, baseline, action_dim)
        bar = lifecycle.progress_bar(
            range(progress["offline_step"], args.offline_steps, args.log_every),
            desc=f"offline {args.offline_algo}", unit_scale=args.log_every,
            initial=progress["offline_step"] // args.log_every,
            total=args.offline_steps // args.log_every,
        )  # fmt: skip
        for step in bar:
            state, metrics = offline_chunk(state, offline)
            step += args.log_every
            run.logger.log(step, metrics, prefix="offline/")
            if step % args.offline_eval_every == 0 or step == args.offline_steps:
                run.log_eval(step, eval_metrics(state.actor.params, args.seed + step), bar)
            if step % args.checkpoint_every == 0 or step == args.offline_steps:
                progress = {"phase": "offline", "offline_step": step}
                run.save(state, progress, step, args.stop_after, "offline step")
        save_checkpoint(run.offline_path, state, agent_metadata)
    if not run.offline_done:
        progress = {"phase": "online", "env_steps": 0}
    before = eval_metrics(state.actor.params, args.seed + 10**6)
    print(f"after offline pretraining: normalized score {before.mean_normalized:.1f}")

    # ---------------------------------------------------------------- alignment + online
    example = jax.tree_util.tree_map(lambda x: x[0], offline)
    if settings.offline_data == "none" or (settings.offline_data == "topn" and not settings.top_n):
        buffer = ReplayBuffer.create(example, args.buffer_size)
    else:
        initial = offline
        if settings.offline_data == "topn":
            initial = top_trajectories(
                offline, data.episode_ids, data.episode_returns, settings.top_n
            )
        num = min(jax.tree_util.tree_leaves(initial)[0].shape[0], args.buffer_size)
        buffer = ReplayBuffer.from_data(
            jax.tree_util.tree_map(lambda x: x[-num:], initial), args.buffer_size
        )
    print(
        f"fine-tuning: {args.finetune}, beta {settings.beta:g}, k {settings.k_init:g} -> "
        f"{settings.k_min:g} (K={settings.k_decay_episodes:g}), buffer starts with "
        f"{int(buffer.size)} offline transitions ({settings.offline_data}"
        + (f", top {settings.top_n} episodes)" if settings.offline_data == "topn" else ")")
    )
    online_state_key, first_action_key = jax.random.split(online_key)
    online = create_online_state(args, state, obs_dim, action_dim, buffer, online_state_key)
    env = OnlineEnv(env_name, args.seed)
    if run.resumed and progress["env_steps"] > 0:
        online, progress = load_checkpoint(run.checkpoint_path, online)
        env.load_state_dict(progress["env"])
        action = np.asarray(progress["action"], np.float32)
        print(f"resumed online phase at env step {progress['env_steps']}")
    else:  # the first action: a sample of the pretrained policy
        mean, log_std = actor.apply(online.actor.params, jnp.asarray(env.obs))
        action = np.asarray(jnp.tanh(sample_pre_tanh(mean, log_std, first_action_key)))
    step_fn = make_env_step(args, settings, actor, critic, action_dim)
    start = progress["env_steps"]
    bar = lifecycle.progress_bar(
        range(start, args.online_steps), initial=start, total=args.online_steps,
        desc=f"online {args.finetune}",
    )  # fmt: skip
    window = []  # the metrics since the last log, still on the device
    for step in bar:
        env_steps = step + 1
        global_step = args.offline_steps + env_steps
        transition, finished = env.step(action)
        if finished:
            run.logger.log(global_step, finished, prefix="train/")
        online, action, metrics = step_fn(online, transition, jnp.asarray(env.obs))
        action = np.asarray(action)
        window.append(metrics)
        if env_steps % args.log_every == 0:  # means over the steps that ran an update
            stacked = lifecycle.stack_metrics(window)
            updated = stacked.pop("updated")
            means = {k: (v * updated).sum() / updated.sum() for k, v in stacked.items()}
            if updated.sum() > 0:
                run.logger.log(global_step, means | {"updates": updated.sum()}, prefix="online/")
            window = []
        if env_steps % args.eval_every == 0:
            result = eval_metrics(online.actor.params, args.seed + env_steps)
            run.log_eval(global_step, result, bar)
        if env_steps % args.checkpoint_every == 0 or env_steps == args.online_steps:
            progress = {"phase": "online", "env_steps": env_steps, "env": env.state_dict(),
                        "action": action.tolist()}  # fmt: skip
            run.save(online, progress, global_step, args.stop_after)

    after = eval_metrics(online.actor.params, args.seed + 2 * 10**6)
    return run.finish(
        args, before, after, dataset=data.info.minari_id, finetune=args.finetune,
        offline_algo=args.offline_algo, dataset_sha256=data.info.transitions_sha256,
    )  # fmt: skip


if __name__ == "__main__":
    lifecycle.cli(main, Args)
