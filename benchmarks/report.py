"""Report a benchmark sweep beside the papers' numbers.

    python -m benchmarks.report td3c_table1 --budget cpu
    python -m benchmarks.report all --budget smoke

For every (variant, dataset) of the suite: the D4RL-normalized score at the end of pretraining,
at the end of fine-tuning, the improvement delta, and the lowest score in the first 10% of
fine-tuning (the policy-collapse measure: the minimum over the evaluations at online steps
<= 10% of the budget, or the first online evaluation if none falls that early; the pretrained
score pools every evaluation of the pretrained policy, see `read_run_dir`), each as
mean +- sample std (n - 1) over the finished seeds, beside the paper's offline -> online (delta)
from `benchmarks/reference/`. Then per variant the IQM of the final scores over all (dataset, seed)
runs with a 95% stratified-bootstrap confidence interval (rliable), and one learning-curve PNG
per dataset (mean +- sample std over seeds against online env steps; dashed: the paper's final
score).

Writes `report.md`, `runs.csv` (one row per run), `summary.csv` (one row per variant and
dataset), `aggregate.csv`, `curves.csv` (every evaluation of every run: variant, dataset, seed,
online step, score; step 0 is the pretrained policy) and `curves/<dataset>.png` under
`benchmarks/results/<suite>/<budget>/` (or `--out`). A suite's `diagnostics` (logged online
scalars, e.g. off2on's offline fraction of the RL batches and Q-ensemble AUROC, Fig. 4a-b) are
added as `diagnostics.csv` and `curves/<dataset>_diagnostics.png`. A suite's `claims` (the
papers' claims in words, e.g. "TD3 collapses early and TD3-C does not") are checked on every run,
with the thresholds below, and reported per dataset as "shows on k of n seeds" with each seed's
numbers (`claims.csv`: one row per claim, dataset and seed).
"""

import argparse
import csv
import io
import json
import math
import pathlib
import sys

import numpy as np

from benchmarks.sweep import (
    BUDGETS,
    DEFAULT_ROOT,
    REFERENCE_DIR,
    REPO,
    SweepError,
    expand,
    known_suites,
    load_suite,
    status,
)
from common.flags import ArgumentParser, Range, arg_type

SCORE = "eval/normalized_score"


# A run cut short (its machine lost, a time-limited lease ended) enters a report only when asked
# (--include-truncated) and only past this share of its online budget: its last evaluation then
# stands in for the final one, and the report names it and where it stopped.
MIN_TRUNCATED_FRACTION = 0.9


def read_run(
    job, diagnostics: tuple[str, ...] = (), pool_start: bool = True, truncated: bool = False
) -> dict | None:
    """`read_run_dir` of a sweep job with its variant, dataset and seed, or None if it has not
    finished (with `truncated`: unless its evaluations reach MIN_TRUNCATED_FRACTION of its
    online budget). `pool_start`: pool its start with its pretraining run's evaluations; off
    where one pretraining serves every seed, as only the seed it was run with could (its
    evaluation seeds match), and the seeds' starts would then differ in kind."""
    if status(job) != "finished" and not (truncated and truncated_at(job.run_dir) is not None):
        return None
    pretraining = None
    if pool_start and "--offline-checkpoint" in job.argv:
        pretraining = pathlib.Path(job.argv[job.argv.index("--offline-checkpoint") + 1]).parent
    return {"variant": job.variant, "dataset": job.dataset, "seed": job.seed,
            **read_run_dir(job.run_dir, diagnostics, pretraining)}  # fmt: skip


def truncated_at(run_dir: pathlib.Path) -> int | None:
    """The online step of an unfinished run's last evaluation, if it reaches
    MIN_TRUNCATED_FRACTION of the online budget (else None)."""
    if not (run_dir / "config.json").is_file() or not (run_dir / "metrics.jsonl").is_file():
        return None
    config = json.loads((run_dir / "config.json").read_text())
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    steps = [row["step"] - config["offline_steps"] for row in rows if SCORE in row]
    last = max(steps, default=0)
    return last if last >= MIN_TRUNCATED_FRACTION * config["online_steps"] else None


def pretraining_first(pretraining: pathlib.Path | None) -> float | None:
    """The pretraining run's own first evaluation of its final policy (summary.json's "before",
    on the episode seeds a fine-tuning's first evaluation uses), or None without one. It differs
    from a fine-tuning's first when the policies differ, and also for one policy evaluated on
    another machine: XLA's floating point differs between CPUs and walker2d amplifies it
    (td3c_table1 walker2d seed 0's TD3-BC policy: 70.8 where it was trained, 81.4 on a later
    machine, same parameters and episode seeds)."""
    if pretraining is None or not (pretraining / "summary.json").is_file():
        return None
    return json.loads((pretraining / "summary.json").read_text())[
        "normalized_score_before_finetuning"
    ]


