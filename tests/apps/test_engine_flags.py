"""The engine's CLI flags are generated from the typed configuration: each flag sets the flat
option of its name, its help is that field's docstring, old spellings still work."""

from __future__ import annotations

import argparse

import pytest

from flashtier.apps.engine_flags import (
    ATTENTION_GROUP,
    GROUPS,
    SPARSE_FFN_GROUP,
    add_attention_args,
    add_budget_args,
    add_sparse_ffn_args,
    engine_options,
)
from flashtier.errors import ConfigError
from flashtier.runtime.engine import EngineConfig
from flashtier.runtime.options import ExpertCacheConfig, SparseFFNConfig, field_docs


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_budget_args(p)
    add_attention_args(p)
    add_sparse_ffn_args(p)
    return p


def options(*argv: str) -> dict:
    return engine_options(parser().parse_args(["--reverify", *argv]))


def test_no_flags_give_the_default_config():
    assert options() == {}
    assert EngineConfig.from_options(**options()) == EngineConfig()


def test_flags_set_their_options():
    c = EngineConfig.from_options(**options(
        "--dram-budget", "64M", "--expert-slots", "3", "--expert-gate", "off", "--expert-pin", "off",
        "--compressed", "off", "--fast-matvec", "on", "--attention", "retrieval", "--window", "128",
        "--no-estimate-rest", "--check-attention", "--kv-quant-bits", "4", "--sparse-ffn", "--sparse-ffn-window-k", "2"))
    assert c.dram_budget == 64 << 20 and c.fast_matvec is True
    assert c.experts == ExpertCacheConfig(slots=3, gate=False, pin=False)
    assert c.paging.compressed == "off"
    assert c.retrieval.window == 128 and c.retrieval.estimate_rest is False and c.retrieval.check_attention == 1
    assert c.retrieval.kv_quant_bits == 4
    assert c.sparse_ffn == SparseFFNConfig(window_k=2)


def test_old_spellings_are_aliases():
    c = EngineConfig.from_options(**options("--sparse-ffn", "--window-k", "3", "--predictor-threshold", "-0.5"))
    assert c.sparse_ffn == SparseFFNConfig(window_k=3, threshold_offset=-0.5)


def test_expert_cache_off():
    assert EngineConfig.from_options(**options("--expert-cache", "off")).experts is None


@pytest.mark.parametrize("argv, message", [
    (["--window", "64"], "--window only apply with --attention retrieval"),
    (["--window-k", "2"], "--sparse-ffn-window-k only apply with --sparse-ffn"),
])
def test_flags_that_need_another_are_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        options(*argv)


def test_help_is_the_field_docstring():
    text = " ".join(parser().format_help().split())
    for doc in (field_docs(ExpertCacheConfig)["slots"], field_docs(SparseFFNConfig)["window_k"],
                field_docs(EngineConfig)["max_context"]):
        assert " ".join(doc.split()) in text


def test_every_flag_is_an_option_of_the_engine():
    for _, flags in (*GROUPS, ATTENTION_GROUP, SPARSE_FFN_GROUP):
        for flag in flags:
            EngineConfig.from_options(**{flag.name: None})  # a known name (None: not set)
