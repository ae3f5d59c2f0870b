"""flashtier.runtime"""
