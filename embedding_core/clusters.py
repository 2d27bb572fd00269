"""Cluster centres: the one definition that k-means pseudo labels, sample discovery and LMCS's J_D share."""
from __future__ import annotations

import torch
from torch import Tensor


def cluster_centers(features: Tensor, labels: Tensor, num_clusters: int, empty: float = float("nan")) -> Tensor:
    """(K, d) mean feature per cluster (or class: Snowball's Eq. 2.8), in the features' dtype and not
    re-normalised; a cluster without a member gets the row `empty` (NaN by default, so a caller cannot take it
    for a centre by mistake; 0 where a loss needs finite centres)."""
    sums = torch.zeros(num_clusters, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_clusters).to(features.dtype)
    return (sums / counts[:, None]).masked_fill(counts[:, None] == 0, empty)
