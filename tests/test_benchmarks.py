"""The benchmark harness: suites, runner (local and Ray backends, kill + restart), report."""

import csv
import dataclasses
import io
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO

from benchmarks import report, sweep

SUITES = [
    "aca_no_entropy_backup",
    "aca_table2",
    "bred_fig3",
    "off2on_dr_output",
    "off2on_fig1b",
    "off2on_fig3",
    "td3c_dual",
    "td3c_table1",
]

# A custom suite (O2O_SUITES_DIR) whose fine-tuning jobs run long enough to be killed midway:
# 1000 online steps, a checkpoint every 100.
TINY_SUITE = """
title = "test suite"
script = "td3_c.py"
datasets = ["hopper-medium-v2"]
shared_pretraining = true
diagnostics = ["online/critic_loss"]

[variants.td3]
args = ["--finetune", "td3"]

[variants.td3c]
args = ["--finetune", "td3c"]

[budgets.smoke]
description = "test"
seeds = [0]
tiny_datasets = 1000
args = ["--hidden-dims", "16", "16", "--batch-size", "16", "--offline-steps", "200",
        "--log-every", "100", "--offline-eval-every", "200", "--online-steps", "1000",
        "--eval-every", "500", "--eval-episodes", "1", "--checkpoint-every", "100"]

[budgets.cpu]
description = "unused"
seeds = [0]
args = []

[budgets.paper]
description = "unused"
seeds = [0]
args = []
"""


def test_every_suite_loads_with_three_budgets_and_expands_to_shared_pretraining():
    assert sweep.known_suites() == SUITES
    for name in SUITES:
        suite = sweep.load_suite(name)
        assert set(suite.budgets) == {"smoke", "cpu", "paper"}
        budget = suite.budget("paper")
        jobs = sweep.expand(suite, budget, REPO / "runs" / "x")
        n = len(suite.datasets) * len(budget.seeds)
        # one pretraining per (dataset, seed), or per dataset with a pretraining_seed
        shared = len(suite.datasets) if budget.pretraining_seed is not None else n
        assert len(jobs) == n * len(suite.variants) + shared
        pretrain = {j.uid: j for j in jobs if j.variant == "pretrain"}
        for job in jobs:
            if job.variant == "pretrain":
                assert job.argv[-2:] == ("--online-steps", "0")
                continue
            parent = pretrain[job.after]
            parent_seed = job.seed if budget.pretraining_seed is None else budget.pretraining_seed
            assert (parent.dataset, parent.seed) == (job.dataset, parent_seed)
            assert job.argv[-1] == str(parent.run_dir / "offline.npz")


def test_every_suite_job_parses_with_its_script_flags(tmp_path):
    """A misspelt or removed flag in a suite fails here, not after hours of pretraining; and the
    study suite aca_no_entropy_backup drops the entropy backup in its shared pretraining."""
    import importlib

    import tyro

    parsed = {}
    for name in SUITES:
        suite = sweep.load_suite(name)
        for budget in ("smoke", "cpu", "paper"):
            for job in sweep.expand(suite, suite.budget(budget), tmp_path):
                # the job's own suite: bred_fig3 lists off2on_fig3's pretraining jobs
                module = importlib.import_module(
                    sweep.load_suite(job.suite).module_for(job.variant)
                )
                argv = list(job.argv)
                if "--offline-checkpoint" in argv:  # the path is checked when the run starts
                    at = argv.index("--offline-checkpoint")
                    del argv[at : at + 2]
                parsed[(job.suite, budget, job.key)] = tyro.cli(module.Args, args=argv)
    for (name, budget, key), args in parsed.items():
        if name == "aca_no_entropy_backup":
            assert args.offline_backup_entropy is False, (budget, key)
        elif name == "aca_table2":
            assert args.offline_backup_entropy is True, (budget, key)


def _flags(argv) -> dict:
    """--flag value(s) pairs of an argument list."""
    out, key = {}, None
    for tok in argv:
        if tok.startswith("--"):
            key = tok
            out[key] = []
        else:
            out[key].append(tok)
    return out


def test_pretraining_from_another_suite_shares_its_jobs_and_matches_its_flags(tmp_path):
    bred, off2on = sweep.load_suite("bred_fig3"), sweep.load_suite("off2on_fig3")
    assert bred.pretraining_from == "off2on_fig3"
    for budget in ("smoke", "cpu", "paper"):
        jobs = sweep.expand(bred, bred.budget(budget), tmp_path)
        theirs = {j.uid: j for j in sweep.expand(off2on, off2on.budget(budget), tmp_path)}
        for job in jobs:
            if job.variant == "pretrain":  # off2on's own job, same run dir and arguments
                assert job.suite == "off2on_fig3" and theirs[job.uid] == job
                continue
            committed = bred.budget(budget).offline_checkpoint
            if committed:  # no pretraining job: both suites fine-tune from the same file
                assert committed == off2on.budget(budget).offline_checkpoint
                assert job.after is None and job.argv[-1] == str(REPO / committed)
                assert all(j.argv[-1] == str(REPO / committed) for j in theirs.values())
                continue
            parent = theirs[job.after]
            assert job.argv[-1] == str(parent.run_dir / "offline.npz")
            # The flags that shape the checkpoint and the global step must agree.
            mine, pre = _flags(job.argv), _flags(parent.argv)
            for flag in ("--ensemble-size", "--hidden-dims", "--offline-steps", "--bc-steps"):
                assert mine.get(flag) == pre.get(flag), (budget, flag)
    # A sweep of both suites lists the shared pretraining job once.
    cmd = [sys.executable, "-m", "benchmarks.run", "bred_fig3", "off2on_fig3", "--budget",
           "paper", "--root", str(tmp_path), "--dry-run"]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    pretrain_lines = [line for line in out.splitlines() if line.split()[2].endswith("/pretrain")]
    assert len(pretrain_lines) == len(off2on.datasets) * len(off2on.budget("paper").seeds)
    assert all(line.split()[1] == "off2on_fig3" for line in pretrain_lines)


def test_reference_csvs_cover_every_reported_method_and_dataset():
    for name in SUITES:
        suite = sweep.load_suite(name)
        if suite.reference is None:  # a study of our own (td3c_dual): no paper numbers
            assert not any(v.paper for v in suite.variants), name
            continue
        with open(sweep.REFERENCE_DIR / suite.reference) as f:
            rows = list(csv.DictReader(f))
        pairs = {(r["method"], r["dataset"]) for r in rows}
        for variant in suite.variants:
            if variant.paper and any(m == variant.paper for m, _ in pairs):
                for dataset in suite.datasets:
                    assert (variant.paper, dataset) in pairs, (name, variant.paper, dataset)
        for r in rows:  # delta = online - offline in every transcribed row
            assert float(r["online"]) - float(r["offline"]) == pytest.approx(
                float(r["delta"]), abs=0.02
            )


def test_unknown_suite_and_dataset_fail_with_one_line_errors():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "nope", "--budget", "smoke"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert (
        proc.returncode == 2
        and "unknown suite 'nope'; known: aca_no_entropy_backup, aca_table2" in proc.stderr
    )
    with pytest.raises(sweep.SweepError, match="not in suite td3c_table1"):
        suite = sweep.load_suite("td3c_table1")
        sweep.expand(suite, suite.budget("cpu"), datasets=["hopper-expert-v2"])


