"""Row-column bundled FFN layout ("LLM in a flash"): one contiguous, aligned extent per neuron.

For dense FFN layer ``l`` and neuron ``i`` the *bundle* is ``gate[i, :] | up[i, :] | down[:, i]``
(``3 * H`` values in the checkpoint's dtype), so all a neuron needs is one read. Neuron ``i`` of
layer ``l`` sits at offset ``i * stride`` of ``ffn_bundles/layer_LLL.bin``; ``stride`` is the
bundle size rounded up to ``SECTOR`` (512 bytes, the smallest O_DIRECT unit), so bundles of
adjacent neurons are adjacent on disk and a run of them is one read straight into consecutive rows
of a preallocated matrix (no copy).

``layout="split"`` (for ablations only) stores the same bytes as three per-layer regions (all gate
rows, all up rows, all down columns): a neuron then costs three reads.

The manifest (``ffn_bundles/manifest.json``) records the layout, offsets, dtype, shapes, crc32 of
every ``CHUNK_BYTES`` piece of every layer file, and a fingerprint of the source model (sha256 of
its ``config.json`` and crc32 of the leading bytes of every FFN tensor). :func:`open_bundles`
refuses a manifest of another model (:class:`~flashtier.errors.CheckpointError`) and, with
``verify=True``, a corrupted layer file (:class:`~flashtier.errors.IntegrityError`), naming the
file. :class:`BundleReader` turns a sorted set of neurons into coalesced reads of adjacent runs,
issued at once on IO threads (``storage_backends/batched_reads.py``, at the measured queue depth).

``convert_bundled`` writes a complete, loadable Hugging Face folder: the source safetensors are
hard-linked (copied across filesystems), the other small files copied, and the bundles added.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from flashtier.errors import CheckpointError, ConfigError, IntegrityError
from flashtier.checkpoint.folder import Checkpoint, layer_names, read_tensor
from flashtier.storage_backends.aligned import align_up, allocate_aligned
from flashtier.storage_backends.atomic import write_atomic
from flashtier.storage_backends.batched_reads import Batch, BatchedReadConfig, BatchedReader
from flashtier.storage_backends.safetensors_format import TensorInfo
from flashtier.storage_backends.verified import VerifiedRecord

BUNDLE_DIR = "ffn_bundles"
MANIFEST = "manifest.json"
FORMAT = "flashtier-ffn-bundles"
VERSION = 1
SECTOR = 512
"""Bundle strides and region offsets are multiples of this (the smallest O_DIRECT block)."""
CHUNK_BYTES = 1 << 20
"""Each layer file is checksummed in pieces of this many bytes."""
FINGERPRINT_PROBE_BYTES = 1 << 16
"""Leading bytes of each FFN tensor whose crc32 identifies the source model."""
PARTS = ("gate", "up", "down")

Layout = Literal["bundled", "split"]


# ---------------------------------------------------------------------------------- manifest
@dataclass(frozen=True, slots=True)
class LayerBundles:
    """Where layer ``layer``'s neurons are. For ``bundled`` a neuron's bundle is at
    ``offsets[0] + i * stride``; for ``split`` part p of neuron i is at ``offsets[p] + i * stride``."""

    layer: int
    file: str
    """Path relative to the model folder."""
    neurons: int
    stride: int
    """Bytes between neurons (bundled: the padded bundle; split: one padded part row)."""
    offsets: tuple[int, ...]
    """Region starts: one for bundled, one per part (gate, up, down) for split."""
    file_bytes: int
    chunk_crc32: tuple[int, ...]
    """crc32 of each CHUNK_BYTES piece of the file (the last may be shorter)."""


@dataclass(frozen=True, slots=True)
class BundleManifest:
    """Everything a reader needs to trust and address the bundles (``manifest.json``)."""

    layout: Layout
    dtype: str
    """Safetensors dtype name of the values (F32 / F16 / BF16)."""
    hidden_size: int
    intermediate_size: int
    parts: tuple[str, ...]
    """Order of the pieces inside a bundle."""
    bundle_bytes: int
    """Useful bytes per neuron (``len(parts) * hidden_size * itemsize``)."""
    fingerprint: dict[str, object]
    layers: tuple[LayerBundles, ...]

    def layer(self, i: int) -> LayerBundles:
        for info in self.layers:
            if info.layer == i:
                return info
        raise CheckpointError(f"{BUNDLE_DIR}/{MANIFEST} has no bundles for layer {i}; re-run `flashtier convert --bundle`")

    def as_json(self) -> dict[str, object]:
        d = asdict(self)
        d.update(format=FORMAT, version=VERSION)
        return d

    @classmethod
    def from_json(cls, data: dict, where: str) -> BundleManifest:
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise CheckpointError(
                f"{where}: not a flashtier bundle manifest of version {VERSION} "
                f"(format={data.get('format')!r}, version={data.get('version')!r}); re-run `flashtier convert --bundle`")
        try:
            layers = tuple(LayerBundles(**{**x, "offsets": tuple(x["offsets"]), "chunk_crc32": tuple(x["chunk_crc32"])})
                           for x in data["layers"])
            return cls(layout=data["layout"], dtype=data["dtype"], hidden_size=int(data["hidden_size"]),
                       intermediate_size=int(data["intermediate_size"]), parts=tuple(data["parts"]),
                       bundle_bytes=int(data["bundle_bytes"]), fingerprint=dict(data["fingerprint"]), layers=layers)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: malformed bundle manifest ({e!r}); re-run `flashtier convert --bundle`") from e


def config_sha256(model_dir: Path) -> str:
    """sha256 of ``config.json`` with keys sorted (formatting does not matter)."""
    try:
        data = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{model_dir / 'config.json'}: cannot read ({e})") from e
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _probe_crc(info: TensorInfo) -> int:
    n = min(info.nbytes, FINGERPRINT_PROBE_BYTES)
    with open(info.path, "rb", buffering=0) as f:
        data = os.pread(f.fileno(), n, info.offset)
        os.posix_fadvise(f.fileno(), info.offset, n, os.POSIX_FADV_DONTNEED)
    return zlib.crc32(data) & 0xFFFFFFFF


def model_fingerprint(checkpoint: Checkpoint) -> dict[str, object]:
    """Identifies the weights bundles were made from: config hash + crc32 of each FFN tensor's
    leading bytes (cheap to recompute at load: 64 KiB per tensor)."""
    probes = {}
    for i in sparse_ffn_layers(checkpoint):
        n = layer_names(checkpoint.config, i)
        for name in (n.gate, n.up, n.down):
            probes[name] = _probe_crc(checkpoint.tensors[name])
    return {"config_sha256": config_sha256(checkpoint.model_dir), "tensor_probe_crc32": probes}


def sparse_ffn_layers(checkpoint: Checkpoint) -> list[int]:
    """Layers with a dense (gated) FFN: the ones that can be bundled."""
    cfg = checkpoint.config
    return [i for i in range(cfg.num_layers) if layer_names(cfg, i).gate]


# ---------------------------------------------------------------------------------- writing
def bundle_rows(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, stride: int) -> np.ndarray:
    """The bundled bytes of one layer: ``[I, stride]`` uint8, row i = gate[i] | up[i] | down[:, i]
    (then zero padding). ``gate``/``up`` ``[I, H]``, ``down`` ``[H, I]``, one dtype."""
    rows = torch.cat([gate, up, down.t()], dim=1).contiguous()  # [I, 3H]
    raw = rows.view(torch.uint8).numpy()  # [I, 3H * itemsize]
    out = np.zeros((rows.shape[0], stride), dtype=np.uint8)
    out[:, : raw.shape[1]] = raw
    return out


def _split_regions(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> tuple[np.ndarray, tuple[int, ...], int]:
    """The split layout of one layer: three regions of ``[I, stride]`` rows (gate rows, up rows,
    down columns), each row padded to a sector so every read stays exact under O_DIRECT."""
    parts = [t.contiguous().view(torch.uint8).numpy() for t in (gate, up, down.t().contiguous())]
    stride = align_up(parts[0].shape[1], SECTOR)
    region = parts[0].shape[0] * stride
    data = np.zeros(len(parts) * region, dtype=np.uint8)
    for k, p in enumerate(parts):
        data[k * region : (k + 1) * region].reshape(-1, stride)[:, : p.shape[1]] = p
    return data, tuple(k * region for k in range(len(parts))), stride


def _chunk_crcs(data: np.ndarray) -> tuple[int, ...]:
    flat = data.reshape(-1)
    return tuple(zlib.crc32(flat[o : o + CHUNK_BYTES]) & 0xFFFFFFFF for o in range(0, flat.size, CHUNK_BYTES))


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def convert_bundled(model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, layout: Layout = "bundled",
                    progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``out_dir``: ``model_dir``'s files plus the FFN bundles and their manifest.

    ``out_dir`` may equal ``model_dir`` (bundles are then added in place). Layer files are written
    atomically and the manifest last, so an interrupted conversion leaves no manifest that lies.
    """
    if layout not in ("bundled", "split"):
        raise ConfigError(f"bundle layout must be 'bundled' or 'split', got {layout!r}")
    src, out = Path(model_dir), Path(out_dir)
    ckpt = Checkpoint(src)
    layers = sparse_ffn_layers(ckpt)
    if not layers:
        raise ConfigError(f"{src}: no dense FFN layers to bundle (MoE experts use `flashtier convert` without --bundle)")
    out.mkdir(parents=True, exist_ok=True)
    if src.resolve() != out.resolve():
        for f in sorted(src.iterdir()):
            if f.is_file():
                _link_or_copy(f, out / f.name)
    bdir = out / BUNDLE_DIR
    bdir.mkdir(exist_ok=True)
    (bdir / MANIFEST).unlink(missing_ok=True)  # no stale manifest while layer files change

    cfg = ckpt.config
    first = layer_names(cfg, layers[0])
    dtype_name = ckpt.tensors[first.gate].dtype
    itemsize = {"F32": 4, "F16": 2, "BF16": 2}[dtype_name]
    bundle_bytes = len(PARTS) * cfg.hidden_size * itemsize
    infos = []
    for k, i in enumerate(layers):
        n = layer_names(cfg, i)
        if {ckpt.tensors[x].dtype for x in (n.gate, n.up, n.down)} != {dtype_name}:
            raise CheckpointError(f"{src}: layer {i}'s FFN tensors are not all {dtype_name}; bundles need one dtype")
        gate, up, down = (read_tensor(ckpt.tensors[x]) for x in (n.gate, n.up, n.down))
        rel = f"{BUNDLE_DIR}/layer_{i:03d}.bin"
        if layout == "bundled":
            stride = align_up(bundle_bytes, SECTOR)
            data = bundle_rows(gate, up, down, stride)
            chunks, offsets = [data.reshape(-1)], (0,)
        else:
            data, offsets, stride = _split_regions(gate, up, down)
            chunks = [data]
        write_atomic(str(out / rel), [memoryview(c) for c in chunks])
        infos.append(LayerBundles(layer=i, file=rel, neurons=gate.shape[0], stride=stride, offsets=offsets,
                                  file_bytes=int(data.size), chunk_crc32=_chunk_crcs(data)))
        if progress is not None:
            progress(k + 1, len(layers))
    manifest = BundleManifest(layout=layout, dtype=dtype_name, hidden_size=cfg.hidden_size,
                              intermediate_size=cfg.intermediate_size, parts=PARTS, bundle_bytes=bundle_bytes,
                              fingerprint={**model_fingerprint(ckpt), "created": time.time()}, layers=tuple(infos))
    write_atomic(str(bdir / MANIFEST), [json.dumps(manifest.as_json(), indent=1).encode()])
    return out


