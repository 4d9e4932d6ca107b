"""Benchmarks: scripts that print measured figures (JSON lines); never timed tests."""
