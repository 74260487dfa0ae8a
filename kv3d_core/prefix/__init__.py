"""Prefix families: detection (detector plugins), the radix index of cached
sequences, and the table of shared family snapshots."""
