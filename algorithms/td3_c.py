"""TD3-BC pretraining, then TD3-C fine-tuning (conservative TD3 with a Lagrangian trust region).

Luo, Kay, Grefenstette, Deisenroth. "Finetuning from Offline Reinforcement Learning: Challenges,
Trade-offs and Practical Solutions", 2023. Documentation: docs/td3_c.md.

Equations: Eq. (1) critic target with target policy smoothing; Eq. (3) TD3-BC actor loss
(lambda = alpha / mean|Q1|, alpha = 2.5); Eq. (4)-(5) the constrained actor step
max Q1(s, pi(s)) s.t. E[(pi(s) - pi_targ(s))^2] <= epsilon as a Lagrangian with a learned dual
(`trust_region_constraint`, `dual_step`, used in `make_update`). `--finetune td3 | td3c | td3bc`:
the paper's TD3, TD3-C and TD3-BC fine-tuning.
Network: Acme's LayerNormMLP (Linear -> LayerNorm -> tanh, then ELU), 256-256.

Deviations and choices (the reasons and the study behind each: docs/td3_c.md):
- Eq. (5) as printed rewards deviation; the standard Lagrangian sign is implemented.
- The dual update is unspecified: projected SGD on lambda (`--dual-lr` 1e3, from 0), the
  reading studies/td3c_dual chose over Adam and MPO's softplus dual.
- The constraint averages (pi - pi_targ)^2 over action dimensions (studies/td3c_dual).
- Targets as in Acme's TD3: target critics step every update, the target actor on actor steps.
- dQ/da clipped elementwise to [-1, 1] for td3c (rlax's dpg loss; the paper's "clipping: yes").
- The actor gradient uses critic 1 only (Acme's TD3).
- `--offline-data init` seeds the online FIFO with the offline data (Acme); `none` starts empty;
  `--offline-ratio R` draws a fixed share offline (Appendix C.1).

Usage:
    python algorithms/td3_c.py --env hopper-medium-v2                       # td3c fine-tuning
    python algorithms/td3_c.py --env hopper-medium-v2 --finetune td3
    python algorithms/td3_c.py --env walker2d-medium-v2 \
        --offline-checkpoint walker2d-medium-v2/td3bc_500k                  # a committed agent
"""

import dataclasses
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
from common.datasets import TRANSITION_KEYS, load_d4rl
from common.envs import OnlineEnv
from common.evaluation import evaluate
from common.networks import Critic, DeterministicActor


