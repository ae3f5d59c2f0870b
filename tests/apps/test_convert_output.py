"""``flashtier convert`` never loses data: an existing output needs --force, the output is written
into a temporary sibling and renamed at the end, and a failure midway (disk full) leaves nothing."""

from __future__ import annotations

import argparse
import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flashtier.apps.commands import convert
from flashtier.errors import ConfigError, StorageError

MODEL = Path(__file__).parents[2] / "models" / "tiny-moe"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashtier", "convert", *args], capture_output=True, text=True)


def test_existing_output_is_refused_then_replaced_with_force(tmp_path):
    dst = shutil.copytree(MODEL, tmp_path / "dst")
    before = (dst / "model.safetensors").read_bytes()
    p = cli(str(MODEL), str(dst))
    assert p.returncode == 1 and "exists and is not empty; pass --force" in p.stderr and "Traceback" not in p.stderr
    assert (dst / "model.safetensors").read_bytes() == before  # untouched
    p = cli(str(MODEL), str(dst), "--force")
    assert p.returncode == 0, p.stderr
    assert (dst / "flashtier_experts.json").is_file()
    assert [q.name for q in tmp_path.iterdir()] == ["dst"]  # no temporary sibling left


@pytest.mark.parametrize("target, message", [("file", "is a file"), ("same", "is the input folder")])
def test_a_file_or_the_input_folder_is_refused(tmp_path, target, message):
    src = shutil.copytree(MODEL, tmp_path / "src")
    out = src if target == "same" else tmp_path / "f"
    if target == "file":
        out.write_text("keep me")
    p = cli(str(src), str(out), "--force")
    assert p.returncode == 1 and message in p.stderr
    if target == "file":
        assert out.read_text() == "keep me"


def test_a_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    from flashtier.checkpoint import expert_layout

    def disk_full(src, out, progress=None):
        (Path(out) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(expert_layout, "convert_experts", disk_full)
    out = tmp_path / "out"
    with pytest.raises(StorageError, match="No space left on device; nothing was written"):
        convert.run(argparse.Namespace(model_dir=str(MODEL), out_dir=str(out), bundle=False, force=False))
    assert list(tmp_path.iterdir()) == []
    dst = shutil.copytree(MODEL, tmp_path / "dst")  # with --force, the old folder survives a failure
    with pytest.raises(StorageError):
        convert.run(argparse.Namespace(model_dir=str(MODEL), out_dir=str(dst), bundle=False, force=True))
    assert (dst / "model.safetensors").read_bytes() == (MODEL / "model.safetensors").read_bytes()
    assert sorted(q.name for q in tmp_path.iterdir()) == ["dst"]


def test_unwritable_parent_is_one_line(tmp_path):
    with pytest.raises((StorageError, ConfigError), match="cannot create"):
        convert.run(argparse.Namespace(model_dir=str(MODEL), out_dir="/proc/flashtier-out", bundle=False, force=False))
