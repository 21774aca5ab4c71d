"""Export a pretrained CQL ensemble (the offline phase of `algorithms/off2on_balanced.py`, the
same as `algorithms/bred.py`'s) so that it can be committed and shared.

Writes OUT/ensemble.npz with just what fine-tuning needs: every member's policy and twin
critics (no optimizer, temperature or Lagrange state, no RNG key), and OUT/manifest.json with
the dataset (D4RL name, the Minari id it loaded, a checksum of its transitions), the flags, the
offline steps, the pretrained ensemble's normalized score, the checksum of ensemble.npz and the
command that re-creates it. `--offline-checkpoint OUT/ensemble.npz` takes it in both files.

Usage:
    python -m benchmarks.export_pretrained RUN_DIR --out pretrained/hopper-medium-v2/cql_n5_200k
"""

import argparse
import hashlib
import json
import pathlib
import re
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from common.checkpoints import atomic_write_text, save_checkpoint  # noqa: E402

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
    with np.load(offline_npz, allow_pickle=False) as stored:
        params = {name: params_under(stored, prefix) for name, prefix in PARTS.items()}
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
        params = ensemble_params(offline_npz)
    except (ExportError, OSError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from common.datasets import load_d4rl, transitions_checksum  # jax, gymnasium: load late

    data = load_d4rl(config["env"], allow_download=False, allow_generate=False, verbose=False)
    first_kernel = params["critic"]["params"]["MLP_0"]["Dense_0"]["kernel"]  # [N, 2, in, width]
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
    ensemble = args.out / "ensemble.npz"
    save_checkpoint(ensemble, params, metadata)
    flags = {k: v for k, v in config.items() if k not in ("run_dir", "resume", "stop_after")}
    cli = " ".join(
        f"--{k.replace('_', '-')} " + " ".join(map(str, v)) if isinstance(v, list) else
        f"--{k.replace('_', '-')} {v}"
        for k, v in flags.items()
        if k in ("env", "seed", "ensemble_size", "offline_steps", "bc_steps", "offline_eval_every")
    )  # fmt: skip
    manifest = {
        **metadata,
        "dataset_minari_id": data.info.minari_id,
        "dataset_transitions_sha256": transitions_checksum(data.transitions),
        "offline_steps": config["offline_steps"],
        "normalized_score": offline_score(args.run_dir, config["offline_steps"]),
        "flags": flags,
        "ensemble_sha256": sha256_file(ensemble),
        "recreate": (
            f"python algorithms/off2on_balanced.py {cli} --online-steps 0 --run-dir RUN && "
            f"python -m benchmarks.export_pretrained RUN --out {args.out}"
        ),
    }
    atomic_write_text(args.out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {ensemble} ({ensemble.stat().st_size / 1e6:.1f} MB) and manifest.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
