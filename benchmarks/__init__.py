"""Benchmarks: each module writes results/bench/<name>.json and prints its figures."""
