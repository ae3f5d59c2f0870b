"""Expert extents: where each MoE expert's bytes rest, and the converted layout that makes each
expert one aligned, contiguous, checksummed extent.

``flashtier convert MODEL_DIR OUT_DIR`` (:func:`convert_experts`) rewrites a Mixtral / Qwen2-MoE
checkpoint so that expert ``e`` of layer ``i`` -- its gate (w1), up (w3) and down (w2) matrices in that
order -- is one extent starting at a 4 KiB-aligned file offset: one O_DIRECT read per expert, read
straight into the cache slot and viewed there without a copy. The output is still a Hugging Face
folder that transformers and flashtier load: safetensors shards (+ index), the config and tokenizer
files copied. Every data section starts aligned (the JSON header is padded with spaces, as the
format allows); where an extent's length is not a multiple of the alignment, a small padding tensor
``flashtier.pad.N`` fills the gap (the format forbids holes; readers ignore these tensors).
``flashtier_experts.json`` (the manifest) lists every extent: file, offset, length, crc32, and the
tensors in it with their offsets inside the extent; and the crc32 of every other tensor
(``tensor_crc32``), which :class:`~flashtier.checkpoint.folder.Checkpoint` attaches to the
tensors so every read of them (resident load, streamed page, ``verify``) is checked.

:func:`expert_layout` gives every expert's extents for a checkpoint:
  * a converted folder: one extent per expert, from the manifest, checked against the safetensors
    headers when the model is opened -- an extent that disagrees (moved, resized, misaligned, past
    the end of its file) is refused with IntegrityError naming the file. Checksums are verified on
    each extent's first read (:class:`~flashtier.storage_backends.checksummed.ChecksummedBackend`)
    or all at once by :func:`verify_checksums`.
  * an original folder: the expert's tensors as they lie, merged into one extent where they happen
    to be neighbours in one file (safetensors writers sort names, so w1/w2/w3 often are), else one
    extent per tensor (three reads per expert).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from flashtier.errors import ConfigError, IntegrityError, StorageError
from flashtier.checkpoint.folder import CONVERTED_MANIFEST, TENSOR_CRC_KEY, Checkpoint, layer_names, read_tensor
from flashtier.checkpoint.config import ModelConfig
from flashtier.storage_backends.aligned import align_up
from flashtier.storage_backends.atomic import crc32, crc32_of_range
from flashtier.storage_backends.progress import ticker
from flashtier.storage_backends.safetensors_format import PAD_TENSOR_PREFIX, TensorInfo

MANIFEST_NAME = CONVERTED_MANIFEST
FORMAT = "flashtier-expert-extents"
VERSION = 1
ALIGNMENT = 4096
"""Extent alignment of converted files: the O_DIRECT and host-slab alignment."""
TENSOR_ALIGNMENT = 64
"""Alignment of the other tensors' data in converted files."""

ExpertKey = tuple[int, int]
"""(layer, expert)."""


@dataclass(frozen=True, slots=True)
class ExtentPart:
    """One tensor inside an extent, ``offset`` bytes from the extent's start."""

    offset: int
    info: TensorInfo


@dataclass(frozen=True, slots=True)
class ExpertExtent:
    """A contiguous byte range of one file holding one or more of an expert's tensors."""

    path: str
    offset: int
    length: int
    parts: tuple[ExtentPart, ...]
    crc32: int | None = None
    """Checksum of the extent's bytes (converted layouts), None when unknown."""


@dataclass(frozen=True, slots=True)
class ExpertLayout:
    """Every expert's extents: ``experts[(layer, e)]``, and which kind of folder they come from."""

    kind: str
    """'converted' (one checksummed extent per expert, from the manifest) or 'original'."""
    experts: dict[ExpertKey, tuple[ExpertExtent, ...]]
    manifest: Path | None = None

    def checksums(self) -> dict[tuple[str, int, int], tuple[int, str]]:
        """``(path, offset, length) -> (crc32, label)`` of the checksummed extents."""
        return {(x.path, x.offset, x.length): (x.crc32, f"expert {e} of layer {layer}")
                for (layer, e), extents in self.experts.items() for x in extents if x.crc32 is not None}

    def reads_per_expert(self) -> float:
        return sum(len(x) for x in self.experts.values()) / max(len(self.experts), 1)