def pretraining_evaluations(
    pretraining: pathlib.Path | None, before: float, pretraining_before: float | None
) -> list[float]:
    """The pretraining run's evaluations of its final policy (those logged at its last step: the
    periodic one and the final one, each on its own evaluation seeds), when the fine-tuning run
    demonstrably starts from that policy: its own first evaluation (`before`, seed + 10**6)
    equals the pretraining's, which used the same seeds. Otherwise (no pretraining run dir: a
    committed checkpoint; BRED's distilled policy; a pretraining shared across fine-tuning
    seeds, whose evaluation seeds differ; a pretraining run on another machine, whose floating
    point differs: see `pretraining_first`, whose value is `pretraining_before`) none."""
    if pretraining_before != before:
        return []
    last = json.loads((pretraining / "config.json").read_text())["offline_steps"]
    rows = map(json.loads, (pretraining / "metrics.jsonl").read_text().splitlines())
    return [row[SCORE] for row in rows if row["step"] == last and SCORE in row]


def read_run_dir(
    run_dir: pathlib.Path,
    diagnostics: tuple[str, ...] = (),
    pretraining: pathlib.Path | None = None,
) -> dict:
    """Scores of one finished fine-tuning run (its summary.json written): before and after
    fine-tuning, the lowest early score, the learning curve (online step 0 = the pretrained
    policy) and the named logged scalars by online step.

    The pretrained score is the claims' start, and one 10-episode evaluation of it is noisy
    (walker2d TD3-BC: 70.8, 76.0 and 83.5 for one policy), so it is the mean of every
    evaluation of that policy: the fine-tuning's first and, with `pretraining` (the run dir
    the checkpoint came from), `pretraining_evaluations`. `pretrained_evaluations` counts them."""
    config = json.loads((run_dir / "config.json").read_text())
    offline_steps, online_steps = config["offline_steps"], config["online_steps"]
    by_step = {}  # online env step -> score (the last evaluation logged at that step wins)
    traces = {key: {} for key in diagnostics}  # key -> {online env step: value}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if SCORE in row and row["step"] >= offline_steps:
            by_step[row["step"] - offline_steps] = row[SCORE]
        if row["step"] <= offline_steps:
            continue
        for key in diagnostics:
            if key in row:
                traces[key][row["step"] - offline_steps] = row[key]
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
        first, after = (summary[f"normalized_score_{k}_finetuning"] for k in ("before", "after"))
        stopped_at = online_steps
    else:  # a truncated run (see MIN_TRUNCATED_FRACTION): its last evaluation is its final one
        summary, first = {}, by_step[0]
        stopped_at = max(by_step)
        after = by_step[stopped_at]
    first_there = pretraining_first(pretraining)  # read once: pools the start, and is reported
    evaluations = [first] + pretraining_evaluations(pretraining, first, first_there)
    before = float(np.mean(evaluations))
    by_step.pop(0, None)
    curve = [(0, before)] + sorted(by_step.items())
    online = [(s, v) for s, v in curve if s > 0]
    early = [v for s, v in online if s <= 0.1 * online_steps] or [v for _, v in online[:1]]
    late = [v for s, v in online if s >= 0.9 * online_steps] or [v for _, v in online[-1:]]
    return {
        "dataset_id": summary.get("dataset", ""),  # the Minari id the run loaded
        "pretrained": before,
        "pretrained_evaluations": len(evaluations),
        # the pretraining run's own evaluation on the same episode seeds (NaN without one): equal
        # to the fine-tuning's first where the start pools, the reason named where it does not
        "pretraining_first": math.nan if first_there is None else first_there,
        "finetuned": after,
        "delta": after - before,
        "early_min": min(early) if early else math.nan,
        "late_mean": float(np.mean(late)) if late else math.nan,
        # mean of every fine-tuning evaluation: with evenly spaced evaluations, the area under
        # the learning curve per step, i.e. how fast a variant learns, not only where it ends
        "mean_online": float(np.mean([v for _, v in online])) if online else math.nan,
        "online_steps": online_steps,
        "stopped_at": stopped_at,
        "curve": curve,
        "traces": {key: sorted(t.items()) for key, t in traces.items()},
    }


