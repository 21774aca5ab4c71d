"""Checkpoints of a whole training state (params, optimizer states, buffers, counters, RNG keys,
normalisation stats): any pytree of arrays, saved as an uncompressed `.npz` (numpy arrays only,
loaded with `allow_pickle=False`, so a checkpoint can never execute code) plus a JSON metadata
string. Every write goes to a temporary file that is renamed into place, so a crash never leaves a
half-written checkpoint."""

import json
import os
import pathlib
import uuid
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from common.flags import UsageError

_META_KEY = "__metadata__"


def atomic_write_bytes(path: str | pathlib.Path, write) -> None:
    """Call `write(file)` on a temporary file beside `path`, then rename it onto `path`."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | pathlib.Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def _flatten(tree) -> dict[str, np.ndarray]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    arrays = {}
    for path, leaf in leaves:
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        arrays[jax.tree_util.keystr(path)] = np.asarray(leaf)
    return arrays


def save_checkpoint(path: str | pathlib.Path, state, metadata: dict | None = None) -> None:
    """Save pytree `state` (and JSON-serialisable `metadata`) atomically to `path`."""
    arrays = _flatten(state)
    if _META_KEY in arrays:
        raise ValueError(f"{_META_KEY} is reserved")
    arrays[_META_KEY] = np.asarray(json.dumps(metadata or {}))
    atomic_write_bytes(path, lambda f: np.savez(f, **arrays))


class CheckpointError(UsageError):
    """A checkpoint that is missing, not a checkpoint, or saved from another setup."""


# What numpy raises for a file that is not a whole .npz: not a zip, a truncated or corrupt zip
# (a member's CRC or compressed data), a pickled .npy, an object array (allow_pickle=False).
UNREADABLE_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def _open(path: pathlib.Path):
    """np.load of a checkpoint, with one-line errors for everything that is not one."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is a directory, not a file")
    try:
        stored = np.load(path, allow_pickle=False)
    except UNREADABLE_ERRORS:
        raise CheckpointError(
            f"{path} is not a checkpoint (not a whole .npz archive: truncated or another format)"
        ) from None
    if not hasattr(stored, "files") or _META_KEY not in stored.files:
        raise CheckpointError(f"{path} is not a checkpoint: it has no {_META_KEY} entry")
    return stored


def _read(path: pathlib.Path, stored, key: str) -> np.ndarray:
    """One array of an open checkpoint; a member that cannot be read is a one-line error."""
    try:
        return stored[key]
    except UNREADABLE_ERRORS:
        raise CheckpointError(
            f"{path} is damaged: its entry {key} cannot be read (truncated or corrupt .npz)"
        ) from None


def _metadata(path: pathlib.Path, stored) -> dict:
    try:
        metadata = json.loads(str(_read(path, stored, _META_KEY)))
    except json.JSONDecodeError:
        metadata = None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path} is not a checkpoint: its {_META_KEY} is not a JSON object")
    return metadata


def read_checkpoint_metadata(path: str | pathlib.Path) -> dict:
    """The JSON metadata of a checkpoint, without loading its arrays."""
    path = pathlib.Path(path)
    with _open(path) as stored:
        return _metadata(path, stored)


def load_checkpoint(path: str | pathlib.Path, target):
    """Restore a checkpoint into the structure of `target` (a state built the same way, e.g. a
    freshly initialised one). Returns (state, metadata). Shapes and dtype kinds (float, int,
    unsigned, bool) must match; anything else raises CheckpointError naming the first
    difference."""
    path = pathlib.Path(path)
    with _open(path) as stored:
        metadata = _metadata(path, stored)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
        restored = []
        for key_path, leaf in leaves:
            key = jax.tree_util.keystr(key_path)
            if key not in stored:
                raise CheckpointError(
                    f"checkpoint {path} lacks {key}: it was saved from another setup"
                )
            value = _read(path, stored, key)
            is_key = isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
            expected = jax.random.key_data(leaf) if is_key else np.asarray(leaf)
            if value.shape != expected.shape:
                raise CheckpointError(
                    f"checkpoint {path}: {key} has shape {value.shape}, expected {expected.shape}"
                )
            if value.dtype.kind != expected.dtype.kind:
                raise CheckpointError(
                    f"checkpoint {path}: {key} has dtype {value.dtype}, expected {expected.dtype}"
                )
            value = jnp.asarray(value, dtype=jax.dtypes.canonicalize_dtype(expected.dtype))
            restored.append(jax.random.wrap_key_data(value) if is_key else value)
    return jax.tree_util.tree_unflatten(treedef, restored), metadata