def test_early_minimum_and_scores_of_a_run(tmp_path):
    suite = sweep.load_suite("td3c_table1")
    (job,) = [
        j
        for j in sweep.expand(suite, suite.budget("smoke"), tmp_path)
        if j.key == "hopper-medium-v2/seed0/td3"
    ]
    job.run_dir.mkdir(parents=True)
    (job.run_dir / "config.json").write_text(
        json.dumps({"offline_steps": 100, "online_steps": 1000})
    )
    (job.run_dir / "summary.json").write_text(
        json.dumps({"normalized_score_before_finetuning": 50.0,
                    "normalized_score_after_finetuning": 70.0})
    )  # fmt: skip
    rows = [(100, 55.0), (150, 30.0), (200, 20.0), (300, 10.0), (1100, 60.0), (1100, 70.0)]
    (job.run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, report.SCORE: v}) + "\n" for s, v in rows)
    )
    run = report.read_run(job)
    # the offline evaluation (step 100) is not part of fine-tuning; steps 50 and 100 are the first
    # 10% of the 1000 online steps; the last evaluation logged at a step wins
    assert run["early_min"] == 20.0 and run["delta"] == 20.0
    assert run["curve"] == [(0, 50.0), (50, 30.0), (100, 20.0), (200, 10.0), (1000, 70.0)]
    # the mean over fine-tuning: its evaluations only, not the pretrained start (50)
    assert run["mean_online"] == (30.0 + 20.0 + 10.0 + 70.0) / 4


def test_a_truncated_run_is_reported_only_when_asked_and_only_near_its_end(tmp_path):
    suite = sweep.load_suite("td3c_table1")
    jobs = {j.key: j for j in sweep.expand(suite, suite.budget("smoke"), tmp_path)}
    near, early = jobs["hopper-medium-v2/seed0/td3"], jobs["hopper-medium-v2/seed0/td3c"]
    for job, last in ((near, 1050), (early, 850)):  # stopped at 950 and at 750 of 1000 online
        job.run_dir.mkdir(parents=True)
        (job.run_dir / "config.json").write_text(
            json.dumps({"offline_steps": 100, "online_steps": 1000})
        )
        rows = [(100, 40.0), (150, 20.0), (600, 50.0), (last - 50, 60.0), (last, 65.0)]
        (job.run_dir / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, report.SCORE: v}) + "\n" for s, v in rows)
        )
    assert report.read_run(near) is None  # not finished, not asked for
    assert report.read_run(early, truncated=True) is None  # 750 < 90% of 1000
    run = report.read_run(near, truncated=True)
    # no summary.json: the start is the evaluation at online step 0, the end the last one
    assert (run["pretrained"], run["finetuned"], run["stopped_at"]) == (40.0, 65.0, 950)
    assert run["early_min"] == 20.0 and run["late_mean"] == 62.5  # steps 900 and 950
    assert run["curve"] == [(0, 40.0), (50, 20.0), (500, 50.0), (900, 60.0), (950, 65.0)]
    (line,) = report.truncation_lines([run])
    assert "td3 seed 0 at 0.95k of 1k" in line


