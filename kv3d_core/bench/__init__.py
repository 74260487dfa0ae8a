"""Benchmarks: `kv3d bench` (workload, peer baseline, report)."""
