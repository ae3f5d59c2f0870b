"""The KV cache: blocks, their tiers (device ring, host, spill files), codecs and retrieval attention's cache."""
