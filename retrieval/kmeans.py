"""Small, fast Lloyd k-means for clustering one segment of keys (torch matmuls, fp32).

Deterministic for a given ``generator`` state. The returned centroids are the means of the final
assignment (so ``radius`` bounds computed from them are exact); clusters left empty are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Clustering:
    """Result of clustering ``n`` points into ``C`` non-empty clusters."""

    centroids: torch.Tensor
    """``[C, D]`` mean of each cluster's members."""
    assign: torch.Tensor
    """``[n]`` int64 cluster of each point, in ``0 .. C-1``."""
    sizes: torch.Tensor
    """``[C]`` int64 members per cluster (all > 0)."""


def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index ``[n]`` of the nearest centroid (L2) of each row of ``x [n, D]``."""
    c_sq = (centroids * centroids).sum(dim=1)  # [C]
    dist = torch.addmm(c_sq.unsqueeze(0), x, centroids.T, beta=1.0, alpha=-2.0)  # [n, C] (|x|^2 dropped)
    return dist.argmin(dim=1)


def _means(x: torch.Tensor, assign: torch.Tensor, n_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums ``[C, D]`` divided by counts, and the counts ``[C]``."""
    sums = torch.zeros((n_clusters, x.shape[1]), dtype=x.dtype).index_add_(0, assign, x)
    counts = torch.bincount(assign, minlength=n_clusters)
    return sums / counts.clamp(min=1).unsqueeze(1).to(x.dtype), counts


def kmeans(x: torch.Tensor, n_clusters: int, iters: int, generator: torch.Generator) -> Clustering:
    """Cluster ``x [n, D]`` (fp32) into at most ``n_clusters`` clusters with ``iters`` Lloyd steps,
    initialised from distinct random points."""
    n = x.shape[0]
    n_clusters = max(1, min(n_clusters, n))
    centroids = x[torch.randperm(n, generator=generator)[:n_clusters]].clone()  # [C, D]
    for _ in range(iters):
        assign = _nearest(x, centroids)
        means, counts = _means(x, assign, n_clusters)
        centroids = torch.where((counts > 0).unsqueeze(1), means, centroids)  # empty: keep old
    assign = _nearest(x, centroids)
    means, counts = _means(x, assign, n_clusters)
    keep = counts > 0
    remap = torch.cumsum(keep.to(torch.int64), 0) - 1  # old cluster id -> compact id
    return Clustering(means[keep], remap[assign], counts[keep])
