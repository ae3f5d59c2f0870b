"""flashtier.apps"""
