"""`make demo` (benchmarks/demo.py): its claim checks on hand-made curves, its progress and
failure handling, and one whole demo at a tiny budget whose table is re-derived from the runs'
own metrics."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import demo

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_of(curve, online_steps=1000):
    """A run as report.read_run_dir gives it, from its curve [(online step, score), ...]."""
    online = [v for s, v in curve if s > 0]
    early = [v for s, v in curve if 0 < s <= 0.1 * online_steps]
    late = [v for s, v in curve if s >= 0.9 * online_steps]
    return {"pretrained": curve[0][1], "curve": curve, "online_steps": online_steps,
            "early_min": min(early or online[:1]), "late_mean": sum(late) / len(late),
            "mean_online": sum(online) / len(online)}  # fmt: skip


TD3C = demo.PANELS[0]


def test_a_live_run_is_judged_on_its_whole_window():
    """A drop after the first 10% of a short live run is still a collapse: the demo's window lies
    inside the reports' early window, so its lowest score is the lowest early score."""
    late_drop = [(0, 80.0), (100, 79.0), (200, 75.0), (500, 30.0), (1000, 70.0)]  # 30 < 0.5 * 80
    holding = [(0, 80.0), (100, 60.0), (200, 41.0), (500, 55.0), (1000, 70.0)]  # 41 >= 40
    assert run_of(late_drop)["early_min"] == 79.0  # the report's first 10% misses the drop
    said, shown = demo.shows(TD3C, {"TD3": [run_of(late_drop)], "TD3-C": [run_of(holding)]}, True)
    assert shown and said == "TD3 collapses (80.0 ↓ 30.0); TD3-C does not collapse (80.0 ↓ 41.0)"
    # swapped, neither check holds and the row says so
    said, shown = demo.shows(TD3C, {"TD3": [run_of(holding)], "TD3-C": [run_of(late_drop)]}, True)
    assert not shown
    assert said == "not: TD3 collapses (80.0 ↓ 41.0); not: TD3-C does not collapse (80.0 ↓ 30.0)"


def test_committed_seeds_must_all_show_a_comparison():
    bred = demo.PANELS[2]
    up = [(0, 40.0), (500, 60.0), (1000, 90.0)]  # mean online 75, late 90
    flat = [(0, 40.0), (500, 50.0), (1000, 95.0)]  # mean online 72.5, late 95
    runs = {"BRED": [run_of(up), run_of(up)], "uniform replay": [run_of(flat), run_of(up[:2] +
            [(1000, 80.0)])]}  # fmt: skip
    said, shown = demo.shows(bred, runs, False)
    # seed 0: faster (75 > 72.5) but ends below (90 < 95); seed 1: 75 > 70 and 90 > 80
    assert not shown
    assert said == (
        "BRED learns faster than uniform replay on 2/2 seeds (75.0 vs 72.5, 75.0 vs 70.0); "
        "BRED ends above uniform replay on 1/2 seeds (90.0 vs 95.0, 90.0 vs 80.0)"
    )


def test_the_report_column_counts_the_committed_claims():
    """TD3-C's row against benchmarks/results/td3c_table1/paper/claims.csv, counted here
    independently."""
    import csv

    rows = list(csv.DictReader(open(REPO / "benchmarks/results/td3c_table1/paper/claims.csv")))
    mine = [r for r in rows if r["claim"] == "TD3 collapses early" and r["shows"]]
    walker = [r for r in mine if r["dataset"] == "walker2d-medium-v2"]
    expect = (f"TD3 collapses early: {sum(r['shows'] == 'True' for r in walker)}/{len(walker)} "
              f"seeds ({sum(r['shows'] == 'True' for r in mine)}/{len(mine)} in all)")  # fmt: skip
    assert expect in demo.report_summary(TD3C)


def test_progress_is_read_from_tqdm_and_from_the_run_logs(tmp_path):
    text = "gen:  10%|#  | 100000/1000000 [00:10<01:30]\rgen:  25%|## | 250000/1000000 [00:25<"
    assert demo.tqdm_fraction(text) == 0.25 and demo.tqdm_fraction("starting") == 0.0
    (tmp_path / "config.json").write_text(json.dumps({"offline_steps": 500_000}))
    (tmp_path / "metrics.jsonl").write_text('{"step": 500400, "x": 1}\n{"step": 501000, "y": 2}\n')
    assert demo.run_fraction(tmp_path, 4000) == 0.25
    assert demo.run_fraction(tmp_path / "missing", 4000) == 0.0


def test_a_failed_run_stops_the_others_and_names_its_log(tmp_path):
    class Bar:
        n = 0

        def refresh(self):
            pass

    slow = demo.Job("slow", [sys.executable, "-c", "import time; time.sleep(60)"], 1.0,
                    tmp_path / "slow.log", lambda: 0.0)  # fmt: skip
    bad = demo.Job("bad", [sys.executable, "-c", "raise SystemExit('broken')"], 1.0,
                   tmp_path / "bad.log", lambda: 0.0)  # fmt: skip
    with pytest.raises(RuntimeError, match=f"bad failed; its log is {tmp_path / 'bad.log'}"):
        demo.run_jobs([slow, bad], 2, Bar())
    assert "broken" in (tmp_path / "bad.log").read_text()
    assert slow.process.wait(timeout=10) != 0  # terminated, not left running


def test_the_whole_demo_at_a_tiny_budget(tmp_path):
    """Two live panels from the committed walker2d agents (on a tiny walker2d dataset here), two
    from the committed runs: exit 0, a figure, and a table whose live numbers are the runs' own
    evaluations, read back from their metrics."""
    from common.datasets import make_tiny_dataset

    minari = tmp_path / "minari"
    make_tiny_dataset(minari, "walker2d-medium-v2", num_steps=600, max_episode_steps=50, seed=0)
    root = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.demo", "--online-steps", "200", "--eval-every", "100",
         "--eval-episodes", "1", "--workers", "2", "--root", str(root)],
        cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "MINARI_DATASETS_PATH": str(minari)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (root / "demo.png").read_bytes()[:4] == b"\x89PNG"
    table = (root / "demo.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == 5  # header, 4 methods
    for script, arm in (("td3_c", "td3"), ("td3_c", "td3c"), ("aca", "sac"), ("aca", "aca")):
        run = root / f"{script}_{arm}"
        offline = json.loads((run / "config.json").read_text())["offline_steps"]
        rows = [json.loads(x) for x in (run / "metrics.jsonl").open()]
        # the final evaluation is logged at the last step too, after that step's own
        scores = {r["step"]: r["eval/normalized_score"] for r in rows
                  if "eval/normalized_score" in r and r["step"] > offline}  # fmt: skip
        summary = json.loads((run / "summary.json").read_text())
        start = summary["normalized_score_before_finetuning"]
        assert len(scores) == 2  # at 100 and 200 online steps
        assert f"({start:.1f} ↓ {min(scores.values()):.1f})" in table, (arm, table)
    assert "(committed runs, not re-run)" in table
    assert "Balanced replay beats online samples only: 0/3 seeds" in table
