"""Compressed side files of a checkpoint: what ``flashtier compress MODEL_DIR`` writes and reads.

The checkpoint folder stays exactly as it was (a Hugging Face folder every tool can load); the
compressed copy of its weights lives beside it in ``MODEL_DIR/flashtier-compressed/``:

  * ``<shard>.ftz`` per ``<shard>.safetensors``: the shard's tensors, in file order, cut into
    *segments* of at most ``SEGMENT_BYTES`` (so a tensor's pieces are read and decoded in a
    pipeline, with small buffers), each stored by a lossless codec
    (:mod:`~flashtier.storage_backends.weight_codec`): ``split16`` for 16-bit tensors that shrink,
    ``raw`` otherwise.
  * ``manifest.json`` (written last, atomically: a folder with a manifest is complete): per shard
    its size and the crc32 of its header (a shard changed after compression makes the manifest
    stale, which is refused with a clear error), and per segment
    ``[offset, length, codec, stored_offset, stored_length, crc32 of the stored bytes]``.

A read of ``length`` bytes at ``offset`` of a shard is served from the side file when the range is
exactly a run of whole, consecutive segments (a tensor, or an expert's neighbouring tensors):
one read of their stored records, decoded into place. Other ranges read the shard itself.
"""

from __future__ import annotations

import bisect
import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from flashtier.errors import CheckpointError, ConfigError, IntegrityError
from flashtier.storage_backends.atomic import crc32, write_atomic
from flashtier.storage_backends.progress import ticker
from flashtier.storage_backends.safetensors_format import TensorInfo, read_header
from flashtier.storage_backends.weight_codec import RAW, SPLIT16, encode

DIR_NAME = "flashtier-compressed"
MANIFEST_NAME = "manifest.json"
FORMAT = "flashtier-compressed-weights"
VERSION = 1
SEGMENT_BYTES = 4 << 20
"""Largest segment (bytes of the original): 4 MiB keeps the decode buffers small and cache-warm."""
MIN_GAIN = 0.9
"""A 16-bit tensor is stored compressed only when its record is below this share of its bytes."""


@dataclass(frozen=True, slots=True)
class Segment:
    """One tensor of a shard and where its record is stored."""

    offset: int
    """Absolute offset of the tensor's first byte in the shard."""
    length: int
    codec: str
    stored_offset: int
    """Offset of the record in the side file."""
    stored_length: int
    crc: int
    """crc32 of the stored record."""

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class CompressedShard:
    """The side file of one shard and its segments, sorted by offset."""

    shard: str
    """Absolute path of the original ``.safetensors`` shard."""
    side_file: str
    segments: tuple[Segment, ...]

    starts: tuple[int, ...] = field(init=False)
    """``offset`` of each segment (for the lookup; derived)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "starts", tuple(s.offset for s in self.segments))

    def run(self, offset: int, length: int) -> tuple[Segment, ...] | None:
        """The consecutive segments that make up exactly ``[offset, offset + length)``, or None."""
        i = bisect.bisect_left(self.starts, offset)
        if length <= 0 or i == len(self.starts) or self.starts[i] != offset:
            return None
        end = offset + length
        for j in range(i, len(self.segments)):
            seg = self.segments[j]
            if seg.end == end:
                return self.segments[i: j + 1]
            if seg.end > end or j + 1 == len(self.segments) or self.segments[j + 1].offset != seg.end:
                return None
        return None


@dataclass(frozen=True, slots=True)
class CompressedIndex:
    """Every compressed shard of a checkpoint, by the shard's absolute path."""

    folder: str
    shards: dict[str, CompressedShard]

    def stored_fraction(self) -> float:
        """Stored bytes / original bytes over all segments."""
        stored = sum(s.stored_length for sh in self.shards.values() for s in sh.segments)
        original = sum(s.length for sh in self.shards.values() for s in sh.segments)
        return stored / original if original else 1.0


def side_folder(model_dir: str | os.PathLike[str]) -> Path:
    return Path(model_dir) / DIR_NAME


def _shards(model_dir: Path) -> list[Path]:
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{model_dir}: no .safetensors files to compress")
    return shards


def _header_fingerprint(path: Path) -> tuple[int, int]:
    """(file size, crc32 of the 8-byte length and the header): changes when the shard does."""
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head)
        return path.stat().st_size, crc32(f.read(n), crc32(head))


