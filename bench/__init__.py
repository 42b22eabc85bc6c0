"""Benchmarks of lookupd against a C baseline: `python -m bench` (see bench/README.md)."""
