"""The balanced-replay paper's N=5 CQL ensemble at its full budget (1M steps) on hopper-medium-v2,
trained on an accelerator lease in time-boxed pieces, then off2on_fig3's and bred_fig3's
comparisons fine-tuned from it (issue #46). Each piece ends cleanly at its deadline and packs what
the next piece needs into --out (the device tool's $OUT: files of at most 16 MiB).

    python -m benchmarks.paper_ensemble pretrain --minutes 7 --out $OUT   # resumes if it can
    python -m benchmarks.paper_ensemble restore DIR      # here: unpack what a lease brought back
    python -m benchmarks.paper_ensemble finetune --minutes 8 --out $OUT [--suites ...] [--seeds ...]
    python -m benchmarks.paper_ensemble status

State lives under --root (default runs/paper_ensemble, git-ignored): `pretrain/` is the run
(resumed bit-exactly from its checkpoint, every 10k steps), `finetune/` the suites' runs. The
dataset must be the one every CPU run loads: its transitions' sha256 is checked against
benchmarks/results/datasets.json before any step (a different jax may change the generated data;
then nothing is trained). `--tiny` runs the whole thing in seconds on the tiny smoke datasets
(its tests run it on the CPU).

On a lease (docs/running.md, "On an accelerator"): carry the wheels the image lacks (.whl) and the
state brought back last time (.state), then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
    python3 -m benchmarks.paper_ensemble restore .state; python3 -m benchmarks.paper_ensemble \
        pretrain --minutes 7 --out $OUT
"""

import argparse
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import types

from benchmarks.sweep import REPO, load_suite

ENV = "hopper-medium-v2"
SUITES = ("off2on_fig3", "bred_fig3")
PRETRAIN_ARGS = (
    "--env",
    ENV,
    "--seed",
    "0",
    "--ensemble-size",
    "5",
    "--offline-steps",
    "1000000",
    "--offline-eval-every",
    "50000",
    "--online-steps",
    "0",
    "--checkpoint-every",
    "10000",
)  # fmt: skip  (the paper's protocol: N=5, 1M CQL steps; fine-tuning is the suites' cpu budget)
SMALL_FILES = ("config.json", "metrics.jsonl", "summary.json", "job.json")
STATE_TAR = "pretrain_files.tar.gz"  # the run's small files; the checkpoint travels beside it


def tiny_pretrain_args() -> list[str]:
    """The smoke budget's network and steps, so the suites' smoke jobs can fine-tune from it."""
    smoke = load_suite("off2on_fig3").budget("smoke").args
    return ["--env", ENV, "--seed", "0", *smoke, "--online-steps", "0", "--no-generate"]


def expected_checksum(env: str) -> str:
    rows = json.loads((REPO / "benchmarks/results/datasets.json").read_text())
    return next(row["transitions_sha256"] for row in rows if row["name"] == env)


def check_dataset() -> None:
    """Generate the dataset if it is missing (on the host CPU: common/d4rl_recipe.py), then
    compare its checksum with the committed one. Runs in a child process (`verify_dataset`): the
    dataset code loads JAX, which the parent keeps out of its own process."""
    from common.datasets import load_d4rl, transitions_checksum

    data = load_d4rl(ENV)
    got, want = transitions_checksum(data.transitions), expected_checksum(ENV)
    if got != want:
        raise SystemExit(
            f"error: {ENV} here has transitions sha256 {got[:12]}..., the committed runs used "
            f"{want[:12]}... (benchmarks/results/datasets.json); not training on other data"
        )
    print(f"{ENV}: transitions sha256 {got[:12]}... matches the committed dataset", flush=True)


def verify_dataset(tiny: bool, env_vars: dict) -> int:
    """The tiny smoke dataset has no committed checksum: only the real one is checked."""
    if tiny:
        return 0
    code = "from benchmarks.paper_ensemble import check_dataset; check_dataset()"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env={**os.environ, **env_vars}
    ).returncode


def run_until(argv: list[str], deadline: float, env: dict) -> int | None:
    """Run `argv` until it ends or `deadline` (time.time()); at the deadline send SIGTERM (the
    algorithm files and the runner stop cleanly, keeping their last checkpoint). Returns the
    exit status, or None when it was stopped at the deadline."""
    proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **env})
    try:
        return proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        return None


def pack_pretrain(run_dir: pathlib.Path, out: pathlib.Path):
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / STATE_TAR, "w:gz") as tar:
        for name in SMALL_FILES:
            if (run_dir / name).exists():
                tar.add(run_dir / name, arcname=name)
    finished = (run_dir / "offline.npz").exists()
    big = "offline.npz" if finished else "checkpoint.npz"
    if (run_dir / big).exists():
        shutil.copy2(run_dir / big, out / big)
    return finished


