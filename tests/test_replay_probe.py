"""studies/replay_probe: the balanced-replay probe's statistics, checked against direct
NumPy computations, and the probe on a real tiny balanced run."""

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from studies.replay_probe import replay_probe
from tests.conftest import REPO
from tests.test_off2on_balanced import TINY, run


def test_auroc_equals_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    pos = rng.integers(0, 6, 40).astype(float)  # many ties, within and across the classes
    neg = rng.integers(0, 5, 55).astype(float)
    # P(pos > neg) + P(pos == neg) / 2 over every pair
    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)]
    assert replay_probe.auroc(pos, neg) == pytest.approx(np.mean(pairs), abs=1e-12)
    assert replay_probe.auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert replay_probe.auroc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5


def test_summary_shares_and_zero_counts():
    w_off, w_on = np.array([0.0, 0.0, 1.0, 3.0]), np.array([2.0, 0.0, 6.0])
    p_off, p_on = np.array([1.0, 1.0, 0.5, 0.5]), np.array([9.0, 2.0, 1.0])
    got = replay_probe.summarize(w_off, w_on, p_off, p_on)
    assert got["balanced_offline_share"] == pytest.approx(3.0 / 15.0)
    assert got["uniform_offline_share"] == pytest.approx(4 / 7)
    assert got["offline"]["w_zero_share"] == 0.5 and got["online"]["w_zero_share"] == 1 / 3
    assert got["offline"]["w_mean"] == 1.0 and got["online"]["priority_sum"] == 12.0


def test_q_against_returns_by_hand():
    # two complete episodes (a termination at t=2, a time-limit cut at t=4), then an unfinished one
    rewards = np.array([1.0, 1.0, 1.0, 2.0, 2.0, 5.0])
    ids = replay_probe.complete_episode_ids([0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0])
    assert ids.tolist() == [0, 0, 0, 1, 1, -1]
    q_now = np.array([2.0, 2.0, 2.0, 3.0, 3.0, 9.0])
    got = replay_probe.q_against_returns(q_now, q_now - 1.0, rewards, ids, gamma=0.5)
    # returns to go with gamma 0.5, cut at each episode's end: 1.75, 1.5, 1 | 3, 2
    row = got["rows"]["all"]
    assert got["episodes"] == 2 and row["n"] == 5
    assert row["mc_return"] == pytest.approx((1.75 + 1.5 + 1 + 3 + 2) / 5)
    assert row["q_now"] == pytest.approx(12 / 5)
    assert row["q_minus_mc_now"] == pytest.approx((0.25 + 0.5 + 1 + 0 + 1) / 5)
    assert row["q_minus_mc_start"] == pytest.approx(row["q_minus_mc_now"] - 1.0)
    assert got["rows"]["first 100 steps"] == row  # every episode is shorter than 100 steps
    no_start = replay_probe.q_against_returns(q_now, None, rewards, ids, gamma=0.5)
    assert "q_start" not in no_start["rows"]["all"]


def jax_leaves_equal(a, b) -> bool:
    import jax

    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    return (
        len(la) > 0
        and [p for p, _ in la] == [p for p, _ in lb]
        and all(np.array_equal(x, y) for (_, x), (_, y) in zip(la, lb, strict=True))
    )


def probe_cli(run_dir):
    return subprocess.run(
        [sys.executable, "-m", "studies.replay_probe.replay_probe", str(run_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )


def test_probe_reads_balanced_and_uniform_runs(tiny_root, tmp_path, tiny_run):
    balanced = tiny_run("off2on_balanced").dir  # a balanced run of 400 online steps, read only
    result = replay_probe.probe(balanced)
    with np.load(balanced / "checkpoint.npz") as z:
        tree = z[".buffer.tree"]
        num_leaves = tree.shape[0] // 2
    assert result["online"]["n"] == 400  # every online step, the rest is the dataset
    assert result["offline"]["n"] == 2000  # the tiny dataset's transitions (conftest)
    # the leaves it read are the tree's: their sum is the root the buffer maintained
    total = result["offline"]["priority_sum"] + result["online"]["priority_sum"]
    assert total == pytest.approx(float(tree[1]), rel=1e-4)
    assert num_leaves >= result["offline"]["n"] + 400
    assert 0.0 <= result["auroc_online_vs_offline"] <= 1.0
    # the run pretrained itself: the start critics are its offline.npz's
    rows = result["q_online"]["rows"]["all"]
    assert 0 < rows["n"] <= 400 and np.isfinite(rows["q_minus_mc_start"])
    # a run fine-tuned from another run's offline.npz, or from an exported ensemble, finds it
    own = replay_probe.start_critics(balanced, {})
    other = replay_probe.start_critics(
        tmp_path, {"offline_checkpoint": str(balanced / "offline.npz")}
    )
    assert jax_leaves_equal(own, other)
    exported = tmp_path / "export"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.export_pretrained",
            str(balanced),
            "--out",
            str(exported),
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        env={**os.environ, "MINARI_DATASETS_PATH": str(tiny_root)},  # the run's dataset
    )
    from_export = replay_probe.start_critics(
        tmp_path, {"offline_checkpoint": str(exported / "ensemble.npz")}
    )
    assert jax_leaves_equal(own, from_export)
    assert (
        replay_probe.start_critics(tmp_path, {"offline_checkpoint": str(tmp_path / "gone.npz")})
        is None
    )

    uniform = tmp_path / "uniform"
    run(uniform, tiny_root, "--online-steps", "100", "--replay", "uniform")
    result = replay_probe.probe(uniform)
    assert "offline" not in result and result["q_online"]["rows"]["all"]["n"] > 0
    proc = probe_cli(tmp_path / "missing")
    assert proc.returncode != 0
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith("no checkpoint.npz and config.json (an off2on_balanced run dir?)")
    )


def test_probe_evaluates_a_softplus_run_with_its_own_output_layer(tiny_root, tmp_path):
    """A softplus run of studies/off2on_dr_output is probed with the softplus net: the offline
    mean of w equals a NumPy forward pass of the checkpoint's density-ratio params (ReLU layers,
    softplus output), and no transition sits at w = 0."""
    run_dir = tmp_path / "softplus"
    study = "studies/off2on_dr_output/dr_output.py"  # off2on_balanced.py with --dr-output
    proc = subprocess.run(
        [sys.executable, study, *TINY, "--online-steps", "200", "--dr-output", "softplus",
         "--run-dir", str(run_dir)],
        cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "MINARI_DATASETS_PATH": str(tiny_root)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = replay_probe.probe(run_dir)
    with np.load(run_dir / "checkpoint.npz") as z:
        obs = z[replay_probe.DATA_KEY.format("observations")][:2000]
        act = z[replay_probe.DATA_KEY.format("actions")][:2000]
        layers = {k: z[k] for k in z.files if k.startswith(replay_probe.DR_PREFIX)}

    def layer(i, name):
        (key,) = [k for k in layers if f"Dense_{i}" in k and k.endswith(f"['{name}']")]
        return layers[key]

    x = np.concatenate([obs, act], -1).astype(np.float64)
    n = len({k.split("Dense_")[1].split("'")[0] for k in layers})
    for i in range(n):
        x = x @ layer(i, "kernel") + layer(i, "bias")
        x = np.maximum(x, 0.0) if i < n - 1 else np.log1p(np.exp(x))
    assert result["offline"]["w_mean"] == pytest.approx(x[:, 0].mean(), rel=1e-4)
    assert result["offline"]["w_zero_share"] == 0.0 and result["online"]["w_zero_share"] == 0.0
