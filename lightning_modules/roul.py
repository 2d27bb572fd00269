"""ROUL: relative orders for unsupervised metric learning (Kan, Cen, Li, Mladenovic, He).

Two networks on one backbone. F_γ (backbone -> linear -> L2) learns from the Multi-Similarity loss over
k-means pseudo labels (in-batch and against a memory bank that stores indices, so labels are read fresh)
plus the marginal-variance term; Φ_θ (`OrderHead`, on the detached L2-normalised pooled features) predicts
for an anchor A and items C_1..C_N the anti-symmetric order matrix Ô(n, m) ∈ (−1, 1), +1 = "C_n is closer
to A than C_m". Per anchor (view 0 of each batch item) the items are the other batch items' view 0 plus
L self-augmentations of the anchor, and D(n, m) = d(A, C_n) − d(A, C_m) on the embedding:

    F_γ:  memory_weight L_MS(batch vs memory) + mv_weight V + w_roc(epoch) L_ROC    (Ô detached)
          [+ L_MS(in-batch), `batch_ms`: not in Eq. 7, off in the paper configs]
    Φ_θ:  moc_weight L_MOC + order_weight L_O                                       (D and features detached)

L_ROC and L_MOC are the paper's per-anchor sums over the N² pairs, averaged over the anchors
(`order_reduction: anchor`), as Eq. 8 averages the per-anchor MS losses; the bank leaves out the query's own
stale copy. Each term's share of its network's gradient is logged (train/grad_share/*). See
docs/methods/roul.md for these choices and their evidence.

One forward and one backward of the sum give each network exactly the gradient of its own losses (the
detach rules), i.e. a per-step alternation (FEN step with the current Φ as teacher, then the Φ
step on the same forward's D); Φ's learning rate is its parameter group's (`optim.lr_mult.order_head`).
L_O's ternary targets come from the batch itself (docs/methods/roul.md): k-means core regions tag the P x K
batch, an anchor in core m compares its self-augs (0 among themselves), same-core items (0), other-core
items (+1 for the aug and same-core rows against them, −1 the other way); every other pair is masked.

Table 4 rows from config: Baseline = roc_weight 0, moc_weight 0, order_weight 0 (no Φ at all);
+ROC = moc_weight 0; +MOC (the full method) = all on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from embedding_core.distances import euclidean
from lightning_modules.base import EmbeddingModule, hparam
from lightning_modules.homography import TransformRanges, sample_homographies, warp
from lightning_modules.losses import fp32, gradient_shares
from lightning_modules.memory import IndexedMemory

CORE_RULES = ("global", "per_cluster", "quantile")
ORDER_REDUCTIONS = ("anchor", "batch_pairs", "sum")
NONE, AUG, SAME, OTHER = 0, 1, 2, 3  # kinds of comparison item for L_O's targets


# -- losses (pure) ---------------------------------------------------------------------------------
def distance_gaps(anchor: Tensor, items: Tensor) -> Tensor:
    """D (B, N, N): D[a, n, m] = ‖f_a − f_n‖ − ‖f_a − f_m‖ (clamped square root: no NaN gradient at 0)."""
    distance = euclidean(anchor[:, None, :], items)
    return distance[:, :, None] - distance[:, None, :]


def reduce_orders(pairwise: Tensor, reduction: str = "anchor") -> Tensor:
    """Reduce a (B, N, N) pairwise term of Eqs. 5-6. anchor: Σ over the N² pairs, mean over the B anchors
    (the printed per-anchor sum, averaged like Eq. 8's MS term: independent of how many anchors a step
    draws); sum: the printed Σ over anchors too (scales with B); batch_pairs: the mean over B·N² entries
    (the old reading, N² ≈ 6,561 times smaller at N = 81: the terms are inert at the paper's weights)."""
    if reduction == "anchor":
        return pairwise.sum((1, 2)).mean()
    if reduction == "sum":
        return pairwise.sum()
    if reduction == "batch_pairs":
        return pairwise.mean()
    raise ValueError(f"order_reduction {reduction!r}: use one of {', '.join(ORDER_REDUCTIONS)}")


@fp32
def relative_order_consistency(orders: Tensor, gaps: Tensor, alpha: float, reduction: str = "anchor") -> Tensor:
    """L_ROC (Eq. 5): relu(Ô) exp(α D) reduced by `reduce_orders`; Ô is a teacher (detached), D carries the
    gradient."""
    return reduce_orders(orders.detach().clamp_min(0) * torch.exp(alpha * gaps), reduction)


@fp32
def metric_order_consistency(orders: Tensor, gaps: Tensor, beta: float = 0.1, sign: str = "magnitude",
                             reduction: str = "anchor") -> Tensor:
    """L_MOC (Eq. 6): (1 − Ô) w relu(−D) reduced by `reduce_orders`, D detached, w = |log_β(1 − D)| on D < 0
    (the printed log_0.1 is negative there and would push Ô the wrong way, see docs/methods/roul.md;
    `sign="literal"` keeps it for the ablation). The log reads 1 + relu(−D), never log(1 − D) masked: that
    is NaN for D ≥ 1."""
    closer = (-gaps.detach()).clamp_min(0)
    weight = torch.log1p(closer) / math.log(beta)
    if sign == "magnitude":
        weight = weight.abs()
    elif sign != "literal":
        raise ValueError(f"moc_sign {sign!r}: use magnitude or literal")
    return reduce_orders((1 - orders) * weight * closer, reduction)


@fp32
def order_loss(orders: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """L_O (Eq. 9): mean of (Ô − O)² over the unmasked entries (0 when there are none)."""
    squared = (orders - targets).square() * mask
    return squared.sum() / mask.sum().clamp_min(1)


@fp32
def marginal_variance(embedding: Tensor, labels: Tensor, h: float = 0.1) -> Tensor:
    """The marginal-variance term on the in-batch similarity rows (CBML): for item i, μ_i = h·mean(s_pos) +
    (1 − h)·mean(s_neg) over its candidate sets and V_i = Σ_neg (s_ik − μ_i)²; mean over the batch, an item
    without positives or negatives counting 0. The gradient flows through μ_i too."""
    sim = embedding @ embedding.T
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    negative = ~same
    mean_pos = (sim * positive).sum(1) / positive.sum(1).clamp_min(1)
    mean_neg = (sim * negative).sum(1) / negative.sum(1).clamp_min(1)
    mu = h * mean_pos + (1 - h) * mean_neg
    variance = ((sim - mu[:, None]).square() * negative).sum(1)
    return (variance * (positive.any(1) & negative.any(1))).sum() / len(labels)


# -- core regions and order targets ------------------------------------------------------------------
def rank_in_cluster(distance: Tensor, labels: Tensor) -> Tensor:
    """Each sample's rank (0 = nearest) by distance among the members of its cluster."""
    by_distance = torch.argsort(distance, stable=True)
    order = by_distance[torch.argsort(labels[by_distance], stable=True)]
    sizes = torch.bincount(labels)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(len(labels), device=labels.device) - starts[labels[order]]
    return rank


def core_regions(embedding: Tensor, labels: Tensor, centers: Tensor, rule: str = "global",
                 fraction: float = 0.3) -> tuple[Tensor, dict[str, float]]:
    """Core mask (N,) and statistics. Literal rule (Eq. 2): Ω_k = members of cluster k within r_core of
    C_k, r_core = ⅓ min_{k≠l} ‖C_k − C_l‖ (`global`) or ⅓ min_l ‖C_k − C_l‖ (`per_cluster`). Fallback,
    needed on unit vectors (the literal radius takes almost nothing): a cluster whose literal core has fewer
    than ⌈fraction·|cluster|⌉ members (at least 2) takes that many of its members nearest to C_k instead;
    `quantile` always does."""
    if rule not in CORE_RULES:
        raise ValueError(f"core_rule {rule!r}: use one of {', '.join(CORE_RULES)}")
    labels = labels.long()
    distance = (embedding.float() - centers.float()[labels]).norm(dim=1)
    gaps = torch.cdist(centers.float(), centers.float()).fill_diagonal_(math.inf)
    radius = gaps.amin(1) / 3 if rule == "per_cluster" else gaps.min().expand(len(centers)) / 3
    literal = distance <= radius[labels]
    sizes = torch.bincount(labels, minlength=len(centers))
    need = torch.minimum(torch.ceil(fraction * sizes).long().clamp_min(2), sizes)
    fallback = torch.bincount(labels[literal], minlength=len(centers)) < need
    if rule == "quantile":
        fallback = torch.ones_like(fallback)
    nearest = rank_in_cluster(distance, labels) < need[labels]
    core = torch.where(fallback[labels], nearest, literal)
    stats = {"core_literal_fraction": float(literal.float().mean()), "core_fraction": float(core.float().mean()),
             "core_fallback_clusters": float((fallback & (sizes > 0)).sum()), "core_radius": float(radius.min())}
    return core, stats


def order_table(other_other: str = "masked") -> tuple[Tensor, Tensor]:
    """(targets, known) 4 x 4 over item kinds (none, aug, same core, other core), rows n, columns m:
    aug-aug 0, same-same 0, aug/same vs other +1, other vs aug/same −1 [P Eqs. 3-4]; aug-same masked;
    other-other masked or 0 (`other_other="zero"`)."""
    if other_other not in ("masked", "zero"):
        raise ValueError(f"other_other {other_other!r}: use masked or zero")
    targets = torch.zeros(4, 4)
    known = torch.zeros(4, 4, dtype=torch.bool)
    for row, col, value in ((AUG, AUG, 0), (SAME, SAME, 0), (AUG, OTHER, 1), (SAME, OTHER, 1),
                            (OTHER, AUG, -1), (OTHER, SAME, -1)):
        targets[row, col], known[row, col] = value, True
    known[OTHER, OTHER] = other_other == "zero"
    return targets, known


def order_targets(kinds: Tensor, other_other: str = "masked") -> tuple[Tensor, Tensor]:
    """Targets and mask (B, N, N) from item kinds (B, N); the diagonal is masked."""
    targets, known = (t.to(kinds.device) for t in order_table(other_other))
    rows, cols = kinds[:, :, None], kinds[:, None, :]
    mask = known[rows, cols] & ~torch.eye(kinds.shape[1], dtype=torch.bool, device=kinds.device)
    return targets[rows, cols], mask.float()


def others(batch: int, device: torch.device | str = "cpu") -> Tensor:
    """(B, B−1): for each anchor a, the batch positions b ≠ a in order."""
    position = torch.arange(batch - 1, device=device)[None, :]  # arithmetic, not a mask (no host sync)
    return position + (position >= torch.arange(batch, device=device)[:, None]).long()


def comparison_items(view0: Tensor, augs: list[Tensor]) -> Tensor:
    """(B, B−1+L, d): for anchor a, view 0 of every other batch item, then a's L self-augmentations."""
    items = view0[others(len(view0), view0.device)]
    return torch.cat([items, *(aug[:, None] for aug in augs)], 1)


def item_kinds(labels: Tensor, core: Tensor, num_augs: int) -> Tensor:
    """(B, B−1+L) kinds of `comparison_items` for L_O: an anchor outside the cores gets `none` throughout;
    for a core anchor, other batch items are same / other core by their pseudo label, `none` outside cores."""
    pick = others(len(labels), labels.device)
    same = labels[pick] == labels[:, None]
    kinds = torch.where(core[pick], torch.where(same, SAME, OTHER), NONE)
    kinds = torch.cat([kinds, torch.full((len(labels), num_augs), AUG, device=labels.device)], 1)
    return torch.where(core[:, None], kinds, NONE)


# -- the order predictor Φ ---------------------------------------------------------------------------
class OrderHead(nn.Module):
    """Φ_θ: Ô(n, m) = tanh(z(n, m) − z(m, n)), exactly anti-symmetric with a zero diagonal, for any N.
    p(A, C) = MLP([u_A ⊙ u_C ; |u_A − u_C|]); z(n, m) = w₂ᵀ ReLU(W_a p_n + W_b p_m + b₁) + b₂ (a
    "concatenate, then linear" triplet head written as a sum, so it runs on all N² pairs). No BatchNorm or
    dropout: train and eval modes agree."""

    def __init__(self, in_dim: int, hidden: int = 512, pair_dim: int = 256, head_dim: int = 128):
        super().__init__()
        self.pair = nn.Sequential(nn.Linear(2 * in_dim, hidden), nn.ReLU(), nn.Linear(hidden, pair_dim), nn.ReLU())
        self.first = nn.Linear(pair_dim, head_dim)
        self.second = nn.Linear(pair_dim, head_dim, bias=False)
        self.out = nn.Linear(head_dim, 1)

    def scores(self, anchor: Tensor, items: Tensor) -> Tensor:
        """z (B, N, N) for anchors (B, D) and items (B, N, D)."""
        a = anchor[:, None, :].expand_as(items)
        p = self.pair(torch.cat([a * items, (a - items).abs()], -1))
        hidden = F.relu(self.first(p)[:, :, None, :] + self.second(p)[:, None, :, :])
        return self.out(hidden).squeeze(-1)

    def forward(self, anchor: Tensor, items: Tensor) -> Tensor:
        z = self.scores(anchor, items)
        return torch.tanh(z - z.transpose(1, 2))


@hparam
@dataclass
class SelfAugment:
    """The self-augmentations A_i [P: "small random rotations, cropping, and resizing"; values R]: `views`
    per anchor, each a rotation of up to ±rotation_degrees after a square crop of side crop_scale (a
    zoom back to full size), applied on the device to view 0."""

    views: int = 2
    rotation_degrees: float = 10.0
    crop_scale: tuple[float, float] = (0.6, 1.0)


def self_augment_homographies(n: int, config: SelfAugment, generator: torch.Generator) -> Tensor:
    rotation = sample_homographies(n, TransformRanges(kinds=["rotation"],
                                                      rotation_degrees=config.rotation_degrees), generator)
    crop = sample_homographies(n, TransformRanges(kinds=["crop"], crop_scale=config.crop_scale), generator)
    return rotation @ crop


# -- module ------------------------------------------------------------------------------------------
class ROUL(IndexedMemory, EmbeddingModule):
    """ROUL on P x K batches over k-means pseudo labels (needs the KMeansPseudoLabels callback).

    ms_alpha, ms_beta, ms_threshold, ms_margin: MS λ_P, λ_N, δ and the miner's ε (paper: 2, 40, 0.5; MS 0.1).
    memory_weight: the batch-vs-memory MS term of Eq. 7 (0 = no memory bank); the query's own copies in the
      bank are left out. batch_ms: add the in-batch MS term too (not in Eq. 7; the paper configs leave it
      off). mv_weight, mv_h: the marginal-variance term and its h.
    order_reduction: how L_ROC and L_MOC reduce their (B, N, N) terms (`reduce_orders`; anchor = the
      paper's per-anchor sums averaged over the anchors, batch_pairs = the old mean over B·N²).
    roc_weight, roc_alpha, roc_warmup_epochs: L_ROC's weight and α, and the epochs it is held at 0 while
      Φ learns from L_O + L_MOC.
    moc_weight, moc_beta, moc_sign: L_MOC's weight, log base β and `magnitude` (|log_β|) or `literal`.
    order_weight, other_other: L_O's weight; other-core pairs masked or target 0.
    core_rule, core_fraction: core regions (`core_regions`).
    self_augment: the L self-augmentations (`SelfAugment`). order_hidden, order_pair_dim, order_head_dim:
      Φ's sizes. roc_anchors: anchors per step for the order terms (0 = the whole batch; Φ's cost is B³).
    rop_backprop_backbone: Φ's losses also train the backbone (default: Φ reads detached features).
    views_forward: `separate` runs view 0 alone and then the self-aug views, so BatchNorm, where it trains,
      normalises the MS loss's view by its own statistics as in the Baseline; `joint` is one forward over all
      views (the same where BN is frozen). Digits results of both: docs/methods/roul.md.
    seed: with global_step and rank, seeds each step's self-augmentations and anchor draw.
    """

    def __init__(self, ms_alpha: float = 2.0, ms_beta: float = 40.0, ms_threshold: float = 0.5,
                 ms_margin: float = 0.1, memory_weight: float = 1.0, mv_weight: float = 1.0, mv_h: float = 0.1,
                 roc_weight: float = 0.1, roc_alpha: float = 0.1, roc_warmup_epochs: int = 1,
                 moc_weight: float = 1.0, moc_beta: float = 0.1, moc_sign: str = "magnitude",
                 order_weight: float = 1.0, other_other: str = "masked", core_rule: str = "global",
                 core_fraction: float = 0.3, self_augment: SelfAugment | None = None, order_hidden: int = 512,
                 order_pair_dim: int = 256, order_head_dim: int = 128, roc_anchors: int = 0,
                 rop_backprop_backbone: bool = False, views_forward: str = "separate",
                 seed: int = 0, batch_ms: bool = False, order_reduction: str = "anchor", **kwargs):
        super().__init__(**kwargs)
        if core_rule not in CORE_RULES:
            raise ValueError(f"core_rule {core_rule!r}: use one of {', '.join(CORE_RULES)}")
        if moc_sign not in ("magnitude", "literal"):
            raise ValueError(f"moc_sign {moc_sign!r}: use magnitude or literal")
        if views_forward not in ("separate", "joint"):
            raise ValueError(f"views_forward {views_forward!r}: use separate or joint")
        if order_reduction not in ORDER_REDUCTIONS:
            raise ValueError(f"order_reduction {order_reduction!r}: use one of {', '.join(ORDER_REDUCTIONS)}")
        if not (batch_ms or memory_weight):
            raise ValueError("no metric loss: with memory_weight 0 set batch_ms true (the in-batch MS term)")
        order_table(other_other)  # validates
        self.batch_ms, self.order_reduction = batch_ms, order_reduction
        self.ms = {"alpha": ms_alpha, "beta": ms_beta, "threshold": ms_threshold, "margin": ms_margin}
        self.memory_weight, self.mv_weight, self.mv_h = memory_weight, mv_weight, mv_h
        self.roc_weight, self.roc_alpha, self.roc_warmup_epochs = roc_weight, roc_alpha, roc_warmup_epochs
        self.moc_weight, self.moc_beta, self.moc_sign = moc_weight, moc_beta, moc_sign
        self.order_weight, self.other_other = order_weight, other_other
        self.core_rule, self.core_fraction = core_rule, core_fraction
        self.self_augment = self_augment or SelfAugment()
        self.roc_anchors, self.rop_backprop_backbone, self.seed = roc_anchors, rop_backprop_backbone, seed
        self.views_forward = views_forward
        self.order_head = OrderHead(self.trunk.out_dim, order_hidden, order_pair_dim, order_head_dim)
        self.register_buffer("pseudo_labels", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("core", torch.zeros(0, dtype=torch.bool))
        self.register_memory(self.hparams.embedding_dim)
        self.core_stats: dict[str, float] = {}

    @property
    def uses_orders(self) -> bool:
        """Φ runs at all (Table 4's Baseline has none)."""
        return bool(self.roc_weight or self.moc_weight or self.order_weight)

    # -- network --------------------------------------------------------------------------------
    def predict_orders(self, anchor: Tensor, items: Tensor) -> Tensor:
        """Ô (B, N, N) from order features (`validation_step`'s "order_feature"): the evaluator's
        refinement hook."""
        return self.order_head(anchor.to(self.device), items.to(self.device))

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        pooled = self.pooled(batch["image"])
        return {"embedding": self.head(pooled).float(), "order_feature": F.normalize(pooled.float(), dim=1),
                "target": batch["target"], "index": batch["index"]}

    # -- pseudo labels, cores, memory -----------------------------------------------------------
    def set_pseudo_labels(self, labels: Tensor, centers: Tensor, embedding: Tensor | None = None) -> None:
        """Labels (N,) and centres (K, d) from a k-means refresh; `embedding` (N, d), the clustered
        embeddings, gives the core regions and refills the memory bank (None on a resume: both come from
        the checkpoint)."""
        self.pseudo_labels = torch.as_tensor(labels).to(self.device, torch.long)
        if embedding is None:
            return
        core, self.core_stats = core_regions(embedding.float(), self.pseudo_labels.to(embedding.device),
                                             torch.as_tensor(centers).to(embedding.device), self.core_rule,
                                             self.core_fraction)
        self.core = core.to(self.device)
        rank_zero_info("ROUL core regions: " + ", ".join(f"{k} {v:.4g}" for k, v in self.core_stats.items()))
        if self.memory_weight:
            self.refill_memory(embedding)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.resize_buffers_from(checkpoint, ("memory_embedding", "memory_index", "core"))

    # -- training -------------------------------------------------------------------------------
    def roc_weight_now(self) -> float:
        """w_roc, held at 0 for the first roc_warmup_epochs epochs (Φ starts random)."""
        return 0.0 if self.current_epoch < self.roc_warmup_epochs else self.roc_weight

    def order_terms(self, z: Tensor, u: Tensor, labels: Tensor, index: Tensor,
                    generator: torch.Generator) -> dict[str, Tensor]:
        """L_ROC, L_MOC, L_O and diagnostics from view 0 and the self-aug views (z, u: (1+L)·B rows)."""
        batch, views = len(index), 1 + self.self_augment.views
        z_views, u_views = z.chunk(views), u.chunk(views)
        anchors = torch.arange(batch, device=z.device)
        if 0 < self.roc_anchors < batch:
            anchors = torch.randperm(batch, generator=generator)[:self.roc_anchors].to(z.device)
        items_z = comparison_items(z_views[0], list(z_views[1:]))[anchors]
        items_u = comparison_items(u_views[0], list(u_views[1:]))[anchors]
        gaps = distance_gaps(z_views[0][anchors], items_z)
        orders = self.order_head(u_views[0][anchors], items_u).float()
        core = self.core[index] if len(self.core) else torch.zeros_like(labels, dtype=torch.bool)
        kinds = item_kinds(labels, core, self.self_augment.views)[anchors]
        targets, mask = order_targets(kinds, self.other_other)
        signed = mask.bool() & (targets != 0)
        agree = ((orders.detach() > 0) == (targets > 0)) & signed
        return {"roc": relative_order_consistency(orders, gaps, self.roc_alpha, self.order_reduction),
                "moc": metric_order_consistency(orders, gaps, self.moc_beta, self.moc_sign, self.order_reduction),
                "order": order_loss(orders, targets, mask), "orders": orders,
                "order_accuracy": agree.sum() / signed.sum().clamp_min(1),
                "order_pairs": mask.sum() / len(anchors), "batch_core_share": core.float().mean()}

    def weighted_terms(self, terms: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The loss terms as they enter the sum, split by the network they train: (F_γ's, Φ's)."""
        weights = {"ms": 1.0, "ms_memory": self.memory_weight, "mv": self.mv_weight, "roc": self.roc_weight_now(),
                   "moc": self.moc_weight, "order": self.order_weight}
        embedding = {k: weights[k] * terms[k] for k in ("ms", "ms_memory", "mv", "roc") if k in terms}
        phi = {k: weights[k] * terms[k] for k in ("moc", "order") if k in terms}
        return embedding, phi

    def gradient_shares(self, terms: dict[str, Tensor], z: Tensor, orders: Tensor | None) -> dict[str, Tensor]:
        """Each weighted term's share of F_γ's gradient at the embeddings z (all views) and of Φ's at its
        output Ô: shows that no term is scaled to nothing."""
        embedding, phi = self.weighted_terms(terms)
        shares = gradient_shares(embedding, z)
        if orders is not None:
            shares.update(gradient_shares(phi, orders))
        return shares

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images, index = batch["views"][0], batch["index"]
        labels = self.batch_pseudo_labels(index)
        generator = self._generator()
        views = [images]
        if self.uses_orders:
            homographies = self_augment_homographies(len(images) * self.self_augment.views, self.self_augment,
                                                     generator).to(images.device)
            for h in homographies.chunk(self.self_augment.views):
                views.append(warp(images, h, images.shape[-2:])[0])
        if self.views_forward == "joint" or len(views) == 1:
            pooled = self.pooled(torch.cat(views))
        else:
            pooled = torch.cat([self.pooled(images), self.pooled(torch.cat(views[1:]))])
        z, u = self.head(pooled).float(), F.normalize(pooled.float(), dim=1)
        if not self.rop_backprop_backbone:
            u = u.detach()
        z0 = z[:len(images)]
        loss, terms = self.ms_with_memory(z0, labels, index, self.batch_ms)
        if self.mv_weight:
            terms["mv"] = marginal_variance(z0, labels, self.mv_h)
            loss = loss + self.mv_weight * terms["mv"]
        diagnostics = {k: torch.tensor(v).to(z0.device, non_blocking=True) for k, v in self.core_stats.items()}
        orders = None
        if self.uses_orders:
            order = self.order_terms(z, u, labels, index, generator)
            terms.update({k: order[k] for k in ("roc", "moc", "order")})
            diagnostics.update({k: order[k] for k in ("order_accuracy", "order_pairs", "batch_core_share")})
            diagnostics["roc_weight"] = torch.tensor(self.roc_weight_now()).to(z0.device, non_blocking=True)
            loss = (loss + self.roc_weight_now() * terms["roc"] + self.moc_weight * terms["moc"]
                    + self.order_weight * terms["order"])
            orders = order["orders"]
        if torch.is_grad_enabled():
            diagnostics.update({f"grad_share/{k}": v for k, v in self.gradient_shares(terms, z, orders).items()})
        if self.memory_weight:
            self.enqueue(z0.detach(), index)  # after the memory term: the bank is read before it changes
        self.log_terms({"loss": loss, **terms, **diagnostics}, embedding=z0)
        return loss
