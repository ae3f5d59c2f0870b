"""Lossless codecs for 16-bit weights at rest: fewer bytes from storage, the same bits in memory.

A bf16 (or fp16) weight is two bytes: the low byte holds the last mantissa bits (close to
uniform: incompressible), the high byte the sign and the exponent, which for trained or randomly
initialised weights takes a handful of values (2.7 bits of entropy on the 1.7 GB dense test
model). ``split16`` stores the low bytes as they are and the high bytes entropy-coded with zstd
(literal Huffman coding only: matches are disabled, they cost decode speed and find nothing), so
a tensor takes about 67% of its bytes at rest. This is the byte-grouping idea of ZipNN and the
exponent coding of DFloat11; decoding is exact by construction (``decode(encode(x)) == x`` for
every byte string of even length), so tokens do not change.

Decode cost, measured on this machine (one core): zstd restores the high bytes at ~2.1 GB/s and
interleaving the two planes runs at ~20 GB/s in the C extension ``flashtier._native`` (~3 GB/s
with ``torch.stack``, the fallback when the extension was not built): 3.0 GB/s of weights restored
per core (1.6 with the fallback; ``benchmarks/bench_weight_codec.py``), spent on the IO threads
while the compute thread works.

Record layout of ``split16`` for ``n`` input bytes (``n`` even, ``h = n / 2``):
``[low bytes: h][zstd frame of the high bytes, with its content checksum]``.
``raw``: the bytes themselves.
"""

from __future__ import annotations

import threading
from typing import Final

import numpy as np
import torch
from flashtier.errors import IntegrityError

try:  # the C extension (setup.py) interleaves at ~20 GB/s; torch.stack, the fallback, at ~3 GB/s
    from flashtier._native import interleave16 as _interleave16
except ImportError:  # pragma: no cover - built by every install that has a C compiler
    _interleave16 = None

try:  # optional at import time so that a missing wheel is reported where it matters
    import zstandard as _zstd
except ImportError:  # pragma: no cover - exercised only without the dependency
    _zstd = None

RAW: Final = "raw"
SPLIT16: Final = "split16"
CODECS: Final = (RAW, SPLIT16)

# zstd "fast" with 7-byte minimum matches: in effect literals only, Huffman-coded
_LEVEL_PARAMS = {"compression_level": 1, "min_match": 7, "window_log": 17, "hash_log": 10, "strategy": 1}
_local = threading.local()


def _require_zstd():  # type: ignore[no-untyped-def]
    if _zstd is None:
        raise ImportError("compressed weights need the 'zstandard' package: pip install zstandard")
    return _zstd


def encode(data: memoryview | bytes, codec: str) -> bytes:
    """The stored record of ``data`` under ``codec`` (see the module docstring)."""
    if codec == RAW:
        return bytes(data)
    if codec != SPLIT16:
        raise ValueError(f"unknown weight codec {codec!r}; known: {', '.join(CODECS)}")
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size % 2:
        raise ValueError(f"split16 needs an even number of bytes, got {buf.size}")
    pairs = buf.reshape(-1, 2)  # [h, 2]: (low, high) per little-endian 16-bit value
    low = pairs[:, 0].tobytes()
    high = pairs[:, 1].tobytes()
    zstd = _require_zstd()
    params = zstd.ZstdCompressionParameters(write_checksum=True, write_content_size=True, **_LEVEL_PARAMS)
    return low + zstd.ZstdCompressor(compression_params=params).compress(high)


def decode_into(record: memoryview, codec: str, out: memoryview, where: str) -> None:
    """Write the original bytes of ``record`` into ``out`` (exactly their length). A record that
    does not decode to ``len(out)`` bytes, or whose zstd checksum fails, raises IntegrityError
    naming ``where``. Releases the GIL for the heavy parts (zstd, torch), so IO threads decode in
    parallel with the compute thread."""
    n = len(out)
    if codec == RAW:
        if len(record) != n:
            raise IntegrityError(f"{where}: stored record has {len(record)} bytes, expected {n}")
        out[:] = record
        return
    if codec != SPLIT16:
        raise IntegrityError(f"{where}: unknown weight codec {codec!r}; the compressed folder is from a newer "
                             "flashtier or corrupt: compress the model again")
    h = n // 2
    if n % 2 or len(record) < h:
        raise IntegrityError(f"{where}: stored record of {len(record)} bytes cannot hold {n} bytes of split16 data")
    zstd = _require_zstd()
    dec = getattr(_local, "decompressor", None)
    if dec is None:
        dec = _local.decompressor = zstd.ZstdDecompressor()
    scratch = getattr(_local, "scratch", None)
    if scratch is None or len(scratch) < h:
        scratch = _local.scratch = torch.empty(h, dtype=torch.uint8)  # one per IO thread, grows to the largest
    high_t = scratch[:h]  # [h]
    view = memoryview(high_t.numpy())
    got = 0
    try:
        reader = dec.stream_reader(record[h:])
        while got < h:
            k = reader.readinto(view[got:])
            if k == 0:
                break
            got += k
        extra = reader.read(1)
    except zstd.ZstdError as e:
        raise IntegrityError(f"{where}: compressed high bytes do not decode ({e}); the file is corrupt: "
                             "compress the model again, or run with --compressed off") from e
    if got != h or extra:  # (an empty frame decodes to nothing: h = 0 passes here)
        raise IntegrityError(f"{where}: high bytes decode to {got if not extra else 'more than ' + str(h)} bytes, "
                             f"expected {h}; the file is corrupt: compress the model again, or run with --compressed off")
    if h == 0:
        return
    if _interleave16 is not None:
        _interleave16(record[:h], view[:h], out)
        return
    dest = torch.frombuffer(out, dtype=torch.uint8).view(h, 2)  # [h, 2]
    low_t = torch.frombuffer(record[:h], dtype=torch.uint8)  # [h]
    torch.stack((low_t, high_t), dim=1, out=dest)
