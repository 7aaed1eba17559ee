"""Data sets that ship with installed packages, and how to split them across sites."""