@dataclasses.dataclass
class Args(lifecycle.RunFlags):
    env: str = "hopper-medium-v2"
    """D4RL dataset name; the online phase runs its gymnasium v5 environment"""
    seed: flags.Seed = 0
    """seed of everything (parameters, sampling, environments)"""
    hidden_dims: flags.Widths = (256, 256)
    """hidden layer widths of the actor and critics"""
    layer_norm: bool = True
    """the paper's LayerNorm network (Linear-LayerNorm-tanh, then ELU); False: plain ReLU MLPs"""
    batch_size: flags.Count = 256
    """minibatch size of every gradient step"""
    gamma: flags.Discount = 0.99
    """discount factor"""
    tau: flags.PolyakRate = 5e-3
    """Polyak rate of the target networks"""
    actor_lr: flags.LearningRate = 3e-4
    """actor learning rate"""
    critic_lr: flags.LearningRate = 3e-4
    """critic learning rate"""
    policy_delay: flags.Count = 2
    """critic updates per actor (and target) update"""
    target_noise: flags.NonNegative = 0.2
    """std of the target policy smoothing noise"""
    target_noise_clip: flags.NonNegative = 0.5
    """clip of the target policy smoothing noise"""
    exploration_noise: flags.NonNegative = 0.1
    """std of the Gaussian exploration noise online"""
    bc_alpha: flags.NonNegative = 2.5
    """alpha of TD3-BC (Eq. 3): lambda = alpha / mean|Q|"""

    offline_steps: flags.Steps = 500_000
    """TD3-BC gradient steps (paper: 500k); 0 skips pretraining"""
    offline_checkpoint: flags.CheckpointPath = None
    """a saved offline agent (a run's `offline.npz`) or a committed one by name, e.g.
    walker2d-medium-v2/td3bc_500k (pretrained/README.md): skip pretraining"""
    offline_eval_every: flags.Count = 10_000
    """offline gradient steps between evaluations"""
    log_every: flags.Count = 1_000
    """offline steps compiled into one call and logged together; online steps between logs"""

    finetune: Literal["td3c", "td3", "td3bc"] = "td3c"
    """the online policy update: TD3-C (Eq. 5), TD3 or TD3-BC (Eq. 3)"""
    online_steps: flags.Steps = 200_000
    """environment steps of fine-tuning, one update each (paper: 200k)"""
    offline_data: Literal["init", "none"] = "init"
    """initialise the online buffer with the offline data, or start it empty (Sec. 3.3)"""
    offline_ratio: flags.Fraction | None = None
    """keep offline data apart and draw this fixed share of every batch from it (Appendix C.1)"""
    buffer_size: flags.Count = 1_000_000
    """online replay capacity (FIFO)"""
    min_replay: flags.Steps = 1_000
    """online samples before updates start when the buffer starts without offline data"""
    epsilon: flags.NonNegative = 1e-5
    """TD3-C trust-region size (Table B2)"""
    dual_lr: flags.LearningRate = 1e3
    """step size of the projected SGD on lambda_c (not given in the paper; see `make_dual`)"""
    init_dual: flags.NonNegative = 0.0
    """initial value of the dual variable lambda_c"""
    dqda_clip: flags.NonNegative = 1.0
    """TD3-C: clip dQ/da elementwise to [-c, c] (Table B2 "clipping"); 0 disables"""
    eval_every: flags.Count = 5_000
    """online env steps between evaluations"""
    eval_episodes: flags.Count = 10
    """deterministic evaluation episodes"""
    checkpoint_every: flags.Count = 10_000
    """steps (offline gradient steps, online env steps) between full checkpoints"""


# ================================================================================================
# Networks and state
# ================================================================================================


def make_networks(args: Args, action_dim: int):
    kwargs = (
        {"activation": "elu", "layer_norm": "first_tanh"}
        if args.layer_norm
        else {"activation": "relu", "layer_norm": None}
    )
    actor = DeterministicActor(
        action_dim, args.hidden_dims, final_init_scale=1e-4 if args.layer_norm else None, **kwargs
    )
    return actor, Critic(args.hidden_dims, **kwargs)


@struct.dataclass
class TD3State:
    actor: TrainState
    actor_target: dict
    critic: TrainState  # twin critics: leading axis 2
    critic_target: dict
    dual: TrainState  # lambda_c >= 0 of Eq. (5)
    buffer: ReplayBuffer
    key: jax.Array
    step: jax.Array  # updates done (offline and online together)


def create_state(args, actor, critic, obs_dim, action_dim, key, buffer) -> TD3State:
    actor_key, critic_key, state_key = jax.random.split(key, 3)
    obs, act = jnp.zeros((1, obs_dim)), jnp.zeros((1, action_dim))
    actor_params = actor.init(actor_key, obs)
    critic_params = jax.vmap(lambda k: critic.init(k, obs, act))(jax.random.split(critic_key))
    copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)  # noqa: E731 - own buffers (donation)
    return TD3State(
        actor=TrainState.create(apply_fn=None, params=actor_params, tx=optax.adam(args.actor_lr)),
        actor_target=copy(actor_params),
        critic=TrainState.create(
            apply_fn=None, params=critic_params, tx=optax.adam(args.critic_lr)
        ),
        critic_target=copy(critic_params),
        dual=make_dual(args),
        buffer=buffer,
        key=state_key,
        step=jnp.int32(0),
    )


# ================================================================================================
# Losses
# ================================================================================================


def td3bc_actor_loss(q_pi, pi_actions, data_actions, bc_alpha):
    """Eq. (3): -lambda Q(s, pi(s)) + (pi(s) - a)^2 with lambda = alpha / mean|Q| (no gradient).
    The squared error is averaged over the batch *and* the action dimensions, as in TD3-BC's
    code (`F.mse_loss`) and Acme: a sum over dimensions would make the BC term |A| times
    stronger (effective alpha 2.5 / 3 on hopper)."""
    lam = bc_alpha / jax.lax.stop_gradient(jnp.abs(q_pi).mean())
    return (-lam * q_pi).mean() + ((pi_actions - data_actions) ** 2).mean()


