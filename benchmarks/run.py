"""Run a benchmark suite: every (algorithm, dataset, seed) as its own process.

    python -m benchmarks.run td3c_table1 --budget cpu
    python -m benchmarks.run all --budget smoke --workers 2
    python -m benchmarks.run aca_table2 --budget paper --datasets hopper-medium-v2 --seeds 0 1
    python -m benchmarks.run aca_table2 --budget paper --backend ray --address auto

Finished runs (with a `summary.json`) are skipped, interrupted ones resume from their
checkpoints (`--resume`), and a run that died before its first checkpoint starts over. So a
sweep killed at any point (Ctrl-C, `kill`, a lost machine) is continued by running the same
command again; the algorithm files write checkpoints and results atomically, and a resumed run
drops the log lines written after its last checkpoint. Fine-tuning jobs wait for the
pretraining job they start from.

Backends: `local` (default) runs `--workers` processes on this machine; `ray` submits each job
as a Ray task (`--address auto` joins a running cluster, `--address local` starts a private
instance). On a cluster the repository, its `.venv` and `--root` must be on a filesystem every
node sees at the same path (datasets too: generate them first, `make datasets ENV=...`).
Smoke budgets run on tiny random-action datasets generated under `<root>/tiny_datasets/`.
"""

import argparse
import concurrent.futures
import ctypes
import dataclasses
import json
import os
import pathlib
import queue
import re
import shutil
import signal
import subprocess
import sys
import time

from tqdm import tqdm

from benchmarks.machine import machine_info
from benchmarks.sweep import (
    BUDGETS,
    DEFAULT_ROOT,
    REPO,
    Job,
    SweepError,
    check_job_record,
    expand,
    known_suites,
    load_suite,
    status,
)
from common.flags import ArgumentParser, Range, arg_type

_RUNNING: dict[str, subprocess.Popen] = {}  # local backend: job uid -> process
_SWEEP_BAR = (
    "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total_fmt} jobs [{elapsed}<{remaining}{postfix}]"
)


def _die_with_parent():  # runs in the child before exec: SIGTERM it if its parent thread dies
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the runner's signal handler still stops its children
        pass


def core_groups(cores: list[int], workers: int) -> list[set[int]]:
    """Split the cores this process may use into `workers` disjoint groups of (nearly) equal
    size, one per worker slot; empty when there are fewer cores than workers (nothing to pin)."""
    if workers > len(cores):
        return []
    cores = sorted(cores)
    size, extra = divmod(len(cores), workers)
    groups, start = [], 0
    for slot in range(workers):
        end = start + size + (slot < extra)
        groups.append(set(cores[start:end]))
        start = end
    return groups


def child_setup(cores: set[int] | None):
    """A `preexec_fn` for a job's process: pin it to `cores` (if any) and have it stopped when
    the runner dies. Shared with bench_workers so the benchmark starts jobs as the runner does."""

    def setup():  # runs in the child before exec
        if cores:
            try:
                os.sched_setaffinity(0, cores)  # inherited by every thread the job starts
            except OSError:  # a sandbox that forbids it: the job runs unpinned
                pass
        _die_with_parent()

    return setup


def execute(
    job: Job, env: dict, python: str = sys.executable, cores: set[int] | None = None
) -> int:
    """Run one job to completion (or resume it); its output goes to <run_dir>/log.txt. `cores`:
    pin the job (all its threads) to these CPUs."""
    check_job_record(job)
    if status(job) == "new" and job.run_dir.exists():
        shutil.rmtree(job.run_dir)  # an attempt that never reached a checkpoint: start over
    job.run_dir.mkdir(parents=True, exist_ok=True)
    # Every start (the first and each resume) appends the machine it ran on: XLA's floating
    # point differs between CPUs, so a run resumed elsewhere, or a fine-tuning run on another
    # machine than its pretraining, differs from a run on one machine (see report.py's start).
    path = job.run_dir / "job.json"
    starts = json.loads(path.read_text()).get("starts", []) if path.exists() else []
    starts.append({"time": time.strftime("%Y-%m-%d %H:%M:%S"), **machine_info()})
    record = {"argv": list(job.argv), "suite": job.suite, "starts": starts}
    tmp = job.run_dir / "job.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    with open(job.run_dir / "log.txt", "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(job.command(python))}\n")
        log.flush()
        proc = subprocess.Popen(
            job.command(python), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **env}, preexec_fn=child_setup(cores),
        )  # fmt: skip
        _RUNNING[job.uid] = proc
        try:
            return proc.wait()
        finally:
            _RUNNING.pop(job.uid, None)


