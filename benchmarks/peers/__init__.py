"""Peer runners: each prints one JSON line with decode tokens/s, for the benchmarks to compare."""
