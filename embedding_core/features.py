"""Features of a whole split from the current model, gathered over DDP ranks: what k-means pseudo labels,
sample discovery and nearest-neighbour positives all start from."""
from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader

from embedding_core.distributed import gather_unique


@torch.no_grad()
def extract_features(pl_module: L.LightningModule, loader: DataLoader,
                     forward: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """(features, targets, index) for every item of `loader`, in dataset-index order, identical on every
    rank. `forward` defaults to the module's evaluation embedding; the module is in eval mode meanwhile."""
    forward = forward or pl_module.embed
    was_training = pl_module.training
    pl_module.eval()
    parts = {"embedding": [], "target": [], "index": []}
    for batch in loader:
        parts["embedding"].append(forward(batch["image"].to(pl_module.device)).float())
        parts["target"].append(batch["target"].to(pl_module.device))
        parts["index"].append(batch["index"].to(pl_module.device))
    pl_module.train(was_training)
    return gather_unique(pl_module, *(torch.cat(parts[k]) for k in ("embedding", "target", "index")))
