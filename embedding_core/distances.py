"""Distances and normalisation shared by losses, callbacks and metrics."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Rows scaled to unit L2 norm (last dimension): the one name for this step across methods."""
    return F.normalize(x, p=2.0, dim=-1, eps=eps)


def clamped_sqrt(squared: Tensor) -> Tensor:
    """sqrt(max(squared, 1e-12)): a Euclidean distance whose gradient stays finite at distance 0 (the plain
    square root's, and cdist's backward, are NaN there)."""
    return squared.clamp_min(1e-12).sqrt()


def euclidean(a: Tensor, b: Tensor) -> Tensor:
    """‖a − b‖ over the last dimension, broadcasting a against b, with the clamped square root."""
    return clamped_sqrt((a - b).square().sum(-1))


def euclidean_to_centers(x: Tensor, centers: Tensor) -> Tensor:
    """(B, K) distances of rows x (B, d) to centres (K, d) by the expansion ‖x‖² + ‖c‖² − 2 x·c (no (B, K, d)
    difference tensor), with the clamped square root."""
    squared = x.square().sum(1, keepdim=True) + centers.square().sum(1) - 2 * x @ centers.T
    return clamped_sqrt(squared)