def restore(source: pathlib.Path, run_dir: pathlib.Path):
    """Unpack what `pack_pretrain` wrote into `run_dir` (a newer state replaces an older one)."""
    if not (source / STATE_TAR).exists():
        raise SystemExit(f"error: {source} holds no {STATE_TAR}; pass the folder a lease filled")
    run_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(source / STATE_TAR) as tar:
        for member in tar.getmembers():
            if member.name not in SMALL_FILES or not member.isfile():
                raise SystemExit(f"error: {source / STATE_TAR} holds an unexpected {member.name}")
            data = tar.extractfile(member).read()
            tmp = run_dir / f"{member.name}.tmp"
            tmp.write_bytes(data)
            tmp.replace(run_dir / member.name)
    for big in ("checkpoint.npz", "offline.npz"):
        if (source / big).exists():
            tmp = run_dir / f"{big}.tmp"
            shutil.copy2(source / big, tmp)
            tmp.replace(run_dir / big)


def pretrain(args, env_vars) -> int:
    run_dir = args.root / "pretrain"
    if (run_dir / "offline.npz").exists():
        print(f"{run_dir}: the ensemble is trained (offline.npz); run `finetune`")
        return 0
    if verify_dataset(args.tiny, env_vars):
        return 2
    argv = [sys.executable, "algorithms/off2on_balanced.py", "--run-dir", str(run_dir)]
    argv += tiny_pretrain_args() if args.tiny else list(PRETRAIN_ARGS)
    if (run_dir / "checkpoint.npz").exists():
        argv.append("--resume")
    code = run_until(argv, time.time() + 60 * args.minutes, env_vars)
    if code not in (None, 0):
        print(f"error: the pretraining failed (exit {code}); see above", file=sys.stderr)
        return code
    if args.out is not None:
        done = pack_pretrain(run_dir, args.out)
        print(f"packed the {'finished' if done else 'unfinished'} pretraining into {args.out}")
    return 0


def finetune(args, env_vars) -> int:
    ensemble = args.root / "pretrain" / "offline.npz"
    if not ensemble.exists():
        print(
            f"error: {ensemble} does not exist; run `pretrain` until it finishes", file=sys.stderr
        )
        return 2
    argv = [
        sys.executable, "-m", "benchmarks.run", *args.suites, "--budget",
        "smoke" if args.tiny else "cpu", "--datasets", ENV, "--offline-checkpoint", str(ensemble),
        "--root", str(args.root / "finetune"), "--workers", str(args.workers),
    ]  # fmt: skip
    if args.seeds:
        argv += ["--seeds", *map(str, args.seeds)]
    code = run_until(argv, time.time() + 60 * args.minutes, env_vars)
    if code not in (None, 0):
        print(f"error: the fine-tuning failed (exit {code}); see above", file=sys.stderr)
        return code
    if args.out is not None:  # finished jobs only: a fine-tuning's checkpoint holds its buffer
        args.out.mkdir(parents=True, exist_ok=True)
        root = args.root / "finetune"
        done = sorted(p.parent for p in root.glob("*/*/*/*/*/summary.json"))
        with tarfile.open(args.out / "finetune_runs.tar.gz", "w:gz") as tar:
            for run_dir in done:
                for name in SMALL_FILES:
                    if (run_dir / name).exists():
                        tar.add(run_dir / name, arcname=str((run_dir / name).relative_to(root)))
        print(f"packed {len(done)} finished fine-tuning runs into {args.out}/finetune_runs.tar.gz")
    return 0


def status(args) -> int:
    run_dir = args.root / "pretrain"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if run_dir.exists() else []
    scores = [json.loads(x) for x in lines if "eval/normalized_score" in x]
    state = "finished" if (run_dir / "offline.npz").exists() else (
        "resumable" if (run_dir / "checkpoint.npz").exists() else "not started")  # fmt: skip
    last = f", last evaluation {scores[-1]['eval/normalized_score']:.1f} at step " \
        f"{scores[-1]['step']}" if scores else ""  # fmt: skip
    print(f"pretraining: {state}{last}")
    finished = list((args.root / "finetune").glob("*/*/*/*/*/summary.json"))
    print(f"fine-tuning: {len(finished)} finished runs under {args.root / 'finetune'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("pretrain", "finetune", "restore", "status"))
    parser.add_argument("source", nargs="?", type=pathlib.Path, help="restore: the folder")
    parser.add_argument("--root", type=pathlib.Path, default=REPO / "runs/paper_ensemble")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="where to pack the state")
    parser.add_argument("--minutes", type=float, default=7.0, help="stop cleanly after this")
    parser.add_argument("--suites", nargs="+", choices=SUITES, default=list(SUITES))
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--workers", type=int, default=6, help="fine-tuning jobs at once")
    parser.add_argument("--tiny", action="store_true", help="seconds-long, on tiny datasets")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    if (args.stage == "restore") != (args.source is not None):
        parser.error("`restore` takes the folder to unpack, and only `restore` takes one")
    args.root = args.root.resolve()
    env_vars = {}
    if args.tiny and args.stage == "pretrain":  # the smoke datasets, where the runner makes them
        from benchmarks.run import prepare_datasets

        smoke = load_suite("off2on_fig3").budget("smoke").tiny_datasets
        job = types.SimpleNamespace(dataset=ENV)
        env_vars = prepare_datasets([job], smoke, args.root / "finetune")
    if args.stage == "restore":
        restore(args.source, args.root / "pretrain")
        return status(args)
    if args.stage == "status":
        return status(args)
    return (pretrain if args.stage == "pretrain" else finetune)(args, env_vars)


if __name__ == "__main__":
    sys.exit(main())
