"""Why SAC+ML (ACA's offline phase) diverges on halfcheetah-medium: branch a pretraining run.

    python -m studies.sacml_divergence.sacml_divergence --checkpoint RUN/checkpoint.npz \
        --variant fixed-alpha --steps 100000 --out runs/sacml_divergence/fixed-alpha
    python -m studies.sacml_divergence.sacml_divergence --report runs/sacml_divergence \
        --main-run RUN
    python -m studies.sacml_divergence.sacml_divergence --soft-reward RUN/checkpoint.npz \
        BRANCH/checkpoint.npz
    python -m studies.sacml_divergence.sacml_divergence --behaviour-entropy \
        halfcheetah-medium-v2 hopper-medium-v2

A branch continues the offline phase of an `aca.py` run from its (mid-pretraining) resume
checkpoint, with its config.json's flags, changing one thing:
  control       nothing: the run itself (same RNG key, same batches; reproduces its metrics)
  fixed-alpha   the temperature frozen (Eq. 6 switched off) at its checkpoint value, or at
                --alpha (0: no entropy terms at all); with --ml-weight, w changed as well
  ml-weight     w of Eq. (4) set to --ml-weight (the paper's w = 30 for every dataset)
  hard-critic   the critics' target without the entropy backup (Eq. 5 minus -alpha log pi(a'|s'):
                aca.py --no-offline-backup-entropy); the actor's alpha log pi and Eq. (6) stay
Every --eval-every steps it logs the evaluation score and, on a fixed sample of 20000 dataset
states, the critic at the data's actions, at the policy's mean and sampled actions and at uniform
actions (min over the twin critics), the policy's mean distance to the data's actions and the
temperature: whether the critic over-values the policy's own actions (extrapolation) and drags
the policy away from the data. Resumes from out/checkpoint.npz; --report writes a table and a
PNG of every branch under a folder (and of the main run's own evaluations, for reference);
--soft-reward tabulates, for saved checkpoints, the policy's entropy and the soft reward
r + alpha H on the dataset's states against the states its own rollouts visit;
--behaviour-entropy the entropy of the policies that collected the datasets.
"""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import lifecycle
from common.checkpoints import (
    atomic_write_text,
    load_checkpoint,
    read_checkpoint_metadata,
    save_checkpoint,
)
from common.flags import ArgumentParser, UsageError
from common.logger import read_metrics

VARIANTS = ("control", "fixed-alpha", "ml-weight", "hard-critic")
PROBE_STATES = 20_000


def run_args(checkpoint: pathlib.Path):
    """The aca.Args of the run that wrote `checkpoint` (its config.json beside it)."""
    from algorithms import aca

    config_path = checkpoint.parent / "config.json"
    if not config_path.exists():
        raise UsageError(f"{config_path} does not exist: --checkpoint must lie in an aca.py run")
    config = json.loads(config_path.read_text())
    fields = {f.name for f in dataclasses.fields(aca.Args)}
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}
    return aca.Args(**config)


def probe(actor, critic, params, obs, actions, key):
    """The critic at the data's, the policy's and uniform actions, at fixed dataset states."""
    from algorithms import aca

    mean, log_std = actor.apply(params["actor"], obs)
    sampled = jnp.tanh(aca.sample_pre_tanh(mean, log_std, key))
    uniform = jax.random.uniform(jax.random.fold_in(key, 1), actions.shape, minval=-1, maxval=1)

    def q(a):
        return aca.twin(critic, params["critic"], obs, a).min(0).mean()

    return {
        "q_data": q(actions),
        "q_policy_mean": q(jnp.tanh(mean)),
        "q_policy_sample": q(sampled),
        "q_uniform": q(uniform),
        "policy_data_distance": jnp.abs(jnp.tanh(mean) - actions).mean(),
        "log_std": log_std.mean(),
    }


