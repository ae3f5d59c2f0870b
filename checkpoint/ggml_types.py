"""The ggml tensor types flashtier reads and writes, with their block geometry.

A quantized row of ``cols`` weights is ``cols // block_size`` blocks of ``type_size`` bytes, laid
out back to back; a tensor ``[rows, cols]`` is ``rows`` such rows. The numeric ids are ggml's
(``enum ggml_type``), as stored in GGUF tensor infos.

Block layouts (little-endian, ``f16`` = IEEE half):

* ``Q8_0``  (32 weights, 34 B): ``f16 d; int8 qs[32]``; ``w = d * q``.
* ``Q4_0``  (32 weights, 18 B): ``f16 d; uint8 qs[16]``; weight ``j < 16`` is ``qs[j] & 15``,
  weight ``j + 16`` is ``qs[j] >> 4``; ``w = d * (q - 8)``.
* ``Q4_K`` (256 weights, 144 B): ``f16 d; f16 dmin; uint8 scales[12]; uint8 qs[128]``; 8 sub-blocks
  of 32 with 6-bit scale ``sc`` and min ``m`` packed in ``scales``; ``w = d*sc*q - dmin*m``.
* ``Q5_K`` (256 weights, 176 B): ``f16 d; f16 dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]``.
* ``Q6_K`` (256 weights, 210 B): ``uint8 ql[128]; uint8 qh[64]; int8 scales[16]; f16 d``;
  ``w = d * scales[sub] * (q - 32)``, 16 sub-blocks of 16.
* ``F32``, ``F16``, ``BF16``: plain arrays (block size 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class GGMLType(IntEnum):
    """ggml's numeric type ids (the subset flashtier supports plus the names of common others)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39


@dataclass(frozen=True, slots=True)
class TypeInfo:
    """Geometry of one supported type: ``block_size`` weights take ``type_size`` bytes."""

    ggml_type: GGMLType
    block_size: int
    type_size: int

    @property
    def quantized(self) -> bool:
        return self.block_size > 1

    def row_bytes(self, cols: int) -> int:
        """Bytes of one row of ``cols`` weights (``cols`` must be a multiple of ``block_size``)."""
        if cols % self.block_size:
            raise ValueError(f"{self.ggml_type.name} rows hold multiples of {self.block_size} weights, not {cols}")
        return cols // self.block_size * self.type_size

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of a tensor of logical ``shape`` (last dimension contiguous)."""
        rows = 1
        for d in shape[:-1]:
            rows *= d
        return rows * self.row_bytes(shape[-1])


SUPPORTED: dict[GGMLType, TypeInfo] = {
    t.ggml_type: t
    for t in (
        TypeInfo(GGMLType.F32, 1, 4),
        TypeInfo(GGMLType.F16, 1, 2),
        TypeInfo(GGMLType.BF16, 1, 2),
        TypeInfo(GGMLType.Q8_0, 32, 34),
        TypeInfo(GGMLType.Q4_0, 32, 18),
        TypeInfo(GGMLType.Q4_K, 256, 144),
        TypeInfo(GGMLType.Q5_K, 256, 176),
        TypeInfo(GGMLType.Q6_K, 256, 210),
    )
}
"""The types flashtier loads, computes with and writes."""

SUPPORTED_NAMES = ", ".join(t.name for t in SUPPORTED)


def type_info(t: int | GGMLType) -> TypeInfo:
    """Geometry of type ``t``; ``ValueError`` naming the supported types for any other."""
    try:
        info = SUPPORTED.get(GGMLType(t))
    except ValueError:
        info = None
    if info is None:
        name = GGMLType(t).name if t in GGMLType._value2member_map_ else f"id {int(t)}"
        raise ValueError(f"ggml type {name} is not supported; supported: {SUPPORTED_NAMES}")
    return info
