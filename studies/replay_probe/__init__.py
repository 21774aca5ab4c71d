"""The replay_probe study (README.md beside this file)."""
