"""A memory bank of detached embeddings that stores dataset indices, so pseudo labels are looked up fresh.

The bank is refilled with every clustered embedding at a k-means refresh and then updated FIFO with each
step's batch (all ranks' rows, so the banks of all ranks stay identical). Its labels are never stored: a
method reads them at use (`memory_labels`: `pseudo_labels[memory_index]`), so a re-clustering never leaves
stale labels.
TAC-CCL, ROUL and the supervised / SAN queue all use this one.
"""
from __future__ import annotations

import torch
from torch import Tensor

from embedding_core.distributed import gather_ranks
from embedding_core.seeds import step_generator
from lightning_modules.losses import multi_similarity_loss


class IndexedMemory:
    """Mixin for a LightningModule that registered `memory_embedding`, `memory_index`, `memory_cursor`
    (see `register_memory`)."""

    def register_memory(self, dim: int) -> None:
        self.register_buffer("memory_embedding", torch.zeros(0, dim))
        self.register_buffer("memory_index", torch.zeros(0, dtype=torch.long))
        self.register_buffer("memory_cursor", torch.zeros((), dtype=torch.long))

    def refill_memory(self, embedding: Tensor) -> None:
        """The bank := `embedding` (N, d) of the whole training split, row i = dataset index i."""
        self.memory_embedding = embedding.detach().to(self.device, torch.float32).clone()
        self.memory_index = torch.arange(len(embedding), device=self.device)
        self.memory_cursor.zero_()

    @torch.no_grad()
    def enqueue(self, embedding: Tensor, index: Tensor) -> None:
        """FIFO update with every rank's batch. Out of place: a loss term read from the bank this step, not
        yet back-propagated, still holds the old bank."""
        embedding, index = gather_ranks(self, embedding, index)
        slots = (self.memory_cursor + torch.arange(len(index), device=self.device)) % len(self.memory_index)
        self.memory_embedding = self.memory_embedding.index_copy(0, slots, embedding.float())
        self.memory_index = self.memory_index.index_copy(0, slots, index)
        self.memory_cursor.copy_((self.memory_cursor + len(index)) % len(self.memory_index))

    def memory_labels(self) -> Tensor:
        """The bank rows' labels, read now from the module's pseudo labels."""
        return self.pseudo_labels[self.memory_index]

    def batch_pseudo_labels(self, index: Tensor) -> Tensor:
        """The batch's pseudo labels by dataset index; a clear stop when no k-means refresh has set any."""
        if len(self.pseudo_labels) == 0:
            raise RuntimeError(f"{type(self).__name__} has no pseudo labels: add callbacks.pseudo_labels."
                               "KMeansPseudoLabels to trainer.callbacks (it sets them before the first epoch)")
        return self.pseudo_labels[index]

    def _generator(self) -> torch.Generator:
        """This step's CPU generator on this rank (`step_generator` of the module's `seed`)."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return step_generator(self.seed, self.global_step, rank)

    def own_copies(self, index: Tensor) -> Tensor:
        """(B, M) bool: bank row m holds a copy of query b's own sample (same dataset index). After a refill
        the FIFO overwrites from slot 0, so a stale copy of the query sits in the bank as a same-label
        "positive" whose similarity only says how much the query changed since it was stored."""
        return index.to(self.memory_index.device)[:, None] == self.memory_index[None, :]

    def ms_with_memory(self, z: Tensor, labels: Tensor, index: Tensor | None = None,
                       batch_term: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, terms): the MS loss of the batch ("ms", when `batch_term`) plus memory_weight x the MS loss
        of the batch against the bank ("ms_memory", when memory_weight), with the module's `ms` settings
        (TAC-CCL, ROUL). `index` (B,) the queries' dataset indices: their own copies in the bank are left
        out (`own_copies`); None keeps them."""
        terms, loss = {}, z.new_zeros(())
        if batch_term:
            terms["ms"] = multi_similarity_loss(z, labels, **self.ms)
            loss = terms["ms"]
        if self.memory_weight:
            exclude = None if index is None else self.own_copies(index)
            terms["ms_memory"] = multi_similarity_loss(z, labels, self.memory_embedding, self.memory_labels(),
                                                       exclude=exclude, **self.ms)
            loss = loss + self.memory_weight * terms["ms_memory"]
        return loss, terms

    def resize_buffers_from(self, checkpoint: dict, names: tuple[str, ...]) -> None:
        """Buffers whose size is the training set's (unknown at construction) take the checkpoint's shapes."""
        state = checkpoint["state_dict"]
        for name in (n for n in names if n in state):
            setattr(self, name, torch.empty_like(state[name], device=self.device))
