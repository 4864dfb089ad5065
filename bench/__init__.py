"""Benchmark scripts (run as `.venv/bin/python -m bench.<name>` from the repo root; see bench/README.md)."""