def offline_template(run, obs_dim: int, action_dim: int, frozen_alpha: bool = False):
    """(actor, critic, baseline, offline state to load a checkpoint into) of an aca.py run;
    frozen_alpha: with the temperature frozen as a fixed-alpha branch saves it."""
    from algorithms import aca
    from common.networks import Critic, TanhGaussianPolicy, ValueNet

    actor = TanhGaussianPolicy(action_dim, run.hidden_dims)
    critic, baseline = Critic(run.hidden_dims), ValueNet(run.hidden_dims)
    template = aca.create_offline_state(
        run, actor, critic, baseline, obs_dim, action_dim, jax.random.PRNGKey(0)
    )
    return actor, critic, baseline, freeze_temperature(template) if frozen_alpha else template


def freeze_temperature(state, log_alpha=None):
    """Eq. (6) off: the temperature keeps its value (or is set to exp(log_alpha))."""
    frozen = optax.set_to_zero()
    params = state.log_alpha.params if log_alpha is None else {"v": log_alpha}
    return state.replace(
        log_alpha=state.log_alpha.replace(params=params, tx=frozen, opt_state=frozen.init(params))
    )


def branch_template(checkpoint: pathlib.Path):
    """(run args, branch settings or None) of a run's or a branch's checkpoint."""
    config = json.loads((checkpoint.parent / "config.json").read_text())
    if "variant" not in config:
        return run_args(checkpoint), None
    return run_args(pathlib.Path(config["checkpoint"])), config


def branch_name(settings: dict) -> str:
    """The variant and what it changed, e.g. fixed-alpha (alpha = 0, w = 120)."""
    changes = []  # a fixed-alpha branch may change w as well
    if settings.get("alpha") is not None:
        changes.append(f"alpha = {settings['alpha']:g}")
    if settings["variant"] == "ml-weight" or settings.get("ml_weight_changed"):
        changes.append(f"w = {settings['ml_weight']:g}")
    return settings["variant"] + (f" ({', '.join(changes)})" if changes else "")


def soft_reward(checkpoints: list[str], episodes: int = 3) -> None:
    """Where the soft critic wants the agent to be: on the dataset's states and on the states of
    the policy's own (deterministic) rollouts, upright and flipped, the policy's entropy
    H = -log pi(a|s) at a sampled a, the reward r and the soft reward r + alpha H that Eq. (5)
    backs up, and Q(s, tanh mu). Prints a markdown table."""
    lines = ["| checkpoint | alpha | return | states | share | entropy H | r | r + alpha H | "
             "Q(s, tanh mu) |", "|---" * 9 + "|"]  # fmt: skip
    for path in checkpoints:
        lines += soft_reward_rows(pathlib.Path(path), episodes)
    print("\n".join(lines))


