import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np

from algorithms import sac

REPO = pathlib.Path(__file__).resolve().parents[1]

TINY = [
    "--env",
    "hopper",
    "--total-steps",
    "800",
    "--learning-starts",
    "200",
    "--batch-size",
    "32",
    "--buffer-size",
    "1000",
    "--hidden-dims",
    "32",
    "32",
    "--eval-every",
    "400",
    "--eval-episodes",
    "2",
    "--log-every",
    "100",
    "--checkpoint-every",
    "400",
    "--snapshot-every",
    "400",
]


def run_sac(run_dir, *extra):
    proc = subprocess.run(
        [sys.executable, "algorithms/sac.py", *TINY, "--run-dir", str(run_dir), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_soft_q_target_by_hand():
    y = sac.soft_q_target(
        rewards=np.array([1.0, 2.0, 0.5]),
        terminals=np.array([0.0, 1.0, 0.0]),
        next_q=np.array([10.0, 10.0, -4.0]),
        next_log_probs=np.array([-1.0, -1.0, 2.0]),
        alpha=0.2,
        gamma=0.9,
    )
    # 1 + 0.9 (10 + 0.2); terminal: just r; 0.5 + 0.9 (-4 - 0.4)
    np.testing.assert_allclose(y, [1 + 0.9 * 10.2, 2.0, 0.5 + 0.9 * -4.4])


def test_tiny_run_end_to_end_and_resume_is_exact(tmp_path):
    full = tmp_path / "full"
    proc = run_sac(full)
    assert "final return" in proc.stdout
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert any("sac/critic_loss" in r for r in rows) and any("eval/return" in r for r in rows)
    assert all(np.isfinite(r.get("sac/q_mean", 0.0)) for r in rows)
    assert {p.name for p in (full / "actors").iterdir()} == {
        "step_400.npz",
        "step_800.npz",
        "final.npz",
    }
    # Stop at 400 steps, then resume to 800: bit-identical parameters and buffer.
    part = tmp_path / "part"
    run_sac(part, "--total-steps", "400")
    run_sac(part, "--resume")
    args = sac.Args(hidden_dims=(32, 32), buffer_size=1000)
    template = sac.create_state(args, 11, 3, jax.random.PRNGKey(0))
    a, _ = sac.load_checkpoint(full / "checkpoint.npz", template)
    b, _ = sac.load_checkpoint(part / "checkpoint.npz", template)
    assert int(a.step) == int(b.step) == 800
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    # The resumed run's log reads like the uninterrupted one.
    steps_full = [
        r["step"] for r in map(json.loads, (full / "metrics.jsonl").read_text().splitlines())
    ]
    steps_part = [
        r["step"] for r in map(json.loads, (part / "metrics.jsonl").read_text().splitlines())
    ]
    assert steps_full == steps_part


def test_bad_env_is_a_one_line_error():
    proc = subprocess.run(
        [sys.executable, "algorithms/sac.py", "--env", "humanoid"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "error: unknown env 'humanoid'; known: hopper, halfcheetah, walker2d, ant"
    ]