def read_reference(suite) -> dict:
    """(paper method, dataset) -> row of the suite's reference CSV."""
    if not suite.reference:
        return {}
    with open(REFERENCE_DIR / suite.reference) as f:
        return {(r["method"], r["dataset"]): r for r in csv.DictReader(f)}


def mean_std(values) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"  # sample std (n - 1)


def paper_cell(ref: dict | None) -> str:
    if not ref:
        return "—"
    at = f" @ {int(ref['step']) // 1000}k" if ref.get("step") else ""
    return (
        f"{float(ref['offline']):.1f} → {float(ref['online']):.1f} ({float(ref['delta']):+.1f})"
        + at
    )


def score_at(curve: list, step: int) -> float:
    """The run's score at online step `step`: its last evaluation at or before it (NaN when the
    run stopped before `step`), so a reference measured at 100k is compared at 100k."""
    if not curve or curve[-1][0] < step:
        return math.nan
    return [v for s, v in curve if s <= step][-1]


def provenance(suite, budget, runs: list[dict], datasets: list[str], seeds: list[int]) -> list[str]:
    """Report lines on what was run where it is less than the budget's protocol, and on which
    datasets the runs loaded (generated ones are not D4RL's own data)."""
    lines = []
    if budget.offline_checkpoint or budget.pretraining_seed is not None:
        source = (
            f"the committed checkpoint `{budget.offline_checkpoint}`"
            if budget.offline_checkpoint
            else f"one pretraining per dataset (seed {budget.pretraining_seed})"
        )
        lines.append(
            f"Pretraining: every seed fine-tunes {source}, so the spread over seeds is "
            "fine-tuning variance only (the papers pretrain once per seed)."
        )
    pooled = [r for r in runs if r["pretrained_evaluations"] > 1]
    if pooled:
        counts = " or ".join(map(str, sorted({r["pretrained_evaluations"] for r in pooled})))
        where = "" if len(pooled) == len(runs) else f"on {len(pooled)} of {len(runs)} runs "
        rest = "" if len(pooled) == len(runs) else "; on the others the fine-tuning's first"
        unpaired = sorted(
            {(r["dataset"], r["seed"], r["pretraining_first"], r["pretrained"]) for r in runs
             if r["pretrained_evaluations"] == 1 and not math.isnan(r["pretraining_first"])}
        )  # fmt: skip
        if unpaired:
            rest += (
                " (" + "; ".join(
                    f"{d} seed {s}: {v:.1f} in its pretraining run, {first:.1f} in its "
                    "fine-tuning, on the same episode seeds"
                    for d, s, v, first in unpaired
                ) + ": another machine's floating point or another policy, so not pooled)"
            )  # fmt: skip
        lines.append(
            f"Start (*pretrained*, the claims' reference): {where}the mean of {counts} "
            "evaluations of the pretrained policy, each on its own seeds (its pretraining run's "
            f"two at its last step and the fine-tuning's first), as one is noisy{rest}."
        )
    elif runs:
        lines.append(
            "Start (*pretrained*, the claims' reference): the fine-tuning's first evaluation "
            "(nothing to pool it with: a committed checkpoint, one pretraining for every seed, "
            "or a policy its pretraining run did not evaluate)."
        )
    planned_datasets = suite.datasets_for(budget)
    if len(datasets) < len(planned_datasets) or seeds != sorted(set(budget.seeds)):
        lines.append(
            f"Ran here: {len(datasets)} of the budget's {len(planned_datasets)} datasets, "
            f"{len(seeds)} of its {len(budget.seeds)} seeds."
        )
    if budget.tiny_datasets:
        lines.append(
            f"Datasets: tiny random-action stand-ins ({budget.tiny_datasets} steps each, under "
            "the runs root), not D4RL data: the scores check the plumbing, not learning."
        )
        return lines
    ids = sorted({r["dataset_id"] for r in runs if r["dataset_id"]})
    if ids:
        from common.minari_io import GENERATED_NAMESPACE  # imported here: it loads gymnasium

        text = "Datasets loaded: " + ", ".join(f"`{i}`" for i in ids) + "."
        if any(i.startswith(f"{GENERATED_NAMESPACE}/") for i in ids):
            text += (
                f" The `{GENERATED_NAMESPACE}/...` datasets were generated with the D4RL recipe "
                "on gymnasium v5 MuJoCo (`benchmarks/results/datasets.md`: behaviour returns "
                "beside D4RL's); the papers used D4RL's v2 datasets on the older mujoco-py "
                "environments, so the paper column gives the scale and the ordering to expect, "
                "not an exact target."
            )
        lines.append(text)
    return lines


