"""Benchmarks: scripts that print figures beside a same-run reference (never timed asserts)."""