def clipped_dpg_loss(q_fn, actions, clip):
    """-Q(s, a) as a loss whose gradient w.r.t. the actions is -clip(dQ/da, -c, c) (rlax's
    dpg_loss with dqda_clipping, used by Acme's DDPG/D4PG). `q_fn(actions) -> [B]`."""
    # Q(s_i, a_i) depends on a_i alone, so the gradient of the sum is the per-sample dQ/da.
    dqda = jax.grad(lambda a: q_fn(a).sum())(jax.lax.stop_gradient(actions))
    dqda = jnp.clip(dqda, -clip, clip)
    target = jax.lax.stop_gradient(actions + dqda)
    return 0.5 * ((target - actions) ** 2).sum(-1).mean()


def trust_region_constraint(pi_actions, target_actions):
    """Eq. (4)'s constraint value E_s[(pi(s) - pi_targ(s))^2], the squared distance averaged over
    the action dimensions (a sum would make it |A| times larger; studies/td3c_dual)."""
    sq = (pi_actions - jax.lax.stop_gradient(target_actions)) ** 2
    return sq.mean(-1).mean()


# `--dual-lr`'s default, 1e3: plain SGD moves lambda by lr * (c - epsilon): with
# the mean over action dimensions, the clipped dQ/da (at most 1 per dimension) balances the
# penalty's gradient 2 lambda |pi - pi_targ| / |A| at c = epsilon when lambda ~ |A| / (2
# sqrt(epsilon)) ~ 500 (hopper), which 1e3 reaches within a few thousand actor steps (the
# td3c_dual study: ~400 by 10k steps).
def make_dual(args: Args) -> TrainState:
    """lambda_c of Eq. (5), from `--init-dual`, learned by plain SGD at `--dual-lr`."""
    params = {"v": jnp.float32(args.init_dual)}
    return TrainState.create(apply_fn=None, params=params, tx=optax.sgd(args.dual_lr))


def dual_value(dual_params):
    """lambda_c from the dual's parameters."""
    return dual_params["v"]


def dual_step(dual: TrainState, constraint, epsilon):
    """Eq. (5)'s dual step: one gradient step on L = lambda_c (epsilon - c), which raises lambda_c
    while the constraint c exceeds epsilon and lowers it while c < epsilon, then the projection
    onto lambda_c >= 0 (so it returns to exactly 0 when the constraint is slack)."""
    slack = epsilon - jax.lax.stop_gradient(constraint)
    grads = jax.grad(lambda p: dual_value(p) * slack)(dual.params)
    dual = dual.apply_gradients(grads=grads)
    return dual.replace(params={"v": jnp.maximum(dual.params["v"], 0.0)})


def clips_dqda(mode: str) -> bool:
    """Whether the actor follows the clipped dQ/da (Table B2's "clipping": TD3-C only)."""
    return mode == "td3c"


# ================================================================================================
# The update (offline and online)
# ================================================================================================


# Logged as means over the actor steps only (every `policy_delay`-th update), not diluted by the
# critic-only steps in between.
ACTOR_STEP_METRICS = ("actor_loss", "constraint", "policy_change")


def mean_over_steps(metrics: dict) -> dict:
    """Per-update metrics stacked over steps [T] -> their means; the actor's metrics averaged
    over the steps that updated the actor (`actor_step` = 1), the rest over all steps."""
    weight = metrics["actor_step"]
    actor_steps = jnp.maximum(weight.sum(), 1.0)
    return {
        k: (v * weight).sum() / actor_steps if k in ACTOR_STEP_METRICS else v.mean()
        for k, v in metrics.items()
        if k != "actor_step"
    }


