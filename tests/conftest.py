import os
import pathlib
import sys
import typing

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# Tests never touch the network (the Minari hub).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# XLA's CPU backend at optimisation level 1 (of 3), for this process and every script the tests
# start: most of a test's time is compiling small programs once, and this compiles them faster
# (tests/test_off2on_balanced.py's in-process checks: 92 s -> 79 s on one core). Level 0 is
# faster still (61 s) but computes tanh differently, enough to move an ill-conditioned atanh past
# a test's tolerance; level 1 passes every test as level 3 does. Runs compared bit for bit are
# compiled alike. Set XLA_FLAGS to test another build.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=1")


# The tiny budgets of the whole-run tests: seconds per run on the tiny dataset (every phase,
# evaluation and checkpoint fires at least once). One list per file, shared by every test.
TINY_FLAGS = {
    "td3_c": (
        "--env hopper-medium-v2 --hidden-dims 32 32 --batch-size 32 --offline-steps 400 "
        "--log-every 100 --offline-eval-every 200 --online-steps 600 --eval-every 300 "
        "--eval-episodes 1 --checkpoint-every 200 --no-generate"
    ).split(),
    "aca": (
        "--env hopper-medium-v2 --hidden-dims 32 32 --batch-size 32 --offline-steps 400 "
        "--log-every 100 --offline-eval-every 200 --online-steps 600 --eval-every 300 "
        "--eval-episodes 1 --checkpoint-every 200 --no-generate --k-decay-episodes 0.4"
    ).split(),  # k falls by 1/400 per update: to k_min within the online phase
    "off2on_balanced": (
        "--env hopper-medium-v2 --ensemble-size 2 --hidden-dims 32 32 --batch-size 32 "
        "--offline-steps 200 --log-every 100 --offline-eval-every 200 --bc-steps 100 "
        "--online-steps 400 --steps-per-epoch 100 --first-epoch-multiplier 2 --online-buffer-size "
        "1000 --eval-episodes 1 --auroc-samples 50 --dr-batch-size 32 --checkpoint-every 100 "
        "--no-generate"
    ).split(),
    "bred": (
        "--env hopper-medium-v2 --ensemble-size 2 --hidden-dims 32 32 --batch-size 32 "
        "--offline-steps 200 --log-every 100 --offline-eval-every 200 --bc-steps 100 "
        "--distill-epochs 4 --distill-steps-per-epoch 50 --distill-patience 2 --online-steps 400 "
        "--steps-per-epoch 100 --first-epoch-multiplier 2 --online-buffer-size 1000 "
        "--anneal-steps 200 --eval-episodes 1 --checkpoint-every 100 --no-generate"
    ).split(),
}


def session_folder(tmp_path_factory) -> pathlib.Path:
    """This test session's folder, the same for every pytest-xdist worker."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """The scripts the tests start as subprocesses share one JAX compilation cache for the
    session: a tiny run, its resumed half and its copy compile the same XLA programs, which is
    most of a tiny run's time (18.5 s cold, 7.4 s warm for td3_c's; the results are the same
    executables, so bit-identical). Fresh per session: nothing is reused from an earlier one."""
    cache = session_folder(tmp_path_factory) / "jax_cache"
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    import jax  # the workers' own compilations too (tests build the same updates many times)

    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield cache


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """A Minari root holding a tiny generated `hopper-medium-v2` (30-step time limit, so both
    terminations and truncations occur)."""
    from common.datasets import make_tiny_dataset

    root = tmp_path_factory.mktemp("minari")
    make_tiny_dataset(root, "hopper-medium-v2", num_steps=2000, max_episode_steps=30, seed=0)
    return root


@pytest.fixture
def minari_env(tiny_root, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tiny_root))
    return tiny_root


def run_script(script: str, args: list, run_dir, minari_root, *extra, ok: bool = True):
    """Run `algorithms/<script>` as a user would, on the tiny datasets; asserts success unless
    `ok` is False. Returns the CompletedProcess."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, f"algorithms/{script}", *args, "--run-dir", str(run_dir), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "MINARI_DATASETS_PATH": str(minari_root)},
    )
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


class TinyRun(typing.NamedTuple):
    dir: pathlib.Path
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def tiny_run(tiny_root, tmp_path_factory):
    """script -> TinyRun: the whole TINY_FLAGS run of `algorithms/<script>.py`, made once per
    test session and shared, read-only, by every test that reads it (a test that changes a run
    makes its own). The pytest-xdist workers share one copy: the first to ask makes it under a
    lock, the others wait for it."""
    import fcntl
    import json

    shared = session_folder(tmp_path_factory)
    made = {}

    def get(script: str) -> TinyRun:
        if script not in made:
            folder = shared / f"tiny_run_{script}"
            folder.mkdir(exist_ok=True)
            with open(folder / "lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                done = folder / "output.json"
                if not done.exists():
                    proc = run_script(f"{script}.py", TINY_FLAGS[script], folder / "run", tiny_root)
                    done.write_text(json.dumps([proc.stdout, proc.stderr]))
                made[script] = TinyRun(folder / "run", *json.loads(done.read_text()))
        return made[script]

    return get


def assert_same_run(a: pathlib.Path, b: pathlib.Path):
    """Two runs ended with bit-identical checkpoints and logged the same steps."""
    import json

    import numpy as np

    with np.load(a / "checkpoint.npz") as x, np.load(b / "checkpoint.npz") as y:
        assert x.files == y.files
        for k in x.files:
            if k != "__metadata__":
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)

    def steps(d):
        return [json.loads(line)["step"] for line in (d / "metrics.jsonl").read_text().splitlines()]

    assert steps(a) == steps(b)


def pytest_collection_modifyitems(config, items):
    """The tests that start training processes (they use the tiny dataset) run first, the quick
    in-process checks after them, so that the pytest-xdist workers finish together instead of one
    waiting on a long test that started last. Otherwise the files' order is kept."""
    items.sort(key=lambda item: not {"tiny_root", "tiny_run"} & set(item.fixturenames))
