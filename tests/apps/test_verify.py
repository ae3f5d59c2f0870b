"""``flashtier verify MODEL``: every crc32 flashtier wrote and the finiteness of every weight, on
an original folder, a converted folder, a compressed copy and a GGUF file flashtier wrote; each
corruption is one line naming the file, exit 1."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MODEL = Path(__file__).parents[2] / "models" / "tiny-moe"


def flashtier(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashtier", *args], capture_output=True, text=True)


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def assert_refused(p: subprocess.CompletedProcess, *words: str) -> None:
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    for w in words:
        assert w in p.stderr, p.stderr


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    converted = root / "converted"
    assert flashtier("convert", str(MODEL), str(converted)).returncode == 0
    compressed = shutil.copytree(MODEL, root / "compressed")
    assert flashtier("compress", str(compressed)).returncode == 0
    gguf = root / "m.gguf"
    assert flashtier("quantize", str(MODEL), str(gguf), "--type", "q8_0").returncode == 0
    return root, converted, compressed, gguf


def test_clean_models_verify(folders):
    _, converted, compressed, gguf = folders
    for target, line in [(MODEL, "all weights finite"), (converted, "expert extents ok"),
                         (compressed, "compressed copy ok"), (gguf, "188 tensor crc32s checked")]:
        p = flashtier("verify", str(target))
        assert p.returncode == 0 and line in p.stdout, p.stdout + p.stderr


def test_an_exponent_flip_in_an_original_checkpoint_is_found(tmp_path):
    import safetensors.torch as st

    bad = shutil.copytree(MODEL, tmp_path / "bad")
    tensors = st.load_file(bad / "model.safetensors")
    name = "model.layers.1.mlp.experts.3.down_proj.weight" if any("experts.3.down" in n for n in tensors) else \
        sorted(tensors)[5]
    tensors[name].view(-1)[7] = float("inf")
    st.save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    assert_refused(flashtier("verify", str(bad)), "NaN / infinite", name)


def test_corrupted_files_flashtier_wrote_are_found(folders, tmp_path):
    root, converted, compressed, gguf = folders
    conv = shutil.copytree(converted, tmp_path / "conv")
    entry = json.loads((conv / "flashtier_experts.json").read_text())["experts"][0]
    flip(conv / "model.safetensors", entry["offset"] + 50)
    assert_refused(flashtier("verify", str(conv)), "checksum mismatch")
    g = tmp_path / "g.gguf"
    shutil.copy(gguf, g)
    flip(g, g.stat().st_size - 100)
    assert_refused(flashtier("verify", str(g)), "crc32")
    comp = shutil.copytree(compressed, tmp_path / "comp")
    side = next(p for p in comp.rglob("*") if p.is_file() and p.parent != comp and p.suffix != ".json")
    flip(side, side.stat().st_size // 2)
    assert_refused(flashtier("verify", str(comp)), "crc32")
