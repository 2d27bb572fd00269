"""TAC-CCL: transformed attention consistency and contrastive clustering loss (Li, Kan, He, ECCV 2020;
dissertation ch. 4).

Network: trunk feature map -> CBAM (its spatial map is the attention map M) -> global average -> linear ->
L2. Pseudo labels and k-means centres come from `callbacks.pseudo_labels.KMeansPseudoLabels` through
`set_pseudo_labels`, which also refills the memory bank (all training embeddings, labels read by index).

    L = L_MS(batch) + memory_weight L_MS(batch vs memory) + ccl_weight L_CC
        + tac_weight (L_TAC_self + L_TAC_cross) + feature_weight L_F

Table 4.4 rows from config: Baseline = ccl_weight 0, tac_weight 0, feature_weight 0; +CCL = ccl_weight 1;
+TAC (the full method) = all weights 1. Self-TAC only: cross.probability 0; Eq. 4.6 as printed:
cross.mode literal; no memory bank: memory_weight 0.

Cross-image pairs (dissertation §4.3.4), `cross.matching`:
- `offline` (the dissertation's, the paper configs'): SIFT + RANSAC matching within the epoch-0 clusters,
  mined once before training by `callbacks.cross_pairs.OfflineCrossPairs`, whose cross items arrive with
  the batch (both keypoint crops, the matched keypoints and the crop-to-crop affine).
- `in_batch` (an option for images SIFT cannot match, e.g. 8x8 digits): keypoints are the attention-grid
  cells, described by the trunk's feature map; two images of one pseudo class in the batch are matched by
  mutual nearest neighbours and a RANSAC affine (confidence = inliers); the second branch then sees the
  partner's crop around its inliers.
Either way the anchor's map, masked around the matched keypoints, is warped into the partner's frame.
Both views go through one forward (BatchNorm, where it trains, sees them as one batch, and updates its
statistics once a step); the loss terms and the keypoint masks run in fp32, and L_TAC averages self and
cross pairs over the batch together. Each term's share of the gradient at the trunk's feature map is
logged (train/grad_share/*). Decisions and evidence: docs/methods/tac_ccl.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.base import EmbeddingModule, hparam
from lightning_modules.batchnorm import untracked_batchnorm
from lightning_modules.homography import (
    TransformRanges,
    cell_centers,
    homogeneous,
    sample_homographies,
    warp,
)
from lightning_modules.losses.clustering import contrastive_clustering_loss
from lightning_modules.losses.common import fp32, gradient_shares
from lightning_modules.memory import IndexedMemory

# -- losses ----------------------------------------------------------------------------------------
FEATURE_LOSSES = ("norm", "squared")


@fp32
def feature_similarity_loss(anchor: Tensor, second: Tensor, form: str = "norm") -> Tensor:
    """L_F over pairs of unit embeddings: mean ‖F − F'‖ (`norm`, the dissertation's L_F) or mean ‖F − F'‖²
    (`squared`, an option for from-scratch trunks). The plain norm's gradient has unit length however close
    the pair already is, so in the narrow cone of a random init it outweighs the metric terms (whose
    gradients shrink with the angles) and pulls the whole cloud together; the squared form's gradient,
    2(F − F'), shrinks with the pair (docs/methods/tac_ccl.md)."""
    difference = anchor - second
    if form == "squared":
        return difference.square().sum(1).mean()
    if form == "norm":
        return difference.norm(dim=1).mean()
    raise ValueError(f"feature loss form {form!r}: use one of {', '.join(FEATURE_LOSSES)}")


@fp32
def attention_consistency(anchor_map: Tensor, second_map: Tensor, homography: Tensor, anchor_mask: Tensor,
                          second_mask: Tensor, aligned: Tensor) -> Tensor:
    """Per-pair TAC loss (B,): Σ over cells of valid·(T(M·Γ) − M'·Γ')², compared in the second view's frame.

    Eq. 4.2 for self pairs (Γ = Γ' = 1); Eq. 4.6 for cross pairs, either aligned (the anchor's masked map
    warped by the pair's transform) or, where `aligned` is False, at the same cells as printed.
    """
    source = anchor_map * anchor_mask
    warped, valid = warp(source, homography, second_map.shape[-2:])
    target = torch.where(aligned[:, None, None, None], warped, source)
    valid = torch.where(aligned[:, None, None, None], valid, torch.ones_like(valid))
    return (valid * (target - second_map * second_mask).square()).sum((1, 2, 3))


@fp32
def keypoint_mask(points: Tensor, weights: Tensor, size: tuple[int, int], sigma: float,
                  clamp: bool) -> Tensor:
    """Γ of Eq. 4.4-4.5 (B, 1, h, w): Σ_i w_i exp(-|cell - p_i|² / 2σ²), σ in cells, p_i normalised points
    (a point at normalised x sits at cell coordinate (x + 1) w / 2 - 0.5); `clamp` caps it at 1. In fp32
    with autocast off: under bf16 autocast the einsum would round Γ to 3 significant digits."""
    h, w = size
    u = (points[..., 0] + 1) * w / 2 - 0.5
    v = (points[..., 1] + 1) * h / 2 - 0.5
    cols = torch.arange(w, device=points.device, dtype=points.dtype)
    rows = torch.arange(h, device=points.device, dtype=points.dtype)
    across = torch.exp(-(cols - u[..., None]).square() / (2 * sigma**2))
    down = torch.exp(-(rows - v[..., None]).square() / (2 * sigma**2))
    mask = torch.einsum("bm,bmh,bmw->bhw", weights, down, across)[:, None]
    return mask.clamp(max=1.0) if clamp else mask


# -- cross-image matching ----------------------------------------------------------------------------
def mutual_matches(anchor: Tensor, partner: Tensor) -> tuple[Tensor, Tensor]:
    """For (P, n, C) unit descriptors: the partner cell matched to each anchor cell (P, n) and whether the
    match is mutual (each is the other's nearest neighbour)."""
    sim = anchor @ partner.transpose(1, 2)
    to_partner = sim.argmax(2)
    to_anchor = sim.argmax(1)
    mutual = to_anchor.gather(1, to_partner) == torch.arange(anchor.shape[1], device=anchor.device)
    return to_partner, mutual


def fit_affine(source: Tensor, target: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted least-squares affines X (P, 3, 2) with [x y 1] X ≈ target, and whether each solve worked."""
    a = homogeneous(source)
    lhs = (a * weight[..., None]).transpose(1, 2) @ a + 1e-6 * torch.eye(3, device=a.device)
    rhs = (a * weight[..., None]).transpose(1, 2) @ target
    affine, info = torch.linalg.solve_ex(lhs, rhs)
    return affine, info == 0


def ransac_affine(source: Tensor, target: Tensor, valid: Tensor, threshold: float, hypotheses: int,
                  generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """RANSAC over (P, n) candidate matches: `hypotheses` minimal 3-point affines each, the one with most
    matches within `threshold` refit on its inliers. Returns (affine (P, 3, 2), inliers (P, n))."""
    p, n = valid.shape
    if n < 3:
        return torch.zeros(p, 3, 2, device=valid.device), torch.zeros_like(valid)
    draw = torch.rand(p, hypotheses, n, generator=generator).to(valid.device)
    pick = draw.masked_fill(~valid[:, None], -1.0).topk(3, dim=2).indices
    a = homogeneous(source)
    a_pick = a[:, None].expand(p, hypotheses, n, 3).gather(2, pick[..., None].expand(-1, -1, -1, 3))
    t_pick = target[:, None].expand(p, hypotheses, n, 2).gather(2, pick[..., None].expand(-1, -1, -1, 2))
    minimal, info = torch.linalg.solve_ex(a_pick, t_pick)
    usable = valid[:, None].expand(p, hypotheses, n).gather(2, pick).all(-1) & (info == 0)
    usable &= torch.linalg.det(a_pick).abs() > 1e-4
    residual = (a[:, None] @ minimal - target[:, None]).norm(dim=-1)
    close = (residual < threshold) & valid[:, None]
    count = close.sum(-1).masked_fill(~usable, -1)
    best = count.argmax(1)
    inliers = close[torch.arange(p, device=valid.device), best] & (count.amax(1) >= 3)[:, None]
    affine, solved = fit_affine(source, target, inliers.to(source.dtype))
    refit = ((a @ affine - target).norm(dim=-1) < threshold) & valid & inliers.any(1, keepdim=True)
    return affine, refit & solved[:, None]


class CrossImage(NamedTuple):
    """Partner of each anchor (-1 = none) with the matched keypoints and the affine partner -> anchor."""

    partner: Tensor     # (B,)
    affine: Tensor      # (B, 3, 2): [x y 1] in the partner's frame -> the anchor's frame
    anchor_points: Tensor   # (B, n, 2)
    partner_points: Tensor  # (B, n, 2)
    inliers: Tensor     # (B, n) bool


CROSS_MATCHING = ("offline", "in_batch")


@hparam
@dataclass
class CrossPairs:
    """Cross-image supervision (§4.3.4 [R]). matching: `offline` (SIFT pairs mined before training by
    callbacks.cross_pairs.OfflineCrossPairs, the dissertation's) | `in_batch` (matching on the trunk's
    feature cells inside each batch); probability: share of anchors that, when matched, take the partner's
    crop as second view (0 = self pairs only; with offline matching the callback reads it); mode: aligned
    (warp, default) | literal (Eq. 4.6 at the same cells); sigma, clamp_mask: Γ's σ in cells and its cap at 1
    (cell keypoints are dense, so unclamped sums reach ~5). In-batch matching only: threshold: RANSAC inlier
    distance in attention cells; min_inliers: the confidence a match needs; hypotheses: RANSAC draws;
    margin/min_crop: the crop is the inliers' box grown by `margin` per side, at least `min_crop` of the
    image side (the offline callback has its own crop settings)."""

    matching: str = "in_batch"
    probability: float = 0.5
    mode: str = "aligned"
    threshold: float = 1.0
    min_inliers: int = 6
    hypotheses: int = 64
    margin: float = 0.15
    min_crop: float = 0.25
    sigma: float = 1.0
    clamp_mask: bool = True


def match_in_batch(descriptors: Tensor, labels: Tensor, index: Tensor, size: tuple[int, int],
                   config: CrossPairs, generator: torch.Generator) -> CrossImage:
    """Each anchor's best partner among the batch images of its pseudo class (not itself): most RANSAC
    inliers over mutual nearest-neighbour cell matches, if at least `min_inliers`."""
    b, n, _ = descriptors.shape
    device = descriptors.device
    centers = cell_centers(*size, device)
    none = CrossImage(torch.full((b,), -1, device=device), torch.zeros(b, 3, 2, device=device),
                      centers.expand(b, n, 2), centers.expand(b, n, 2), torch.zeros(b, n, dtype=torch.bool,
                                                                                     device=device))
    candidates = (labels[:, None] == labels[None, :]) & (index[:, None] != index[None, :])
    anchor, partner = candidates.nonzero(as_tuple=True)
    if len(anchor) == 0:
        return none
    to_partner, mutual = mutual_matches(descriptors[anchor], descriptors[partner])
    partner_points = centers[to_partner]
    affine, inliers = ransac_affine(partner_points, centers.expand(len(anchor), n, 2), mutual,
                                    config.threshold * 2 / max(size), config.hypotheses, generator)
    scale = torch.linalg.det(affine[:, :2, :]).abs()
    count = inliers.sum(1).masked_fill((scale < 0.1) | (scale > 10), -1)
    score = torch.full((b, b), -1, device=device, dtype=count.dtype)
    score[anchor, partner] = count
    position = torch.full((b, b), -1, device=device, dtype=torch.long)
    position[anchor, partner] = torch.arange(len(anchor), device=device)
    best_count, best_partner = score.max(1)
    chosen = position[torch.arange(b, device=device), best_partner].clamp_min(0)
    matched = best_count >= config.min_inliers
    return CrossImage(torch.where(matched, best_partner, -1), affine[chosen], none.anchor_points,
                      partner_points[chosen], inliers[chosen] & matched[:, None])


def crop_around(points: Tensor, weights: Tensor, size: tuple[int, int], margin: float,
                min_crop: float) -> tuple[Tensor, Tensor]:
    """(centre (B, 2), half side (B,)) of a square crop around the weighted points (their cells included),
    grown by `margin` per side, at least `min_crop` of the image side, kept inside; the whole image where
    no point has weight. Crop-frame point q is image point centre + half * q."""
    half_cell = 1.0 / torch.tensor([size[1], size[0]], dtype=points.dtype).to(points.device, non_blocking=True)
    present = weights[..., None] > 0
    some = present.any(1)
    low = torch.where(some, torch.where(present, points, math.inf).amin(1) - half_cell, -1.0)
    high = torch.where(some, torch.where(present, points, -math.inf).amax(1) + half_cell, 1.0)
    half = ((high - low).amax(1) * (1 + 2 * margin)).clamp(min=2 * min_crop, max=2.0) / 2
    center = ((low + high) / 2).clamp(-1 + half[:, None], 1 - half[:, None])
    return center, half


def crop_homography(center: Tensor, half: Tensor) -> Tensor:
    """(B, 3, 3) mapping crop-frame points to image points."""
    h = torch.eye(3, device=center.device).repeat(len(center), 1, 1)
    h[:, 0, 0], h[:, 1, 1], h[:, 0, 2], h[:, 1, 2] = half, half, center[:, 0], center[:, 1]
    return h


def offline_view(view: SecondView, offline: dict) -> SecondView:
    """The self-pair view with the batch's offline cross items swapped in: the partner's keypoint crop,
    the crop-to-crop affine as T, and the matched keypoints for Γ and Γ' (callbacks.cross_pairs)."""
    cross = offline["cross"].bool()
    pick = cross[:, None, None]
    affine = offline["cross_affine"].float()
    bottom = torch.tensor([0.0, 0.0, 1.0]).to(affine.device, non_blocking=True).expand(len(affine), 1, 3)
    points = offline["cross_points"].float()
    return SecondView(torch.where(pick[..., None], offline["cross_views"][:, 1], view.images),
                      torch.where(pick, torch.cat([affine, bottom], 1), view.homography), cross,
                      points[:, 0], points[:, 1], offline["cross_weights"].float())


def affine_to_homography(affine: Tensor) -> Tensor:
    h = torch.eye(3, device=affine.device, dtype=affine.dtype).repeat(len(affine), 1, 1)
    h[:, :2, :] = affine.transpose(1, 2)
    return h


# -- attention ---------------------------------------------------------------------------------------
class CBAM(nn.Module):
    """Channel then spatial attention (Woo et al. 2018); returns (modulated map, spatial map M in (0, 1)).
    The spatial conv has a bias instead of CBAM's BatchNorm, which frozen-BN training would leave at its
    initial statistics ([R], docs/methods/tac_ccl.md)."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x * torch.sigmoid(self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True)))
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        attention = torch.sigmoid(self.spatial(pooled))
        return x * attention, attention


# -- module ------------------------------------------------------------------------------------------
class SecondView(NamedTuple):
    images: Tensor       # (B, C, H, W): the warped anchor (self) or the partner's crop (cross)
    homography: Tensor   # (B, 3, 3): second-view points -> anchor points
    cross: Tensor        # (B,) bool
    anchor_points: Tensor | None = None  # (B, n, 2) matched keypoints, anchor frame (cross pairs)
    second_points: Tensor | None = None  # (B, n, 2) the same keypoints in the second view's frame
    weights: Tensor | None = None        # (B, n): 1 for a matched keypoint, 0 for padding


class TACCCL(IndexedMemory, EmbeddingModule):
    """TAC-CCL on P x K batches over k-means pseudo labels (needs the KMeansPseudoLabels callback).

    ms_alpha, ms_beta, ms_threshold, ms_margin: MS loss α, β, λ, ε (MS code: 2, 40, 0.5, 0.1).
    memory_weight: the batch-vs-memory MS term (0 = no memory bank).
    ccl_weight, ccl_positive: L_CC and its C+ (nearest | assigned).
    tac_weight, transforms, tac_upsample: L_TAC, the self-pair transform family, and bilinear
      upsampling of both maps before the comparison (1 = the raw grid).
    feature_weight, feature_loss: L_F over self and cross pairs, the text's plain ‖F − F'‖ (`norm`) or
      ‖F − F'‖² (`squared`, for from-scratch trunks; see `feature_similarity_loss`).
    cross: cross-image pairs (`CrossPairs`: offline SIFT pairs or in-batch matching); used when the second
      branch runs (tac or feature weight > 0).
    grad_share_every: every this many steps, log each weighted term's share of the gradient norm at the
      trunk's feature map, where all terms meet (train/grad_share/*; 0 = never).
    attention_reduction, attention_kernel: CBAM's r and spatial kernel.
    seed: with global_step and rank, seeds every draw of a step (transforms, RANSAC, cross choice), so a
      resumed run repeats them.
    """

    def __init__(self, ms_alpha: float = 2.0, ms_beta: float = 40.0, ms_threshold: float = 0.5,
                 ms_margin: float = 0.1, memory_weight: float = 1.0, ccl_weight: float = 1.0,
                 ccl_positive: str = "nearest", tac_weight: float = 1.0,
                 transforms: TransformRanges | None = None, tac_upsample: int = 1,
                 feature_weight: float = 1.0, feature_loss: str = "norm", cross: CrossPairs | None = None,
                 attention_reduction: int = 16, attention_kernel: int = 7,
                 grad_share_every: int = 1, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if ccl_positive not in ("nearest", "assigned"):
            raise ValueError(f"ccl_positive {ccl_positive!r}: use nearest or assigned")
        if feature_loss not in FEATURE_LOSSES:
            raise ValueError(f"feature_loss {feature_loss!r}: use one of {', '.join(FEATURE_LOSSES)}")
        self.cross = cross or CrossPairs()
        if self.cross.mode not in ("aligned", "literal"):
            raise ValueError(f"cross.mode {self.cross.mode!r}: use aligned or literal")
        if self.cross.matching not in CROSS_MATCHING:
            raise ValueError(f"cross.matching {self.cross.matching!r}: use {' or '.join(CROSS_MATCHING)}")
        if tac_upsample < 1:
            raise ValueError(f"tac_upsample {tac_upsample} must be >= 1")
        self.ms = {"alpha": ms_alpha, "beta": ms_beta, "threshold": ms_threshold, "margin": ms_margin}
        self.memory_weight, self.ccl_weight, self.ccl_positive = memory_weight, ccl_weight, ccl_positive
        self.tac_weight, self.feature_weight, self.tac_upsample = tac_weight, feature_weight, tac_upsample
        self.feature_loss, self.grad_share_every = feature_loss, grad_share_every
        self.transforms = transforms or TransformRanges()
        self.seed = seed
        self.attention = CBAM(self.trunk.out_dim, attention_reduction, attention_kernel)
        nn.init.kaiming_normal_(self.head.linear.weight)  # [R] as the GoogLeNet metric-learning code
        nn.init.zeros_(self.head.linear.bias)
        self.register_buffer("pseudo_labels", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("centers", torch.zeros(0, self.hparams.embedding_dim), persistent=False)
        self.register_memory(self.hparams.embedding_dim)

    # -- network --------------------------------------------------------------------------------
    def attend(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(embedding, attention map M (B, 1, h, w), trunk feature map) of one forward."""
        fmap = self.trunk.feature_map(images)
        attended, attention = self.attention(fmap)
        return self.head(self.center(attended.mean((2, 3)))), attention, fmap

    def forward(self, images: Tensor) -> Tensor:
        return self.attend(images)[0]

    # -- pseudo labels and memory ---------------------------------------------------------------
    def set_pseudo_labels(self, labels: Tensor, centers: Tensor, embedding: Tensor | None = None) -> None:
        """Labels (N,) and centres (K, d) from a k-means refresh; `embedding` (N, d), the embeddings that
        were clustered, refills the memory bank (None on a resume, whose bank comes from the checkpoint)."""
        self.pseudo_labels = torch.as_tensor(labels).to(self.device, torch.long)
        self.centers = torch.as_tensor(centers).to(self.device, torch.float32)
        if embedding is not None and self.memory_weight:
            self.refill_memory(embedding)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.resize_buffers_from(checkpoint, ("memory_embedding", "memory_index"))

    # -- training -------------------------------------------------------------------------------
    @property
    def two_views(self) -> bool:
        """Whether a second branch runs (TAC or L_F is on)."""
        return bool(self.tac_weight or self.feature_weight)

    @property
    def offline_pair_probability(self) -> float:
        """The share of items that `callbacks.cross_pairs.OfflineCrossPairs` makes cross items: the
        cross probability with offline matching and a second branch, else 0 (no pairs mined)."""
        offline = self.cross.matching == "offline" and self.two_views
        return self.cross.probability if offline else 0.0

    def second_view(self, images: Tensor, labels: Tensor, index: Tensor, generator: torch.Generator,
                    offline: dict | None = None) -> SecondView:
        """Self pairs: the anchor warped by a sampled T. Cross pairs: the batch's offline pairs where it
        carries them (`callbacks.cross_pairs`), else, with in-batch matching, matched anchors with
        probability cross.probability: the partner's crop around its inliers, T = crop then affine to the
        anchor. In-batch matching reads the trunk's cells through a gradient-free pass of the anchor batch
        whose BatchNorm normalises with the batch but leaves the running statistics to the training forward
        (one update a step)."""
        b, device = len(images), images.device
        homography = sample_homographies(b, self.transforms, generator).to(device)
        no_cross = torch.zeros(b, dtype=torch.bool, device=device)
        view = SecondView(warp(images, homography, images.shape[-2:])[0], homography, no_cross)
        if offline is not None:
            return offline_view(view, offline)
        if self.cross.probability == 0:
            return view
        if self.cross.matching == "offline":
            raise RuntimeError("cross.matching is offline but the batch carries no cross pairs: list "
                               "callbacks.cross_pairs.OfflineCrossPairs after KMeansPseudoLabels in "
                               "trainer.callbacks, or set model.cross.matching=in_batch (or probability 0)")
        with torch.no_grad(), untracked_batchnorm(self.trunk):
            fmap = self.trunk.feature_map(images)
        size = fmap.shape[-2:]
        descriptors = F.normalize(fmap.float().flatten(2).transpose(1, 2), dim=-1)
        found = match_in_batch(descriptors, labels, index, size, self.cross, generator)
        drawn = torch.rand(b, generator=generator).to(device) < self.cross.probability
        cross = (found.partner >= 0) & drawn
        if not cross.any():
            return view
        weights = found.inliers.float()
        center, half = crop_around(found.partner_points, weights, size, self.cross.margin,
                                   self.cross.min_crop)
        crop = crop_homography(center, half)
        crop_images = warp(images[found.partner.clamp_min(0)], crop, images.shape[-2:])[0]
        crop_points = (found.partner_points - center[:, None]) / half[:, None, None]
        pick = cross[:, None, None]
        return SecondView(torch.where(pick[..., None], crop_images, view.images),
                          torch.where(pick, affine_to_homography(found.affine) @ crop, homography), cross,
                          found.anchor_points, crop_points, weights)

    def keypoint_mask(self, points: Tensor, weights: Tensor, size: tuple[int, int]) -> Tensor:
        return keypoint_mask(points, weights, size, self.cross.sigma, self.cross.clamp_mask)

    def tac_terms(self, anchor_map: Tensor, second_map: Tensor, view: SecondView) -> dict[str, Tensor]:
        """L_TAC_self and L_TAC_cross, in fp32: per-pair sums over cells, both divided by the batch size,
        so that their sum is the batch mean over all pairs (a cross pair weighs what a self pair weighs)."""
        size = anchor_map.shape[-2:]
        ones = torch.ones(len(anchor_map), 1, *size, device=anchor_map.device)
        anchor_mask = second_mask = ones
        if view.anchor_points is not None:
            pick = view.cross[:, None, None, None]
            anchor_mask = torch.where(pick, self.keypoint_mask(view.anchor_points, view.weights, size), ones)
            second_mask = torch.where(pick, self.keypoint_mask(view.second_points, view.weights, size), ones)
        maps = [anchor_map.float(), second_map.float(), anchor_mask, second_mask]
        if self.tac_upsample > 1:
            maps = [F.interpolate(m, scale_factor=self.tac_upsample, mode="bilinear", align_corners=False)
                    for m in maps]
        aligned = ~view.cross if self.cross.mode == "literal" else torch.ones_like(view.cross)
        per_pair = attention_consistency(*maps[:2], view.homography, *maps[2:], aligned)
        per_pair = per_pair / self.tac_upsample**2  # per raw cell
        return {"tac_self": (per_pair * ~view.cross).sum() / len(per_pair),
                "tac_cross": (per_pair * view.cross).sum() / len(per_pair)}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images, index = batch["views"][0], batch["index"]
        labels = self.batch_pseudo_labels(index)
        two_views = self.two_views
        offline = {k: v for k, v in batch.items() if k.startswith("cross")} or None
        if offline is not None:  # offline pairs: a cross item's anchor is its own keypoint crop
            images = torch.where(offline["cross"][:, None, None, None], offline["cross_views"][:, 0], images)
        if two_views:  # one forward over both views: BatchNorm (when it trains) sees them as one batch
            view = self.second_view(images, labels, index, self._generator(), offline)
            z, attention, fmap = self.attend(torch.cat([images, view.images]))
            (z, z2), (attention, attention2) = z.float().chunk(2), attention.chunk(2)
        else:
            z, attention, fmap = self.attend(images)
            z = z.float()
        loss, terms = self.ms_with_memory(z, labels)
        if self.ccl_weight:
            assigned = labels if self.ccl_positive == "assigned" else None
            terms["ccl"] = contrastive_clustering_loss(z, self.centers, assigned)
            loss = loss + self.ccl_weight * terms["ccl"]
        diagnostics = {"attention_std": attention.detach().float().flatten(1).std(1).mean()}
        if two_views:
            diagnostics["cross_share"] = view.cross.float().mean()
            if self.tac_weight:
                terms.update(self.tac_terms(attention, attention2, view))
                loss = loss + self.tac_weight * (terms["tac_self"] + terms["tac_cross"])
            if self.feature_weight:
                terms["feature"] = feature_similarity_loss(z, z2, self.feature_loss)
                loss = loss + self.feature_weight * terms["feature"]
        if self.grad_share_every and self.global_step % self.grad_share_every == 0 and fmap.requires_grad:
            shares = gradient_shares(self.weighted(terms), fmap)
            diagnostics.update({f"grad_share/{k}": v for k, v in shares.items()})
        if self.memory_weight:
            self.enqueue(z.detach(), index)  # after the memory term: the bank is read before it changes
        self.log_terms({"loss": loss, **terms, **diagnostics}, embedding=z)
        return loss

    def weighted(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """The loss's summands by component, each with its weight: ms, ms_memory, ccl, tac, feature."""
        weights = {"ms": 1.0, "ms_memory": self.memory_weight, "ccl": self.ccl_weight,
                   "tac_self": self.tac_weight, "tac_cross": self.tac_weight, "feature": self.feature_weight}
        out = {k: weights[k] * v for k, v in terms.items() if weights.get(k)}
        if "tac_self" in out:
            out["tac"] = out.pop("tac_self") + out.pop("tac_cross")
        return out
