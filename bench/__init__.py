"""Benchmarks of the monitor: start-up to API ready, API latency, memory overhead."""
