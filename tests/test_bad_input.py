"""Bad input never gets a traceback, a hang or a half-made run (issue #18).

The cases are generated from each script's `Args` (every numeric flag's declared Range, every
path flag's kind) and from the benchmark CLIs' argparse actions, so a new flag is covered by
declaring it. Each case runs the script's command line in-process (`lifecycle.cli(main, Args,
argv)`, a few ms before any compilation) and asserts: a non-zero exit whose message is one line
naming the flag, no traceback, at most a few lines on stderr, and no new file anywhere under the
working directory or the run directory.
A few cases run as real processes to check the exit status and stderr a user sees."""

import dataclasses
import importlib
import json
import os
import pathlib
import subprocess
import sys
import time
import typing

import h5py
import numpy as np
import pytest
from conftest import REPO

from common import lifecycle
from common.checkpoints import save_checkpoint
from common.flags import (
    PathFlag,
    Range,
    flag,
    flag_ranges,
    numeric_fields,
)

SCRIPTS = ["off2on_balanced", "bred", "td3_c", "aca", "sac"]
# The flags that make the data-dependent cases (a checkpoint checked against the networks)
# quick: tiny networks, a two-member ensemble.
SMALL = {
    "off2on_balanced": ["--ensemble-size", "2", "--hidden-dims", "8", "8"],
    "bred": ["--ensemble-size", "2", "--hidden-dims", "8", "8"],
    "td3_c": ["--hidden-dims", "8", "8"],
    "aca": ["--hidden-dims", "8", "8"],
    "sac": ["--hidden-dims", "8", "8"],
}
BASE = {s: ["--env", "hopper-medium-v2", "--no-generate"] for s in SCRIPTS} | {
    "sac": ["--env", "hopper"]
}


def module(script: str):
    return importlib.import_module(f"algorithms.{script}")


def files_under(path: pathlib.Path) -> set:
    return {p.relative_to(path) for p in path.rglob("*")}


def hint_of(cls, name):
    return typing.get_type_hints(cls, include_extras=True)[name]


def scalar_kind(hint) -> tuple[type, bool]:
    """(int or float, whether the flag is a tuple of them) of a numeric flag's type."""
    if typing.get_origin(hint) is typing.Annotated:
        return scalar_kind(typing.get_args(hint)[0])
    args = [a for a in typing.get_args(hint) if a is not type(None) and a is not Ellipsis]
    if typing.get_origin(hint) is tuple:
        return scalar_kind(args[0])[0], True
    if args:  # a union with None
        return scalar_kind(args[0])
    return hint, False


def out_of_range(allowed: Range, kind: type) -> list[str]:
    """Values just outside `allowed` (and NaN, inf for floats), written from the Range alone."""
    bad = []
    if allowed.low is not None:
        bad.append(allowed.low - 1)
        if allowed.low_open:
            bad.append(allowed.low)
    if allowed.high is not None:
        bad.append(allowed.high + 1)
        if allowed.high_open:
            bad.append(allowed.high)
    values = [str(kind(v)) for v in bad]
    if kind is float:
        values += ["nan", "inf"]
    return values


def numeric_cases():
    for script in SCRIPTS:
        args_cls = module(script).Args
        ranges = flag_ranges(args_cls)
        for name, allowed in ranges.items():
            kind, is_tuple = scalar_kind(hint_of(args_cls, name))
            for value in out_of_range(allowed, kind):
                values = ["8", value] if is_tuple else [value]  # one bad element of a tuple
                yield pytest.param(script, name, values, id=f"{script}-{name}={value}")
            if is_tuple and allowed.nonempty:
                yield pytest.param(script, name, [], id=f"{script}-{name}=()")


def expect_usage_error(script, argv, cwd: pathlib.Path, watched=()) -> str:
    """Run `script`'s cli in-process in `cwd`; assert everything a bad input must give, return
    the error line."""
    watched = [cwd, *watched]
    before = {p: files_under(p) for p in watched}
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        lifecycle.cli(module(script).main, module(script).Args, [*BASE[script], *argv])
    elapsed = time.perf_counter() - start
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("error: "), message
    assert "\n" not in message and "Traceback" not in message
    assert elapsed < 60, f"{elapsed:.0f} s before the error"  # a hang guard, not a speed target
    for path in watched:
        assert files_under(path) == before[path], f"{script} {argv} wrote files under {path}"
    return message


