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
DEFAULT_MODEL = PACKAGE_DIR / "models" / "tiny-moe"


def add_model_arg(p: argparse.ArgumentParser, optional: bool = True) -> None:
    if optional:
        p.add_argument("model_dir", nargs="?", default=None,
                       help=f"Hugging Face model folder or GGUF file (default: the shipped tiny-moe, {DEFAULT_MODEL})")
    else:
        p.add_argument("model_dir", help="Hugging Face model folder (config.json + *.safetensors) or GGUF file")


def resolve_model_dir(value: str | None) -> Path:
    if value is not None:
        return Path(value)
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise CheckpointError(f"no model folder given and the default model {DEFAULT_MODEL} is missing; pass MODEL_DIR")
    return DEFAULT_MODEL


def add_budget_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("memory budgets")
    g.add_argument("--dram-budget", default=None, metavar="BYTES",
                   help="host memory for weights, e.g. 1G or 700M (default: everything resident)")
    g.add_argument("--device-budget", default=None, metavar="BYTES",
                   help="accelerator memory, e.g. 24G (default: none)")
    g.add_argument("--max-context", type=int, default=None, metavar="TOKENS",
                   help="most tokens per request; the KV cache is budgeted for it (default: model context, 4096 with a budget)")
    g.add_argument("--device", default=None, metavar="DEVICE",
                   help="where the forward pass runs: cpu (default), or cuda / cuda:N with every weight and the KV "
                        "cache on that GPU (not with --dram-budget or --attention retrieval yet)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for the model (default: torch's choice)")
    g.add_argument("--compute-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype to compute in (default: the checkpoint's, which keeps outputs exact)")
    g.add_argument("--fast-matvec", default=None, choices=["auto", "on", "off"],
                   help="flashtier's bf16 kernel for single-token products (2x torch's): the C extension's when "
                        "built, else numba's (~120 MiB of RSS). auto (default): the C kernel always; numba only "
                        "without --dram-budget. off: torch's")
    g.add_argument("--activations", default=None, choices=["f32", "q8"],
                   help="GGUF decode products: f32 (default) multiplies the exact activations; q8 quantizes them "
                        "to int8 per 32 values as llama.cpp does (faster with AVX-512 VNNI; an approximation)")
    g.add_argument("--compressed", default=None, choices=["auto", "on", "off"],
                   help="with --dram-budget, stream weights from the lossless compressed copy written by "
                        "`flashtier compress` (~0.67x the bytes from storage, same outputs). auto (default): when it exists")
    e = p.add_argument_group("MoE experts (with --dram-budget)")
    e.add_argument("--expert-policy", default=None, help="eviction policy of the per-layer expert caches "
                   "(least-stale, lru, lfu, lrfu, cost, mru; default least-stale)")
    e.add_argument("--expert-predictor", default=None, choices=["auto", "router", "affinity", "off"],
                   help="next-layer expert prediction (default auto: router or inter-layer affinity, per layer)")
    e.add_argument("--expert-widen", type=int, default=None, metavar="M",
                   help="prefetch the top-(k+M) predicted experts where the cache has room (default 0)")
    e.add_argument("--expert-slots", type=int, default=None, metavar="N",
                   help="experts cached per MoE layer (default: what the budget leaves)")
    e.add_argument("--expert-gate", default=None, choices=["on", "off"],
                   help="issue a predicted expert only when the measured cost model says it pays (default on)")
    e.add_argument("--expert-verify", default=None, choices=["first-read", "always", "off"],
                   help="crc32 of converted expert extents: on each extent's first read (default), every read, or off")
    e.add_argument("--reverify", action="store_true",
                   help="run the one-time integrity checks at open (converted expert extents before a resident load, "
                        "a paged embedding table, FFN bundle files) even if they passed on these unchanged files before "
                        f"(recorded in {VERIFIED_RECORD})")


RETRIEVAL_OPTIONS = ("retrieval_preset", "sink_tokens", "window", "top_k_keys", "kv_index", "scan_budget",
                     "scan_max_keys", "estimate_rest", "check_attention", "kv_dram_budget", "kv_spill_dir", "kv_quant_bits",
                     "kv_quant_group")
"""Flags of :func:`add_attention_args` passed to the engine as ``EngineConfig.extra`` entries."""


