"""flashtier.tiers"""
