"""Export a pretrained offline agent so that it can be committed, shared and loaded by name.

- A CQL ensemble (the offline phase of `algorithms/off2on_balanced.py`, the same as
  `algorithms/bred.py`'s): OUT/ensemble.npz with just what fine-tuning needs, every member's
  policy and twin critics (no optimizer, temperature or Lagrange state, no RNG key).
- A TD3-BC agent (`algorithms/td3_c.py`) or a SAC+ML agent with its Z baselines
  (`algorithms/aca.py`): OUT/offline.npz, the run's own file byte for byte (fine-tuning reads its
  optimizer-free parts; ACA's alignment needs Z).

Beside it OUT/manifest.json: the dataset (D4RL name, the Minari id it loaded, a checksum of its
transitions), the algorithm, the flags, the offline steps, the agent's normalized score at the
end of pretraining, the file and its checksum, and the command that re-creates it. Each
algorithm file takes it as `--offline-checkpoint OUT/<file>` or, for a folder under pretrained/,
by its name: `--offline-checkpoint walker2d-medium-v2/td3bc_500k`.

Usage:
    python -m benchmarks.export_pretrained RUN_DIR --out pretrained/hopper-medium-v2/cql_n5_200k
"""

import argparse
import hashlib
import json
import pathlib
import re
import shutil
import sys

import numpy as np

from common.checkpoints import (
    UNREADABLE_ERRORS,
    CheckpointError,
    atomic_write_bytes,
    atomic_write_text,
    read_checkpoint_metadata,
    save_checkpoint,
)

REPO = pathlib.Path(__file__).resolve().parents[1]

# The metadata `kind` of an exported ensemble; the algorithm files recognise it.
PRETRAINED_KIND = "cql_ensemble_params"
# Prefixes of the offline checkpoint's keys: (members, key) -> members.actor / members.critic.
PARTS = {"actor": "[0].actor.params", "critic": "[0].critic.params"}


class ExportError(ValueError):
    """A user-facing problem with the run to export; one line saying how to fix it."""


def sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def params_under(stored, prefix: str) -> dict:
    """The nested parameter dict stored under `prefix` in a flat checkpoint (an open npz),
    rebuilt from its key paths, e.g. "[0].critic.params['params']['Dense_0']['bias']"."""
    params = {}
    for key in stored.files:
        if key.startswith(prefix):
            *path, leaf = re.findall(r"\['([^']+)'\]", key[len(prefix) :])
            node = params
            for part in path:
                node = node.setdefault(part, {})
            node[leaf] = stored[key]
    return params


def ensemble_params(offline_npz: pathlib.Path) -> dict:
    """{"actor": policy params, "critic": twin-critic params} of an offline checkpoint, each leaf
    with the leading member axis, rebuilt as nested dicts from the checkpoint's key paths."""
    try:
        with np.load(offline_npz, allow_pickle=False) as stored:
            params = {name: params_under(stored, prefix) for name, prefix in PARTS.items()}
    except UNREADABLE_ERRORS:
        raise ExportError(f"{offline_npz} is not a whole .npz archive (truncated?)") from None
    if not params["actor"] or not params["critic"]:
        raise ExportError(f"{offline_npz} holds no CQL ensemble (is it an off2on/bred run?)")
    return params


def offline_score(run_dir: pathlib.Path, offline_steps: int) -> float | None:
    """The normalized score of the last offline evaluation (at the end of pretraining)."""
    summary = run_dir / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())["normalized_score_before_finetuning"]
    score = None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["step"] <= offline_steps and "eval/normalized_score" in row:
            score = row["eval/normalized_score"]
    return score


# The algorithm files whose offline.npz is exported as it is, and the flags the re-create
# command repeats (the rest are the file's defaults).
WHOLE_RUN_FILES = {
    "td3_c": ("env", "seed", "offline_steps"),
    "aca": ("env", "seed", "offline_steps"),
}


