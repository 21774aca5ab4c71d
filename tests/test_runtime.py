"""Evaluation, logging, checkpoints and the import contract of `common`."""

import json
import os
import pathlib
import subprocess
import sys
import types

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common.buffers import PrioritizedBuffer
from common.checkpoints import load_checkpoint, save_checkpoint
from common.evaluation import evaluate
from common.logger import (
    RUN_FLAGS,
    Logger,
    check_same_config,
    finish_run,
    make_run_dir,
    read_metrics,
)
from common.networks import DeterministicActor

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_evaluate_matches_a_manual_rollout():
    actor = DeterministicActor(action_dim=3, hidden_dims=(16,))
    params = actor.init(jax.random.PRNGKey(0), jnp.zeros((1, 11)))
    act = jax.jit(lambda obs: actor.apply(params, obs))
    result = evaluate("hopper", act, num_episodes=3, seed=10)
    for i in range(3):  # the same episodes, one env at a time, unbatched
        env = gym.make("Hopper-v5")
        obs, _ = env.reset(seed=10 + i)
        total, done, steps = 0.0, False, 0
        while not done:
            action = np.asarray(actor.apply(params, jnp.asarray(obs[None], jnp.float32)))[0]
            obs, reward, terminated, truncated, _ = env.step(action)
            total, steps, done = total + reward, steps + 1, terminated or truncated
        assert result.returns[i] == pytest.approx(total, rel=1e-4)
        assert result.lengths[i] == steps
    np.testing.assert_allclose(
        result.normalized, 100 * (result.returns + 20.272305) / (3234.3 + 20.272305)
    )
    assert evaluate("hopper", act, 3, seed=10).returns.tolist() == result.returns.tolist()


def make_state(key):
    params = {"w": jax.random.normal(key, (4, 3)), "b": jnp.zeros(3)}
    opt_state = optax.adam(1e-3).init(params)
    buffer = PrioritizedBuffer.create({"x": jnp.zeros(2)}, capacity=8)
    return {"params": params, "opt": opt_state, "buffer": buffer, "step": jnp.int32(0), "key": key}


def test_checkpoint_roundtrip_restores_everything(tmp_path):
    state = make_state(jax.random.PRNGKey(1))
    state["buffer"] = state["buffer"].add({"x": jnp.array([1.0, 2.0])}, jnp.float32(3.0))
    state["step"] = jnp.int32(17)
    save_checkpoint(tmp_path / "ckpt.npz", state, {"phase": "online", "env_steps": 1000})
    restored, meta = load_checkpoint(tmp_path / "ckpt.npz", make_state(jax.random.PRNGKey(2)))
    assert meta == {"phase": "online", "env_steps": 1000}
    flat_a = jax.tree_util.tree_leaves_with_path(state)
    flat_b = jax.tree_util.tree_leaves_with_path(restored)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, a), (_, b) in zip(flat_a, flat_b, strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype, path
        np.testing.assert_array_equal(a, b)
    # The file is a plain npz: no pickled objects inside.
    with np.load(tmp_path / "ckpt.npz", allow_pickle=False) as f:
        assert all(f[k].dtype != object for k in f.files)


def test_checkpoint_shape_mismatch_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path / "c.npz", make_state(jax.random.PRNGKey(0)))
    other = make_state(jax.random.PRNGKey(0))
    other["params"]["w"] = jnp.zeros((5, 3))
    with pytest.raises(ValueError, match=r"\['params'\]\['w'\] has shape"):
        load_checkpoint(tmp_path / "c.npz", other)


def damaged_checkpoints(tmp: pathlib.Path, good: pathlib.Path) -> dict:
    """Every kind of file that is not a whole checkpoint, made from the bytes of `good`:
    case -> (path, what the one-line error says)."""
    raw = good.read_bytes()
    cases = {
        "zip-header-only": (b"PK\x03\x04" + bytes(200), "not a whole .npz archive"),
        "truncated-2kB": (raw[:2048], "not a whole .npz archive"),
        "truncated-half": (raw[: len(raw) // 2], "not a whole .npz archive"),
        "random-bytes": (np.random.default_rng(0).bytes(4096), "is not a checkpoint"),
    }
    # one array's bytes overwritten in place: the archive opens, that entry fails its CRC check
    at = raw.index(b"\x93NUMPY", raw.index(b"['params']['w']")) + 128 + 4
    cases["corrupt-entry"] = (raw[:at] + bytes(24) + raw[at + 24 :], "is damaged: its entry")
    out = {}
    for name, (data, says) in cases.items():
        (tmp / f"{name}.npz").write_bytes(data)
        out[name] = (tmp / f"{name}.npz", says)
    np.savez(tmp / "strings.npz", __metadata__=np.asarray("[1, 2]"))
    out["metadata-not-an-object"] = (tmp / "strings.npz", "is not a JSON object")
    return out


def test_damaged_checkpoints_are_one_line_errors(tmp_path):
    from common.checkpoints import CheckpointError, read_checkpoint_metadata

    good = tmp_path / "good.npz"
    save_checkpoint(good, make_state(jax.random.PRNGKey(0)), {"phase": "offline"})
    for name, (path, says) in damaged_checkpoints(tmp_path, good).items():
        with pytest.raises(CheckpointError) as err:
            read_checkpoint_metadata(path)
            load_checkpoint(path, make_state(jax.random.PRNGKey(0)))
        assert says in str(err.value) and "\n" not in str(err.value), (name, str(err.value))


def test_checkpoint_with_the_right_keys_and_wrong_dtypes_is_a_clear_error(tmp_path):
    from common.checkpoints import CheckpointError

    state = make_state(jax.random.PRNGKey(0))
    as_ints = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(np.int32), state)
    save_checkpoint(tmp_path / "ints.npz", as_ints)
    with pytest.raises(CheckpointError, match=r"has dtype int32, expected float32"):
        load_checkpoint(tmp_path / "ints.npz", state)
    as_text = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(str), state)
    save_checkpoint(tmp_path / "text.npz", as_text)
    with pytest.raises(CheckpointError, match=r"has dtype <U\d+, expected"):
        load_checkpoint(tmp_path / "text.npz", state)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"a": jnp.ones(3)}, {"v": 1})
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"a": jnp.zeros(3)}, {"v": 2})
    assert path.read_bytes() == before  # the old checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]  # no temp file left


