"""Test-time refinement (callbacks/refine.py): the energy of Eq. 10, the odd-even swap descent, and the
refined Recall@K against a brute-force re-ranking."""
import itertools
import math

import pytest
import torch

from callbacks.evaluation import EmbeddingEvaluator
from callbacks.refine import (
    adjacent_swap_descent,
    entries,
    pairwise_cost,
    ranking_energy,
    refine_lists,
    refined_recall_at_k,
    swap_pass,
)
from embedding_core import metrics


def orders_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """Ô(n, m) = tanh(s_n − s_m): a consistent (transitive) belief that a higher score is closer."""
    return torch.tanh(scores[:, :, None] - scores[:, None, :])


def test_cost_and_energy_by_hand():
    distance = torch.tensor([[0.5, 0.7]])
    orders = torch.tensor([[[0.0, -0.5], [0.5, 0.0]]])
    cost = pairwise_cost(distance, orders, alpha=10.0, lam=1.0)
    assert cost[0, 0, 1].item() == pytest.approx(math.exp(-2.0) + 1.5)
    assert cost[0, 1, 0].item() == pytest.approx(math.exp(2.0) + 0.5)
    assert ranking_energy(cost, torch.tensor([[0, 1]])).item() == pytest.approx(math.exp(-2.0) + 1.5)
    assert ranking_energy(cost, torch.tensor([[1, 0]])).item() == pytest.approx(math.exp(2.0) + 0.5)


def test_every_descent_step_lowers_the_energy_by_exactly_the_swapped_pairs_cost_difference():
    generator = torch.Generator().manual_seed(0)
    q, m = 6, 9
    distance = torch.rand(q, m, generator=generator).sort(1).values
    orders = torch.tanh(3 * torch.randn(q, m, m, generator=generator))
    orders = (orders - orders.transpose(1, 2)) / 2
    cost = pairwise_cost(distance, orders, alpha=2.0, lam=1.0).double()
    perm = torch.arange(m).expand(q, m).clone()
    swaps = 0
    for step in range(4 * m):
        parity = step % 2
        starts = torch.arange(parity, m - 1, 2)
        a, b = perm[:, starts], perm[:, starts + 1]
        new, swapped = swap_pass(cost, perm, parity)
        drop = ranking_energy(cost, perm) - ranking_energy(cost, new)
        expected = ((entries(cost, a, b) - entries(cost, b, a)) * swapped).sum(1)
        assert torch.allclose(drop, expected, atol=1e-12)
        assert (drop[swapped.any(1)] > 0).all()
        swaps += int(swapped.sum())
        perm = new
    assert swaps > 0
    assert torch.equal(perm, adjacent_swap_descent(cost))


def test_a_list_whose_orders_agree_with_the_distances_is_left_as_it_is():
    distance = torch.tensor([[0.1, 0.2, 0.25, 0.6, 0.61]])
    orders = orders_from_scores(-10 * distance)  # "closer" exactly where the distance is smaller
    perm = adjacent_swap_descent(pairwise_cost(distance, orders, alpha=10.0, lam=1.0))
    assert perm.tolist() == [[0, 1, 2, 3, 4]]


def test_a_confident_order_overturns_a_small_distance_gap_but_never_a_large_one():
    distance = torch.tensor([[0.50, 0.52, 0.90]])
    orders = torch.zeros(1, 3, 3)
    orders[0, 1, 0], orders[0, 0, 1] = 0.9, -0.9   # item 1 is confidently closer than item 0 (gap 0.02)
    orders[0, 2, 0], orders[0, 0, 2] = 0.9, -0.9   # item 2 as confidently closer than item 0, but gap 0.40
    orders[0, 2, 1], orders[0, 1, 2] = 0.9, -0.9
    neighbors = torch.tensor([[10, 11, 12]])
    ranked = refine_lists(distance, neighbors, orders, alpha=10.0, lam=1.0)
    assert ranked.tolist() == [[11, 10, 12]]
    # λ = 0: the distance order whatever Φ says
    assert refine_lists(distance, neighbors, orders, alpha=10.0, lam=0.0).tolist() == [[10, 11, 12]]


def energy(p, d, o, alpha, lam) -> float:
    """Eq. 10 for the ranking p of a list with distances d and orders o, pair by pair."""
    return sum(math.exp(alpha * (d[a] - d[b])) + lam * (1 - o[a, b]) for i, a in enumerate(p) for b in p[i + 1:])


def brute_force_recall(emb, targets, features, score, ks, m, alpha, lam):
    """Per query: the top-M by distance, the permutation of it with the least Eq. 10 energy (all M!),
    then the remaining items by distance; Recall@K by looking at the lists."""
    hits = {k: 0 for k in ks}
    n = len(emb)
    for q in range(n):
        distance = (emb - emb[q]).norm(dim=1)
        distance[q] = math.inf
        order = torch.argsort(distance, stable=True).tolist()[: n - 1]
        top = order[:m]
        s = torch.stack([score(features[q], features[i]) for i in top])
        o = torch.tanh(s[:, None] - s[None, :])
        d = distance[top]
        best = min(itertools.permutations(range(m)), key=lambda p, d=d, o=o: energy(p, d, o, alpha, lam))
        ranked = [top[i] for i in best] + order[m:]
        for k in ks:
            hits[k] += any(targets[i] == targets[q] for i in ranked[:k])
    return {k: 100.0 * v / n for k, v in hits.items()}


def test_refined_recall_equals_a_brute_force_re_ranking():
    generator = torch.Generator().manual_seed(3)
    n, m, ks = 12, 4, [1, 2, 3, 4, 6]
    emb = torch.nn.functional.normalize(torch.randn(n, 5, generator=generator), dim=1)
    targets = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    # well-separated scores: each pair's preference follows Φ (λ tanh(≥1) > sinh(α·2)), so the descent's
    # fixed point is the exact minimiser and the brute force can check it
    features = torch.randperm(n, generator=generator).float()[:, None]

    def score(anchor, item):
        return item[0] * (1.0 + 0 * anchor[0])

    def order_fn(anchor, items):
        return orders_from_scores(items[..., 0] + 0 * anchor[:, :1])

    alpha, lam = 0.1, 5.0
    got = refined_recall_at_k(emb, targets, features, ks, order_fn, m, alpha, lam)
    expected = brute_force_recall(emb, targets, features, score, ks, m, alpha, lam)
    assert got == pytest.approx(expected)
    assert got != refined_recall_at_k(emb, targets, features, ks, order_fn, m, alpha, 0.0)  # Φ changed lists


def test_query_to_gallery_refinement_without_orders_is_plain_recall():
    generator = torch.Generator().manual_seed(1)
    queries = torch.nn.functional.normalize(torch.randn(20, 6, generator=generator), dim=1)
    gallery = torch.nn.functional.normalize(torch.randn(30, 6, generator=generator), dim=1)
    query_targets, gallery_targets = torch.arange(20) % 5, torch.arange(30) % 5
    ks = [1, 2, 4, 8]

    def order_fn(anchor, items):
        return torch.zeros(items.shape[0], items.shape[1], items.shape[1])

    got = refined_recall_at_k(queries, query_targets, queries, ks, order_fn, 8, 10.0, 1.0, gallery, gallery_targets,
                              gallery)
    assert got == pytest.approx(metrics.recall_at_k(queries, query_targets, ks, gallery, gallery_targets))


def test_the_evaluator_refuses_a_one_item_list():
    with pytest.raises(ValueError, match="refine_m"):
        EmbeddingEvaluator(refine_m=1)
