"""The CQL comparison's results from its runs: a curve table, a score table and a figure.

    python -m studies.cql_peer.report [--root runs/cql_peer] [--out studies/cql_peer/results]

Reads each run's `metrics.jsonl` (ours and d3rlpy's write the same `eval/*` lines) and writes
`curves.csv` (arm, seed, step, normalized score: the small file the rest is re-made from),
`table.md` (per arm: seeds, score at each evaluation as mean +- std over seeds, best, last) and
`curves.png` (mean over seeds with a min-max band). Unfinished runs are included as far as they
got and marked so; `--from-csv` re-makes the table and figure from a committed curves.csv.
"""

import argparse
import csv
import json
import pathlib
import sys

import numpy as np

from studies.cql_peer.run import ARMS, EVAL_EVERY, STEPS

HEADER = ("arm", "seed", "step", "normalized_score", "finished")


def read_runs(root: pathlib.Path) -> list[dict]:
    rows = []
    for arm in ARMS:
        for seed in arm.seeds:
            run_dir = root / arm.name / f"seed{seed}"
            path = run_dir / "metrics.jsonl"
            if not path.exists():
                continue
            finished = (run_dir / "summary.json").exists()
            seen = {}
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if "eval/normalized_score" in record and record["step"] <= STEPS:
                    seen.setdefault(record["step"], record["eval/normalized_score"])  # first
            for step, score in sorted(seen.items()):
                rows.append(dict(arm=arm.name, seed=seed, step=step, normalized_score=score,
                                 finished=int(finished)))  # fmt: skip
    return rows


def write_csv(rows, path: pathlib.Path):
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, HEADER, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "normalized_score": f"{row['normalized_score']:.4f}"})
    tmp.replace(path)


def read_csv(path: pathlib.Path) -> list[dict]:
    with path.open() as f:
        return [
            dict(arm=r["arm"], seed=int(r["seed"]), step=int(r["step"]),
                 normalized_score=float(r["normalized_score"]), finished=int(r["finished"]))
            for r in csv.DictReader(f)
        ]  # fmt: skip


def curves(rows, arm: str) -> dict[int, dict[int, float]]:
    """seed -> step -> score."""
    out: dict[int, dict[int, float]] = {}
    for r in rows:
        if r["arm"] == arm:
            out.setdefault(r["seed"], {})[r["step"]] = r["normalized_score"]
    return out


def table(rows) -> str:
    steps = list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    head = "| arm | seeds | " + " | ".join(f"{s // 1000}k" for s in steps) + " | best | last |"
    lines = [head, "|" + "---|" * (len(steps) + 4)]
    for arm in ARMS:
        by_seed = curves(rows, arm.name)
        if not by_seed:
            continue
        done = {r["seed"] for r in rows if r["arm"] == arm.name and r["finished"]}
        seeds = ", ".join(f"{s}" + ("" if s in done else "*") for s in sorted(by_seed))
        cells = []
        for step in steps:
            vals = [c[step] for c in by_seed.values() if step in c]
            cells.append(cell(vals))
        best = [max(c.values()) for c in by_seed.values()]
        last = [c[max(c)] for c in by_seed.values()]
        lines.append(f"| {arm.text} | {seeds} | " + " | ".join(cells)
                     + f" | {cell(best)} | {cell(last)} |")  # fmt: skip
    note = (
        "\nNormalized D4RL score, 10 deterministic episodes per evaluation (the same evaluation "
        "code for both implementations), mean ± std over the seeds listed; one seed shows its "
        "value alone. `*`: the run has not finished (its columns stop where it is).\n"
    )
    return "\n".join(lines) + "\n" + note


def cell(vals) -> str:
    if not vals:
        return ""
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{np.mean(vals):.1f} ± {np.std(vals):.1f}"


def plot(rows, path: pathlib.Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm in ARMS:
        by_seed = curves(rows, arm.name)
        if not by_seed:
            continue
        steps = sorted(set.intersection(*(set(c) for c in by_seed.values())))
        vals = np.array([[c[s] for s in steps] for c in by_seed.values()])
        x = np.array(steps) / 1000
        style = "-" if len(arm.seeds) > 1 else "--"
        (line,) = ax.plot(x, vals.mean(0), style, label=f"{arm.text} ({len(by_seed)} seeds)")
        if len(by_seed) > 1:
            ax.fill_between(x, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("offline gradient steps (thousands)")
    ax.set_ylabel("normalized score")
    ax.set_title("CQL on our hopper-medium-v2: ours vs d3rlpy (band: min-max over seeds)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="runs/cql_peer")
    parser.add_argument("--out", default="studies/cql_peer/results")
    parser.add_argument("--from-csv", action="store_true", help="re-make from OUT/curves.csv")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    if args.from_csv:
        if not (out / "curves.csv").exists():
            parser.error(f"--from-csv: {out / 'curves.csv'} does not exist")
        rows = read_csv(out / "curves.csv")
    else:
        rows = read_runs(pathlib.Path(args.root))
        if not rows:
            parser.error(
                f"--root {args.root}: no run has evaluated yet (python -m studies.cql_peer.run)"
            )
        out.mkdir(parents=True, exist_ok=True)
        write_csv(rows, out / "curves.csv")
    (out / "table.md.tmp").write_text(table(rows))
    (out / "table.md.tmp").replace(out / "table.md")
    plot(rows, out / "curves.png")
    print(f"wrote {out}/curves.csv, table.md, curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
