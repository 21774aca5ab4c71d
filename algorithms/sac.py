"""Soft Actor-Critic, online, from scratch (Haarnoja et al., 2018, "Soft Actor-Critic Algorithms
and Applications", arXiv:1812.05905).

It is the "SAC from scratch" baseline the offline-to-online papers compare against, and the
trainer of the behaviour policies behind the project's D4RL-recipe datasets (D4RL trained SAC
online and kept the policy at about one third of expert return as "medium", and the final one as
"expert").

Equations (numbers from arXiv:1812.05905):
  critic  Eq. (5):  J_Q = E[(Q(s,a) - y)^2],
                    y = r + gamma (1-d) (min_j Q_targ_j(s',a') - alpha log pi(a'|s')), a'~pi(.|s')
  actor   Eq. (7):  J_pi = E[alpha log pi(a|s) - min_j Q_j(s,a)],  a ~ pi(.|s) (reparameterised)
  alpha   Eq. (18): J_alpha = E[-alpha (log pi(a|s) + target_entropy)],  target_entropy = -|A|
Twin critics (clipped double Q) and Polyak-averaged target critics, as in the paper's Algorithm 1.

Behaviour-policy features: `--save-at-returns 1000 1400` saves the actor the first time the
evaluation return reaches each level (with the step and the return); `--snapshot-every N` saves
the actor every N steps; the replay buffer keeps insertion order (capacity >= total steps), so the
first k transitions of a checkpoint's buffer are exactly the replay buffer of the run at step k.

Deviations: none. A checkpoint holds everything, MuJoCo's simulator state included, so a resumed
run continues exactly where it stopped (tests/test_sac.py checks bit-equal parameters).

Usage:
    python algorithms/sac.py --env hopper --total-steps 1000000
    python algorithms/sac.py --env hopper-medium-v2        # the D4RL task's environment
    python algorithms/sac.py --run-dir runs/x --resume    # continue a stopped run
"""

import dataclasses
import json
import pathlib
from typing import Annotated

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax import struct
from flax.training.train_state import TrainState

from common import flags, lifecycle
from common.buffers import ReplayBuffer
from common.checkpoints import atomic_write_text, load_checkpoint, save_checkpoint
from common.d4rl import GYM_ENV_IDS, normalized_score
from common.envs import OnlineEnv
from common.evaluation import evaluate
from common.logger import RUN_FLAGS, Logger, check_same_config, make_run_dir
from common.networks import (
    Critic,
    TanhGaussianPolicy,
    init_ensemble,
    tanh_gaussian,
    tanh_gaussian_mode,
)


@dataclasses.dataclass
class Args:
    env: str = "hopper"
    """environment: hopper, halfcheetah, walker2d, ant, or a D4RL name such as hopper-medium-v2"""
    seed: flags.Seed = 0
    """seed of parameters, exploration and environments"""
    total_steps: flags.Steps = 1_000_000
    """environment steps (one gradient update per step after `learning_starts`)"""
    learning_starts: flags.Steps = 5_000
    """steps of uniform-random actions before learning starts"""
    buffer_size: flags.Count = 1_000_000
    """replay capacity (FIFO)"""
    batch_size: flags.Count = 256
    """minibatch size of every gradient step"""
    gamma: flags.Discount = 0.99
    """discount factor"""
    tau: flags.PolyakRate = 0.005
    """Polyak rate of the target critics"""
    actor_lr: flags.LearningRate = 3e-4
    """actor learning rate"""
    critic_lr: flags.LearningRate = 3e-4
    """critic learning rate"""
    alpha_lr: flags.LearningRate = 3e-4
    """temperature learning rate"""
    init_alpha: flags.Positive = 1.0
    """initial SAC temperature"""
    hidden_dims: flags.Widths = (256, 256)
    """hidden layer widths of the actor and critics"""
    eval_every: flags.Count = 5_000
    """steps between evaluations"""
    eval_episodes: flags.Count = 10
    """deterministic evaluation episodes"""
    log_every: flags.Count = 1_000
    """steps between training-metric logs"""
    checkpoint_every: flags.Count = 50_000
    """steps between full checkpoints (params, optimisers, buffer, RNG)"""
    save_at_returns: Annotated[tuple[float, ...], flags.Range(what="returns")] = ()
    """save the actor the first time the evaluation return reaches each of these levels"""
    snapshot_every: flags.Steps = 0
    """save the actor every this many steps (0: never)"""
    run_dir: flags.RunDir = None
    """run directory (default runs/<env>__sac__<seed>__<time>)"""
    resume: Annotated[bool, tyro.conf.arg(help="continue from run_dir/checkpoint.npz")] = False


