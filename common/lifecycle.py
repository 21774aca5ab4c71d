"""The run lifecycle the four offline-to-online files share, one small helper per step. The files
keep their update functions and the order of their phases in view; these helpers only do the
bookkeeping around them:

    check_args(args)                            # every flag, path and --resume, before anything
    run = open_run(args, "td3_c")               # run directory, resumed progress, logger
    if run.offline_done: ...load run.offline_path...   else: ...offline phase...
    state = run.train_offline(args, state, chunk_fn, eval_fn, start)  # its loop, logs, checkpoints
    run.log_eval(step, evaluate(...), bar)      # eval/* logged, the score on the progress bar
    run.save(state, progress, step, args.stop_after, "offline step")  # checkpoint, --stop-after
    run.finish(args, before, after, ...)        # final eval, summary.json, logger closed

`cli(main, Args)` runs a file's command line: bad input ends in one line, and Ctrl-C or SIGTERM in
one line naming the step reached, the last checkpoint and the command that resumes (exit 130 /
143, no traceback).

A run's progress (the metadata of its checkpoint) is {"phase": "offline", "offline_step": k} or
{"phase": "online", "env_steps": k, ...}; one global step counts across both phases."""

import dataclasses
import os
import pathlib
import shlex
import signal
import sys
import threading

import jax
import jax.numpy as jnp
import tyro
from tqdm import tqdm

from common import flags
from common.checkpoints import read_checkpoint_metadata, resolve_pretrained, save_checkpoint
from common.flags import RunDir, Steps, UsageError, check_run_dir
from common.logger import Logger, check_same_config, finish_run, make_run_dir


@dataclasses.dataclass
class RunFlags:
    """The flags that say where a run goes and how it resumes, the same in every file."""

    run_dir: RunDir = None
    """run directory (default runs/<env>__<algorithm>__<seed>__<time>)"""
    resume: bool = False
    """continue the run in --run-dir from its checkpoint"""
    no_generate: bool = False
    """fail instead of generating a missing dataset"""
    stop_after: Steps | None = None
    """exit (as if interrupted) after the checkpoint at this global step; for testing --resume"""


def check_args(
    args,
    online_unit: str = "log_every",
    online_eval: str | None = "eval_every",
    offline_intervals: tuple[str, ...] = (),
) -> None:
    """The checks of an offline-to-online file, before anything is created or compiled (one-line
    UsageError): every numeric flag in its declared range; the offline phase's lengths multiples
    of `log_every` and the online phase's of `online_unit` (phases run in compiled chunks); the
    run directory flags; --offline-checkpoint a readable file. Warns once about an evaluation
    interval (or one of `offline_intervals`) longer than its phase."""
    flags.check_ranges(args)
    for name in ("offline_steps", "offline_eval_every"):
        flags.check_multiple(args, name, "log_every")
    flags.check_multiple(args, "online_steps", online_unit)
    if online_eval:
        flags.check_multiple(args, online_eval, online_unit)
    # a committed agent's name (pretrained/README.md) stands for its file from here on, in the
    # run's config.json too (so --resume compares files, named or not)
    args.offline_checkpoint = resolve_pretrained(args.offline_checkpoint, args.env)
    check_run_flags(args)
    if args.offline_checkpoint:
        flags.check_file(args.offline_checkpoint, "offline_checkpoint")
    elif args.offline_steps:
        for interval in ("offline_eval_every", *offline_intervals):
            flags.warn_if_longer(args, interval, "offline_steps")
    if online_eval:
        flags.warn_if_longer(args, online_eval, "online_steps")


