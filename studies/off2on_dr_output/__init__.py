"""The off2on_dr_output study (README.md beside this file)."""
