"""The one seam through which the forward obtains weights.

The model never holds weight tensors itself: it asks a :class:`WeightAccessor` for each weight by
its checkpoint name right before use, and tells the accessor when a layer starts and ends. An
accessor that keeps everything in memory (:class:`InMemoryWeights`) and one that pages weights
through the tiered store implement the same protocol, so the forward is identical in both.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch

from flashtier.checkpoint.folder import EMBED, Checkpoint
from flashtier.runtime.quantized import QuantizedTensor, embedding_rows, to_compute


@runtime_checkable
class WeightAccessor(Protocol):
    """Contract: a tensor returned by ``get`` stays valid until ``layer_end`` of the layer during
    which it was fetched (or, for weights fetched outside any layer, until the next
    ``step_end``). ``layer_begin`` may start prefetching; it must not block on IO."""

    compute_dtype: torch.dtype

    def get(self, name: str) -> torch.Tensor:
        """The weight ``name`` (checkpoint name), in ``compute_dtype``, ready to compute with."""
        ...

    def resident(self, name: str) -> bool:
        """Whether ``get(name)`` returns at once a weight held for the whole run (not a page that
        is streamed or cached): the forward may then fetch several such weights and multiply by
        them together (one native call for a layer's q, k, v) without holding streamed pages
        longer than the planner's window allows."""
        ...

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embedding rows ``[T, H]`` of ``tokens`` ``[T]`` (an accessor may read only these rows)."""
        ...

    def ffn(self, layer: int, xs: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Optionally compute layer ``layer``'s dense FFN itself (e.g. over a predicted subset of
        neurons) on each group ``xs[b]`` ``[T_b, H]`` of the pass (one per sequence: a decode token
        or a prefill chunk); returns one ``[T_b, H]`` output per group. Each group's output must
        depend on that group alone (batch invariance). None means "use the dense forward with
        ``get``"."""
        ...

    def computes_ffn(self, layer: int) -> bool:
        """Whether :meth:`ffn` computes (or observes) layer ``layer``'s dense FFN: when False the
        forward may compute the FFN without calling it (one native call for a decode token)."""
        ...

    def layer_begin(self, layer: int, hidden: torch.Tensor) -> None:
        """Layer ``layer`` is about to run on ``hidden`` ``[T, H]`` (its input)."""
        ...

    def done(self, names: tuple[str, ...]) -> None:
        """The current pass no longer needs ``names`` (e.g. an expert just computed): they may be
        released before ``layer_end``."""
        ...

    def route(self, layer: int, experts: list[int], hidden: torch.Tensor) -> None:
        """MoE layer ``layer`` routed this pass's tokens to ``experts`` (ascending: the order in
        which their weights will be fetched); an accessor may start reading them all now.
        ``hidden`` ``[T, H]`` is the router's input (after the post-attention norm)."""
        ...

    def layer_end(self, layer: int) -> None:
        """Layer ``layer`` is done: the weights it fetched may be released."""
        ...

    def step_end(self) -> None:
        """One forward pass (prefill chunk or decode token) is done."""
        ...

    def abort(self) -> None:
        """A forward pass failed midway: release everything it holds; the next pass starts clean."""
        ...


class InMemoryWeights:
    """Every weight read once into memory in ``compute_dtype`` (the fully-resident reference)."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        compute_dtype: torch.dtype | None = None,
        progress: Callable[[int, int], None] | None = None,
        device: torch.device | str = "cpu",
        huge_pages: bool = True,
    ) -> None:
        """``device``: where the weights are kept and the model computes ('cpu' or 'cuda[:n]');
        ``huge_pages``: CPU weights read onto transparent huge pages (:mod:`flashtier.tiers.hugepages`)."""
        self.compute_dtype = compute_dtype or checkpoint.weights_dtype
        self.device = torch.device(device)
        self._tensors: dict[str, torch.Tensor] = {}
        names = sorted(checkpoint.tensors)
        for i, name in enumerate(names):
            t = checkpoint.read_tensor(name, huge_pages=huge_pages and self.device.type == "cpu")
            self._tensors[name] = to_compute(t, self.compute_dtype, self.device)
            if progress is not None:
                progress(i + 1, len(names))

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def resident(self, name: str) -> bool:
        return True

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return embedding_rows(self._tensors[EMBED], tokens, self.compute_dtype)

    def layer_begin(self, layer: int, hidden: torch.Tensor) -> None:
        return None

    def done(self, names: tuple[str, ...]) -> None:
        return None

    def route(self, layer: int, experts: list[int], hidden: torch.Tensor) -> None:
        return None

    def ffn(self, layer: int, xs: list[torch.Tensor]) -> list[torch.Tensor] | None:
        return None

    def computes_ffn(self, layer: int) -> bool:
        return False

    def layer_end(self, layer: int) -> None:
        return None

    def step_end(self) -> None:
        return None

    def abort(self) -> None:
        return None

    def resident_bytes(self) -> int:
        return sum(t.nbytes if isinstance(t, QuantizedTensor) else t.numel() * t.element_size()
                   for t in self._tensors.values())
