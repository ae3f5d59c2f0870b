"""Runnable examples of embedding flashtier."""
