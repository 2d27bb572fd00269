"""ISIF: Invariant and Spreading Instance Feature (Ye et al., CVPR 2019).

Default: the symmetric 2N form of the authors' code (docs/methods/isif.md): every one of the 2N features is an
anchor, its other view the positive, the other 2N-2 in-batch features the negatives, the anchor itself
excluded, candidates detached, mean over the 2N anchors. Option `variant="literal"`: the paper's Eq. 3/4
(positives from branch-2 queries against branch-1 features; negatives from branch-1 queries against
branch-1 features, self included in the denominator), also divided by the number of terms' anchors m.
"""
from __future__ import annotations

import torch

from lightning_modules.base import EmbeddingModule
from lightning_modules.losses.instance import isif_loss, isif_loss_literal
from lightning_modules.relations import (
    MemoryBank,
    Relations,
    gather_rows,
    relation_terms,
    step_rng,
    training_set_size,
    weighted_sum,
)


class ISIF(EmbeddingModule):
    """ISIF on two views per instance.

    variant: "symmetric" (authors' code, default) | "literal" (paper Eq. 3/4).
    gather_negatives: under DDP, compute the loss on all ranks' features (the official DataParallel
      saw the whole batch); gradients flow back to each rank's own rows.
    bn_per_view: forward the two views separately (BN statistics per view, as the official 4-GPU
      DataParallel did); default one forward of the 2N batch ([R], docs/methods/isif.md).
    relations: EIR's instance-relation terms on top of the ISIF loss (`lightning_modules.relations`; off by
      default). The intra term needs a memory bank of all N training embeddings (momentum
      `memory_momentum`, written with view 1's features); `seed` seeds it and the mixing draws.
    """

    def __init__(self, temperature: float = 0.1, variant: str = "symmetric", detach_candidates: bool = True,
                 negative_selection: str = "all", gather_negatives: bool = True, bn_per_view: bool = False,
                 relations: Relations | None = None, memory_momentum: float = 0.5, seed: int = 0,
                 **kwargs):
        super().__init__(**kwargs)
        if variant not in ("symmetric", "literal"):
            raise ValueError(f"variant {variant!r}: use symmetric or literal")
        if variant == "literal" and negative_selection != "all":
            raise ValueError("negative_selection applies to the symmetric variant only")
        self.temperature, self.variant, self.detach_candidates = temperature, variant, detach_candidates
        self.negative_selection, self.gather_negatives, self.bn_per_view = (
            negative_selection, gather_negatives, bn_per_view)
        self.relations, self.seed = relations or Relations(), seed
        needs_bank = self.relations.needs_bank
        self.bank = MemoryBank(self.hparams.embedding_dim, memory_momentum, seed) if needs_bank else None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.bank is not None:
            self.bank.resize(training_set_size(self.trainer))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        v1, v2 = batch["views"][:2]
        z1, z2 = [self(v).float() for v in (v1, v2)] if self.bn_per_view else self.embed_views([v1, v2])
        related = relation_terms(self, [v1, v2], z1, z2, batch["index"], self.relations, self.bank,
                                 step_rng(self.seed, self.global_step, self.global_rank), self.gather_negatives)
        if self.bank is not None:
            self.bank.update(*gather_rows(self, batch["index"], z1.detach()))
        if self.gather_negatives:
            z1, z2 = self.gather(z1), self.gather(z2)
        if self.variant == "literal":
            terms = isif_loss_literal(z1, z2, self.temperature, self.detach_candidates)
        else:
            terms = isif_loss(z1, z2, self.temperature, self.detach_candidates, self.negative_selection)
        if related:
            terms = {**terms, "isif": terms["loss"], **related,
                     "loss": weighted_sum(terms["loss"], related, self.relations)}
        self.log_terms(terms, embedding=z1)
        return terms["loss"]