# ---------------------------------------------------------------------------------- opening
def open_bundles(checkpoint: Checkpoint, *, verify: bool = True, record: VerifiedRecord | None = None) -> BundleManifest:
    """The manifest of ``checkpoint``'s bundles, checked against the model and (``verify``) against
    the layer files' checksums (skipped for a file ``record`` says passed and is unchanged). Raises CheckpointError (missing, other model, wrong shapes or
    sizes) or IntegrityError (corrupted layer file), naming the file and what to do."""
    path = checkpoint.model_dir / BUNDLE_DIR / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"{checkpoint.model_dir} has no FFN bundles ({BUNDLE_DIR}/{MANIFEST}); write them with "
            f"`flashtier convert {checkpoint.model_dir} OUT_DIR --bundle` and run OUT_DIR")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable bundle manifest ({e}); re-run `flashtier convert --bundle`") from e
    manifest = BundleManifest.from_json(data, str(path))
    _check_model(manifest, checkpoint, path)
    for info in manifest.layers:
        file = checkpoint.model_dir / info.file
        try:
            size = file.stat().st_size
        except OSError as e:
            raise CheckpointError(f"{file}: bundle file named in {path.name} is missing ({e.strerror}); "
                                  "re-run `flashtier convert --bundle`") from e
        if size != info.file_bytes:
            raise IntegrityError(f"{file}: {size} bytes, the manifest says {info.file_bytes}; the bundle file is "
                                 "truncated or from another conversion: re-run `flashtier convert --bundle`")
        if verify and not (record and record.verified("ffn-bundle", [file, path])):
            verify_layer_file(file, info)
            if record:
                record.mark("ffn-bundle", [file, path])
    return manifest


