"""The q_calibration study (README.md beside this file)."""