def prepare_datasets(jobs: list[Job], tiny_steps: int | None, root: pathlib.Path) -> dict:
    """Make sure every dataset exists before jobs start (so parallel jobs never generate the
    same one twice). Returns environment variables for the jobs. The work runs in a child
    process: the dataset code loads JAX, and a parent holding JAX's threads would warn ("os.fork()
    was called ... likely lead to a deadlock") at every job it launched afterwards."""
    names = sorted({job.dataset for job in jobs})
    tiny_root = root / "tiny_datasets" / str(tiny_steps) if tiny_steps else None
    code = "import sys; from benchmarks import run; sys.exit(run.make_datasets(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, str(tiny_steps or 0), str(tiny_root or ""), *names]
    if subprocess.run(argv, cwd=REPO).returncode:
        raise SweepError(f"the datasets {', '.join(names)} could not be prepared (see above)")
    return {"MINARI_DATASETS_PATH": str(tiny_root)} if tiny_root else {}


def make_datasets(argv: list[str]) -> int:
    """prepare_datasets' child: argv = [tiny steps (0: the real datasets), tiny root, names...]."""
    tiny_steps, tiny_root, names = int(argv[0]), pathlib.Path(argv[1]), argv[2:]
    if tiny_steps:
        from common.d4rl import parse_name
        from common.d4rl_recipe import make_tiny_dataset
        from common.minari_io import GENERATED_NAMESPACE

        for name in names:
            env, split = parse_name(name)
            if not (tiny_root / GENERATED_NAMESPACE / env / f"{split}-v0").exists():
                make_tiny_dataset(tiny_root, name, num_steps=tiny_steps, seed=0)
        return 0
    from common.datasets import DatasetError, generate_on_first_use, resolve

    for name in names:
        try:
            try:
                resolve(name, allow_download=True)
            except DatasetError:
                generate_on_first_use(name)
        except DatasetError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 0


def schedule(jobs: list[Job], launch, wait_any, workers: int, bar, poll_s: float = 15.0):
    """Run jobs respecting `after` dependencies, at most `workers` at once. Returns {uid:
    outcome}. `launch(job) -> handle`; `wait_any(handles, timeout) -> {handle: return code}` for
    those done (possibly none). Every `poll_s` seconds the bar counts the running jobs' progress
    too (see `job_progress`), so its rate and ETA show long before the first job ends."""
    outcome = {job.uid: "finished" for job in jobs if status(job) == "finished"}
    pending = [job for job in jobs if job.uid not in outcome]
    running = {}  # handle -> job
    resumed = set()  # resumed jobs whose first progress line is still to be read: the share it
    # shows was done before this sweep, so it goes into `bar.initial`, not into the rate

    def show():
        shares, notes = 0.0, []
        for job in running.values():
            progress = job_progress(job)
            if progress is None:
                continue
            desc, done, total = progress
            shares += done / total
            if job.uid in resumed:
                resumed.discard(job.uid)
                bar.initial += done / total
            notes.append(f"{job.key} {desc} {done:g}/{total:g}")
        bar.n = round(len(outcome) + shares, 3)
        failed = sum("failed" in v for v in outcome.values())
        bar.set_postfix_str(
            f"running {len(running)}" + (f", failed {failed}" if failed else "")
            + "".join(f" | {note}" for note in notes[:2]) + (" | ..." if len(notes) > 2 else "")
        )  # fmt: skip

    while pending or running:
        for job in list(pending):
            if job.after and outcome.get(job.after, "").startswith(("failed", "skip")):
                pending.remove(job)
                outcome[job.uid] = f"skipped (needs {job.after})"
        ready = [j for j in pending if j.after is None or outcome.get(j.after) == "finished"]
        for job in ready[: max(0, workers - len(running))]:
            pending.remove(job)
            if status(job) == "interrupted":
                resumed.add(job.uid)
            running[launch(job)] = job
        if not running:  # nothing can start: whatever is left waits on a job that never ran
            for job in pending:
                outcome[job.uid] = f"skipped (needs {job.after})"
            break
        for handle, code in wait_any(list(running), poll_s).items():
            job = running.pop(handle)
            outcome[job.uid] = "finished" if code == 0 else f"failed (exit {code})"
            bar.write(f"{job.uid}: {outcome[job.uid]}{_scores(job)}")
        show()
    show()
    return outcome


_BAR_LINE = re.compile(r"([^\r\n:|]+): *\d+%\|[^|\r\n]*\| *([\d.]+)([kMG]?)/([\d.]+)([kMG]?) \[")
_SI = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}


