"""Features of a whole split from the current model, gathered over DDP ranks: what k-means pseudo labels,
sample discovery and nearest-neighbour positives all start from."""
from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader

from callbacks.evaluation import gather_unique


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


def own_random_stream():
    """A context whose draws leave the global (CPU and current CUDA device) random state as it was. LMCS's
    bookkeeping (the master's build, its k-means feature pass, discovery) runs in one, so it never shifts the
    student's MixUp draws: LMCS without guidance or discovery trains the student exactly as MixMatch alone on
    the same seed, which pairs the two in the digits study."""
    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else [])
