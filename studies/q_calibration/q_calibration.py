"""How well does a pretrained CQL ensemble's Q know its returns? Two checks, both on the critics
fine-tuning starts from (`algorithms/off2on_balanced.py`, `algorithms/bred.py`):

- on its own rollouts: Q at the ensemble policy's deterministic actions (Eq. 5's tanh(mean)),
  against the Monte-Carlo discounted return of the rest of the episode, at a few steps of each,
  and beside both the behaviour policy's own discounted return from the same step of its
  episodes (the dataset's): whether the policy beats the data in the measure CQL maximises;
- on the data: Q at the dataset's actions against the behaviour policy's discounted
  returns-to-go (cut at the episode's end: a time-limit-truncated episode's return-to-go misses
  the bootstrap, so it reads low near the limit), and Q at the policy's actions at those states.

Then each member's own policy (the deterministic tanh of its mean) alone, on the same episode
seeds: whether a low ensemble score is every member's or the moment-matched mixture's; and the
data's own episodes for scale (normalized score, lengths, the share that ends in a fall).

Q is each member's twin minimum (the CQL target and actor read it so), averaged over members;
the members' range is shown beside it. CQL is meant to be pessimistic: Q at or below the returns.
A Q well above them on the policy's own states is the overestimation fine-tuning would then
correct the hard way. With gamma = 0.99 a fall late in an episode costs its first states little
(0.99^250 = 0.08), so a gait that falls can look good to a correct Q while its undiscounted
normalized score halves: compare the steps just before a fall too.

    python -m studies.q_calibration.q_calibration \\
        pretrained/hopper-medium-v2/cql_n5_200k/ensemble.npz [--episodes 3] [--states 5000] \\
        [--out DIR]

It takes an exported ensemble (`benchmarks/export_pretrained.py`) or the run dir of an
`off2on_balanced.py` / `bred.py` run, finished (its `offline.npz`) or still pretraining (its
resume `checkpoint.npz`, read as it stands). Prints Markdown tables; `--out DIR` also writes
`q_calibration.{md,json}` there.

    python -m studies.q_calibration.q_calibration runs/pretrain/off2on_cql5_hopper-medium-v2_200k
"""

import functools
import json
import pathlib

import numpy as np

from common.checkpoints import (
    CheckpointError,
    atomic_write_text,
    read_checkpoint_metadata,
)
from common.flags import ArgumentParser, Range, arg_type

GAMMA = 0.99  # both papers' discount


def discounted_returns_to_go(rewards, episode_ids, gamma: float = GAMMA) -> np.ndarray:
    """sum_k gamma^k r_{t+k} up to the end of t's episode, for every t; `episode_ids` marks
    contiguous episodes (an id change starts a new one)."""
    rewards = np.asarray(rewards, np.float64)
    out = np.empty_like(rewards)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        if t + 1 == len(rewards) or episode_ids[t + 1] != episode_ids[t]:
            running = 0.0
        running = rewards[t] + gamma * running
        out[t] = running
    return out


def episode_bounds(episode_ids) -> tuple[np.ndarray, np.ndarray]:
    """(first index, length) of each contiguous episode (an id change starts a new one)."""
    episode_ids = np.asarray(episode_ids)
    starts = np.r_[0, np.flatnonzero(episode_ids[1:] != episode_ids[:-1]) + 1]
    return starts, np.diff(np.r_[starts, len(episode_ids)])


def behaviour_returns_to_go_by_step(returns_to_go, episode_ids) -> np.ndarray:
    """[T]: the behaviour policy's discounted return-to-go at step t of its episodes, averaged
    over the dataset's episodes that reach t (T = the longest episode): what the data's own
    policy earns, in the discounted measure Q estimates, from where a rollout stands at t."""
    starts, lengths = episode_bounds(episode_ids)
    step_in_episode = np.arange(lengths.sum()) - np.repeat(starts, lengths)
    totals = np.bincount(step_in_episode, weights=np.asarray(returns_to_go, np.float64))
    return totals / np.bincount(step_in_episode)


def probe_steps(length: int) -> list[int]:
    """Steps of an episode of `length` to compare at: the start, every 50 steps up to 200, and
    10 steps before its end."""
    return sorted({t for t in (0, 50, 100, 150, 200) if t < length} | {max(length - 10, 0)})


def rollout(env, act, seed: int):
    """One episode of the deterministic policy `act` (obs [1, D] -> action [1, A]) from
    `env.reset(seed=seed)` -> (observations, actions, rewards, terminated)."""
    obs, _ = env.reset(seed=seed)
    observations, actions, rewards, done, terminated = [], [], [], False, False
    while not done:
        action = np.asarray(act(obs[None].astype(np.float32)))[0]
        observations.append(obs)
        actions.append(action)
        obs, reward, terminated, truncated, _ = env.step(action)
        rewards.append(reward)
        done = terminated or truncated
    return np.array(observations), np.array(actions), np.array(rewards), bool(terminated)


