"""flashtier.retrieval: attention over KV that is not resident.

Exact attention on a resident set (sinks + recent window), top-k search over the other keys of each
(layer, kv head) in a :class:`KeyIndex`, and an exact log-sum-exp merge of the two partial results.
Also KV selection policies (StreamingLLM, H2O, retrieval) and KIVI quantisation for the host tier.
Works on plain tensors; knows nothing of weights or storage formats.

Modules: ``merge`` (partial attention, LSE merge), ``index`` / ``index_*`` (key indexes and their
registry), ``store`` (host K/V), ``attention`` (one decode step), ``metrics``, ``selection``,
``quant``, ``synthetic`` (shifted key/query data for tests and benchmarks).
"""

from flashtier.retrieval.attention import (
    GroupSearch,
    OffloadedHead,
    OffloadedLayerKV,
    RetrievalAttention,
    RetrievalConfig,
    RetrievalOutput,
    StepStats,
)
from flashtier.retrieval.index import KeyIndex, SearchResult
from flashtier.retrieval.index_cluster import ClusterIndex, ClusterIndexConfig
from flashtier.retrieval.index_config import IndexConfig
from flashtier.retrieval.index_flat import FlatIndex, FlatIndexConfig
from flashtier.retrieval.index_ivf import IVFIndex, IVFIndexConfig
from flashtier.retrieval.index_registry import INDEXES, index_config, index_names, make_index
from flashtier.retrieval.merge import PartialAttention, merge_partials, partial_attention
from flashtier.retrieval.metrics import (
    attention_mass_covered,
    attention_mass_recall,
    exact_attention_probs,
    keys_scanned_fraction,
    recall_at_k,
)
from flashtier.retrieval.quant import (
    QuantAxis,
    QuantError,
    QuantizedTensor,
    dequantize,
    pack_bits,
    quantization_error,
    quantize,
    quantize_keys,
    quantize_values,
    unpack_bits,
)
from flashtier.retrieval.selection import (
    POLICIES,
    H2OConfig,
    H2OPolicy,
    RetrievalPolicy,
    SelectionPolicy,
    StreamingConfig,
    StreamingPolicy,
    make_policy,
    policy_names,
)
from flashtier.retrieval.store import KVStore, QuantizedKVStore, TensorKVStore
from flashtier.retrieval.synthetic import ShiftedKQConfig, make_shifted_kq

__all__ = [
    "INDEXES", "POLICIES", "ClusterIndex", "ClusterIndexConfig", "FlatIndex", "FlatIndexConfig", "GroupSearch",
    "H2OConfig", "H2OPolicy", "IVFIndex", "IVFIndexConfig", "IndexConfig", "KVStore", "KeyIndex",
    "OffloadedHead", "OffloadedLayerKV", "PartialAttention", "QuantAxis", "QuantError", "QuantizedKVStore",
    "QuantizedTensor", "RetrievalAttention", "RetrievalConfig", "RetrievalOutput", "RetrievalPolicy",
    "SearchResult", "SelectionPolicy", "ShiftedKQConfig", "StepStats", "StreamingConfig", "StreamingPolicy", "TensorKVStore",
    "attention_mass_covered", "attention_mass_recall", "dequantize", "exact_attention_probs", "index_config",
    "index_names", "keys_scanned_fraction", "make_index", "make_policy", "make_shifted_kq", "merge_partials", "pack_bits",
    "partial_attention", "policy_names", "quantization_error", "quantize", "quantize_keys", "quantize_values",
    "recall_at_k", "unpack_bits",
]
