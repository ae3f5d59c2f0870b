"""Arguments shared by several CLI commands (budgets, model folder) and small output helpers."""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flashtier.errors import CheckpointError, ConfigError, StorageError

PACKAGE_DIR = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = PACKAGE_DIR / "models" / "tiny-moe-16k"


def add_model_arg(p: argparse.ArgumentParser, optional: bool = True) -> None:
    if optional:
        p.add_argument("model_dir", nargs="?", default=None,
                       help=f"Hugging Face model folder or GGUF file (default: the shipped tiny-moe-16k, {DEFAULT_MODEL})")
    else:
        p.add_argument("model_dir", help="Hugging Face model folder (config.json + *.safetensors) or GGUF file")


def resolve_model_dir(value: str | None) -> Path:
    if value is not None:
        return Path(value)
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise CheckpointError(f"no model folder given and the default model {DEFAULT_MODEL} is missing; pass MODEL_DIR")
    return DEFAULT_MODEL


from flashtier.apps.engine_flags import (  # noqa: E402,F401  (the engine's flags live there; re-exported)
    VERIFIED_RECORD,
    add_attention_args,
    add_budget_args,
    add_engine_args,
    add_sparse_ffn_args,
    attention_options,
    engine_options,
    sparse_ffn_options,
)


def progress(label: str) -> Any:
    """A callback ``(done, total)`` drawing a one-line progress bar on stderr (only on a terminal)."""
    tty = sys.stderr.isatty()

    def cb(done: int, total: int) -> None:
        if not tty:
            return
        width = 30
        filled = int(width * done / max(total, 1))
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return cb


def refuse_gguf(path: str, command: str, why: str) -> None:
    """CheckpointError when ``path`` is a GGUF file (or a folder holding one and no config.json):
    ``command`` works on Hugging Face safetensors folders only, for the reason ``why``."""
    p = Path(path)
    is_gguf = p.suffix.lower() == ".gguf" or (p.is_dir() and not (p / "config.json").exists()
                                              and any(p.glob("*.gguf")))
    if is_gguf:
        raise CheckpointError(f"{path}: flashtier {command} works on Hugging Face safetensors folders, not GGUF files "
                              f"({why})")


@contextmanager
def staged_output_dir(out: str | os.PathLike[str], force: bool, source: str | os.PathLike[str] | None = None
                      ) -> Iterator[Path]:
    """A folder to write ``out`` into: a temporary sibling, renamed to ``out`` when the block
    succeeds and removed when it fails (disk full included), so ``out`` is never left partial.
    An existing non-empty ``out`` is replaced only with ``force`` (the old one is removed after the
    new one is in place); a file, or the ``source`` folder itself, is always refused. OS errors
    become one-line StorageErrors naming the path.

    Concurrent writers of the same ``out`` (threads or processes) each stage into a sibling of
    their own: the last to finish wins with ``force``; without it, the later one is refused as if
    ``out`` had existed when it started. Either way ``out`` ends as one complete folder and no
    ``.partial-*`` / ``.old-*`` sibling is left."""
    out = Path(out)
    if source is not None and out.resolve() == Path(source).resolve():
        raise ConfigError(f"the output folder {out} is the input folder; write into a new folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} exists and is not empty; pass --force to replace it, or choose another folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # unique per writer (pid alone is shared by the threads of one process)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()  # (not mkdtemp: the output keeps the umask's permissions, not 0700)
    except OSError as e:
        raise StorageError(f"cannot create {out}: {e.strerror or e}; check that {out.parent} is writable") from e
    try:
        yield tmp
        _move_into_place(tmp, out, force)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(f"writing {out} failed: {e.strerror or e}; nothing was written (the partial output was "
                           "removed)") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished folder ``tmp`` to ``out``. An absent or empty ``out`` is replaced in one
    rename. A non-empty one (there at the start, or written meanwhile by another writer) is moved
    aside to a unique ``.old-*`` sibling and removed once ``tmp`` is in place (restored if that
    rename fails), with ``force``; without it, ConfigError."""
    for _ in range(16):  # each retry means another writer replaced ``out`` in between
        try:
            os.rename(tmp, out)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if not force:
            raise ConfigError(f"{out} was written by another run while this one worked (it is not empty now); "
                              "pass --force to replace it, or choose another folder")
        old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            os.rename(out, old)
        except FileNotFoundError:
            continue  # another writer moved it aside first
        try:
            os.rename(tmp, out)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # another writer's folder went in between
                shutil.rmtree(old, ignore_errors=True)
                continue
            if not out.exists():
                os.rename(old, out)  # put the previous folder back
            else:
                shutil.rmtree(old, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    raise StorageError(f"{out} kept being replaced by other writers while this run tried to put its output in place; "
                       "nothing was written: run one conversion at a time")