def make_update(args: Args, actor, critic, mode: str):
    """(state, batch, key) -> (state, metrics); `mode` is "td3bc", "td3" or "td3c".
    Per step (Acme's TD3): a critic step and a Polyak step of the target critics; every
    `policy_delay`-th step also an actor step (and, for td3c, a dual step) and a Polyak step of
    the target actor."""
    clip_dqda = clips_dqda(mode) and args.dqda_clip > 0

    def q1(params, obs, actions):
        return critic.apply(jax.tree_util.tree_map(lambda x: x[0], params), obs, actions)

    def update(state: TD3State, batch: dict, key):
        obs, actions, next_obs = batch["observations"], batch["actions"], batch["next_observations"]
        # Critic: clipped double Q with target policy smoothing.
        noise = jnp.clip(
            args.target_noise * jax.random.normal(key, actions.shape),
            -args.target_noise_clip,
            args.target_noise_clip,
        )
        next_actions = jnp.clip(actor.apply(state.actor_target, next_obs) + noise, -1.0, 1.0)
        next_q = jax.vmap(critic.apply, in_axes=(0, None, None))(
            state.critic_target, next_obs, next_actions
        ).min(0)
        target = batch["rewards"] + args.gamma * (1 - batch["terminals"]) * next_q

        def critic_loss_fn(params):
            q = jax.vmap(critic.apply, in_axes=(0, None, None))(params, obs, actions)
            return ((q - target[None]) ** 2).mean(-1).sum(), q

        (critic_loss, q), grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(
            state.critic.params
        )
        critic_state = state.critic.apply_gradients(grads=grads)
        # Acme updates the target critics every step (the TD3 authors: on actor steps only).
        critic_target = optax.incremental_update(critic_state.params, state.critic_target, args.tau)
        target_actions = actor.apply(state.actor_target, obs)
        dual = dual_value(state.dual.params)

        def actor_loss_fn(params):
            pi = actor.apply(params, obs)
            constraint = trust_region_constraint(pi, target_actions)
            if mode == "td3bc":
                loss = td3bc_actor_loss(
                    q1(critic_state.params, obs, pi), pi, actions, args.bc_alpha
                )
            elif clip_dqda:
                loss = clipped_dpg_loss(
                    lambda a: q1(critic_state.params, obs, a), pi, args.dqda_clip
                )
            else:
                loss = -q1(critic_state.params, obs, pi).mean()
            if mode == "td3c":  # Eq. (5): the Lagrangian penalty of the trust region
                loss = loss + dual * (constraint - args.epsilon)
            return loss, (pi, constraint)

        def delayed_actor_update(_):
            (actor_loss, (pi, constraint)), grads = jax.value_and_grad(actor_loss_fn, has_aux=True)(
                state.actor.params
            )
            new_actor = state.actor.apply_gradients(grads=grads)
            change = trust_region_constraint(actor.apply(new_actor.params, obs), pi)
            new_dual = state.dual
            if mode == "td3c":
                new_dual = dual_step(state.dual, constraint, args.epsilon)
            actor_target = optax.incremental_update(new_actor.params, state.actor_target, args.tau)
            return new_actor, new_dual, actor_target, (actor_loss, constraint, change)

        def no_actor_update(_):
            zero = jnp.float32(0.0)
            return state.actor, state.dual, state.actor_target, (zero, zero, zero)

        actor_step = state.step % args.policy_delay == 0
        new_actor, new_dual, actor_target, (actor_loss, constraint, change) = jax.lax.cond(
            actor_step, delayed_actor_update, no_actor_update, None
        )
        metrics = {
            "critic_loss": critic_loss,
            "q_mean": q.mean(),
            "actor_loss": actor_loss,
            "constraint": constraint,  # E[(pi - pi_targ)^2] (ACTOR_STEP_METRICS)
            "policy_change": change,  # E[(pi_new - pi_old)^2] of the actor step
            "dual": dual,  # lambda_c used by this step
            "actor_step": actor_step.astype(jnp.float32),
        }
        state = state.replace(
            actor=new_actor,
            actor_target=actor_target,
            critic=critic_state,
            critic_target=critic_target,
            dual=new_dual,
            step=state.step + 1,
        )
        return state, metrics

    return update


