"""The engine's command-line flags, generated from the typed configuration.

Every flag here is a flat option name of :meth:`EngineConfig.from_options
<flashtier.runtime.engine.EngineConfig.from_options>` (``--expert-slots`` is ``expert_slots``) and
its help is the docstring of the field it sets (``runtime/options.py``, ``EngineConfig``): one
source of truth. :data:`FLAGS` only adds what a command line needs besides that: the value's
metavar or choices, the flag's style (on/off, --x/--no-x), and old spellings kept as aliases.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from flashtier.errors import ConfigError

VERIFIED_RECORD = Path.home() / ".cache" / "flashtier" / "verified.json"
"""Where the CLI records the one-time integrity checks that passed (``EngineConfig.verified_record``)."""


@dataclass(frozen=True, slots=True)
class Flag:
    """How one flat option appears on the command line."""

    name: str
    """Flat option name (``expert_slots``); the flag is ``--expert-slots``."""
    metavar: str | None = None
    choices: tuple[Any, ...] | None = None
    style: str = "value"
    """'value' (takes a value), 'onoff' (a bool given as on / off), 'switch' (--x / --no-x),
    'store_true' (present: True), 'tristate' (auto / on / off -> None / True / False)."""
    aliases: tuple[str, ...] = ()
    """Older spellings, still accepted."""
    const: Any = None
    """A value given without an argument (``nargs='?'``)."""


GROUPS: tuple[tuple[str, tuple[Flag, ...]], ...] = (
    ("memory budgets", (
        Flag("dram_budget", metavar="BYTES"),
        Flag("device_budget", metavar="BYTES"),
        Flag("max_context", metavar="TOKENS"),
        Flag("kv_sequences", metavar="N"),
        Flag("device", metavar="DEVICE"),
        Flag("threads", metavar="N"),
        Flag("compute_dtype", choices=("float32", "bfloat16", "float16")),
        Flag("fast_matvec", style="tristate"),
        Flag("activations", choices=("f32", "f32-fma", "q8")),
        Flag("compressed", choices=("auto", "on", "off")),
        Flag("huge_pages", style="onoff"),
    )),
    ("prompt cache", (
        Flag("prompt_cache", metavar="DIR"),
        Flag("prompt_cache_budget", metavar="BYTES"),
    )),
    ("MoE experts (with --dram-budget or --device-budget)", (
        Flag("expert_cache", style="onoff"),
        Flag("expert_policy", metavar="POLICY"),
        Flag("expert_predictor", choices=("auto", "router", "affinity", "off")),
        Flag("expert_widen", metavar="M"),
        Flag("expert_slots", metavar="N"),
        Flag("expert_gate", style="onoff"),
        Flag("expert_pin", style="onoff"),
        Flag("expert_verify", choices=("first-read", "always", "off")),
        Flag("expert_device_slots", metavar="N"),
        Flag("expert_placement", choices=("auto", "gpu", "cpu")),
    )),
)

ATTENTION_GROUP: tuple[str, tuple[Flag, ...]] = ("long context (retrieval attention)", (
    Flag("retrieval_preset", choices=("fast", "balanced", "quality")),
    Flag("sink_tokens", metavar="N"),
    Flag("window", metavar="N"),
    Flag("top_k_keys", metavar="K"),
    Flag("kv_index", metavar="NAME"),
    Flag("scan_budget", metavar="FRACTION"),
    Flag("scan_max_keys", metavar="N"),
    Flag("estimate_rest", style="switch"),
    Flag("check_attention", metavar="N", const=1),
    Flag("kv_dram_budget", metavar="BYTES"),
    Flag("kv_spill_dir", metavar="DIR"),
    Flag("kv_quant_bits", choices=(2, 4, 8)),
    Flag("kv_quant_group", metavar="N"),
))

SPARSE_FFN_GROUP: tuple[str, tuple[Flag, ...]] = ("sparse FFN from flash (ReLU models, with --dram-budget)", (
    Flag("sparse_ffn", style="store_true"),
    Flag("sparse_ffn_window_k", metavar="K", aliases=("--window-k",)),
    Flag("sparse_ffn_threshold_offset", metavar="LOGITS", aliases=("--predictor-threshold",)),
    Flag("sparse_ffn_audit", style="store_true"),
))


def _option(name: str) -> tuple[str, str, Any]:
    """(docstring, annotation, default) of flat option ``name``."""
    from flashtier.runtime.engine import EngineConfig
    from flashtier.runtime.options import SECTIONS, field_docs, flat_names

    if name == "expert_cache":
        return (field_docs(EngineConfig)["experts"], "bool", True)
    if name == "sparse_ffn":
        return (field_docs(EngineConfig)["sparse_ffn"], "bool", False)
    top = {f.name: f for f in fields(EngineConfig)}
    if name in top:
        f = top[name]
        return field_docs(EngineConfig)[name], str(f.type), f.default
    section, field_name, annotation = flat_names()[name]
    cls = SECTIONS[section][0]
    f = next(x for x in fields(cls) if x.name == field_name)
    return field_docs(cls)[field_name], annotation, f.default


def _help(doc: str, default: Any, style: str) -> str:
    text = doc.replace("%", "%%")
    if "default" not in text.lower() and default is not MISSING and default is not None:
        shown = ("on" if default else "off") if isinstance(default, bool) else default
        text += f" (default: {shown})"
    return text


def add_flags(p: argparse.ArgumentParser, title: str, flags: tuple[Flag, ...]) -> None:
    """One argument group of generated flags (dest = the flat option name; unset: None)."""
    g = p.add_argument_group(title)
    for flag in flags:
        doc, annotation, default = _option(flag.name)
        names = ["--" + flag.name.replace("_", "-"), *flag.aliases]
        kw: dict[str, Any] = {"dest": flag.name, "default": None, "help": _help(doc, default, flag.style)}
        base = annotation.replace(" | None", "").strip()
        if flag.style == "store_true":
            g.add_argument(*names, action="store_true", dest=flag.name, help=kw["help"])
            continue
        if flag.style == "switch":
            g.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
            continue
        if flag.style in ("onoff", "tristate"):
            kw["choices"] = ("on", "off") if flag.style == "onoff" else ("auto", "on", "off")
        elif flag.choices:
            kw["choices"] = flag.choices
        if flag.metavar:
            kw["metavar"] = flag.metavar
        if flag.const is not None:
            kw.update(nargs="?", const=flag.const)
        if base in ("int", "float") and flag.style == "value" and flag.metavar != "BYTES":  # sizes: "1G"
            kw["type"] = int if base == "int" else float
        g.add_argument(*names, **kw)


def add_budget_args(p: argparse.ArgumentParser) -> None:
    """Budgets, compute and expert-cache flags (generate, chat, serve)."""
    for title, flags in GROUPS:
        add_flags(p, title, flags)
    p.add_argument("--reverify", action="store_true",
                   help="run the one-time integrity checks at open (converted expert extents before a resident load, "
                        "a paged embedding table, FFN bundle files) even if they passed on these unchanged files before "
                        f"(recorded in {VERIFIED_RECORD})")


def add_attention_args(p: argparse.ArgumentParser) -> None:
    """Long-context flags: the attention mode and the retrieval options."""
    title, flags = ATTENTION_GROUP
    p.add_argument("--attention", choices=["full", "retrieval"], default=None,
                   help=" ".join(_option("attention")[0].split()))
    add_flags(p, title, flags)


def add_sparse_ffn_args(p: argparse.ArgumentParser) -> None:
    title, flags = SPARSE_FFN_GROUP
    add_flags(p, title, flags)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Every engine flag group (budgets and compute, long context, sparse FFN): what each command
    that opens a model for generation (generate, chat, serve) takes, so none of them lacks a group."""
    add_budget_args(p)
    add_attention_args(p)
    add_sparse_ffn_args(p)


