"""Helpers of the end-to-end benchmark (bench/bench_e2e.py): the load generator and CPU accounting."""