@struct.dataclass
class SACState:
    actor: TrainState
    critic: TrainState  # twin critics: every leaf has a leading axis of size 2
    critic_target: dict
    log_alpha: TrainState
    buffer: ReplayBuffer
    key: jax.Array
    step: jax.Array  # environment steps taken


def create_state(args: Args, obs_dim: int, action_dim: int, key) -> SACState:
    key, actor_key, critic_key = jax.random.split(key, 3)
    obs, act = jnp.zeros((1, obs_dim)), jnp.zeros((1, action_dim))
    actor_net = TanhGaussianPolicy(action_dim, args.hidden_dims)
    critic_net = Critic(args.hidden_dims)
    critic_params = init_ensemble(critic_net, critic_key, 2, obs, act)
    example = {
        "observations": jnp.zeros(obs_dim),
        "actions": jnp.zeros(action_dim),
        "rewards": jnp.float32(0),
        "next_observations": jnp.zeros(obs_dim),
        "terminals": jnp.float32(0),
        "timeouts": jnp.float32(0),
    }
    return SACState(
        actor=TrainState.create(
            apply_fn=actor_net.apply,
            params=actor_net.init(actor_key, obs),
            tx=optax.adam(args.actor_lr),
        ),
        critic=TrainState.create(
            apply_fn=critic_net.apply, params=critic_params, tx=optax.adam(args.critic_lr)
        ),
        critic_target=jax.tree_util.tree_map(jnp.copy, critic_params),  # own buffers (donation)
        log_alpha=TrainState.create(
            apply_fn=None,
            params={"log_alpha": jnp.log(jnp.float32(args.init_alpha))},
            tx=optax.adam(args.alpha_lr),
        ),
        buffer=ReplayBuffer.create(example, args.buffer_size),
        key=key,
        step=jnp.int32(0),
    )


def soft_q_target(rewards, terminals, next_q, next_log_probs, alpha, gamma):
    """y of Eq. (5): r + gamma (1 - d) (min_j Q_targ_j(s', a') - alpha log pi(a'|s')).
    `terminals` are true terminations only: a time-limit cut still bootstraps."""
    return rewards + gamma * (1.0 - terminals) * (next_q - alpha * next_log_probs)


