"""Time the generation of a 1M-step dataset from a bundled behaviour policy (issue target: at
most 5 minutes on the 2-core CPU machine). Writes into a temporary Minari root, then deletes it.

    python benchmarks/bench_datasets.py --env hopper [--split medium] [--steps 1000000] [--out F]

Reports total seconds (rollout + Minari write), env steps/s, and the time to load the result back
by name. Uses the committed medium policy when present, else a randomly initialised one.
"""

import argparse
import json
import os
import pathlib
import platform
import shutil
import tempfile
import time

from benchmarks import make_datasets
from common.checkpoints import atomic_write_text
from common.datasets import load_d4rl

REPO = pathlib.Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="hopper")
    parser.add_argument("--split", choices=["random", "medium", "expert"])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--num-envs", type=int, default=20)
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    has_policies = (make_datasets.POLICY_DIR / args.env / "manifest.json").exists()
    split = args.split or ("medium" if has_policies else "random")
    root = pathlib.Path(tempfile.mkdtemp(prefix="bench_datasets_"))
    try:
        start = time.perf_counter()
        summary = make_datasets.generate(args.env, split, args.steps, args.num_envs, 0, root, False)
        generate_s = time.perf_counter() - start
        os.environ["MINARI_DATASETS_PATH"] = str(root)
        start = time.perf_counter()
        load_d4rl(f"{args.env}-{split}-v2", allow_download=False, allow_generate=False)
        load_s = time.perf_counter() - start
    finally:
        shutil.rmtree(root)
    report = {
        "env": args.env,
        "split": split,
        "steps": args.steps,
        "num_envs": args.num_envs,
        "episodes": summary["num_episodes"],
        "behaviour_return": round(summary["behaviour_return"], 1),
        "generate_seconds": round(generate_s, 1),
        "env_steps_per_s": round(args.steps / generate_s),
        "load_seconds": round(load_s, 1),
        "target_seconds": 300,
        "machine": f"{platform.machine()}, cpu_count={os.cpu_count()}",
    }
    print(json.dumps(report, indent=2))
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
