"""Checking a run's flags before anything is created or compiled.

Every numeric flag of an `Args` dataclass declares its range in its type, e.g.
`batch_size: flags.Count = 256`; `check_ranges(args)` checks them all, so a new flag is covered by
declaring its type. Anything else wrong with the input (an interval that does not divide the run,
a missing file, a checkpoint of another algorithm) raises `UsageError` with one line that names
the flag, the value, what is allowed and the fix; the scripts print it and exit 1, before they
create a run directory."""

import argparse
import dataclasses
import math
import os
import pathlib
import sys
import types
import typing
from typing import Annotated


class UsageError(ValueError):
    """A user-facing input problem; its message is one line that says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Range:
    """The allowed values of a numeric flag (of each element, for a tuple flag)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    high_open: bool = False
    what: str = ""  # a word on what the number is, for the error message
    nonempty: bool = False  # a tuple flag needs at least one element

    def allows(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (
            self.high is not None and (value > self.high or (self.high_open and value == self.high))
        )

    def describe(self) -> str:
        def shown(v):
            return f"{v:g}" if isinstance(v, float) else str(v)

        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {shown(self.low)}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {shown(self.high)}")
        allowed = " and ".join(parts) or "finite"
        return f"{allowed} ({self.what})" if self.what else allowed


# The ranges the algorithm files use; a flag of another kind writes `Annotated[T, Range(...)]`.
Count = Annotated[int, Range(1, what="a count, size or interval")]
Steps = Annotated[int, Range(0, what="a number of steps")]
Seed = Annotated[int, Range(0, 2**32 - 1, what="a seed")]
LearningRate = Annotated[float, Range(0, low_open=True, what="a learning rate")]
Positive = Annotated[float, Range(0, low_open=True)]
NonNegative = Annotated[float, Range(0)]
Fraction = Annotated[float, Range(0, 1, what="a fraction")]
OpenFraction = Annotated[float, Range(0, 1, low_open=True, high_open=True, what="a fraction")]
Discount = Annotated[float, Range(0, 1, high_open=True, what="a discount")]
PolyakRate = Annotated[float, Range(0, 1, low_open=True, what="a Polyak rate")]
Widths = Annotated[tuple[int, ...], Range(1, what="layer widths", nonempty=True)]


@dataclasses.dataclass(frozen=True)
class PathFlag:
    """Marks a path flag: `kind` is "checkpoint" (a file this script reads) or "run_dir"."""

    kind: str


CheckpointPath = Annotated[str | None, PathFlag("checkpoint")]
RunDir = Annotated[str | None, PathFlag("run_dir")]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): `error: <problem> (see <prog> --help)`."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def arg_type(kind: type, allowed: Range):
    """An argparse `type` that parses `kind` and checks `allowed`, for the benchmark CLIs
    (argparse prints the error with the usage line and exits 2). Tests read `.range`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind.__name__}") from None
        if not allowed.allows(value):
            raise argparse.ArgumentTypeError(f"{text}: must be {allowed.describe()}")
        return value

    parse.range, parse.kind, parse.__name__ = allowed, kind, kind.__name__
    return parse


def flag(name: str) -> str:
    """The command-line spelling of a field: `batch_size` -> `--batch-size`."""
    return "--" + name.replace("_", "-")


def flag_ranges(cls) -> dict[str, Range]:
    """field name -> its declared Range, for every field of dataclass `cls` that has one."""
    hints = typing.get_type_hints(cls, include_extras=True)
    ranges = {}
    for field in dataclasses.fields(cls):
        hint = hints[field.name]  # `Count`, or `Count | None` (a union holding the Annotated)
        for tp in (hint, *typing.get_args(hint)):
            if typing.get_origin(tp) is Annotated:
                found = [m for m in tp.__metadata__ if isinstance(m, Range)]
                if found:
                    ranges[field.name] = found[0]
                    break
    return ranges


def numeric_fields(cls) -> list[str]:
    """The fields whose values are numbers (or tuples of numbers), None allowed; bools excluded."""

    def numeric(tp) -> bool:
        if typing.get_origin(tp) is Annotated:
            return numeric(typing.get_args(tp)[0])
        args = [a for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis]
        if typing.get_origin(tp) in (tuple, typing.Union, types.UnionType):
            return bool(args) and all(numeric(a) for a in args)
        return tp in (int, float)

    hints = typing.get_type_hints(cls, include_extras=True)
    return [f.name for f in dataclasses.fields(cls) if numeric(hints[f.name])]


def check_ranges(args) -> None:
    """Every numeric flag of `args` within its declared range (None where the type allows it;
    each element of a tuple, and at least one where the Range says so). Raises UsageError."""
    ranges = flag_ranges(type(args))
    for name in numeric_fields(type(args)):
        if name not in ranges:  # a programming error, caught by tests/test_bad_input.py
            raise TypeError(f"{type(args).__name__}.{name} declares no Range")
    for name, allowed in ranges.items():
        value = getattr(args, name)
        if value is None:
            continue
        values = value if isinstance(value, tuple) else (value,)
        shown = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values) or "()"
        if not values and allowed.nonempty:
            raise UsageError(f"{flag(name)} is empty: give at least one value")
        if not all(allowed.allows(v) for v in values):
            raise UsageError(f"{flag(name)} {shown}: must be {allowed.describe()}")


def check_multiple(args, name: str, of: str) -> None:
    """Flag `name` a multiple of flag `of` (intervals compiled into chunks of `of` steps)."""
    value, unit = getattr(args, name), getattr(args, of)
    if value % unit:
        raise UsageError(
            f"{flag(name)} {value}: must be a multiple of {flag(of)} {unit} "
            f"(e.g. {max(unit, value // unit * unit)})"
        )


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def warn_if_longer(args, interval: str, total: str) -> None:
    """A legal but useless interval (an evaluation every 50k steps of a 10k-step run)."""
    if getattr(args, total) and getattr(args, interval) > getattr(args, total):
        warn(
            f"{flag(interval)} {getattr(args, interval)} exceeds {flag(total)} "
            f"{getattr(args, total)}: it never fires within the run"
        )


def check_file(path, name: str) -> pathlib.Path:
    """`path` (the value of flag `name`) an existing, readable file."""
    path = pathlib.Path(path)
    if not path.exists():
        raise UsageError(f"{flag(name)} {path}: no such file")
    if not path.is_file():
        raise UsageError(f"{flag(name)} {path}: is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{flag(name)} {path}: not readable (check its permissions)")
    return path


def check_run_dir(run_dir: str | None, resume: bool, checkpoint: str = "checkpoint.npz") -> None:
    """The run directory flags: --resume names an existing run; a new run's directory can be
    created and does not hold another run's checkpoint."""
    if resume and run_dir is None:
        raise UsageError("--resume needs --run-dir (the directory of the run to continue)")
    if run_dir is None:
        return
    path = pathlib.Path(run_dir)
    if resume and not path.is_dir():
        raise UsageError(f"--resume: {path} does not exist; drop --resume to start a new run there")
    if path.exists() and not path.is_dir():
        raise UsageError(f"--run-dir {path}: is a file, not a directory")
    if not resume and (path / checkpoint).exists():
        raise UsageError(
            f"--run-dir {path} already holds a run; add --resume to continue it or choose "
            "another directory"
        )
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--run-dir {path}: cannot be created, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--run-dir {path}: {parent} is not writable")
