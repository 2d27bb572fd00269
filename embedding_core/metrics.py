"""Evaluation metrics as pure functions: torch tensors in, python floats out.

All three metrics are reported in percent (0..100), NMI included (NMI x 100, as the DML tables
print it). Embeddings are expected L2-normalised, so inner product = cosine similarity. The
conventions are the deep-metric-learning papers' (README.md, Metrics).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score
from torch import Tensor

from embedding_core.search import Backend, block_rows, kmeans, tile_shape, topk_search


def check_finite(name: str, emb: Tensor) -> None:
    """FloatingPointError when `emb` (N, ...) holds NaN or inf. No metric is defined there, and the ones here
    would still return numbers: a NaN similarity never ranks above the positive, so all-NaN embeddings
    score Recall@K = 100 at every K."""
    bad_rows = int((~torch.isfinite(emb)).reshape(emb.shape[0], -1).any(dim=1).sum()) if emb.ndim else 0
    if bad_rows:
        raise FloatingPointError(f"{name}: {bad_rows} of {emb.shape[0]} rows hold NaN or inf, and no metric is "
                                 "defined on them (the network's weights or inputs are non-finite)")


def _check_pair(name: str, emb: Tensor, targets: Tensor) -> None:
    if emb.ndim != 2 or targets.ndim != 1 or emb.shape[0] != targets.shape[0]:
        raise ValueError(
            f"{name}: need embeddings (N, D) and targets (N,), got {tuple(emb.shape)} and {tuple(targets.shape)}"
        )
    check_finite(name, emb)


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


def _count_above(tile: Tensor, best: Tensor, in_place: bool | None = None) -> Tensor:
    """Entries of each row strictly above the row's ``best`` (rows, 1), as float (exact up to 2**24).

    ``in_place`` (default: on CPU) writes the comparison over the tile, whose float row sum is ~10x
    faster there than a bool one; on a GPU a bool mask is the least memory traffic."""
    if tile.is_cuda if in_place is None else not in_place:
        return (tile > best).sum(dim=1, dtype=torch.float32)
    return torch.gt(tile, best, out=tile).sum(dim=1)


def run_blocks(block: Callable[..., None], blocks: list[tuple], buffer_elements: int, device: torch.device) -> None:
    """`block(*args, buffer)` for every args in `blocks`, each with a scratch buffer of `buffer_elements`.

    On the CPU, with more than one torch thread, the blocks are shared by as many Python threads, each
    running its blocks' small GEMMs single-threaded and taking the next block when it is done: a thread that
    shares its core with another process (DataLoader workers, a concurrent run) then only does fewer blocks.
    Multi-threaded GEMMs per tile instead wait at every tile for their slowest thread (a Recall@K 11x slower
    beside one busy process). The blocks write disjoint rows, so the result does not depend on the order.
    On a GPU, one stream: the blocks in order."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or len(blocks) == 1:
        buffer = torch.empty(buffer_elements, device=device)
        for args in blocks:
            block(*args, buffer)
        return
    work = iter(blocks)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        buffer = torch.empty(buffer_elements, device=device)
        while not errors:
            with lock:
                args = next(work, None)
            if args is None:
                return
            try:
                block(*args, buffer)
            except Exception as err:  # noqa: BLE001 (re-raised in the caller)
                errors.append(err)

    torch.set_num_threads(1)  # each worker's GEMMs on its own core; restored below
    try:
        workers = [threading.Thread(target=worker) for _ in range(min(threads, len(blocks)))]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        torch.set_num_threads(threads)
    if errors:
        raise errors[0]


def _positive_ranks(
    queries: Tensor, query_targets: Tensor, gallery: Tensor, gallery_targets: Tensor, leave_one_out: bool
) -> tuple[Tensor, Tensor]:
    """Per query: (number of negatives strictly more similar than its best positive, has a positive).

    One GEMM pass in (rows x cols) tiles (``search.tile_shape``), with no sort and no full row stored:
    queries and gallery are taken in class order, so a block of queries finds all its positives in one
    contiguous span of gallery columns. The span's tile gives each query's best positive; every other
    tile is counted against it while it is still in cache. Every row above the best positive is a
    negative (the best positive is the maximum over positives), so counting all rows above it suffices;
    each similarity is computed once, so the best positive and the count read the same float. In
    leave-one-out mode the query itself is masked (by identity, not by position). Memory: one tile plus
    the span's (rows x gallery images of the block's classes), not a (rows x N) block.
    """
    query_order = torch.argsort(query_targets.long(), stable=True)
    q_sorted, qy_sorted = queries.float()[query_order], query_targets.long()[query_order]
    if leave_one_out:
        g_sorted, gy_sorted = q_sorted, qy_sorted
    else:
        gallery_order = torch.argsort(gallery_targets.long(), stable=True)
        g_sorted, gy_sorted = gallery.float()[gallery_order], gallery_targets.long()[gallery_order]
    num_queries, n = q_sorted.shape[0], g_sorted.shape[0]
    rows, cols = tile_shape(queries.device)
    starts = torch.arange(0, num_queries, rows, device=queries.device)
    ends = (starts + rows).clamp_max(num_queries)
    firsts = torch.searchsorted(gy_sorted, qy_sorted[starts]).tolist()
    lasts = torch.searchsorted(gy_sorted, qy_sorted[ends - 1], right=True).tolist()
    ranks = torch.empty(num_queries, dtype=torch.int32, device=queries.device)
    has_positive = torch.empty(num_queries, dtype=torch.bool, device=queries.device)

    def block(start: int, first: int, last: int, buffer: Tensor) -> None:
        q, qy = q_sorted[start : start + rows], qy_sorted[start : start + rows]
        sims = q @ g_sorted[first:last].T  # the block's positives and the negatives between them
        positive = gy_sorted[first:last] == qy[:, None]
        if leave_one_out:  # query start + i is gallery column start + i: the diagonal at offset start - first
            sims.diagonal(start - first).fill_(-torch.inf)
            positive.diagonal(start - first).fill_(False)
        best = sims.masked_fill(~positive, -torch.inf).amax(dim=1, keepdim=True) if last > first else \
            torch.full((q.shape[0], 1), -torch.inf, device=q.device)
        count = _count_above(sims, best)  # float32: exact up to 2**24 rows
        for begin, end in ((0, first), (last, n)):
            for c in range(begin, end, cols):
                chunk = g_sorted[c : min(c + cols, end)]
                tile = torch.mm(q, chunk.T, out=buffer[: q.shape[0] * chunk.shape[0]].view(q.shape[0], -1))
                count += _count_above(tile, best)
        ranks[start : start + rows] = count
        has_positive[start : start + rows] = positive.any(dim=1)

    run_blocks(block, list(zip(starts.tolist(), firsts, lasts)), rows * cols, queries.device)
    unsorted = torch.empty_like(ranks), torch.empty_like(has_positive)
    unsorted[0][query_order], unsorted[1][query_order] = ranks, has_positive
    return unsorted


