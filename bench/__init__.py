"""Benchmarks: ratios against peers measured in the same run and against the machine's limits."""
