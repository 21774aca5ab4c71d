"""The methods, one self-contained file each (a file copied out with common/ beside it runs)."""