def device_memory_bytes() -> int:
    """Memory one update can use: the accelerator's (JAX's limit) or, on a CPU, the machine's."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.0f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.0f} MiB"


def check_batch_fits(args, num_transitions: int, networks: int, inputs: int) -> None:
    """--batch-size against the dataset and the memory: a batch larger than the dataset, or one
    whose update would need more memory than there is, is one UsageError line before anything is
    created or compiled. The update's memory is estimated from its activations: `networks`
    forward passes per sample (critics x ensemble members x action sets), each keeping its input
    (`inputs` floats) and hidden layers for the backward pass, and their gradients (x 3)."""
    batch = args.batch_size
    if batch > num_transitions:
        raise UsageError(
            f"--batch-size {batch} is larger than the dataset ({num_transitions} transitions): "
            f"pass at most {num_transitions}"
        )
    need = 3 * 4 * batch * networks * (inputs + sum(args.hidden_dims))
    have = device_memory_bytes()
    if need > have:
        raise UsageError(
            f"--batch-size {batch} needs about {_size(need)} per update, more than the "
            f"{_size(have)} this machine has: pass a smaller --batch-size"
        )


def check_run_flags(args: RunFlags) -> None:
    """--resume names an existing run started with the same flags; a new run's directory can be
    created and holds no other run (UsageError otherwise)."""
    check_run_dir(args.run_dir, args.resume)
    if args.resume:
        check_same_config(args.run_dir, args)


@dataclasses.dataclass
class Run:
    dir: pathlib.Path
    logger: Logger
    progress: dict  # the resumed checkpoint's metadata, or the start of the offline phase
    resumed: bool

    @property
    def checkpoint_path(self) -> pathlib.Path:
        return self.dir / "checkpoint.npz"

    @property
    def offline_path(self) -> pathlib.Path:
        """The pretrained agent, written once at the end of the offline phase."""
        return self.dir / "offline.npz"

    @property
    def offline_done(self) -> bool:
        """A resumed run past its offline phase: load `offline_path` instead of pretraining."""
        return self.resumed and self.progress["phase"] == "online"

    def log_eval(self, step: int, result, bar=None):
        """Log an evaluation (an EvalResult) as eval/* at `step`; show its score on `bar`."""
        self.logger.log(step, result.metrics(), prefix="eval/")
        if bar is not None:
            bar.set_postfix(score=f"{result.mean_normalized:.1f}")
        return result

    def save(self, state, progress: dict, step: int, stop_after, label: str = "global step"):
        """Checkpoint `state` with `progress` (atomically); exit as if interrupted when
        --stop-after names this step."""
        save_checkpoint(self.checkpoint_path, state, progress)
        note_checkpoint(self.checkpoint_path, f"{label} {step}")
        if stop_after == step:
            raise SystemExit(f"stopped after {label} {step} (--stop-after)")

    def train_offline(self, args, state, chunk_fn, eval_fn, start: int, chunk: int | None = None,
                      checkpoint_of=None, desc: str = "offline"):  # fmt: skip
        """The offline phase's loop: steps [start, args.offline_steps) in compiled chunks of
        `chunk` steps (default `log_every`; a divisor of it), `chunk_fn(state, step) -> (state,
        metrics)` running the chunk that starts at `step` and returning its means. Logs the mean
        of every `log_every` steps as offline/*, evaluates `eval_fn(state, step)` (an EvalResult)
        every `offline_eval_every` steps and checkpoints `checkpoint_of(state)` (default the
        state) every `checkpoint_every` steps with progress {"phase": "offline", "offline_step"}
        (--stop-after honoured); the bar counts steps, so its ETA holds from the first chunk.
        Returns the state."""
        chunk = chunk or args.log_every
        checkpoint_of = checkpoint_of or (lambda s: s)
        bar = progress_bar(None, total=args.offline_steps, initial=start, desc=desc, unit="step")
        window = []
        for step in range(start, args.offline_steps, chunk):
            state, metrics = chunk_fn(state, step)
            jax.block_until_ready(metrics)  # count steps done, not dispatched (JAX runs ahead)
            step += chunk
            bar.update(chunk)
            window.append(metrics)
            if step % args.log_every and step != args.offline_steps:
                continue
            window_mean = {k: v.mean() for k, v in stack_metrics(window).items()}
            self.logger.log(step, window_mean, prefix="offline/")
            window = []
            if step % args.offline_eval_every == 0 or step == args.offline_steps:
                self.log_eval(step, eval_fn(state, step), bar)
            if step % args.checkpoint_every == 0 or step == args.offline_steps:
                progress = {"phase": "offline", "offline_step": step}
                self.save(checkpoint_of(state), progress, step, args.stop_after, "offline step")
        bar.close()
        return state

    def finish(self, args, before, after, **fields) -> dict:
        """The final evaluation logged, summary.json written, the logger closed."""
        return finish_run(self.logger, self.dir, args, before, after, **fields)


def open_run(args, algorithm: str) -> Run:
    """The run directory (--run-dir, or a new runs/<env>__<algorithm>__<seed>__<time>), the
    progress of a resumed run (its checkpoint's metadata) and a Logger that drops whatever was
    logged after that checkpoint. Call it after every input has been checked."""
    run_dir = (
        pathlib.Path(args.run_dir) if args.run_dir else make_run_dir(args.env, algorithm, args.seed)
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    progress = {"phase": "offline", "offline_step": 0}
    resumed = args.resume and (run_dir / "checkpoint.npz").exists()
    if resumed:
        progress = read_checkpoint_metadata(run_dir / "checkpoint.npz")
    resume_step = (
        progress["offline_step"]
        if progress["phase"] == "offline"
        else args.offline_steps + progress["env_steps"]
    )
    logger = Logger(run_dir, config=args, resume_step=resume_step if resumed else None)
    note_run(run_dir, run_dir / "checkpoint.npz" if resumed else None)
    return Run(run_dir, logger, progress, resumed)


def progress_bar(iterable, **kwargs):
    """tqdm that redraws twice a second on a terminal and every 30 s into a log file (nohup)."""
    bar = tqdm(iterable, mininterval=0.5 if sys.stderr.isatty() else 30.0, **kwargs)
    _WHERE["bar"] = bar
    return bar


def stack_metrics(window: list[dict]) -> dict:
    """The metrics of the steps since the last log, stacked per key (still on the device)."""
    return {k: jnp.stack([m[k] for m in window]) for k in window[0]}


# Where the running script is, for the line an interruption prints: its run directory, its last
# checkpoint (path, "offline step 2000"), its latest progress bar (the phase and step reached).
_WHERE: dict = {"run_dir": None, "checkpoint": None, "bar": None}


def note_run(run_dir: pathlib.Path, checkpoint: pathlib.Path | None = None) -> None:
    """Record the run directory (and a resumed run's checkpoint) for the interruption line."""
    _WHERE.update(
        run_dir=pathlib.Path(run_dir), checkpoint=(checkpoint, "resumed") if checkpoint else None
    )


def note_checkpoint(path: pathlib.Path, label: str) -> None:
    """Record the checkpoint just written (label: e.g. "global step 3000")."""
    _WHERE["checkpoint"] = (pathlib.Path(path), label)


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM (as KeyboardInterrupt is by SIGINT)."""


def _raise_terminated(signum, frame):
    raise Terminated


def resume_command(argv: list[str], run_dir: pathlib.Path) -> str:
    """The command line that resumes this run: the same flags, with --resume --run-dir RUN_DIR
    (and without --stop-after)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--run-dir", "--stop-after"):
            skip = True
        elif arg != "--resume" and not arg.startswith(("--run-dir=", "--stop-after=")):
            kept.append(arg)
    script = os.path.relpath(sys.argv[0]) if sys.argv[0].endswith(".py") else sys.argv[0]
    return shlex.join(["python", script, *kept, "--resume", "--run-dir", str(run_dir)])


def interruption_line(signal_name: str, argv: list[str]) -> str:
    """One line: the signal, the step reached, the last checkpoint and the command that resumes."""
    bar = _WHERE["bar"]
    reached = f" at {bar.desc} {bar.n}/{bar.total}" if bar is not None else ""
    if _WHERE["run_dir"] is None:
        return f"interrupted ({signal_name}){reached} before the run started; nothing was written"
    if _WHERE["checkpoint"] is None:
        where = "no checkpoint yet (the run restarts from its beginning)"
    else:
        path, label = _WHERE["checkpoint"]
        where = f"last checkpoint {path} ({label})"
    resume = resume_command(argv, _WHERE["run_dir"])
    return f"interrupted ({signal_name}){reached}; {where}; resume with: {resume}"


def cli(main, args_type, argv: list[str] | None = None):
    """A script's command line: parse `args_type` with tyro and call `main`; bad input ends with
    one line on stderr ('error: ...') and exit status 1; Ctrl-C (SIGINT) or SIGTERM with one line
    (`interruption_line`) and exit status 130 or 143, without a traceback. The checkpoints are
    written atomically, so the last one is whole and `--resume` continues bit-identically."""
    _WHERE.update(run_dir=None, checkpoint=None, bar=None)  # nothing from an earlier call
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    argv_used = sys.argv[1:] if argv is None else argv
    try:
        return main(tyro.cli(args_type, args=argv))
    except UsageError as err:
        raise SystemExit(f"error: {err}") from None
    except (KeyboardInterrupt, Terminated) as err:
        terminated = isinstance(err, Terminated)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not cut the line
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        line = interruption_line("SIGTERM" if terminated else "SIGINT", argv_used)
        sys.stdout.flush()
        print(f"\n{line}", file=sys.stderr, flush=True)
        # Leave without the interpreter's shutdown: XLA's threads may still be running the step
        # that was interrupted, and tearing them down under it crashed the process (SIGSEGV) in
        # one of six trials. Every file that matters is already closed or flushed per line.
        os._exit(143 if terminated else 130)
    finally:  # a caller that runs several scripts in one process gets its own handler back
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
