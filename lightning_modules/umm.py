"""UMM: Unsupervised Embedding Learning from Uncertainty Momentum Modeling (Zhou et al., TPAMI).

Each view of each image is a diagonal Gaussian N(μ, diag σ²) (`GaussianHead`); k reparameterised,
L2-normalised draws per view are its positive candidates. The loss is Eq. 13,
  L = L_S + λ_N L_N + λ_R L_R,
with L_S the set-to-set softmax (Eqs. 5-7), L_N the symmetric KL between the two views' Gaussians
(Eqs. 8-10) and L_R = 1 - mAP of a histogram-binned ranking of every candidate in the batch (Eqs. 11-12).
Every term is a mean per instance (per query for L_R), as the λ's "balance the scale with L_S" (paper §4.1.1).
L_N is also a mean over the D dimensions by default (`consistency_reduction`). Summed over D = 128, as
Eq. 8 prints it, λ_N L_N at initialisation is 200-1,400 (by batch) for the paper's λ_N = 10 (CIFAR, STL)
against L_S ≈ log n ≈ 5 and λ_R L_R ≈ 7-10: σ² runs to its clamp and the candidates become noise. The mean
brings it to 2-11, the scale of the terms the paper's λ's "balance" (and the paper never weights L_N above
L_R: 10/10, 0.2/2, 0.1/0.1, which fits two O(1) terms). "sum" keeps Eq. 8 as printed. Equal loss values are
not equal pulls: L_N pulls the two views' μ together with weight λ_N / (D σ²), so on digits λ_N = 10 has 3.3x
L_S's gradient on μ at the first step and collapses μ within 4 steps; umm/digits.yaml uses λ_N = 0.64. Each
term's share of the gradient on μ is logged (`train/grad_share/*`); see docs/methods/umm.md.
k (`num_samples`) is set each epoch by `callbacks.k_schedule.KSchedule` through `set_num_samples`.
There is no momentum encoder, queue or memory bank: "momentum" is the paper's metaphor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from embedding_core.distances import l2_normalize
from lightning_modules.base import EmbeddingModule
from lightning_modules.heads import GaussianHead
from lightning_modules.losses.common import fp32, gradient_shares
from lightning_modules.losses.instance import isif_loss

SOFTMAX_MODES = ("literal", "symmetric", "isif_2n")
RANKING_POOLS = ("both_views", "single_view_literal")
CONSISTENCY_REDUCTIONS = ("mean", "sum")
SHARE_EVERY = 10  # steps between two logs of the terms' gradient shares on μ


@fp32
def sample_candidates(mu: torch.Tensor, logvar: torch.Tensor, num_samples: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """k positive candidates per instance, z = normalize(μ + σ ⊙ ε): (B, k, D) from (B, C, D) moments.

    Reparameterised, so L_S and L_R reach σ as well as μ; fresh noise per call and per view.
    Candidate u comes from mixture component u mod C (equal weights, stratified), so C = 1 is Eq. 2.
    """
    component = torch.arange(num_samples, device=mu.device) % mu.shape[1]
    mean, std = mu[:, component], torch.exp(0.5 * logvar[:, component])
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return l2_normalize(mean + std * noise)


@fp32
def set_softmax_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1,
                     mode: str = "literal") -> torch.Tensor:
    """L_S on candidate sets (n, k, D) of the two views, mean over the n anchors.

    The Eq. 5 set-to-set similarity (1/k²) Σ_u Σ_t z_iᵘ·z_jᵗ equals m_i·m_j with m the unnormalised
    candidate mean: O(nkD + n²D) instead of (nk)². ‖m‖ < 1 shrinks as σ grows; that is how the uncertainty
    softens the logits, so m is not re-normalised. mode: "literal" = Eq. 6 (anchor x'_i against the
    first-view sets), "symmetric" = both directions averaged, "isif_2n" = ISIF's 2n-set loss on the means.
    """
    if mode not in SOFTMAX_MODES:
        raise ValueError(f"softmax mode {mode!r}: use one of {', '.join(SOFTMAX_MODES)}")
    m1, m2 = z1.mean(dim=1), z2.mean(dim=1)
    if mode == "isif_2n":
        return isif_loss(m1, m2, temperature)["loss"]
    logits = m2 @ m1.T / temperature
    target = torch.arange(len(logits), device=logits.device)
    loss = F.cross_entropy(logits, target)
    if mode == "symmetric":
        return (loss + F.cross_entropy(logits.T, target)) / 2
    return loss


@fp32
def distribution_consistency_loss(mu1: torch.Tensor, logvar1: torch.Tensor, mu2: torch.Tensor,
                                  logvar2: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """L_N: KL(N‖N') + KL(N'‖N) of diagonal Gaussians (..., D), mean over the leading dimensions.

    In the symmetric sum the log-determinants cancel, leaving variance ratios and a Mahalanobis term under
    both precisions. Alone it is lowered by inflating σ; L_S and L_R push back.
    reduction over D: "mean" (default) keeps λ_N L_N on the scale of L_S for the paper's λ_N, whatever D;
    "sum" is the KL of Eq. 8 as printed, D times larger.
    """
    if reduction not in CONSISTENCY_REDUCTIONS:
        raise ValueError(f"consistency reduction {reduction!r}: use one of {', '.join(CONSISTENCY_REDUCTIONS)}")
    ratio = logvar1 - logvar2
    mahalanobis = (mu1 - mu2).pow(2) * (torch.exp(-logvar1) + torch.exp(-logvar2))
    per_dimension = 0.5 * (torch.exp(ratio) + torch.exp(-ratio) - 2 + mahalanobis)
    return (per_dimension.mean(dim=-1) if reduction == "mean" else per_dimension.sum(dim=-1)).mean()


def _binned(index: torch.Tensor, frac: torch.Tensor, bins: int) -> torch.Tensor:
    """Triangular-kernel histograms (Q, B + 1) of entries at bin `index` + `frac` (1 - frac to the bin, frac
    to the next): a count minus one scatter of `frac`, plus the same scatter shifted by one bin. A spare
    column takes the zero `frac` of similarities of exactly -1 (index B)."""
    upper = frac.new_zeros(len(frac), bins + 2).scatter_add(1, index, frac)
    count = frac.new_zeros(len(frac), bins + 2).scatter_add_(1, index, frac.new_ones(1).expand_as(frac))
    return (count - upper + F.pad(upper[:, :-1], (1, 0)))[:, : bins + 1]


@fp32
def histogram_average_precision(sim: torch.Tensor, positive: torch.Tensor, bins: int = 20,
                                excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable AP of each query row of `sim` (Q, M) (He et al., CVPR 2018 binning).

    positive (Q, P) and excluded (Q, E) hold column indices: each query's positives, and the columns left
    out of its list (e.g. the query itself). Similarities in [-1, 1] fall on B + 1 bin centres 1 - bΔ
    (Δ = 2/B, b = 0 most similar) through the triangular kernel, so each weighs on exactly two adjacent
    bins: the histograms are `scatter_add`s of (Q, M) weights into (Q, B + 1) bins, memory O(Q·M + Q·B),
    never the dense (Q, M, B + 1) kernel tensor; the positive and excluded ones cost O(Q·P) and O(Q·E).
    AP = (1/P) Σ_b h⁺_b H⁺_b / H_b, H the cumulative histograms: exact AP when every similarity sits on
    its own bin centre; between centres the mass split over two bins biases it (the estimator of [35]).
    """
    position = sim.mul(-bins / 2.0).add_(bins / 2.0)  # (1 - sim) / Δ, in [0, B] up to rounding
    index = position.detach().long().clamp_(0, bins)  # truncation = floor for position >= 0
    frac = position.frac_()  # in place (gradient 1): no second (Q, M) float tensor
    h = _binned(index, frac, bins)
    if excluded is not None:
        h = h - _binned(index.gather(1, excluded), frac.gather(1, excluded), bins)
    h_pos = _binned(index.gather(1, positive), frac.gather(1, positive), bins)
    precision = h_pos.cumsum(dim=1) / h.cumsum(dim=1).clamp_min(1e-12)
    return (h_pos * precision).sum(dim=1) / positive.shape[1]


