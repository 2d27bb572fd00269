"""SAN: spatial assembly networks (Li, Kan, Yuan, Cao, He, CVPR 2021; dissertation ch. 5).

A module inserted after a named stage of the trunk (`Trunk.insert`): Φ predicts from the feature map F
(B, C, H, W) an N x N assembly matrix w[b, u, v] (N = H·W; row u = input point, column v = output point),
made doubly stochastic by log-domain Sinkhorn, and the upper network sees G[:, :, v] = Σ_u w[u, v] F[:, :, u]
(Eq. 5.4) in place of F. Regularisers (Eq. 5.12): L_Φ = λ1 E + λ2 C + λ3 L_LC, each 0 at a permutation
(L_LC: at the identity), with mean reductions (docs/methods/san.md).

The module starts at the identity (last conv of Φ zero, logits + β·I with β learnable, β0 = 8: diagonal mass
≈ 0.94 at N = 196), so a pretrained upper network first sees its usual input. Right before global average
pooling SAN would be a no-op (GAP of a doubly stochastic re-arrangement is GAP of the input): insert it where
convolutions follow (GoogLeNet `inception4e`, ResNet `layer3`; digits' small_cnn `block3`).

`SAN` is `supervised.MetricLearning` (MS / Proxy-Anchor + momentum memory, true or k-means labels) with the
module inserted; `assembly.enabled: false` is the same network without SAN (the baseline rows).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_modules.base import hparam
from lightning_modules.losses import fp32, gradient_shares
from lightning_modules.supervised import MetricLearning

NORMALIZATIONS = ("sinkhorn", "softmax_in")


# -- the assembly (pure functions; w[b, u, v], u = input point, v = output point) -------------------------
@fp32
def normalize_assembly(logits: Tensor, normalization: str = "sinkhorn", iterations: int = 5) -> Tensor:
    """w (B, N, N) from logits. sinkhorn: alternate "each row u sums to 1 over v" and "each column v sums
    to 1 over u", in the log domain, ending on the columns (each G(v) an exact convex combination, rows
    within a few %). softmax_in: one softmax over u per column (rows only softly constrained)."""
    if normalization == "sinkhorn":
        for _ in range(iterations):
            logits = logits - logits.logsumexp(2, keepdim=True)
            logits = logits - logits.logsumexp(1, keepdim=True)
        return logits.exp()
    if normalization == "softmax_in":
        return logits.softmax(1)
    raise ValueError(f"normalization {normalization!r}: use one of {', '.join(NORMALIZATIONS)}")


def assemble(w: Tensor, fmap: Tensor) -> Tensor:
    """Eq. 5.4: G[b, c, v] = Σ_u w[b, u, v] F[b, c, u], with G of F's shape."""
    b, c, h, width = fmap.shape
    return torch.einsum("buv,bcu->bcv", w.to(fmap.dtype), fmap.flatten(2)).view(b, c, h, width)


@fp32
def assembly_entropy(w: Tensor) -> Tensor:
    """Eq. 5.5 in bits, divided by 2N and averaged over the batch: the mean entropy of the column-normalised
    columns and row-normalised rows, in [0, log2 N]; 0 exactly at a permutation."""
    n = w.shape[-1]
    cols = w / w.sum(1, keepdim=True)
    rows = w / w.sum(2, keepdim=True)
    bits = -(torch.xlogy(cols, cols).sum((1, 2)) + torch.xlogy(rows, rows).sum((1, 2))) / math.log(2)
    return (bits / (2 * n)).mean()


@fp32
def assembly_correlation(w: Tensor) -> Tensor:
    """Eq. 5.6 in closed form, Σ_v[(Σ_u w)² − Σ_u w²] + Σ_u[(Σ_v w)² − Σ_v w²], divided by 2N, batch mean:
    0 at a permutation, 1 − 1/N for the uniform w."""
    n = w.shape[-1]
    squares = w.square().sum((1, 2))
    total = w.sum(1).square().sum(1) + w.sum(2).square().sum(1) - 2 * squares
    return (total / (2 * n)).mean()


