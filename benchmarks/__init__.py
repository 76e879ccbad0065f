"""Benchmarks: measurement programs run as ``python -m benchmarks.<name>`` (see README), results beside them."""