def _check_model(manifest: BundleManifest, checkpoint: Checkpoint, path: Path) -> None:
    cfg = checkpoint.config
    fp = manifest.fingerprint
    fix = "these bundles were made from another model: re-run `flashtier convert --bundle` on this one"
    if fp.get("config_sha256") != config_sha256(checkpoint.model_dir):
        raise CheckpointError(f"{path}: config.json of {checkpoint.model_dir} does not match the manifest's; {fix}")
    if (manifest.hidden_size, manifest.intermediate_size) != (cfg.hidden_size, cfg.intermediate_size):
        raise CheckpointError(f"{path}: bundles are for hidden {manifest.hidden_size} x intermediate "
                              f"{manifest.intermediate_size}, the model has {cfg.hidden_size} x {cfg.intermediate_size}; {fix}")
    probes = fp.get("tensor_probe_crc32")
    if not isinstance(probes, dict):
        raise CheckpointError(f"{path}: manifest has no tensor fingerprint; re-run `flashtier convert --bundle`")
    for name, crc in probes.items():
        info = checkpoint.tensors.get(name)
        if info is None or _probe_crc(info) != crc:
            raise CheckpointError(f"{path}: tensor {name!r} of {checkpoint.model_dir} differs from the one the bundles "
                                  f"were made from; {fix}")
    want = set(sparse_ffn_layers(checkpoint))
    have = {x.layer for x in manifest.layers}
    if want != have:
        raise CheckpointError(f"{path}: bundles cover layers {sorted(have)}, the model's dense FFN layers are {sorted(want)}; {fix}")


