"""How a KV block is stored in the host tier and on storage: raw, or KIVI-quantised.

A codec turns one block ``[2, H_kv, B, D]`` into a fixed-size byte *record* and back. The host
pool keeps records in a ``uint8 [slots, record_bytes]`` table and spill files hold records, so a
quantised host tier holds 2.7x (4-bit) to 4x (2-bit) more blocks in the same budget and writes
that many fewer bytes to storage.

* :class:`RawCodec`: the block's own bytes (exact; the default).
* :class:`KiviCodec`: KIVI (Liu et al., 2024) with :mod:`flashtier.retrieval.quant`'s packing:
  keys per channel over groups of ``group`` tokens (key outliers sit in fixed channels), values
  per token over groups of ``group`` channels; fp32 minimum and step per group. Contract (as in
  ``retrieval/quant.py``): every dequantised element is within half its group's step of the
  original (plus fp32 rounding); rows decode alone, so ``gather`` dequantises only the retrieved
  positions.

Record layout (KIVI): key codes ``[H, B, D*bits/8]`` u8 | value codes ``[H, B, D*bits/8]`` u8 |
key minimum, key step ``[H, B/g, D]`` f32 | value minimum, value step ``[H, B, D/g]`` f32.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from flashtier.errors import ConfigError
from flashtier.retrieval.quant import (
    SUPPORTED_BITS,
    QuantAxis,
    QuantizedTensor,
    dequantize,
    quantize_keys,
    quantize_values,
    unpack_bits,
)
from flashtier.runtime.kv.layout import KVBlockLayout

KIVI_GROUP = 32
"""Default KIVI group size (the KIVI paper's; capped by :func:`default_group`)."""


class KVCodec(ABC):
    """Encodes KV blocks into fixed-size byte records (module docstring)."""

    name: str
    record_bytes: int

    def __init__(self, layout: KVBlockLayout) -> None:
        self.layout = layout

    @abstractmethod
    def encode(self, blocks: torch.Tensor) -> torch.Tensor:
        """``blocks [n, 2, H, B, D]`` -> records ``uint8 [n, record_bytes]``."""

    @abstractmethod
    def decode(self, records: torch.Tensor) -> torch.Tensor:
        """Records ``uint8 [n, record_bytes]`` -> blocks ``[n, 2, H, B, D]`` in the layout dtype."""

    @abstractmethod
    def rows(self, records: torch.Tensor, slots: torch.Tensor, heads: torch.Tensor,
             offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[R, n, D]`` (layout dtype) of ``records[slots, ·, heads, offsets]``
        (``slots``, ``offsets`` ``[R, n]``, ``heads`` ``[R, 1]``), decoding only those rows."""


class RawCodec(KVCodec):
    """The block's bytes as they are (exact)."""

    name = "raw"

    def __init__(self, layout: KVBlockLayout) -> None:
        super().__init__(layout)
        self.record_bytes = layout.block_bytes

    def encode(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.to(self.layout.dtype).contiguous().view(torch.uint8).reshape(blocks.shape[0], -1)

    def decode(self, records: torch.Tensor) -> torch.Tensor:
        return records.contiguous().view(self.layout.dtype).view(records.shape[0], *self.layout.block_shape)

    def rows(self, records: torch.Tensor, slots: torch.Tensor, heads: torch.Tensor,
             offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # one index_select each on the flat [blocks * 2 * H * B, D] view (much faster than
        # advanced indexing)
        h, b, d = self.layout.num_kv_heads, self.layout.block_size, self.layout.head_dim
        flat = records.view(self.layout.dtype).view(-1, d)
        key_rows = ((slots * 2) * h + heads) * b + offsets  # [R, n]
        value_rows = key_rows + h * b
        shape = (*key_rows.shape, d)
        return (flat.index_select(0, key_rows.reshape(-1)).view(shape),
                flat.index_select(0, value_rows.reshape(-1)).view(shape))


class KiviCodec(KVCodec):
    """KIVI-quantised blocks (module docstring). ``bits`` 2, 4 or 8; ``group`` divides both the
    block size (key groups run over tokens) and the head dim (value groups run over channels)."""

    def __init__(self, layout: KVBlockLayout, bits: int, group: int) -> None:
        super().__init__(layout)
        h, b, d = layout.num_kv_heads, layout.block_size, layout.head_dim
        if bits not in SUPPORTED_BITS:
            raise ConfigError(f"kv_quant_bits must be one of {', '.join(map(str, SUPPORTED_BITS))} (or unset for "
                              f"exact KV), got {bits}")
        if group <= 0 or b % group or d % group:
            raise ConfigError(f"kv_quant_group (--kv-quant-group) {group} must divide the KV block size ({b} tokens: "
                              f"key groups) and the head dim ({d} channels: value groups); try "
                              f"{default_group(layout)} or leave it unset")
        if d % (8 // bits):
            raise ConfigError(f"head dim {d} must be a multiple of {8 // bits} to pack {bits}-bit KV codes")
        self.bits, self.group = bits, group
        self.name = f"kivi{bits}-g{group}"
        cb = d * bits // 8  # code bytes per row
        self._codes = h * b * cb  # bytes of one codes section
        self._kstat = h * (b // group) * d * 4  # bytes of one key statistics section (f32)
        self._vstat = h * b * (d // group) * 4
        self._cb = cb
        self.record_bytes = 2 * self._codes + 2 * self._kstat + 2 * self._vstat

    # ------------------------------------------------------------------ sections
    def _sections(self, records: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Typed views of ``records [n, R]``: key codes, value codes ``[n, H, B, cb]``; key min,
        key step ``[n, H, B/g, D]``; value min, value step ``[n, H, B, D/g]``."""
        n = records.shape[0]
        h, b, d, g = self.layout.num_kv_heads, self.layout.block_size, self.layout.head_dim, self.group
        o = [0, self._codes, 2 * self._codes]
        o += [o[-1] + self._kstat, o[-1] + 2 * self._kstat, o[-1] + 2 * self._kstat + self._vstat]
        o.append(self.record_bytes)
        kc = records[:, o[0]:o[1]].reshape(n, h, b, self._cb)
        vc = records[:, o[1]:o[2]].reshape(n, h, b, self._cb)
        kmin = _f32(records[:, o[2]:o[3]]).view(n, h, b // g, d)
        kstep = _f32(records[:, o[3]:o[4]]).view(n, h, b // g, d)
        vmin = _f32(records[:, o[4]:o[5]]).view(n, h, b, d // g)
        vstep = _f32(records[:, o[5]:o[6]]).view(n, h, b, d // g)
        return kc, vc, kmin, kstep, vmin, vstep

    # ------------------------------------------------------------------ codec
    # Key groups (B % g == 0) never straddle a block or a head, so every key (value) row of every
    # block quantises as one [n * H * B, D] tensor with retrieval/quant.py: its statistics come out
    # [n * H * B / g, D] (keys) and [n * H * B, D / g] (values), which are the record's sections.
    def encode(self, blocks: torch.Tensor) -> torch.Tensor:
        n, d = blocks.shape[0], self.layout.head_dim
        keys = quantize_keys(blocks[:, 0].reshape(-1, d), self.bits, self.group)
        values = quantize_values(blocks[:, 1].reshape(-1, d), self.bits, self.group)
        parts = [keys.codes, values.codes, keys.minimum, keys.scale, values.minimum, values.scale]
        return torch.cat([p.contiguous().view(torch.uint8).reshape(n, -1) for p in parts], dim=1)

    def decode(self, records: torch.Tensor) -> torch.Tensor:
        n, d, g = records.shape[0], self.layout.head_dim, self.group
        kc, vc, kmin, kstep, vmin, vstep = self._sections(records)
        rows = kc.shape[1] * kc.shape[2] * n  # n * H * B
        flat = lambda t: t.reshape(-1, t.shape[-1])
        k = dequantize(QuantizedTensor(flat(kc), flat(kstep), flat(kmin), self.bits, g, QuantAxis.PER_CHANNEL, (rows, d)))
        v = dequantize(QuantizedTensor(flat(vc), flat(vstep), flat(vmin), self.bits, g, QuantAxis.PER_TOKEN, (rows, d)))
        return torch.stack([k.view(kc.shape[:3] + (d,)), v.view(kc.shape[:3] + (d,))], dim=1).to(self.layout.dtype)

    def rows(self, records: torch.Tensor, slots: torch.Tensor, heads: torch.Tensor,
             offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.group
        kc, vc, kmin, kstep, vmin, vstep = self._sections(records)
        grp = torch.div(offsets, g, rounding_mode="floor")  # [R, n] key group of each row
        k = unpack_bits(kc[slots, heads, offsets], self.bits).float() * kstep[slots, heads, grp] + kmin[slots, heads, grp]
        v = (unpack_bits(vc[slots, heads, offsets], self.bits).float()
             * vstep[slots, heads, offsets].repeat_interleave(g, dim=-1) + vmin[slots, heads, offsets].repeat_interleave(g, dim=-1))
        return k.to(self.layout.dtype), v.to(self.layout.dtype)  # [R, n, D] each


def _f32(section: torch.Tensor) -> torch.Tensor:
    """A ``uint8 [n, 4m]`` column slice of the records viewed as ``float32 [n, m]`` without a copy
    when its offset and the record size allow it (they do for every power-of-two layout)."""
    try:
        return section.view(torch.float32)
    except RuntimeError:
        return section.contiguous().view(torch.float32)


def default_group(layout: KVBlockLayout) -> int:
    """The KIVI group for ``layout``: 32 (``KIVI_GROUP``), or the largest divisor of it that
    divides both the block size and the head dim when those are smaller (16 for tiny models)."""
    return math.gcd(KIVI_GROUP, layout.block_size, layout.head_dim)


def kv_codec(layout: KVBlockLayout, bits: int | None, group: int | None = None) -> KVCodec:
    """``RawCodec`` when ``bits`` is None, else ``KiviCodec(bits, group)`` (``group`` None =
    :func:`default_group`)."""
    if bits is None:
        return RawCodec(layout)
    return KiviCodec(layout, bits, default_group(layout) if group is None else group)