def _fake_run(run_dir, scores, dual, online_steps=1000, offline_steps=100, before=50.0):
    run_dir.mkdir(parents=True)
    config = {"offline_steps": offline_steps, "online_steps": online_steps, "dual_lr": 0.01}
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "summary.json").write_text(
        json.dumps({"normalized_score_before_finetuning": before,
                    "normalized_score_after_finetuning": scores[-1][1]})
    )  # fmt: skip
    rows = [{"step": offline_steps + s, report.SCORE: v} for s, v in scores]
    rows += [{"step": offline_steps + s, "online/dual": v} for s, v in dual]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_curves_compares_single_runs(tmp_path, capsys):
    from benchmarks import plot_curves

    _fake_run(tmp_path / "a", [(50, 40.0), (100, 45.0), (500, 20.0), (1000, 80.0)],
              [(50, 1.0), (1000, 3.0)])  # fmt: skip
    _fake_run(tmp_path / "b", [(100, 60.0), (950, 90.0), (1000, 70.0)], [(100, 2.0)])
    out = tmp_path / "cmp" / "curves"
    argv = [str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "A", "B", "--out", str(out),
            "--extra", "online/dual", "--config", "dual_lr"]  # fmt: skip
    assert plot_curves.main(argv) == 0
    with open(out.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    # step 0 is the pretrained policy; a scalar appears at the evaluations logged at its step
    columns = ("run", "online_step", "normalized_score", "online/dual")
    assert [tuple(r[c] for c in columns) for r in rows] == [
        ("A", "0", "50.0", ""), ("A", "50", "40.0", "1"), ("A", "100", "45.0", ""),
        ("A", "500", "20.0", ""), ("A", "1000", "80.0", "3"),
        ("B", "0", "50.0", ""), ("B", "100", "60.0", "2"), ("B", "950", "90.0", ""),
        ("B", "1000", "70.0", ""),
    ]  # fmt: skip
    table = out.with_suffix(".md").read_text().splitlines()
    # A: lowest in the first 10% (steps <= 100) is 40, lowest overall 20 at step 500, last λ 3
    assert table[2] == "| A | 0.01 | 50.0 | 80.0 | 80.0 (1 evals) | 40.0 | 20.0 (at 500) | 3 |"
    assert table[3] == "| B | 0.01 | 50.0 | 70.0 | 80.0 (2 evals) | 60.0 | 60.0 (at 100) | 2 |"
    assert out.with_suffix(".png").stat().st_size > 0
    # an unfinished run, an unknown config key, a label count that does not match: clear errors
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text("{}")
    assert plot_curves.main([str(tmp_path / "c"), "--out", str(out)]) == 2
    assert "has not finished (no summary.json)" in capsys.readouterr().err
    assert plot_curves.main([str(tmp_path / "a"), "--out", str(out), "--config", "nope"]) == 2
    assert "has no ['nope']; known keys: ['dual_lr'" in capsys.readouterr().err
    assert plot_curves.main([str(tmp_path / "a"), "--labels", "x", "y", "--out", str(out)]) == 2
    assert "give one distinct label per run" in capsys.readouterr().err


def test_report_says_what_was_run_and_on_which_data():
    suite = sweep.load_suite("aca_table2")
    paper, smoke = suite.budget("paper"), suite.budget("smoke")
    runs = [{"dataset_id": "o2o/hopper/medium-v0", "pretrained_evaluations": 3},
            {"dataset_id": "mujoco/hopper/medium-v0", "pretrained_evaluations": 1,
             "dataset": "hopper-medium-v2", "seed": 1, "pretrained": 48.0,
             "pretraining_first": math.nan}]  # fmt: skip
    lines = report.provenance(suite, paper, runs, ["hopper-medium-v2"], [0, 1])
    assert lines[0].startswith("Start (*pretrained*, the claims' reference): on 1 of 2 runs the")
    assert "mean of 3 evaluations" in lines[0]
    assert lines[0].endswith("on the others the fine-tuning's first.")
    # a pretraining run that evaluated the same seeds differently is named, with both numbers
    unpaired = [runs[0], {**runs[1], "pretraining_first": 50.04}]
    start = report.provenance(suite, paper, unpaired, ["hopper-medium-v2"], [0, 1])[0]
    assert start.endswith("on the others the fine-tuning's first (hopper-medium-v2 seed 1: 50.0 "
                          "in its pretraining run, 48.0 in its fine-tuning, on the same episode "
                          "seeds: another machine's floating point or another policy, so not "
                          "pooled).")  # fmt: skip
    assert lines[1] == "Ran here: 1 of the budget's 15 datasets, 2 of its 5 seeds."
    assert "`mujoco/hopper/medium-v0`, `o2o/hopper/medium-v0`" in lines[2]
    assert "generated with the D4RL recipe" in lines[2]
    # the full protocol on official data, every start pooled: only those two lines
    everything = list(suite.datasets)
    official = [{"dataset_id": "mujoco/hopper/medium-v0", "pretrained_evaluations": 3}]
    start, line = report.provenance(suite, paper, official, everything, list(paper.seeds))
    assert "on 1 of" not in start and "the mean of 3 evaluations" in start
    assert line.startswith("Datasets loaded") and "generated" not in line
    start, smoke_line = report.provenance(suite, smoke, runs[1:], everything, [0])
    assert start.endswith("the fine-tuning's first evaluation (nothing to pool it with: a "
                          "committed checkpoint, one pretraining for every seed, or a policy its "
                          "pretraining run did not evaluate).")  # fmt: skip
    assert "tiny random-action stand-ins" in smoke_line


def test_the_start_pools_every_evaluation_of_the_pretrained_policy(tmp_path):
    suite = sweep.load_suite("td3c_table1")
    jobs = {j.key: j for j in sweep.expand(suite, suite.budget("smoke"), tmp_path)}
    pretrain, td3 = jobs["hopper-medium-v2/seed0/pretrain"], jobs["hopper-medium-v2/seed0/td3"]
    assert str(pretrain.run_dir / "offline.npz") in td3.argv
    # the pretraining (100 offline steps, 0 online): an earlier evaluation, then the periodic and
    # the final one at its last step; its first evaluation after pretraining (seed + 10**6) is
    # the summary's "before", which a fine-tuning from the same policy repeats exactly
    pretrain.run_dir.mkdir(parents=True)
    (pretrain.run_dir / "config.json").write_text(json.dumps({"offline_steps": 100}))
    (pretrain.run_dir / "summary.json").write_text(
        json.dumps({"normalized_score_before_finetuning": 50.0})
    )
    rows = [{"step": 50, report.SCORE: 10.0}, {"step": 100, "offline/loss": 1.0},
            {"step": 100, report.SCORE: 56.0}, {"step": 100, report.SCORE: 62.0}]  # fmt: skip
    (pretrain.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    checkpoint = pretrain.run_dir / "offline.npz"

    _fake_run(tmp_path / "same", [(100, 20.0), (1000, 80.0)], [], before=50.0)
    run = report.read_run_dir(tmp_path / "same", pretraining=checkpoint.parent)
    start = (50.0 + 56.0 + 62.0) / 3  # three 10-episode evaluations of one policy
    assert run["pretrained_evaluations"] == 3 and run["pretrained"] == pytest.approx(start)
    assert run["curve"][0] == (0, pytest.approx(start))
    assert run["delta"] == pytest.approx(80.0 - start)
    # a different first evaluation is a different policy (BRED's distilled one) or different
    # evaluation seeds (a pretraining shared by fine-tuning seeds): nothing to pool
    _fake_run(tmp_path / "other", [(100, 20.0), (1000, 80.0)], [], before=48.0)
    run = report.read_run_dir(tmp_path / "other", pretraining=checkpoint.parent)
    assert run["pretrained_evaluations"] == 1 and run["pretrained"] == 48.0
    assert run["pretraining_first"] == 50.0  # kept, for the report to name the unpooled start
    # a committed checkpoint has no pretraining run beside it
    committed = report.read_run_dir(tmp_path / "same", pretraining=tmp_path)
    assert committed["pretrained"] == 50.0 and math.isnan(committed["pretraining_first"])
    # a sweep job finds its pretraining run from its --offline-checkpoint flag
    _fake_run(td3.run_dir, [(100, 20.0), (1000, 80.0)], [], before=50.0)
    assert report.read_run(td3)["pretrained"] == pytest.approx(start)
    # ... unless one pretraining serves every seed (the others' evaluation seeds differ)
    assert report.read_run(td3, pool_start=False)["pretrained"] == 50.0


def test_iqm_is_the_25_percent_trimmed_mean():
    from scipy.stats import trim_mean

    scores = np.random.default_rng(0).normal(50, 20, size=(4, 5))
    point, low, high = report.iqm_with_ci({"a": scores}, reps=500)["a"]
    assert point == pytest.approx(trim_mean(scores.ravel(), 0.25), rel=1e-6)
    assert low < point < high


def test_iqm_intervals_are_reproducible_and_independent_of_other_variants():
    # The bootstrap draws resamples at random: unseeded, a re-made report's CIs would change on
    # every run. Seeded per variant, one variant's interval is the same alone or beside another.
    rng = np.random.default_rng(1)
    a, b = rng.normal(50, 20, size=(3, 3)), rng.normal(80, 5, size=(3, 3))
    alone = report.iqm_with_ci({"a": a}, reps=300)["a"]
    assert report.iqm_with_ci({"a": a}, reps=300)["a"] == alone
    assert report.iqm_with_ci({"b": b, "a": a}, reps=300)["a"] == alone
    assert report.iqm_with_ci({"a": a}, reps=300, seed=1)["a"][1:] != alone[1:]
    # ... and NumPy's global generator, which rliable draws from, is left as the caller had it
    np.random.seed(5)
    expected = np.random.rand()
    np.random.seed(5)
    report.iqm_with_ci({"a": a}, reps=300)
    assert np.random.rand() == expected


def test_seed_spread_is_the_sample_standard_deviation():
    # Two seeds 1 and 3: mean 2, sample std sqrt(((1-2)^2 + (3-2)^2) / (2 - 1)) = sqrt(2) = 1.41
    # (the population std would be 1.0); a single seed has no spread; NaNs (unfinished) are dropped.
    assert report.mean_std([1.0, 3.0]) == "2.0 ± 1.4"
    assert report.mean_std([1.0, 3.0, float("nan")]) == "2.0 ± 1.4"
    assert report.mean_std([7.25]) == "7.2"
    assert report.mean_std([]) == "—"


def test_diagnostic_band_is_the_seeds_range_at_steps_every_seed_logged():
    # Three seeds' traces of a dual variable; seed 2 has no step 2000 and an extra step 4000, so
    # only steps 1000 and 3000 are common. At 1000: values 1, 10, 100 -> mean 37, range [1, 100];
    # at 3000: 5, 5, 2 -> mean 4, range [2, 5].
    traces = [
        [(1000, 1.0), (2000, 7.0), (3000, 5.0)],
        [(1000, 10.0), (2000, 8.0), (3000, 5.0)],
        [(1000, 100.0), (3000, 2.0), (4000, 9.0)],
    ]
    steps, mean, lowest, highest = report.seed_band(traces)
    assert steps == [1000, 3000]
    np.testing.assert_allclose(mean, [37.0, 4.0])
    np.testing.assert_allclose(lowest, [1.0, 2.0])
    np.testing.assert_allclose(highest, [100.0, 5.0])


def _runner(tmp_path, *extra):
    env = {**os.environ, "O2O_SUITES_DIR": str(tmp_path / "suites")}
    return [sys.executable, "-m", "benchmarks.run", "tiny", "--budget", "smoke",
            "--root", str(tmp_path / "runs"), *extra], env  # fmt: skip


def _headers(run_dir):
    return [x for x in (run_dir / "log.txt").read_text().splitlines() if x.startswith("=== ")]


def test_runner_killed_midway_finishes_without_redoing_or_losing_runs(tmp_path, monkeypatch):
    (tmp_path / "suites").mkdir()
    (tmp_path / "suites" / "tiny.toml").write_text(TINY_SUITE)
    base = tmp_path / "runs" / "tiny" / "smoke" / "hopper-medium-v2" / "seed0"
    cmd, env = _runner(tmp_path)
    runner = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.time() + 300
    # kill it once the first fine-tuning job has checkpointed but not finished
    while not (base / "td3" / "checkpoint.npz").exists() and time.time() < deadline:
        time.sleep(0.2)
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=60) == 128 + signal.SIGTERM
    assert (base / "pretrain" / "summary.json").exists()
    assert not (base / "td3" / "summary.json").exists()
    pretrain_mtime = (base / "pretrain" / "summary.json").stat().st_mtime_ns
    alive = subprocess.run(["pgrep", "-f", str(base)], capture_output=True, text=True).stdout
    assert not alive.strip(), "the runner left a job running"

    cmd, env = _runner(tmp_path)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3 jobs (1 already finished)" in proc.stdout
    # the finished pretraining was not run again; the interrupted job resumed from its checkpoint
    assert (base / "pretrain" / "summary.json").stat().st_mtime_ns == pretrain_mtime
    assert len(_headers(base / "pretrain")) == 1
    headers = _headers(base / "td3")
    assert len(headers) == 2 and "--resume" in headers[1] and "--resume" not in headers[0]
    # job.json keeps the machine of every start, the resumed job's two (floating point differs
    # between CPUs, so a run resumed elsewhere must say so)
    starts = {
        v: json.loads((base / v / "job.json").read_text())["starts"] for v in ("pretrain", "td3")
    }
    assert [len(starts["pretrain"]), len(starts["td3"])] == [1, 2]
    assert starts["td3"][0]["time"] <= starts["td3"][1]["time"]
    assert all(s["cpus"] == os.cpu_count() and s["arch"] for s in starts["td3"])
    for variant in ("td3", "td3c"):
        rows = [json.loads(x) for x in (base / variant / "metrics.jsonl").read_text().splitlines()]
        for key in ("online/critic_loss", "eval/normalized_score"):
            steps = [r["step"] for r in rows if key in r]
            assert steps and steps == sorted(set(steps)) or key == "eval/normalized_score"
        online = [r["step"] for r in rows if "online/critic_loss" in r]
        assert online == list(range(300, 1201, 100))  # every log window once, none lost
    monkeypatch.setenv("O2O_SUITES_DIR", str(tmp_path / "suites"))
    out, rows = report.report("tiny", "smoke", tmp_path / "runs", tmp_path / "report")
    assert [r["seeds"] for r in rows] == [1, 1]
    assert "tiny random-action stand-ins" in (out / "report.md").read_text()
    assert (out / "curves" / "hopper-medium-v2.png").exists()
    # curves.csv holds each run's pretrained score (step 0) and every online evaluation. The
    # pretrained score pools the fine-tuning's first evaluation with the pretraining's two at
    # its last step: a real fine-tuning repeats its pretraining's first evaluation exactly.
    offline_steps = json.loads((base / "pretrain" / "config.json").read_text())["offline_steps"]
    pretrain_rows = [
        json.loads(x) for x in (base / "pretrain" / "metrics.jsonl").read_text().splitlines()
    ]
    at_last = [
        r[report.SCORE] for r in pretrain_rows if r["step"] == offline_steps and report.SCORE in r
    ]
    assert len(at_last) == 2
    with open(out / "runs.csv") as f:
        assert [int(r["pretrained_evaluations"]) for r in csv.DictReader(f)] == [3, 3]
    with open(out / "curves.csv") as f:
        curve_rows = list(csv.DictReader(f))
    for variant in ("td3", "td3c"):
        mine = [r for r in curve_rows if r["variant"] == variant]
        summary = json.loads((base / variant / "summary.json").read_text())
        assert int(mine[0]["online_step"]) == 0
        start = (summary["normalized_score_before_finetuning"] + sum(at_last)) / 3
        assert float(mine[0]["normalized_score"]) == pytest.approx(start, abs=1e-3)
        assert float(mine[-1]["normalized_score"]) == pytest.approx(
            summary["normalized_score_after_finetuning"], abs=1e-3
        )
    # diagnostics.csv: the suite's logged online scalars, at online steps (global - offline).
    with open(out / "diagnostics.csv") as f:
        diag = [r for r in csv.DictReader(f) if r["variant"] == "td3c"]
    logged = {
        json.loads(x)["step"] - 200: json.loads(x)["online/critic_loss"]
        for x in (base / "td3c" / "metrics.jsonl").read_text().splitlines()
        if "online/critic_loss" in x
    }
    assert [int(r["online_step"]) for r in diag] == sorted(logged)
    # to 6 significant digits (5 fixed decimals had made TD3-C's constraint, ~1e-5, 1e-5 or 2e-5)
    assert [float(r["value"]) for r in diag] == pytest.approx(
        [logged[k] for k in sorted(logged)], rel=5e-6, abs=0
    )
    assert (out / "curves" / "hopper-medium-v2_diagnostics.png").exists()


def test_ray_backend_on_a_local_instance(tmp_path):
    pytest.importorskip("ray")
    (tmp_path / "suites").mkdir()
    (tmp_path / "suites" / "tiny.toml").write_text(
        TINY_SUITE.replace('"--online-steps", "1000"', '"--online-steps", "200"').replace(
            '"--eval-every", "500"', '"--eval-every", "100"'
        )
    )
    cmd, env = _runner(tmp_path, "--backend", "ray", "--address", "local")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3/3 jobs finished" in proc.stdout
    base = tmp_path / "runs" / "tiny" / "smoke" / "hopper-medium-v2" / "seed0"
    for variant in ("pretrain", "td3", "td3c"):
        assert (base / variant / "summary.json").exists()


class _Bar:  # what schedule() uses of tqdm
    n, initial, postfix = 0.0, 0.0, ""

    def write(self, text):
        pass

    def set_postfix_str(self, text):
        self.postfix = text


def _tqdm_lines(desc, total, upto, **kwargs) -> str:
    """What lifecycle.progress_bar writes into a job's log: tqdm's own output, not a copy."""
    from tqdm import tqdm

    out = io.StringIO()
    with tqdm(total=total, desc=desc, file=out, mininterval=0, **kwargs) as bar:
        bar.update(upto - bar.n)
    return out.getvalue()


def test_job_progress_reads_the_current_attempts_last_bar(tmp_path):
    from benchmarks.run import job_progress

    suite = sweep.load_suite("td3c_table1")
    job = sweep.expand(suite, suite.budget("smoke"), tmp_path, ["hopper-medium-v2"])[0]
    job.run_dir.mkdir(parents=True)
    log = job.run_dir / "log.txt"
    assert job_progress(job) is None  # no log yet
    first = _tqdm_lines("offline TD3-BC", 500, 130, unit_scale=1000)  # shows 130000/500000
    log.write_text("\n=== 2026-12-04 07:00:00 python ...\n" + first)
    assert job_progress(job) == ("offline TD3-BC", 130_000, 500_000)
    # a resumed attempt: nothing of it read until its own bar appears, then its last line
    log.write_text(log.read_text() + "\n=== 2026-12-04 08:00:00 python ... --resume\nloading\n")
    assert job_progress(job) is None
    second = _tqdm_lines("offline TD3-BC", 500, 260, initial=130, unit_scale=1000)
    log.write_text(log.read_text() + second + _tqdm_lines("online td3", 0, 0))  # empty phase
    assert job_progress(job) == ("offline TD3-BC", 260_000, 500_000)
    log.write_text(log.read_text() + _tqdm_lines("online updates", 200_000, 50_000, unit="update"))
    assert job_progress(job) == ("online updates", 50_000, 200_000)


def test_schedule_counts_running_jobs_by_their_share_done(tmp_path):
    from benchmarks.run import schedule

    suite = sweep.load_suite("aca_table2")
    jobs = sweep.expand(suite, suite.budget("smoke"), tmp_path, ["hopper-medium-v2"])
    assert [job.variant for job in jobs] == ["pretrain", "aca", "sac"]
    (jobs[0].run_dir).mkdir(parents=True)
    (jobs[0].run_dir / "checkpoint.npz").write_bytes(b"")  # an interrupted run: resumed
    polls = []
    bar = _Bar()

    def launch(job):
        return job.uid

    def wait_any(handles, timeout):
        polls.append((sorted(handles), bar.n, bar.initial, bar.postfix))
        if len(polls) == 1:  # the resumed pretraining has printed its first line: 40% done
            (jobs[0].run_dir / "log.txt").write_text("\n=== t\n" + _tqdm_lines("offline", 10, 4))
            return {}
        if len(polls) == 2:  # 70% done: the sweep's own progress is 0.3 of a job
            (jobs[0].run_dir / "log.txt").write_text("\n=== t\n" + _tqdm_lines("offline", 10, 7))
            return {}
        return {h: 0 for h in handles}

    outcome = schedule(jobs, launch, wait_any, workers=1, bar=bar, poll_s=0)
    assert all(v == "finished" for v in outcome.values())
    assert polls[1][:3] == (["aca_table2/hopper-medium-v2/seed0/pretrain"], 0.4, 0.4)
    assert polls[2][1:3] == (0.7, 0.4)  # n counts the share; initial keeps what came before
    assert polls[2][3] == "running 1 | hopper-medium-v2/seed0/pretrain offline 7/10"
    assert bar.n == 3


def test_core_groups_split_the_cpus_into_disjoint_near_equal_parts():
    from benchmarks.run import core_groups

    assert core_groups([0, 1], 2) == [{0}, {1}]
    assert core_groups([4, 0, 2, 1, 3], 2) == [{0, 1, 2}, {3, 4}]
    assert core_groups([0, 1], 3) == []  # more workers than CPUs: nothing to pin
    for n_cpus in range(1, 9):
        for workers in range(1, n_cpus + 1):
            groups = core_groups(list(range(n_cpus)), workers)
            assert len(groups) == workers
            assert set().union(*groups) == set(range(n_cpus))
            assert sum(map(len, groups)) == n_cpus  # disjoint
            assert max(map(len, groups)) - min(map(len, groups)) <= 1


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux and at least 2 CPUs",
)
def test_pinned_workers_run_their_jobs_on_disjoint_cores():
    # In a fresh interpreter, as the runner is (no JAX threads there to fork beside): the local
    # backend's two worker slots run two jobs at once, each job a child that reports the CPUs it
    # may run on after the runner's pre-exec setup; then one job with pinning off.
    script = """
import json, os, subprocess, sys
from benchmarks import run
seen = []
def fake_execute(job, env, python=sys.executable, cores=None):
    probe = "import os, time; time.sleep(1.0); print(sorted(os.sched_getaffinity(0)))"
    out = subprocess.run([sys.executable, "-c", probe], preexec_fn=run.child_setup(cores),
                         capture_output=True, text=True, check=True).stdout
    seen.append([job, sorted(cores) if cores else None, json.loads(out)])
    return 0
run.execute = fake_execute
for pin, jobs in ((True, ["job a", "job b"]), (False, ["job c"])):
    launch, wait_any, close = run.local_backend(2, {}, pin=pin)
    handles = [launch(job) for job in jobs]
    while handles:
        for handle, code in wait_any(handles, 30).items():
            assert code == 0
            handles.remove(handle)
    close()
print(json.dumps(seen))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = {job: (cores, ran) for job, cores, ran in json.loads(proc.stdout)}
    cpus = sorted(os.sched_getaffinity(0))
    (cores_a, ran_a), (cores_b, ran_b) = seen["job a"], seen["job b"]
    assert ran_a == cores_a and ran_b == cores_b  # each child ran where its worker pinned it
    assert not set(ran_a) & set(ran_b) and sorted(ran_a + ran_b) == cpus
    assert seen["job c"] == (None, cpus)  # pinning off: every CPU


def test_workers_sharing_an_accelerator_split_its_memory_unless_the_user_chose():
    from benchmarks.run import shared_accelerator_env

    def fraction(workers, environ=None):
        out = shared_accelerator_env(workers, environ or {})
        return float(out["XLA_PYTHON_CLIENT_MEM_FRACTION"]) if out else None

    assert fraction(1) is None  # one job keeps JAX's default preallocation
    assert fraction(2) == 0.45 and fraction(9) == 0.1  # together at most 90% of the device
    assert fraction(3) * 3 <= 0.9 + 1e-9
    assert fraction(4, {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.2"}) is None
    assert fraction(4, {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}) is None


def test_schedule_keeps_suites_apart_when_their_job_keys_repeat(tmp_path):
    """Every suite has e.g. hopper-medium-v2/seed0/pretrain: one suite's finished pretraining
    must not release another suite's fine-tuning jobs."""
    from benchmarks.run import schedule

    jobs = []
    for name in ("aca_table2", "td3c_table1"):
        suite = sweep.load_suite(name)
        jobs += sweep.expand(suite, suite.budget("smoke"), tmp_path, ["hopper-medium-v2"])
    launched = []

    def launch(job):
        launched.append(job)
        return job.uid

    def wait_any(handles, timeout):  # aca_table2's pretraining fails, everything else succeeds
        return {h: (1 if h == "aca_table2/hopper-medium-v2/seed0/pretrain" else 0) for h in handles}

    outcome = schedule(jobs, launch, wait_any, workers=10, bar=_Bar())
    assert len(outcome) == len(jobs) == 3 + 5  # aca: pretrain + 2, td3c: pretrain + 4
    for job in jobs:
        if job.suite == "aca_table2" and job.variant != "pretrain":
            assert outcome[job.uid].startswith("skipped") and job not in launched
        elif job.suite == "td3c_table1":
            assert outcome[job.uid] == "finished"


