"""The sacml_divergence study (README.md beside this file)."""
