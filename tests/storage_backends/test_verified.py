"""The record of one-time integrity checks: a second load of unchanged files skips them, any change
to a file (even one that restores its mtime) runs them again, and a broken record is never an
error, only a repeated check."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flashtier.errors import IntegrityError
from flashtier.runtime.engine import EngineConfig, Model
from flashtier.storage_backends.verified import VerifiedRecord

MODEL = Path(__file__).parents[2] / "models" / "tiny-moe"


def test_mark_then_verified_until_the_file_changes(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 100)
    record = VerifiedRecord(tmp_path / "rec" / "verified.json")
    assert not record.verified("crc", [f])
    record.mark("crc", [f])
    assert record.verified("crc", [f]) and not record.verified("other check", [f])
    assert VerifiedRecord(tmp_path / "rec" / "verified.json").verified("crc", [f])  # persisted
    st = f.stat()
    f.write_bytes(b"b" * 100)  # same size, then the old mtime put back: ctime still differs
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert not record.verified("crc", [f])


def test_a_replaced_or_missing_file_is_not_verified(tmp_path):
    f, g = tmp_path / "f", tmp_path / "g"
    f.write_bytes(b"x" * 10)
    g.write_bytes(b"x" * 10)
    record = VerifiedRecord(tmp_path / "v.json")
    record.mark("crc", [f, g])
    os.replace(tmp_path / "g", tmp_path / "moved")
    shutil.copy(tmp_path / "moved", g)  # same bytes, another inode
    assert not record.verified("crc", [f, g])
    g.unlink()
    assert not record.verified("crc", [f, g])


@pytest.mark.parametrize("damage", ["garbage", "crc", "version", "directory"])
def test_a_broken_record_counts_as_empty_and_is_never_an_error(tmp_path, damage):
    f = tmp_path / "f"
    f.write_bytes(b"x")
    path = tmp_path / "v.json"
    VerifiedRecord(path).mark("crc", [f])
    if damage == "garbage":
        path.write_bytes(b"\x00{not json")
    elif damage == "crc":
        doc = json.loads(path.read_text())
        doc["crc32"] ^= 1
        path.write_text(json.dumps(doc))
    elif damage == "version":
        doc = json.loads(path.read_text())
        doc["version"] = 999
        path.write_text(json.dumps(doc))
    else:
        path.unlink()
        path.mkdir()  # cannot be read nor replaced
    record = VerifiedRecord(path)
    assert not record.verified("crc", [f])
    record.mark("crc", [f])  # no exception
    assert record.verified("crc", [f]) == (damage != "directory")


def test_no_record_remembers_nothing(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"x")
    record = VerifiedRecord(None)
    record.mark("crc", [f])
    assert not record.verified("crc", [f])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("verified") / "converted"
    p = subprocess.run([sys.executable, "-m", "flashtier", "convert", str(MODEL), str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return out


def test_a_second_resident_load_skips_the_extent_check_until_a_file_changes(converted, tmp_path, monkeypatch):
    from flashtier.checkpoint import expert_layout

    calls = []
    real = expert_layout.verify_checksums
    monkeypatch.setattr(expert_layout, "verify_checksums", lambda folder, *a, **k: calls.append(folder) or real(folder))
    folder = Path(shutil.copytree(converted, tmp_path / "c"))
    config = EngineConfig(verified_record=str(tmp_path / "verified.json"))
    for _ in range(2):
        Model(folder, config).close()
    assert len(calls) == 1
    Model(folder).close()  # without a record: checked every time
    assert len(calls) == 2
    entry = json.loads((folder / "flashtier_experts.json").read_text())["experts"][0]
    with open(folder / entry["file"], "r+b") as f:  # one flipped bit: the file's stamp changes
        f.seek(entry["offset"] + 5)
        b = f.read(1)
        f.seek(entry["offset"] + 5)
        f.write(bytes([b[0] ^ 4]))
    with pytest.raises(IntegrityError, match=f"expert {entry['expert']} of layer {entry['layer']}"):
        Model(folder, config)
    assert len(calls) == 3


def test_a_second_paged_open_skips_the_embedding_check(tmp_path, monkeypatch):
    from flashtier.runtime.weights import paged as paged_weights

    from flashtier.checkpoint.make_model import PRESETS, MakeModelSpec, write_model

    src = write_model(tmp_path / "src", MakeModelSpec({**PRESETS["tiny-llama"], "vocab_size": 32000}, "float32"))
    gguf = tmp_path / "m.gguf"
    p = subprocess.run([sys.executable, "-m", "flashtier", "quantize", str(src), str(gguf), "--type", "q8_0"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    calls = []
    real = paged_weights._verify_extent
    monkeypatch.setattr(paged_weights, "_verify_extent", lambda fd, info: calls.append(info.name) or real(fd, info))
    # 8 MiB: the 2.1 MB Q8_0 embedding table is paged (rows read one by one), so it is checked at open
    config = EngineConfig(dram_budget=8 << 20, max_context=256, verified_record=str(tmp_path / "v.json"))
    for _ in range(2):
        Model(gguf, config).close()
    assert calls == ["model.embed_tokens.weight"]
