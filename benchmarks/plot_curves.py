"""Learning curves from run directories: one CSV (a row per evaluation) and one PNG.

    python benchmarks/plot_curves.py RUN_DIR [RUN_DIR ...] --labels A B --out PREFIX
        [--metric eval/normalized_score] [--x online]

`--x online` plots against online environment steps (the phase boundary at 0; offline
evaluations appear at negative steps scaled to the offline phase), `--x global` against the run's
global step. Writes PREFIX.csv and PREFIX.png atomically.
"""

import argparse
import csv
import io
import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from common.checkpoints import atomic_write_bytes, atomic_write_text  # noqa: E402
from common.logger import read_metrics  # noqa: E402


def curve(run_dir: pathlib.Path, metric: str, x: str) -> list[tuple[int, float]]:
    config = json.loads((run_dir / "config.json").read_text())
    # Online steps are logged at offline_steps + env_steps (also when pretraining was skipped).
    offset = config.get("offline_steps", 0) if x == "online" else 0
    points = [(r["step"] - offset, r[metric]) for r in read_metrics(run_dir) if metric in r]
    return sorted(points)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=pathlib.Path)
    parser.add_argument("--labels", nargs="+")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--metric", default="eval/normalized_score")
    parser.add_argument("--x", choices=["online", "global"], default="online")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    labels = args.labels or [r.name for r in args.runs]
    curves = {
        label: curve(run, args.metric, args.x) for label, run in zip(labels, args.runs, strict=True)
    }

    steps = sorted({s for points in curves.values() for s, _ in points})
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["step", *labels])
    lookup = {label: dict(points) for label, points in curves.items()}
    for step in steps:
        writer.writerow([step, *(lookup[label].get(step, "") for label in labels)])
    atomic_write_text(args.out.with_suffix(".csv"), table.getvalue())

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves.items():
        ax.plot([s for s, _ in points], [v for _, v in points], label=label, marker=".")
    if args.x == "online":
        ax.axvline(0, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel("online env steps (offline phase at negative steps)")
    else:
        ax.set_xlabel("global step")
    ax.set_ylabel(args.metric)
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(args.out.with_suffix(".png"), lambda f: f.write(png.getvalue()))
    print(f"wrote {args.out.with_suffix('.csv')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
