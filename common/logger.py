"""Run directories and scalar logging: tensorboardX event files plus a JSONL copy of every
logged scalar and the resolved config. One global step counts across both phases."""

import dataclasses
import json
import pathlib
import time

import numpy as np
from tensorboardX import SummaryWriter

from common.checkpoints import atomic_write_text
from common.flags import UsageError, flag


def make_run_dir(env: str, algo: str, seed: int, root: str | pathlib.Path = "runs") -> pathlib.Path:
    """`runs/<env>__<algo>__<seed>__<YYYYmmdd-HHMMSS>`, created."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = pathlib.Path(root) / f"{env}__{algo}__{seed}__{stamp}"
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


# Flags that say where and how a run goes, not what it computes: they may change on --resume.
# (`checkpoint_every` only decides when the state is written, never what is computed, so a long
# run can be resumed with a shorter interval to lose less work when the machine is taken away.)
RUN_FLAGS = ("run_dir", "resume", "stop_after", "no_generate", "checkpoint_every")


def check_same_config(run_dir: str | pathlib.Path, args, ignore=RUN_FLAGS) -> None:
    """--resume continues the run in `run_dir` only with the flags it was started with."""
    path = pathlib.Path(run_dir) / "config.json"
    if not path.exists():
        return
    saved, now = json.loads(path.read_text()), _to_jsonable(args)
    for name, value in now.items():
        if name not in ignore and name in saved and saved[name] != value:
            raise UsageError(
                f"--resume: {run_dir} was started with {flag(name)} {saved[name]}, not {value}; "
                "resume with the flags it was started with, or use another --run-dir"
            )


def _to_jsonable(value):
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class Logger:
    """Writes `config.json`, `metrics.jsonl` and tensorboard events under `run_dir`.

    With `resume_step`, records logged after that step (by a run that was interrupted after its
    last checkpoint) are dropped from both the JSONL file and tensorboard, so a resumed run's logs
    read as if it had never stopped."""

    def __init__(self, run_dir: str | pathlib.Path, config=None, resume_step: int | None = None):
        self.run_dir = pathlib.Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        if resume_step is not None and self.jsonl_path.exists():
            kept = [
                line
                for line in self.jsonl_path.read_text().splitlines()
                if line and json.loads(line)["step"] <= resume_step
            ]
            atomic_write_text(self.jsonl_path, "".join(f"{line}\n" for line in kept))
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(self.run_dir), purge_step=purge)
        if config is not None:
            config = _to_jsonable(config)
            atomic_write_text(self.run_dir / "config.json", json.dumps(config, indent=2) + "\n")
            table = "\n".join(f"|{k}|{v}|" for k, v in sorted(config.items()))
            self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
        self._jsonl = open(self.jsonl_path, "a")  # noqa: SIM115 - closed in close()

    def log(self, step: int, metrics: dict, prefix: str = "") -> dict[str, float]:
        """Log scalar metrics (jax/numpy scalars are pulled to the host here). Returns them."""
        scalars = {f"{prefix}{k}": float(np.asarray(v)) for k, v in metrics.items()}
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")
        self._jsonl.flush()
        return scalars

    def close(self):
        self.writer.close()
        self._jsonl.close()


def read_metrics(run_dir: str | pathlib.Path) -> list[dict]:
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def finish_run(logger: Logger, run_dir: pathlib.Path, args, before, after, **fields) -> dict:
    """The end of an offline-to-online run, the same in every algorithm file: the final
    evaluation `after` (an `EvalResult`, like `before`) logged at the last global step;
    `summary.json` written atomically with the env, `fields` and the scores before and after
    fine-tuning (the keys benchmarks/report.py reads); the logger closed; the result printed."""
    logger.log(args.offline_steps + args.online_steps, after.metrics(), prefix="eval/")
    summary = {
        "env": args.env,
        **fields,
        "normalized_score_before_finetuning": before.mean_normalized,
        "normalized_score_after_finetuning": after.mean_normalized,
        "return_after_finetuning": after.mean_return,
    }
    atomic_write_text(pathlib.Path(run_dir) / "summary.json", json.dumps(summary, indent=2) + "\n")
    logger.close()
    print(
        f"normalized score: {before.mean_normalized:.1f} before fine-tuning, "
        f"{after.mean_normalized:.1f} after {args.online_steps} online steps; run dir {run_dir}"
    )
    return summary