def expert_names(cfg: ModelConfig) -> dict[ExpertKey, tuple[str, str, str]]:
    """``(layer, e) -> (gate, up, down)`` tensor names of every routed expert."""
    out: dict[ExpertKey, tuple[str, str, str]] = {}
    for i in range(cfg.num_layers):
        n = layer_names(cfg, i)
        if n.router:
            for e in range(cfg.num_experts):
                out[(i, e)] = n.expert(e)
    return out


# ------------------------------------------------------------------------------------- reading
def expert_layout(checkpoint: Checkpoint) -> ExpertLayout:
    """The extents of every expert of ``checkpoint`` (see the module docstring)."""
    manifest = checkpoint.model_dir / MANIFEST_NAME
    if manifest.is_file():
        return _converted_layout(checkpoint, manifest)
    return _original_layout(checkpoint)


def _original_layout(checkpoint: Checkpoint) -> ExpertLayout:
    experts: dict[ExpertKey, tuple[ExpertExtent, ...]] = {}
    for key, names in expert_names(checkpoint.config).items():
        infos = sorted((checkpoint.tensors[n] for n in names), key=lambda t: (str(t.path), t.offset))
        runs: list[list[TensorInfo]] = []
        for info in infos:
            last = runs[-1][-1] if runs else None
            if last is not None and last.path == info.path and last.offset + last.nbytes == info.offset:
                runs[-1].append(info)
            else:
                runs.append([info])
        # parts in (gate, up, down) order inside the extent they belong to
        experts[key] = tuple(
            ExpertExtent(str(run[0].path), run[0].offset, sum(t.nbytes for t in run),
                         tuple(ExtentPart(t.offset - run[0].offset, t) for t in run),
                         run[0].crc32 if len(run) == 1 else None)  # a GGUF expert slice's crc32
            for run in runs)
    return ExpertLayout("original", experts)


