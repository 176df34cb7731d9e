"""Benchmark suite of the carwash gateway: `python -m bench` (see bench/README.md)."""
