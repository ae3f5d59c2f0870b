"""A disk that fills up midway: every command that writes fails with one line naming the path and
leaves nothing partial behind (its output is written to a temporary sibling and renamed at the end).

The full disk is real: a small tmpfs mounted for the test (root in a container that allows it;
the tests skip elsewhere), not a monkeypatched write."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
MODELS = ROOT / "models"


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of a given size (``small_disk(size)`` returns its folder); unmounted after."""
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
        where.mkdir()
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or 'not permitted'})")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def flashtier(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashtier", *args], capture_output=True, text=True, cwd=ROOT)


def assert_one_line_disk_full(p: subprocess.CompletedProcess, path: Path) -> None:
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert "No space left on device" in lines[-1] and str(path) in lines[-1], p.stderr


@pytest.mark.parametrize("command", ["make-model", "convert", "quantize"])
def test_a_full_disk_leaves_no_output(small_disk, command):
    disk = small_disk("256k")
    out = disk / ("out.gguf" if command == "quantize" else "out")
    args = {"make-model": ["make-model", str(out), "--preset", "tiny-mixtral"],
            "convert": ["convert", str(MODELS / "tiny-moe"), str(out)],
            "quantize": ["quantize", str(MODELS / "tiny-moe"), str(out), "--type", "q8_0"]}[command]
    p = flashtier(*args)
    assert_one_line_disk_full(p, disk)
    assert list(disk.iterdir()) == []  # no output, no temporary sibling


def test_a_full_disk_during_compress_keeps_the_model_usable(small_disk):
    disk = small_disk("15m")
    model = Path(shutil.copytree(MODELS / "tiny-dense", disk / "m"))  # 14 MB of 15: the copy cannot fit
    before = sorted(q.name for q in model.iterdir())
    p = flashtier("compress", str(model))
    assert_one_line_disk_full(p, model)
    # No manifest: a half-written copy is never used; the model's own files are untouched.
    assert not (model / "flashtier-compressed" / "manifest.json").exists()
    assert sorted(q.name for q in model.iterdir() if q.name != "flashtier-compressed") == [
        n for n in before if n != "flashtier-compressed"]
    g = flashtier("generate", str(model), "--prompt", "hi", "--max-new-tokens", "2", "--greedy",
                  "--dram-budget", "12M")
    assert g.returncode == 0, g.stderr


def test_a_full_disk_under_kv_spill_is_one_error(small_disk):
    disk = small_disk("64k")
    prompt = "hello world " * 1500
    p = flashtier("generate", str(MODELS / "tiny-moe-16k"), "--prompt", prompt, "--max-new-tokens", "2",
                  "--attention", "retrieval", "--kv-dram-budget", "16M", "--kv-spill-dir", str(disk))
    assert_one_line_disk_full(p, disk)
    assert list(disk.iterdir()) == []  # the run's spill folder is removed