def verify_layer_file(file: Path, info: LayerBundles) -> None:
    """crc32 of every chunk of ``file`` against the manifest; IntegrityError naming the chunk."""
    with open(file, "rb", buffering=0) as f:
        fd = f.fileno()
        for k, want in enumerate(info.chunk_crc32):
            data = os.pread(fd, CHUNK_BYTES, k * CHUNK_BYTES)
            got = zlib.crc32(data) & 0xFFFFFFFF
            if got != want:
                raise IntegrityError(
                    f"{file}: checksum mismatch in bytes {k * CHUNK_BYTES}..{k * CHUNK_BYTES + len(data)} "
                    f"(crc32 {got:#010x}, manifest {want:#010x}); the bundle file is corrupt: "
                    "re-run `flashtier convert --bundle`")
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


# ---------------------------------------------------------------------------------- reading
def choose_alignment(path: str) -> int:
    """``SECTOR`` if ``path``'s filesystem takes O_DIRECT reads at ``SECTOR`` granularity (offset,
    length and address), else 4096 (reads then cover aligned supersets through bounce buffers, or
    the backend falls back to buffered reads where O_DIRECT is unsupported)."""
    import errno
    import mmap

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return 4096
        raise CheckpointError(f"cannot open {path}: {e.strerror}") from e
    buf = mmap.mmap(-1, 2 * SECTOR)
    try:
        os.preadv(fd, [memoryview(buf)[SECTOR:]], SECTOR)
        return SECTOR
    except OSError as e:
        if e.errno == errno.EINVAL:
            return 4096
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from e
    finally:
        os.close(fd)
        buf.close()


def neuron_runs(neurons: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive ids in sorted ``neurons``: ``(first_neuron, position, length)``
    where ``position`` is the index of the run's first element in ``neurons``."""
    if neurons.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(neurons) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [neurons.size]))
    return [(int(neurons[s]), int(s), int(e - s)) for s, e in zip(starts, ends)]


@dataclass
class PendingRead:
    """Reads in flight for one ``BundleReader.submit``; ``wait()`` completes them (and, for the
    split layout, copies the parts into place)."""

    batch: Batch
    finish: Callable[[], None] | None
    nbytes: int
    """Bytes read (every read is exact: offsets, lengths and rows are sector multiples)."""
    runs: int
    """Reads issued."""

    def wait(self) -> float:
        """Block until every read is done (raises the first StorageError); returns the seconds
        from submission to completion."""
        seconds = self.batch.wait()
        if self.finish is not None:
            self.finish()
        return seconds


