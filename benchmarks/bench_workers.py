"""Do two sweep workers finish a paper sweep sooner than one on this machine?

    python -m benchmarks.bench_workers [--only td3bc_offline td3c_online] [--out FILE]

`benchmarks.run --workers N` runs N algorithm processes at once. Whether N = 2 beats N = 1 on a
small machine depends on the workload: a jitted offline update is XLA compute that can already
use several cores, while fine-tuning alternates a single-threaded MuJoCo step with one small
update. So for each workload of the TD3-C and ACA paper sweeps this runs the algorithm script
as the runner does (same flags, generated hopper-medium-v2), once alone, then as two jobs at
once (seeds 0 and 1) sharing every CPU, then as two jobs each pinned to half the CPUs (as the
runner's workers are unless `--no-pin-cores`; Linux only), and reads each job's steady-state
rate from its metrics.jsonl: steps between the second and the last logged line over their time
stamps, so start-up, dataset loading and compilation are left out. speedup = (sum of the two
concurrent rates) / (rate alone): above 1, two workers finish a sweep sooner;
pinned_over_unpinned compares the two pairs. Fine-tuning workloads start from a short
pretraining made first (its quality does not change the cost of an update).

Writes benchmarks/results/workers_<cpus>cpu.json (`--out` to choose) and prints it.
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from benchmarks.machine import machine_info
from benchmarks.run import child_setup, core_groups
from common.checkpoints import atomic_write_text
from common.flags import ArgumentParser, Range, arg_type

REPO = pathlib.Path(__file__).resolve().parents[1]

DATASET = "hopper-medium-v2"
QUIET = ["--offline-eval-every", "1000000000", "--checkpoint-every", "1000000000"]
MIN_STEPS = 3_000  # 3 lines logged every 1000 steps: the first (compilation) and two to time


def workloads(offline_steps: int, online_steps: int) -> dict:
    """name -> (script, flags, phase): the paper sweeps' jobs at a short length. `phase` is the
    metrics prefix whose lines time the workload."""
    pretrain = ["--offline-steps", str(offline_steps), "--online-steps", "0"]
    finetune = ["--online-steps", str(online_steps), "--eval-every", str(10 * online_steps)]
    return {
        "td3bc_offline": ("td3_c.py", pretrain, "offline"),
        "td3c_online": ("td3_c.py", ["--finetune", "td3c", *finetune], "online"),
        "sacml_offline": ("aca.py", pretrain, "offline"),
        "aca_online": ("aca.py", ["--finetune", "aca", *finetune], "online"),
    }


def steady_rate(metrics: pathlib.Path, phase: str) -> float:
    """Steps per second between the second and the last line of `phase` (the first one is
    logged after compilation and start-up)."""
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    timed = [(r["step"], r["time"]) for r in lines if any(k.startswith(phase + "/") for k in r)]
    if len(timed) < 3:
        raise SystemExit(f"{metrics}: fewer than 3 '{phase}/' lines; run more steps")
    (s0, t0), (s1, t1) = timed[1], timed[-1]
    return (s1 - s0) / (t1 - t0)


def launch(
    script: str, flags: list, seed: int, run_dir: pathlib.Path, cores: set[int] | None = None
) -> subprocess.Popen:
    """One job as the runner starts it; `cores`: pinned to these CPUs, as a pinned worker's."""
    argv = [sys.executable, f"algorithms/{script}", "--env", DATASET, "--seed", str(seed)]
    with open(run_dir.with_suffix(".log"), "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [*argv, *flags, *QUIET, "--run-dir", str(run_dir)], cwd=REPO, stdout=log, stderr=log,
            preexec_fn=child_setup(cores),
        )  # fmt: skip


