"""Rows across DDP ranks: the one place that stacks `all_gather` results and drops a sampler's padding."""
from __future__ import annotations

import lightning as L
import torch


def gather_ranks(module: L.LightningModule, *tensors: torch.Tensor,
                 sync_grads: bool = False) -> tuple[torch.Tensor, ...]:
    """Every rank's rows, rank after rank (`all_gather` then `flatten(0, 1)`); the tensors themselves on one
    process or a module without a trainer. `sync_grads=True` lets the gradient flow back to this rank's rows."""
    if module._trainer is None or module.trainer.world_size == 1:
        return tensors
    return tuple(module.all_gather(t, sync_grads=sync_grads).flatten(0, 1) for t in tensors)


def deduplicate(embedding: torch.Tensor, target: torch.Tensor, index: torch.Tensor):
    """Rows sorted by dataset index, each index once: the padding a DistributedSampler adds is gone and
    the order no longer depends on the number of processes."""
    order = torch.argsort(index, stable=True)
    index, embedding, target = index[order], embedding[order], target[order]
    first = torch.ones_like(index, dtype=torch.bool)
    first[1:] = index[1:] != index[:-1]
    return embedding[first], target[first], index[first]


def gather_unique(pl_module: L.LightningModule, embedding: torch.Tensor, target: torch.Tensor,
                  index: torch.Tensor):
    """All ranks' rows (equal counts per rank, as a DistributedSampler pads them), each index once."""
    return deduplicate(*gather_ranks(pl_module, embedding, target, index))
