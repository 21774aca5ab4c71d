"""Compare single finished runs (ad-hoc diagnostics outside a benchmark suite): learning curves,
logged scalars beside them, and a summary table.

    python benchmarks/plot_curves.py RUN_DIR [RUN_DIR ...] --labels A B --out PREFIX \\
        [--extra online/dual online/constraint] [--config dual_lr]

Every run is read like a sweep job in `benchmarks/report.py` (`read_run_dir`): the curve
against online env steps, step 0 being the pretrained policy (also when the run loaded an
offline checkpoint), and the lowest early score (the lowest evaluation in the first 10% of
fine-tuning). Writes atomically:

- PREFIX.csv: one row per evaluation: run label, the `--config` values, online step, normalized
  score, and each `--extra` scalar logged at that step (blank where none was);
- PREFIX.md: one row per run: the `--config` values, score before and after fine-tuning, the
  mean of the evaluations in the last 10% of fine-tuning (one evaluation is noisy), the lowest
  early score, the lowest score overall (and its step), the last logged `--extra` values;
- PREFIX.png: the scores and one panel per `--extra` scalar (log scale where a non-negative
  scalar's positive values span more than two decades; zeros are then left out).
"""

import argparse
import io
import json
import math
import pathlib
import sys

from benchmarks.report import read_run_dir, style_axis, write_csv
from common.checkpoints import atomic_write_bytes, atomic_write_text


class RunError(ValueError):
    pass


def load(run_dir: pathlib.Path, extras: list[str], config_keys: list[str]) -> dict:
    if not (run_dir / "config.json").exists():
        raise RunError(f"{run_dir} is not a run directory (no config.json); pass a --run-dir")
    if not (run_dir / "summary.json").exists():
        raise RunError(
            f"{run_dir} has not finished (no summary.json); resume it with its command and "
            "--resume, or leave it out"
        )
    run = read_run_dir(run_dir, tuple(extras))
    config = json.loads((run_dir / "config.json").read_text())
    unknown = [k for k in config_keys if k not in config]
    if unknown:
        raise RunError(f"{run_dir}/config.json has no {unknown}; known keys: {sorted(config)}")
    run["config"] = {k: config[k] for k in config_keys}
    return run


def fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def table(runs: dict[str, dict], extras: list[str], config_keys: list[str]) -> str:
    head = ["run", *config_keys, "before", "after", "mean of the last 10%"]
    head += ["lowest early (first 10%)", "lowest overall", *(f"last {key}" for key in extras)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, run in runs.items():
        online = [(s, v) for s, v in run["curve"] if s > 0]
        low_step, low = min(online, key=lambda p: p[1]) if online else (0, math.nan)
        late = [v for s, v in online if s > 0.9 * run["online_steps"]]  # single evals are noisy
        cells = [label, *(fmt(run["config"][k]) for k in config_keys)]
        cells += [f"{run['pretrained']:.1f}", f"{run['finetuned']:.1f}"]
        cells += [f"{sum(late) / len(late):.1f} ({len(late)} evals)" if late else "—"]
        cells += [f"{run['early_min']:.1f}"]
        cells.append(f"{low:.1f} (at {low_step})")
        cells += [fmt(run["traces"][k][-1][1]) if run["traces"][k] else "" for k in extras]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def rows(runs: dict[str, dict], extras: list[str]) -> list[dict]:
    out = []
    for label, run in runs.items():
        traces = {k: dict(run["traces"][k]) for k in extras}
        for step, score in run["curve"]:
            out.append(
                {"run": label, **run["config"], "online_step": step,
                 "normalized_score": round(score, 3),
                 **{k: fmt(traces[k].get(step), 6) for k in extras}}
            )  # fmt: skip
    return out


def plot(runs: dict[str, dict], extras: list[str], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 1 + len(extras)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
    axes = axes[0]
    for i, (label, run) in enumerate(runs.items()):
        steps, scores = zip(*run["curve"], strict=True)
        axes[0].plot(steps, scores, color=f"C{i}", marker=".", label=label)
        for ax, key in zip(axes[1:], extras, strict=True):
            if run["traces"][key]:
                ax.plot(*zip(*run["traces"][key], strict=True), color=f"C{i}", label=label)
    axes[0].set_ylabel("normalized score")
    axes[0].set_title(title, fontsize=10)
    style_axis(axes[0])
    for ax, key in zip(axes[1:], extras, strict=True):
        style_axis(ax, [v for run in runs.values() for _, v in run["traces"][key]])
        ax.set_title(key, fontsize=10)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return png.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=pathlib.Path, help="finished run directories")
    parser.add_argument("--labels", nargs="+", help="one per run (default: the folder names)")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="PREFIX of the outputs")
    parser.add_argument("--extra", nargs="+", default=[], help="logged scalars, e.g. online/dual")
    parser.add_argument("--config", nargs="+", default=[], help="config.json keys to tabulate")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    labels = args.labels or [r.name for r in args.runs]
    if len(labels) != len(args.runs) or len(set(labels)) != len(labels):
        print(
            f"error: {len(labels)} --labels for {len(args.runs)} runs; give one distinct label "
            "per run",
            file=sys.stderr,
        )
        return 2
    try:
        pairs = zip(labels, args.runs, strict=True)
        runs = {label: load(run_dir, args.extra, args.config) for label, run_dir in pairs}
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    missing = [
        f"{k} in {label}" for label, r in runs.items() for k in args.extra if not r["traces"][k]
    ]
    if missing:
        print(f"warning: never logged during fine-tuning: {', '.join(missing)}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(args.out.with_suffix(".csv"), rows(runs, args.extra))
    summary = table(runs, args.extra, args.config)
    atomic_write_text(args.out.with_suffix(".md"), summary)
    png = plot(runs, args.extra, args.title)
    atomic_write_bytes(args.out.with_suffix(".png"), lambda f: f.write(png))
    print(summary, end="")
    print(f"wrote {args.out}.csv, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