def main(argv: list[str] | None = None) -> int:
    prog = "python -m studies.q_calibration.q_calibration"
    parser = ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument(
        "checkpoint", type=pathlib.Path, help="an exported ensemble.npz or a run dir"
    )
    parser.add_argument("--episodes", type=arg_type(int, Range(1, 100)), default=3)
    parser.add_argument("--states", type=arg_type(int, Range(1)), default=5000)
    parser.add_argument("--seed", type=arg_type(int, Range(0, 2**31 - 1)), default=100)
    parser.add_argument("--out", type=pathlib.Path, help="also write q_calibration.{md,json}")
    args = parser.parse_args(argv)
    from benchmarks.export_pretrained import PRETRAINED_KIND, ensemble_params

    run_params = None  # a run dir's {"actor", "critic"} params, each [N, ...]
    if args.checkpoint.is_dir():
        run_dir = args.checkpoint
        stored = next((run_dir / f for f in ("offline.npz", "checkpoint.npz")
                       if (run_dir / f).is_file()), None)  # fmt: skip
        if stored is None or not (run_dir / "config.json").is_file():
            parser.error(f"{run_dir}: no config.json with an offline.npz or checkpoint.npz")
        config = json.loads((run_dir / "config.json").read_text())
        run_params = ensemble_params(stored)
        env, size, hidden = config["env"], config["ensemble_size"], config["hidden_dims"]
        with np.load(stored) as arrays:
            source = f"{stored} (step {int(arrays['[0].critic.step'].max())})"
    else:
        try:
            meta = read_checkpoint_metadata(args.checkpoint)
        except (CheckpointError, OSError) as err:
            parser.error(f"{args.checkpoint}: {err}")
        if meta.get("kind") != PRETRAINED_KIND:
            parser.error(
                f"{args.checkpoint}: not an exported CQL ensemble; pass an ensemble.npz of "
                "benchmarks/export_pretrained.py or an off2on_balanced.py / bred.py run dir"
            )
        env, size, hidden = meta["dataset"], meta["ensemble_size"], meta["hidden_dims"]
        source = str(args.checkpoint)
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out}: is a file, not a directory")

    import gymnasium as gym  # loaded late: --help and bad input stay fast
    import jax
    import jax.numpy as jnp

    from algorithms import off2on_balanced as o2o
    from common.d4rl import GYM_ENV_IDS, normalized_score
    from common.datasets import load_d4rl

    data = load_d4rl(env, allow_generate=True, verbose=False)
    obs_dim = data.transitions["observations"].shape[1]
    action_dim = data.transitions["actions"].shape[1]
    run = o2o.Args(env=env, ensemble_size=size, hidden_dims=tuple(hidden))
    actor, critic = o2o.TanhGaussianPolicy(action_dim, run.hidden_dims), o2o.Critic(run.hidden_dims)
    template = o2o.create_cql_members(
        run, actor, critic, obs_dim, action_dim, jax.random.PRNGKey(0)
    )
    if run_params is None:
        try:
            members = o2o.load_offline_ensemble(args.checkpoint, template, env, obs_dim, action_dim)
        except CheckpointError as err:
            parser.error(str(err))
    else:
        members = template.replace(
            actor=template.actor.replace(params=run_params["actor"]),
            critic=template.critic.replace(params=run_params["critic"]),
        )
    # The deterministic action of the members in `params` ([n, ...]); one member alone is the
    # n = 1 ensemble, whose moment matching is that member's own tanh(mean).
    act = jax.jit(lambda params, o: o2o.ensemble_policy(actor, params, o)[1])
    policy = functools.partial(act, members.actor.params)
    per_member = jax.vmap(o2o.twin_q, in_axes=(None, 0, None, None))
    q_members = jax.jit(lambda o, a: per_member(critic, members.critic.params, o, a).min(1))

    def q_at(obs, actions) -> np.ndarray:  # [N, T]: each member's twin minimum
        return np.asarray(q_members(jnp.asarray(obs, jnp.float32), jnp.asarray(actions)))

    transitions = data.transitions
    returns_to_go = discounted_returns_to_go(transitions["rewards"], data.episode_ids)
    behaviour_mc = behaviour_returns_to_go_by_step(returns_to_go, data.episode_ids)
    lines = [
        f"# Q calibration of `{source}`",
        "",
        f"{env}, N = {size}, gamma {GAMMA}. Q: mean over members of each "
        "member's twin minimum (members' range in brackets); MC: the discounted return that "
        "followed; behaviour: the behaviour policy's discounted return-to-go from the same step "
        "of its own episodes (the dataset's, mean over those that reach it), the number a "
        "pessimistic agent's MC should at least match.",
        "",
        "## The ensemble policy's own rollouts (deterministic)",
        "",
        "| episode | length | ended by | normalized | step | MC return | behaviour | Q | Q − MC |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rollouts = []
    gym_env = gym.make(GYM_ENV_IDS[data.info.env])
    for episode in range(args.episodes):
        observations, actions, rewards, terminated = rollout(gym_env, policy, args.seed + episode)
        mc = discounted_returns_to_go(rewards, np.zeros(len(rewards)))
        q = q_at(observations, actions)
        score = float(normalized_score(data.info.env, np.sum(rewards)))
        rows = []
        for t in probe_steps(len(rewards)):
            behaviour_at = float(behaviour_mc[t]) if t < len(behaviour_mc) else float("nan")
            rows.append({"step": t, "mc": float(mc[t]), "mc_behaviour": behaviour_at,
                         "q": float(q[:, t].mean()),
                         "q_min": float(q[:, t].min()), "q_max": float(q[:, t].max())})  # fmt: skip
            lines.append(
                f"| {episode} | {len(rewards)} | {'fall' if terminated else 'time limit'} | "
                f"{score:.1f} | {t} | {mc[t]:.1f} | {behaviour_at:.1f} | {q[:, t].mean():.1f} "
                f"[{q[:, t].min():.0f}, {q[:, t].max():.0f}] | {q[:, t].mean() - mc[t]:+.1f} |"
            )
        rollouts.append({"length": len(rewards), "terminated": bool(terminated),
                         "normalized_score": score, "steps": rows})  # fmt: skip

    idx = np.random.default_rng(args.seed).choice(
        len(returns_to_go), min(args.states, len(returns_to_go)), replace=False
    )
    obs = transitions["observations"][idx]
    q_data = q_at(obs, transitions["actions"][idx]).mean(0)
    q_policy = q_at(obs, np.asarray(policy(jnp.asarray(obs)))).mean(0)
    on_data = {"states": len(idx), "mc_behaviour": float(returns_to_go[idx].mean()),
               "q_data_actions": float(q_data.mean()),
               "q_policy_actions": float(q_policy.mean())}  # fmt: skip
    lines += [
        "",
        f"## {len(idx)} dataset states (seed {args.seed})",
        "",
        "| behaviour's discounted return-to-go | Q(s, a_data) | Q(s, π(s)) |",
        "|---|---|---|",
        f"| {on_data['mc_behaviour']:.1f} | {on_data['q_data_actions']:.1f} | "
        f"{on_data['q_policy_actions']:.1f} |",
    ]

    # Each member alone: its own deterministic policy tanh(mean), on the ensemble's episode seeds.
    lines += [
        "",
        "## Each member's own policy (deterministic), on the same episode seeds",
        "",
        "| member | normalized scores | mean | episode lengths |",
        "|---|---|---|---|",
    ]
    members_alone = []
    for m in range(size):
        alone = functools.partial(
            act, jax.tree_util.tree_map(lambda x, m=m: x[m : m + 1], members.actor.params)
        )
        scores, lengths = [], []
        for episode in range(args.episodes):
            *_, rewards, _ = rollout(gym_env, alone, args.seed + episode)
            scores.append(float(normalized_score(data.info.env, rewards.sum())))
            lengths.append(len(rewards))
        members_alone.append({"member": m, "normalized_scores": scores, "lengths": lengths})
        lines.append(
            f"| {m} | {', '.join(f'{x:.1f}' for x in scores)} | {np.mean(scores):.1f} | "
            f"{', '.join(map(str, lengths))} |"
        )
    ensemble_scores = [r["normalized_score"] for r in rollouts]
    lines.append(
        f"| ensemble | {', '.join(f'{x:.1f}' for x in ensemble_scores)} | "
        f"{np.mean(ensemble_scores):.1f} | {', '.join(str(r['length']) for r in rollouts)} |"
    )
    # The data's own episodes, for scale: their undiscounted score and how long they last.
    starts, lengths = episode_bounds(data.episode_ids)
    falls = np.asarray(transitions["terminals"])[starts + lengths - 1]
    returns = data.episode_returns  # the loader's undiscounted return of each episode
    behaviour = {"episodes": len(starts),
                 "mean_normalized_score": float(np.mean(normalized_score(data.info.env, returns))),
                 "length_quartiles": [float(x) for x in np.percentile(lengths, [25, 50, 75])],
                 "ended_by_fall": float(np.mean(falls))}  # fmt: skip
    q1, q2, q3 = behaviour["length_quartiles"]
    lines.append(
        f"| behaviour (the data's {behaviour['episodes']} episodes) | | "
        f"{behaviour['mean_normalized_score']:.1f} | median {q2:.0f} (quartiles {q1:.0f}, "
        f"{q3:.0f}); {100 * behaviour['ended_by_fall']:.0f}% end in a fall |"
    )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"checkpoint": source, "env": env, "gamma": GAMMA,
                  "rollouts": rollouts, "dataset": on_data,
                  "members_alone": members_alone, "behaviour": behaviour}  # fmt: skip
        atomic_write_text(args.out / "q_calibration.json", json.dumps(record, indent=2) + "\n")
        atomic_write_text(args.out / "q_calibration.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
