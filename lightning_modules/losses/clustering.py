"""Clustering losses of the dissertation: d+/d−, a sample's distance to its nearest (or own) centre over the
distance to the next one, as TAC-CCL's contrastive clustering loss (ch. 4, Eq. 4.3) and LMCS's
discriminative power J_D (ch. 3, Eq. 3.6 and its readings). Centres are constants: the gradient reaches the
features only."""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from embedding_core.distances import euclidean, euclidean_to_centers
from lightning_modules.losses.common import fp32

JD_MODES = ("ratio", "literal", "neg_gap")


def two_nearest(distances: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's smallest and second smallest distance (d0 <= d1)."""
    return distances.topk(2, dim=1, largest=False).values.unbind(dim=1)


@fp32
def contrastive_clustering_loss(embedding: Tensor, centers: Tensor, assigned: Tensor | None = None) -> Tensor:
    """Eq. 4.3: mean over samples of d+/d-, the distance to the nearest centre over the distance to the
    second nearest (the text's "d-/d+ small" contradicts the equation; the equation is minimised).
    `assigned` (cluster ids): d+ is the distance to the sample's own centre, d- to the nearest other one.
    Centres are constants: the gradient reaches the embedding only."""
    if centers.shape[0] < 2:
        raise ValueError("the contrastive clustering loss needs at least 2 cluster centres")
    dist = euclidean_to_centers(embedding, centers.detach())
    if assigned is None:
        nearest, second = two_nearest(dist)
        return (nearest / second).mean()
    own = dist.gather(1, assigned[:, None]).squeeze(1)
    other = dist.scatter(1, assigned[:, None], math.inf).amin(1)
    return (own / other).mean()


@fp32
def discriminative_power(features: Tensor, centers: Tensor, mode: str = "ratio") -> Tensor:
    """J_D over a batch, from each L2-normalised feature's distances d0 <= d1 to its two nearest (fixed)
    centres: ratio mean d0 / (d1 + 1e-8); literal Eq. 3.6 as a mean, (d0 - d1)^2; neg_gap -mean(d1 - d0)."""
    if mode not in JD_MODES:
        raise ValueError(f"jd_mode {mode!r}: use one of {JD_MODES}")
    d0, d1 = two_nearest(euclidean(F.normalize(features, dim=1)[:, None, :], centers[None, :, :].detach()))
    if mode == "ratio":
        return (d0 / (d1 + 1e-8)).mean()
    if mode == "literal":
        return (d0 - d1).pow(2).mean()
    return -(d1 - d0).mean()
