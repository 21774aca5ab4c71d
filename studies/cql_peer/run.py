"""Runs the CQL comparison (studies/cql_peer/README.md): our CQL (off2on_balanced.py, N=1,
offline only) beside d3rlpy's on the same generated dataset, the same budget and the same
hyperparameters, plus one-seed arms that separate code from hyperparameters.

    python -m studies.cql_peer.run                       # every unfinished job, seed by seed
    python -m studies.cql_peer.run --only ours --seeds 0  # a subset
    python -m studies.cql_peer.run --list                 # what is done, resumable, to do

Each job runs in its own process in `--root/<arm>/seed<k>` and resumes from its checkpoint when
started again (the same command), so the study survives interruptions; a finished job
(summary.json) is skipped. The d3rlpy jobs run `studies/cql_peer/peer_cql.py` with
`--peer-python` (an environment with torch and d3rlpy: see that file).
"""

import argparse
import dataclasses
import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
ENV = "hopper-medium-v2"
STEPS = 200_000
EVAL_EVERY = 20_000
EVAL_EPISODES = 10
# A session's machine is lent for hours and its processes end with it: checkpoints every 5000
# steps (~10 min of one core) bound what an ended run loses; they do not change the results.
CHECKPOINT_EVERY = 5_000


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    implementation: str  # "ours" | "d3rlpy"
    seeds: tuple[int, ...]
    args: tuple[str, ...]  # flags beside the shared budget
    text: str


# The Off2OnRL authors' CQL settings (ALGORITHM_FACTS.md) are our defaults: policy lr 1e-4,
# critic 3e-4, weight 5 without Lagrange, 10 sampled actions, deterministic backup. d3rlpy cannot
# express the BC warm start, so the 3-seed comparison runs ours without it.
ARMS = (
    Arm("ours", "ours", (0, 1, 2), ("--bc-steps", "0"), "ours, authors' settings, no warm start"),
    Arm("d3rlpy", "d3rlpy", (0, 1, 2), ("--hparams", "authors"), "d3rlpy, authors' settings"),
    Arm("ours_warm_start", "ours", (0,), (), "ours, authors' settings with the 40k BC warm start"),
    # d3rlpy's CQLConfig defaults: Lagrangian weight, loss alpha * 5 * (gap - 10), so our
    # weight * gap - threshold form has threshold 50. Its dual lr (1e-4) is ours' critic lr 3e-4.
    Arm(
        "ours_d3rlpy_defaults",
        "ours",
        (0,),
        ("--bc-steps", "0", "--cql-lagrange", "--cql-weight", "5", "--cql-target-gap", "50"),
        "ours with d3rlpy's default settings (Lagrangian, threshold 10 x weight 5)",
    ),
    Arm("d3rlpy_defaults", "d3rlpy", (0,), ("--hparams", "d3rlpy"), "d3rlpy, its own defaults"),
)


def command(arm: Arm, seed: int, run_dir: pathlib.Path, peer_python: str, budget: dict) -> list:
    shared = ["--env", ENV, "--seed", str(seed), "--run-dir", str(run_dir)]
    if arm.implementation == "d3rlpy":
        return [
            peer_python, "-m", "studies.cql_peer.peer_cql", *shared, *arm.args,
            "--steps", str(budget["steps"]), "--eval-every", str(budget["eval_every"]),
            "--eval-episodes", str(budget["eval_episodes"]),
            "--checkpoint-every", str(budget["checkpoint_every"]), *budget.get("peer_args", ()),
        ]  # fmt: skip
    resume = ["--resume"] if (run_dir / "checkpoint.npz").exists() else []
    return [
        sys.executable, "algorithms/off2on_balanced.py", *shared, *resume, *arm.args,
        "--ensemble-size", "1", "--online-steps", "0",
        "--offline-steps", str(budget["steps"]), "--offline-eval-every", str(budget["eval_every"]),
        "--eval-episodes", str(budget["eval_episodes"]), "--checkpoint-every",
        str(budget["checkpoint_every"]), *budget.get("ours_args", ()),
    ]  # fmt: skip


