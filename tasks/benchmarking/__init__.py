"""Benchmarks of methods on a stream: the single-run loop, official-run profiles."""
