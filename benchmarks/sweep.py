"""Benchmark suites (one TOML file per paper table under `benchmarks/suites/`) and the jobs they
expand to. Shared by the runner (`python -m benchmarks.run`) and the report
(`python -m benchmarks.report`).

A suite names an algorithm file, its datasets, its variants (flag sets, e.g. `--finetune td3c`)
and three budgets: `smoke` (seconds per run, tiny generated datasets), `cpu` (a few hours on a
2-core machine) and `paper` (the paper's protocol: the algorithm's defaults). With
`shared_pretraining`, each (dataset, seed) gets one pretraining job (`--online-steps 0`), and
every variant fine-tunes from its `offline.npz`, so variants differ only in the online phase.

Run directories: `<root>/<suite>/<budget>/<dataset>/seed<k>/<variant or "pretrain">/`. A job
is finished when its `summary.json` exists (written atomically at the very end), interrupted
when it has a `checkpoint.npz`, and new otherwise.
"""

import dataclasses
import json
import os
import pathlib
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[1]
SUITES_DIR = REPO / "benchmarks" / "suites"
REFERENCE_DIR = REPO / "benchmarks" / "reference"
DEFAULT_ROOT = REPO / "runs" / "bench"
BUDGETS = ("smoke", "cpu", "paper")


class SweepError(ValueError):
    """A user-facing problem with a suite or a sweep; one line saying how to fix it."""


@dataclasses.dataclass(frozen=True)
class Budget:
    name: str
    description: str
    seeds: tuple[int, ...]
    args: tuple[str, ...]
    datasets: tuple[str, ...] | None  # None: all of the suite's datasets
    tiny_datasets: int | None  # smoke: generate tiny random-action datasets of this many steps
    # With shared pretraining: one pretraining job per dataset, run with this seed, from which
    # every seed fine-tunes (the seeds then differ in fine-tuning only). None: one per seed.
    pretraining_seed: int | None = None
    # A committed offline checkpoint (repo-relative path) every fine-tuning job loads instead of
    # a pretraining job, e.g. pretrained/hopper-medium-v2/cql_n5_200k/ensemble.npz.
    offline_checkpoint: str | None = None


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    args: tuple[str, ...]
    paper: str | None  # the method's name in the reference CSV, if the paper reports it
    # A study's script this variant runs instead of the suite's (e.g. td3c_table1's td3_clip:
    # studies/td3c_clip/td3_clip.py); None: the suite's script.
    script: str | None = None


# What a claim asserts of one run, checked by the report's "claims" section: collapses / holds
# (its lowest early evaluation against its start), flat / improves (its late mean against its
# start), beats (its late mean against the `than` variant's on the same dataset and seed),
# learns_faster (the mean of all its fine-tuning evaluations against the `than` variant's). The
# thresholds are report.py's COLLAPSE_FRACTION, FLAT_BAND and TESTABLE_START, stated only there.
CLAIM_KINDS = ("collapses", "holds", "flat", "improves", "beats", "learns_faster")
COMPARATIVE_KINDS = ("beats", "learns_faster")  # against another variant (`than`)


@dataclasses.dataclass(frozen=True)
class Claim:
    text: str  # the paper's claim in words, e.g. "TD3 collapses early"
    variant: str
    kind: str  # one of CLAIM_KINDS
    than: str | None = None  # the other variant, for "beats" and "learns_faster"


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    title: str
    script: str
    datasets: tuple[str, ...]
    variants: tuple[Variant, ...]
    shared_pretraining: bool
    reference: str | None
    budgets: dict
    diagnostics: tuple[str, ...] = ()  # logged online scalars the report plots beside the score
    # Fine-tune from another suite's pretraining jobs (same dataset, seed and budget) instead of
    # pretraining again: BRED's offline phase is off2on's CQL ensemble, same code (tested).
    pretraining_from: str | None = None
    claims: tuple[Claim, ...] = ()  # the papers' claims the report checks per dataset and seed

    @property
    def script_path(self) -> str:
        """The file the jobs run, from the repository root: `algorithms/<script>` for a method,
        or the path itself for a study's script (`studies/<study>/<file>.py`)."""
        return resolve_script(self.script)

    @property
    def module(self) -> str:
        """The script as an importable module, e.g. algorithms.off2on_balanced."""
        return module_of(self.script_path)

    def variant_scripts(self) -> dict[str, str]:
        """{variant: script path} of the variants that run a script other than the suite's."""
        return {v.name: resolve_script(v.script) for v in self.variants if v.script}

    def script_path_for(self, variant: str) -> str:
        """The file a job of `variant` (or "pretrain") runs."""
        return self.variant_scripts().get(variant, self.script_path)

    def module_for(self, variant: str) -> str:
        return module_of(self.script_path_for(variant))

    def budget(self, name: str) -> Budget:
        if name not in self.budgets:
            raise SweepError(f"suite {self.name!r} has no budget {name!r}; known: {BUDGETS}")
        return self.budgets[name]

    def datasets_for(self, budget: Budget) -> list[str]:
        """The datasets a budget runs: its own list, or all of the suite's."""
        return list(budget.datasets or self.datasets)