def test_report_compares_with_the_reference_at_its_own_step():
    """off2on_fig3's reference was measured at 100k online steps: the report's "at paper's step"
    is the evaluation at 100k (or the last before it), not the end of a 250k run."""
    curve = [(0, 10.0), (50_000, 20.0), (100_000, 30.0), (150_000, 40.0), (250_000, 90.0)]
    assert report.score_at(curve, 100_000) == 30.0
    assert report.score_at(curve, 120_000) == 30.0  # the last evaluation before the step
    assert math.isnan(report.score_at(curve[:3], 120_000))  # the run stopped before it
    refs = report.read_reference(sweep.load_suite("off2on_fig3"))
    assert {int(r["step"]) for r in refs.values()} == {100_000}
    assert report.paper_cell(refs[("BR", "hopper-random-v2")]).endswith("@ 100k")
    td3c = report.read_reference(sweep.load_suite("td3c_table1"))
    assert {int(r["step"]) for r in td3c.values()} == {200_000}


def test_one_pretraining_for_all_seeds_or_a_committed_checkpoint(tmp_path):
    """pretraining_seed: one pretraining job per dataset that every seed fine-tunes from;
    offline_checkpoint: no pretraining job, every fine-tuning job loads the committed file."""
    suite = sweep.load_suite("td3c_dual")
    budget = suite.budget("cpu")
    assert budget.pretraining_seed == 0
    jobs = sweep.expand(suite, budget, tmp_path)
    (pretrain,) = [j for j in jobs if j.variant == "pretrain"]
    assert pretrain.seed == 0 and _flags(pretrain.argv)["--seed"] == ["0"]
    tuned = [j for j in jobs if j.variant != "pretrain"]
    assert {j.seed for j in tuned} == {0, 1, 2} and len(tuned) == 3 * len(suite.variants)
    for job in tuned:
        assert job.after == pretrain.uid and _flags(job.argv)["--seed"] == [str(job.seed)]
        assert job.argv[-1] == str(pretrain.run_dir / "offline.npz")
    assert jobs.index(pretrain) == 0  # before every job that needs it
    committed = dataclasses.replace(budget, pretraining_seed=None, offline_checkpoint="pre/x.npz")
    jobs = sweep.expand(suite, committed, tmp_path)
    assert all(j.variant != "pretrain" and j.after is None for j in jobs)
    assert all(j.argv[-2:] == ("--offline-checkpoint", str(REPO / "pre/x.npz")) for j in jobs)
    line = report.provenance(suite, committed, [], ["hopper-medium-expert-v2"], [0, 1, 2])[0]
    assert "pre/x.npz" in line and "fine-tuning variance only" in line