def mixed_batch(state: TD3State, offline: dict, key, args: Args):
    """A uniform batch of the online buffer, or with --offline-ratio a fixed offline share."""
    k_on, k_off = jax.random.split(key)
    batch, _ = state.buffer.sample(k_on, args.batch_size)
    if args.offline_ratio is None:
        return batch
    n_off = round(args.batch_size * args.offline_ratio)
    idx = jax.random.randint(k_off, (args.batch_size,), 0, offline["rewards"].shape[0])
    off = jax.tree_util.tree_map(lambda x: x[idx], offline)
    from_offline = jnp.arange(args.batch_size) < n_off
    pick = lambda o, on: jnp.where(from_offline.reshape(-1, *[1] * (o.ndim - 1)), o, on)  # noqa: E731
    return jax.tree_util.tree_map(pick, off, batch)


def make_env_step(args: Args, actor, critic, action_dim: int, ready_after: int):
    """One jitted call per env step: store the transition, update once (when the buffer holds
    `ready_after` items), and pick the next action with exploration noise."""
    online_update = make_update(args, actor, critic, args.finetune)

    def env_step_update(state: TD3State, transition, next_obs, offline):
        state = state.replace(buffer=state.buffer.add(transition))
        key, batch_key, update_key, noise_key = jax.random.split(state.key, 4)
        state = state.replace(key=key)
        batch = mixed_batch(state, offline, batch_key, args)
        update = lambda s: online_update(s, batch, update_key)  # noqa: E731
        zeros = jax.tree_util.tree_map(
            lambda m: jnp.zeros(m.shape, m.dtype), jax.eval_shape(update, state)[1]
        )
        state, metrics = jax.lax.cond(
            state.buffer.size >= ready_after, update, lambda s: (s, zeros), state
        )
        noise = args.exploration_noise * jax.random.normal(noise_key, (action_dim,))
        next_action = jnp.clip(actor.apply(state.actor.params, next_obs) + noise, -1.0, 1.0)
        return state, next_action, metrics

    return jax.jit(env_step_update, donate_argnums=0)


# ================================================================================================
# Main
# ================================================================================================


