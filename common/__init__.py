"""Shared helpers for the o2o-jax algorithm files: networks, buffers, datasets, evaluation,
logging and checkpoints. Importing this package has no side effects; import the submodules you
need (`from common import buffers`)."""

__version__ = "0.1.0"