def truncation_lines(runs: list[dict]) -> list[str]:
    """A report line naming the runs that stopped before their online budget, if any."""
    cut = [r for r in runs if r["stopped_at"] < r["online_steps"]]
    if not cut:
        return []
    where = ", ".join(
        f"{r['variant']} seed {r['seed']} at {r['stopped_at'] / 1000:g}k" for r in cut
    )
    return [
        f"Truncated runs ({len(cut)} of {len(runs)}): {where} of "
        f"{cut[0]['online_steps'] / 1000:g}k online steps. Their *fine-tuned* score is their "
        "last evaluation, not the final one; every other number is read the same way."
    ]


def iqm_with_ci(scores: dict[str, np.ndarray], reps: int = 2000, seed: int = 0) -> dict:
    """variant -> (IQM, CI low, CI high) of [runs, tasks] score matrices (rliable).

    The bootstrap is seeded, and afresh for each variant, so a re-made report reproduces its
    intervals byte for byte and adding or dropping one variant leaves the others' unchanged.
    rliable's StratifiedBootstrap draws its resamples from NumPy's global generator whatever
    `random_state` it is given (rliable 1.2), so that generator is seeded here and then restored."""
    from rliable import library as rly
    from rliable import metrics

    def aggregate(x):
        return np.array([metrics.aggregate_iqm(x)])

    estimates, global_state = {}, np.random.get_state()
    try:
        for name, matrix in scores.items():
            np.random.seed(seed)
            points, intervals = rly.get_interval_estimates({name: matrix}, aggregate, reps=reps)
            estimates[name] = (float(points[name][0]), *map(float, intervals[name][:, 0]))
    finally:
        np.random.set_state(global_state)
    return estimates


def style_axis(ax, values=()) -> None:
    """Online steps in thousands on x; a log y axis where non-negative values' positive part spans
    more than two decades (a dual variable, a constraint; zeros are then left out)."""
    ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1000:g}k" if x else "0")
    ax.set_xlabel("online env steps")
    positive = [v for v in values if v > 0]
    if positive and min(values) >= 0 and max(positive) > 100 * min(positive):
        ax.set_yscale("log")


def align_seeds(traces: list[list]) -> tuple[list, np.ndarray]:
    """Seeds' traces [(step, value), ...] -> (the steps every trace has, values[seed, step]).
    Seeds log at the same steps unless one stopped early; then only the common steps compare."""
    steps = sorted(set.intersection(*(set(s for s, _ in t) for t in traces)))
    return steps, np.array([[dict(t)[s] for s in steps] for t in traces], dtype=float)


def plot_curves(runs: list[dict], suite, refs: dict, out: pathlib.Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for dataset in suite.datasets:
        here = [r for r in runs if r["dataset"] == dataset]
        if not here:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for i, variant in enumerate(suite.variants):
            curves = [r["curve"] for r in here if r["variant"] == variant.name]
            if not curves:
                continue
            steps, values = align_seeds(curves)
            mean, std = values.mean(0), values.std(0, ddof=1 if len(values) > 1 else 0)
            color = f"C{i}"
            ax.plot(steps, mean, color=color, label=f"{variant.name} ({n_seeds(len(curves))})")
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)
            ref = refs.get((variant.paper, dataset))
            if ref:
                ax.axhline(float(ref["online"]), color=color, ls="--", lw=0.8)
        ax.set_title(dataset, fontsize=10)
        style_axis(ax)
        ax.set_ylabel("normalized score")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{dataset}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    return written


def n_seeds(n: int) -> str:
    """A legend's seed count: "1 seed", "3 seeds"."""
    return f"{n} seed" if n == 1 else f"{n} seeds"


def seed_band(traces: list[list]) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    """Seeds' traces [(step, value), ...] -> (steps every trace has, mean, lowest, highest over
    seeds at each step). The diagnostics' band is the seeds' range, not mean +- std: a dual or a
    constraint spans decades on a log axis, where mean - std would fall below zero."""
    steps, values = align_seeds(traces)
    return steps, values.mean(0), values.min(0), values.max(0)


