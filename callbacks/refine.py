"""Test-time retrieval refinement by predicted relative orders (ROUL §3.4, Eqs. 10-11; solver ours).

Each query's top-M list is re-ranked by minimising the pairwise energy of Eq. 10,
    E(ranking) = Σ_{n placed before m} c(n, m),   c(n, m) = exp(α₁ (d_n − d_m)) + λ (1 − Ô(n, m)),
where d is the embedding distance to the query and Ô(n, m) ∈ (−1, 1) the order predictor's belief that
C_n is closer than C_m. Exact minimisation is a linear-ordering problem (NP-hard), so the solver is
odd-even adjacent-swap descent from the distance order: neighbours (a, b) swap where c(b, a) < c(a, b);
a swap changes the relative order of that one pair only, so it lowers E by exactly c(a, b) − c(b, a) and
the descent terminates. Ranks beyond M are unchanged, so Recall@K for K > M is the plain one. The
self-augmentation terms of Eq. 10 are constant under the literal equation and left out (docs/methods/roul.md).
Everything runs batched over queries on the embeddings' device.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from embedding_core import metrics
from embedding_core.search import topk_search

OrderFn = Callable[[Tensor, Tensor], Tensor]  # (anchor (b, D), items (b, M, D)) -> Ô (b, M, M)


def pairwise_cost(distance: Tensor, orders: Tensor, alpha: float, lam: float) -> Tensor:
    """c (Q, M, M): c[q, n, m] = exp(α (d_n − d_m)) + λ (1 − Ô[q, n, m]), the cost of n placed before m."""
    gap = distance[:, :, None] - distance[:, None, :]
    return torch.exp(alpha * gap) + lam * (1 - orders)


def ranking_energy(cost: Tensor, perm: Tensor) -> Tensor:
    """E (Q,) of the rankings `perm` (Q, M: the item at each position): Σ over pairs n before m of c(n, m)."""
    position = torch.argsort(perm, dim=1)
    before = position[:, :, None] < position[:, None, :]
    return (cost * before).sum((1, 2))


def entries(cost: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """cost[q, rows[q, i], cols[q, i]] for (Q, P) index tensors."""
    picked = cost.gather(1, rows[:, :, None].expand(-1, -1, cost.shape[2]))
    return picked.gather(2, cols[:, :, None])[..., 0]


def swap_pass(cost: Tensor, perm: Tensor, parity: int) -> tuple[Tensor, Tensor]:
    """One odd-even pass: the disjoint neighbour pairs (p, p+1), p ≡ parity (mod 2), swapped where
    c(b, a) < c(a, b). Returns (new perm, swapped (Q, pairs) bool)."""
    starts = torch.arange(parity, perm.shape[1] - 1, 2, device=perm.device)
    a, b = perm[:, starts], perm[:, starts + 1]
    c_ab, c_ba = entries(cost, a, b), entries(cost, b, a)
    swapped = c_ba < c_ab
    new = perm.clone()
    new[:, starts] = torch.where(swapped, b, a)
    new[:, starts + 1] = torch.where(swapped, a, b)
    return new, swapped


def adjacent_swap_descent(cost: Tensor, max_sweeps: int | None = None) -> Tensor:
    """The ranking (Q, M) from the identity (the distance order) by odd-even swaps until none applies or
    `max_sweeps` sweeps (default 2M; one sweep = an even and an odd pass)."""
    q, m = cost.shape[:2]
    perm = torch.arange(m, device=cost.device).expand(q, m).clone()
    for _ in range(2 * m if max_sweeps is None else max_sweeps):
        moved = False
        for parity in (0, 1):
            perm, swapped = swap_pass(cost, perm, parity)
            moved |= bool(swapped.any())
        if not moved:
            break
    return perm


def refine_lists(distance: Tensor, neighbors: Tensor, orders: Tensor, alpha: float, lam: float,
                 max_sweeps: int | None = None) -> Tensor:
    """The neighbours (Q, M), nearest first, re-ranked by the descent on Eq. 10's energy."""
    perm = adjacent_swap_descent(pairwise_cost(distance, orders, alpha, lam), max_sweeps)
    return neighbors.gather(1, perm)


def refined_neighbors(query_emb: Tensor, query_feature: Tensor, order_fn: OrderFn, m: int, alpha: float,
                      lam: float, gallery_emb: Tensor | None = None, gallery_feature: Tensor | None = None,
                      max_sweeps: int | None = None, pairs_per_block: int = 2**18) -> Tensor:
    """Each query's top-M (by Euclidean distance on the unit embeddings; leave-one-out without a gallery)
    re-ranked with Ô = order_fn(query feature, neighbours' features), in blocks of queries."""
    leave_one_out = gallery_emb is None
    if leave_one_out:
        gallery_emb, gallery_feature = query_emb, query_feature
    sims, neighbors = topk_search(query_emb, gallery_emb, m, exclude_self=leave_one_out)
    distance = (2 - 2 * sims.float()).clamp_min(0).sqrt().to(query_emb.device)
    neighbors = neighbors.to(query_emb.device)
    rows = max(1, pairs_per_block // (m * m))
    out = []
    for start in range(0, len(neighbors), rows):
        block = slice(start, start + rows)
        with torch.no_grad():
            orders = order_fn(query_feature[block], gallery_feature[neighbors[block]]).float()
        out.append(refine_lists(distance[block], neighbors[block], orders, alpha, lam, max_sweeps))
    return torch.cat(out) if out else neighbors


def recall_from_lists(ranked: Tensor, query_targets: Tensor, gallery_targets: Tensor, ks: Sequence[int],
                      beyond: dict[int, float]) -> dict[int, float]:
    """Recall@K (%) from ranked lists (Q, M): a hit iff a same-class item is among the first K; for K > M
    the ranks are those of the plain search, so `beyond[K]` (the plain Recall@K) is taken as it is."""
    positive = gallery_targets.to(ranked.device)[ranked] == query_targets.to(ranked.device)[:, None]
    m = ranked.shape[1]
    return {int(k): (100.0 * float(positive[:, :k].any(1).float().mean()) if k <= m else beyond[int(k)])
            for k in ks}


def refined_recall_at_k(query_emb: Tensor, query_targets: Tensor, query_feature: Tensor, ks: Sequence[int],
                        order_fn: OrderFn, m: int, alpha: float, lam: float, gallery_emb: Tensor | None = None,
                        gallery_targets: Tensor | None = None, gallery_feature: Tensor | None = None,
                        max_sweeps: int | None = None) -> dict[int, float]:
    """Recall@K after refinement of each query's top-M (M clipped to the gallery size)."""
    if m < 2:
        raise ValueError(f"refinement needs a list of M >= 2 neighbours, got {m}")
    available = len(query_emb) - 1 if gallery_emb is None else len(gallery_emb)
    m = min(m, available)
    plain = metrics.recall_at_k(query_emb, query_targets, ks, gallery_emb, gallery_targets)
    ranked = refined_neighbors(query_emb, query_feature, order_fn, m, alpha, lam, gallery_emb, gallery_feature,
                               max_sweeps)
    targets = query_targets if gallery_targets is None else gallery_targets
    return recall_from_lists(ranked, query_targets, targets, ks, plain)