def _given(args: argparse.Namespace, flags: tuple[Flag, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for flag in flags:
        value = getattr(args, flag.name, None)
        if value is None or (flag.style == "store_true" and value is False):
            continue
        if flag.style == "onoff":
            value = value == "on"
        elif flag.style == "tristate":
            if value == "auto":
                continue
            value = value == "on"
        out[flag.name] = value
    return out


def attention_options(args: argparse.Namespace) -> dict[str, Any]:
    """``attention`` and the retrieval options given on the command line (refused without
    ``--attention retrieval``, where they would be ignored)."""
    opts: dict[str, Any] = {}
    if getattr(args, "attention", None) is not None:
        opts["attention"] = args.attention
    retrieval = _given(args, ATTENTION_GROUP[1])
    if retrieval and opts.get("attention") != "retrieval":
        flags = ", ".join("--" + k.replace("_", "-") for k in retrieval)
        raise ConfigError(f"{flags} only apply with --attention retrieval")
    return {**opts, **retrieval}


def sparse_ffn_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sparse FFN flags given (refused without --sparse-ffn)."""
    given = _given(args, SPARSE_FFN_GROUP[1])
    if "sparse_ffn" not in given and given:
        raise ConfigError(f"{', '.join('--' + k.replace('_', '-') for k in given)} only apply with --sparse-ffn")
    return given


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """Flat engine options from every engine flag the command registered (not given: left out)."""
    opts: dict[str, Any] = {}
    for _, flags in GROUPS:
        opts.update(_given(args, flags))
    opts.update(attention_options(args))
    if hasattr(args, "sparse_ffn"):
        opts.update(sparse_ffn_options(args))
    if hasattr(args, "reverify") and not args.reverify:
        opts["verified_record"] = str(VERIFIED_RECORD)
    if opts.get("dram_budget") is not None:  # a budget this process cannot hold: refused / warned now
        from flashtier.runtime.memory_limit import check_budget, memory_limit
        from flashtier.runtime.units import parse_bytes

        warning = check_budget(parse_bytes(opts["dram_budget"]), memory_limit())
        if warning:
            print(warning, file=sys.stderr)
    return opts
