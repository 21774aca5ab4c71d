"""Checkpoints of a whole training state (params, optimizer states, buffers, counters, RNG keys,
normalisation stats): any pytree of arrays, saved as an uncompressed `.npz` (numpy arrays only,
loaded with `allow_pickle=False`, so a checkpoint can never execute code) plus a JSON metadata
string. Every write goes to a temporary file that is renamed into place, so a crash never leaves a
half-written checkpoint."""

import json
import os
import pathlib
import uuid

import jax
import jax.numpy as jnp
import numpy as np

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


def read_checkpoint_metadata(path: str | pathlib.Path) -> dict:
    """The JSON metadata of a checkpoint, without loading its arrays."""
    with np.load(path, allow_pickle=False) as stored:
        return json.loads(str(stored[_META_KEY]))


def load_checkpoint(path: str | pathlib.Path, target):
    """Restore a checkpoint into the structure of `target` (a state built the same way, e.g. a
    freshly initialised one). Returns (state, metadata). Shapes and dtypes must match."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with np.load(path, allow_pickle=False) as stored:
        metadata = json.loads(str(stored[_META_KEY]))
        leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
        restored = []
        for key_path, leaf in leaves:
            key = jax.tree_util.keystr(key_path)
            if key not in stored:
                raise ValueError(f"checkpoint {path} lacks {key}: it was saved from another setup")
            value = stored[key]
            is_key = isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
            expected = jax.random.key_data(leaf) if is_key else np.asarray(leaf)
            if value.shape != expected.shape:
                raise ValueError(
                    f"checkpoint {path}: {key} has shape {value.shape}, expected {expected.shape}"
                )
            value = jnp.asarray(value, dtype=jax.dtypes.canonicalize_dtype(expected.dtype))
            restored.append(jax.random.wrap_key_data(value) if is_key else value)
    return jax.tree_util.tree_unflatten(treedef, restored), metadata
