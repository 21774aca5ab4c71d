"""Studies of our own: each folder holds a question, its script, its results and a README."""
