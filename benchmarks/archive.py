"""Keep a sweep's finished runs in the repository, so hours of compute outlive the machine.

    python -m benchmarks.archive save td3c_dual --budget cpu      # runs/bench -> benchmarks/logs
    python -m benchmarks.archive restore td3c_dual --budget cpu   # benchmarks/logs -> runs/bench

`runs/` is git-ignored and a session's machine is not always handed to the next one, so a sweep that
spans sessions would lose its finished runs with the machine. `save` copies each *finished* job (its
`summary.json` written) of the suite's budget into `benchmarks/logs/` with the same layout as the
runs root (`<suite>/<budget>/<dataset>/seed<k>/<variant>/`): the text files the report reads
(`config.json`, `metrics.jsonl`, `summary.json`, `job.json`, small) and, for a pretraining job, the
`offline.npz` that the fine-tuning jobs load (parameters and optimizer state of one agent: 3.3 MB
for TD3-BC) while a fine-tuning job of this suite or of one that takes its pretraining from it
(`pretraining_from`) is not finished: once all are, nothing loads it again and the binary stays out
of the repository (an agent for users goes to `pretrained/`). Checkpoints of unfinished runs and
tensorboard events are not kept. `restore` copies them back under `--root`, where `benchmarks.run`
then counts them as finished and runs only what is left. The report reads either tree: `python -m
benchmarks.report SUITE --budget B --root benchmarks/logs`.

With `save --interrupted`, a job that is not finished but has a checkpoint of at most 16 MB is
kept too (its config, metrics, job record, latest `checkpoint.npz` and any `offline.npz`: a
pretraining job in its offline phase, 3.3 MB for TD3-BC), and `restore` brings it back, so
`benchmarks.run` resumes it where the last save left it; its checkpoint is dropped from the
archive once it finishes. A fine-tuning job's checkpoint holds its replay buffer (about 110 MB
with hopper's offline data in it) and is not kept: that job starts over on a fresh machine.

Files are written atomically (a copy to a temporary name, then a rename), and `restore` never
overwrites a file that differs from the archived one (the run there is another attempt: say so
and stop).
"""

import filecmp
import json
import pathlib
import shutil
import sys

from benchmarks.sweep import BUDGETS, DEFAULT_ROOT, REPO, SweepError, expand, load_suite, status
from common.checkpoints import atomic_write_bytes, atomic_write_text
from common.flags import ArgumentParser

ARCHIVE_ROOT = REPO / "benchmarks" / "logs"
KEPT = ("config.json", "metrics.jsonl", "summary.json", "job.json")  # every finished job
KEPT_PRETRAIN = ("offline.npz",)  # what the fine-tuning jobs of a pretraining job load


def _copy(src: pathlib.Path, dst: pathlib.Path) -> None:
    with open(src, "rb") as f:
        atomic_write_bytes(dst, lambda out: shutil.copyfileobj(f, out))


# An interrupted job (with --interrupted): what `benchmarks.run` needs to resume it, i.e. its
# latest checkpoint and, where its own offline phase is done, offline.npz.
MAX_CHECKPOINT_BYTES = 16 * 2**20  # a pretraining's agent (TD3-BC: 3.3 MB), not a replay buffer
KEPT_INTERRUPTED = ("config.json", "metrics.jsonl", "job.json", "checkpoint.npz", "offline.npz")


def kept_files(job, state: str) -> tuple[str, ...]:
    if state == "interrupted":
        return KEPT_INTERRUPTED
    return KEPT + (KEPT_PRETRAIN if job.variant == "pretrain" else ())


# job.json records the job's command line, whose paths (a pretraining job's offline.npz under the
# runs root, a committed checkpoint in the repository) are absolute; the archive stores them with
# these placeholders so a restore into another checkout or root records that checkout's paths
# (benchmarks.run refuses a run directory whose job.json holds another command line).
ROOT_TOKEN, REPO_TOKEN = "{root}", "{repo}"


def _job_record(text: str, replacements: list[tuple[str, str]]) -> str:
    """job.json's text with each (old, new) substring replaced in its command line, in order."""
    record = json.loads(text)
    for a, b in replacements:
        record["argv"] = [arg.replace(a, b) for arg in record["argv"]]
    return json.dumps(record, indent=2) + "\n"


def dependent_jobs(suite_name: str, budget_name: str, root: pathlib.Path) -> list:
    """The jobs of the suites that take their pretraining from `suite_name` (bred_fig3 from
    off2on_fig3): they fine-tune from its pretraining jobs' offline.npz too."""
    from benchmarks.sweep import known_suites

    others = [load_suite(name) for name in known_suites() if name != suite_name]
    return [
        job
        for other in others
        if other.pretraining_from == suite_name
        for job in expand(other, other.budget(budget_name), root)
    ]


