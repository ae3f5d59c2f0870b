"""Streaming helper: walk a list of pages in order, each acquired while the next are prefetched.

This is the loop of a dense forward over weights that do not fit: page ``i`` is in use while pages
``i+1 .. i+ahead`` are being read, and a page is released as soon as the consumer moves on, so the
host budget only has to hold ``ahead + 1`` streamed pages (plus what is resident).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from flashtier.tiers.page import PageId
from flashtier.tiers.store import TieredStore


def stream_pages(
    store: TieredStore, page_ids: Sequence[PageId], ahead: int
) -> Iterator[tuple[PageId, torch.Tensor]]:
    """Yield ``(page_id, tensor)`` in order, prefetching up to ``ahead`` pages beyond the current.

    Prefetches are issued in order and never past one the store declined (no room yet), so the
    window shrinks to what the budget holds instead of skipping pages. The tensor is valid until
    the consumer advances the iterator (the page is then released); copy it to keep it. Closing
    the generator early releases the current page.
    """
    if ahead < 0:
        raise ValueError(f"ahead must be >= 0, got {ahead}")
    n = len(page_ids)
    cursor = 0  # next page to prefetch; page i itself first, so its read is queued first
    for i, page_id in enumerate(page_ids):
        cursor = max(cursor, i)
        while cursor < min(n, i + 1 + ahead):
            if store.prefetch(page_ids[cursor]) is None:
                break  # declined: retry from here at the next step
            cursor += 1
        tensor = store.acquire(page_id)
        try:
            yield page_id, tensor
        finally:
            store.release(page_id)
