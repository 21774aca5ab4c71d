"""`make demo`: each method beside its naive counterpart, from the committed agents, in minutes.

One figure with a panel per method and one table (per method: the paper's claim, what this run
shows, the 3-seed report), written to `<root>/demo.{png,md,csv}`:

- TD3-C vs TD3 and ACA vs SAC -> SAC run live: the first `--online-steps` of fine-tuning from the
  committed TD3-BC and SAC+ML agents of walker2d-medium-v2 (pretrained/), the dataset where TD3
  and SAC -> SAC collapse early on every seed of their reports.
- BRED vs uniform replay and balanced replay vs online samples only are read from the committed
  3-seed runs (benchmarks/logs/, fine-tuned from pretrained/hopper-medium-v2/cql_n5_200k): the N=5
  CQL ensemble fine-tunes at about 20 updates/s per CPU core, so its first epoch alone (10,000
  updates) takes longer than this demo. Their suites re-run them (`python -m benchmarks.run
  off2on_fig3 --budget cpu`, `bred_fig3`: hours on a CPU, minutes on a GPU).

    python -m benchmarks.demo [--online-steps 5000] [--seed 0] [--root runs/demo_<time>]

The dataset is generated first if it is missing (about 3 minutes); the runs then share the cores,
one per core. One progress bar covers the whole demo, its ETA from estimated costs.
"""

import csv
import dataclasses
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import time
import types

from benchmarks import report
from common.checkpoints import atomic_write_bytes, atomic_write_text
from common.flags import ArgumentParser, Range, arg_type

REPO = pathlib.Path(__file__).resolve().parents[1]

LOGS = REPO / "benchmarks" / "logs"
RESULTS = REPO / "benchmarks" / "results"


@dataclasses.dataclass(frozen=True)
class Arm:
    label: str  # in the legend and the table
    variant: str  # the suite's variant name (its folder under benchmarks/logs/<suite>/...)
    flags: tuple[str, ...] = ()  # added to the panel's command for a live run


@dataclasses.dataclass(frozen=True)
class Panel:
    method: str
    script: str  # algorithms/<script>
    dataset: str
    agent: str  # a committed agent by name (pretrained/<agent>)
    arms: tuple[Arm, Arm]  # the method, its naive counterpart
    claim: str  # the paper's claim in words
    suite: str  # the suite whose committed runs and report hold the 3-seed evidence
    budget: str
    report_claims: tuple[str, ...]  # the suite's claims summarised in the table
    live: bool  # run live (False: read the suite's committed runs)
    # the claim's checks: (report.check_claim kind, arm label, the other arm's label or None)
    checks: tuple[tuple[str, str, str | None], ...] = ()


PANELS = (
    Panel(
        "TD3-C", "td3_c.py", "walker2d-medium-v2", "walker2d-medium-v2/td3bc_500k",
        (Arm("TD3-C", "td3c"), Arm("TD3", "td3", ("--finetune", "td3"))),
        "TD3 fine-tuned from TD3-BC collapses early; TD3-C's trust region does not",
        "td3c_table1", "paper", ("TD3-C does not collapse", "TD3 collapses early"), live=True,
        checks=(("collapses", "TD3", None), ("holds", "TD3-C", None)),
    ),
    Panel(
        "ACA", "aca.py", "walker2d-medium-v2", "walker2d-medium-v2/sacml_500k",
        (Arm("ACA", "aca"), Arm("SAC -> SAC", "sac", ("--finetune", "sac"))),
        "SAC -> SAC drops early; ACA does not",
        "aca_table2", "paper", ("ACA does not drop", "SAC -> SAC drops early"), live=True,
        checks=(("collapses", "SAC -> SAC", None), ("holds", "ACA", None)),
    ),
    Panel(
        "BRED", "bred.py", "hopper-medium-v2", "hopper-medium-v2/cql_n5_200k",
        (Arm("BRED", "bred", ("--replay", "balanced")),
         Arm("uniform replay", "uniform", ("--replay", "uniform"))),
        "BRED beats uniform replay and learns faster",
        "bred_fig3", "cpu", ("BRED beats uniform replay", "BRED learns faster than uniform replay"),
        live=False, checks=(("learns_faster", "BRED", "uniform replay"),
                            ("beats", "BRED", "uniform replay")),
    ),
    Panel(
        "balanced replay", "off2on_balanced.py", "hopper-medium-v2", "hopper-medium-v2/cql_n5_200k",
        (Arm("balanced replay", "balanced", ("--replay", "balanced")),
         Arm("online samples only", "online_only", ("--replay", "online-only"))),
        "online samples only collapse early (Fig. 4c); balanced replay does not, and beats them",
        "off2on_fig3", "cpu",
        ("Balanced replay beats online samples only", "Balanced replay beats uniform replay"),
        live=False, checks=(("collapses", "online samples only", None),
                            ("beats", "balanced replay", "online samples only")),
    ),
)  # fmt: skip