def add_attention_args(p: argparse.ArgumentParser) -> None:
    """Long-context flags: attention mode and the retrieval attention options."""
    g = p.add_argument_group("long context (retrieval attention)")
    g.add_argument("--attention", choices=["full", "retrieval"], default=None,
                   help="full: exact attention over an in-memory KV cache (default); retrieval: KV paged "
                        "device -> host -> storage, exact prefill, decode attends to sinks + window + top-k "
                        "keys retrieved from an index")
    g.add_argument("--retrieval-preset", choices=["fast", "balanced", "quality"], default=None,
                   help="starting point for the options below (default balanced): fast = clusters of 16 keys under "
                        "super-clusters, 1%% of keys scanned, no estimate; balanced = clusters of 4 keys under "
                        "super-clusters, 4.5%% scanned up to 1024 keys, unretrieved attention estimated; quality = "
                        "clusters of 2 keys, every centroid scored (closest to full attention; step cost grows with "
                        "the context)")
    g.add_argument("--sink-tokens", type=int, default=None, metavar="N",
                   help="first positions always attended exactly (default 4)")
    g.add_argument("--window", type=int, default=None, metavar="N",
                   help="most recent positions always attended exactly (default 256)")
    g.add_argument("--top-k-keys", type=int, default=None, metavar="K",
                   help="offloaded keys retrieved per query head at each decode step (default 100)")
    g.add_argument("--kv-index", default=None, metavar="NAME",
                   help="key index: cluster (attention-aware, default), ivf (faiss), flat (exact, scans all keys)")
    g.add_argument("--scan-budget", type=float, default=None, metavar="FRACTION",
                   help="share of the offloaded keys an index may score per search (default: the preset's, 0.045)")
    g.add_argument("--scan-max-keys", type=int, default=None, metavar="N",
                   help="but at most N keys per search, so a decode step's work stops growing with the context "
                        "(cluster index; default: the preset's, 1024 for balanced)")
    g.add_argument("--estimate-rest", action=argparse.BooleanOptionalAction, default=None,
                   help="estimate the attention on offloaded keys not retrieved from the index's clusters "
                        "(centroid + mean value; cluster index only; default: the preset's)")
    g.add_argument("--check-attention", type=int, nargs="?", const=1, default=None, metavar="N",
                   help="every N-th decode step (default 1), compare the attended keys with exact attention "
                        "and report attention_mass_recall / attention_mass_covered (costs a full attention pass)")
    g.add_argument("--kv-dram-budget", default=None, metavar="BYTES",
                   help="host memory for KV blocks that left the window plus their key indexes, e.g. 8G; blocks "
                        "over it spill to storage (default: unlimited; --dram-budget is for weights)")
    g.add_argument("--kv-spill-dir", default=None, metavar="DIR",
                   help="folder for KV spill files (default: the system temp folder)")
    g.add_argument("--kv-quant-bits", type=int, choices=[2, 4, 8], default=None,
                   help="keep KV that left the window (host tier, spill files) KIVI-quantised: keys per channel, "
                        "values per token (2.7x fewer bytes at 4 bits, 4x at 2; default: exact)")
    g.add_argument("--kv-quant-group", type=int, default=None, metavar="N",
                   help="KIVI group: tokens per key group, channels per value group; divides the KV block size and "
                        "the head dim (default 32, or the smaller of those)")


def attention_options(args: argparse.Namespace) -> dict[str, Any]:
    """``attention`` and the retrieval options given on the command line (refused without
    ``--attention retrieval``, where they would be ignored)."""
    opts: dict[str, Any] = {}
    if getattr(args, "attention", None) is not None:
        opts["attention"] = args.attention
    retrieval = {key: getattr(args, key) for key in RETRIEVAL_OPTIONS if getattr(args, key, None) is not None}
    if retrieval and opts.get("attention") != "retrieval":
        flags = ", ".join("--" + k.replace("_", "-") for k in retrieval)
        raise ConfigError(f"{flags} only apply with --attention retrieval")
    return {**opts, **retrieval}


VERIFIED_RECORD = Path.home() / ".cache" / "flashtier" / "verified.json"
"""Where the CLI records the one-time integrity checks that passed (``EngineConfig.verified_record``)."""


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for key in ("dram_budget", "device_budget", "compute_dtype", "max_context", "threads", "device", "activations",
                "expert_policy", "expert_predictor", "expert_widen", "expert_slots", "expert_gate", "expert_verify",
                "compressed"):
        value = getattr(args, key, None)
        if value is not None:
            opts[key] = value
    if getattr(args, "fast_matvec", None) in ("on", "off"):  # "auto" = the engine's default (None)
        opts["fast_matvec"] = args.fast_matvec == "on"
    opts.update(attention_options(args))
    if hasattr(args, "reverify") and not args.reverify:
        opts["verified_record"] = str(VERIFIED_RECORD)
    if opts.get("dram_budget") is not None:  # a budget this process cannot hold: refused / warned now
        from flashtier.runtime.units import parse_bytes
        from flashtier.runtime.memory_limit import check_budget, memory_limit

        warning = check_budget(parse_bytes(opts["dram_budget"]), memory_limit())
        if warning:
            print(warning, file=sys.stderr)
    return opts


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