def run_jobs(specs: list) -> float:
    """Run (script, flags, seed, run_dir) jobs at once; on an error stop the others and fail
    with its log."""
    start = time.perf_counter()
    procs = [(launch(*spec), spec[3]) for spec in specs]
    for proc, run_dir in procs:
        if proc.wait() != 0:
            for other, _ in procs:
                other.kill()
            tail = run_dir.with_suffix(".log").read_text()[-2000:]
            raise SystemExit(f"{run_dir.name} failed:\n{tail}")
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    steps = arg_type(int, Range(MIN_STEPS, what="for 3 logged lines"))
    parser.add_argument("--offline-steps", type=steps, default=12_000, help="per pretraining job")
    parser.add_argument("--online-steps", type=steps, default=6_000, help="per fine-tuning job")
    parser.add_argument("--only", nargs="+", choices=list(workloads(1, 1)), help="a subset")
    parser.add_argument("--out", type=pathlib.Path, help="default: results/workers_<cpus>cpu.json")
    args = parser.parse_args(argv)
    chosen = workloads(args.offline_steps, args.online_steps)
    chosen = {k: v for k, v in chosen.items() if not args.only or k in args.only}
    result = {
        "machine": machine_info(),
        "dataset": DATASET,
        "offline_steps": args.offline_steps,
        "online_steps": args.online_steps,
        "workloads": {},
    }
    # the runner's pinned workers (benchmarks/run.py --workers 2): each on its half of the CPUs
    pinnable = hasattr(os, "sched_setaffinity")
    groups = core_groups(sorted(os.sched_getaffinity(0)), 2) if pinnable else []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        pretrained = {}
        for name, (script, flags, phase) in chosen.items():
            if phase == "online" and script not in pretrained:
                run_dir = tmp / f"pretrain_{script[:-3]}"
                run_jobs([(script, ["--offline-steps", "2000", "--online-steps", "0"], 0, run_dir)])
                pretrained[script] = run_dir / "offline.npz"
            shown = flags  # the checkpoint's temporary path is not worth recording
            if phase == "online":
                flags = [*flags, "--offline-checkpoint", str(pretrained[script])]
            alone = tmp / f"{name}_alone"
            wall_alone = run_jobs([(script, flags, 0, alone)])
            pair = [tmp / f"{name}_pair{seed}" for seed in (0, 1)]
            wall_pair = run_jobs([(script, flags, seed, pair[seed]) for seed in (0, 1)])
            rate_alone = steady_rate(alone / "metrics.jsonl", phase)
            rates = [steady_rate(d / "metrics.jsonl", phase) for d in pair]
            if groups:  # the same pair, each pinned to its worker's cores as the runner does
                pinned = [tmp / f"{name}_pinned{seed}" for seed in (0, 1)]
                specs = [(script, flags, seed, pinned[seed], groups[seed]) for seed in (0, 1)]
                wall_pinned = run_jobs(specs)
                rates_pinned = [steady_rate(d / "metrics.jsonl", phase) for d in pinned]
            result["workloads"][name] = {
                "script": script,
                "flags": shown,
                "steps_per_s_alone": round(rate_alone, 1),
                "steps_per_s_each_of_two": [round(r, 1) for r in rates],
                "speedup_two_workers": round(sum(rates) / rate_alone, 3),
                "wall_s_one_job_alone": round(wall_alone, 1),
                "wall_s_two_jobs_at_once": round(wall_pair, 1),
            }
            if groups:
                result["workloads"][name] |= {
                    "steps_per_s_each_of_two_pinned": [round(r, 1) for r in rates_pinned],
                    "speedup_two_pinned_workers": round(sum(rates_pinned) / rate_alone, 3),
                    "pinned_over_unpinned": round(sum(rates_pinned) / sum(rates), 3),
                    "wall_s_two_pinned_jobs_at_once": round(wall_pinned, 1),
                }
            print(name, json.dumps(result["workloads"][name]), flush=True)
    cpu = f"{os.cpu_count()}cpu"
    out = args.out or REPO / "benchmarks" / "results" / f"workers_{cpu}.json"
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