def test_logger_writes_config_jsonl_and_truncates_on_resume(tmp_path):
    run_dir = make_run_dir("hopper-medium-v2", "test", 0, root=tmp_path)
    assert run_dir.name.startswith("hopper-medium-v2__test__0__")
    logger = Logger(run_dir, config={"lr": 3e-4, "env": "hopper"})
    for step in (10, 20, 30):
        logger.log(step, {"loss": jnp.float32(step / 10)}, prefix="offline/")
    logger.close()
    assert json.loads((run_dir / "config.json").read_text()) == {"lr": 3e-4, "env": "hopper"}
    assert any(p.name.startswith("events.out.tfevents") for p in run_dir.iterdir())
    # A run resumed from its step-20 checkpoint forgets what it logged after step 20.
    logger = Logger(run_dir, resume_step=20)
    logger.log(30, {"loss": 9.0}, prefix="offline/")
    logger.close()
    rows = read_metrics(run_dir)
    assert [(r["step"], r["offline/loss"]) for r in rows] == [(10, 1.0), (20, 2.0), (30, 9.0)]


def test_resume_accepts_other_run_flags_and_rejects_other_settings(tmp_path):
    """--resume compares the run's config.json with the flags: the ones that only say where the
    run goes and when it checkpoints (every RunFlags field, --checkpoint-every) may change; any
    other may not."""
    import dataclasses

    from common.flags import UsageError
    from common.lifecycle import RunFlags

    assert {f.name for f in dataclasses.fields(RunFlags)} <= set(RUN_FLAGS)

    @dataclasses.dataclass
    class Args(RunFlags):
        seed: int = 0
        checkpoint_every: int = 10_000

    Logger(tmp_path, config=Args(run_dir=str(tmp_path))).close()
    check_same_config(tmp_path, Args(run_dir="elsewhere", resume=True, checkpoint_every=2_000))
    with pytest.raises(UsageError, match="was started with --seed 0, not 3"):
        check_same_config(tmp_path, Args(seed=3))


def test_finish_run_logs_the_final_evaluation_and_writes_the_summary_the_report_reads(
    tmp_path, capsys
):
    from benchmarks.report import read_run_dir
    from common.evaluation import EvalResult

    def result(*normalized):
        n = np.array(normalized)
        return EvalResult(returns=10 * n, lengths=np.full(len(n), 1000), normalized=n)

    args = types.SimpleNamespace(env="hopper-medium-v2", offline_steps=100, online_steps=50)
    logger = Logger(tmp_path, config={"offline_steps": 100, "online_steps": 50})
    logger.log(125, {"normalized_score": 30.0}, prefix="eval/")
    summary = finish_run(
        logger, tmp_path, args, result(40.0, 50.0), result(60.0, 80.0), dataset="d"
    )
    assert json.loads((tmp_path / "summary.json").read_text()) == summary == {
        "env": "hopper-medium-v2", "dataset": "d", "normalized_score_before_finetuning": 45.0,
        "normalized_score_after_finetuning": 70.0, "return_after_finetuning": 700.0,
    }  # fmt: skip
    assert "45.0 before fine-tuning, 70.0 after 50 online steps" in capsys.readouterr().out
    run = read_run_dir(tmp_path)  # the final evaluation is the curve's last point
    assert run["curve"] == [(0, 45.0), (25, 30.0), (50, 70.0)] and run["early_min"] == 30.0


def test_importing_common_has_no_side_effects(tmp_path):
    code = (
        "import common, common.networks, common.buffers, common.datasets, common.evaluation, "
        "common.logger, common.checkpoints"
    )
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "PYTHONPATH": str(REPO),
        "MINARI_DATASETS_PATH": str(tmp_path / "minari"),
    }
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no files, no run dirs, no dataset root created