def resolve_script(script: str) -> str:
    """`algorithms/<script>` for a method's file name, the path itself for a study's script."""
    return script if "/" in script else f"algorithms/{script}"


def module_of(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def suites_dir() -> pathlib.Path:
    """benchmarks/suites, or $O2O_SUITES_DIR (your own suites, e.g. for a new method)."""
    return pathlib.Path(os.environ.get("O2O_SUITES_DIR", SUITES_DIR))


def known_suites() -> list[str]:
    return sorted(p.stem for p in suites_dir().glob("*.toml"))


def load_suite(name: str) -> Suite:
    path = suites_dir() / f"{name}.toml"
    if not path.exists():
        raise SweepError(f"unknown suite {name!r}; known: {', '.join(known_suites())}")
    raw = tomllib.loads(path.read_text())
    budgets = {}
    for key in BUDGETS:
        b = raw["budgets"][key]
        budgets[key] = Budget(
            name=key,
            description=b["description"],
            seeds=tuple(b["seeds"]),
            args=tuple(b["args"]),
            datasets=tuple(b["datasets"]) if "datasets" in b else None,
            tiny_datasets=b.get("tiny_datasets"),
            pretraining_seed=b.get("pretraining_seed"),
            offline_checkpoint=b.get("offline_checkpoint"),
        )
        unknown = set(budgets[key].datasets or ()) - set(raw["datasets"])
        if unknown:
            raise SweepError(
                f"{path.name}: budget {key} names datasets outside the suite: {unknown}"
            )
    variants = tuple(
        Variant(name, tuple(v["args"]), v.get("paper"), v.get("script"))
        for name, v in raw["variants"].items()
    )
    claims = []
    for c in raw.get("claims", ()):
        missing = [key for key in ("text", "variant", "kind") if key not in c]
        if missing:
            raise SweepError(f"{path.name}: a [[claims]] entry lacks {missing}")
        claim = Claim(c["text"], c["variant"], c["kind"], c.get("than"))
        if claim.kind not in CLAIM_KINDS:
            raise SweepError(
                f"{path.name}: claim {claim.text!r} has kind {claim.kind!r}; known: {CLAIM_KINDS}"
            )
        unknown = [v for v in (claim.variant, claim.than) if v and v not in raw["variants"]]
        if unknown:
            raise SweepError(
                f"{path.name}: claim {claim.text!r} names variants outside the suite: {unknown}"
            )
        if (claim.kind in COMPARATIVE_KINDS) != (claim.than is not None):
            raise SweepError(
                f"{path.name}: claim {claim.text!r}: give `than` (the variant it is compared "
                f"with) exactly when its kind is one of {COMPARATIVE_KINDS}"
            )
        claims.append(claim)
    return Suite(
        name=name,
        title=raw["title"],
        script=raw["script"],
        datasets=tuple(raw["datasets"]),
        variants=variants,
        shared_pretraining=raw.get("shared_pretraining", False),
        reference=raw.get("reference"),
        budgets=budgets,
        diagnostics=tuple(raw.get("diagnostics", ())),
        pretraining_from=raw.get("pretraining_from"),
        claims=tuple(claims),
    )


@dataclasses.dataclass(frozen=True)
class Job:
    key: str  # "<dataset>/seed<k>/<variant>", unique within a sweep
    suite: str
    dataset: str
    seed: int
    variant: str  # a variant name, or "pretrain"
    run_dir: pathlib.Path
    argv: tuple[str, ...]  # the algorithm's arguments, without --run-dir / --resume
    after: str | None  # uid of the pretraining job this one fine-tunes from

    @property
    def uid(self) -> str:
        """Unique across suites (keys repeat: every suite has hopper-medium-v2/seed0/pretrain)."""
        return f"{self.suite}/{self.key}"

    def command(self, python: str) -> list[str]:
        resume = ["--resume"] if status(self) == "interrupted" else []
        return [
            python, load_suite(self.suite).script_path_for(self.variant), *self.argv,
            "--run-dir", str(self.run_dir), *resume,
        ]  # fmt: skip


def sweep_dir(root: pathlib.Path, suite: str, budget: str) -> pathlib.Path:
    return pathlib.Path(root) / suite / budget


def expand(
    suite: Suite,
    budget: Budget,
    root: pathlib.Path = DEFAULT_ROOT,
    datasets: list[str] | None = None,
    seeds: list[int] | None = None,
) -> list[Job]:
    """Every job of the sweep, pretraining jobs before the fine-tuning jobs that need them (a
    pretraining job shared by several seeds, see `Budget.pretraining_seed`, is listed once)."""
    chosen = suite.datasets_for(budget)
    if datasets:
        unknown = [d for d in datasets if d not in suite.datasets]
        if unknown:
            raise SweepError(
                f"datasets {unknown} are not in suite {suite.name}; its datasets: "
                f"{', '.join(suite.datasets)}"
            )
        chosen = list(datasets)
    base = sweep_dir(root, suite.name, budget.name)
    common = list(budget.args) + (["--no-generate"] if budget.tiny_datasets else [])
    source = None
    if suite.pretraining_from:
        source = load_suite(suite.pretraining_from)
        missing = set(chosen) - set(source.datasets)
        if not source.shared_pretraining or missing:
            raise SweepError(
                f"suite {suite.name} takes its pretraining from {source.name}, which has no "
                f"shared pretraining or lacks datasets {sorted(missing)}; fix pretraining_from"
            )
    jobs = []
    for dataset in chosen:
        for seed in seeds if seeds is not None else budget.seeds:
            head = ["--env", dataset, "--seed", str(seed), *common]
            seed_dir = base / dataset / f"seed{seed}"
            pre_seed = seed if budget.pretraining_seed is None else budget.pretraining_seed
            pretrain = None
            if budget.offline_checkpoint:  # a committed checkpoint: nothing to pretrain
                pass
            elif source is not None:  # the other suite's job: same run dir, so it runs only once
                (pretrain,) = [
                    j
                    for j in expand(source, source.budget(budget.name), root, [dataset], [pre_seed])
                    if j.variant == "pretrain"
                ]
            elif suite.shared_pretraining:
                pre_head = ["--env", dataset, "--seed", str(pre_seed), *common]
                pretrain = Job(
                    f"{dataset}/seed{pre_seed}/pretrain", suite.name, dataset, pre_seed,
                    "pretrain", base / dataset / f"seed{pre_seed}" / "pretrain",
                    tuple(pre_head + ["--online-steps", "0"]), None,
                )  # fmt: skip
            if pretrain is not None and pretrain not in jobs:
                jobs.append(pretrain)
            for variant in suite.variants:
                argv = head + list(variant.args)
                if budget.offline_checkpoint:
                    argv += ["--offline-checkpoint", str(REPO / budget.offline_checkpoint)]
                elif pretrain is not None:
                    argv += ["--offline-checkpoint", str(pretrain.run_dir / "offline.npz")]
                jobs.append(
                    Job(
                        f"{dataset}/seed{seed}/{variant.name}",
                        suite.name,
                        dataset,
                        seed,
                        variant.name,
                        seed_dir / variant.name,
                        tuple(argv),
                        pretrain.uid if pretrain else None,
                    )  # fmt: skip
                )
    return jobs


def status(job: Job) -> str:
    """ "finished" (summary.json written), "interrupted" (a checkpoint to resume) or "new"."""
    if (job.run_dir / "summary.json").exists():
        return "finished"
    if (job.run_dir / "checkpoint.npz").exists():
        return "interrupted"
    return "new"


def check_job_record(job: Job) -> None:
    """A run directory belongs to one command line: refuse to mix runs of different arguments."""
    record = job.run_dir / "job.json"
    if record.exists():
        previous = json.loads(record.read_text())["argv"]
        if previous != list(job.argv):
            raise SweepError(
                f"{job.run_dir} holds a run with other arguments ({' '.join(previous)}); delete "
                f"it or pass another --root"
            )