def plot_diagnostics(runs: list[dict], suite, out: pathlib.Path) -> list[str]:
    """One figure per dataset, one panel per diagnostic against online steps: the mean over seeds
    and, shaded, the seeds' range (lowest to highest seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = suite.diagnostics
    written = []
    for dataset in suite.datasets:
        here = [r for r in runs if r["dataset"] == dataset]
        if not here or not keys:
            continue
        cols = min(len(keys), 4)  # at most 4 panels a row
        rows = -(-len(keys) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        for ax in axes.flat[len(keys) :]:
            ax.set_visible(False)
        for ax, key in zip(axes.flat, keys, strict=False):
            plotted = []
            for i, variant in enumerate(suite.variants):
                traces = [r["traces"][key] for r in here if r["variant"] == variant.name]
                traces = [t for t in traces if t]
                if not traces:
                    continue
                steps, mean, lowest, highest = seed_band(traces)
                label = f"{variant.name} ({n_seeds(len(traces))})"
                ax.plot(steps, mean, color=f"C{i}", label=label)
                if len(traces) > 1:
                    ax.fill_between(steps, lowest, highest, color=f"C{i}", alpha=0.2, lw=0)
                plotted += [*lowest, *highest]
            ax.set_title(key, fontsize=9)
            style_axis(ax, plotted)
            ax.legend(fontsize=7)
        fig.suptitle(f"{dataset}: mean over seeds, shaded: the seeds' range", fontsize=10)
        fig.tight_layout()
        path = out / f"{dataset}_diagnostics.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    return written


def significant(value: float, digits: int = 6) -> float:
    """`value` to `digits` significant digits: diagnostics span decades (TD3-C's constraint is
    ~1e-5, its dual ~1e3), so a fixed number of decimals would erase the small ones."""
    return float(f"{value:.{digits}g}")


def write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(buf.getvalue())
    tmp.replace(path)


# The claims' thresholds, in D4RL normalized points (sweep.CLAIM_KINDS says what each kind means).
COLLAPSE_FRACTION = 0.5  # collapsed: the lowest early evaluation is below half the start
FLAT_BAND = 10.0  # flat: the late mean within +-10 points of the start; improves: above +10
TESTABLE_START = 10.0  # below this start, a collapse cannot be told from the start


def check_claim(claim, run: dict, other: dict | None = None) -> tuple[bool | None, str]:
    """Whether one run shows `claim` (None: not testable on it) and the numbers that say so."""
    start, early, late = run["pretrained"], run["early_min"], run["late_mean"]
    needed = (start, early) if claim.kind in ("collapses", "holds") else (start, late)
    if any(math.isnan(x) for x in needed):  # a run without online evaluations
        return None, "no evaluation"
    if claim.kind in ("collapses", "holds"):
        if start < TESTABLE_START:
            return None, f"start {start:.1f} < {TESTABLE_START:.0f}"
        collapsed = early < COLLAPSE_FRACTION * start
        return collapsed == (claim.kind == "collapses"), f"{start:.1f} ↓ {early:.1f}"
    if claim.kind in ("flat", "improves"):
        change = late - start
        shows = abs(change) <= FLAT_BAND if claim.kind == "flat" else change > FLAT_BAND
        return shows, f"{start:.1f} → {late:.1f}"
    # beats / learns_faster: the late means / the means over all of fine-tuning, same seed
    key = "late_mean" if claim.kind == "beats" else "mean_online"
    mine = run[key]
    if other is None or math.isnan(other[key]):  # the other has not finished
        return None, f"{mine:.1f} vs —"
    return mine > other[key], f"{mine:.1f} vs {other[key]:.1f}"


def claim_rows(suite, runs: list[dict], datasets: list[str]) -> list[dict]:
    """One row per (claim, dataset, seed) with a finished run of the claim's variant."""
    by_key = {(r["variant"], r["dataset"], r["seed"]): r for r in runs}
    rows = []
    for claim in suite.claims:
        for dataset in datasets:
            seeds = sorted(s for v, d, s in by_key if v == claim.variant and d == dataset)
            for seed in seeds:
                run = by_key[(claim.variant, dataset, seed)]
                other = by_key.get((claim.than, dataset, seed)) if claim.than else None
                shows, numbers = check_claim(claim, run, other)
                rows.append(
                    {"claim": claim.text, "kind": claim.kind, "variant": claim.variant,
                     "than": claim.than or "", "dataset": dataset, "seed": seed,
                     "shows": "" if shows is None else shows, "numbers": numbers,
                     "pretrained": run["pretrained"], "lowest_early": run["early_min"],
                     "late_mean": round(run["late_mean"], 3),
                     "other_late_mean": round(other["late_mean"], 3) if other else "",
                     "mean_online": round(run["mean_online"], 3),
                     "other_mean_online": round(other["mean_online"], 3) if other else ""}
                )  # fmt: skip
    return rows


