"""Benchmark scripts: each prints one JSON document and measures its own baseline in the same run."""