def make_train_step(args: Args, action_dim: int):
    target_entropy = -float(action_dim)

    def q_values(critic_fn, params, obs, actions):  # -> [2, B]
        return jax.vmap(critic_fn, in_axes=(0, None, None))(params, obs, actions)

    def sac_update(state: SACState):
        key, batch_key, next_key, pi_key = jax.random.split(state.key, 4)
        batch, _ = state.buffer.sample(batch_key, args.batch_size)
        alpha = jnp.exp(state.log_alpha.params["log_alpha"])

        # Critic, Eq. (5): clipped double-Q soft target; a time-limit cut is not a terminal.
        next_dist = tanh_gaussian(
            *state.actor.apply_fn(state.actor.params, batch["next_observations"])
        )
        next_actions, next_log_probs = next_dist.sample_and_log_prob(seed=next_key)
        next_q = q_values(
            state.critic.apply_fn, state.critic_target, batch["next_observations"], next_actions
        ).min(0)
        target = soft_q_target(
            batch["rewards"], batch["terminals"], next_q, next_log_probs, alpha, args.gamma
        )

        def critic_loss_fn(params):
            q = q_values(state.critic.apply_fn, params, batch["observations"], batch["actions"])
            return ((q - target[None]) ** 2).mean(1).sum(), q

        (critic_loss, q), grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(
            state.critic.params
        )
        critic = state.critic.apply_gradients(grads=grads)
        critic_target = optax.incremental_update(critic.params, state.critic_target, args.tau)

        # Actor, Eq. (7), against the updated critics.
        def actor_loss_fn(params):
            dist = tanh_gaussian(*state.actor.apply_fn(params, batch["observations"]))
            actions, log_probs = dist.sample_and_log_prob(seed=pi_key)
            q_pi = q_values(critic.apply_fn, critic.params, batch["observations"], actions).min(0)
            return (alpha * log_probs - q_pi).mean(), log_probs

        (actor_loss, log_probs), grads = jax.value_and_grad(actor_loss_fn, has_aux=True)(
            state.actor.params
        )
        actor = state.actor.apply_gradients(grads=grads)

        # Temperature, Eq. (18).
        entropy_gap = jax.lax.stop_gradient(log_probs + target_entropy).mean()
        # The standard temperature loss on log alpha (SAC's and rlkit's code): through exp(log
        # alpha) its gradient shrinks with alpha and Adam stalls alpha near 0.
        alpha_grad = jax.grad(lambda p: -p["log_alpha"] * entropy_gap)(state.log_alpha.params)
        log_alpha = state.log_alpha.apply_gradients(grads=alpha_grad)

        metrics = {
            "critic_loss": critic_loss,
            "actor_loss": actor_loss,
            "alpha": alpha,
            "entropy": -log_probs.mean(),
            "q_mean": q.mean(),
            "target_mean": target.mean(),
        }
        state = state.replace(
            actor=actor, critic=critic, critic_target=critic_target, log_alpha=log_alpha, key=key
        )
        return state, metrics

    def skip_update(state: SACState):
        zeros = {
            k: jnp.float32(0)
            for k in ("critic_loss", "actor_loss", "alpha", "entropy", "q_mean", "target_mean")
        }
        zeros["alpha"] = jnp.exp(state.log_alpha.params["log_alpha"])
        return state, zeros

    def train_step(state: SACState, transition: dict, next_obs: jax.Array):
        """Store one transition, update once (after learning_starts), pick the next action."""
        state = state.replace(buffer=state.buffer.add(transition), step=state.step + 1)
        state, metrics = jax.lax.cond(
            state.step >= args.learning_starts, sac_update, skip_update, state
        )
        key, act_key = jax.random.split(state.key)
        policy_action = tanh_gaussian(*state.actor.apply_fn(state.actor.params, next_obs)).sample(
            seed=act_key
        )
        random_action = jax.random.uniform(act_key, (action_dim,), minval=-1.0, maxval=1.0)
        action = jnp.where(state.step < args.learning_starts, random_action, policy_action)
        return state.replace(key=key), action, metrics

    # Donating the state lets XLA update the buffer in place instead of copying it every step.
    return jax.jit(train_step, donate_argnums=0)


def save_actor(path: pathlib.Path, state: SACState, meta: dict) -> None:
    save_checkpoint(path, {"params": state.actor.params}, meta)


def check_args(args: Args) -> None:
    """Every flag and path, before anything is created or compiled (one-line UsageError)."""
    if args.env.split("-")[0] not in GYM_ENV_IDS:
        raise flags.UsageError(f"unknown env {args.env!r}; known: {', '.join(GYM_ENV_IDS)}")
    flags.check_ranges(args)
    flags.check_run_dir(args.run_dir, args.resume)
    if args.resume:  # a resumed run may be extended (--total-steps)
        check_same_config(args.run_dir, args, ignore=(*RUN_FLAGS, "total_steps"))
    flags.warn_if_longer(args, "eval_every", "total_steps")
    flags.warn_if_longer(args, "learning_starts", "total_steps")