def save(
    suite_name: str,
    budget_name: str,
    root: pathlib.Path,
    archive: pathlib.Path,
    interrupted: bool = False,
) -> list:
    """Copy the finished jobs of one sweep (and with `interrupted` those with a checkpoint) from
    `root` into `archive`; returns their keys."""
    root, archive = root.resolve(), archive.resolve()  # job.json holds the runner's absolute paths
    suite = load_suite(suite_name)
    saved, jobs = [], expand(suite, suite.budget(budget_name), root)
    waiting = {j.after for j in jobs + dependent_jobs(suite_name, budget_name, root)
               if j.after and status(j) != "finished"}  # fmt: skip
    for job in jobs:
        state = status(job)
        if state == "new" or (state == "interrupted" and not interrupted):
            continue
        if state == "interrupted":
            size = (job.run_dir / "checkpoint.npz").stat().st_size
            if size > MAX_CHECKPOINT_BYTES:  # a fine-tuning checkpoint holds its replay buffer
                print(f"  not kept: {job.key} (its checkpoint is {size / 2**20:.0f} MB: it holds "
                      f"the replay buffer; the job starts over on a fresh machine)")  # fmt: skip
                continue
        target = archive / job.run_dir.relative_to(root)
        if state == "finished" and (target / "checkpoint.npz").exists():
            (target / "checkpoint.npz").unlink()  # archived while interrupted; now finished
        portable = [(str(root), ROOT_TOKEN), (str(REPO), REPO_TOKEN)]
        for name in kept_files(job, state):
            src = job.run_dir / name
            if name in KEPT_PRETRAIN and state == "finished" and job.uid not in waiting:
                continue  # no unfinished job fine-tunes from it
            if name == "job.json" and src.exists():
                atomic_write_text(target / name, _job_record(src.read_text(), portable))
            elif src.exists():
                _copy(src, target / name)
        saved.append(job.key)
    return saved


def restore(suite_name: str, budget_name: str, root: pathlib.Path, archive: pathlib.Path) -> list:
    """Copy the archived jobs of one sweep (finished, or interrupted with their checkpoint) back
    under `root`; returns their keys. Raises SweepError (before copying anything) where `root`
    holds a different file of the same run."""
    root, archive = root.resolve(), archive.resolve()  # as the runner records them (absolute)
    suite = load_suite(suite_name)
    jobs = [j for j in expand(suite, suite.budget(budget_name), archive) if status(j) != "new"]
    local = [(ROOT_TOKEN, str(root)), (REPO_TOKEN, str(REPO))]
    pairs, records = [], []
    for job in jobs:
        for name in kept_files(job, status(job)):
            src = job.run_dir / name
            if not src.exists():
                continue
            dst = root / job.run_dir.relative_to(archive) / name
            if name == "job.json":
                text = _job_record(src.read_text(), local)
                same = dst.exists() and dst.read_text() == text
                records.append((text, dst))
            else:
                same = dst.exists() and filecmp.cmp(src, dst, shallow=False)
                pairs.append((src, dst))
            if dst.exists() and not same:
                raise SweepError(
                    f"{dst} differs from the archived {src}: it belongs to another attempt of "
                    f"{job.key}; move it away or pass another --root"
                )
    for src, dst in pairs:
        _copy(src, dst)
    for text, dst in records:
        atomic_write_text(dst, text)
    return [job.key for job in jobs]


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["save", "restore"])
    parser.add_argument("suite", help="a suite name (benchmarks/suites/<name>.toml)")
    parser.add_argument("--budget", choices=BUDGETS, required=True)
    parser.add_argument("--root", type=pathlib.Path, default=DEFAULT_ROOT, help="runs root")
    parser.add_argument("--archive", type=pathlib.Path, default=ARCHIVE_ROOT)
    parser.add_argument(
        "--interrupted",
        action="store_true",
        help="save: also the jobs that are not finished but have a checkpoint (their latest "
        "checkpoint.npz), so a fresh machine resumes them instead of starting over",
    )
    args = parser.parse_args(argv)
    try:
        if args.action == "save":
            keys = save(args.suite, args.budget, args.root, args.archive, args.interrupted)
            where = args.archive
        else:
            keys = restore(args.suite, args.budget, args.root, args.archive)
            where = args.root
    except SweepError as err:
        parser.error(str(err))
    print(f"{args.action}: {len(keys)} runs of {args.suite}/{args.budget} -> {where}")
    for key in keys:
        print(f"  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