def claims_section(suite, rows: list[dict], datasets: list[str], refs: dict) -> list[str]:
    """The report's per-claim, per-dataset table: on how many seeds each claim shows, each seed's
    numbers, and the paper's offline -> online for the claim's variant."""
    lines = [
        "## The papers' claims, per dataset",
        "",
        f"Per run: *collapses* / *does not collapse*: the lowest evaluation in the first 10% of "
        f"fine-tuning is below / at least {COLLAPSE_FRACTION:g} x the pretrained score (numbers: "
        f"pretrained ↓ lowest early; not testable from a pretrained score below "
        f"{TESTABLE_START:g}); *flat* / *improves*: the mean of the evaluations in the last 10% of "
        f"fine-tuning is within / more than {FLAT_BAND:g} points above the pretrained score "
        f"(numbers: pretrained → late mean); *beats*: its late mean is above the other variant's "
        "on the same seed (numbers: the two late means); *learns faster*: the mean of all its "
        "fine-tuning evaluations (the area under its learning curve) is above the other "
        "variant's on the same seed. *paper*: the claim's variant in the "
        "paper's table, offline → online.",
    ]

    def verdict(claim, dataset) -> str:
        """ "k of n seeds" on which the claim shows ("—": no finished run)."""
        mine = [r for r in rows if r["claim"] == claim.text and r["dataset"] == dataset]
        tested = [r for r in mine if r["shows"] != ""]
        if not tested:
            return "not testable" if mine else "—"
        shown = sum(bool(r["shows"]) for r in tested)
        return f"{shown} of {len(tested)} {'seed' if len(tested) == 1 else 'seeds'}"

    # At a glance: claims by datasets, then the numbers behind each cell.
    lines += [
        "",
        "| claim | " + " | ".join(datasets) + " |",
        "|---|" + "---|" * len(datasets),
        *[
            f"| {c.text} | " + " | ".join(verdict(c, d) for d in datasets) + " |"
            for c in suite.claims
        ],  # fmt: skip
        "",
        "| claim | dataset | shows on | per seed | paper |",
        "|---|---|---|---|---|",
    ]
    paper_names = {v.name: v.paper for v in suite.variants}
    for claim in suite.claims:
        for dataset in datasets:
            mine = [r for r in rows if r["claim"] == claim.text and r["dataset"] == dataset]
            if not mine:
                continue
            per_seed = "; ".join(
                f"seed {r['seed']}: {r['numbers']}"
                + ("" if r["shows"] == "" else " yes" if r["shows"] else " no")
                for r in mine
            )
            paper = paper_cell(refs.get((paper_names[claim.variant], dataset)))
            cell = verdict(claim, dataset)
            lines.append(f"| {claim.text} | {dataset} | {cell} | {per_seed} | {paper} |")
    return lines