# Estimated costs in seconds on one CPU core (measured on the project's 2-core machine), for the
# progress bar's ETA: a 1M-step dataset, a live run per 1000 online steps.
GENERATE_SECONDS = 120
SECONDS_PER_1000_STEPS = {"td3_c.py": 13, "aca.py": 15}
START_SECONDS = 15  # a run's start: imports, dataset load, compilation


def make_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m benchmarks.demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--online-steps", type=arg_type(int, Range(1)), default=5_000,
        help="env steps of fine-tuning per live run",
    )  # fmt: skip
    parser.add_argument(
        "--eval-every", type=arg_type(int, Range(1)), default=500,
        help="env steps between evaluations of a live run (divides --online-steps)",
    )  # fmt: skip
    parser.add_argument("--eval-episodes", type=arg_type(int, Range(1)), default=10)
    parser.add_argument("--seed", type=arg_type(int, Range(0, 2**32 - 1)), default=0)
    parser.add_argument(
        "--workers", type=arg_type(int, Range(1)), default=min(os.cpu_count() or 1, 4),
        help="runs at once (default: one per core, at most 4)",
    )  # fmt: skip
    parser.add_argument(
        "--root", type=pathlib.Path, help="output folder (default runs/demo_<time>)"
    )
    return parser


# --- running: one progress bar over every job -------------------------------------------------


@dataclasses.dataclass
class Job:
    name: str
    command: list[str]
    cost: float  # estimated wall-clock seconds, for the ETA
    log: pathlib.Path
    progress: object  # () -> fraction done in [0, 1]
    process: subprocess.Popen | None = None
    core: int | None = None


def tqdm_fraction(text: str) -> float:
    """The fraction done in the last `n/total` a tqdm bar wrote to `text` (0 where none)."""
    found = re.findall(r"(\d+)/(\d+) \[", text[-4000:])
    if not found:
        return 0.0
    done, total = map(int, found[-1])
    return min(done / total, 1.0) if total else 0.0


def run_fraction(run_dir: pathlib.Path, online_steps: int) -> float:
    """The online steps a run has logged (metrics.jsonl, after its config.json) over its total."""
    try:
        offline = int(json.loads((run_dir / "config.json").read_text())["offline_steps"])
        text = (run_dir / "metrics.jsonl").read_text()
    except (OSError, ValueError, KeyError):
        return 0.0
    steps = [int(s) for s in re.findall(r'"step": (\d+)', text)]
    return min(max((max(steps, default=offline) - offline) / online_steps, 0.0), 1.0)


def run_jobs(jobs: list[Job], workers: int, bar, offset: float = 0.0) -> None:
    """Run `jobs` `workers` at a time (each pinned to its own core where the OS allows), moving
    `bar` (in estimated seconds, from `offset`) once a second. Raises RuntimeError naming a
    failed job's log, the other jobs stopped."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    waiting, running, done = list(jobs), [], 0.0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / "runs" / "jax_cache"))
    while waiting or running:
        while waiting and len(running) < workers:
            job = waiting.pop(0)
            busy = {j.core for j in running}
            job.core = next((c for c in cores if c not in busy), None)
            pin = None if job.core is None else (lambda c=job.core: os.sched_setaffinity(0, {c}))
            with open(job.log, "w") as log:
                job.process = subprocess.Popen(
                    job.command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                    preexec_fn=pin,
                )  # fmt: skip
            running.append(job)
        time.sleep(1.0)
        for job in list(running):
            if job.process.poll() is not None:
                running.remove(job)
                if job.process.returncode:
                    for other in running:
                        other.process.terminate()
                    raise RuntimeError(f"{job.name} failed; its log is {job.log}")
                done += job.cost
        bar.n = round(offset + done + sum(j.cost * j.progress() for j in running), 1)
        bar.refresh()


# --- reading the runs and checking the claims -------------------------------------------------


def committed_runs(panel: Panel, arm: Arm) -> list[pathlib.Path]:
    """The committed runs of `arm` (one per seed) in the panel's suite: finished, or stopped past
    the report's MIN_TRUNCATED_FRACTION of their budget (read as its report reads them)."""
    base = LOGS / panel.suite / panel.budget / panel.dataset
    found = sorted(base.glob(f"seed*/{arm.variant}"))
    return [p for p in found if (p / "summary.json").is_file() or report.truncated_at(p)]