def _converted_layout(checkpoint: Checkpoint, manifest: Path) -> ExpertLayout:
    try:
        doc = json.loads(manifest.read_text())
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise IntegrityError(f"{manifest}: not a version-{VERSION} {FORMAT} manifest")
        alignment = int(doc["alignment"])
        entries = list(doc["experts"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise IntegrityError(f"{manifest}: unreadable expert manifest ({e}); convert the checkpoint again") from e
    wanted = expert_names(checkpoint.config)
    experts: dict[ExpertKey, tuple[ExpertExtent, ...]] = {}
    sizes: dict[Path, int] = {}
    for entry in entries:
        try:
            key = (int(entry["layer"]), int(entry["expert"]))
            path = checkpoint.model_dir / str(entry["file"])
            offset, length, checksum = int(entry["offset"]), int(entry["length"]), int(entry["crc32"])
            tensors = {str(k): int(v) for k, v in dict(entry["tensors"]).items()}
        except (KeyError, TypeError, ValueError) as e:
            raise IntegrityError(f"{manifest}: malformed expert entry {entry!r} ({e})") from e
        names = wanted.get(key)
        where = f"expert {key[1]} of layer {key[0]}"
        if names is None or set(tensors) != set(names):
            raise IntegrityError(f"{manifest}: the entry for {where} names tensors {sorted(tensors)}, the model "
                                 f"expects {sorted(names or ())}; convert the checkpoint again")
        if path not in sizes:
            try:
                sizes[path] = path.stat().st_size
            except OSError as e:
                raise IntegrityError(f"{path}: named by {manifest.name} but cannot be read ({e.strerror})") from e
        parts = []
        for name in names:
            info = checkpoint.tensors[name]
            rel = tensors[name]
            problem = ""
            if info.path.resolve() != path.resolve():
                problem = f"tensor {name!r} is in {info.path.name}, not in this file"
            elif info.offset != offset + rel:
                problem = f"tensor {name!r} starts at byte {info.offset}, the manifest says {offset + rel}"
            elif rel < 0 or rel + info.nbytes > length:
                problem = f"tensor {name!r} ({info.nbytes} bytes at +{rel}) does not lie inside the extent of {length} bytes"
            elif offset % alignment:
                problem = f"the extent at byte {offset} is not aligned to {alignment} bytes"
            elif offset + length > sizes[path]:
                problem = f"the extent [{offset}, {offset + length}) runs past the end of the file ({sizes[path]} bytes)"
            if problem:
                raise IntegrityError(
                    f"{path}: {where} disagrees with {manifest.name}: {problem}; the folder was modified "
                    "after conversion: convert the original checkpoint again, or use the original")
            parts.append(ExtentPart(rel, info))
        if sum(x.info.nbytes for x in parts) != length:
            raise IntegrityError(
                f"{path}: {where} disagrees with {manifest.name}: the extent is {length} bytes, its tensors "
                f"{sum(x.info.nbytes for x in parts)}; convert the original checkpoint again, or use the original")
        experts[key] = (ExpertExtent(str(path), offset, length, tuple(parts), checksum),)
    missing = sorted(set(wanted) - set(experts))
    if missing:
        layer, e = missing[0]
        raise IntegrityError(f"{manifest}: no extent for expert {e} of layer {layer} ({len(missing)} missing); "
                             "convert the checkpoint again")
    return ExpertLayout("converted", experts, manifest)


def verify_checksums(model_dir: str | os.PathLike[str], progress: Callable[[int, int], None] | None = None) -> int:
    """Read every extent of a converted folder and check its crc32; IntegrityError naming the file
    on the first mismatch. Returns the number of bytes checked."""
    layout = expert_layout(Checkpoint(model_dir))
    if layout.kind != "converted":
        raise ConfigError(f"{model_dir} has no {MANIFEST_NAME}: nothing to verify (not a converted folder)")
    checked = 0
    items = list(layout.checksums().items())
    for i, ((path, offset, length), (expected, label)) in enumerate(items):
        with open(path, "rb", buffering=0) as f:
            actual, got = crc32_of_range(f.fileno(), offset, length)
        if got != length or actual != expected:
            raise IntegrityError(f"{path}: checksum mismatch in {label} (bytes {offset}..{offset + length}): crc32 "
                                 f"is {actual:#010x}, the manifest says {expected:#010x}; convert again or use the original")
        checked += length
        if progress is not None:
            progress(i + 1, len(items))
    return checked


# ------------------------------------------------------------------------------------- writing
@dataclass(frozen=True, slots=True)
class _Item:
    """One tensor (or padding) of an output shard, at ``start`` bytes into the data section."""

    name: str
    start: int
    nbytes: int
    info: TensorInfo | None  # None: padding
    expert: ExpertKey | None = None


def _shard_items(groups: list[tuple[ExpertKey | None, list[TensorInfo]]], max_shard_bytes: int) -> list[list[_Item]]:
    """Lay groups out in shards: each expert group starts aligned to ALIGNMENT, other tensors to
    TENSOR_ALIGNMENT, gaps filled with padding tensors; a group never spans two shards."""
    shards: list[list[_Item]] = [[]]
    pos = 0
    pads = 0
    for key, infos in groups:
        size = sum(t.nbytes for t in infos)
        if shards[-1] and pos + size > max_shard_bytes:
            shards.append([])
            pos = 0
        start = align_up(pos, ALIGNMENT if key is not None else TENSOR_ALIGNMENT)
        if start > pos:
            shards[-1].append(_Item(f"{PAD_TENSOR_PREFIX}{pads}", pos, start - pos, None))
            pads += 1
        pos = start
        for info in infos:
            shards[-1].append(_Item(info.name, pos, info.nbytes, info, key))
            pos += info.nbytes
    return shards


def _header(items: list[_Item]) -> bytes:
    """The shard's header (length prefix + JSON), padded with spaces so the data starts aligned."""
    head: dict[str, object] = {"__metadata__": {"format": "pt", "flashtier_layout": f"{FORMAT}-v{VERSION}"}}
    for it in items:
        if it.info is None:
            head[it.name] = {"dtype": "U8", "shape": [it.nbytes], "data_offsets": [it.start, it.start + it.nbytes]}
        else:
            head[it.name] = {"dtype": it.info.dtype, "shape": list(it.info.shape),
                             "data_offsets": [it.start, it.start + it.nbytes]}
    raw = json.dumps(head, separators=(",", ":")).encode()
    n = align_up(8 + len(raw), ALIGNMENT) - 8
    return struct.pack("<Q", n) + raw + b" " * (n - len(raw))


def _tensor_bytes(info: TensorInfo) -> memoryview:
    t = read_tensor(info)
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _write_shard(path: Path, items: list[_Item], on_tensor: Callable[[], None], tensor_crcs: dict[str, int]
                 ) -> dict[ExpertKey, tuple[int, int, int]]:
    """Write one shard atomically; return ``(layer, e) -> (file offset, length, crc32)`` of its
    extents, and put the crc32 of every other tensor into ``tensor_crcs``."""
    header = _header(items)
    data_start = len(header)
    extents: dict[ExpertKey, tuple[int, int, int]] = {}
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            for it in items:
                data = memoryview(bytes(it.nbytes)) if it.info is None else _tensor_bytes(it.info)
                f.write(data)
                if it.expert is not None:
                    off, length, crc = extents.get(it.expert, (data_start + it.start, 0, 0))
                    extents[it.expert] = (off, length + it.nbytes, crc32(data, crc))
                elif it.info is not None:
                    tensor_crcs[it.name] = crc32(data)
                if it.info is not None:
                    on_tensor()
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"writing {path} failed: {e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return extents


def convert_experts(model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                    progress: Callable[[int, int], None] | None = None,
                    max_shard_bytes: int = 4 << 30) -> Path:
    """Write ``model_dir`` into ``out_dir`` with each expert one aligned extent, plus the manifest
    (see the module docstring). Returns ``out_dir``. The source folder is only read."""
    src, out = Path(model_dir), Path(out_dir)
    ck = Checkpoint(src)
    cfg = ck.config
    if not cfg.is_moe:
        raise ConfigError(f"{src} is a dense model ({cfg.architecture}): it has no experts to lay out; "
                          "use `flashtier convert --bundle` for neuron bundles")
    if out.resolve() == src.resolve():
        raise ConfigError(f"the output folder {out} is the input folder; convert into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    names = expert_names(cfg)
    in_experts = {n for group in names.values() for n in group}
    groups: list[tuple[ExpertKey | None, list[TensorInfo]]] = [
        (key, [ck.tensors[n] for n in group]) for key, group in sorted(names.items())]
    others = sorted((t for n, t in ck.tensors.items() if n not in in_experts), key=lambda t: (str(t.path), t.offset))
    groups += [(None, [t]) for t in others]
    shards = _shard_items(groups, max_shard_bytes)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)])

    for old in list(out.glob("*.safetensors")) + [out / "model.safetensors.index.json", out / MANIFEST_NAME]:
        old.unlink(missing_ok=True)  # a stale manifest must never describe the new files
    tick = ticker(len(ck.tensors), progress)

    entries = []
    tensor_crcs: dict[str, int] = {}
    for fname, items in zip(files, shards):
        extents = _write_shard(out / fname, items, tick, tensor_crcs)
        for key, (offset, length, checksum) in sorted(extents.items()):
            first = min(it.start for it in items if it.expert == key)
            parts = {it.name: it.start - first for it in items if it.expert == key}
            entries.append({"layer": key[0], "expert": key[1], "file": fname, "offset": offset, "length": length,
                            "crc32": checksum, "tensors": parts})
    if len(files) > 1:
        weight_map = {it.name: f for f, items in zip(files, shards) for it in items if it.info is not None}
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(t.nbytes for t in ck.tensors.values())}, "weight_map": weight_map}, indent=2))
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name not in (
                "model.safetensors.index.json", MANIFEST_NAME) and not p.name.startswith("."):
            shutil.copy2(p, out / p.name)
    manifest = {"format": FORMAT, "version": VERSION, "alignment": ALIGNMENT, "source": str(src.resolve()),
                "experts": entries, TENSOR_CRC_KEY: dict(sorted(tensor_crcs.items()))}
    tmp = out / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST_NAME)  # written last: a folder with a manifest is complete
    return out
