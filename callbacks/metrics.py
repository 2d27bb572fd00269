"""Evaluation metrics as pure functions: torch tensors in, python floats out.

All three metrics are reported in percent (0..100), NMI included (NMI x 100, as the DML tables
print it). Embeddings are expected L2-normalised, so inner product = cosine similarity. The
conventions follow specs/datasets-and-metrics.md section 3.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score
from torch import Tensor

from callbacks.search import Backend, block_rows, kmeans, topk_search


def _check_pair(name: str, emb: Tensor, targets: Tensor) -> None:
    if emb.ndim != 2 or targets.ndim != 1 or emb.shape[0] != targets.shape[0]:
        raise ValueError(
            f"{name}: need embeddings (N, D) and targets (N,), got {tuple(emb.shape)} and {tuple(targets.shape)}"
        )


def _check_dims(a: Tensor, b: Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"query and reference embeddings need the same dim, got {a.shape[1]} and {b.shape[1]}"
        )


# ----------------------------------------------------------------------------------------------------
# weighted kNN (NPID / ISIF)
# ----------------------------------------------------------------------------------------------------


def _vote(votes: Tensor, weights: Tensor, num_classes: int) -> Tensor:
    """Predicted class per row: the class with the largest summed weight (argmax keeps the first max,
    so ties go to the lowest class id)."""
    scores = torch.zeros(votes.shape[0], num_classes, device=weights.device)
    return scores.scatter_add_(1, votes, weights).argmax(dim=1)


def weighted_knn_top1(
    query_emb: Tensor,
    query_targets: Tensor,
    ref_emb: Tensor,
    ref_targets: Tensor,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    backend: Backend = "auto",
) -> float:
    """Top-1 accuracy (%) of the weighted kNN vote of Wu et al. 2018 (NPID), as used by ISIF.

    Each of the k most similar reference rows votes exp(cos / temperature) for its class; the class
    with the largest sum wins (ties: lowest class id). No self exclusion: queries and reference are
    different splits. k is clipped to the reference size.
    """
    _check_pair("queries", query_emb, query_targets)
    _check_pair("reference", ref_emb, ref_targets)
    _check_dims(query_emb, ref_emb)
    largest = int(max(query_targets.max(), ref_targets.max())) + 1
    num_classes = largest if num_classes is None else num_classes
    if num_classes < largest:
        raise ValueError(
            f"num_classes={num_classes} but targets go up to {largest - 1}; pass None or >= {largest}"
        )
    sims, idx = topk_search(query_emb, ref_emb, min(k, ref_emb.shape[0]), backend=backend)
    votes = ref_targets.to(idx.device).long()[idx]
    weights = torch.exp(sims.float() / temperature)
    truth = query_targets.to(idx.device)
    rows = block_rows(num_classes)
    correct = sum(
        int((_vote(v, w, num_classes) == t).sum())
        for v, w, t in zip(votes.split(rows), weights.split(rows), truth.split(rows))
    )
    return 100.0 * correct / query_emb.shape[0]


# ----------------------------------------------------------------------------------------------------
# Recall@K (DML hit rate)
# ----------------------------------------------------------------------------------------------------


def _positive_columns(query_targets: Tensor, order: Tensor, sorted_targets: Tensor) -> tuple[Tensor, Tensor]:
    """Gallery columns sharing each query's class, padded to the largest class: (cols, valid), (Q, P).

    ``order`` sorts the gallery by target. The columns let a block read its positives' similarities
    with a gather instead of masking all N columns.
    """
    first = torch.searchsorted(sorted_targets, query_targets)
    count = torch.searchsorted(sorted_targets, query_targets, right=True) - first
    offsets = torch.arange(max(int(count.max()), 1), device=query_targets.device)
    cols = order[(first[:, None] + offsets).clamp_max(order.numel() - 1)]
    return cols, offsets < count[:, None]


def _positive_ranks(
    queries: Tensor, query_targets: Tensor, gallery: Tensor, gallery_targets: Tensor, leave_one_out: bool
) -> tuple[Tensor, Tensor]:
    """Per query: (number of negatives strictly more similar than its best positive, has a positive).

    Every row above the best positive is a negative, so counting all rows above it suffices. In
    leave-one-out mode the query itself is masked on the diagonal (by identity, not by position).
    """
    gallery_t = gallery.float().T
    order = torch.argsort(gallery_targets.long(), stable=True)
    sorted_targets = gallery_targets.long()[order]
    ranks, has_positive = [], []
    rows = block_rows(gallery.shape[0])
    for start in range(0, queries.shape[0], rows):
        sims = queries[start : start + rows].float() @ gallery_t
        cols, valid = _positive_columns(query_targets[start : start + rows].long(), order, sorted_targets)
        if leave_one_out:
            r = torch.arange(sims.shape[0], device=sims.device)
            sims[r, start + r] = -torch.inf
            valid &= cols != (start + r)[:, None]
        best_positive = sims.gather(1, cols).masked_fill(~valid, -torch.inf).amax(dim=1, keepdim=True)
        ranks.append((sims > best_positive).sum(dim=1, dtype=torch.int32))
        has_positive.append(valid.any(dim=1))
    return torch.cat(ranks), torch.cat(has_positive)


def recall_at_k(
    emb: Tensor,
    targets: Tensor,
    ks: Sequence[int],
    gallery_emb: Tensor | None = None,
    gallery_targets: Tensor | None = None,
) -> dict[int, float]:
    """Recall@K (%) = share of queries with a same-class item among their K nearest neighbours.

    Without a gallery every row is a query against all other rows (leave-one-out: CUB, Cars, SOP);
    with one, queries search the gallery with no exclusion (In-Shop). Exact definition: a query hits
    at K iff fewer than K negatives are strictly more similar than its most similar positive, so a
    positive-negative tie counts for the positive; a query with no positive always misses.
    """
    _check_pair("queries", emb, targets)
    if (gallery_emb is None) != (gallery_targets is None):
        raise ValueError(
            "pass both gallery_emb and gallery_targets (query->gallery) or neither (leave-one-out)"
        )
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty list of positive ints, got {list(ks)}")
    leave_one_out = gallery_emb is None
    if leave_one_out:
        gallery_emb, gallery_targets = emb, targets
    else:
        _check_pair("gallery", gallery_emb, gallery_targets)
        _check_dims(emb, gallery_emb)
        gallery_emb = gallery_emb.to(emb.device)
    ranks, has_positive = _positive_ranks(
        emb, targets.to(emb.device), gallery_emb, gallery_targets.to(emb.device), leave_one_out
    )
    return {int(k): 100.0 * int((has_positive & (ranks < k)).sum()) / emb.shape[0] for k in ks}


# ----------------------------------------------------------------------------------------------------
# NMI
# ----------------------------------------------------------------------------------------------------


def _as_numpy(x: Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def nmi_from_labels(
    targets: Tensor | np.ndarray | Sequence[int],
    clusters: Tensor | np.ndarray | Sequence[int],
    average_method: str = "arithmetic",
) -> float:
    """NMI x 100 between class labels and cluster ids (scikit-learn).

    "arithmetic" = 2 I / (H_class + H_cluster), the lifted-struct formula and sklearn's default since
    0.22; ISIF-era sklearn used "geometric" = I / sqrt(H_class H_cluster). Record which one is used.
    """
    return 100.0 * float(
        normalized_mutual_info_score(_as_numpy(targets), _as_numpy(clusters), average_method=average_method)
    )


NMI_AVERAGES = ("arithmetic", "geometric")  # the lifted-struct formula; ISIF-era sklearn


def kmeans_clusters(
    emb: Tensor,
    targets: Tensor,
    seed: int = 0,
    restarts: int = 10,
    backend: Backend = "auto",
    iterations: int = 50,
) -> Tensor:
    """Cluster id per row: k-means on the embeddings with as many clusters as distinct targets.

    ``restarts=10`` matches the ISIF-era sklearn default (n_init=10); ISIF's SOP "fast" mode used 1.
    """
    _check_pair("emb", emb, targets)
    return kmeans(
        emb,
        int(torch.unique(targets).numel()),
        seed=seed,
        restarts=restarts,
        iterations=iterations,
        backend=backend,
    )


def nmi_scores(
    emb: Tensor,
    targets: Tensor,
    seed: int = 0,
    restarts: int = 10,
    averages: Sequence[str] = NMI_AVERAGES,
    backend: Backend = "auto",
    iterations: int = 50,
) -> dict[str, float]:
    """{normalisation: NMI x 100} from ONE k-means clustering, so the normalisations differ only by
    the formula (papers print either; a second clustering would add k-means noise to the gap)."""
    unknown = [a for a in averages if a not in NMI_AVERAGES]
    if unknown:
        raise ValueError(f"NMI normalisation {unknown[0]!r}: use one of {NMI_AVERAGES}")
    clusters = kmeans_clusters(emb, targets, seed=seed, restarts=restarts, backend=backend, iterations=iterations)
    return {average: nmi_from_labels(targets, clusters, average) for average in averages}


def nmi(
    emb: Tensor,
    targets: Tensor,
    seed: int = 0,
    restarts: int = 10,
    average_method: str = "arithmetic",
    backend: Backend = "auto",
    iterations: int = 50,
) -> float:
    """NMI x 100 of k-means on the embeddings with as many clusters as distinct targets (one normalisation)."""
    scores = nmi_scores(emb, targets, seed=seed, restarts=restarts, averages=(average_method,), backend=backend,
                        iterations=iterations)
    return scores[average_method]