def report(
    suite_name: str,
    budget_name: str,
    root: pathlib.Path,
    out: pathlib.Path | None,
    datasets: list[str] | None = None,
    seeds: list[int] | None = None,
    truncated: bool = False,
    notes: list[str] | None = None,
    command: str | None = None,
):
    """Write the suite's report; `datasets` / `seeds` restrict it like the runner's flags,
    `truncated` admits runs cut short near their end (see MIN_TRUNCATED_FRACTION), `notes`
    are provenance paragraphs the runs cannot record (e.g. the machine they ran on), and
    `command` is the command line that re-makes the report (written into it)."""
    suite = load_suite(suite_name)
    budget = suite.budget(budget_name)
    out = out or REPO / "benchmarks" / "results" / suite.name / budget.name
    out.mkdir(parents=True, exist_ok=True)
    jobs = [j for j in expand(suite, budget, root, datasets, seeds) if j.variant != "pretrain"]
    pool_start = budget.pretraining_seed is None  # a pretraining per seed
    runs = [read_run(j, suite.diagnostics, pool_start, truncated) for j in jobs]
    runs = [r for r in runs if r is not None]
    refs = read_reference(suite)
    datasets = list(datasets or suite.datasets_for(budget))
    seeds = sorted(set(seeds if seeds is not None else budget.seeds))

    rows = []
    for dataset in datasets:
        for variant in suite.variants:
            mine = [r for r in runs if r["variant"] == variant.name and r["dataset"] == dataset]
            ref = refs.get((variant.paper, dataset))
            rows.append(
                {
                    "variant": variant.name,
                    "dataset": dataset,
                    "seeds": len(mine),
                    "pretrained": mean_std([r["pretrained"] for r in mine]),
                    "finetuned": mean_std([r["finetuned"] for r in mine]),
                    "delta": mean_std([r["delta"] for r in mine]),
                    "early_min": mean_std([r["early_min"] for r in mine]),
                    "mean_online": mean_std([r["mean_online"] for r in mine]),
                    "at_paper_step": mean_std(
                        [score_at(r["curve"], int(ref["step"])) for r in mine]
                        if ref and ref.get("step")
                        else []
                    ),
                    "paper": paper_cell(ref),
                    "paper_method": variant.paper or "",
                }
            )
    write_csv(out / "summary.csv", rows)
    plain = [{k: v for k, v in r.items() if k not in ("curve", "traces")} for r in runs]
    write_csv(out / "runs.csv", plain)
    write_csv(
        out / "curves.csv",
        [
            {"variant": r["variant"], "dataset": r["dataset"], "seed": r["seed"],
             "online_step": step, "normalized_score": round(score, 3)}
            for r in runs
            for step, score in r["curve"]
        ],
    )  # fmt: skip

    # rliable's IQM takes a [runs, tasks] matrix, so a dataset enters a variant's IQM only with
    # every requested seed finished; the report names the datasets left out.
    aggregate_rows = []
    scores = {}
    left_out = []  # (variant, dataset, seeds missing)
    for variant in suite.variants:
        complete = []
        for dataset in datasets:
            by_seed = {
                r["seed"]: r["finetuned"]
                for r in runs
                if r["variant"] == variant.name and r["dataset"] == dataset
            }
            missing = [s for s in seeds if s not in by_seed]
            if missing:
                left_out.append((variant.name, dataset, missing))
            else:
                complete.append([by_seed[s] for s in seeds])
        if complete:
            scores[variant.name] = np.array(complete).T  # [seeds, datasets]
    if scores:
        for name, (point, low, high) in iqm_with_ci(scores).items():
            aggregate_rows.append(
                {"variant": name, "tasks": scores[name].shape[1], "runs": scores[name].size,
                 "iqm_final": round(point, 2), "ci_low": round(low, 2), "ci_high": round(high, 2)}
            )  # fmt: skip
    write_csv(out / "aggregate.csv", aggregate_rows)
    claims = claim_rows(suite, runs, datasets)
    if suite.claims:
        write_csv(out / "claims.csv", claims)
    pngs = plot_curves(runs, suite, refs, out / "curves")
    if suite.diagnostics:
        write_csv(
            out / "diagnostics.csv",
            [
                {"variant": r["variant"], "dataset": r["dataset"], "seed": r["seed"],
                 "online_step": step, "metric": key, "value": significant(value)}
                for r in runs
                for key, trace in r["traces"].items()
                for step, value in trace
            ],
        )  # fmt: skip
        pngs += plot_diagnostics(runs, suite, out / "curves")

    scripts = f"`{suite.script_path}`" + "".join(
        f" (variant {name}: `{path}`)" for name, path in suite.variant_scripts().items()
    )
    lines = [
        f"# {suite.title} — budget `{budget.name}`",
        "",
        f"Budget: {budget.description}. Algorithm file: {scripts}; seeds "
        f"{', '.join(map(str, seeds))}; {len(runs)} finished fine-tuning runs.",
        "",
        *[x for line in provenance(suite, budget, runs, datasets, seeds) for x in (line, "")],
        *[x for line in truncation_lines(runs) + list(notes or []) for x in (line, "")],
        *(
            [
                f"Made by `{command}`"
                + (" (each NOTE: a paragraph above, verbatim)" if notes else "")
                + "; from the same runs it writes the same tables and intervals (the bootstrap is "
                "seeded).",
                "",
            ]
            if command
            else []
        ),
        "D4RL normalized scores, mean ± sample std (n − 1) over seeds. *pretrained*: end of "
        "offline training (the start above); "
        "*fine-tuned*: end of the online budget; *lowest early*: lowest evaluation in the first "
        "10% of fine-tuning (policy collapse); *mean over fine-tuning*: the mean of all its "
        "evaluations (the area under the learning curve per step: how fast it learns). "
        + (
            f"*paper*: offline → online (δ) @ the online step it was measured at, from "
            f"`benchmarks/reference/{suite.reference}` (see its README for the source and "
            "protocol); *at paper's step*: our score at that step (the evaluation at or before "
            "it), the number to set beside the paper's."
            if suite.reference
            else "*paper*: the paper reports no numbers for this comparison."
        ),
        "",
        "| dataset | variant | seeds | pretrained | fine-tuned | δ | lowest early "
        "| mean over fine-tuning | at paper's step | paper |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['variant']} | {r['seeds']} | {r['pretrained']} | "
            f"{r['finetuned']} | {r['delta']} | {r['early_min']} | {r['mean_online']} | "
            f"{r['at_paper_step']} | "
            f"{r['paper']} |"
        )
    lines += ["", "## Aggregate (IQM of final scores, 95% stratified bootstrap CI, rliable)", ""]
    if aggregate_rows:
        lines += ["| variant | tasks | runs | IQM | 95% CI |", "|---|---|---|---|---|"]
        lines += [
            f"| {a['variant']} | {a['tasks']} | {a['runs']} | {a['iqm_final']:.1f} | "
            f"[{a['ci_low']:.1f}, {a['ci_high']:.1f}] |"
            for a in aggregate_rows
        ]
    else:
        lines.append("No variant has every seed of any dataset finished yet.")
    if aggregate_rows and left_out:
        lines += [
            "",
            "Left out of the IQM (a dataset enters a variant's IQM only with every seed "
            "finished): "
            + "; ".join(
                f"{v} on {d} (seed{'s' if len(m) > 1 else ''} {', '.join(map(str, m))} "
                "not finished)"
                for v, d, m in left_out
            )
            + ".",
        ]
    if claims:
        lines += ["", *claims_section(suite, claims, datasets, refs)]
    if pngs:
        lines += ["", "## Learning curves", ""]
        lines += [f"![{p[:-4]}](curves/{p})" for p in pngs]
    tmp = out / "report.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "report.md")
    return out, rows