def soft_reward_rows(path: pathlib.Path, episodes: int) -> list[str]:
    import gymnasium as gym

    from algorithms import aca
    from common.d4rl import GYM_ENV_IDS, parse_name
    from common.datasets import load_d4rl

    run, settings = branch_template(path)
    data = load_d4rl(run.env, allow_generate=False).transitions
    obs_dim, action_dim = data["observations"].shape[1], data["actions"].shape[1]
    frozen = bool(settings) and settings["variant"] == "fixed-alpha"
    actor, critic, _, template = offline_template(run, obs_dim, action_dim, frozen)
    state, progress = load_checkpoint(path, template)
    alpha = float(jnp.exp(state.log_alpha.params["v"]))
    policy = jax.jit(lambda o: actor.apply(state.actor.params, o))

    def entropy_and_q(obs):
        mean, log_std = policy(obs)
        u = aca.sample_pre_tanh(mean, log_std, jax.random.PRNGKey(1))
        entropy = -aca.squashed_log_prob(u, mean, log_std)
        q = aca.twin(critic, state.critic.params, obs, jnp.tanh(mean)).min(0)
        return np.asarray(entropy), np.asarray(q)

    observed, rewards, returns = [], [], []
    env = gym.make(GYM_ENV_IDS[parse_name(run.env)[0]])  # one env, reset with each episode's seed
    for episode in range(episodes):
        obs, _ = env.reset(seed=7 + episode)
        done, total = False, 0.0
        while not done:
            action = np.tanh(np.asarray(policy(obs[None].astype(np.float32))[0][0]))
            observed.append(obs)
            obs, reward, terminated, truncated, _ = env.step(action)
            rewards.append(reward)
            total += reward
            done = terminated or truncated
        returns.append(total)
    env.close()
    observed, rewards = np.asarray(observed, np.float32), np.asarray(rewards)
    flipped = np.abs(observed[:, 1]) > 1.5  # root pitch (rad): on its back
    rows = np.random.default_rng(0).choice(len(data["rewards"]), PROBE_STATES, replace=False)
    groups = {"dataset": (data["observations"][rows], data["rewards"][rows], None),
              "rollout, upright": (observed[~flipped], rewards[~flipped], ~flipped),
              "rollout, flipped": (observed[flipped], rewards[flipped], flipped)}  # fmt: skip
    step = progress.get("offline_step", progress.get("offline_steps"))  # resume / final save
    name = f"{run.env.split('-')[0]}: {branch_name(settings) if settings else 'run'} @ {step}"
    lines = []
    for label, (obs, reward, mask) in groups.items():
        if len(obs) == 0:
            continue
        entropy, q = entropy_and_q(obs)
        share = "" if mask is None else f"{mask.mean():.0%}"
        cells = [f"{entropy.mean():.2f}", f"{reward.mean():.2f}",
                 f"{(reward + alpha * entropy).mean():.2f}", f"{q.mean():.1f}"]  # fmt: skip
        lines.append(f"| {name} | {alpha:.3g} | {np.mean(returns):.0f} | {label} | {share} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    return lines


def behaviour_entropy(datasets: list[str]) -> None:
    """The entropy of each dataset's behaviour policy (the committed SAC actor that collected it)
    at the dataset's states, E[-log pi_b(a|s)] at a sampled a, beside SAC's target -|A|: an ML
    fit (Eq. 4) wants the policy about this sharp, the temperature (Eq. 6) holds it at -|A|.
    For a medium policy also at the states of its SAC run's replay buffer (medium-replay), the
    states on which SAC's own temperature held it at the target."""
    from common.d4rl import parse_name
    from common.d4rl_recipe import POLICY_DIR, load_policy
    from common.datasets import load_d4rl
    from common.networks import tanh_gaussian

    def entropy(actor, params, states):
        rows = np.random.default_rng(0).choice(len(states), PROBE_STATES, replace=False)
        mean, log_std = actor.apply(params, states[rows])
        _, log_prob = tanh_gaussian(mean, log_std).sample_and_log_prob(seed=jax.random.PRNGKey(1))
        return -float(log_prob.mean()), float((jnp.abs(jnp.tanh(mean)) > 0.95).mean())

    lines = ["| dataset | behaviour policy entropy at the data | at its SAC replay buffer | "
             "SAC target -abs(A) | abs(tanh mu) > 0.95 |", "|---|---|---|---|---|"]  # fmt: skip
    for name in datasets:
        env, level = parse_name(name)
        data = load_d4rl(name, allow_generate=False).transitions
        actor, params, _ = load_policy(env, level, seed=0)
        on_data, saturated = entropy(actor, params, data["observations"])
        on_replay = ""
        if level == "medium":
            replay = np.load(POLICY_DIR / env / "medium_replay.npz")["observations"]
            on_replay = f"{entropy(actor, params, replay)[0]:.2f}"
        lines.append(f"| {name} | {on_data:.2f} | {on_replay} | {-data['actions'].shape[1]} | "
                     f"{saturated:.0%} |")  # fmt: skip
    print("\n".join(lines))


def branch(args) -> None:
    from algorithms import aca
    from common.datasets import TRANSITION_KEYS, load_d4rl
    from common.evaluation import evaluate

    checkpoint = pathlib.Path(args.checkpoint)
    meta = read_checkpoint_metadata(checkpoint)
    if meta.get("phase") != "offline":
        raise UsageError(f"{checkpoint} is not a mid-pretraining resume checkpoint of aca.py")
    run = run_args(checkpoint)
    if args.ml_weight is not None:
        run = dataclasses.replace(run, ml_weight=args.ml_weight)
    if args.variant == "hard-critic":
        run = dataclasses.replace(run, offline_backup_entropy=False)
    out = pathlib.Path(args.out)
    data = load_d4rl(run.env, allow_generate=False)
    offline = {k: data.transitions[k] for k in TRANSITION_KEYS}
    obs_dim, action_dim = offline["observations"].shape[1], offline["actions"].shape[1]
    resume = out / "checkpoint.npz"
    resuming = resume.exists()
    fixed_alpha = args.variant == "fixed-alpha"  # a resumed fixed-alpha branch saved it frozen
    actor, critic, baseline, template = offline_template(
        run, obs_dim, action_dim, frozen_alpha=fixed_alpha and resuming
    )
    state, progress = load_checkpoint(resume if resuming else checkpoint, template)
    start = progress["offline_step"]
    if resuming:  # drop what was logged after the checkpoint: it is about to be redone
        kept = [r for r in read_metrics(out) if r["step"] <= start]
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
    if "branched_at" not in progress:
        progress["branched_at"] = start
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "metrics.jsonl", "")
        settings = {"checkpoint": str(checkpoint), "variant": args.variant, "alpha": args.alpha,
                    "ml_weight": run.ml_weight, "ml_weight_changed": args.ml_weight is not None,
                    "branched_at": start, "env": run.env}  # fmt: skip
        atomic_write_text(out / "config.json", json.dumps(settings, indent=2))
    if fixed_alpha and not resuming:  # Eq. (6) off from here: at its value, or at --alpha
        # log 0 = -inf: --alpha 0 gives alpha = 0 exactly
        log_alpha = None if args.alpha is None else jnp.log(jnp.float32(args.alpha))
        state = freeze_temperature(state, log_alpha)
    chunk = aca.make_offline_chunk(run, actor, critic, baseline, action_dim)  # the run's own loop

    num = offline["rewards"].shape[0]
    rows = np.random.default_rng(0).choice(num, min(PROBE_STATES, num), replace=False)
    probe_obs, probe_actions = offline["observations"][rows], offline["actions"][rows]
    probe_fn = jax.jit(lambda params: probe(
        actor, critic, params, probe_obs, probe_actions, jax.random.PRNGKey(0)))  # fmt: skip
    deterministic = jax.jit(lambda p, o: jnp.tanh(actor.apply(p, o)[0]))
    end = progress["branched_at"] + args.steps
    bar = lifecycle.progress_bar(
        range(start, end, run.log_every), desc=f"{args.variant} from {progress['branched_at']}",
        unit_scale=run.log_every,
    )  # fmt: skip
    for step in bar:
        state, metrics = chunk(state, offline)
        step += run.log_every
        row = {"step": step, **{f"train/{k}": float(v) for k, v in metrics.items()}}
        if step % args.eval_every == 0 or step == end:
            params = {"actor": state.actor.params, "critic": state.critic.params}
            row |= {f"probe/{k}": float(v) for k, v in probe_fn(params).items()}
            result = evaluate(
                data.info.env,
                lambda o, p=state.actor.params: deterministic(p, o),
                run.eval_episodes,
                run.seed + step,  # the run's own evaluation seeds
            )
            row["eval/normalized_score"] = result.mean_normalized
            bar.set_postfix(score=f"{result.mean_normalized:.1f}")
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if "eval/normalized_score" in row:  # a resume restarts from the last evaluation
            progress = {**progress, "phase": "offline", "offline_step": step}
            save_checkpoint(resume, state, progress)