def live_run_dir(root: pathlib.Path, panel: Panel, arm: Arm) -> pathlib.Path:
    """Where a live arm's run writes, e.g. <root>/td3_c_td3c."""
    return root / f"{panel.script.removesuffix('.py')}_{arm.variant}"


def demo_window(run: dict) -> dict:
    """A short live run's claims over its whole window: the first few thousand steps of fine-
    tuning lie inside the reports' early window (the first 10% of 100k-250k steps), so the
    lowest evaluation of the window is its lowest early score."""
    online = [v for s, v in run["curve"] if s > 0]
    return {**run, "early_min": min(online) if online else math.nan}


PHRASES = {"collapses": "collapses", "holds": "does not collapse", "beats": "ends above",
           "learns_faster": "learns faster than"}  # fmt: skip


def shows(panel: Panel, runs: dict[str, list[dict]], live: bool) -> tuple[str, bool]:
    """What the runs show of the panel's claim: each check with its numbers (per seed where
    there are several) and whether every check holds on every run."""
    parts, shown = [], True
    for kind, label, other in panel.checks:
        mine = [demo_window(r) if live else r for r in runs[label]]
        theirs = runs[other] if other else [None] * len(mine)
        results = [report.check_claim(types.SimpleNamespace(kind=kind), a, b)
                   for a, b in zip(mine, theirs, strict=True)]  # fmt: skip
        count = sum(bool(ok) for ok, _ in results)
        numbers = ", ".join(n for _, n in results)
        what = f"{label} {PHRASES[kind]}{' ' + other if other else ''}"
        if len(results) == 1:
            parts.append(f"{what if count else 'not: ' + what} ({numbers})")
        else:
            parts.append(f"{what} on {count}/{len(results)} seeds ({numbers})")
        shown &= count == len(results)
    return "; ".join(parts), shown


def report_summary(panel: Panel) -> str:
    """The suite's committed report: on how many (dataset, seed) runs each claim shows, on the
    panel's dataset and on all of the report's."""
    folder = RESULTS / panel.suite / panel.budget
    rows = list(csv.DictReader((folder / "claims.csv").read_text().splitlines()))
    said = []
    for claim in panel.report_claims:
        tested = [r for r in rows if r["claim"] == claim and r["shows"] in ("True", "False")]
        here = [r for r in tested if r["dataset"] == panel.dataset]

        def count(found):
            return f"{sum(r['shows'] == 'True' for r in found)}/{len(found)}"

        in_all = f" ({count(tested)} in all)" if len(here) < len(tested) else ""
        said.append(f"{claim}: {count(here)} seeds{in_all}")
    return f"{panel.dataset}: {'; '.join(said)} ({folder.relative_to(REPO)}/report.md)"


# --- the figure and the table -----------------------------------------------------------------


def plot(panels: list[tuple[Panel, dict, bool, bool]], seed: int) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.4))
    for ax, (panel, runs, live, shown) in zip(axes.flat, panels, strict=True):
        for i, arm in enumerate(panel.arms):
            found = runs[arm.label]
            if len(found) == 1:
                steps, scores = zip(*found[0]["curve"], strict=True)
                ax.plot(steps, scores, color=f"C{i}", marker=".", label=arm.label)
            else:
                steps, mean, low, high = report.seed_band([r["curve"] for r in found])
                ax.plot(steps, mean, color=f"C{i}", label=f"{arm.label} ({len(found)} seeds)")
                ax.fill_between(steps, low, high, color=f"C{i}", alpha=0.2)
        where = f"this run, seed {seed}" if live else "committed runs, seeds' range"
        verdict = "the paper's claim shows" if shown else "the paper's claim does NOT show"
        ax.set_title(f"{panel.method}: {panel.dataset} ({where})\n{verdict}", fontsize=9)
        report.style_axis(ax)
        ax.set_ylabel("normalized score")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    return png.getvalue()