def remake_command(suite_name: str, args: argparse.Namespace, datasets: list[str] | None) -> str:
    """The command line that re-makes one suite's report from these arguments (run in the repo
    root); each --note's text is written NOTE, as the report quotes it in full."""

    def shown(path: pathlib.Path) -> pathlib.Path:  # relative to the repo root where inside it
        path = path.resolve()
        return path.relative_to(REPO) if path.is_relative_to(REPO) else path

    parts = [f"python -m benchmarks.report {suite_name} --budget {args.budget}"]
    if args.root.resolve() != DEFAULT_ROOT.resolve():
        parts.append(f"--root {shown(args.root)}")
    if args.out is not None:
        parts.append(f"--out {shown(args.out)}")
    if datasets:
        parts.append("--datasets " + " ".join(datasets))
    if args.seeds is not None:
        parts.append("--seeds " + " ".join(map(str, args.seeds)))
    if args.include_truncated:
        parts.append("--include-truncated")
    parts += ["--note NOTE"] * len(args.note)
    return " ".join(parts)


def make_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Report benchmark suites (see module docstring).")
    parser.add_argument("suites", nargs="+", help=f"suite names or 'all': {known_suites()}")
    parser.add_argument("--budget", choices=BUDGETS, required=True)
    parser.add_argument("--root", type=pathlib.Path, default=DEFAULT_ROOT, help="runs root")
    parser.add_argument("--out", type=pathlib.Path, help="output folder (one suite only)")
    parser.add_argument("--datasets", nargs="+", help="only these datasets (as for the runner)")
    parser.add_argument(
        "--seeds", nargs="+", type=arg_type(int, Range(0, 2**32 - 1)),
        help="these seeds instead of the budget's",
    )  # fmt: skip
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 unless every (variant, dataset) has results"
    )
    parser.add_argument(
        "--include-truncated",
        action="store_true",
        # argparse %-formats help strings: the percent sign is written %%.
        help=f"also report unfinished runs whose evaluations reach "
        f"{MIN_TRUNCATED_FRACTION:.0%}% of the online budget (named in the report)",
    )
    parser.add_argument(
        "--note", action="append", default=[], help="a provenance paragraph to add (repeatable)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"--root {args.root}: no such directory (the runs root of benchmarks.run)")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out}: is a file, not a directory")
    missing = []
    names = known_suites() if args.suites == ["all"] else args.suites
    if args.out and len(names) > 1:
        print("error: --out takes one suite; drop it to write each under benchmarks/results/")
        return 2
    try:
        for name in names:
            suite_datasets = load_suite(name).datasets
            datasets = [d for d in args.datasets or [] if d in suite_datasets] or None
            if args.datasets and datasets is None:
                continue
            out, rows = report(
                name, args.budget, args.root, args.out, datasets, args.seeds,
                args.include_truncated, args.note, remake_command(name, args, datasets),
            )  # fmt: skip
            done = sum(r["seeds"] > 0 for r in rows)
            print(f"{name}: {done}/{len(rows)} (variant, dataset) rows with results -> {out}")
            missing += [f"{name}: {r['variant']} on {r['dataset']}" for r in rows if not r["seeds"]]
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.strict and missing:
        print(f"error: no finished run for {len(missing)} rows: {'; '.join(missing)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