def test_archive_keeps_finished_runs_and_restores_them_into_another_root(tmp_path, monkeypatch):
    """benchmarks.archive: `save` keeps only finished jobs, only their small files (and a
    pretraining job's offline.npz), with the command line's paths made portable; `restore` into
    another root gives runs the runner counts as finished there and whose job.json matches that
    root's command lines; a different file already there stops the restore before it copies."""
    from benchmarks import archive

    suite, root, store, elsewhere = "td3c_dual", tmp_path / "a", tmp_path / "logs", tmp_path / "b"
    jobs = sweep.expand(sweep.load_suite(suite), sweep.load_suite(suite).budget("cpu"), root)
    pretrain, first, second, unfinished = jobs[0], jobs[1], jobs[2], jobs[3]
    assert pretrain.variant == "pretrain"
    for job in (pretrain, first, second):
        _fake_run(job.run_dir, [(500, 60.0), (1000, 70.0)], [(500, 1.0)])
        (job.run_dir / "job.json").write_text(json.dumps({"argv": list(job.argv), "suite": suite}))
        (job.run_dir / "checkpoint.npz").write_bytes(b"big")
        (job.run_dir / "events.out.tfevents.1").write_bytes(b"tb")
    (pretrain.run_dir / "offline.npz").write_bytes(b"agent")
    unfinished.run_dir.mkdir(parents=True)
    (unfinished.run_dir / "checkpoint.npz").write_bytes(b"half")

    saved = archive.save(suite, "cpu", root, store)
    assert saved == [pretrain.key, first.key, second.key]
    kept = sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file())
    prefix = f"{suite}/cpu/hopper-medium-expert-v2"
    expected = [f"{prefix}/seed0/pretrain/offline.npz"] + [
        f"{prefix}/seed0/{v}/{f}"
        for v in ("pretrain", first.variant, second.variant)
        for f in ("config.json", "job.json", "metrics.jsonl", "summary.json")
    ]
    assert kept == sorted(expected)
    record = json.loads((store / first.run_dir.relative_to(root) / "job.json").read_text())
    assert str(root) not in " ".join(record["argv"])
    offline = (pretrain.run_dir / "offline.npz").relative_to(root)
    assert record["argv"][-1] == f"{{root}}/{offline}"

    restored = archive.restore(suite, "cpu", elsewhere, store)
    assert restored == saved
    there = sweep.expand(sweep.load_suite(suite), sweep.load_suite(suite).budget("cpu"), elsewhere)
    assert [sweep.status(j) for j in there[:4]] == ["finished"] * 3 + ["new"]
    for job in there:
        sweep.check_job_record(job)  # the runner's check: the records are this root's commands
    assert (there[0].run_dir / "offline.npz").read_bytes() == b"agent"
    assert report.read_run_dir(there[1].run_dir)["curve"] == [(0, 50.0), (500, 60.0), (1000, 70.0)]
    # relative roots name the same runs (the runner records absolute paths): saving again and
    # restoring again over the live runs are no-ops, not "differs" errors
    monkeypatch.chdir(tmp_path)
    assert archive.save(suite, "cpu", pathlib.Path("a"), pathlib.Path("logs")) == saved
    assert archive.restore(suite, "cpu", pathlib.Path("b"), pathlib.Path("logs")) == saved
    assert str(root) not in (store / first.run_dir.relative_to(root) / "job.json").read_text()

    (there[2].run_dir / "metrics.jsonl").write_text("{}\n")  # another attempt of that run
    (there[1].run_dir / "summary.json").unlink()
    with pytest.raises(sweep.SweepError, match="differs from the archived"):
        archive.restore(suite, "cpu", elsewhere, store)
    assert not (there[1].run_dir / "summary.json").exists()  # nothing copied before the error

    # --interrupted: the unfinished job's checkpoint too, so a fresh root resumes it; once it
    # finishes, the next save drops its archived checkpoint.
    (unfinished.run_dir / "config.json").write_text("{}")
    (unfinished.run_dir / "job.json").write_text(json.dumps({"argv": list(unfinished.argv)}))
    interrupted_store, third = tmp_path / "logs2", tmp_path / "c"
    assert (
        archive.save(suite, "cpu", root, interrupted_store, interrupted=True)[-1] == unfinished.key
    )
    kept = interrupted_store / unfinished.run_dir.relative_to(root)
    assert sorted(p.name for p in kept.iterdir()) == ["checkpoint.npz", "config.json", "job.json"]
    archive.restore(suite, "cpu", third, interrupted_store)
    resumed = sweep.expand(sweep.load_suite(suite), sweep.load_suite(suite).budget("cpu"), third)
    assert sweep.status(resumed[3]) == "interrupted"
    assert (resumed[3].run_dir / "checkpoint.npz").read_bytes() == b"half"
    (unfinished.run_dir / "summary.json").write_text("{}")
    (unfinished.run_dir / "metrics.jsonl").write_text("")
    archive.save(suite, "cpu", root, interrupted_store, interrupted=True)
    assert not (kept / "checkpoint.npz").exists() and (kept / "summary.json").exists()
    # a fine-tuning checkpoint (it holds the replay buffer) is too large to commit: not kept
    big = jobs[4]
    big.run_dir.mkdir(parents=True)
    (big.run_dir / "checkpoint.npz").write_bytes(b"\0" * (archive.MAX_CHECKPOINT_BYTES + 1))
    assert big.key not in archive.save(suite, "cpu", root, interrupted_store, interrupted=True)
    assert not (interrupted_store / big.run_dir.relative_to(root)).exists()


