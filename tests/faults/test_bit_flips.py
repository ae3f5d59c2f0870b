"""Fault injection: one flipped bit anywhere in the weight bytes of a file flashtier wrote (a GGUF
file it quantized, a converted folder's expert extents) is detected on every path that reads it:
`flashtier verify`, a resident load, a paged run (its first read of the page), pinned experts.
Never a silent different answer. Offsets are drawn at random per tensor (seeded)."""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flashtier.apps.commands import verify
from flashtier.errors import IntegrityError
from flashtier.runtime.engine import EngineConfig, Model

MODEL = Path(__file__).parents[2] / "models" / "tiny-moe"
PROMPT = [5, 6, 7, 8]
SEEDS = range(4)


def flip_bit(path: Path, offset: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ (1 << bit)]))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    gguf = root / "m.gguf"
    converted = root / "converted"
    for cmd in (["quantize", str(MODEL), str(gguf), "--type", "q4_k_m"], ["convert", str(MODEL), str(converted)]):
        p = subprocess.run([sys.executable, "-m", "flashtier", *cmd], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
    return gguf, converted


def gguf_target(gguf: Path, tmp: Path, seed: int) -> tuple[Path, str]:
    from flashtier.checkpoint.gguf_checkpoint import GGUFCheckpoint

    rng = random.Random(seed)
    infos = sorted(GGUFCheckpoint(gguf).tensors.values(), key=lambda t: t.name)
    info = rng.choice(infos)
    bad = tmp / "bad.gguf"
    shutil.copy(gguf, bad)
    flip_bit(bad, info.offset + rng.randrange(info.nbytes), rng.randrange(8))
    return bad, info.name


def converted_target(converted: Path, tmp: Path, seed: int) -> tuple[Path, str]:
    rng = random.Random(seed)
    bad = shutil.copytree(converted, tmp / "bad")
    entry = rng.choice(json.loads((bad / "flashtier_experts.json").read_text())["experts"])
    flip_bit(bad / entry["file"], entry["offset"] + rng.randrange(entry["length"]), rng.randrange(8))
    return bad, f"expert {entry['expert']} of layer {entry['layer']}"


def converted_other_target(converted: Path, tmp: Path, seed: int) -> tuple[Path, str]:
    """A tensor of a converted folder that is not an expert (embedding, attention, norms, router, head)."""
    from flashtier.checkpoint.folder import Checkpoint

    rng = random.Random(seed)
    infos = sorted((t for n, t in Checkpoint(converted).tensors.items()
                    if ".experts." not in n), key=lambda t: t.name)
    info = rng.choice(infos)
    bad = shutil.copytree(converted, tmp / "bad")
    flip_bit(bad / Path(info.path).name, info.offset + rng.randrange(info.nbytes), rng.randrange(8))
    return bad, info.name


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["gguf", "converted", "converted-other"])
def test_a_flipped_bit_is_detected_on_every_path(written, tmp_path, kind, seed):
    gguf, converted = written
    target = {"gguf": gguf_target, "converted": converted_target, "converted-other": converted_other_target}[kind]
    bad, what = target(gguf if kind == "gguf" else converted, tmp_path, seed)
    with pytest.raises(IntegrityError):
        verify.run(argparse.Namespace(model=str(bad)))
    with pytest.raises(IntegrityError):  # resident: every tensor read (and checked) when the model opens
        Model(bad).generate(PROMPT, max_new_tokens=2, ignore_eos=True)
    for extra in ({}, {"expert_pin": "off"}):  # paged: pinned experts at open, or each page's first read
        with pytest.raises(IntegrityError):
            with Model(bad, EngineConfig.from_options(dram_budget=16 << 20, max_context=256, **extra)) as llm:
                for _ in range(3):  # enough tokens that every expert and streamed tensor is read
                    llm.generate(list(range(1, 120)), max_new_tokens=8, ignore_eos=True)


def test_a_flip_in_the_embedding_table_is_caught_when_paged(written, tmp_path):
    """Paged runs read embedding rows one at a time (no per-read check covers a row): the table's
    crc32 is checked once when the model opens."""
    from flashtier.checkpoint.gguf_checkpoint import GGUFCheckpoint

    gguf, _ = written
    info = GGUFCheckpoint(gguf).tensors["model.embed_tokens.weight"]
    bad = tmp_path / "emb.gguf"
    shutil.copy(gguf, bad)
    flip_bit(bad, info.offset + info.nbytes // 3, 5)
    with pytest.raises(IntegrityError, match="embed_tokens"):
        Model(bad, EngineConfig(dram_budget=16 << 20, max_context=256))


@pytest.mark.parametrize("seed", SEEDS)
def test_a_flip_anywhere_in_the_gguf_header_is_never_silent(written, tmp_path, seed):
    """The header (tokenizer strings, chat template, rope and norm settings, tensor table) is under
    ``flashtier.header_crc32``: a flipped bit at a random header offset is an IntegrityError, or a
    CheckpointError when it breaks the header's structure first (a length, a type id); never a
    model that loads with a different vocabulary or setting."""
    from flashtier.checkpoint.gguf_format import read_gguf
    from flashtier.errors import CheckpointError

    gguf, _ = written
    header_end = read_gguf(gguf).data_offset
    rng = random.Random(seed)
    for _ in range(8):
        bad = tmp_path / "head.gguf"
        shutil.copy(gguf, bad)
        offset = rng.randrange(24, header_end - 32)  # past magic, version, counts; before the padding (never read)
        flip_bit(bad, offset, rng.randrange(8))
        try:
            read_gguf(bad)
        except (IntegrityError, CheckpointError):
            continue
        # Only a crc list can take a flip quietly, and it is caught when the tensor it describes is read.
        with pytest.raises(IntegrityError):
            verify.run(argparse.Namespace(model=str(bad)))