def compress_checkpoint(model_dir: str | os.PathLike[str],
                        progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``MODEL_DIR/flashtier-compressed`` (module docstring); returns the folder. The shards
    are only read. An existing compressed folder is replaced (its manifest is removed first, so a
    crash leaves no manifest describing half-written files)."""
    src = Path(model_dir)
    shards = _shards(src)
    out = side_folder(src)
    try:
        out.mkdir(exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {out} ({e.strerror or e}): the model folder must be writable to "
                          "hold its compressed copy") from e
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    infos = [sorted(read_header(p)[0].values(), key=lambda t: t.offset) for p in shards]
    tick = ticker(sum(len(t) for t in infos), progress)

    files = {}
    for shard, tensors in zip(shards, infos):
        segments: list[list[object]] = []
        side = out / (shard.name[: -len(".safetensors")] + ".ftz")
        write_atomic(str(side), _records(shard, tensors, segments, tick))
        size, header_crc = _header_fingerprint(shard)
        files[shard.name] = {"side_file": side.name, "size": size, "header_crc32": header_crc, "segments": segments}
    manifest = {"format": FORMAT, "version": VERSION, "files": files}
    write_atomic(str(out / MANIFEST_NAME), [json.dumps(manifest).encode()])
    return out


def _records(shard: Path, tensors: list[TensorInfo], segments: list[list[object]],
             tick: Callable[[], None]) -> Iterator[bytes]:
    """The stored records of ``shard``'s ``tensors`` (in file order), one segment at a time, so a
    shard of any size is compressed in one segment's memory; each record's manifest entry
    ``[offset, length, codec, stored_offset, stored_length, crc32]`` is appended to ``segments``
    as it is produced, and ``tick`` is called after each tensor."""
    pos = 0
    with open(shard, "rb") as f:
        for info in tensors:
            compressible = info.itemsize == 2 and info.nbytes >= 4096
            f.seek(info.offset)
            for start in range(0, info.nbytes, SEGMENT_BYTES):  # a 0-byte tensor has no segment
                want = min(SEGMENT_BYTES, info.nbytes - start)
                piece = f.read(want)
                if len(piece) != want:
                    raise CheckpointError(f"{shard}: tensor {info.name} is truncated ({start + len(piece)} of "
                                          f"{info.nbytes} bytes)")
                codec, rec = RAW, piece
                if compressible and len(piece) % 2 == 0:
                    packed = encode(piece, SPLIT16)
                    if len(packed) < MIN_GAIN * len(piece):
                        codec, rec = SPLIT16, packed
                segments.append([info.offset + start, len(piece), codec, pos, len(rec), crc32(rec)])
                pos += len(rec)
                yield rec
            tick()


def load_index(model_dir: str | os.PathLike[str]) -> CompressedIndex | None:
    """The compressed index of ``model_dir``, or None when it has no compressed folder. A manifest
    that is unreadable, of another format, stale (a shard changed since compression) or that
    disagrees with its side files raises IntegrityError naming the file and what to do."""
    src = Path(model_dir).resolve()
    folder = side_folder(src)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.exists():
        return None
    fix = f"run `flashtier compress {src}` again, or run with --compressed off"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        why = (e.strerror or e) if isinstance(e, OSError) else e
        raise IntegrityError(f"{manifest_path}: cannot read the manifest ({why}); {fix}") from e
    except ValueError as e:  # JSONDecodeError: a truncated or garbled manifest
        raise IntegrityError(f"{manifest_path}: malformed manifest ({e!r}); {fix}") from e
    if not isinstance(manifest, dict):
        raise IntegrityError(f"{manifest_path}: malformed manifest (not a JSON object); {fix}")
    try:
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise IntegrityError(f"{manifest_path}: not a version-{VERSION} {FORMAT} manifest; {fix}")
        shards: dict[str, CompressedShard] = {}
        for name, entry in manifest["files"].items():
            shard = src / name
            if not shard.exists():
                raise IntegrityError(f"{manifest_path}: describes {name}, which is not in {src}; {fix}")
            if _header_fingerprint(shard) != (entry["size"], entry["header_crc32"]):
                raise IntegrityError(f"{shard} changed after it was compressed (size or header differ from "
                                     f"{manifest_path}); {fix}")
            side = folder / entry["side_file"]
            segments = tuple(Segment(int(a), int(b), str(c), int(d), int(e), int(f))
                             for a, b, c, d, e, f in entry["segments"])
            stored = sum(s.stored_length for s in segments)
            if not side.is_file() or side.stat().st_size != stored:
                have = side.stat().st_size if side.is_file() else "missing" if not side.exists() else "not a file"
                raise IntegrityError(f"{side}: size {have}, the manifest says {stored} bytes; {fix}")
            shards[str(shard)] = CompressedShard(str(shard), str(side), segments)
    except (KeyError, TypeError, ValueError) as e:
        raise IntegrityError(f"{manifest_path}: malformed manifest ({e!r}); {fix}") from e
    if set(shards) != {str(p.resolve()) for p in _shards(src)}:
        raise IntegrityError(f"{manifest_path}: does not list every .safetensors shard of {src}; {fix}")
    return CompressedIndex(str(folder), shards)