def test_bench_workers_times_a_phase_from_its_second_to_last_line(tmp_path):
    """benchmarks.bench_workers' steady-state rate: steps between the phase's second and last
    logged lines over their time stamps (the first line carries compilation); other phases'
    lines and lines without the phase's keys are not counted."""
    from benchmarks import bench_workers

    lines = [
        {"step": 1000, "time": 100.0, "offline/critic_loss": 1.0},  # after compiling: left out
        {"step": 2000, "time": 110.0, "offline/critic_loss": 1.0},
        {"step": 3000, "time": 114.0, "offline/critic_loss": 1.0},
        {"step": 4000, "time": 118.0, "offline/critic_loss": 1.0},
        {"step": 4000, "time": 119.0, "eval/normalized_score": 50.0},
        {"step": 4100, "time": 150.0, "online/critic_loss": 1.0},
    ]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert bench_workers.steady_rate(metrics, "offline") == pytest.approx(2000 / 8.0)
    with pytest.raises(SystemExit, match="fewer than 3 'online/' lines"):
        bench_workers.steady_rate(metrics, "online")


def test_machine_info_reads_the_first_processor_and_its_vector_extensions(tmp_path):
    """Results files name the CPU (the project's machines differ 2-3x in speed): model name,
    family/model numbers and the vector extensions, from the first processor's entry only."""
    from benchmarks import machine

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
        "model name\t: AMD EPYC\nflags\t\t: fpu sse avx2 fma avx512f avx512_bf16\n\n"
        "processor\t: 1\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: other\nflags\t\t: sse\n"
    )
    info = machine.machine_info(cpuinfo)
    assert (info["model_name"], info["cpu_family"], info["model"]) == ("AMD EPYC", "26", "2")
    assert info["vector_flags"] == ["avx2", "fma", "avx512f", "avx512_bf16"]
    older = machine.parse_cpuinfo("model name\t: Intel Xeon\nflags\t: sse avx avx2\n")
    assert older["vector_flags"] == ["avx2"] and older["cpu_family"] == "unknown"
    assert "model_name" not in machine.machine_info(tmp_path / "absent")


