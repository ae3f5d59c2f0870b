"""Device tier of the long-context KV cache: attention sinks + a ring of the most recent positions.

Per layer, two fixed tensors are allocated once: the sinks ``[H_kv, sink, D]`` (positions
``0 .. sink-1``, written when they arrive and kept for good) and a ring ``[H_kv, R, D]`` in which
position ``p`` lives in slot ``p % R``. ``R`` is a whole number of KV blocks, sized by the caller to
hold the window, one block being filled and one prefill chunk; the caller demotes whole blocks
before they would be overwritten. So the device-tier bytes are constant, whatever the context.

Invariant the caller keeps: the ring holds positions ``[ring_start, length)`` with
``length - ring_start <= R``; reading any position outside that range is an error.
"""

from __future__ import annotations

import torch

from flashtier.errors import InputError
from flashtier.runtime.kv.layout import KVBlockLayout
from flashtier.tiers import hugepages


class DeviceKVWindow:
    """Sinks and recent-position ring of every layer (see the module docstring)."""

    def __init__(self, layout: KVBlockLayout, sink_tokens: int, ring_tokens: int,
                 device: torch.device | str = "cpu", huge_pages: bool = True) -> None:
        """``huge_pages``: on the CPU, the ring (read whole at every decode step) on transparent
        huge pages (:mod:`flashtier.tiers.hugepages`)."""
        if ring_tokens <= 0 or ring_tokens % layout.block_size:
            raise InputError(f"device KV ring must be a positive multiple of the block size {layout.block_size}, got {ring_tokens}")
        self.layout, self.sink_tokens, self.ring_tokens = layout, sink_tokens, ring_tokens
        shape = (layout.num_layers, layout.num_kv_heads)
        ring = (*shape, ring_tokens, layout.head_dim)
        if torch.device(device).type == "cpu":
            self._k = hugepages.empty(ring, layout.dtype, huge=huge_pages, zeroed=True)  # [L, H, R, D]
            self._v = hugepages.empty(ring, layout.dtype, huge=huge_pages, zeroed=True)
        else:
            self._k = torch.zeros(ring, dtype=layout.dtype, device=device)  # [L, H, R, D]
            self._v = torch.zeros_like(self._k)
        self._sink_k = torch.zeros((*shape, sink_tokens, layout.head_dim), dtype=layout.dtype, device=device)  # [L, H, S, D]
        self._sink_v = torch.zeros_like(self._sink_k)

    @property
    def device(self) -> torch.device:
        """Where the sinks and the ring live (the model's device)."""
        return self._k.device

    def nbytes(self) -> int:
        """Bytes of the device tier (constant)."""
        return sum(t.numel() * t.element_size() for t in (self._k, self._v, self._sink_k, self._sink_v))

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Store ``k, v [H_kv, T, D]`` at positions ``start .. start+T-1`` (``T <= R``)."""
        t = k.shape[1]
        if t > self.ring_tokens:
            raise InputError(f"device KV ring holds {self.ring_tokens} positions, asked to write {t} at once")
        if start < self.sink_tokens:
            n = min(self.sink_tokens, start + t) - start
            self._sink_k[layer, :, start : start + n] = k[:, :n]
            self._sink_v[layer, :, start : start + n] = v[:, :n]
        for lo, hi, src in self._spans(start, start + t):
            self._k[layer, :, lo:hi] = k[:, src : src + hi - lo]
            self._v[layer, :, lo:hi] = v[:, src : src + hi - lo]

    def read(self, layer: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[H_kv, stop-start, D]`` of positions ``start .. stop-1`` (a view when
        they do not wrap around the ring)."""
        ks, vs = self.read_parts(layer, start, stop)
        if len(ks) == 1:
            return ks[0], vs[0]
        return torch.cat(ks, dim=1), torch.cat(vs, dim=1)

    def read_parts(self, layer: int, start: int, stop: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """:meth:`read` without the copy: views ``[H_kv, n_i, D]`` of the ring in position order
        (two when the range wraps around)."""
        if stop - start > self.ring_tokens or stop < start:
            raise InputError(f"device KV ring holds {self.ring_tokens} positions, asked {start}..{stop}")
        spans = self._spans(start, stop)
        return [self._k[layer, :, lo:hi] for lo, hi, _ in spans], [self._v[layer, :, lo:hi] for lo, hi, _ in spans]

    def sinks(self, layer: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[H_kv, count, D]`` of positions ``0 .. count-1`` (``count <= sink``)."""
        return self._sink_k[layer, :, :count], self._sink_v[layer, :, :count]

    def _spans(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """Ring slot ranges ``(lo, hi, offset in the input)`` covering positions ``start .. stop-1``."""
        r = self.ring_tokens
        spans, pos = [], start
        while pos < stop:
            lo = pos % r
            hi = min(r, lo + stop - pos)
            spans.append((lo, hi, pos - start))
            pos += hi - lo
        return spans or [(start % r, start % r, 0)]
