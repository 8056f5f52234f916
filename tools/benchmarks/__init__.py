"""Benchmark sections for ``tools/benchmark.py``: each module defines ``run(args) -> None``."""