def job_progress(job: Job) -> tuple[str, float, float] | None:
    """(phase, done, total) from the last progress bar line a running job wrote into its log
    (this attempt's only), or None before its first. The share done is the running phase's: a job
    with two phases (BRED's distillation, then fine-tuning) starts its second at 0."""
    try:
        with open(job.run_dir / "log.txt", "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - 16384))
            tail = log.read().decode("utf-8", "replace")
    except OSError:
        return None
    tail = tail.rsplit("\n=== ", 1)[-1]  # execute() starts every attempt with such a line
    bars = [
        (desc.strip(), float(n) * _SI[n_si], float(total) * _SI[total_si])
        for desc, n, n_si, total, total_si in _BAR_LINE.findall(tail)
    ]  # fmt: skip
    bars = [(desc, min(n, total), total) for desc, n, total in bars if total > 0]
    return bars[-1] if bars else None


def _scores(job: Job) -> str:
    path = job.run_dir / "summary.json"
    if not path.exists():
        return f" (log: {job.run_dir / 'log.txt'})"
    summary = json.loads(path.read_text())
    before = summary.get("normalized_score_before_finetuning")
    after = summary.get("normalized_score_after_finetuning")
    if before is None or after is None:
        return ""
    return f", normalized score {before:.1f} -> {after:.1f}"


def shared_accelerator_env(workers: int, environ) -> dict:
    """Environment for `workers` jobs sharing one GPU/TPU: JAX preallocates 75% of an
    accelerator's memory per process, so a second job would fail to allocate. Each job gets
    0.9 / workers of it instead (no effect on a CPU), unless the user chose a fraction or turned
    preallocation off."""
    chosen = {"XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE"} & set(environ)
    if workers == 1 or chosen:
        return {}
    return {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{min(0.75, 0.9 / workers):.3f}"}


def local_backend(workers: int, env: dict, pin: bool = False):
    """`pin`: each worker slot owns a disjoint group of this process's CPUs and pins its jobs to
    it (Linux; elsewhere, or with more workers than CPUs, nothing is pinned). On the 2-core
    machine two pinned jobs ran 1.15x (TD3-BC) and 1.12x (TD3-C fine-tuning) the steps/s of two
    unpinned ones (benchmarks/results/workers_2cpu_pinned.json)."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    can_pin = pin and hasattr(os, "sched_setaffinity")
    groups = core_groups(sorted(os.sched_getaffinity(0)), workers) if can_pin else []
    free = queue.SimpleQueue()  # the core groups no running job holds: one per worker slot
    for group in groups:
        free.put(group)

    def pinned_execute(job):
        cores = free.get()  # never waits: at most `workers` jobs run at once
        try:
            return execute(job, env, cores=cores)
        finally:
            free.put(cores)

    def launch(job):
        if groups:
            return pool.submit(pinned_execute, job)
        return pool.submit(execute, job, env)

    def wait_any(futures, timeout):
        done, _ = concurrent.futures.wait(
            futures, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED
        )
        return {f: (f.result() if f.exception() is None else -1) for f in done}

    return launch, wait_any, pool.shutdown


def ray_backend(address: str, cpus_per_job: float, env: dict):
    import ray

    # Workers import this module from the repository (the same path on every node).
    env_vars = {"PYTHONPATH": str(REPO)}
    if "O2O_SUITES_DIR" in os.environ:
        env_vars["O2O_SUITES_DIR"] = os.environ["O2O_SUITES_DIR"]
    runtime_env = {"env_vars": env_vars}
    if address == "local":
        # Ray starts its workers at niceness 15 (RAY_worker_niceness), below every other process:
        # on a machine busy with other runs a job then gets a few % of a core (a 10-second smoke
        # job took 18 minutes here). A local instance exists only for this sweep, so its jobs
        # run at the driver's priority, as the local backend's do. A cluster keeps its own.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
    else:
        ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
    remote_execute = ray.remote(num_cpus=cpus_per_job, max_retries=0)(execute)

    def launch(job):
        return remote_execute.remote(job, env, sys.executable)

    def wait_any(refs, timeout):
        done, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        out = {}
        for ref in done:
            try:
                out[ref] = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - a lost worker fails this job only
                print(f"ray task failed: {err}", file=sys.stderr)
                out[ref] = -1
        return out

    return launch, wait_any, ray.shutdown


def _stop_children(signum, _frame):
    for proc in list(_RUNNING.values()):
        proc.terminate()
    deadline = time.time() + 10
    for proc in list(_RUNNING.values()):
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
    raise SystemExit(128 + signum)


def make_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Run benchmark suites (see module docstring).")
    parser.add_argument("suites", nargs="+", help=f"suite names or 'all': {known_suites()}")
    parser.add_argument("--budget", choices=BUDGETS, required=True)
    parser.add_argument(
        "--root", type=pathlib.Path, default=DEFAULT_ROOT, help="run directory root"
    )
    parser.add_argument(
        "--workers", type=arg_type(int, Range(1)), default=1, help="jobs at once (local backend)"
    )
    parser.add_argument(
        "--no-pin-cores", action="store_true",
        help="local backend: let jobs share all CPUs (default: each worker owns 1/workers of them)",
    )  # fmt: skip
    parser.add_argument("--backend", choices=("local", "ray"), default="local")
    parser.add_argument("--address", default="local", help="ray: 'auto', 'local' or HOST:PORT")
    parser.add_argument(
        "--cpus-per-job", type=arg_type(float, Range(0, low_open=True)), default=1.0,
        help="ray: CPUs per job",
    )  # fmt: skip
    parser.add_argument("--datasets", nargs="+", help="only these datasets of the suite(s)")
    parser.add_argument(
        "--seeds", nargs="+", type=arg_type(int, Range(0, 2**32 - 1)),
        help="override the budget's seeds",
    )  # fmt: skip
    parser.add_argument(
        "--offline-checkpoint", type=pathlib.Path, default=None,
        help="fine-tune every job from this pretrained agent (an offline.npz or exported "
        "ensemble) instead of the budget's or the suite's pretraining",
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="list the jobs and their status")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    root = args.root
    while not root.exists():
        root = root.parent
    if not root.is_dir() or not os.access(root, os.W_OK):
        parser.error(
            f"--root {args.root}: cannot be created or written ({root} is not a writable directory)"
        )
    args.root = args.root.resolve()  # jobs run with cwd = the repository
    if args.offline_checkpoint is not None:
        if not args.offline_checkpoint.is_file():
            parser.error(f"--offline-checkpoint {args.offline_checkpoint}: no such file")
        args.offline_checkpoint = args.offline_checkpoint.resolve()
    try:
        names = known_suites() if args.suites == ["all"] else args.suites
        suites = [load_suite(name) for name in names]
        jobs, env = [], {}
        for suite in suites:
            budget = suite.budget(args.budget)
            if args.offline_checkpoint is not None:
                checkpoint = str(args.offline_checkpoint)
                budget = dataclasses.replace(budget, offline_checkpoint=checkpoint)
            datasets = None
            if args.datasets:
                datasets = [d for d in args.datasets if d in suite.datasets]
                if not datasets:
                    continue
            jobs += expand(suite, budget, args.root, datasets, args.seeds)
        # A pretraining job shared across suites (pretraining_from) is listed, and run, once.
        jobs = list({job.uid: job for job in jobs}.values())
        for job in jobs:
            check_job_record(job)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        for job in jobs:
            print(f"{status(job):12s} {job.suite} {job.key}  {job.run_dir}")
        return 0
    tiny = {load_suite(j.suite).budget(args.budget).tiny_datasets for j in jobs} - {None}
    try:
        env = prepare_datasets(jobs, max(tiny) if tiny else None, args.root)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Compiled XLA programs are cached across the sweep's processes (same shapes, same program),
    # in the cache the caller chose if any ($JAX_COMPILATION_CACHE_DIR), else under the root.
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(args.root / "jax_cache")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
    if args.backend == "local":
        env.update(shared_accelerator_env(args.workers, os.environ))
    finished = sum(status(j) == "finished" for j in jobs)
    print(f"{len(jobs)} jobs ({finished} already finished) -> {args.root}")
    signal.signal(signal.SIGTERM, _stop_children)
    signal.signal(signal.SIGINT, _stop_children)
    if args.backend == "ray":
        launch, wait_any, close = ray_backend(args.address, args.cpus_per_job, env)
        workers = 10**6  # Ray's resources decide how many run at once
    else:
        launch, wait_any, close = local_backend(args.workers, env, pin=not args.no_pin_cores)
        workers = args.workers
    # Counted in jobs, the running ones by their share done (their logs' progress lines); the
    # rate is the mean since the start (smoothing 0), so a long job does not swing the ETA.
    bar = tqdm(
        total=len(jobs), initial=finished, desc=f"{'+'.join(names)} [{args.budget}]",
        unit="job", smoothing=0, bar_format=_SWEEP_BAR,
    )  # fmt: skip
    try:
        outcome = schedule(jobs, launch, wait_any, workers, bar)
    finally:
        bar.close()
        close()
    bad = {k: v for k, v in outcome.items() if v != "finished"}
    for key, why in bad.items():
        print(f"{key}: {why}", file=sys.stderr)
    print(f"{len(outcome) - len(bad)}/{len(jobs)} jobs finished")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