def report(folder: pathlib.Path, main_run: pathlib.Path | None) -> None:
    """A table (table.md) and a PNG of the branches under `folder`, beside the main run's own
    logged curves from the branch point on (what the control branch reproduces exactly)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    branches = sorted(  # a branch's config.json names its variant (an aca.py run's does not)
        p.parent for p in folder.glob("*/config.json") if "variant" in json.loads(p.read_text())
    )
    if not branches:
        raise UsageError(f"{folder} holds no branches (no */config.json)")
    panels = {"eval/normalized_score": "normalized score", "train/q_mean": "Q(s, a data)",
              "train/alpha": "temperature alpha", "train/critic_loss": "critic loss"}  # fmt: skip
    curves = {}  # name -> the evaluated rows
    for branch_dir in branches:
        settings = json.loads((branch_dir / "config.json").read_text())
        curves[branch_name(settings)] = [r for r in read_metrics(branch_dir) if "probe/q_data" in r]
    branch_steps = {r["step"] for evals in curves.values() for r in evals}
    if main_run is not None:
        rows = {}
        for row in read_metrics(main_run):
            rows.setdefault(row["step"], {}).update(
                {k.replace("offline/", "train/"): v for k, v in row.items()}
            )
        main = [rows[s] for s in sorted(branch_steps) if "eval/normalized_score" in rows.get(s, {})]
        curves = {"main run (alpha tuned, w = 30)": main, **curves}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.6))
    for name, evals in curves.items():
        for ax, (key, title) in zip(axes, panels.items(), strict=True):
            ax.plot([r["step"] for r in evals], [r[key] for r in evals], label=name)
            ax.set_title(title, fontsize=10)
    for ax in axes:
        ax.set_xlabel("offline step")
        ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1000:.0f}k")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "sacml_divergence.png", dpi=110)
    probes = ("probe/q_data", "probe/q_policy_sample", "probe/q_uniform",
              "probe/policy_data_distance")  # fmt: skip
    lines = ["| run | step | score | alpha | critic loss | Q(s, a data) | Q(s, a ~ pi) | "
             "Q(s, a uniform) | mean abs(tanh mu - a) |", "|---" * 9 + "|"]  # fmt: skip
    for name, evals in curves.items():
        for r in evals:
            cells = [f"{r[k]:.3g}" for k in ("eval/normalized_score", "train/alpha",
                                             "train/critic_loss")]  # fmt: skip
            cells += [f"{r[k]:.3g}" if k in r else "" for k in probes]
            lines.append(f"| {name} | {r['step']} | " + " | ".join(cells) + " |")
    atomic_write_text(folder / "table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="an aca.py run's mid-pretraining checkpoint.npz")
    parser.add_argument("--variant", choices=VARIANTS, default="control")
    parser.add_argument("--ml-weight", type=float, help="w of Eq. (4) (ml-weight, fixed-alpha)")
    parser.add_argument("--alpha", type=float, help="--variant fixed-alpha: the frozen value")
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--eval-every", type=int, default=10_000)
    parser.add_argument("--out", help="the branch's folder (resumed if it holds a checkpoint)")
    parser.add_argument("--report", help="write the table and PNG of the branches under FOLDER")
    parser.add_argument("--main-run", help="with --report: the run the branches start from")
    parser.add_argument("--soft-reward", nargs="+", metavar="CHECKPOINT",
                        help="print entropy and soft reward on data vs rollout states")  # fmt: skip
    parser.add_argument("--behaviour-entropy", nargs="+", metavar="DATASET",
                        help="print the entropy of the datasets' behaviour policies")  # fmt: skip
    args = parser.parse_args()
    if args.behaviour_entropy:
        behaviour_entropy(args.behaviour_entropy)
    elif args.soft_reward:
        soft_reward(args.soft_reward)
    elif args.report:
        report(pathlib.Path(args.report), pathlib.Path(args.main_run) if args.main_run else None)
    elif not (args.checkpoint and args.out):
        parser.error("--checkpoint and --out are required (or --report FOLDER)")
    elif args.alpha is not None and (args.alpha < 0 or args.variant != "fixed-alpha"):
        parser.error("--alpha takes a value >= 0, with --variant fixed-alpha")
    elif args.variant == "ml-weight" and args.ml_weight is None:
        parser.error("--variant ml-weight needs --ml-weight W (the run's w is 30)")
    elif args.ml_weight is not None and (args.ml_weight <= 0 or args.variant == "control"):
        parser.error("--ml-weight takes a value > 0, with --variant ml-weight or fixed-alpha")
    else:
        branch(args)


if __name__ == "__main__":
    main()