def _searched_set(emb: Tensor, targets: Tensor, gallery_emb: Tensor | None,
                  gallery_targets: Tensor | None) -> tuple[Tensor, Tensor, bool]:
    """(gallery embeddings on the queries' device, gallery targets, leave_one_out) after the input checks:
    the queries themselves when no gallery is given (leave-one-out), else the checked gallery."""
    _check_pair("queries", emb, targets)
    if (gallery_emb is None) != (gallery_targets is None):
        raise ValueError("pass both gallery_emb and gallery_targets (query->gallery) or neither (leave-one-out)")
    if gallery_emb is None:
        return emb, targets, True
    _check_pair("gallery", gallery_emb, gallery_targets)
    _check_dims(emb, gallery_emb)
    return gallery_emb.to(emb.device), gallery_targets, False


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
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty list of positive ints, got {list(ks)}")
    gallery_emb, gallery_targets, leave_one_out = _searched_set(emb, targets, gallery_emb, gallery_targets)
    ranks, has_positive = _positive_ranks(
        emb, targets.to(emb.device), gallery_emb, gallery_targets.to(emb.device), leave_one_out
    )
    return {int(k): 100.0 * int((has_positive & (ranks < k)).sum()) / emb.shape[0] for k in ks}


def map_at_r(
    emb: Tensor,
    targets: Tensor,
    gallery_emb: Tensor | None = None,
    gallery_targets: Tensor | None = None,
    backend: Backend = "auto",
) -> dict[str, float]:
    """{"map@r": MAP@R, "r_precision": R-precision} in %, Musgrave et al. 2020 (pytorch-metric-learning's
    AccuracyCalculator conventions).

    A query's R is the number of its same-class items in the searched set: the other queries (leave-one-out,
    the query itself excluded by identity, as Recall@K does) or the gallery. R-precision is the share of
    same-class items among its R nearest neighbours; MAP@R averages the precision at each rank i <= R
    where a same-class item sits, divided by R. Queries with R = 0 are left out of both means. One
    top-(max R) search (`search.topk_search`, the kNN's) serves both: on one CPU thread about Recall@K's own
    cost at CUB (0.6 s) and SOP size (14 s); classes of 1,000 test images (CIFAR-10) need a top-999 search (3 s).
    """
    gallery_emb, gallery_targets, leave_one_out = _searched_set(emb, targets, gallery_emb, gallery_targets)
    query_y = targets.long().cpu()
    gallery_y = gallery_targets.long().cpu()
    classes, counts = torch.unique(gallery_y, return_counts=True)
    per_class = dict(zip(classes.tolist(), (counts - int(leave_one_out)).tolist()))
    r = torch.tensor([per_class.get(y, 0) for y in query_y.tolist()], dtype=torch.long)
    keep = r > 0
    if not keep.any():
        return {"map@r": 0.0, "r_precision": 0.0}
    k = int(r.max())
    _, idx = topk_search(emb, gallery_emb.to(emb.device), k, exclude_self=leave_one_out, backend=backend)
    hits = (gallery_y[idx.cpu()] == query_y[:, None])[keep]
    r = r[keep]
    within_r = torch.arange(1, k + 1)[None, :] <= r[:, None]
    hits = hits & within_r
    precision_at_i = hits.cumsum(dim=1).double() / torch.arange(1, k + 1, dtype=torch.float64)
    average_precision = (precision_at_i * hits).sum(dim=1) / r
    r_precision = hits.sum(dim=1).double() / r
    return {"map@r": 100.0 * float(average_precision.mean()), "r_precision": 100.0 * float(r_precision.mean())}


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
