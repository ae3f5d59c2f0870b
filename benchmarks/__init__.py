"""flashtier.benchmarks"""
