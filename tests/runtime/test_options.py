"""Typed engine configuration: flat option names map onto typed sections, unknown names and wrong
types are one ConfigError naming the option, and every section field is documented (the CLI's
help is generated from those docstrings)."""

from __future__ import annotations

from dataclasses import fields

import pytest

from flashtier.errors import ConfigError
from flashtier.runtime.engine import EngineConfig
from flashtier.runtime.options import (
    SECTIONS,
    ExpertCacheConfig,
    PagingConfig,
    RetrievalOptions,
    SparseFFNConfig,
    field_docs,
    flat_names,
)


def test_flat_options_fill_typed_sections():
    c = EngineConfig.from_options(dram_budget="64M", expert_slots=3, expert_gate="off", compressed="off",
                                  window=128, kv_dram_budget="1G", attention="retrieval")
    assert c.dram_budget == 64 << 20
    assert c.experts == ExpertCacheConfig(slots=3, gate=False)
    assert c.paging == PagingConfig(compressed="off")
    assert c.retrieval == RetrievalOptions(window=128, kv_dram_budget="1G")
    assert c.retrieval.as_mapping() == {"window": 128, "kv_dram_budget": "1G"}
    assert c.sparse_ffn is None


def test_defaults_and_none_mean_not_set():
    assert EngineConfig.from_options() == EngineConfig()
    assert EngineConfig.from_options(expert_slots=None, window=None, compressed=None) == EngineConfig()


def test_sparse_ffn_and_expert_cache_switches():
    assert EngineConfig.from_options(sparse_ffn=True).sparse_ffn == SparseFFNConfig()
    assert EngineConfig.from_options(sparse_ffn=True, sparse_ffn_window_k=2).sparse_ffn == SparseFFNConfig(window_k=2)
    assert EngineConfig.from_options(sparse_ffn_audit=True).sparse_ffn == SparseFFNConfig(audit=True)
    with pytest.raises(ConfigError, match="sparse_ffn_window_k need sparse_ffn on"):
        EngineConfig.from_options(sparse_ffn=False, sparse_ffn_window_k=2)
    assert EngineConfig.from_options(expert_cache="off").experts is None
    assert EngineConfig.from_options(expert_cache="on").experts == ExpertCacheConfig()
    with pytest.raises(ConfigError, match="expert_\\* options need the expert cache"):
        EngineConfig.from_options(expert_cache="off", expert_slots=2)


@pytest.mark.parametrize("options, message", [
    ({"expert_slot": 2}, "unknown option 'expert_slot'; did you mean expert_slots"),
    ({"extra": {"expert_slots": 2}}, "unknown option 'extra'"),
    ({"windw": 4}, "did you mean window"),
    ({"expert_slots": "many"}, "option expert_slots: expected a whole number, got 'many'"),
    ({"expert_slots": 2.5}, "option expert_slots: expected a whole number"),
    ({"expert_gate": "maybe"}, "option expert_gate: expected on/off"),
    ({"sparse_ffn_threshold_offset": "low"}, "option sparse_ffn_threshold_offset: expected a number"),
    ({"expert_policy": 3}, "option expert_policy: expected a string"),
    ({"expert_policy": "fifo"}, "expert cache policy 'fifo' is unknown"),
    ({"compressed": "sometimes"}, "--compressed 'sometimes' is unknown"),
    ({"direct_io": "on"}, "direct_io 'on' is unknown; choose one of auto, require, off"),
    ({"expert_cache": "perhaps"}, "option expert_cache: expected on/off"),
    ({"kv_sequences": 0}, "kv_sequences must be a whole number >= 1, got 0"),
])
def test_bad_options_are_one_error_naming_the_option(options, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig.from_options(**options)


def test_sections_must_be_their_types():
    with pytest.raises(ConfigError, match="EngineConfig.experts must be a ExpertCacheConfig.*from_options"):
        EngineConfig(experts={"slots": 2})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="EngineConfig.paging must be a PagingConfig"):
        EngineConfig(paging=None)  # type: ignore[arg-type]


def test_an_unknown_option_lists_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        EngineConfig.from_options(nonsense=1)
    for name in ("dram_budget", "expert_slots", "sparse_ffn_window_k", "window", "compressed"):
        assert name in str(e.value)


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_section_field_is_documented(section):
    cls, _ = SECTIONS[section]
    docs = field_docs(cls)
    missing = [f.name for f in fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_flat_names_are_unique_and_cover_every_field():
    names = flat_names()
    assert len(names) == sum(len(fields(cls)) for cls, _ in SECTIONS.values())
    assert names["expert_slots"][:2] == ("experts", "slots")
    assert names["sparse_ffn_window_k"][:2] == ("sparse_ffn", "window_k")
    assert names["kv_spill_dir"][:2] == ("retrieval", "kv_spill_dir")
