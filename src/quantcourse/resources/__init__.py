"""Data files shipped with the package (the course text snapshot)."""