def test_the_runner_prepares_datasets_without_loading_jax_itself(tmp_path):
    # The runner launches every job as a child process; with JAX's threads running in it, each
    # launch warned "os.fork() was called ... likely lead to a deadlock" (seen after a dataset
    # was generated). So the dataset work runs in a child and the runner never imports JAX.
    code = (
        "import pathlib, sys, types\n"
        "from benchmarks import run\n"
        "jobs = [types.SimpleNamespace(dataset='hopper-medium-v2')]\n"
        "env = run.prepare_datasets(jobs, 300, pathlib.Path(sys.argv[1]))\n"
        "print(env['MINARI_DATASETS_PATH'], 'jax' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
        check=True,
    ).stdout.split()  # fmt: skip
    assert out[-2:] == [str(tmp_path / "tiny_datasets" / "300"), "False"]
    assert (tmp_path / "tiny_datasets" / "300" / "o2o" / "hopper" / "medium-v0").is_dir()


def test_legends_count_seeds_in_words():
    from benchmarks import report

    assert [report.n_seeds(n) for n in (1, 2, 3)] == ["1 seed", "2 seeds", "3 seeds"]


def test_each_claim_kind_by_its_threshold():
    """The report's claim rules, at their boundaries: a collapse is a lowest early score below
    half the start, flat is a late mean within 10 points of it, improves is more than 10 above."""

    def claim(kind, than=None):
        return sweep.Claim("c", "a", kind, than)

    def run(start, early, late, mean_online=0.0):
        return {"pretrained": start, "early_min": early, "late_mean": late,
                "mean_online": mean_online}  # fmt: skip

    assert report.check_claim(claim("collapses"), run(40.0, 19.9, 0.0))[0] is True
    assert report.check_claim(claim("collapses"), run(40.0, 20.0, 0.0))[0] is False
    assert report.check_claim(claim("holds"), run(40.0, 20.0, 0.0)) == (True, "40.0 ↓ 20.0")
    assert report.check_claim(claim("holds"), run(40.0, 19.9, 0.0))[0] is False
    # from a start below 10 a collapse cannot be told from the start
    assert report.check_claim(claim("holds"), run(9.9, 9.9, 0.0))[0] is None
    assert report.check_claim(claim("flat"), run(40.0, 0.0, 30.0)) == (True, "40.0 → 30.0")
    assert report.check_claim(claim("flat"), run(40.0, 0.0, 50.1))[0] is False
    assert report.check_claim(claim("improves"), run(40.0, 0.0, 50.0))[0] is False
    assert report.check_claim(claim("improves"), run(40.0, 0.0, 50.1))[0] is True
    beats = claim("beats", "b")
    assert report.check_claim(beats, run(40.0, 0.0, 60.0), run(40.0, 0.0, 59.0))[0] is True
    assert report.check_claim(beats, run(40.0, 0.0, 60.0), run(40.0, 0.0, 61.0))[0] is False
    assert report.check_claim(beats, run(40.0, 0.0, 60.0), None)[0] is None
    # learns faster: the mean over all of fine-tuning decides, whatever the late means say
    faster = claim("learns_faster", "b")
    verdict = report.check_claim(faster, run(40.0, 0.0, 50.0, 45.0), run(40.0, 0.0, 90.0, 44.0))
    assert verdict == (True, "45.0 vs 44.0")
    slower = report.check_claim(faster, run(40.0, 0.0, 90.0, 44.0), run(40.0, 0.0, 50.0, 45.0))
    assert slower == (False, "44.0 vs 45.0")
    # a run without online evaluations (NaN lowest-early and late mean) tests nothing
    nan = float("nan")
    for kind in ("collapses", "holds", "flat", "improves"):
        assert report.check_claim(claim(kind), run(40.0, nan, nan)) == (None, "no evaluation")
    assert report.check_claim(beats, run(40.0, 0.0, 60.0), run(40.0, nan, nan))[0] is None


CLAIMS_SUITE = (
    TINY_SUITE.replace(
        "[budgets.smoke]",
        """[[claims]]
text = "td3 collapses early"
variant = "td3"
kind = "collapses"

[[claims]]
text = "td3c beats td3"
variant = "td3c"
kind = "beats"
than = "td3"

[budgets.smoke]""",
    )
    .replace("seeds = [0]\ntiny", "seeds = [0, 1]\ntiny")
    .replace('diagnostics = ["online/critic_loss"]\n', "")
)


def _claims_suite_jobs(tmp_path, monkeypatch) -> dict:
    """Install CLAIMS_SUITE as suite 'claims' (smoke budget, runs under tmp_path/runs); its jobs
    by key."""
    (tmp_path / "suites").mkdir()
    (tmp_path / "suites" / "claims.toml").write_text(CLAIMS_SUITE)
    monkeypatch.setenv("O2O_SUITES_DIR", str(tmp_path / "suites"))
    suite = sweep.load_suite("claims")
    jobs = {j.key: j for j in sweep.expand(suite, suite.budget("smoke"), tmp_path / "runs")}
    return jobs


def test_report_checks_the_suites_claims_per_dataset_and_seed(tmp_path, monkeypatch):
    jobs = _claims_suite_jobs(tmp_path, monkeypatch)
    # online budget 1000: evaluations at >= 900 are the last 10%, at <= 100 the first
    curves = {
        "seed0/td3": [(100, 10.0), (500, 60.0), (900, 70.0), (1000, 80.0)],  # collapses
        "seed1/td3": [(100, 30.0), (500, 60.0), (900, 90.0), (1000, 100.0)],  # does not
        "seed0/td3c": [(100, 45.0), (900, 76.0), (1000, 76.0)],  # 76 > (70 + 80) / 2
        # seed 1's td3c has not finished
    }
    for key, curve in curves.items():
        _fake_run(jobs[f"hopper-medium-v2/{key}"].run_dir, curve, [], before=50.0)
    out, _ = report.report("claims", "smoke", tmp_path / "runs", tmp_path / "report")
    with open(out / "claims.csv") as f:
        rows = [(r["claim"], r["seed"], r["shows"], r["late_mean"]) for r in csv.DictReader(f)]
    assert rows == [
        ("td3 collapses early", "0", "True", "75.0"),
        ("td3 collapses early", "1", "False", "95.0"),
        ("td3c beats td3", "0", "True", "76.0"),
    ]
    text = (out / "report.md").read_text()
    assert (
        "| td3 collapses early | hopper-medium-v2 | 1 of 2 seeds | seed 0: 50.0 ↓ 10.0 yes;" in text
    )
    assert "| td3c beats td3 | hopper-medium-v2 | 1 of 1 seed | seed 0: 76.0 vs 75.0 yes |" in text
    # the summary at the top of the section: one row per claim, one column per dataset
    assert "| td3 collapses early | 1 of 2 seeds |\n| td3c beats td3 | 1 of 1 seed |" in text
    # td3 has both seeds and enters the IQM; td3c lacks seed 1, and the report says so
    with open(out / "aggregate.csv") as f:
        assert [(r["variant"], r["runs"]) for r in csv.DictReader(f)] == [("td3", "2")]
    assert "td3c on hopper-medium-v2 (seed 1 not finished)." in text


def test_a_claim_naming_an_unknown_variant_or_kind_is_a_one_line_error(tmp_path, monkeypatch):
    (tmp_path / "suites").mkdir()
    monkeypatch.setenv("O2O_SUITES_DIR", str(tmp_path / "suites"))
    for bad, words in (
        (CLAIMS_SUITE.replace('kind = "collapses"', 'kind = "collapse"'), "has kind 'collapse'"),
        (CLAIMS_SUITE.replace('than = "td3"', 'than = "sac"'), r"outside the suite: \['sac'\]"),
        (CLAIMS_SUITE.replace('than = "td3"\n', ""), "exactly when its kind is one of"),
        (CLAIMS_SUITE.replace('variant = "td3c"\n', ""), r"lacks \['variant'\]"),
    ):
        (tmp_path / "suites" / "bad.toml").write_text(bad)
        with pytest.raises(sweep.SweepError, match=words) as err:
            sweep.load_suite("bad")
        assert "\n" not in str(err.value)


