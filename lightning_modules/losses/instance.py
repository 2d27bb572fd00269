"""Instance-discrimination losses: ISIF's softmax over instances (Ye et al., CVPR 2019), in its symmetric
2N form (the authors' code) and the paper's literal Eq. 3/4; UMM uses the symmetric form on its means."""
from __future__ import annotations

import torch

from lightning_modules.losses.common import fp32, log1mexp


def _keep_negatives(sim: torch.Tensor, negatives: torch.Tensor, selection: str) -> torch.Tensor:
    """The negatives each row keeps: all, or the most (hard_half) / least (easy_half) similar half."""
    if selection == "all":
        return negatives
    if selection not in ("hard_half", "easy_half"):
        raise ValueError(f"negative_selection {selection!r}: use all, hard_half or easy_half")
    keep = (negatives.shape[1] - 2) // 2  # N-1 of a row's 2N-2 negatives: a half, as Table 8 [R]
    fill = float("-inf") if selection == "hard_half" else float("inf")
    ranked = sim.masked_fill(~negatives, fill)
    picked = ranked.topk(keep, dim=1, largest=selection == "hard_half").indices
    return torch.zeros_like(negatives).scatter_(1, picked, True)


@fp32
def isif_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, detach_candidates: bool = True,
              negative_selection: str = "all") -> dict[str, torch.Tensor]:
    """Symmetric ISIF loss on two views (N, d) of unit-norm rows; fp32 and log-space.

    Returns {"loss", "positive", "negative"}: loss = positive + negative, each a mean over 2N anchors.
    """
    z = torch.cat([z1, z2])
    n = z.shape[0]
    candidates = z.detach() if detach_candidates else z
    sim = z @ candidates.T / temperature
    rows = torch.arange(n, device=z.device)
    pos = (rows + n // 2) % n
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    negatives = ~eye
    negatives[rows, pos] = False
    kept = _keep_negatives(sim.detach(), negatives, negative_selection)
    candidate_mask = kept.clone()
    candidate_mask[rows, pos] = True
    logits = sim.masked_fill(~candidate_mask, float("-inf"))
    logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = -logp[rows, pos].sum() / n
    negative = -torch.where(kept, log1mexp(logp.masked_fill(~kept, -1.0)), 0.0).sum() / n
    return {"loss": positive + negative, "positive": positive, "negative": negative}


@fp32
def isif_loss_literal(f: torch.Tensor, f_hat: torch.Tensor, temperature: float = 0.1,
                      detach_candidates: bool = True) -> dict[str, torch.Tensor]:
    """The paper's Eq. 3/4/7 read literally (`variant: literal`, docs/methods/isif.md), divided by m = number of instances.

    positive: -log P(i | x̂_i), softmax of f̂_i against all branch-1 features {f_k};
    negative: -Σ_{j≠i} log(1 - P(i | x_j)), softmax of f_j against {f_k}, self (k = j) included.
    """
    m = f.shape[0]
    candidates = f.detach() if detach_candidates else f
    rows = torch.arange(m, device=f.device)
    logp_pos = torch.log_softmax(f_hat @ candidates.T / temperature, dim=1)[rows, rows]
    logp_neg = torch.log_softmax(f @ candidates.T / temperature, dim=1)  # row j, column i: log P(i | x_j)
    off_diagonal = ~torch.eye(m, dtype=torch.bool, device=f.device)
    positive = -logp_pos.sum() / m
    negative = -torch.where(off_diagonal, log1mexp(logp_neg.masked_fill(~off_diagonal, -1.0)), 0.0).sum() / m
    return {"loss": positive + negative, "positive": positive, "negative": negative}
