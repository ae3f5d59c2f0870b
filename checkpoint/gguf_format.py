"""The GGUF container, read and written by flashtier itself (no mmap, no third-party parser).

A GGUF file is ``"GGUF" u32 version u64 n_tensors u64 n_kv``, then ``n_kv`` metadata pairs
(``string key, u32 type, value``), then ``n_tensors`` tensor infos (``string name, u32 n_dims,
u64 ne[n_dims], u32 ggml_type, u64 offset``), padding to ``general.alignment`` (default 32), and the
data section; tensor offsets are relative to its start. ``ne[0]`` is the contiguous dimension, so
a tensor with ``ne = [cols, rows]`` is the row-major ``[rows, cols]`` matrix.

:func:`read_gguf` validates everything a reader relies on (counts and lengths within the file,
types known, tensors inside the data section, sizes consistent with shape and type, no overlaps)
and returns absolute file offsets, so paging code reads any tensor (or one expert's slab of a
stacked expert tensor) in place through a storage backend. :func:`write_gguf` writes a file that
llama.cpp loads, to a temporary sibling renamed into place, with a crc32 of every tensor's bytes
in the metadata key ``flashtier.tensor_crc32`` (checked by flashtier wherever it reads them), and
a crc32 of the header itself (every metadata pair but the crc lists, and the tensor table) in
``flashtier.header_crc32``, checked by :func:`read_gguf` whenever the file still has the size
flashtier wrote (``flashtier.file_size``): a flipped bit in a tokenizer string or a rope setting is
an IntegrityError, while a file another tool rewrote (a different size) is read as foreign.
"""

from __future__ import annotations

import io
import os
import struct
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flashtier.checkpoint.ggml_types import GGMLType, type_info
from flashtier.errors import CheckpointError, IntegrityError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
CRC_KEY = "flashtier.tensor_crc32"
"""Metadata key of the per-tensor crc32 list (tensor-info order) that flashtier writes."""
SLICE_CRC_KEY = "flashtier.slice_crc32"
"""Metadata key of the crc32 of each ``[rows, cols]`` slice of every 3-D tensor (stacked experts),
in tensor-info order: paging reads one expert's slice, which the whole-tensor crc cannot check."""
CRC_LAYOUT_KEY = "flashtier.tensor_crc32_layout"
"""crc32 of the tensor infos (names, shapes, types, offsets) the crc list belongs to. Tools that
rewrite a file and copy its metadata (llama.cpp's quantizer does) leave a stale crc list behind;
readers use the list only when this matches the file's own tensor infos."""


HEADER_CRC_KEY = "flashtier.header_crc32"
"""crc32 of the header: the bytes before the metadata, every metadata pair except the crc lists
and this key, and the tensor table (see :func:`_header_crc`)."""
FILE_SIZE_KEY = "flashtier.file_size"
"""Size of the file as flashtier wrote it: a file of that size is checked against
``HEADER_CRC_KEY``; another size means another tool rewrote it and copied the metadata."""
_UNCHECKED_KEYS = frozenset({CRC_KEY, SLICE_CRC_KEY, HEADER_CRC_KEY})
"""Metadata the header crc leaves out: values filled in after the data is written, and itself."""


def _header_crc(prefix: bytes, pairs: Iterable[tuple[str, bytes]], table: bytes) -> int:
    """crc32 of ``prefix`` (magic, version, counts), the raw bytes of each metadata pair whose key
    is not in ``_UNCHECKED_KEYS`` (file order), and the tensor table."""
    crc = zlib.crc32(prefix)
    for key, raw in pairs:
        if key not in _UNCHECKED_KEYS:
            crc = zlib.crc32(raw, crc)
    return zlib.crc32(table, crc) & 0xFFFFFFFF


def _layout_crc(infos: list[tuple[str, tuple[int, ...], int, int]]) -> int:
    text = ";".join(f"{n}:{','.join(map(str, s))}:{t}:{o}" for n, s, t, o in infos)
    return zlib.crc32(text.encode("utf-8", errors="surrogateescape"))