def _pair(d: int, length: int) -> tuple[slice, slice]:
    """Index ranges a and a + d, both inside [0, length)."""
    return slice(max(0, -d), length - max(0, d)), slice(max(0, d), length - max(0, -d))


@fp32
def local_coherence(w: Tensor, fmap: Tensor, eps: float = 1e-12) -> Tensor:
    """Eqs. 5.7-5.8, mean over (point, neighbour) pairs and the batch: Σ α ‖W_{i,j} − 𝒮[W_{i+di,j+dj}]‖,
    W_{i,j} = row u = (i, j) as an H x W map, 𝒮[W'](n, m) = W'(n + di, m + dj) (zero outside), α the
    cosine of the input features (detached, clamped at 0). sqrt(Σ diff² + eps): at the identity every
    interior difference is 0, where a bare norm's gradient is undefined."""
    b, _, h, width = fmap.shape
    maps = w.view(b, h, width, h, width)
    unit = fmap.detach()
    unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-6)
    total, count = w.new_zeros(()), 0
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            if di == 0 and dj == 0:
                continue
            ia, ib = _pair(di, h)
            ja, jb = _pair(dj, width)
            own, neighbour = maps[:, ia, ja], maps[:, ib, jb]
            shifted = torch.zeros_like(neighbour)
            shifted[..., ia, ja] = neighbour[..., ib, jb]
            alpha = (unit[:, :, ia, ja] * unit[:, :, ib, jb]).sum(1).clamp_min(0)
            distance = torch.sqrt((own - shifted).square().sum((-1, -2)) + eps)
            total = total + (alpha * distance).sum()
            count += alpha.numel()
    return total / count


def assembly_diagnostics(w: Tensor) -> dict[str, Tensor]:
    """Mean diagonal mass (≈ 0.94 at init), share of output points whose argmax input is another point
    ("moved"), and the spread (std) of the row sums (Sinkhorn leaves rows a few % off 1)."""
    n = w.shape[-1]
    w = w.detach().float()
    moved = (w.argmax(1) != torch.arange(n, device=w.device)).float().mean()
    return {"san_diagonal": w.diagonal(dim1=1, dim2=2).mean(), "san_moved": moved,
            "san_row_sum_std": w.sum(2).std()}


# -- the module ------------------------------------------------------------------------------------------
@hparam
@dataclass
class Assembly:
    """Where and how SAN runs. enabled: false = the same network without SAN (the baseline
    rows); stage: the trunk stage it follows; hidden: Φ's width; normalization: sinkhorn | softmax_in; iterations: Sinkhorn steps; beta0:
    the identity prior's initial β (learnable); detach_input: Φ sees F.detach() (ablation of A14);
    control: the parameter-matched control, Φ's convs as a zero-initialised residual block G = F + Φ'(F)
    (no assembly, no regularisers), to tell assembly from extra capacity."""

    enabled: bool = True
    stage: str = "inception4e"
    hidden: int = 256
    normalization: str = "sinkhorn"
    iterations: int = 5
    beta0: float = 8.0
    detach_input: bool = False
    control: bool = False


