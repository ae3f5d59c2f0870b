"""flashtier.apps.commands"""