class BundleReader:
    """Reads the bundles of sets of neurons into rows of caller-owned uint8 matrices.

    Reads go through a :class:`~flashtier.storage_backends.batched_reads.BatchedReader`: O_DIRECT
    when the filesystem takes ``SECTOR``-granular reads (``choose_alignment``), else buffered reads
    dropped from the page cache."""

    def __init__(self, model_dir: Path, manifest: BundleManifest, config: BatchedReadConfig = BatchedReadConfig()) -> None:
        self.manifest = manifest
        self._paths = {info.layer: str(model_dir / info.file) for info in manifest.layers}
        self._infos = {info.layer: info for info in manifest.layers}
        self.alignment = choose_alignment(next(iter(self._paths.values())))
        self.io = BatchedReader(config, direct=self.alignment == SECTOR)

    @property
    def row_bytes(self) -> int:
        """Bytes per neuron row of a destination matrix (the bundled stride)."""
        return align_up(self.manifest.bundle_bytes, SECTOR)

    def submit(self, layer: int, neurons: np.ndarray, dest: np.ndarray, *, background: bool = False) -> PendingRead:
        """Start reading the bundles of ``neurons`` (sorted, unique) into ``dest`` ``[len, row_bytes]``
        uint8, row k <- neuron ``neurons[k]``. One read per run of adjacent neurons (bundled layout)
        or per run and part (split); all are issued at once, in up to the queue depth's parallel
        groups (``background``: all on IO threads, returning at once; else the caller reads one
        group itself). ``dest`` must be sector-aligned at row 0 (e.g. rows of a ``RowMatrix``),
        stay alive and stay untouched until ``wait()`` returns."""
        info = self._infos[layer]
        path = self._paths[layer]
        m = neurons.size
        if dest.shape != (m, self.row_bytes) or dest.dtype != np.uint8 or not dest.flags.c_contiguous:
            raise ValueError(f"dest must be a C-contiguous uint8 array of shape ({m}, {self.row_bytes}), got "
                             f"{dest.dtype} {dest.shape}")
        runs = neuron_runs(neurons)
        if self.manifest.layout == "bundled":
            offsets = [info.offsets[0] + first * info.stride for first, _, _ in runs]
            flat = memoryview(dest).cast("B")
            row = info.stride
            views = [flat[pos * row : (pos + length) * row] for _, pos, length in runs]
            return PendingRead(self.io.submit(path, offsets, views, caller_reads=not background), None,
                               m * info.stride, len(runs))
        stride = info.stride
        part = self.manifest.bundle_bytes // len(self.manifest.parts)  # useful bytes of a part row
        staging = [allocate_aligned(m * stride) for _ in info.offsets]
        offsets, views = [], []
        for p, base in enumerate(info.offsets):
            for first, pos, length in runs:
                offsets.append(base + first * stride)
                views.append(staging[p][pos * stride : (pos + length) * stride])

        def finish() -> None:
            for p in range(len(info.offsets)):
                rows = np.frombuffer(staging[p], dtype=np.uint8).reshape(m, stride)
                dest[:, p * part : (p + 1) * part] = rows[:, :part]

        return PendingRead(self.io.submit(path, offsets, views, caller_reads=not background), finish,
                           m * stride * len(info.offsets), len(offsets))

    def close(self) -> None:
        self.io.close()


def layer_views(rows: torch.Tensor, manifest: BundleManifest, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """``(gate, up, down_t)`` views ``[n, H]`` of bundle rows ``rows`` ``[n, row_bytes]`` uint8."""
    h = manifest.hidden_size
    typed = rows.view(dtype)  # [n, row_bytes / itemsize]
    return tuple(typed[:, k * h : (k + 1) * h] for k in range(len(manifest.parts)))


def torch_dtype(manifest: BundleManifest) -> torch.dtype:
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[manifest.dtype]


__all__: Sequence[str] = (
    "BUNDLE_DIR", "MANIFEST", "BundleManifest", "BundleReader", "LayerBundles", "PendingRead", "choose_alignment",
    "convert_bundled", "model_fingerprint",
    "layer_views", "neuron_runs", "open_bundles", "sparse_ffn_layers", "torch_dtype", "verify_layer_file",
)