class SpatialAssembly(nn.Module):
    """F (B, C, H, W) -> G of the same shape. Φ: Conv1x1(C→hidden) → ReLU → Conv3x3 → ReLU → Conv1x1(→N);
    output channel v at spatial position u is logit[u, v] (each input point predicts where it goes).
    While training with gradients on, the forward keeps (w, F) in `last` for the regularisers."""

    def __init__(self, channels: int, height: int, width: int, config: Assembly | None = None) -> None:
        super().__init__()
        self.config = config or Assembly()
        if self.config.normalization not in NORMALIZATIONS:
            raise ValueError(f"assembly.normalization {self.config.normalization!r}: use one of "
                             f"{', '.join(NORMALIZATIONS)}")
        self.size = (height, width)
        n, hidden = height * width, self.config.hidden
        out = channels if self.config.control else n
        self.phi = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, out, 1))
        nn.init.zeros_(self.phi[-1].weight)
        nn.init.zeros_(self.phi[-1].bias)
        self.beta = nn.Parameter(torch.tensor(float(self.config.beta0)))
        self.last: tuple[Tensor, Tensor] | None = None
        self.eval_counts = torch.zeros(3)  # moved points, diagonal mass, points over eval forwards

    def weights(self, fmap: Tensor) -> Tensor:
        """w (B, N, N), fp32."""
        if tuple(fmap.shape[-2:]) != self.size:
            raise ValueError(f"SAN was built for a {self.size} map and got {tuple(fmap.shape[-2:])}: the train "
                             "and eval image sizes must give the same map at the SAN stage")
        source = fmap.detach() if self.config.detach_input else fmap
        logits = self.phi(source).flatten(2).transpose(1, 2).float()  # (B, u, v)
        eye = torch.eye(logits.shape[-1], device=logits.device)
        return normalize_assembly(logits + self.beta * eye, self.config.normalization, self.config.iterations)

    def forward(self, fmap: Tensor) -> Tensor:
        if self.config.control:
            return fmap + self.phi(fmap.detach() if self.config.detach_input else fmap)
        w = self.weights(fmap)
        self.last = (w, fmap) if self.training and torch.is_grad_enabled() else None
        if not self.training:
            self.count_eval(w)
        return assemble(w, fmap)

    def reset_eval_counts(self) -> None:
        self.eval_counts = torch.zeros(3)

    @torch.no_grad()
    def count_eval(self, w: Tensor) -> None:
        """Accumulate (moved output points, diagonal mass, points) over eval forwards (`eval_summary`)."""
        diag = assembly_diagnostics(w)
        points = float(w.shape[0] * w.shape[-1])
        counts = torch.stack([diag["san_moved"].cpu() * points, diag["san_diagonal"].cpu() * points,
                              torch.tensor(points)])
        self.eval_counts = self.eval_counts + counts

    def eval_summary(self) -> dict[str, float]:
        """Share of output points whose argmax input is another point, and the mean diagonal mass, over the
        eval forwards since `reset_eval_counts` (the assembly on held-out images)."""
        moved, diagonal, points = self.eval_counts.tolist()
        return {"val/san_moved": moved / points, "val/san_diagonal": diagonal / points} if points else {}


def stage_shape(trunk: nn.Module, stage: str, in_chans: int, image_size: int) -> tuple[int, int, int]:
    """(C, H, W) of the trunk's map after `stage` for a square input, read by one eval-mode forward (BN
    statistics untouched)."""
    if stage not in trunk.stage_names():
        raise ValueError(f"unknown SAN stage {stage!r}; use one of {trunk.stage_names()}")
    module = getattr(trunk.net, trunk.stage_aliases.get(stage, stage))
    shapes: list[torch.Size] = []
    handle = module.register_forward_hook(lambda m, i, output: shapes.append(output.shape))
    was_training = trunk.training
    trunk.eval()
    try:
        with torch.no_grad():
            trunk(torch.zeros(1, in_chans, image_size, image_size, device=next(trunk.parameters()).device))
    finally:
        handle.remove()
        trunk.train(was_training)
    if len(shapes[0]) != 4:
        raise ValueError(f"stage {stage!r} gives a {tuple(shapes[0])} output, not a (B, C, H, W) map")
    return tuple(shapes[0][1:])


