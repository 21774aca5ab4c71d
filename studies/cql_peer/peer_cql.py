"""d3rlpy's CQL on one of our generated datasets, evaluated as our runs are (the peer arm of the
CQL comparison, studies/cql_peer/README.md).

Runs in its own environment (torch and d3rlpy are not project dependencies):

    python3 -m venv .venv-peer
    .venv-peer/bin/pip install torch==2.13.0 d3rlpy==2.8.1 minari pillow imageio tqdm
    .venv-peer/bin/pip install gymnasium==1.4.0 mujoco==4.0.0   # d3rlpy pins gymnasium 1.0.0
    .venv-peer/bin/python -m studies.cql_peer.peer_cql --env hopper-medium-v2 --seed 0 \
        --hparams authors --run-dir runs/cql_peer/peer_authors/seed0

It imports only numpy-and-gymnasium modules of `common/` (the D4RL constants and our evaluation
loop, so both sides are scored by the same code) and calls the installed d3rlpy: no peer code is in
the project. Writes `metrics.jsonl` lines like our runs' ({"step", "eval/normalized_score", ...,
"offline/critic_loss", ...}), resumes from `checkpoint.pt` (written atomically every
--eval-every steps: the model, its optimizers and every RNG state) and writes `summary.json` last.

--hparams authors: the Off2OnRL authors' CQL settings as d3rlpy can express them (policy lr 1e-4,
critic 3e-4, temperature 1e-4, conservative weight 5 fixed, 10 sampled actions, deterministic
backup); --hparams d3rlpy: d3rlpy's own CQLConfig defaults (a Lagrangian weight, threshold 10).
d3rlpy cannot express our 40k-step BC warm start, and its deterministic backup evaluates the
target critics at the policy's mean action at s' (the CQL authors' code samples one).
"""

import argparse
import io
import json
import os
import pathlib
import random
import sys
import time

import numpy as np

from common.d4rl import DatasetError, parse_name
from common.evaluation import evaluate

