"""Pair- and proxy-based metric losses (pure: tensors in, tensors out): Multi-Similarity with its miner, CBML,
XBM's contrastive memory loss, Proxy-Anchor; pytorch-metric-learning does the arithmetic where it can."""
from __future__ import annotations

import math

import torch

from lightning_modules.losses.common import fp32


def _log_one_plus_sum_exp(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log(1 + Σ_{j in mask} e^{x_j}) per row, 0 for a row without pairs (finite, gradients included)."""
    return torch.cat([x.masked_fill(~mask, -math.inf), x.new_zeros(len(x), 1)], 1).logsumexp(1)


@fp32
def multi_similarity_loss(query: torch.Tensor, query_labels: torch.Tensor, keys: torch.Tensor | None = None,
                          key_labels: torch.Tensor | None = None, alpha: float = 2.0, beta: float = 40.0,
                          threshold: float = 0.5, margin: float = 0.1,
                          exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-Similarity loss with its hard mining (Wang et al. 2019), mean over the B queries of

      (1/α) log(1 + Σ_{P̂_i} e^{−α(s − λ)}) + (1/β) log(1 + Σ_{N̂_i} e^{β(s − λ)}),  s cosine, λ = threshold,

    on the pairs `ms_mined_pairs` keeps (the miner's rule, ε = margin); an anchor left without pairs counts 0.
    Equal to pytorch-metric-learning's `MultiSimilarityMiner(epsilon=margin)` + `MultiSimilarityLoss(alpha,
    beta, base=threshold)` (tests/test_host_syncs.py checks it), written on masks: the library's public
    path takes index pairs, whose `nonzero` waits for the device every step, and its `forward` zeroes the
    loss whenever at most one positive and one negative pair were mined.

    `keys=None`: the keys are the queries themselves (the batch term; i is not its own positive). Otherwise
    the keys are a memory (cross-batch memory: no diagonal to exclude). `exclude` (B, M) bool: query-key
    pairs that are neither positive nor negative (a memory's copies of the query itself,
    `IndexedMemory.own_copies`).
    """
    keys_given = keys is not None
    if exclude is not None and not keys_given:
        raise ValueError("exclude masks query-key pairs of a memory: pass keys and key_labels too")
    keys, key_labels = (keys, key_labels) if keys_given else (query, query_labels)
    sim = torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(keys, dim=1).T
    same = query_labels[:, None] == key_labels[None, :]
    if exclude is not None:
        valid = ~exclude
    elif keys_given:
        valid = torch.ones_like(same)
    else:
        valid = ~torch.eye(*sim.shape, dtype=torch.bool, device=sim.device)
    positive, negative = ms_mined_pairs(sim, same, valid, margin)
    return (_log_one_plus_sum_exp(-alpha * (sim - threshold), positive) / alpha
            + _log_one_plus_sum_exp(beta * (sim - threshold), negative) / beta).mean()


def ms_mined_pairs(sim: torch.Tensor, same: torch.Tensor, valid: torch.Tensor,
                   margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) bool masks of the MS miner's hard pairs among the `valid` ones: a candidate
    positive is kept when s − ε < the row's largest candidate-negative s, a candidate negative when
    s + ε > the row's smallest candidate-positive s (a row without candidates of the other kind keeps none)."""
    positive, negative = same & valid, ~same & valid
    largest_negative = sim.masked_fill(~negative, -math.inf).amax(1, keepdim=True)
    smallest_positive = sim.masked_fill(~positive, math.inf).amin(1, keepdim=True)
    return positive & (sim - margin < largest_negative), negative & (sim + margin > smallest_positive)


@fp32
def cbml_loss(query: torch.Tensor, query_labels: torch.Tensor, keys: torch.Tensor, key_labels: torch.Tensor,
              pos_a: float = 0.5, pos_b: float = 0.5, neg_a: float = 1.0, neg_b: float = 0.01,
              margin: float = 0.1, variance_weight: float = 1.0, h: float = 0.1,
              variance: str = "sum") -> torch.Tensor:
    """The contrastive Bayesian (CBML) loss of Kan et al. ("Contrastive Bayesian Analysis for Supervised Deep
    Metric Learning", the dissertation's [126]; defaults from the authors' public configuration) of unit
    queries against keys (a memory), mean over the B queries. For query i, with cosine similarities s:

      candidates: P_i = same label, s < 1 − 1e-5 (not the query itself); N_i = other labels
      μ_i = h·mean_{P_i}(s) + (1 − h)·mean_{N_i}(s);  V_i = Σ_{N_i} (s − μ_i)²  (`variance="mean"`: the mean)
      mined (MS rule, ε = margin): P̂_i = {p ∈ P_i: s_p − ε < max_{N_i} s}, N̂_i = {n ∈ N_i: s_n + ε > min_{P_i} s}
      L_i = log(1 + Σ_{P̂_i} e^{−(s − a_p)/b_p}) + log(1 + Σ_{N̂_i} e^{(s − a_n)/b_n}) + w·V_i

    a query without candidates of both kinds, or without mined pairs of both kinds, counts 0. The positive
    and negative terms are the log-likelihood-ratio-shaped penalties of the two similarity distributions;
    V_i the negatives' marginal variance around a point between the two class-conditional means."""
    if variance not in ("sum", "mean"):
        raise ValueError(f"cbml variance {variance!r}: use sum or mean")
    sim = query @ keys.T
    same = query_labels[:, None] == key_labels[None, :]
    positive, negative = same & (sim < 1 - 1e-5), ~same
    count_pos, count_neg = positive.sum(1), negative.sum(1)
    mu = (h * (sim * positive).sum(1) / count_pos.clamp_min(1)
          + (1 - h) * (sim * negative).sum(1) / count_neg.clamp_min(1))
    spread = ((sim - mu[:, None]).square() * negative).sum(1)
    if variance == "mean":
        spread = spread / count_neg.clamp_min(1)
    hard_pos, hard_neg = ms_mined_pairs(sim, same, positive | negative, margin)
    pos_term = torch.nn.functional.softplus(((pos_a - sim) / pos_b).masked_fill(~hard_pos, -math.inf)
                                            .logsumexp(1))
    neg_term = torch.nn.functional.softplus(((sim - neg_a) / neg_b).masked_fill(~hard_neg, -math.inf)
                                            .logsumexp(1))
    active = (count_pos > 0) & (count_neg > 0) & hard_pos.any(1) & hard_neg.any(1)
    per_query = torch.where(active, pos_term + neg_term + variance_weight * spread, torch.zeros_like(mu))
    return per_query.sum() / len(query)


@fp32
def contrastive_memory_loss(query: torch.Tensor, query_labels: torch.Tensor, keys: torch.Tensor,
                            key_labels: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """XBM's contrastive memory loss on unit embeddings, through pytorch-metric-learning's `ContrastiveLoss`
    (cosine similarity, pos_margin 1, neg_margin `margin`, summed over pairs): for each query, Σ_pos (1 − s)
    + Σ_neg,s>margin (s − margin), divided by the number of queries. Positive pairs with s >= 1 − 1e-5 (a
    key equal to its query) are left out, as in the XBM code. XBM's negative term is s rather than
    s − margin: the same gradient, the value lower by `margin` per active negative."""
    from pytorch_metric_learning import distances, losses, reducers
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    anchor_p, positive, anchor_n, negative = lmu.get_all_pairs_indices(query_labels, key_labels)
    keep = (query[anchor_p] * keys[positive]).sum(1) < 1 - 1e-5
    loss = losses.ContrastiveLoss(pos_margin=1.0, neg_margin=margin, distance=distances.CosineSimilarity(),
                                  reducer=reducers.SumReducer())
    pairs = (anchor_p[keep], positive[keep], anchor_n, negative)
    return loss(query, query_labels, pairs, keys, key_labels) / len(query)


def proxy_anchor_loss(num_classes: int, embedding_dim: int, alpha: float = 32.0,
                      margin: float = 0.1) -> torch.nn.Module:
    """pytorch-metric-learning's Proxy-Anchor loss (Kim et al. 2020): a module holding the class proxies
    (learnable; the PA code trains them at 100x the lr, a `lr_mult` on the module's name)."""
    from pytorch_metric_learning import losses

    return losses.ProxyAnchorLoss(num_classes, embedding_dim, margin=margin, alpha=alpha)


@fp32
def proxy_anchor(proxies: torch.nn.Module, embedding: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Apply a `proxy_anchor_loss` module in fp32: its logits alpha * s (alpha = 32) lose precision in bf16."""
    return proxies(embedding, labels)
