"""Loss pieces shared by several methods (pure: tensors in, tensors out)."""
from __future__ import annotations

import functools
import math

import torch

LOG_ONE_MINUS_EPS = math.log1p(-1e-6)  # clamp P <= 1 - 1e-6 before log(1 - P)


def fp32(loss_fn):
    """Run a loss in fp32 with autocast off: logits of 1/tau = 10 or beta = 40 overflow half precision."""

    @functools.wraps(loss_fn)
    def wrapper(*args, **kwargs):
        args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        device = next((a.device.type for a in args if torch.is_tensor(a)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return loss_fn(*args, **kwargs)

    return wrapper


def log1mexp(logp: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(logp)) for logp <= 0, accurate at both ends (Maechler 2012); P clamped below 1."""
    logp = logp.clamp(max=LOG_ONE_MINUS_EPS)
    return torch.where(logp > -math.log(2), torch.log(-torch.expm1(logp)), torch.log1p(-torch.exp(logp)))


def _multi_similarity():
    """pytorch-metric-learning's MS loss and miner, imported on first use (the import costs a second)."""
    from pytorch_metric_learning import losses, miners

    return losses, miners


@fp32
def multi_similarity_loss(query: torch.Tensor, query_labels: torch.Tensor, keys: torch.Tensor | None = None,
                          key_labels: torch.Tensor | None = None, alpha: float = 2.0, beta: float = 40.0,
                          threshold: float = 0.5, margin: float = 0.1,
                          exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-Similarity loss with its hard mining (Wang et al. 2019): pytorch-metric-learning's
    `MultiSimilarityMiner(epsilon=margin)` and `MultiSimilarityLoss(alpha, beta, base=threshold)`, mean over
    the B queries (an anchor the miner leaves without pairs counts as 0, as in the MS code).

    `keys=None`: the keys are the queries themselves (the batch term; i is not its own positive). Otherwise
    the keys are a memory (cross-batch memory: no diagonal to exclude). `exclude` (B, M) bool: query-key
    pairs that are neither positive nor negative (a memory's copies of the query itself,
    `IndexedMemory.own_copies`); mined by `ms_mined_pairs`, the miner's rule on masks.

    The library's per-anchor math is called below its `forward`, whose guard returns a zero loss whenever at
    most one positive and one negative pair were mined: a real anchor pair would train nothing.
    """
    losses, _ = _multi_similarity()
    loss = losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=threshold)
    sim = loss.distance(query, query if keys is None else keys)
    if exclude is not None:
        if keys is None:
            raise ValueError("exclude masks query-key pairs of a memory: pass keys and key_labels too")
        positive, negative = ms_mined_pairs(sim, query_labels[:, None] == key_labels[None, :], ~exclude, margin)
        return loss._compute_loss(sim, positive.float(), negative.float())["loss"]["losses"].mean()
    # the miner's pairs as masks (equal to MultiSimilarityMiner's index pairs, whose nonzero blocks the host)
    same = query_labels[:, None] == (query_labels if keys is None else key_labels)[None, :]
    valid = ~torch.eye(*sim.shape, dtype=torch.bool, device=sim.device) if keys is None else torch.ones_like(same)
    positive, negative = ms_mined_pairs(sim, same, valid, margin)
    return loss._compute_loss(sim, positive.float(), negative.float())["loss"]["losses"].mean()


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


def gradient_shares(terms: dict[str, torch.Tensor], wrt: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each (already weighted) loss term's share of the summed gradient norms at `wrt` (an activation the
    terms reach, e.g. the embeddings): ‖∂term/∂wrt‖ / Σ_terms ‖∂term/∂wrt‖. Keeps the graph (call before
    the backward); a term that does not reach `wrt` has share 0. Shows whether a scaled term is alive."""
    norms = {}
    for name, term in terms.items():
        grad = torch.autograd.grad(term, wrt, retain_graph=True, allow_unused=True)[0] if term.requires_grad else None
        norms[name] = torch.zeros((), device=wrt.device) if grad is None else grad.detach().float().norm()
    total = sum(norms.values()).clamp_min(1e-30)
    return {name: norm / total for name, norm in norms.items()}


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
