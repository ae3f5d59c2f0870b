"""``flashtier verify MODEL``: check a model folder or GGUF file on demand.

Reads every tensor once (O_DIRECT-free plain reads, pages dropped after) and checks what can be
checked: the file's structure (headers, offsets, sizes), every crc32 flashtier recorded (GGUF files
it wrote: per tensor and per expert slice; converted expert extents; records of the compressed
copy), and that every weight is finite (for quantized blocks, after dequantization): an original
checkpoint carries no checksum, but a flipped exponent bit shows up as an inf or a NaN. Prints one
line per check; the first failure is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import time

from flashtier.apps.common import resolve_model_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check a model's files: checksums flashtier wrote, finite weights",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a model folder, a GGUF file, or a shipped model's name")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from flashtier.errors import IntegrityError
    from flashtier.checkpoint.folder import open_checkpoint
    from flashtier.runtime.quantized import QuantizedTensor

    target = resolve_model_dir(args.model)
    t0 = time.perf_counter()
    ck = open_checkpoint(target)
    print(f"structure      ok: {len(ck.tensors)} tensors ({type(ck).__name__})")
    checked, crc = 0, 0
    for name in sorted(ck.tensors):
        info = ck.tensors[name]
        t = ck.read_tensor(name)  # checks the tensor's recorded crc32 (GGUF files flashtier wrote)
        crc += info.crc32 is not None
        values = t.dequantize() if isinstance(t, QuantizedTensor) else t
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            bad = int((~torch.isfinite(values)).sum())
            raise IntegrityError(f"{info.path}: tensor {name!r} holds {bad} NaN / infinite value(s): the file is "
                                 "corrupt (a flipped bit?); restore it from the original download")
        checked += info.nbytes  # read_tensor dropped the pages it read
    print(f"tensors        ok: {checked / 1e6:.1f} MB read, all weights finite, {crc} tensor crc32s checked")
    folder = target if target.is_dir() else target.parent
    from flashtier.checkpoint.expert_layout import MANIFEST_NAME, verify_checksums

    if (folder / MANIFEST_NAME).exists():
        n = verify_checksums(folder)
        print(f"expert extents ok: {n / 1e6:.1f} MB, every crc32 in {MANIFEST_NAME} matches")
    from flashtier.storage_backends.atomic import crc32_of_range
    from flashtier.storage_backends.compressed_layout import load_index

    index = load_index(folder) if target.is_dir() else None  # checks the manifest against the shards
    if index is not None:
        stored = 0
        for shard in index.shards.values():
            with open(shard.side_file, "rb", buffering=0) as f:
                for seg in shard.segments:
                    crc, got = crc32_of_range(f.fileno(), seg.stored_offset, seg.stored_length)
                    if got != seg.stored_length or crc != seg.crc:
                        raise IntegrityError(f"{shard.side_file}: the record of bytes {seg.offset}..{seg.end} of "
                                             f"{shard.shard} does not match its crc32; run `flashtier compress` again")
                    stored += seg.stored_length
        print(f"compressed copy ok: {stored / 1e6:.1f} MB of records, every crc32 matches")
    print(f"verified {target} in {time.perf_counter() - t0:.1f} s")
    return 0