def main(args: Args) -> dict:
    lifecycle.check_args(args)
    data = load_d4rl(args.env, allow_generate=not args.no_generate)
    env_name = data.info.env
    offline = {k: data.transitions[k] for k in TRANSITION_KEYS}
    obs_dim, action_dim = offline["observations"].shape[1], offline["actions"].shape[1]
    lifecycle.check_batch_fits(args, data.info.num_transitions, 2, obs_dim + action_dim)
    actor, critic = make_networks(args, action_dim)
    key = jax.random.PRNGKey(args.seed)
    key, init_key, online_key = jax.random.split(key, 3)
    example = jax.tree_util.tree_map(lambda x: x[0], offline)
    empty = ReplayBuffer.create(example, 1)
    state = create_state(args, actor, critic, obs_dim, action_dim, init_key, empty)
    deterministic = jax.jit(lambda p, o: actor.apply(p, o))

    def agent(s):  # everything but the buffer
        return (s.actor, s.actor_target, s.critic, s.critic_target, s.key)

    def with_agent(s, a):
        return s.replace(actor=a[0], actor_target=a[1], critic=a[2], critic_target=a[3], key=a[4])

    agent_metadata = {"algorithm": "td3_c", "env": args.env, "obs_dim": obs_dim,
                      "action_dim": action_dim, "offline_steps": args.offline_steps}  # fmt: skip
    if args.offline_checkpoint:  # before the run directory exists: a wrong file writes nothing
        pretrained, _ = load_offline_agent(
            args.offline_checkpoint, agent(state), "td3_c", args.env, obs_dim, action_dim
        )
        state = with_agent(state, pretrained)
        print(f"offline agent loaded from {args.offline_checkpoint}")

    def eval_metrics(params, seed):
        return evaluate(env_name, lambda o: deterministic(params, o), args.eval_episodes, seed)

    run = lifecycle.open_run(args, "td3_c")
    progress = run.progress

    # ---------------------------------------------------------------- offline: TD3-BC (Eq. 3)
    if args.offline_checkpoint:
        pass  # loaded above
    elif run.offline_done:
        loaded, _ = load_checkpoint(run.offline_path, agent(state))
        state = with_agent(state, loaded)
        print(f"offline agent loaded from {run.offline_path}")
    elif args.offline_steps > 0:
        if run.resumed:
            state, progress = load_checkpoint(run.checkpoint_path, state)
            print(f"resumed offline phase at step {progress['offline_step']}")
        offline_update = make_update(args, actor, critic, "td3bc")

        @jax.jit
        def offline_chunk(state, data):
            def body(state, _):
                key, batch_key, update_key = jax.random.split(state.key, 3)
                idx = jax.random.randint(batch_key, (args.batch_size,), 0, data["rewards"].shape[0])
                batch = jax.tree_util.tree_map(lambda x: x[idx], data)
                return offline_update(state.replace(key=key), batch, update_key)

            state, metrics = jax.lax.scan(body, state, None, length=args.log_every)
            return state, mean_over_steps(metrics)

        state = run.train_offline(
            args, state, lambda s, _: offline_chunk(s, offline),
            lambda s, step: eval_metrics(s.actor.params, args.seed + step),
            progress["offline_step"], desc="offline TD3-BC",
        )  # fmt: skip
        save_checkpoint(run.offline_path, agent(state), agent_metadata)
    if not run.offline_done:
        progress = {"phase": "online", "env_steps": 0}
    before = eval_metrics(state.actor.params, args.seed + 10**6)
    print(f"after offline pretraining: normalized score {before.mean_normalized:.1f}")

    # ---------------------------------------------------------------- online fine-tuning
    separate = args.offline_ratio is not None or args.offline_data == "none"
    if separate:
        buffer = ReplayBuffer.create(example, args.buffer_size)
    else:  # the offline data fill the FIFO buffer first (Acme: capacity 1e6)
        num = min(data.info.num_transitions, args.buffer_size)
        buffer = ReplayBuffer.from_data(
            jax.tree_util.tree_map(lambda x: x[-num:], offline), args.buffer_size
        )
    online_state_key, first_noise_key = jax.random.split(online_key)
    state = state.replace(buffer=buffer, key=online_state_key)
    env = OnlineEnv(env_name, args.seed)
    action = np.zeros(action_dim, np.float32)
    if run.resumed and progress["env_steps"] > 0:
        state, progress = load_checkpoint(run.checkpoint_path, state)
        env.load_state_dict(progress["env"])
        action = np.asarray(progress["action"], np.float32)
        print(f"resumed online phase at env step {progress['env_steps']}")
    else:  # the first action: the pretrained policy plus exploration noise
        noise = args.exploration_noise * jax.random.normal(first_noise_key, (action_dim,))
        action = np.asarray(jnp.clip(actor.apply(state.actor.params, env.obs) + noise, -1.0, 1.0))
    # Updates start at once from a buffer holding the offline data; from a separate online
    # buffer (--offline-data none or --offline-ratio) after `min_replay` online samples (Acme).
    ready_after = args.min_replay if separate else 0
    step_fn = make_env_step(args, actor, critic, action_dim, ready_after)
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
        state, action, metrics = step_fn(state, transition, jnp.asarray(env.obs), offline)
        action = np.asarray(action)
        window.append(metrics)
        if env_steps % args.log_every == 0:
            run.logger.log(
                global_step, mean_over_steps(lifecycle.stack_metrics(window)), prefix="online/"
            )
            window = []
        if env_steps % args.eval_every == 0:
            result = eval_metrics(state.actor.params, args.seed + env_steps)
            run.log_eval(global_step, result, bar)
        if env_steps % args.checkpoint_every == 0 or env_steps == args.online_steps:
            progress = {"phase": "online", "env_steps": env_steps, "env": env.state_dict(),
                        "action": action.tolist()}  # fmt: skip
            run.save(state, progress, global_step, args.stop_after)

    after = eval_metrics(state.actor.params, args.seed + 2 * 10**6)
    return run.finish(
        args, before, after, dataset=data.info.minari_id, finetune=args.finetune,
        dataset_sha256=data.info.transitions_sha256,
    )  # fmt: skip


if __name__ == "__main__":
    lifecycle.cli(main, Args)
