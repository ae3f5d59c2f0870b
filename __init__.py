"""flashtier: run language models whose weights, MoE experts and KV cache do not fit in fast memory.

The repository root is this package: ``runtime/`` is ``flashtier.runtime``, ``tiers/`` is
``flashtier.tiers`` and so on (see ARCHITECTURE in the README).
"""

__version__ = "0.1.0"