HPARAMS = ("authors", "d3rlpy")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="hopper-medium-v2", help="D4RL dataset name")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hparams", choices=HPARAMS, default="authors")
    parser.add_argument("--steps", type=int, default=200_000, help="gradient steps")
    parser.add_argument("--eval-every", type=int, default=20_000)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--log-every", type=int, default=1_000, help="steps per metrics line")
    parser.add_argument(
        "--checkpoint-every", type=int, default=None,
        help="steps between checkpoints (default --eval-every); does not change the results",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hidden-dims", type=int, nargs="+", default=[256, 256])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)
    for name in ("steps", "eval_every", "eval_episodes", "log_every", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    args.checkpoint_every = args.checkpoint_every or args.eval_every
    for name in ("eval_every", "checkpoint_every"):
        if getattr(args, name) % args.log_every:
            parser.error(f"--{name.replace('_', '-')} must be a multiple of --log-every")
    return args


# The Off2OnRL authors' CQL settings (ALGORITHM_FACTS.md) in d3rlpy's CQLConfig fields; our
# off2on_balanced.py defaults are the same (tests/test_studies.py checks the pairs).
AUTHORS_SETTINGS = dict(
    actor_learning_rate=1e-4,
    critic_learning_rate=3e-4,
    temp_learning_rate=1e-4,  # ours: the temperature shares the policy's lr
    initial_temperature=1.0,
    alpha_learning_rate=0.0,  # no Lagrangian: the weight stays conservative_weight * 1
    initial_alpha=1.0,
    alpha_threshold=0.0,  # a constant inside the loss when the weight is fixed; 0 logs the gap
    conservative_weight=5.0,
    n_action_samples=10,
    soft_q_backup=False,  # the deterministic backup (no entropy in the target)
    max_q_backup=False,
    gamma=0.99,
    tau=5e-3,
    n_critics=2,
)


def cql_config(d3rlpy, hparams: str, batch_size: int, hidden_dims):
    """The d3rlpy CQLConfig of one arm."""
    encoder = d3rlpy.models.VectorEncoderFactory(hidden_units=list(hidden_dims))
    fields = dict(
        batch_size=batch_size, actor_encoder_factory=encoder, critic_encoder_factory=encoder
    )
    if hparams == "authors":
        fields.update(AUTHORS_SETTINGS)
    return d3rlpy.algos.CQLConfig(**fields)


def load_episodes(d3rlpy, env: str):
    """Our generated Minari dataset as d3rlpy episodes, keeping every transition as our loader
    does: an episode cut by its time limit gets its final observation as an extra step (with a
    dummy action), so d3rlpy's picker gives its last real transition the true next observation."""
    import minari

    env_name, split = parse_name(env)
    try:
        dataset = minari.load_dataset(f"o2o/{env_name}/{split}-v0")
    except Exception as err:  # noqa: BLE001 (minari raises several types for a missing dataset)
        raise SystemExit(
            f"error: dataset {env} not found ({err}); generate it with "
            f"`.venv/bin/python benchmarks/make_datasets.py --env {env_name} --splits {split}`"
        ) from None
    episodes = []
    for ep in dataset.iterate_episodes():
        terminated = bool(ep.terminations[-1])
        obs = ep.observations if not terminated else ep.observations[:-1]
        actions, rewards = ep.actions, ep.rewards
        if not terminated:
            actions = np.concatenate([actions, np.zeros_like(actions[:1])])
            rewards = np.concatenate([rewards, np.zeros_like(rewards[:1])])
        episodes.append(
            d3rlpy.dataset.Episode(
                observations=obs.astype(np.float32),
                actions=actions.astype(np.float32),
                rewards=rewards.astype(np.float32).reshape(-1, 1),
                terminated=terminated,
            )
        )
    return episodes


def atomic_torch_save(torch, obj, path: pathlib.Path):
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    try:
        env_name = parse_name(args.env)[0]
    except DatasetError as err:
        raise SystemExit(f"error: --env: {err}") from None
    import d3rlpy
    import torch
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    run_dir = pathlib.Path(args.run_dir)
    if (run_dir / "summary.json").exists():
        print(f"{run_dir} is finished (summary.json); nothing to do")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.json"
    config = {**vars(args), "implementation": "d3rlpy", "d3rlpy_version": d3rlpy.__version__}
    config.pop("run_dir")
    if config_path.exists():
        saved = json.loads(config_path.read_text())
        free = ("threads", "checkpoint_every")  # neither changes the results
        changed = sorted(k for k in config if saved.get(k) != config[k] and k not in free)
        if changed:
            raise SystemExit(
                f"error: {run_dir} was started with other settings ({', '.join(changed)}); "
                "pass the same flags or use a new --run-dir"
            )
    else:
        config_path.write_text(json.dumps(config, indent=1) + "\n")

    d3rlpy.seed(args.seed)
    episodes = load_episodes(d3rlpy, args.env)
    buffer = d3rlpy.dataset.ReplayBuffer(d3rlpy.dataset.InfiniteBuffer(), episodes=episodes)
    cql = cql_config(d3rlpy, args.hparams, args.batch_size, args.hidden_dims).create(device="cpu")
    cql.build_with_dataset(buffer)

    checkpoint_path = run_dir / "checkpoint.pt"
    metrics_path = run_dir / "metrics.jsonl"
    start = 0
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, weights_only=False)
        cql.impl.load_model(io.BytesIO(state["model"]))  # networks and optimizers
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        start = state["step"]
        # metrics logged after the checkpoint belong to steps that will run again
        lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
        kept = [line for line in lines if json.loads(line)["step"] <= start]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    elif metrics_path.exists():
        metrics_path.unlink()

    def act(obs):
        return cql.predict(np.asarray(obs, np.float32))

    def log(step, values):
        with metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")

    bar = tqdm(
        total=args.steps, initial=start, desc=f"d3rlpy CQL ({args.hparams})", unit="step",
        mininterval=0.5 if sys.stderr.isatty() else 30.0,  # as ours: a redraw per 30 s in a log
    )  # fmt: skip
    window: dict[str, list[float]] = {}
    for step in range(start + 1, args.steps + 1):
        batch = buffer.sample_transition_batch(args.batch_size)
        for key, value in cql.update(batch).items():
            window.setdefault(key, []).append(float(value))
        bar.update(1)
        if step % args.log_every and step != args.steps:
            continue
        log(step, {f"offline/{k}": float(np.mean(v)) for k, v in window.items()})
        window = {}
        if step % args.eval_every == 0 or step == args.steps:
            result = evaluate(env_name, act, args.eval_episodes, args.seed + step)
            log(step, {f"eval/{k}": v for k, v in result.metrics().items()})
            bar.set_postfix(score=f"{result.mean_normalized:.1f}")
        if step % args.checkpoint_every == 0 or step == args.steps:
            model = io.BytesIO()
            cql.impl.save_model(model)  # d3rlpy's checkpointer: networks and optimizers
            state = {
                "step": step,
                "model": model.getvalue(),
                "torch_rng": torch.get_rng_state(),
                "numpy_rng": np.random.get_state(),
                "python_rng": random.getstate(),
            }
            atomic_torch_save(torch, state, checkpoint_path)
    bar.close()
    summary = {"final_normalized_score": result.mean_normalized, "steps": args.steps}
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, run_dir / "summary.json")


if __name__ == "__main__":
    sys.exit(main())