MAX_STRING = 1 << 26  # 64 MiB: a chat template or one token never comes close
MAX_ARRAY = 1 << 28
MAX_COUNT = 1 << 24


class ValueType:
    """GGUF metadata value types."""

    UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)


_SCALAR: dict[int, tuple[str, str]] = {  # value type -> (struct code, numpy dtype)
    ValueType.UINT8: ("<B", "<u1"),
    ValueType.INT8: ("<b", "<i1"),
    ValueType.UINT16: ("<H", "<u2"),
    ValueType.INT16: ("<h", "<i2"),
    ValueType.UINT32: ("<I", "<u4"),
    ValueType.INT32: ("<i", "<i4"),
    ValueType.FLOAT32: ("<f", "<f4"),
    ValueType.BOOL: ("<?", "<u1"),
    ValueType.UINT64: ("<Q", "<u8"),
    ValueType.INT64: ("<q", "<i8"),
    ValueType.FLOAT64: ("<d", "<f8"),
}


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    """One tensor of a GGUF file: logical ``shape`` (row-major, ``shape[-1]`` contiguous), ggml type,
    absolute byte ``offset`` in ``path`` and ``nbytes``; ``crc32`` when flashtier wrote the file."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLType
    path: Path
    offset: int
    nbytes: int
    crc32: int | None = None
    slice_crc32: tuple[int, ...] | None = None
    """For a 3-D tensor written by flashtier: the crc32 of each ``shape[1:]`` slice."""


@dataclass(frozen=True)
class GGUFFile:
    """The parsed header of a GGUF file: metadata and tensors (name -> :class:`GGUFTensor`)."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    data_offset: int
    file_size: int
    unsupported: dict[str, str] = field(default_factory=dict)
    """Tensors whose ggml type flashtier cannot compute with: name -> type name."""


