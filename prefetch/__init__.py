"""flashtier.prefetch"""