def table(rows: list[dict]) -> str:
    head = ["method", "paper's claim", "what the runs show", "claim", "3-seed report"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], r["claim"], r["shows"], r["verdict"], r["report"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.online_steps % args.eval_every:
        parser.error(
            f"--eval-every {args.eval_every}: must divide --online-steps {args.online_steps}"
        )
    root = args.root or REPO / "runs" / f"demo_{time.strftime('%Y%m%d-%H%M%S')}"
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        parser.error(f"--root {root}: exists and is not an empty folder; choose another")
    from tqdm import tqdm

    from common.datasets import DatasetError, resolve

    started = time.time()
    live = [p for p in PANELS if p.live]
    root.mkdir(parents=True, exist_ok=True)
    setup, jobs = [], []
    for dataset in sorted({p.dataset for p in live}):
        try:
            resolve(dataset, allow_download=False)
        except DatasetError:
            env_name, split = dataset.split("-", 1)
            log = root / f"generate_{dataset}.log"
            cmd = [sys.executable, "benchmarks/make_datasets.py", "--env", env_name,
                   "--splits", split.removesuffix("-v2")]  # fmt: skip
            progress = lambda log=log: tqdm_fraction(log.read_text(errors="replace"))
            setup.append(Job(f"generate {dataset}", cmd, GENERATE_SECONDS, log, progress))
    for panel in live:
        for arm in panel.arms:
            run_dir = live_run_dir(root, panel, arm)
            cmd = [sys.executable, f"algorithms/{panel.script}", "--env", panel.dataset,
                   "--offline-checkpoint", panel.agent, "--online-steps", str(args.online_steps),
                   "--eval-every", str(args.eval_every), "--eval-episodes", str(args.eval_episodes),
                   "--seed", str(args.seed), "--run-dir", str(run_dir), *arm.flags]  # fmt: skip
            cmd += ["--log-every", str(math.gcd(args.eval_every, 1000))]
            cost = START_SECONDS + SECONDS_PER_1000_STEPS[panel.script] * args.online_steps / 1000
            progress = lambda d=run_dir: run_fraction(d, args.online_steps)
            log = root / f"{run_dir.name}.log"
            jobs.append(Job(f"{panel.method}: {arm.label}", cmd, cost, log, progress))
    # The bar counts wall-clock seconds: runs side by side share it
    for job in jobs:
        job.cost /= min(args.workers, len(jobs))
    total = sum(j.cost for j in setup + jobs)
    print(f"demo: {len(setup)} dataset(s) to generate, {len(jobs)} runs of {args.online_steps} "
          f"online steps, {args.workers} at a time; logs in {root}", flush=True)  # fmt: skip
    fmt = "{l_bar}{bar}| {percentage:.0f}% [{elapsed}<{remaining}]"
    try:
        with tqdm(total=total, desc="demo", bar_format=fmt, mininterval=1.0) as bar:
            run_jobs(setup, 1, bar)  # the runs read the dataset: it exists before they start
            run_jobs(jobs, args.workers, bar, offset=sum(j.cost for j in setup))
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        for job in setup + jobs:
            if job.process and job.process.poll() is None:
                job.process.terminate()
        print(f"\ndemo interrupted; its runs so far are in {root}", file=sys.stderr)
        return 130

    rows, panels, csv_rows = [], [], []
    for panel in PANELS:
        is_live = panel in live
        runs = {}
        for arm in panel.arms:
            if is_live:
                runs[arm.label] = [report.read_run_dir(live_run_dir(root, panel, arm))]
            else:
                runs[arm.label] = [report.read_run_dir(p) for p in committed_runs(panel, arm)]
        said, shown = shows(panel, runs, is_live)
        where = "" if is_live else " (committed runs, not re-run)"
        rows.append({"method": panel.method, "claim": panel.claim, "shows": said + where,
                     "verdict": "shown" if shown else "**not shown**",
                     "report": report_summary(panel)})  # fmt: skip
        panels.append((panel, runs, is_live, shown))
        for arm in panel.arms:
            for i, run in enumerate(runs[arm.label]):
                for step, score in run["curve"]:
                    csv_rows.append(
                        {"method": panel.method, "arm": arm.label, "live": is_live,
                         "seed": args.seed if is_live else i, "online_step": step,
                         "normalized_score": round(score, 3)}
                    )  # fmt: skip
    text = table(rows)
    minutes, seconds = divmod(round(time.time() - started), 60)
    note = (
        f"\nLive runs: one seed ({args.seed}) over the first {args.online_steps} online steps "
        f"(the reports: 3 seeds, 100k-250k steps). Ran in {minutes} min {seconds} s.\n"
    )
    atomic_write_text(root / "demo.md", text + note)
    report.write_csv(root / "demo.csv", csv_rows)
    png = plot(panels, args.seed)
    atomic_write_bytes(root / "demo.png", lambda f: f.write(png))
    print("\n" + text + note + f"wrote {root}/demo.png, demo.md and demo.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
