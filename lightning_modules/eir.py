"""EIR: Exploring Instance Relations for unsupervised feature embedding (Zhang, Zhou, Wang).

    Loss = L_IRaug + λ1 L_intra + λ2 L_inter        (Eq. 10; λ1 = 15, λ2 = 2)

L_IRaug (the baseline, NPID on two views): each view's N-way non-parametric softmax against a memory bank
of all N training embeddings (fp32), the instance's own row the target. The bank is read before this
step's write; then m_i <- l2(m·m_i + (1 - m)·v_i) with view 1's features (m = 0.5 [R]), every
rank's indices and features gathered so each row is written once per step and all ranks hold one bank.
L_intra and L_inter are `lightning_modules.relations` (also switchable on ISIF). Table 1's rows come from
config: baseline = relations.intra_weight 0 and inter_weight 0; +intra; +inter; both. Multiple rounds
(Table 2's 2Rs / 5Rs): max_epochs = rounds x 200 with schedule.restart_every 200 (weights, bank and
optimizer carry on; the lr schedule restarts).
"""
from __future__ import annotations

import torch

from lightning_modules.base import EmbeddingModule
from lightning_modules.relations import (
    IRAUG_FORMS,
    MemoryBank,
    Relations,
    gather_rows,
    iraug_loss,
    relation_terms,
    step_rng,
    training_set_size,
    weighted_sum,
)


class EIR(EmbeddingModule):
    """IRaug + instance relations on two views per instance.

    temperature: τ of the non-parametric softmax (the relations carry their own, 0.1 in every config).
    iraug_form: sum_ce (default [R], docs/methods/eir.md) | log_of_sum (Eq. 2/3 literally).
    memory_momentum: m of the bank update. relations: λ1, λ2 and the options of the two terms.
    gather_negatives: under DDP the inter term's InfoNCE runs over every rank's mixed images.
    seed: seeds the bank's random init (the same on every rank) and, with the step and rank, each step's
      mixing draws (partner permutation, r, CutMix box), so a resume repeats them.
    """

    def __init__(self, temperature: float = 0.1, iraug_form: str = "sum_ce", memory_momentum: float = 0.5,
                 relations: Relations | None = None, gather_negatives: bool = True, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if iraug_form not in IRAUG_FORMS:
            raise ValueError(f"iraug_form {iraug_form!r}: use one of {', '.join(IRAUG_FORMS)}")
        self.temperature, self.iraug_form, self.gather_negatives, self.seed = (
            temperature, iraug_form, gather_negatives, seed)
        self.relations = relations or Relations()
        self.bank = MemoryBank(self.hparams.embedding_dim, memory_momentum, seed)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.bank.resize(training_set_size(self.trainer))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        views, index = batch["views"][:2], batch["index"]
        z1, z2 = (self(v).float() for v in views)  # separate forwards: BN statistics per view [R]
        logits1, logits2 = (self.bank.logits(z, self.temperature) for z in (z1, z2))
        terms = {"iraug": iraug_loss(logits1, logits2, index, self.iraug_form)}
        rank = self.global_rank if self._trainer is not None else 0
        shared = (logits1, logits2) if self.relations.temperature == self.temperature else None
        terms.update(relation_terms(self, views, z1, z2, index, self.relations, self.bank,
                                    step_rng(self.seed, self.global_step, rank), self.gather_negatives, shared))
        loss = weighted_sum(terms["iraug"], terms, self.relations)
        self.write_bank(index, z1.detach())  # after every term has read the old bank
        self.log_terms({"loss": loss, **terms}, embedding=z1)
        return loss

    def write_bank(self, index: torch.Tensor, feats: torch.Tensor) -> None:
        """This rank's view-1 features into the bank, with every other rank's: all ranks write the same
        global batch, each index once, so their banks stay identical."""
        self.bank.update(*gather_rows(self, index, feats))