def jobs(arms, seeds):
    """The jobs in the order they run: seed by seed, so the first pair of 3-seed runs and the
    one-seed arms come first; d3rlpy at its own defaults (context, not the comparison) last."""
    order = [
        (arm.implementation == "d3rlpy" and len(arm.seeds) == 1, seed, index, arm)
        for index, arm in enumerate(ARMS)
        for seed in arm.seeds
        if (not arms or arm.name in arms) and (seeds is None or seed in seeds)
    ]
    for *_, seed, _, arm in sorted(order, key=lambda job: job[:3]):
        yield arm, seed


def state(run_dir: pathlib.Path) -> str:
    if (run_dir / "summary.json").exists():
        return "done"
    if (run_dir / "checkpoint.npz").exists() or (run_dir / "checkpoint.pt").exists():
        return "resumable"
    return "to do"


def pin_dataset(root: pathlib.Path, checksum: str) -> None:
    """Every run of the study trains on the same bytes: the first call records the dataset's
    transitions sha256 in `root/dataset.json`; a later one on other bytes (the dataset generated
    again on another machine: the same recipe, other floating point) stops with one line."""
    record = root / "dataset.json"
    if record.exists():
        pinned = json.loads(record.read_text())["transitions_sha256"]
        if pinned != checksum:
            raise SystemExit(
                f"error: {root} holds runs on {ENV} with transitions sha256 {pinned[:12]}..., the "
                f"dataset here has {checksum[:12]}... (generated elsewhere); restore that dataset "
                "or pass a new --root"
            )
        return
    root.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps({"env": ENV, "transitions_sha256": checksum}) + "\n")
    tmp.replace(record)


def dataset_checksum() -> str:
    """The sha256 of the dataset's transitions (generated here first if missing)."""
    from common.datasets import load_d4rl, transitions_checksum

    return transitions_checksum(load_d4rl(ENV).transitions)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="runs/cql_peer", help="where the runs go")
    parser.add_argument("--arms", nargs="+", choices=[a.name for a in ARMS], default=None)
    parser.add_argument("--only", choices=("ours", "d3rlpy"), default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--peer-python", default=".venv-peer/bin/python")
    parser.add_argument("--list", action="store_true", help="print each job's state and exit")
    parser.add_argument(
        "--tiny", action="store_true", help="a seconds-long budget (tests): 200 steps, 2 episodes"
    )
    args = parser.parse_args(argv)
    budget = {"steps": STEPS, "eval_every": EVAL_EVERY, "eval_episodes": EVAL_EPISODES,
              "checkpoint_every": CHECKPOINT_EVERY}  # fmt: skip
    if args.tiny:
        budget = {
            "steps": 200, "eval_every": 100, "eval_episodes": 1, "checkpoint_every": 100,
            "ours_args": ["--hidden-dims", "32", "32", "--batch-size", "32", "--log-every", "100",
                          "--cql-n-actions", "2"],
            "peer_args": ["--hidden-dims", "32", "32", "--batch-size", "32", "--log-every", "100"],
        }  # fmt: skip
    root = pathlib.Path(args.root).resolve()
    peer_python = pathlib.Path(args.peer_python)
    peer_python = str(peer_python if peer_python.is_absolute() else REPO / peer_python)
    todo = [
        (arm, seed)
        for arm, seed in jobs(args.arms, args.seeds)
        if args.only is None or arm.implementation == args.only
    ]
    if args.list:
        for arm, seed in todo:
            print(f"{arm.name:22s} seed {seed}: {state(root / arm.name / f'seed{seed}')}")
        return 0
    if any(arm.implementation == "d3rlpy" for arm, _ in todo):
        if not pathlib.Path(peer_python).exists():
            parser.error(
                f"--peer-python {args.peer_python} does not exist; create the d3rlpy environment "
                "(studies/cql_peer/peer_cql.py's docstring) or pass --only ours"
            )
    if any(state(root / arm.name / f"seed{seed}") != "done" for arm, seed in todo):
        pin_dataset(root, dataset_checksum())
    for index, (arm, seed) in enumerate(todo, 1):
        run_dir = root / arm.name / f"seed{seed}"
        if state(run_dir) == "done":
            continue
        print(f"[{index}/{len(todo)}] {arm.name} seed {seed} -> {run_dir}", flush=True)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        code = subprocess.call(command(arm, seed, run_dir, peer_python, budget), cwd=REPO)
        if code:
            print(f"error: {arm.name} seed {seed} failed (exit {code}); see above", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
