"""Weight accessors: what the forward pass asks for a weight by name (resident, paged, expert caches, sparse FFN)."""
