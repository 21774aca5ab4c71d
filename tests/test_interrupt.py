"""Ctrl-C (SIGINT) and SIGTERM on a real training process: one line (the step reached, the last
checkpoint, the command that resumes), exit status 130 / 143, no traceback, no crash; the
command it prints resumes the run to the same parameters as an uninterrupted run."""

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, TINY_FLAGS, assert_same_run


def start(script, run_dir, minari_root):
    """The script's tiny run as a terminal starts it. A pytest-xdist worker ignores SIGINT and
    its children would inherit that, so the default handler is set around the start."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(
            [
                sys.executable,
                f"algorithms/{script}.py",
                *TINY_FLAGS[script],
                "--run-dir",
                str(run_dir),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "MINARI_DATASETS_PATH": str(minari_root)},
        )
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(
    ("script", "signum", "status"),
    [("td3_c", signal.SIGINT, 130), ("off2on_balanced", signal.SIGTERM, 143)],
)
def test_interrupt_prints_one_line_and_the_printed_command_resumes_bit_identically(
    script, signum, status, tiny_root, tmp_path, tiny_run
):
    part = tmp_path / "part"
    proc = start(script, part, tiny_root)
    deadline = time.monotonic() + 300
    while not (part / "checkpoint.npz").exists():  # the first checkpoint: offline step 100-200
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == status, err[-3000:]  # not 0 (finished first) nor -11 (crashed)
    assert "Traceback" not in err and "Segmentation" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    assert line.startswith(f"interrupted ({name}) at "), line
    assert f"last checkpoint {part / 'checkpoint.npz'} (" in line, line
    command = shlex.split(line.split("; resume with: ", 1)[1])
    assert command[:2] == ["python", f"algorithms/{script}.py"]
    assert command[-3:] == ["--resume", "--run-dir", str(part)]
    resumed = subprocess.run(
        [sys.executable, *command[1:]],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "MINARI_DATASETS_PATH": str(tiny_root)},
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tiny_run(script).dir, part)  # bit-identical to the uninterrupted run


def test_each_cli_call_starts_clean_and_gives_the_sigterm_handler_back(tmp_path):
    """Two scripts run in one process (as tests and notebooks do): the second's interruption
    line knows nothing of the first's run, and the caller's SIGTERM handler is back after each."""
    import dataclasses

    from common import lifecycle

    @dataclasses.dataclass
    class Args:
        steps: int = 1

    def first(args):
        lifecycle.note_run(tmp_path / "run")
        lifecycle.note_checkpoint(tmp_path / "run" / "checkpoint.npz", "step 1")
        return 0

    seen = {}

    def second(args):
        seen["line"] = lifecycle.interruption_line("SIGTERM", [])
        seen["handler"] = signal.getsignal(signal.SIGTERM)
        return 0

    def mine(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        assert lifecycle.cli(first, Args, []) == 0
        assert signal.getsignal(signal.SIGTERM) is mine
        assert lifecycle.cli(second, Args, []) == 0
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)
    assert seen["handler"] is not mine  # the script's own handler while it runs
    assert seen["line"] == "interrupted (SIGTERM) before the run started; nothing was written"
