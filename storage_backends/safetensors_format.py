"""The safetensors file format, parsed by hand so any tensor can be read in place.

A safetensors file is ``u64 little-endian header length N`` + ``N bytes of JSON`` + data. The JSON
maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` with offsets relative to
the first data byte. :func:`read_header` validates everything a reader relies on (header inside the
file, offsets inside the data, sizes consistent with shape and dtype, no overlaps) and returns
absolute file offsets, so later layers (paging, expert extents, neuron bundles) can read any byte
range of any tensor without loading the file.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flashtier.errors import CheckpointError, StorageError

if TYPE_CHECKING:
    import torch

# safetensors dtype name -> (bytes per element, torch dtype name)
DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
}

MAX_HEADER_BYTES = 100 * 1024 * 1024

PAD_TENSOR_PREFIX = "flashtier.pad."
"""Name prefix of the padding tensors that aligned layouts (expert extents) put between tensors: a
safetensors data section may not have holes. Readers of the model ignore them."""


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor's bytes live: ``path`` at absolute byte ``offset`` for ``nbytes`` bytes."""

    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute offset of the first byte in the file
    nbytes: int
    ggml_type: int | None = None
    """For a tensor of a GGUF file in a quantized block format (``dtype`` is then its name, e.g.
    "Q4_K"): the ggml type id. None for plain element types."""
    crc32: int | None = None
    """crc32 of the tensor's bytes, when the file that holds it records one."""

    @property
    def quantized(self) -> bool:
        return self.ggml_type is not None

    @property
    def torch_dtype_name(self) -> str:
        return "uint8" if self.quantized else DTYPES[self.dtype][1]

    @property
    def itemsize(self) -> int:
        return 1 if self.quantized else DTYPES[self.dtype][0]


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header.

    Returns ``(tensors by name, __metadata__)``. Raises :class:`CheckpointError` naming the file
    and the problem for a truncated file, a header that is not JSON, offsets outside the file,
    sizes that disagree with shape and dtype, or overlapping tensors.
    """
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the open forever; a device reads nothing
            raise CheckpointError(f"{path}: not a regular file ({_file_kind(st.st_mode)}); a safetensors shard must be "
                                  "a file: replace it with the downloaded or converted shard")
        file_size = st.st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: truncated safetensors file ({file_size} bytes, shorter than its "
                    "8-byte header length); re-download or re-convert the checkpoint"
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > file_size:
                raise CheckpointError(
                    f"{path}: corrupted safetensors file: header length {n} runs past the end of "
                    f"the file ({file_size} bytes); the file is truncated or not safetensors: re-download or "
                    "re-convert it"
                )
            raw = f.read(n)
    except OSError as e:
        link = " (a link to a missing file)" if isinstance(e, FileNotFoundError) and path.is_symlink() else ""
        raise CheckpointError(f"{path}: cannot read safetensors file: {e.strerror or e}{link}; restore the file from "
                              "the model's download or conversion") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupted safetensors header (not valid JSON: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header (not a JSON object)")

    data_start = 8 + n
    data_size = file_size - data_start
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_start, data_size)
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise CheckpointError(f"{path}: corrupted safetensors header: tensors {name_a!r} and {name_b!r} overlap")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a plain file"


def _tensor_info(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    try:
        dtype = entry["dtype"]  # type: ignore[index]
        shape = tuple(int(s) for s in entry["shape"])  # type: ignore[index]
        begin, end = (int(x) for x in entry["data_offsets"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupted safetensors entry for tensor {name!r}: {entry!r}") from e
    if dtype not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})")
    if begin < 0 or end < begin or end > data_size:
        raise CheckpointError(
            f"{path}: tensor {name!r} has data offsets [{begin}, {end}) outside the file's "
            f"{data_size} data bytes; the file is truncated or corrupted: re-download or re-convert it"
        )
    expected = math.prod(shape) * DTYPES[dtype][0]
    if end - begin != expected:
        raise CheckpointError(
            f"{path}: tensor {name!r} occupies {end - begin} bytes but shape {list(shape)} of "
            f"{dtype} needs {expected}; the file is corrupted"
        )
    return TensorInfo(name, dtype, shape, path, data_start + begin, end - begin)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike[str],
                     metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file at ``path`` (the caller picks a temporary name and
    renames). Any failure, a full disk included, is a StorageError naming the path: the
    safetensors library reports I/O errors as its own exception type, not OSError."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except (SafetensorError, OSError) as e:
        raise StorageError(f"writing {path} failed: {e}; check free space and that the folder is writable") from e
