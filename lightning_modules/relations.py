"""Instance relations (EIR, Zhang, Zhou, Wang): a memory bank of all N training embeddings and the two
relation terms EIR adds to an instance-discrimination base, reusable by any two-view method (EIR on IRaug,
ISIF with `relations`).

- intra-instance multi-view relation: each view's softmax distribution over the N bank entries (logits
  m_nᵀv / τ, the instance-discrimination logits themselves), aligned by KL(view 1 ‖ view 2), view 1 detached,
  summed over N and averaged over the batch (`batchmean` [R]; a per-entry mean would shrink it N-fold
  and make λ1 = 15 meaningless).
- inter-instance interpolation relation: an image mixed from view 1 of instance k (share r) and view 2 of a
  partner π(k) (CutMix or Mixup); its embedding is pulled, InfoNCE over the batch, towards the normalised
  r-weighted sum of the two source embeddings (EIR paper §3.3). For CutMix r is the kept area after the
  box is clipped to the image, not the drawn λ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embedding_core.distances import l2_normalize
from embedding_core.distributed import gather_ranks
from lightning_modules.base import hparam
from lightning_modules.losses import fp32

MIXES = ("cutmix", "mixup")
INTER_NEGATIVES = ("batch", "memory_bank")
IRAUG_FORMS = ("sum_ce", "log_of_sum")


# -- memory bank -----------------------------------------------------------------------------------------
def random_unit_rows(n: int, dim: int, seed: int) -> Tensor:
    """(n, dim) random unit vectors from a fixed seed, so every DDP rank starts from the same bank."""
    return l2_normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)))


@fp32
def bank_logits(v: Tensor, rows: Tensor, temperature: float) -> Tensor:
    """(B, N) similarities to every bank row over τ, in fp32 (an N-way softmax at 1/τ = 10 loses precision
    in half; the IRaug and intra terms share these)."""
    return v @ rows.T / temperature


@torch.no_grad()
def momentum_update(rows: Tensor, index: Tensor, feats: Tensor, momentum: float) -> Tensor:
    """A new bank with m_i <- l2(momentum·m_i + (1 - momentum)·v_i) for each index once (the first of
    repeated indices, e.g. a distributed sampler's padding); other rows unchanged. Out of place: a loss of
    this step that read the old bank still holds it."""
    index = index.to(rows.device)
    new = l2_normalize(momentum * rows[index] + (1.0 - momentum) * first_of_repeats(feats.to(rows), index))
    return rows.index_copy(0, index, new)  # repeats of an index write the same row


def first_of_repeats(values: Tensor, index: Tensor) -> Tensor:
    """`values` with each row replaced by that of the first row holding the same `index` (no host sync: a
    deduplication's boolean mask would block the host on a GPU)."""
    order = torch.argsort(index, stable=True)
    starts = torch.ones_like(order, dtype=torch.bool)
    starts[1:] = index[order[1:]] != index[order[:-1]]
    position = torch.arange(len(order), device=index.device)
    first = torch.empty_like(order)
    first[order] = order[torch.cummax(torch.where(starts, position, 0), 0).values]  # each group's first row
    return values[first]


class MemoryBank(nn.Module):
    """N x d buffer of unit rows (in checkpoints, so later rounds and resumes continue it). The size is the
    training set's, known only once the data is set up: `resize` in the module's `setup`; loading a state
    dict takes the stored shape."""

    def __init__(self, dim: int, momentum: float = 0.5, seed: int = 0):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"memory momentum {momentum}: use 0 <= m < 1 (0.5 by default)")
        self.dim, self.momentum, self.seed = dim, momentum, seed
        self.register_buffer("rows", torch.zeros(0, dim))

    def resize(self, n: int) -> None:
        """Random unit rows for a training set of n images (kept if the bank already has n rows)."""
        if len(self.rows) != n:
            self.rows = random_unit_rows(n, self.dim, self.seed).to(self.rows.device)

    def logits(self, v: Tensor, temperature: float) -> Tensor:
        if len(self.rows) == 0:
            raise RuntimeError("the memory bank is empty: the module's setup sizes it from the training set "
                               "(train through a Trainer with an EmbeddingDataModule)")
        return bank_logits(v, self.rows, temperature)

    def update(self, index: Tensor, feats: Tensor) -> None:
        self.rows = momentum_update(self.rows, index, feats.detach().float(), self.momentum)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        stored = state_dict.get(prefix + "rows")
        if stored is not None:
            self.rows = torch.empty_like(stored, device=self.rows.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def training_set_size(trainer) -> int:
    """N of the bank: the datamodule's training split."""
    dm = getattr(trainer, "datamodule", None)
    splits = getattr(dm, "splits", None)
    if not splits or "train" not in splits:
        raise ValueError("a memory bank needs the training-set size: use an EmbeddingDataModule (datamodules/), "
                         "whose splits['train'] holds the N images the bank has one row for")
    return len(splits["train"])


# -- instance discrimination (IRaug) -------------------------------------------------------------------
@fp32
def iraug_loss(logits1: Tensor, logits2: Tensor, index: Tensor, form: str = "sum_ce") -> Tensor:
    """L_IRaug over the N-way non-parametric softmax of both views, mean over the batch. `sum_ce` [R]:
    -log P(i|v) - log P(i|v̂); `log_of_sum`: Eq. 2/3 literally, -log(P(i|v) + P(i|v̂))."""
    if form == "sum_ce":
        return F.cross_entropy(logits1, index) + F.cross_entropy(logits2, index)
    if form == "log_of_sum":
        rows = torch.arange(len(index), device=index.device)
        own = torch.stack([torch.log_softmax(lg, 1)[rows, index] for lg in (logits1, logits2)])
        return -torch.logsumexp(own, 0).mean()
    raise ValueError(f"iraug_form {form!r}: use one of {', '.join(IRAUG_FORMS)}")


# -- intra-instance multi-view relation ------------------------------------------------------------------
@fp32
def intra_relation_loss(teacher_logits: Tensor, student_logits: Tensor, detach_teacher: bool = True,
                        exclude: Tensor | None = None) -> Tensor:
    """(1/B) Σ_k KL(softmax(teacher_k) ‖ softmax(student_k)), each KL summed over the anchors (bank rows).
    `exclude` (B,) drops one anchor per row from both distributions (the instance's own bank entry)."""
    if exclude is not None:
        keep = torch.ones_like(teacher_logits, dtype=torch.bool)
        keep[torch.arange(len(exclude), device=exclude.device), exclude] = False
        shape = (len(keep), keep.shape[1] - 1)
        teacher_logits, student_logits = teacher_logits[keep].view(shape), student_logits[keep].view(shape)
    if detach_teacher:
        teacher_logits = teacher_logits.detach()
    return F.kl_div(torch.log_softmax(student_logits, 1), torch.log_softmax(teacher_logits, 1),
                    reduction="batchmean", log_target=True)


# -- inter-instance interpolation relation ---------------------------------------------------------------
def cutmix_box(height: int, width: int, ratio: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of CutMix's box (Yun et al. 2019 code): sides ⌊H√(1-r)⌋ x ⌊W√(1-r)⌋ about
    a uniform centre, clipped to the image."""
    cut_h, cut_w = int(height * math.sqrt(1.0 - ratio)), int(width * math.sqrt(1.0 - ratio))
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
    left, right = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    return int(top), int(bottom), int(left), int(right)


def paste(base: Tensor, other: Tensor, box: tuple[int, int, int, int]) -> tuple[Tensor, float]:
    """`other` pasted into `base` inside the box; r = the share of the base image kept (1 - box area)."""
    top, bottom, left, right = box
    mixed = base.clone()
    mixed[..., top:bottom, left:right] = other[..., top:bottom, left:right]
    height, width = base.shape[-2:]
    return mixed, 1.0 - (bottom - top) * (right - left) / (height * width)


def mix_images(base: Tensor, other: Tensor, mode: str, rng: np.random.Generator,
               alpha: float = 1.0) -> tuple[Tensor, float]:
    """(mixed batch, r) from r ~ Beta(alpha, alpha), one draw (and one CutMix box) per batch [R]."""
    ratio = float(rng.beta(alpha, alpha))
    if mode == "cutmix":
        return paste(base, other, cutmix_box(*base.shape[-2:], ratio, rng))
    if mode == "mixup":
        return ratio * base + (1.0 - ratio) * other, ratio
    raise ValueError(f"mix {mode!r}: use one of {', '.join(MIXES)}")


def interpolation_target(base: Tensor, other: Tensor, ratio: float) -> Tensor:
    """ṽ = l2(r·f(x_base) + (1 - r)·f(x_other)): the pixel-space ratio carried to feature space."""
    return l2_normalize(ratio * base + (1.0 - ratio) * other)


@fp32
def interpolation_loss(mixed: Tensor, target: Tensor, temperature: float = 0.1, detach_target: bool = True,
                       bank: Tensor | None = None) -> Tensor:
    """L_inter (Eq. 9 read as InfoNCE [R]): for each target ṽ_k the softmax over the mixed features
    of the batch, positive v_k. With `bank` (negatives "memory_bank"): anchor v_k, positive ṽ_k, negatives
    every bank row."""
    if detach_target:
        target = target.detach()
    if bank is None:
        logits = target @ mixed.T / temperature
    else:
        logits = torch.cat([(mixed * target).sum(1, keepdim=True), mixed @ bank.T], 1) / temperature
        return F.cross_entropy(logits, torch.zeros(len(mixed), dtype=torch.long, device=mixed.device))
    return F.cross_entropy(logits, torch.arange(len(mixed), device=mixed.device))


@hparam
@dataclass
class Relations:
    """The relation terms added to a base loss: base + intra_weight·L_intra + inter_weight·L_inter.

    intra_weight, inter_weight: λ1, λ2 (EIR: 15, 2; 0 switches a term off: Table 1's rows).
    temperature: τ of both terms (the paper's single τ = 0.1).
    intra_detach_target / intra_exclude_self: stop-gradient on view 1's distribution; drop the instance's
      own bank entry from both distributions.
    mix, mix_alpha: cutmix | mixup, r ~ Beta(alpha, alpha) per batch.
    inter_detach_target: stop-gradient on ṽ. inter_negatives: batch (Eq. 9) | memory_bank (authors' later code).
    """

    intra_weight: float = 0.0
    inter_weight: float = 0.0
    temperature: float = 0.1
    intra_detach_target: bool = True
    intra_exclude_self: bool = False
    mix: str = "cutmix"
    mix_alpha: float = 1.0
    inter_detach_target: bool = True
    inter_negatives: str = "batch"

    def __post_init__(self):
        if self.mix not in MIXES:
            raise ValueError(f"relations.mix {self.mix!r}: use one of {', '.join(MIXES)}")
        if self.inter_negatives not in INTER_NEGATIVES:
            raise ValueError(f"relations.inter_negatives {self.inter_negatives!r}: use one of "
                             f"{', '.join(INTER_NEGATIVES)}")
        if self.intra_weight < 0 or self.inter_weight < 0 or self.mix_alpha <= 0:
            raise ValueError("relations: intra_weight and inter_weight must be >= 0 and mix_alpha > 0")

    @property
    def needs_bank(self) -> bool:
        return self.intra_weight > 0 or (self.inter_weight > 0 and self.inter_negatives == "memory_bank")


def step_rng(seed: int, step: int, rank: int) -> np.random.Generator:
    """The mixing draws of one step on one rank, a function of (seed, step, rank) so a resume repeats them."""
    return np.random.default_rng([seed, step, rank])


def relation_terms(module, views: list[Tensor], z1: Tensor, z2: Tensor, index: Tensor, relations: Relations,
                   bank: MemoryBank | None, rng: np.random.Generator, gather: bool,
                   bank_logits: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
    """The switched-on relation terms of one step, unweighted, plus the mixing ratio r: {"intra", "inter",
    "mix_ratio"} as applicable. z1, z2: this rank's features of the two views (B, d); `bank_logits`: their
    logits over the bank at the relations' τ where the base already has them (EIR: no extra product).
    `module` embeds the mixed batch (a third forward, so BatchNorm never sees clean and mixed images
    together) and gathers across ranks (`gather`: the inter term's InfoNCE over the global batch)."""
    terms: dict[str, Tensor] = {}
    if relations.intra_weight > 0:
        if bank_logits is None:
            bank_logits = (bank.logits(z1, relations.temperature), bank.logits(z2, relations.temperature))
        exclude = index if relations.intra_exclude_self else None
        terms["intra"] = intra_relation_loss(*bank_logits, relations.intra_detach_target, exclude)
    if relations.inter_weight > 0:
        partner = torch.as_tensor(rng.permutation(len(z1))).to(z1.device, non_blocking=True)  # no host sync
        mixed_images, ratio = mix_images(views[0], views[1][partner], relations.mix, rng, relations.mix_alpha)
        mixed = module(mixed_images).float()
        target = interpolation_target(z1, z2[partner], ratio)
        rows = None
        if relations.inter_negatives == "memory_bank":
            rows = bank.rows
        elif gather and module._trainer is not None:
            mixed, target = module.gather(mixed), module.gather(target)
        terms["inter"] = interpolation_loss(mixed, target, relations.temperature, relations.inter_detach_target,
                                            rows)
        terms["mix_ratio"] = torch.tensor(ratio)
    return terms


def weighted_sum(base: Tensor, terms: dict[str, Tensor], relations: Relations) -> Tensor:
    """base + λ1·L_intra + λ2·L_inter over the terms present."""
    return (base + relations.intra_weight * terms.get("intra", 0.0)
            + relations.inter_weight * terms.get("inter", 0.0))


@torch.no_grad()
def gather_rows(module, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Every rank's rows, without gradient (identity on one process): a bank write sees the global batch."""
    return gather_ranks(module, *tensors)
