"""Heads that turn trunk features into embeddings."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Rows scaled to unit L2 norm (last dimension): the one name for this step across methods."""
    return F.normalize(x, p=2.0, dim=-1, eps=eps)


class EmbeddingHead(nn.Module):
    """Linear projection then L2 normalisation, as in ISIF/NPID (no BN, ReLU or MLP).

    `normalize=False` returns the raw projection, for methods that normalise later themselves.
    """

    def __init__(self, in_dim: int, out_dim: int = 128, normalize: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.normalize = normalize

    def forward(self, x: Tensor) -> Tensor:
        z = self.linear(x)
        return l2_normalize(z) if self.normalize else z
