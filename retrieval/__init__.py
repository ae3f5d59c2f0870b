"""flashtier.retrieval"""