# Committed pretrained agents (pretrained/<dataset>/<name>/manifest.json), loadable by name. In a
# file copied out with common/ beside it there is no such folder and only paths load.
PRETRAINED_DIR = pathlib.Path(__file__).resolve().parents[1] / "pretrained"


def pretrained_names() -> list[str]:
    """The names of the committed agents, e.g. "walker2d-medium-v2/td3bc_500k"."""
    found = PRETRAINED_DIR.glob("*/*/manifest.json") if PRETRAINED_DIR.is_dir() else []
    return sorted(str(p.parent.relative_to(PRETRAINED_DIR)) for p in found)


def resolve_pretrained(value: str | None, env: str):
    """`value` of --offline-checkpoint as a path: an existing file as it is, or the name of a
    committed agent (a folder under pretrained/) as the file its manifest names, refused in one
    line (CheckpointError) where that agent was pretrained on another dataset than `env`."""
    if value is None or pathlib.Path(value).exists():
        return value
    manifest_path = PRETRAINED_DIR / value / "manifest.json"
    if not manifest_path.is_file():
        return value  # neither a file nor a name: reported as a missing file
    manifest = json.loads(manifest_path.read_text())
    flag = "--offline-checkpoint"
    if not isinstance(manifest.get("file"), str) or "dataset" not in manifest:
        raise CheckpointError(
            f"{flag} {value}: {manifest_path} names no file or dataset; re-export the agent "
            "with python -m benchmarks.export_pretrained"
        )
    if manifest["dataset"] != env:
        same = [n for n in pretrained_names() if n.startswith(f"{env}/")]
        hint = f"the agents of {env}: {', '.join(same)}" if same else f"--env {manifest['dataset']}"
        raise CheckpointError(
            f"{flag} {value} was pretrained on {manifest['dataset']}, not {env}: pass {hint}"
        )
    return str(manifest_path.parent / manifest["file"])


def load_offline_agent(path, target, algorithm: str, env: str, obs_dim: int, action_dim: int):
    """The pretrained agent of `--offline-checkpoint` (an `offline.npz` written by `algorithm`),
    restored into `target`. Every way the file can be wrong (missing, not a checkpoint, saved by
    another algorithm, for other observation/action sizes, from other network sizes) raises one
    CheckpointError line naming the flag and what was expected. Returns (agent, metadata)."""
    expected = (
        f"an offline agent of {algorithm} for {env} (observation {obs_dim}, action {action_dim})"
    )
    try:
        metadata = read_checkpoint_metadata(path)
        saved_by = metadata.get("algorithm", algorithm)  # older checkpoints: checked by structure
        if saved_by != algorithm:
            raise CheckpointError(f"it was saved by {saved_by}")
        saved = (metadata.get("obs_dim", obs_dim), metadata.get("action_dim", action_dim))
        if saved != (obs_dim, action_dim):
            saved_for = f"{metadata.get('env')} (observation {saved[0]}, action {saved[1]})"
            raise CheckpointError(f"it was saved for {saved_for}")
        return load_checkpoint(path, target)
    except CheckpointError as err:
        problem = str(err).replace(f"checkpoint {path} ", "").replace(f"{path} ", "")
        raise CheckpointError(
            f"--offline-checkpoint {path}: {problem}; expected {expected}"
        ) from None
