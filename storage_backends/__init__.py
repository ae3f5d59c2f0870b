"""flashtier.storage_backends"""
