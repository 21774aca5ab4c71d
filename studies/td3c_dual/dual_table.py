"""The TD3-C dual study's table (benchmarks/results/td3c_dual/README.md): does lambda settle?

    python -m benchmarks.dual_study --budget cpu                       # runs under runs/bench
    python -m benchmarks.dual_study --budget cpu --root benchmarks/logs  # the committed runs

Per fine-tuning run of the suite `td3c_dual` (one row per variant and seed, then the mean over
seeds): lambda at 10k / 50k / the end of fine-tuning; over the second half of fine-tuning the
median of the logged constraint E[(pi - pi_targ)^2] over epsilon ("c / eps"), the median policy
movement of one actor step E[(pi_new - pi_old)^2] over epsilon ("step / eps") and the share of
1000-step windows where the constraint was met (c <= eps); the lowest evaluation and its step,
and the final score. Read from each run's metrics.jsonl at full precision (the report's CSVs
round). Writes `dual_table.md` beside the report (`benchmarks/results/td3c_dual/<budget>/`).
"""

import json
import math
import pathlib
import statistics
import sys

from benchmarks.report import read_run_dir
from benchmarks.sweep import BUDGETS, DEFAULT_ROOT, REPO, expand, load_suite, status
from common.checkpoints import atomic_write_text
from common.flags import ArgumentParser

SUITE = "td3c_dual"
COLUMNS = ["λ 10k", "λ 50k", "λ end", "c / ε", "step / ε", "c ≤ ε", "lowest (step)", "final"]


TRACES = ("online/dual", "online/constraint", "online/policy_change")


def run_row(run_dir: pathlib.Path) -> dict:
    """The study's numbers for one finished fine-tuning run."""
    eps = json.loads((run_dir / "config.json").read_text())["epsilon"]
    run = read_run_dir(run_dir, TRACES)  # the report's reader: traces and curve by online step
    dual, constraint, move = (dict(run["traces"][key]) for key in TRACES)
    scores = dict(run["curve"][1:])  # online evaluations (the curve's step 0 is the pretrained)
    online = run["online_steps"]

    def at(trace, step):  # the last logged value at or before `step`
        before = [s for s in trace if s <= step]
        return trace[max(before)] if before else math.nan

    late = [s for s in constraint if s > online / 2]
    low_step = min(scores, key=lambda s: (scores[s], s))
    return {
        "λ 10k": at(dual, 10_000),
        "λ 50k": at(dual, 50_000),
        "λ end": at(dual, online),
        "c / ε": statistics.median(constraint[s] for s in late) / eps,
        "step / ε": statistics.median(move[s] for s in late if s in move) / eps,
        "c ≤ ε": sum(constraint[s] <= eps for s in late) / len(late),
        "lowest": scores[low_step],
        "lowest_step": low_step,
        "final": scores[max(scores)],
    }


def _cell(key: str, row: dict) -> str:
    if key == "lowest (step)":
        return f"{row['lowest']:.1f} ({row['lowest_step'] / 1000:g}k)"
    if key == "c ≤ ε":
        return f"{100 * row[key]:.0f}%"
    value = row[key]
    return f"{value:.3g}" if key.startswith("λ") else f"{value:.1f}"


def table(budget: str, root: pathlib.Path) -> tuple[str, list[dict]]:
    suite = load_suite(SUITE)
    jobs = [j for j in expand(suite, suite.budget(budget), root) if j.variant != "pretrain"]
    rows = [
        {"variant": j.variant, "seed": j.seed, **run_row(j.run_dir)}
        for j in jobs
        if status(j) == "finished"
    ]
    lines = ["| variant | seed | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for variant in suite.variants:
        mine = [r for r in rows if r["variant"] == variant.name]
        for r in sorted(mine, key=lambda r: r["seed"]):
            cells = [_cell(k, r) for k in COLUMNS]
            lines.append(f"| {variant.name} | {r['seed']} | " + " | ".join(cells) + " |")
        if len(mine) > 1:
            mean = {k: statistics.fmean(r[k] for r in mine) for k in mine[0] if k != "variant"}
            mean["lowest"] = min(r["lowest"] for r in mine)
            mean["lowest_step"] = min(mine, key=lambda r: r["lowest"])["lowest_step"]
            cells = [_cell(k, mean) for k in COLUMNS]
            cells[COLUMNS.index("lowest (step)")] = f"{mean['lowest']:.1f} (min)"
            lines.append(f"| **{variant.name}** | mean | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", rows


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", choices=BUDGETS, default="cpu")
    parser.add_argument("--root", type=pathlib.Path, default=DEFAULT_ROOT, help="runs root")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"--root {args.root}: no such directory (the runs root of benchmarks.run)")
    text, rows = table(args.budget, args.root)
    if not rows:
        parser.error(f"no finished {SUITE} runs at budget {args.budget} under {args.root}")
    out = args.out or REPO / "benchmarks" / "results" / SUITE / args.budget / "dual_table.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    print(text, end="")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
