"""benchmarks/paper_ensemble.py: the paper-budget CQL ensemble in time-boxed, resumable pieces
(issue #46), run here at the tiny budget."""

import dataclasses
import json
import pathlib
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from benchmarks import paper_ensemble as pe
from benchmarks.sweep import expand, load_suite

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_run_until_stops_a_run_cleanly_at_its_deadline(tmp_path):
    """At the deadline the child gets SIGTERM (what the algorithm files turn into a clean stop),
    not SIGKILL, and run_until says it was stopped (None); a child that ends first gives its
    exit status."""
    flag = tmp_path / "terminated"
    child = (
        "import signal, sys, time, pathlib\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(flag)!r}).touch(), "
        "sys.exit(143)))\n"
        "time.sleep(60)\n"
    )
    start = time.time()
    assert pe.run_until([sys.executable, "-c", child], time.time() + 2, {}) is None
    assert flag.exists() and time.time() - start < 30
    assert pe.run_until([sys.executable, "-c", "raise SystemExit(3)"], time.time() + 60, {}) == 3


def test_pack_and_restore_bring_a_run_back_byte_for_byte(tmp_path):
    run = tmp_path / "lease" / "pretrain"
    run.mkdir(parents=True)
    files = {"config.json": b'{"a": 1}\n', "metrics.jsonl": b'{"step": 1}\n'}
    for name, data in files.items():
        (run / name).write_bytes(data)
    (run / "checkpoint.npz").write_bytes(np.random.default_rng(0).bytes(5000))
    (run / "events.out.tfevents.1").write_bytes(b"not packed")
    assert pe.pack_pretrain(run, tmp_path / "out") is False  # unfinished: the checkpoint travels
    here = tmp_path / "here" / "pretrain"
    pe.restore(tmp_path / "out", here)
    assert sorted(p.name for p in here.iterdir()) == ["checkpoint.npz", *sorted(files)]
    for name in [*files, "checkpoint.npz"]:
        assert (here / name).read_bytes() == (run / name).read_bytes()
    (run / "offline.npz").write_bytes(b"trained")
    assert pe.pack_pretrain(run, tmp_path / "out2") is True
    assert (tmp_path / "out2" / "offline.npz").exists()
    assert not (tmp_path / "out2" / "checkpoint.npz").exists()


def test_restore_refuses_an_archive_with_other_files(tmp_path):
    (tmp_path / "evil").write_text("x")
    with tarfile.open(tmp_path / pe.STATE_TAR, "w:gz") as tar:
        tar.add(tmp_path / "evil", arcname="../evil")
    with pytest.raises(SystemExit, match="unexpected ../evil"):
        pe.restore(tmp_path, tmp_path / "run")
    assert not (tmp_path / "run" / "evil").exists()


def test_a_dataset_other_than_the_committed_one_is_refused(minari_env, capsys):
    """The tiny hopper-medium-v2 is not the committed dataset: its checksum differs, and the
    pretraining refuses it before any step."""
    with pytest.raises(SystemExit, match="not training on other data"):
        pe.check_dataset()


def test_tiny_pretraining_then_fine_tuning_arguments(tmp_path):
    """The whole pretraining stage at the tiny budget (dataset, run, pack), restored into a fresh
    root as a lease's output would be; the fine-tuning jobs it would start all fine-tune from it
    (the runner's --offline-checkpoint) and none pretrains."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.paper_ensemble", "pretrain", "--tiny",
         "--root", str(tmp_path / "lease"), "--out", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "offline.npz").exists()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.paper_ensemble", "restore", str(tmp_path / "out"),
         "--root", str(tmp_path / "here")],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0 and "pretraining: finished" in proc.stdout, proc.stderr
    ensemble = tmp_path / "here" / "pretrain" / "offline.npz"
    metrics = (tmp_path / "here" / "pretrain" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(metrics[-1])["step"] == 200
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", *pe.SUITES, "--budget", "smoke", "--datasets",
         pe.ENV, "--offline-checkpoint", str(ensemble), "--root", str(tmp_path / "ft"),
         "--dry-run"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    jobs = [line for line in proc.stdout.splitlines() if line.startswith("new")]
    assert len(jobs) == 6 and not any("/pretrain" in line for line in jobs)
    for record in (tmp_path / "ft").rglob("job.json"):  # none written by a dry run
        raise AssertionError(record)
    for suite in pe.SUITES:
        budget = load_suite(suite).budget("smoke")
        budget = dataclasses.replace(budget, offline_checkpoint=str(ensemble))
        for job in expand(load_suite(suite), budget, tmp_path / "ft", [pe.ENV]):
            assert job.argv[job.argv.index("--offline-checkpoint") + 1] == str(ensemble)