def cli_flags(config: dict, names, defaults: dict | None = None) -> str:
    """`--name value` for the config's `names` (lists space-separated), plus boolean flags that
    differ from `defaults` (e.g. --no-offline-backup-entropy)."""
    words = []
    for k, v in config.items():
        name = k.replace("_", "-")
        if k in names:
            words.append(f"--{name} " + (" ".join(map(str, v)) if isinstance(v, list) else str(v)))
        elif defaults and isinstance(v, bool) and k in defaults and v != defaults[k]:
            words.append(f"--{name}" if v else f"--no-{name}")
    return " ".join(words)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=pathlib.Path, help="a run whose offline phase finished")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="output folder")
    args = parser.parse_args(argv)
    try:
        offline_npz = args.run_dir / "offline.npz"
        if not offline_npz.exists():
            raise ExportError(f"{offline_npz} does not exist: the run's offline phase must finish")
        config = json.loads((args.run_dir / "config.json").read_text())
        try:
            saved = read_checkpoint_metadata(offline_npz)
        except CheckpointError as err:
            raise ExportError(str(err)) from None
        algorithm = saved.get("algorithm")
        params = None if algorithm in WHOLE_RUN_FILES else ensemble_params(offline_npz)
    except (ExportError, OSError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from common.d4rl import DatasetError  # jax, gymnasium: load late
    from common.datasets import load_d4rl, transitions_checksum

    try:  # the manifest records the dataset's checksum: it must be the one the run trained on
        data = load_d4rl(config["env"], allow_download=False, allow_generate=False, verbose=False)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    flags = {k: v for k, v in config.items() if k not in ("run_dir", "resume", "stop_after")}
    if algorithm in WHOLE_RUN_FILES:
        metadata = {
            "kind": f"{algorithm}_offline_agent",
            "algorithm": algorithm,
            "dataset": config["env"],
            "hidden_dims": list(config["hidden_dims"]),
            "obs_dim": saved["obs_dim"],
            "action_dim": saved["action_dim"],
        }
        if "offline_algo" in saved:
            metadata["offline_algo"] = saved["offline_algo"]
        out_file = args.out / "offline.npz"
        with open(offline_npz, "rb") as f:
            atomic_write_bytes(out_file, lambda out: shutil.copyfileobj(f, out))
        defaults = {"offline_backup_entropy": True} if algorithm == "aca" else None
        cli = cli_flags(flags, WHOLE_RUN_FILES[algorithm], defaults)
        recreate = f"python algorithms/{algorithm}.py {cli} --online-steps 0 --run-dir RUN"
    else:
        first_kernel = params["critic"]["params"]["MLP_0"]["Dense_0"]["kernel"]  # [N, 2, in, w]
        num_members, obs_plus_act = first_kernel.shape[0], first_kernel.shape[2]
        metadata = {
            "kind": PRETRAINED_KIND,
            "dataset": config["env"],
            "ensemble_size": int(num_members),
            "hidden_dims": list(config["hidden_dims"]),
            "obs_dim": int(data.transitions["observations"].shape[1]),
            "action_dim": int(data.transitions["actions"].shape[1]),
        }
        assert metadata["obs_dim"] + metadata["action_dim"] == obs_plus_act
        out_file = args.out / "ensemble.npz"
        save_checkpoint(out_file, params, metadata)
        names = ("env", "seed", "ensemble_size", "offline_steps", "bc_steps", "offline_eval_every")
        cli = cli_flags(flags, names)
        recreate = f"python algorithms/off2on_balanced.py {cli} --online-steps 0 --run-dir RUN"
    manifest = {
        **metadata,
        "file": out_file.name,
        "dataset_minari_id": data.info.minari_id,
        "dataset_transitions_sha256": transitions_checksum(data.transitions),
        "offline_steps": config["offline_steps"],
        "normalized_score": offline_score(args.run_dir, config["offline_steps"]),
        "flags": flags,
        f"{out_file.stem}_sha256": sha256_file(out_file),
        "recreate": f"{recreate} && python -m benchmarks.export_pretrained RUN --out {args.out}",
    }
    atomic_write_text(args.out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {out_file} ({out_file.stat().st_size / 1e6:.1f} MB) and manifest.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
