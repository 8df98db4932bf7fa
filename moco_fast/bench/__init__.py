"""Benchmarks, outside the library's core: nothing in moco_fast imports this package.

timing (device and host time, copy bandwidth, matmul rate), report (header, tables, JSON), and one
module per benchmark behind its script: ops (scripts/bench_ops.py), step (scripts/bench_step.py),
data (scripts/bench_data.py).
"""