class _Reader:
    """Sequential little-endian reads from a buffered file, with bounds checks that name the file."""

    def __init__(self, f: io.BufferedReader, path: Path, size: int) -> None:
        self.f, self.path, self.size = f, path, size

    def take(self, n: int, what: str) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise CheckpointError(f"{self.path}: file ends inside the header ({what}); the GGUF file is truncated: "
                                  "download it again, or write it again with `flashtier quantize`")
        return data

    def scalar(self, vtype: int, what: str) -> Any:
        code = _SCALAR[vtype][0]
        (v,) = struct.unpack(code, self.take(struct.calcsize(code), what))
        return v

    def u32(self, what: str) -> int:
        return self.scalar(ValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(ValueType.UINT64, what)

    def string(self, what: str) -> str:
        n = self.u64(what)
        if n > MAX_STRING or n > self.size:
            raise CheckpointError(f"{self.path}: {what} claims a string of {n} bytes; the GGUF header is corrupt")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="surrogateescape")  # byte tokens of some vocabularies

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALAR:
            v = self.scalar(vtype, what)
            return bool(v) if vtype == ValueType.BOOL else v
        if vtype == ValueType.STRING:
            return self.string(what)
        if vtype == ValueType.ARRAY:
            etype = self.u32(what)
            n = self.u64(what)
            if n > MAX_ARRAY or n > self.size:
                raise CheckpointError(f"{self.path}: {what} claims an array of {n} items; the GGUF header is corrupt")
            if etype in _SCALAR:
                dt = np.dtype(_SCALAR[etype][1])
                arr = np.frombuffer(self.take(n * dt.itemsize, what), dtype=dt)
                return [bool(v) for v in arr] if etype == ValueType.BOOL else arr
            if etype == ValueType.STRING:
                return [self.string(what) for _ in range(n)]
            if etype == ValueType.ARRAY:
                return [self.value(ValueType.ARRAY, what) for _ in range(n)]
            raise CheckpointError(f"{self.path}: {what} has an array of unknown type {etype}; the GGUF header is corrupt")
        raise CheckpointError(f"{self.path}: {what} has unknown value type {vtype}; the GGUF header is corrupt")


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse and validate the header of the GGUF file at ``path`` (see module doc).

    Raises :class:`CheckpointError` naming the file for a missing, truncated or corrupt file.
    Tensors of types flashtier does not support are listed in ``unsupported`` (callers refuse the
    file only if the model needs them)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb", buffering=1 << 20)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open the GGUF file: {e.strerror or e}") from e
    with f:
        r = _Reader(f, path, size)
        if r.f.read(4) != MAGIC:
            raise CheckpointError(f"{path}: not a GGUF file (it does not start with 'GGUF'); an empty or cut file: "
                                  "download it again, or write it again with `flashtier quantize`")
        version = r.u32("version")
        if version not in (2, 3):
            raise CheckpointError(f"{path}: GGUF version {version} is not supported (versions 2 and 3 are)")
        n_tensors = r.u64("tensor count")
        n_kv = r.u64("metadata count")
        if n_tensors > MAX_COUNT or n_kv > MAX_COUNT:
            raise CheckpointError(f"{path}: header claims {n_tensors} tensors and {n_kv} metadata keys; the GGUF header is corrupt")
        metadata: dict[str, Any] = {}
        pair_spans: list[tuple[str, int, int]] = []
        kv_start = r.f.tell()
        for i in range(n_kv):
            start = r.f.tell()
            key = r.string(f"metadata key {i}")
            metadata[key] = r.value(r.u32(f"type of {key!r}"), repr(key))
            pair_spans.append((key, start, r.f.tell()))
        table_start = r.f.tell()
        infos: list[tuple[str, tuple[int, ...], int, int]] = []
        for i in range(n_tensors):
            name = r.string(f"tensor name {i}")
            n_dims = r.u32(f"dimensions of {name!r}")
            if not 1 <= n_dims <= 4:
                raise CheckpointError(f"{path}: tensor {name!r} has {n_dims} dimensions; the GGUF header is corrupt")
            ne = [r.u64(f"shape of {name!r}") for _ in range(n_dims)]
            gtype = r.u32(f"type of {name!r}")
            offset = r.u64(f"offset of {name!r}")
            infos.append((name, tuple(reversed(ne)), gtype, offset))
        header_end = r.f.tell()
        if metadata.get(FILE_SIZE_KEY) == size and HEADER_CRC_KEY in metadata:
            f.seek(0)
            head = f.read(header_end)
            got = _header_crc(head[:kv_start], ((k, head[a:b]) for k, a, b in pair_spans), head[table_start:])
            if got != metadata[HEADER_CRC_KEY]:
                raise IntegrityError(
                    f"{path}: checksum mismatch in the GGUF header (metadata or tensor table: crc32 {got:#010x}, "
                    f"written {int(metadata[HEADER_CRC_KEY]):#010x}); the file is corrupt: write it again")
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment % 8:
        raise CheckpointError(f"{path}: general.alignment={alignment!r} is invalid (a positive multiple of 8)")
    data_offset = -(-header_end // alignment) * alignment
    crcs = metadata.get(CRC_KEY)
    if crcs is not None and metadata.get(CRC_LAYOUT_KEY) != _layout_crc(infos):
        crcs = None  # rewritten by another tool: the list describes other bytes
    if crcs is not None and len(crcs) != len(infos):
        raise CheckpointError(f"{path}: {CRC_KEY} has {len(crcs)} entries for {len(infos)} tensors; the file is corrupt")
    slice_crcs = metadata.get(SLICE_CRC_KEY) if crcs is not None else None
    n_slices = sum(sh[0] for _, sh, _, _ in infos if len(sh) == 3)
    if slice_crcs is not None and len(slice_crcs) != n_slices:
        raise CheckpointError(f"{path}: {SLICE_CRC_KEY} has {len(slice_crcs)} entries for {n_slices} slices; the file is corrupt")
    slice_pos = 0
    tensors: dict[str, GGUFTensor] = {}
    unsupported: dict[str, str] = {}
    spans: list[tuple[int, int, str]] = []
    for i, (name, shape, gtype, rel) in enumerate(infos):
        if name in tensors or name in unsupported:
            raise CheckpointError(f"{path}: tensor {name!r} appears twice; the GGUF header is corrupt")
        if any(d <= 0 for d in shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {list(shape)}; the GGUF header is corrupt")
        try:
            info = type_info(gtype)
        except ValueError:
            unsupported[name] = GGMLType(gtype).name if gtype in GGMLType._value2member_map_ else f"type id {gtype}"
            continue
        try:
            nbytes = info.nbytes(shape)
        except ValueError:
            raise CheckpointError(
                f"{path}: tensor {name!r} of shape {list(shape)} cannot be {info.ggml_type.name} "
                f"(rows must hold multiples of {info.block_size}); the GGUF header is corrupt") from None
        if rel % alignment:
            raise CheckpointError(f"{path}: tensor {name!r} starts at offset {rel}, not a multiple of the alignment {alignment}")
        start = data_offset + rel
        if start + nbytes > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ends at byte {start + nbytes} but the file has {size} bytes; "
                "the GGUF file is truncated (download it again)")
        spans.append((start, start + nbytes, name))
        slices = None
        if len(shape) == 3:
            if slice_crcs is not None:
                slices = tuple(int(c) for c in slice_crcs[slice_pos: slice_pos + shape[0]])
            slice_pos += shape[0]
        tensors[name] = GGUFTensor(name, shape, info.ggml_type, path, start, nbytes,
                                   int(crcs[i]) if crcs is not None else None, slices)
    spans.sort()
    for (s0, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} and {n1!r} overlap; the GGUF header is corrupt")
    return GGUFFile(path, version, metadata, tensors, data_offset, size, unsupported)


# --------------------------------------------------------------------------- writing
def _pack_value(value: Any, vtype: int | None = None) -> tuple[int, bytes]:
    """(value type, encoded bytes) of a metadata value; Python types pick GGUF types."""
    if vtype is None:
        if isinstance(value, bool):
            vtype = ValueType.BOOL
        elif isinstance(value, int):
            vtype = ValueType.UINT32 if 0 <= value < 1 << 32 else ValueType.INT64
        elif isinstance(value, float):
            vtype = ValueType.FLOAT32
        elif isinstance(value, str):
            vtype = ValueType.STRING
        elif isinstance(value, (list, tuple, np.ndarray)):
            vtype = ValueType.ARRAY
        else:
            raise TypeError(f"cannot store {type(value).__name__} in GGUF metadata")
    if vtype == ValueType.STRING:
        raw = value.encode("utf-8", errors="surrogateescape")
        return vtype, struct.pack("<Q", len(raw)) + raw
    if vtype == ValueType.ARRAY:
        if isinstance(value, np.ndarray):
            codes = {np.dtype(v[1]).str: k for k, v in _SCALAR.items() if k != ValueType.BOOL}
            etype = codes[value.dtype.newbyteorder("<").str if value.dtype.byteorder == ">" else value.dtype.str]
            return vtype, struct.pack("<IQ", etype, len(value)) + np.ascontiguousarray(value, value.dtype.newbyteorder("<")).tobytes()
        items = list(value)
        etype = _pack_value(items[0])[0] if items else ValueType.UINT32
        body = b"".join(_pack_value(v, etype)[1] for v in items)
        return vtype, struct.pack("<IQ", etype, len(items)) + body
    return vtype, struct.pack(_SCALAR[vtype][0], value)


@dataclass(frozen=True, slots=True)
class TensorToWrite:
    """A tensor for :func:`write_gguf`: its logical ``shape``, type, and a callable returning its
    bytes (called once, in file order, so a writer holds one tensor at a time)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLType
    data: Callable[[], bytes | np.ndarray]


def write_gguf(out: str | os.PathLike[str], metadata: dict[str, Any], tensors: Iterable[TensorToWrite],
               metadata_types: dict[str, int] | None = None, force: bool = False,
               alignment: int = DEFAULT_ALIGNMENT, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a GGUF v3 file at ``out`` (to ``out.tmp-*`` then renamed; an existing ``out`` is an
    error unless ``force``). ``metadata_types`` overrides the GGUF type of a key's value (e.g.
    ``ValueType.INT32`` for token types). The crc32 of each tensor's bytes goes into
    ``flashtier.tensor_crc32``. Returns the path written."""
    out = Path(out)
    if out.exists() and not force:
        raise CheckpointError(f"{out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise CheckpointError(f"{out.parent} is not a folder; create it first")
    tensors = list(tensors)
    types = metadata_types or {}
    sizes = [type_info(t.ggml_type).nbytes(t.shape) for t in tensors]
    offsets, pos = [], 0
    for n in sizes:
        offsets.append(pos)
        pos += -(-n // alignment) * alignment
    meta = {k: v for k, v in metadata.items() if k not in (CRC_KEY, CRC_LAYOUT_KEY, HEADER_CRC_KEY, FILE_SIZE_KEY)}
    meta["general.alignment"] = alignment
    meta[CRC_LAYOUT_KEY] = _layout_crc([(t.name, tuple(t.shape), int(t.ggml_type), off) for t, off in zip(tensors, offsets)])
    # Placeholder crc list of the right size: the header's length must not change when it is filled.
    meta[CRC_KEY] = np.zeros(len(tensors), dtype="<u4")
    n_slices = sum(t.shape[0] for t in tensors if len(t.shape) == 3)
    if n_slices:
        meta[SLICE_CRC_KEY] = np.zeros(n_slices, dtype="<u4")
    types = {**types, FILE_SIZE_KEY: ValueType.UINT64, HEADER_CRC_KEY: ValueType.UINT32}  # fixed widths
    meta[FILE_SIZE_KEY] = 0
    meta[HEADER_CRC_KEY] = 0
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")  # one per writer, threads too

    def header() -> bytes:
        prefix = MAGIC + struct.pack("<IQQ", 3, len(tensors), len(meta))
        pairs = []
        for k, v in meta.items():
            vt, raw = _pack_value(v, types.get(k))
            pairs.append((k, _pack_value(k, ValueType.STRING)[1] + struct.pack("<I", vt) + raw))
        table = bytearray()
        for t, off in zip(tensors, offsets):
            table += _pack_value(t.name, ValueType.STRING)[1] + struct.pack("<I", len(t.shape))
            table += b"".join(struct.pack("<Q", d) for d in reversed(t.shape))
            table += struct.pack("<IQ", int(t.ggml_type), off)
        meta[HEADER_CRC_KEY] = _header_crc(prefix, pairs, bytes(table))
        pairs = [(k, raw) if k != HEADER_CRC_KEY else
                 (k, _pack_value(k, ValueType.STRING)[1] + struct.pack("<II", ValueType.UINT32, meta[k]))
                 for k, raw in pairs]
        buf = bytearray(prefix) + b"".join(raw for _, raw in pairs) + table
        buf += b"\0" * (-len(buf) % alignment)
        return bytes(buf)

    meta[FILE_SIZE_KEY] = len(header()) + pos  # the header's length does not depend on the value
    try:
        with open(tmp, "wb") as f:
            head = header()
            f.write(head)
            crcs = np.zeros(len(tensors), dtype="<u4")
            slice_crcs: list[int] = []
            for i, (t, n) in enumerate(zip(tensors, sizes)):
                data = t.data()
                raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
                if len(raw) != n:
                    raise CheckpointError(f"tensor {t.name!r}: {len(raw)} bytes for a {t.ggml_type.name} {list(t.shape)} tensor of {n} bytes")
                crcs[i] = zlib.crc32(raw)
                if len(t.shape) == 3:
                    step = n // t.shape[0]
                    slice_crcs += [zlib.crc32(raw[k * step:(k + 1) * step]) for k in range(t.shape[0])]
                f.write(raw)
                f.write(b"\0" * (-n % alignment))
                if progress is not None:
                    progress(i + 1, len(tensors))
            meta[CRC_KEY] = crcs
            if n_slices:
                meta[SLICE_CRC_KEY] = np.asarray(slice_crcs, dtype="<u4")
            f.seek(0)
            head2 = header()
            assert len(head2) == len(head)
            f.write(head2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{out}: cannot write the GGUF file: {e.strerror or e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def iter_tensor_names(g: GGUFFile) -> Iterator[str]:
    """Tensor names in file order (supported and unsupported)."""
    yield from g.tensors
    yield from g.unsupported