def test_q_calibration_returns_to_go_restart_at_each_episode(tmp_path):
    from studies.q_calibration import q_calibration

    gamma = 0.9
    rewards = [1.0, 1.0, 1.0, 2.0, 2.0]  # episode 7: three steps of 1, episode 8: two of 2
    got = q_calibration.discounted_returns_to_go(rewards, np.array([7, 7, 7, 8, 8]), gamma)
    # constant reward r for the L - t remaining steps: r (1 - gamma^(L - t)) / (1 - gamma)
    expected = [1 * (1 - gamma ** (3 - t)) / (1 - gamma) for t in range(3)]
    expected += [2 * (1 - gamma ** (2 - t)) / (1 - gamma) for t in range(2)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert q_calibration.probe_steps(254) == [0, 50, 100, 150, 200, 244]
    assert q_calibration.probe_steps(120) == [0, 50, 100, 110]
    assert q_calibration.probe_steps(5) == [0]


def test_q_calibration_behaviour_returns_to_go_by_step_average_the_episodes_that_reach_it():
    from studies.q_calibration import q_calibration

    # Episodes 4 (3 steps), 9 (1 step), 4 again (2 steps: an id change starts a new episode).
    episode_ids = np.array([4, 4, 4, 9, 4, 4])
    returns_to_go = np.array([10.0, 20.0, 30.0, 5.0, 7.0, 1.0])
    starts, lengths = q_calibration.episode_bounds(episode_ids)
    np.testing.assert_array_equal(starts, [0, 3, 4])
    np.testing.assert_array_equal(lengths, [3, 1, 2])
    got = q_calibration.behaviour_returns_to_go_by_step(returns_to_go, episode_ids)
    # step 0: all three episodes (10, 5, 7); step 1: the two that last 2+ (20, 1); step 2: one.
    np.testing.assert_allclose(got, [(10 + 5 + 7) / 3, (20 + 1) / 2, 30.0])


def test_q_calibration_rollout_records_each_state_before_its_action_and_stops_at_the_end():
    from studies.q_calibration import q_calibration

    class Counter:  # obs = [t, seed]; reward t + action; falls at t = 3 unless truncated first
        def __init__(self, limit):
            self.limit = limit

        def reset(self, seed):
            self.t, self.seed = 0, seed
            return np.array([0.0, seed]), {}

        def step(self, action):
            reward = self.t + float(action[0])
            self.t += 1
            terminated, truncated = self.t == 3, self.t == self.limit
            return np.array([self.t, self.seed], float), reward, terminated, truncated, {}

    act = lambda o: o[:, :1] * 0.5  # noqa: E731 - a deterministic policy on [1, D] observations
    obs, actions, rewards, terminated = q_calibration.rollout(Counter(limit=10), act, seed=7)
    np.testing.assert_array_equal(obs, [[0, 7], [1, 7], [2, 7]])
    np.testing.assert_array_equal(actions, [[0.0], [0.5], [1.0]])
    np.testing.assert_array_equal(rewards, [0.0, 1.5, 3.0])
    assert terminated
    *_, rewards, terminated = q_calibration.rollout(Counter(limit=2), act, seed=0)
    assert len(rewards) == 2 and not terminated  # a time limit is not a fall


def test_q_calibration_rejects_a_file_that_is_not_an_ensemble(tmp_path):
    from common.checkpoints import save_checkpoint

    agent = tmp_path / "offline.npz"
    save_checkpoint(agent, {"w": np.zeros(2)}, {"algorithm": "td3_c", "env": "hopper-medium-v2"})
    cases = ((agent, "not an exported CQL ensemble"), (tmp_path, "no config.json"),
             (tmp_path / "nope.npz", "does not exist"))  # fmt: skip
    for path, says in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "studies.q_calibration.q_calibration", str(path),
             "--out", str(tmp_path / "q")],
            cwd=REPO, capture_output=True, text=True,
        )  # fmt: skip
        (line,) = proc.stderr.strip().splitlines()  # one line, naming the problem
        assert proc.returncode == 2 and says in line and line.startswith(f"error: {path}")
        assert not (tmp_path / "q").exists()  # nothing written


def test_report_names_the_command_that_remakes_it_byte_for_byte(tmp_path, monkeypatch):
    # A committed report must say how it was made: report.md quotes the command line, and that
    # command (the note's text put back for NOTE) writes the same report.md and aggregate.csv,
    # bootstrap intervals included.
    import shlex

    jobs = _claims_suite_jobs(tmp_path, monkeypatch)
    for seed, late in ((0, 70.0), (1, 90.0)):
        run_dir = jobs[f"hopper-medium-v2/seed{seed}/td3"].run_dir
        _fake_run(run_dir, [(100, 30.0), (900, late), (1000, late + 5)], [], before=50.0)
    note = "Ran on a test machine; 'quoted' text."
    out = tmp_path / "report"
    argv = ["claims", "--budget", "smoke", "--root", str(tmp_path / "runs"), "--out", str(out)]
    assert report.main([*argv, "--note", note]) == 0
    made = {name: (out / name).read_bytes() for name in ("report.md", "aggregate.csv")}
    text = made["report.md"].decode()
    assert note in text
    command = text.split("Made by `python -m benchmarks.report ")[1].split("`")[0]
    assert command.endswith("--note NOTE")
    assert f"--root {tmp_path / 'runs'}" in command and "--seeds" not in command
    (out / "report.md").unlink()
    (out / "aggregate.csv").unlink()
    remade = [note if word == "NOTE" else word for word in shlex.split(command)]
    assert report.main(remade) == 0
    assert {name: (out / name).read_bytes() for name in made} == made


def test_archive_drops_an_offline_agent_nothing_will_load(tmp_path):
    """A finished pretraining's offline.npz is archived while a fine-tuning job (of its suite, or
    of a suite that takes its pretraining from it) is unfinished, and not once all are finished."""
    from benchmarks import archive

    suite, root = "td3c_dual", tmp_path / "a"
    jobs = sweep.expand(sweep.load_suite(suite), sweep.load_suite(suite).budget("cpu"), root)
    assert jobs[0].variant == "pretrain" and all(j.after == jobs[0].uid for j in jobs[1:])
    for job in jobs[:-1]:
        _fake_run(job.run_dir, [(500, 60.0), (1000, 70.0)], [(500, 1.0)])
    (jobs[0].run_dir / "offline.npz").write_bytes(b"agent")
    kept = tmp_path / "logs" / jobs[0].run_dir.relative_to(root) / "offline.npz"
    archive.save(suite, "cpu", root, tmp_path / "logs")
    assert kept.read_bytes() == b"agent"  # jobs[-1] will still load it
    _fake_run(jobs[-1].run_dir, [(500, 60.0), (1000, 70.0)], [(500, 1.0)])
    archive.save(suite, "cpu", root, tmp_path / "logs2")
    assert not (tmp_path / "logs2" / kept.relative_to(tmp_path / "logs")).exists()
    assert (tmp_path / "logs2" / jobs[0].run_dir.relative_to(root) / "summary.json").exists()
    # bred_fig3 fine-tunes from off2on_fig3's pretraining: its unfinished jobs keep the agent
    waiting = archive.dependent_jobs("off2on_fig3", "paper", root)
    finetuning = [j for j in waiting if j.variant != "pretrain"]
    assert finetuning and all(j.suite == "bred_fig3" for j in finetuning)
    assert all(j.after.startswith("off2on_fig3/") for j in finetuning)
