"""Generate D4RL-recipe MuJoCo datasets (the recipe: `common/d4rl_recipe.py`), and tabulate them.

Usage:
    python benchmarks/make_datasets.py --env hopper                  # all five splits
    python benchmarks/make_datasets.py --env hopper --splits medium  # one split
    python benchmarks/make_datasets.py --table benchmarks/results/datasets.md
    make datasets ENV=hopper
"""

import argparse
import json
import pathlib
import sys

from common.checkpoints import atomic_write_text
from common.d4rl import GYM_ENV_IDS, SPLITS, DatasetError, normalized_score
from common.d4rl_recipe import (  # noqa: F401 - re-exported: the generator's API
    POLICY_DIR,
    collect,
    generate,
    load_policy,
    read_manifest,
    replay_episodes,
    summarize,
)
from common.minari_io import GENERATED_NAMESPACE, minari_id, minari_root

REPO = pathlib.Path(__file__).resolve().parents[1]

# Typical behaviour returns of D4RL's medium datasets, from ../shared/docs/ALGORITHM_FACTS.md
# (the only D4RL behaviour statistics in the project's sources).
D4RL_TYPICAL_MEDIUM_RETURN = {"hopper": 1400.0, "halfcheetah": 4700.0, "walker2d": 3000.0}


def dataset_table(root=None) -> tuple[str, list[dict]]:
    """Markdown table (and rows) of every generated dataset under the Minari root: the reference
    scores another project can compare with on the same recipe, with the recipe's seed and the
    sha256 of the transitions (`common.datasets.transitions_checksum`, as the pretrained agents'
    manifests record it)."""
    from minari.dataset.minari_storage import MinariStorage

    from common.datasets import TRANSITION_KEYS, transitions_checksum
    from common.minari_io import read_episodes

    root = minari_root() if root is None else pathlib.Path(root)
    rows = []
    for env in GYM_ENV_IDS:
        for split in SPLITS:
            path = root / minari_id(GENERATED_NAMESPACE, env, split)
            if not (path / "data").exists():
                continue
            meta = MinariStorage.read_raw_metadata(path / "data")
            arrays, _ = read_episodes(path)
            typical = D4RL_TYPICAL_MEDIUM_RETURN.get(env) if split == "medium" else None
            rows.append(
                {
                    "name": f"{env}-{split}-v2",
                    "transitions": meta["total_steps"],
                    "episodes": meta["total_episodes"],
                    "behaviour_return": round(meta["behaviour_return"], 1),
                    "behaviour_return_std": round(
                        meta.get("behaviour_return_std", float("nan")), 1
                    ),
                    "normalized": round(meta["behaviour_normalized_score"], 1),
                    "d4rl_typical_return": typical,
                    "d4rl_typical_normalized": None
                    if typical is None
                    else round(float(normalized_score(env, typical)), 1),
                    "minari_id": minari_id(GENERATED_NAMESPACE, env, split),
                    "generation_seed": meta.get("generation_seed"),
                    "transitions_sha256": transitions_checksum(
                        {k: arrays[k] for k in TRANSITION_KEYS}
                    ),
                }
            )
    lines = [
        "| dataset | Minari id | transitions | episodes | behaviour return (± std) | normalized "
        "| D4RL typical return (normalized) | recipe seed | sha256 of the transitions |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        d4rl = (
            "n/a"
            if r["d4rl_typical_return"] is None
            else (f"~{r['d4rl_typical_return']:.0f} ({r['d4rl_typical_normalized']:.1f})")
        )
        lines.append(
            f"| {r['name']} | `{r['minari_id']}` | {r['transitions']:,} | {r['episodes']:,} | "
            f"{r['behaviour_return']:.1f} ± {r['behaviour_return_std']:.1f} | "
            f"{r['normalized']:.1f} | {d4rl} | {r['generation_seed']} | "
            f"`{r['transitions_sha256']}` |"
        )
    return "\n".join(lines) + "\n", rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", choices=sorted(GYM_ENV_IDS), help="generate this env's splits")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--steps", type=int, default=1_000_000, help="steps per rollout split")
    parser.add_argument("--num-envs", type=int, default=20, help="lockstep environments")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=pathlib.Path, help="Minari root (default: Minari's)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing datasets")
    parser.add_argument(
        "--table", type=pathlib.Path, help="write a Markdown table of all generated datasets here"
    )
    args = parser.parse_args(argv)
    if args.env is None and args.table is None:
        parser.error("nothing to do: pass --env ENV to generate, --table FILE to tabulate, or both")
    # medium-expert is built from medium and expert: build those first.
    order = ("random", "medium", "expert", "medium-replay", "medium-expert")
    try:
        for split in sorted(set(args.splits), key=order.index) if args.env else ():
            target = (args.root or minari_root()) / minari_id(GENERATED_NAMESPACE, args.env, split)
            if target.exists() and not args.overwrite:
                print(f"{args.env}-{split}-v2: exists at {target} (use --overwrite to rebuild)")
                continue
            summary = generate(
                args.env, split, args.steps, args.num_envs, args.seed, args.root, args.overwrite
            )
            print(f"{args.env}-{split}-v2: " + json.dumps(summary))
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.table:
        text, rows = dataset_table(args.root)
        atomic_write_text(args.table, text)
        atomic_write_text(args.table.with_suffix(".json"), json.dumps(rows, indent=2) + "\n")
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
