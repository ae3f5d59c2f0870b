"""Synthetic keys and queries from *different* distributions, for tests and benchmarks.

Plain Gaussian vectors are not representative of attention (see ANCHORS: indexes do far worse on
them than on a trained model's vectors). This generator imitates what trained models show:

- keys share a large common offset ``mu_k`` (the mean of real keys is far from 0), sit on a few
  "topics" that persist over runs of neighbouring positions (locality), plus low-rank structure with
  decaying spectrum and small isotropic noise;
- queries have their own large offset ``mu_q`` (orthogonal to ``mu_k``), and point at one topic
  through a fixed linear map (as ``W_q`` and ``W_k`` differ), so a query's best keys are not its
  nearest keys in L2; the queries of one GQA group share their topic and differ by per-head noise.

It is a stand-in until the lead measures on real trained-model vectors (the benchmark accepts
``.npy`` files for that).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashtier.errors import ConfigError


@dataclass(frozen=True)
class ShiftedKQConfig:
    """Shape and strength of the synthetic key/query distributions."""

    n_keys: int = 16384
    """Keys ``T`` of one (layer, kv head)."""
    dim: int = 64
    """Head dimension ``D``."""
    group: int = 4
    """Query heads per kv head ``G``."""
    n_queries: int = 64
    """Decode steps (query groups) to draw."""
    n_topics: int = 64
    """Distinct topics the keys sit on."""
    mean_run: int = 48
    """Average run of neighbouring positions on one topic."""
    rank: int = 16
    """Rank of the low-rank key structure."""
    key_offset: float = 4.0
    """Norm of the common key offset ``mu_k`` (per-key spread is about 1-2)."""
    query_offset: float = 15.0
    """Norm of the common query offset ``mu_q``."""
    query_strength: float = 20.0
    """Norm of the part of a query that looks for its topic (peakier attention when larger)."""
    noise: float = 0.15
    """Isotropic noise per coordinate (keys and queries)."""
    seed: int = 0
    """Seed of the generator."""

    def __post_init__(self) -> None:
        for name in ("n_keys", "dim", "group", "n_queries", "n_topics", "mean_run", "rank"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ShiftedKQConfig.{name} must be positive, got {getattr(self, name)}")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def make_shifted_kq(config: ShiftedKQConfig = ShiftedKQConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``[T, D]`` and queries ``[Q, G, D]`` (fp32) drawn as the module docstring describes."""
    c = config
    g = torch.Generator().manual_seed(c.seed)
    d = c.dim
    mu_k = _unit(torch.randn(d, generator=g)) * c.key_offset  # [D]
    mu_q = torch.randn(d, generator=g)
    mu_q = _unit(mu_q - (mu_q @ mu_k) / (mu_k @ mu_k) * mu_k) * c.query_offset  # [D], orthogonal to mu_k
    topics = _unit(torch.randn(c.n_topics, d, generator=g)) * 1.5  # [M, D]
    low_rank = torch.linalg.qr(torch.randn(d, c.rank, generator=g))[0]  # [D, r]
    spectrum = 1.2 * 0.8 ** torch.arange(c.rank, dtype=torch.float32)  # [r]

    # Topic of each position: runs of geometric length with mean `mean_run`.
    run_ends = torch.cumsum(torch.empty(c.n_keys).geometric_(1.0 / c.mean_run, generator=g).long(), 0)
    run_id = torch.searchsorted(run_ends, torch.arange(c.n_keys), right=True)  # [T]
    run_topic = torch.randint(0, c.n_topics, (int(run_id.max()) + 1,), generator=g)
    key_topic = run_topic[run_id]  # [T]
    z = torch.randn(c.n_keys, c.rank, generator=g) * spectrum  # [T, r]
    keys = mu_k + topics[key_topic] + z @ low_rank.T + c.noise * torch.randn(c.n_keys, d, generator=g)  # [T, D]

    # Queries look for a topic present in the context through a fixed map (W_q != W_k).
    q_map = torch.eye(d) + 0.5 * torch.randn(d, d, generator=g) / d**0.5  # [D, D]
    wanted = key_topic[torch.randint(0, c.n_keys, (c.n_queries,), generator=g)]  # [Q]
    look = _unit(topics[wanted] @ q_map.T)  # [Q, D]
    detail = torch.randn(c.n_queries, c.rank, generator=g) @ low_rank.T  # [Q, D] prefers some keys in the topic
    shared = mu_q + c.query_strength * _unit(look + 0.35 * _unit(detail))  # [Q, D]
    per_head = 0.25 * c.query_strength * _unit(torch.randn(c.n_queries, c.group, d, generator=g))  # [Q, G, D]
    queries = shared.unsqueeze(1) + per_head + c.noise * torch.randn(c.n_queries, c.group, d, generator=g)
    return keys.contiguous(), queries.contiguous()
