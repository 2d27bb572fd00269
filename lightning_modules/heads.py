"""Heads that turn trunk features into embeddings."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embedding_core.distances import l2_normalize


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


class GaussianHead(nn.Module):
    """Diagonal Gaussian embedding (UMM): per component c, a unit-norm mean μ_c and a log-variance.

    `components` C > 1 is the mixture of Eq. 3: C independent (μ, Σ) branch pairs, stored as one linear
    layer of C·D outputs per moment (equivalent to C concatenated linear branches). The log-variance is
    clamped to `logvar_range` so sampling can neither vanish nor explode; `variance` picks the map from
    the branch output to σ²: "exp" (the output is log σ²) or "softplus" (σ² = softplus + 1e-6). The
    variance branch starts at σ² = 1/D per dimension (weights ~ N(0, `logvar_init_std`)), so E‖σ ⊙ ε‖² ≈ 1
    = ‖μ‖²: large but learnable uncertainty at epoch 0, as the paper's Fig. 10 shows.
    """

    def __init__(self, in_dim: int, out_dim: int = 128, components: int = 1, variance: str = "exp",
                 logvar_range: tuple[float, float] = (-10.0, 2.0), logvar_init_std: float = 1e-3) -> None:
        super().__init__()
        if variance not in ("exp", "softplus"):
            raise ValueError(f"variance {variance!r}: use exp or softplus")
        if components < 1:
            raise ValueError(f"components {components}: use C >= 1 (1 = a single Gaussian)")
        self.out_dim, self.components, self.variance = out_dim, components, variance
        self.logvar_range = (float(logvar_range[0]), float(logvar_range[1]))
        self.mean = nn.Linear(in_dim, components * out_dim)
        self.log_variance = nn.Linear(in_dim, components * out_dim)
        initial = math.log(1.0 / out_dim) if variance == "exp" else math.log(math.expm1(1.0 / out_dim))
        nn.init.normal_(self.log_variance.weight, std=logvar_init_std)
        nn.init.constant_(self.log_variance.bias, initial)

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(μ, log σ²), each (B, C, D); every μ_c has unit norm."""
        shape = (x.shape[0], self.components, self.out_dim)
        mu = l2_normalize(self.mean(x).view(shape))
        raw = self.log_variance(x).view(shape)
        logvar = raw if self.variance == "exp" else torch.log(F.softplus(raw) + 1e-6)
        return mu, logvar.clamp(*self.logvar_range)

    @staticmethod
    def embedding(mu: Tensor) -> Tensor:
        """The deterministic embedding scored at test time: the normalised mixture mean (μ itself if C = 1)."""
        return l2_normalize(mu.mean(dim=1))

    def forward(self, x: Tensor) -> Tensor:
        shape = (x.shape[0], self.components, self.out_dim)
        return self.embedding(l2_normalize(self.mean(x).view(shape)))
