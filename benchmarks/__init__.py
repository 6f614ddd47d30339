"""Benchmarks of zc against eager and Inductor: ``python -m benchmarks --help``."""