@pytest.fixture
def workdir(tmp_path, monkeypatch, minari_env):
    """An empty working directory (default run directories would appear under it)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_declares_a_range_and_every_path_flag_a_kind(script):
    args_cls = module(script).Args
    ranges = flag_ranges(args_cls)
    assert set(numeric_fields(args_cls)) == set(ranges)
    for name in ranges:  # each range excludes something, so each flag gets cases below
        kind, _ = scalar_kind(hint_of(args_cls, name))
        assert out_of_range(ranges[name], kind), name
    strings = {f.name for f in dataclasses.fields(args_cls) if is_string(hint_of(args_cls, f.name))}
    paths = {n for n in strings if path_kind(args_cls, n)}
    assert strings - paths == {"env"}, "a string flag that is neither --env nor a path"


def is_string(hint) -> bool:
    if typing.get_origin(hint) is typing.Annotated:
        return is_string(typing.get_args(hint)[0])
    return hint is str or str in typing.get_args(hint)


def path_kind(args_cls, name) -> str | None:
    hint = hint_of(args_cls, name)
    if typing.get_origin(hint) is typing.Annotated:
        marks = [m for m in hint.__metadata__ if isinstance(m, PathFlag)]
        return marks[0].kind if marks else None
    return None


@pytest.mark.parametrize(("script", "name", "values"), list(numeric_cases()))
def test_out_of_range_numeric_flag(script, name, values, workdir, capsys):
    message = expect_usage_error(script, [flag(name), *values], workdir)
    assert message.startswith(f"error: {flag(name)}"), message
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, err


def bad_checkpoints(tmp: pathlib.Path) -> list[tuple[str, pathlib.Path, str]]:
    """(case, path, what the error must say) for every way --offline-checkpoint can be wrong."""
    tmp.mkdir(exist_ok=True)
    (tmp / "notes.txt").write_text("not a checkpoint\n")
    np.savez(tmp / "plain.npz", w=np.zeros(3))
    save_checkpoint(tmp / "other_algo.npz", {"w": np.zeros(3)}, {"algorithm": "dqn"})
    save_checkpoint(
        tmp / "other_env.npz", {"w": np.zeros(3)},
        {"env": "walker2d-medium-v2", "obs_dim": 17, "action_dim": 6},
    )  # fmt: skip
    save_checkpoint(tmp / "other_setup.npz", {"w": np.zeros(3)}, {})
    return [
        ("missing", tmp / "missing.npz", "no such file"),
        ("directory", tmp, "is a directory"),
        ("text", tmp / "notes.txt", "is not a checkpoint"),
        ("no-metadata", tmp / "plain.npz", "is not a checkpoint"),
        ("other-algorithm", tmp / "other_algo.npz", "saved by dqn"),
        ("other-env", tmp / "other_env.npz", "saved for walker2d-medium-v2 (observation 17"),
        ("other-setup", tmp / "other_setup.npz", "saved from another setup"),
    ]


def checkpoint_flags(script: str) -> list[str]:
    args_cls = module(script).Args
    return [
        f.name for f in dataclasses.fields(args_cls) if path_kind(args_cls, f.name) == "checkpoint"
    ]


@pytest.mark.parametrize("script", [s for s in SCRIPTS if checkpoint_flags(s)])
def test_bad_checkpoint_paths(script, workdir, tmp_path):
    for name in checkpoint_flags(script):
        for case, path, says in bad_checkpoints(tmp_path / "files"):
            message = expect_usage_error(
                script, [*SMALL[script], flag(name), str(path)], workdir, [tmp_path / "files"]
            )
            assert message.startswith(f"error: {flag(name)} {path}"), (case, message)
            assert says in message, (case, message)


O2O_SCRIPTS = [s for s in SCRIPTS if s != "sac"]


@pytest.mark.parametrize("script", O2O_SCRIPTS)
def test_damaged_and_mistyped_offline_checkpoints(script, workdir, tmp_path, tiny_run):
    """From the script's own offline.npz (its shared tiny run): the first 2 kB of it, a file
    that only starts like a zip archive, and the same keys with int32 where float32 belongs."""
    real = tiny_run(script).dir / "offline.npz"
    files = tmp_path / "files"
    files.mkdir()
    (files / "truncated.npz").write_bytes(real.read_bytes()[:2048])
    (files / "zip_like.npz").write_bytes(b"PK\x03\x04" + bytes(2048))
    with np.load(real) as stored:
        arrays = {k: stored[k] for k in stored.files}
    arrays = {k: v.astype(np.int32) if v.dtype.kind == "f" else v for k, v in arrays.items()}
    np.savez(files / "int_params.npz", **arrays)
    cases = [
        ("truncated.npz", "not a whole .npz archive"),
        ("zip_like.npz", "not a whole .npz archive"),
        ("int_params.npz", "has dtype int32, expected float32"),
    ]
    tiny_widths = ["--hidden-dims", "32", "32"]  # the tiny run's networks: the shapes fit
    for name, says in cases:
        path = files / name
        argv = [*SMALL[script], *tiny_widths, "--offline-checkpoint", str(path)]
        message = expect_usage_error(script, argv, workdir, [files])
        assert message.startswith(f"error: --offline-checkpoint {path}"), (name, message)
        assert says in message, (name, message)


@pytest.mark.parametrize("script", O2O_SCRIPTS)
def test_a_batch_larger_than_the_dataset_or_the_memory(script, workdir, monkeypatch):
    message = expect_usage_error(script, [*SMALL[script], "--batch-size", "10000000"], workdir)
    assert message == (
        "error: --batch-size 10000000 is larger than the dataset (2000 transitions): "
        "pass at most 2000"
    )
    monkeypatch.setattr(lifecycle, "device_memory_bytes", lambda: 2**20)  # a 1 MiB machine
    message = expect_usage_error(script, [*SMALL[script], "--batch-size", "2000"], workdir)
    assert message.startswith("error: --batch-size 2000 needs about "), message
    assert message.endswith("this machine has: pass a smaller --batch-size"), message


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_run_directories(script, workdir, tmp_path):
    """--resume without a run, a run directory that is a file or cannot be created, one that
    holds another run, and --resume with other flags than the run was started with."""
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "a_file").write_text("x")
    held = runs / "held"
    held.mkdir()
    save_checkpoint(held / "checkpoint.npz", {"w": np.zeros(1)}, {"phase": "offline"})
    other = runs / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"seed": 7}))
    cases = [
        (["--resume"], "--resume needs --run-dir"),
        (["--resume", "--run-dir", str(runs / "missing")], "does not exist; drop --resume"),
        (["--run-dir", str(runs / "a_file")], "is a file"),
        (["--run-dir", str(runs / "a_file" / "run")], "cannot be created"),
        (["--run-dir", str(held)], "already holds a run; add --resume"),
        (["--resume", "--run-dir", str(other)], "was started with --seed 7, not 0"),
    ]
    for argv, says in cases:
        message = expect_usage_error(script, [*SMALL[script], *argv], workdir, [runs])
        assert says in message, (argv, message)


@pytest.mark.parametrize("script", O2O_SCRIPTS)
def test_unknown_and_damaged_datasets(script, workdir, tmp_path, minari_env, monkeypatch):
    message = expect_usage_error(script, ["--env", "hopper-medum-v2"], workdir)
    assert "unknown dataset 'hopper-medum-v2'; known names: hopper-random-v2" in message
    damaged = tmp_path / "damaged"
    import shutil

    shutil.copytree(minari_env, damaged)
    with h5py.File(damaged / "o2o/hopper/medium-v0/data/main_data.hdf5", "a") as f:
        f["episode_1/rewards"][2] = np.nan
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(damaged))
    message = expect_usage_error(script, SMALL[script], workdir)
    assert "is damaged: 1 transitions with non-finite rewards" in message, message
    assert "python -m common.dataset_cli verify hopper-medium-v2" in message
    h5 = damaged / "o2o/hopper/medium-v0/data/main_data.hdf5"
    with h5py.File(h5, "a") as f:  # NaN repaired, one episode's observations one column short
        f["episode_1/rewards"][2] = 0.0
        short = f["episode_1/observations"][:, :-1]
        del f["episode_1/observations"]
        f["episode_1/observations"] = short
    message = expect_usage_error(script, SMALL[script], workdir)
    assert "o2o/hopper/medium-v0" in message and "verify hopper-medium-v2" in message, message
    raw = bytearray(h5.read_bytes())
    raw[: len(raw) // 2] = bytes(len(raw) // 2)  # wipe the header and half the file
    h5.write_bytes(bytes(raw))
    message = expect_usage_error(script, SMALL[script], workdir)
    assert "o2o/hopper/medium-v0 cannot be read" in message, message


def test_sac_unknown_env(workdir):
    message = expect_usage_error("sac", ["--env", "hoper"], workdir)
    assert "unknown env 'hoper'; known: hopper" in message


@pytest.mark.parametrize("script", ["td3_c", "off2on_balanced"])
def test_a_user_sees_one_line_and_exit_status_1(script, tmp_path, minari_env):
    proc = subprocess.run(
        [sys.executable, f"algorithms/{script}.py", "--batch-size", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "MINARI_DATASETS_PATH": str(minari_env)},
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: --batch-size 0: must be >= 1 (a count, size or interval)"
    ]


def test_warns_once_about_an_interval_longer_than_the_run(workdir, capsys):
    expect_usage_error(
        "td3_c", ["--eval-every", "5000", "--online-steps", "1000", "--batch-size", "0"], workdir
    )  # the range error stops it first: no warning for a run that does not start
    assert "warning" not in capsys.readouterr().err
    from common.flags import warn_if_longer

    @dataclasses.dataclass
    class Run:
        eval_every: int = 5000
        online_steps: int = 1000

    warn_if_longer(Run(), "eval_every", "online_steps")
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "warning: --eval-every 5000 exceeds --online-steps 1000: it never fires within the run"
    ]


# --- the benchmark and dataset CLIs (argparse) -------------------------------------------


def cli_modules() -> dict:
    from benchmarks import demo, report, run

    return {"run": run, "report": report, "demo": demo}


def cli_base(cli: str, root) -> list[str]:
    if cli == "demo":
        return ["--root", str(root / "demo")]
    return ["td3c_dual", "--budget", "smoke", "--root", str(root)]


def cli_numeric_cases():
    for name, mod in cli_modules().items():
        for action in mod.make_parser()._actions:
            allowed = getattr(action.type, "range", None)
            assert action.type not in (int, float), f"{name} {action.option_strings}: no Range"
            if allowed is not None:
                option = action.option_strings[0]
                for value in out_of_range(allowed, action.type.kind):
                    yield pytest.param(name, option, value, id=f"{name}{option}={value}")


@pytest.mark.parametrize(("cli", "option", "value"), list(cli_numeric_cases()))
def test_benchmark_cli_out_of_range(cli, option, value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli_modules()[cli].main([*cli_base(cli, tmp_path), option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: argument {option}: {value}"), err
    assert not list(tmp_path.iterdir())


def test_benchmark_cli_bad_paths_and_names(tmp_path, monkeypatch, capsys):
    from benchmarks import report, run
    from common import dataset_cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("x")
    suite = ["td3c_dual", "--budget", "smoke"]
    cases = [
        (run.main, [*suite, "--root", "a_file/runs"], "--root a_file/runs: cannot be created"),
        (report.main, [*suite, "--root", "missing"], "--root missing: no such directory"),
        (report.main, [*suite, "--root", ".", "--out", "a_file"], "--out a_file: is a file"),
        (run.main, ["nope", "--budget", "smoke", "--root", "."], "unknown suite 'nope'"),
        (
            dataset_cli.main,
            ["info", "hopper-medum-v2", "--no-download", "--no-generate"],
            "unknown dataset",
        ),
        (dataset_cli.main, ["verify", "hopper-medum-v2"], "unknown dataset"),
    ]
    for main, argv, says in cases:
        try:
            code = main(argv)
        except SystemExit as exit_info:
            code = exit_info.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and says in err[0], (argv, code, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
