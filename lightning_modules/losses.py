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
                          threshold: float = 0.5, margin: float = 0.1) -> torch.Tensor:
    """Multi-Similarity loss with its hard mining (Wang et al. 2019): pytorch-metric-learning's
    `MultiSimilarityMiner(epsilon=margin)` and `MultiSimilarityLoss(alpha, beta, base=threshold)`, mean over
    the B queries (an anchor the miner leaves without pairs counts as 0, as in the MS code).

    `keys=None`: the keys are the queries themselves (the batch term; i is not its own positive). Otherwise
    the keys are a memory (cross-batch memory: no diagonal to exclude).

    The library's per-anchor math is called below its `forward`, whose guard returns a zero loss whenever at
    most one positive and one negative pair were mined: a real anchor pair would train nothing.
    """
    losses, miners = _multi_similarity()
    loss = losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=threshold)
    mined = miners.MultiSimilarityMiner(epsilon=margin)(query, query_labels, keys, key_labels)
    sim = loss.distance(query, query if keys is None else keys)
    positive, negative = torch.zeros_like(sim), torch.zeros_like(sim)
    positive[mined[0], mined[1]] = 1
    negative[mined[2], mined[3]] = 1
    return loss._compute_loss(sim, positive, negative)["loss"]["losses"].mean()


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
