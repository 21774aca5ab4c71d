"""`make demo`: the balanced-replay paper's point in about 15 minutes on 2 CPU cores.

From the committed N=5 CQL ensemble pretrained on hopper-medium-v2
(`pretrained/hopper-medium-v2/cql_n5_200k`, see its manifest), fine-tune twice over the first
`--online-steps` of the paper's online protocol: with balanced replay (`off2on_balanced.py`, the
method) and with online samples only (the ablation of CoRL 2021 Fig. 4c, which forgets the
pessimistic offline agent's good behaviour early). Then prints a table (score before
fine-tuning, lowest score, final score) and writes the curves as PNG, CSV and Markdown beside the
runs: `<root>/demo.{png,csv,md}`.

    python -m benchmarks.demo [--online-steps 3000] [--root runs/demo_<time>]

The dataset is generated on first use (about 2 minutes). Each run shows its own progress bar,
counted in gradient updates (the online phase's cost; the first epoch runs 10x the updates).
The full comparison (3 seeds, 100k steps, uniform replay too) is the cpu budget of
`benchmarks/suites/off2on_fig3.toml`; its report is under `benchmarks/results/off2on_fig3/cpu/`.
"""

import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import plot_curves  # noqa: E402
from common.flags import ArgumentParser, Range, arg_type  # noqa: E402

ENSEMBLE = "pretrained/hopper-medium-v2/cql_n5_200k/ensemble.npz"
DATASET = "hopper-medium-v2"
VARIANTS = {"balanced replay": "balanced", "online samples only": "online-only"}


def make_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m benchmarks.demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--online-steps", type=arg_type(int, Range(1000)), default=3_000,
        help="env steps of fine-tuning per run (a multiple of 1000, one epoch)",
    )  # fmt: skip
    parser.add_argument("--seed", type=arg_type(int, Range(0, 2**32 - 1)), default=0)
    parser.add_argument(
        "--root", type=pathlib.Path, help="output folder (default runs/demo_<time>)"
    )
    parser.add_argument("--checkpoint", default=ENSEMBLE, help="the pretrained N=5 ensemble")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.online_steps % 1000:
        parser.error(f"--online-steps {args.online_steps}: must be a multiple of 1000 (one epoch)")
    checkpoint = REPO / args.checkpoint
    if not checkpoint.is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file (see pretrained/README.md)")
    root = args.root or REPO / "runs" / f"demo_{time.strftime('%Y%m%d-%H%M%S')}"
    if root.exists() and any(root.iterdir()):
        parser.error(f"--root {root}: exists and is not empty; choose another folder")
    # The second run reuses the first one's compiled programs (same shapes).
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(REPO / "runs" / "jax_cache")}
    run_dirs = {}
    for i, (label, replay) in enumerate(VARIANTS.items()):
        print(
            f"\n[demo {i + 1}/{len(VARIANTS)}] {label}: {args.online_steps} online steps",
            flush=True,
        )
        run_dirs[label] = root / replay
        cmd = [
            sys.executable, str(REPO / "algorithms" / "off2on_balanced.py"), "--env", DATASET,
            "--seed", str(args.seed), "--ensemble-size", "5", "--offline-checkpoint",
            str(checkpoint), "--replay", replay, "--online-steps", str(args.online_steps),
            "--run-dir", str(run_dirs[label]),
        ]  # fmt: skip
        if subprocess.run(cmd, cwd=REPO, env=env).returncode:
            print(f"error: the {label} run failed; its log is above", file=sys.stderr)
            return 1
    print()
    status = plot_curves.main(
        [*map(str, run_dirs.values()), "--labels", *run_dirs, "--out", str(root / "demo"),
         "--extra", "online/offline_fraction", "--title",
         f"{DATASET}: fine-tuning a pessimistic N=5 CQL ensemble"]
    )  # fmt: skip
    print(
        "\nOne seed over the first steps is an anecdote: the 3-seed, 100k-step comparison (uniform "
        "replay too) is benchmarks/results/off2on_fig3/cpu/report.md, and what it shows against "
        "the paper's claims is in algorithms/README.md (off2on_balanced.py, results)."
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
