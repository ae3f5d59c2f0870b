"""Exact attention over keys that arrive block by block, in memory bounded by one block.

Long-context prefill cannot materialise the ``[T, S]`` scores of a chunk of ``T`` queries against
all ``S`` cached keys when ``S`` is large, and the keys may come from several tiers anyway. Each
block of keys gives a :class:`~flashtier.retrieval.merge.PartialAttention`; a running log-sum-exp
merge folds it into the result, so the peak extra memory is the scores of one block
``[..., G, N_block]``.

Contract: for any split of the keys into blocks (masks included), the result equals softmax
attention over all of them up to floating-point rounding (the merge of
:mod:`flashtier.retrieval.merge` is exact). Pass fp32 queries to keep the running result in fp32.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from flashtier.errors import InputError
from flashtier.retrieval.merge import PartialAttention, merge_partials, partial_attention

KeyBlock = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
"""``(k [..., N, D], v [..., N, D], mask)``: one block of keys, values and an optional bool mask
broadcastable to ``[..., G, N]`` (True = attend)."""


class RunningAttention:
    """Folds partial results in one at a time: ``add`` a block, read ``result`` at the end."""

    def __init__(self) -> None:
        self._acc: PartialAttention | None = None
        self.blocks = 0
        """Blocks folded in so far."""

    def add(self, part: PartialAttention) -> None:
        """Merge one more partial result over keys disjoint from those already added."""
        self._acc = part if self._acc is None else merge_partials([self._acc, part])
        self.blocks += 1

    def result(self) -> PartialAttention:
        """The attention over every key added so far."""
        if self._acc is None:
            raise InputError("RunningAttention.result: no key block was added")
        return self._acc


def blockwise_attention(q: torch.Tensor, blocks: Iterable[KeyBlock], scale: float) -> PartialAttention:
    """Attention of ``q [..., G, D]`` over the union of ``blocks`` (disjoint key sets)."""
    running = RunningAttention()
    for k, v, mask in blocks:
        running.add(partial_attention(q, k, v, scale, mask))
    if running.blocks == 0:
        return partial_attention(q, q.new_zeros((*q.shape[:-2], 0, q.shape[-1])),
                                 q.new_zeros((*q.shape[:-2], 0, q.shape[-1])), scale)
    return running.result()