def main(args: Args) -> dict:
    check_args(args)
    env_name = args.env.split("-")[0]
    gym_id = GYM_ENV_IDS[env_name]
    run_dir = (
        pathlib.Path(args.run_dir) if args.run_dir else make_run_dir(args.env, "sac", args.seed)
    )
    (run_dir / "actors").mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.npz"
    lifecycle.note_run(run_dir, ckpt_path if args.resume and ckpt_path.exists() else None)

    env = OnlineEnv(env_name, args.seed)
    state = create_state(args, env.observation_dim, env.action_dim, jax.random.PRNGKey(args.seed))
    # The first action is uniform-random (learning has not started); later ones come from
    # train_step, which picks the action for the observation it is given.
    action = np.asarray(
        jax.random.uniform(jax.random.PRNGKey(args.seed), (env.action_dim,), minval=-1, maxval=1)
    )
    progress = {"reached": [], "last_eval": {}}
    if args.resume and ckpt_path.exists():
        state, progress = load_checkpoint(ckpt_path, state)
        if "env" in progress:
            env.load_state_dict(progress["env"])
            action = np.asarray(progress["action"], np.float32)
        else:  # a checkpoint without the simulator state: start a fresh episode
            env.episodes = progress.get("episodes", 0)
        print(f"resumed {ckpt_path} at step {int(state.step)}")
    start = int(state.step)
    logger = Logger(run_dir, config=args, resume_step=start if args.resume else None)
    train_step = make_train_step(args, env.action_dim)
    act = jax.jit(lambda params, obs: tanh_gaussian_mode(state.actor.apply_fn(params, obs)[0]))

    def actor_meta(step, result=None, **extra):
        meta = {"env": gym_id, "step": step, "seed": args.seed, **extra}
        if result is not None:
            meta |= {
                "eval_return": result.mean_return,
                "eval_return_std": float(result.returns.std()),
                "eval_episodes": args.eval_episodes,
            }
        return meta

    bar = lifecycle.progress_bar(
        range(start, args.total_steps), initial=start, total=args.total_steps, desc="sac",
        smoothing=0.05,
    )  # fmt: skip
    for step in bar:
        global_step = step + 1
        transition, finished = env.step(action)
        if finished:
            logger.log(global_step, finished, prefix="train/")
        state, action, metrics = train_step(state, transition, jnp.asarray(env.obs))
        action = np.asarray(action)

        if global_step % args.log_every == 0 and global_step >= args.learning_starts:
            logger.log(global_step, metrics, prefix="sac/")
        if global_step % args.eval_every == 0:
            result = evaluate(
                env_name,
                lambda o, params=state.actor.params: act(params, o),
                args.eval_episodes,
                seed=10_000 + global_step,
            )
            progress["last_eval"] = logger.log(global_step, result.metrics(), prefix="eval/")
            bar.set_postfix(ret=f"{result.mean_return:.0f}")
            for level in args.save_at_returns:
                if result.mean_return >= level and level not in progress["reached"]:
                    progress["reached"].append(level)
                    path = run_dir / "actors" / f"return_{level:g}.npz"
                    save_actor(path, state, actor_meta(global_step, result, level=level))
        if args.snapshot_every and global_step % args.snapshot_every == 0:
            path = run_dir / "actors" / f"step_{global_step}.npz"
            save_actor(path, state, actor_meta(global_step, **progress["last_eval"]))
        if global_step % args.checkpoint_every == 0 or global_step == args.total_steps:
            progress |= {"env": env.state_dict(), "action": action.tolist()}
            save_checkpoint(ckpt_path, state, progress)
            lifecycle.note_checkpoint(ckpt_path, f"step {global_step}")

    final = evaluate(
        env_name, lambda o: act(state.actor.params, o), args.eval_episodes, seed=123_456
    )
    save_actor(run_dir / "actors" / "final.npz", state, actor_meta(int(state.step), final))
    summary = {
        "final_return": final.mean_return,
        "final_normalized": float(normalized_score(env_name, final.mean_return)),
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    logger.close()
    print(
        f"final return {final.mean_return:.1f} "
        f"(normalized {summary['final_normalized']:.1f}); run dir {run_dir}"
    )
    return summary


if __name__ == "__main__":
    lifecycle.cli(main, Args)