def _query_ap(items: torch.Tensor, rows: torch.Tensor, n: int, k: int, bins: int,
              exclude_self: bool) -> torch.Tensor:
    """AP of the pool rows `rows` against the whole pool, laid out as (views, n instances, k candidates):
    the positives of a row are its instance's candidates in every view."""
    instance = (rows // k) % n
    own = torch.arange(k, device=rows.device)
    positive = torch.cat([(view * n + instance[:, None]) * k + own for view in range(len(items) // (n * k))], 1)
    excluded = None
    if exclude_self:
        # each row's positives without the row itself (once in each), in order: a stable sort moves it last
        # (a boolean-mask gather would block the host)
        last = torch.argsort((positive == rows[:, None]).to(torch.uint8), dim=1, stable=True)[:, :-1]
        positive = positive.gather(1, last)
        excluded = rows[:, None]
    return histogram_average_precision(items[rows] @ items.T, positive, bins, excluded)


@fp32
def ranking_loss(z1: torch.Tensor, z2: torch.Tensor, bins: int = 20, pool: str = "both_views",
                 shard: tuple[int, int] = (0, 1), chunk: int | None = None) -> torch.Tensor:
    """L_R = 1 - mAP: every candidate queries the pool of candidates (n, k, D per view) by cosine.

    pool "both_views" (default [R]): the 2nk candidates of both views, the query left out of its own
    list; positives are the other 2k - 1 candidates of its image (never degenerate, also at k = 1).
    "single_view_literal": the nk first-view candidates as Eq. 11 reads, the query one of its own k
    positives (AP ≡ 1 at k = 1). `shard` = (i, count) scores only the i-th of `count` equal query slices,
    so DDP ranks split the (2nk)² work (the mean of their losses is the full loss). `chunk` bounds memory
    to O(chunk · 2nk): query chunks are recomputed in backward (activation checkpointing), not stored.
    """
    if pool == "both_views":
        items = torch.cat([z1, z2]).flatten(0, 1)
    elif pool == "single_view_literal":
        items = z1.flatten(0, 1)
    else:
        raise ValueError(f"ranking pool {pool!r}: use one of {', '.join(RANKING_POOLS)}")
    n, k = z1.shape[:2]
    queries = torch.arange(len(items), device=z1.device).chunk(shard[1])[shard[0]]
    exclude_self = pool == "both_views"
    if chunk is None:
        ap = _query_ap(items, queries, n, k, bins, exclude_self)
    else:
        ap = torch.cat([checkpoint(_query_ap, items, rows, n, k, bins, exclude_self, use_reentrant=False)
                        for rows in queries.split(chunk)])
    return 1.0 - ap.mean()


def mu_gradient_shares(weighted: dict[str, torch.Tensor], mu: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"grad_share/<term>"}: each weighted term's gradient norm on μ over the sum of the three norms
    (`losses.common.gradient_shares`). Backward from the losses to μ only (not through the trunk). The
    balance to watch: λ_N L_N pulls the two views' μ together with weight λ_N / (D σ²), so its share grows as
    σ² shrinks, and above L_S's it collapses μ (docs/methods/umm.md)."""
    return {f"grad_share/{name}": share.detach() for name, share in gradient_shares(weighted, mu).items()}


class UMM(EmbeddingModule):
    """UMM on two views per instance; the evaluation embedding is l2norm(μ) (`GaussianHead.forward`).

    temperature, lambda_n, lambda_r: τ, λ_N, λ_R of Eq. 13.
    consistency_reduction: L_N over the D dimensions, "mean" (default) or "sum" (Eq. 8 as printed; the
      paper's λ_N then overwhelms L_S, see the module docstring).
    num_samples: k until a `KSchedule` sets it (`set_num_samples`).
    components: C Gaussians per image (Eq. 3); every published number uses C = 1.
    variance, logvar_range: the σ² parameterisation of `GaussianHead` (docs/methods/umm.md).
    softmax_mode: L_S form, see `set_softmax_loss`. ranking_pool, bins, ranking_chunk: see `ranking_loss`.
    gather_negatives: under DDP, L_S sees all ranks' candidate sets and L_R all ranks' candidates (each
      rank scoring an equal share of the queries); gradients flow back to each rank's own rows.
    """

    def __init__(self, temperature: float = 0.1, lambda_n: float = 10.0, lambda_r: float = 10.0,
                 num_samples: int = 5, components: int = 1, variance: str = "exp",
                 logvar_range: tuple[float, float] = (-10.0, 2.0), softmax_mode: str = "literal",
                 ranking_pool: str = "both_views", bins: int = 20, ranking_chunk: int | None = None,
                 gather_negatives: bool = True, consistency_reduction: str = "mean", **kwargs):
        super().__init__(**kwargs)
        if consistency_reduction not in CONSISTENCY_REDUCTIONS:
            raise ValueError(f"consistency_reduction {consistency_reduction!r}: use one of "
                             f"{', '.join(CONSISTENCY_REDUCTIONS)} (mean over D is the default)")
        if softmax_mode not in SOFTMAX_MODES:
            raise ValueError(f"softmax_mode {softmax_mode!r}: use one of {', '.join(SOFTMAX_MODES)}")
        if ranking_pool not in RANKING_POOLS:
            raise ValueError(f"ranking_pool {ranking_pool!r}: use one of {', '.join(RANKING_POOLS)}")
        if bins < 1:
            raise ValueError(f"bins {bins}: use B >= 1 histogram bins over [-1, 1] (20 by default)")
        self.head = GaussianHead(self.trunk.out_dim, self.hparams.embedding_dim, components=components,
                                 variance=variance, logvar_range=logvar_range)
        self.temperature, self.lambda_n, self.lambda_r = temperature, lambda_n, lambda_r
        self.softmax_mode, self.ranking_pool, self.bins = softmax_mode, ranking_pool, bins
        self.ranking_chunk, self.gather_negatives = ranking_chunk, gather_negatives
        self.consistency_reduction = consistency_reduction
        self.set_num_samples(num_samples)

    def set_num_samples(self, k: int) -> None:
        """The hook `KSchedule` calls at every epoch start: the number of candidates drawn per view."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"num_samples {k!r}: k must be an integer >= 1")
        self.num_samples = k

    def loss_terms(self, v1: torch.Tensor, v2: torch.Tensor, shares: bool = False) -> tuple[
            dict, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eq. 13 on two views of a batch: {"loss", each unweighted term (and with `shares` each weighted
        term's share of the gradient on μ)}, μ and log σ² (2n, C, D) and the first view's candidates
        (n, k, D), the last three for the diagnostics."""
        mu, logvar = (t.float() for t in self.head.moments(self.pooled(torch.cat([v1, v2]))))
        z1, z2 = sample_candidates(mu, logvar, self.num_samples).chunk(2)
        (mu1, mu2), (logvar1, logvar2) = mu.chunk(2), logvar.chunk(2)
        consistency = distribution_consistency_loss(mu1, logvar1, mu2, logvar2, self.consistency_reduction)
        shard = (0, 1)
        if self.gather_negatives:
            z1, z2 = self.gather(z1), self.gather(z2)
            shard = (self.global_rank, self.trainer.world_size)
        set_softmax = set_softmax_loss(z1, z2, self.temperature, self.softmax_mode)
        ranking = ranking_loss(z1, z2, self.bins, self.ranking_pool, shard, self.ranking_chunk)
        loss = set_softmax + self.lambda_n * consistency + self.lambda_r * ranking
        terms = {"loss": loss, "set_softmax": set_softmax, "consistency": consistency, "ranking": ranking}
        if shares and torch.is_grad_enabled() and mu.requires_grad:
            terms.update(mu_gradient_shares({"set_softmax": set_softmax, "consistency": self.lambda_n * consistency,
                                          "ranking": self.lambda_r * ranking}, mu))
        return terms, mu, logvar, z1

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        v1, v2 = batch["views"][:2]
        # the shares cost one more backward of the losses to μ (L_R's is recomputed under ranking_chunk): every
        # SHARE_EVERY steps
        terms, mu, logvar, z1 = self.loss_terms(v1, v2, shares=batch_idx % SHARE_EVERY == 0)
        self.log_terms(terms, embedding=GaussianHead.embedding(mu[: len(v1)]))
        self.log_dict({"train/variance": logvar.detach().exp().mean(),
                       "train/set_mean_norm": z1.detach().mean(dim=1).norm(dim=-1).mean()},
                      on_step=False, on_epoch=True, batch_size=len(v1))
        return terms["loss"]