class SAN(MetricLearning):
    """MetricLearning with a SpatialAssembly after `assembly.stage` and its regularisers.

    assembly: `Assembly` (enabled false = the baseline without SAN). entropy_weight, correlation_weight,
    coherence_weight: λ1, λ2, λ3 (0.01, 0.1, 0.1: at λ1 = 0.1 the entropy's gradient holds the assembly at
    its identity start even where moving pays; see docs/methods/san.md). grad_share_every: steps between
    logs of each term's gradient share at the assembly matrix (0 = never; TAC-CCL's name for the same). The
    module is built in `setup`, where the datamodule's image size gives N; `insert_assembly(image_size)` does
    it outside a Trainer.
    """

    def __init__(self, assembly: Assembly | None = None, entropy_weight: float = 0.01,
                 correlation_weight: float = 0.1, coherence_weight: float = 0.1, grad_share_every: int = 10,
                 **kwargs):
        super().__init__(**kwargs)
        self.grad_share_every = grad_share_every
        self.assembly = assembly or Assembly()
        self.lambdas = {"entropy": entropy_weight, "correlation": correlation_weight,
                        "coherence": coherence_weight}
        self.image_size: int | None = None

    @property
    def san(self) -> SpatialAssembly | None:
        return next((m for m in self.trunk.modules() if isinstance(m, SpatialAssembly)), None)

    def insert_assembly(self, image_size: int) -> None:
        """Build SAN for `image_size` inputs, insert it after its stage and re-make the key network."""
        if not self.assembly.enabled or self.san is not None:
            return
        channels, height, width = stage_shape(self.trunk, self.assembly.stage, self.hparams.in_chans, image_size)
        module = SpatialAssembly(channels, height, width, self.assembly).to(self.device)
        self.trunk.insert(self.assembly.stage, module)
        self.image_size = image_size
        self.make_key_network()

    def setup(self, stage: str) -> None:
        self.insert_assembly(self.trunk_input_size())
        super().setup(stage)

    def trunk_input_size(self) -> int:
        return int(self.trainer.datamodule.image_size)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["san_image_size"] = self.image_size

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("san_image_size") is not None:
            self.insert_assembly(checkpoint["san_image_size"])
        super().on_load_checkpoint(checkpoint)

    def on_validation_epoch_start(self) -> None:
        if self.san is not None:
            self.san.reset_eval_counts()

    def validation_extras(self) -> dict[str, float]:
        """val/san_moved and val/san_diagonal over this validation's forwards (the evaluator adds them to
        the run's metrics, so final_metrics.json reports whether the assembly left the identity)."""
        return self.san.eval_summary() if self.san is not None else {}

    def regularisers(self) -> dict[str, Tensor]:
        """E, C and L_LC of the last training forward (empty without SAN or for the control)."""
        san = self.san
        if san is None or san.last is None:
            return {}
        w, fmap = san.last
        return {"entropy": assembly_entropy(w), "correlation": assembly_correlation(w),
                "coherence": local_coherence(w, fmap)}

    def extra_terms(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """λ1 E, λ2 C, λ3 L_LC (Eq. 5.12), each weighted; logs each term unweighted, β and the assembly
        diagnostics."""
        terms = self.regularisers()
        if not terms:
            return {}, {}
        weighted = {k: self.lambdas[k] * v for k, v in terms.items()}
        logged = {"san_loss": sum(weighted.values()), **{f"san_{k}": v for k, v in terms.items()},
                  **assembly_diagnostics(self.san.last[0]), "san_beta": self.san.beta.detach()}
        return weighted, logged

    def gradient_diagnostics(self, metric: dict[str, Tensor], extra: dict[str, Tensor], z: Tensor) -> dict[str, Tensor]:
        """Adds train/grad_share_assembly/<term>: each weighted term's share of the gradient at the assembly
        matrix w, so a run shows whether the metric losses or the regularisers steer the assembly (every
        `grad_share_every` steps; 0 = never)."""
        shares = super().gradient_diagnostics(metric, extra, z)
        san, every = self.san, self.grad_share_every
        if san is None or san.last is None or not every or self.global_step % every:
            return shares
        at_w = gradient_shares({**metric, **extra}, san.last[0])
        return {**shares, **{f"grad_share_assembly/{k}": v for k, v in at_w.items()}}
