"""Benchmarks and load-testing scripts (run as scripts; nothing imports bench)."""
