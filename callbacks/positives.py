"""ISIF's CUB positives (docs/methods/isif.md): at the start of every epoch, epoch 0 included, each
training image's positive becomes, with probability 1/2, its nearest neighbour instead of a second view
of itself.

Neighbours come from the L2-normalised pooled backbone features (pool5, not the embedding [C]) of the
training split through the eval transform; the draw is seeded by (seed, epoch), so resumes repeat it.
"""
from __future__ import annotations

import lightning as L
import torch

from embedding_core.distances import l2_normalize
from embedding_core.features import extract_features
from embedding_core.search import topk_search


def draw_partners(neighbour: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """partner[i] = neighbour[i] with `probability`, else i (the image's own second view)."""
    take = torch.rand(len(neighbour), generator=generator) < probability
    return torch.where(take, neighbour.cpu(), torch.arange(len(neighbour)))


class NearestNeighbourPositives(L.Callback):
    """Hands `datamodule.set_positive_partners(partner)` a fresh partner per training image each epoch."""

    def __init__(self, probability: float = 0.5, seed: int = 0):
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability {probability} must lie in [0, 1]")
        self.probability, self.seed = probability, seed
        self.share = 0.0

    # Partners must be set before the epoch's loader iterator exists (its workers copy the dataset): the
    # first epoch's at fit start (a resumed run included), every later one's at the end of the epoch before.
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.refresh(trainer, pl_module, trainer.current_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 < trainer.max_epochs:
            self.refresh(trainer, pl_module, trainer.current_epoch + 1)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log("train/nn_positive_share", self.share, on_step=False, on_epoch=True)

    def refresh(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        datamodule = trainer.datamodule
        features, _, _ = extract_features(pl_module, datamodule.train_eval_dataloader(),
                                          lambda images: l2_normalize(pl_module.trunk(images)))
        _, neighbour = topk_search(features, features, k=1, exclude_self=True)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        partners = draw_partners(neighbour[:, 0], self.probability, generator)
        datamodule.set_positive_partners(partners.numpy())
        self.share = float((partners != torch.arange(len(partners))).float().mean())
