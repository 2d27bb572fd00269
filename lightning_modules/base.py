"""EmbeddingModule: the base every method stands on.

The base owns everything but the loss: backbone + head, the evaluation embedding, optimizer parameter
groups, the lr schedule (a pure function of the epoch, so it survives a resume), EMA pairs and the
non-finite-loss stop. A method overrides `training_step` only, and logs its terms with `log_terms`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from embedding_core.distributed import gather_ranks
from lightning_modules.backbones import build_backbone
from lightning_modules.heads import EmbeddingHead


def hparam(cls: type) -> type:
    """Marks a dataclass that modules take as a constructor argument: it is saved in the checkpoint's
    hyperparameters, so a resume (torch.load with weights_only) must be allowed to rebuild it."""
    torch.serialization.add_safe_globals([cls])
    return cls


@hparam
@dataclass
class Optim:
    """Optimizer and parameter groups. `lr_mult` maps a parameter-name prefix (e.g. "head") to an lr
    multiplier; `decay_norm_and_bias=False` puts norms and biases in a group without weight decay, and
    `no_decay` lists parameter-name prefixes that never decay (LMCS's composition network)."""

    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.03
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 5e-4
    decay_norm_and_bias: bool = True
    lr_mult: dict[str, float] = field(default_factory=dict)
    no_decay: list[str] = field(default_factory=list)


@hparam
@dataclass
class Schedule:
    """lr factor per epoch. step: `factors[i]` of the initial lr from epoch `milestones[i]` on;
    cosine: from 1 to `min_factor` over max_epochs; constant: 1. Optional linear warmup.
    restart_every: > 0 restarts the schedule every that many epochs (training rounds, EIR's 2Rs / 5Rs:
    each round is the schedule over restart_every epochs; weights and optimizer state carry on)."""

    name: str = "constant"  # constant | step | cosine
    milestones: list[int] = field(default_factory=list)
    factors: list[float] = field(default_factory=list)
    min_factor: float = 0.0
    warmup_epochs: int = 0
    restart_every: int = 0


def lr_factor(epoch: int, schedule: Schedule, max_epochs: int) -> float:
    """The lr multiplier at `epoch` (0-based): a pure function, so a resumed run continues exactly."""
    if schedule.restart_every > 0:
        epoch, max_epochs = epoch % schedule.restart_every, schedule.restart_every
    warm = min(1.0, (epoch + 1) / schedule.warmup_epochs) if schedule.warmup_epochs else 1.0
    if schedule.name == "constant":
        return warm
    if schedule.name == "step":
        passed = [f for m, f in zip(schedule.milestones, schedule.factors) if epoch >= m]
        return warm * (passed[-1] if passed else 1.0)
    if schedule.name == "cosine":
        t = min(epoch / max(max_epochs, 1), 1.0)
        return warm * (schedule.min_factor + (1 - schedule.min_factor) * 0.5 * (1 + math.cos(math.pi * t)))
    raise ValueError(f"unknown schedule {schedule.name!r}; use constant, step or cosine")


def parameter_groups(model: nn.Module, optim: Optim) -> list[dict]:
    """Groups keyed by (lr multiplier, weight decay), in a stable order; frozen parameters left out."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        mult = next((m for prefix, m in optim.lr_mult.items() if name.startswith(prefix)), 1.0)
        no_decay = (not optim.decay_norm_and_bias and param.ndim <= 1) or name.startswith(tuple(optim.no_decay))
        groups.setdefault((mult, 0.0 if no_decay else optim.weight_decay), []).append(param)
    return [{"params": ps, "lr": optim.lr * m, "weight_decay": wd} for (m, wd), ps in groups.items()]


def build_optimizer(groups: list[dict], optim: Optim) -> torch.optim.Optimizer:
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov)
    if optim.name in ("adam", "adamw"):
        cls = torch.optim.Adam if optim.name == "adam" else torch.optim.AdamW
        return cls(groups, lr=optim.lr, betas=optim.betas)
    raise ValueError(f"unknown optimizer {optim.name!r}; use sgd, adam or adamw")


def divergence_message(problem: str, epoch: int, step: int, checkpoint: str | None) -> str:
    """The divergence stop (`problem`: "non-finite loss (nan)", "non-finite weights in ...", ...); it offers a
    resume only from a checkpoint that exists."""
    where = f"{problem} at epoch {epoch}, step {step}: the run stops here"
    if checkpoint is None:
        return (f"{where}. No checkpoint was written before it (a run saves at the end of each epoch): lower "
                "the learning rate (--model.optim.lr) or check the inputs, and start again.")
    return (f"{where} and the last good checkpoint is kept: {checkpoint}. Lower the learning rate and resume "
            f"from it (--ckpt_path={checkpoint} --model.optim.lr=...; on resume the command line's settings "
            "win), or check the inputs.")


def non_finite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in a state dict that hold NaN or inf (one device sync)."""
    names = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()]
    if not names:
        return []
    finite = torch.stack([torch.isfinite(state[k]).all() for k in names]).tolist()
    return [k for k, ok in zip(names, finite) if not ok]


def saved_checkpoint(trainer) -> str | None:
    """The newest checkpoint on disk a run can resume from (its own, else the one it resumed from)."""
    paths = [cb.last_model_path or cb.best_model_path for cb in trainer.checkpoint_callbacks]
    paths.append(trainer.ckpt_path)
    return next((str(p) for p in paths if p and os.path.isfile(p)), None)


def channels_last_inputs(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: 4-D tensor inputs in channels_last memory format (the values are unchanged)."""
    return tuple(a.contiguous(memory_format=torch.channels_last) if torch.is_tensor(a) and a.ndim == 4 else a
                 for a in args)


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """target <- decay * target + (1 - decay) * source for parameters; buffers (BN statistics) copied.
    Multi-tensor (`torch._foreach_*`): a few kernel launches for the whole network, not two per tensor."""
    params = list(target.parameters())
    if params:  # a parameter-free module (the centring BatchNorm) has only buffers
        torch._foreach_lerp_(params, list(source.parameters()), 1.0 - decay)
    buffers = list(zip(target.buffers(), source.buffers()))
    if buffers:
        torch._foreach_copy_(*map(list, zip(*buffers)))


class NonFiniteLoss:
    """The first step whose loss was NaN or inf, recorded on the loss's device without a host sync: `record`
    runs every step (a few tensor ops), `first` syncs once (and all-reduces under DDP) and is called only at
    the checkpoints of a run (every `every` steps, before validation, at epoch end, before a save), so a
    diverged run stops before its weights are evaluated or saved, without blocking each step."""

    every = 100  # steps between the periodic checks (each one host sync)

    def __init__(self):
        self.step = self.epoch = self.loss = None

    def record(self, loss: torch.Tensor, step: int, epoch: int) -> None:
        if self.step is None:
            self.step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self.epoch, self.loss = self.step.clone(), torch.zeros((), device=loss.device)
        first = (self.step < 0) & ~torch.isfinite(loss)
        self.step = torch.where(first, step, self.step)
        self.epoch = torch.where(first, epoch, self.epoch)
        self.loss = torch.where(first, loss.float(), self.loss)

    def first(self, strategy=None) -> tuple[int, int, float] | None:
        """(step, epoch, loss) of the first non-finite loss on any rank (`strategy` reduces), else None."""
        if self.step is None:
            return None
        state = torch.stack([self.step.double(), self.epoch.double()])
        state = torch.where(state >= 0, state, float("inf"))  # (step, epoch) of this rank's first, or inf
        if strategy is not None and strategy.world_size > 1:
            state = strategy.reduce(state, reduce_op="min")  # the first of any rank (both grow with time)
        step, epoch, mine, loss = *state.tolist(), *torch.stack([self.step.double(), self.loss.double()]).tolist()
        if step == float("inf"):
            return None
        return int(step), int(epoch), loss if mine == step else float("nan")


def channels_last_by_default(device: torch.device, in_chans: int, image_size: int | None) -> bool:
    """NHWC where it was measured to win with the same values (float rounding aside): any run on a CUDA GPU
    (tensor-core convolutions), and a CPU run on RGB images of 32 px or more (`make bench` cpu_step: the effect
    tables' small_cnn step at 32 px, batch 128, 1.11-1.12x on 2 cores). Smaller or grey images (digits) keep
    NCHW: not measured there."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and in_chans == 3 and image_size is not None and image_size >= 32


class EmbeddingModule(L.LightningModule):
    """Backbone -> (centring) -> EmbeddingHead (L2-normalised). Subclasses implement `training_step` only.

    `ema_pairs` lists (target, source) attribute names that the base moves by EMA after every
    optimizer step with `ema_decay`; the evaluation embedding is `embed()`.
    channels_last: backbone weights and image inputs in NHWC (faster convolutions under GPU autocast); None
      (the default): `channels_last_by_default` decides from the run's device and images.
    center_features: BatchNorm without affine on the pooled features, before the embedding head. A random
      trunk's pooled ReLU features share one large mean direction, so from scratch every embedding starts in
      a narrow cone (mean cosine ~0.8 for `small_cnn` on CIFAR-10) where angle-based losses barely move;
      centring spreads them. Off for pretrained trunks, whose features are already spread.
    compile: `torch.compile` the backbone in place (`nn.Module.compile`: parameter names, checkpoints and
      EMA pairs are unchanged) with `compile_backend`; the first steps pay the compilation.
    """

    ema_pairs: tuple[tuple[str, str], ...] = ()

    def __init__(
        self,
        backbone: str = "cifar_resnet18",
        embedding_dim: int = 128,
        in_chans: int = 3,
        pretrained: bool = False,
        weights: str | None = None,
        frozen_bn: bool = False,
        frozen_bn_affine: bool = False,
        optim: Optim | None = None,
        schedule: Schedule | None = None,
        ema_decay: float = 0.999,
        channels_last: bool | None = None,
        compile: bool = False,
        compile_backend: str = "inductor",
        center_features: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.optim = optim or Optim()
        self.schedule = schedule or Schedule()
        self.trunk, feature_dim = build_backbone(backbone, pretrained=pretrained, weights=weights,
                                                 frozen_bn=frozen_bn, in_chans=in_chans,
                                                 frozen_bn_affine=frozen_bn_affine)
        self.center = nn.BatchNorm1d(feature_dim, affine=False) if center_features else nn.Identity()
        self.head = EmbeddingHead(feature_dim, embedding_dim)
        self._non_finite_loss = NonFiniteLoss()
        if channels_last:
            self.use_channels_last()
        if compile:
            self.trunk.compile(backend=compile_backend)

    def use_channels_last(self) -> None:
        """Backbone weights in NHWC and a hook that gives every method's call of the trunk NHWC inputs (the
        values are unchanged: the same results up to the kernels' float rounding). Once."""
        if getattr(self, "_channels_last", False):
            return
        self._channels_last = True
        self.trunk.to(memory_format=torch.channels_last)
        self.trunk.register_forward_pre_hook(channels_last_inputs)

    # -- embedding ------------------------------------------------------------------------------
    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """The trunk's pooled features as the head reads them (centred where `center_features`)."""
        return self.center(self.trunk(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(images))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The embedding the evaluator scores (eval mode is set by the validation loop)."""
        return self(images)

    def embed_views(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """One forward over the concatenated views (BN statistics over all of them), split back."""
        z = self(torch.cat(views))
        return list(z.float().chunk(len(views)))

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        return {"embedding": self.embed(batch["image"]).float(), "target": batch["target"],
                "index": batch["index"]}

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        return self.validation_step(batch, batch_idx, dataloader_idx)

    # -- helpers for methods --------------------------------------------------------------------
    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """All ranks' rows, with gradient flowing back to this rank's rows (identity on one process)."""
        return gather_ranks(self, x, sync_grads=True)[0]

    def log_terms(self, terms: dict[str, torch.Tensor], embedding: torch.Tensor | None = None) -> None:
        """Log every loss term under train/, and the collapse diagnostic (mean per-dimension std)."""
        logged = {f"train/{k}": v.detach() for k, v in terms.items()}
        if embedding is not None:
            logged["train/embedding_std"] = embedding.detach().float().std(0).mean()
        self.log_dict(logged, prog_bar=False, on_step=True, on_epoch=True, batch_size=self._batch_size)
        self.log("loss", terms["loss"].detach(), prog_bar=True, logger=False, batch_size=self._batch_size)

    @property
    def _batch_size(self) -> int | None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(dm, "batch_size", None)

    # -- owned by the base ----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Hand the datamodule the input normalisation the backbone's weights expect, before any loader
        is built (Lightning calls this after the datamodule's setup, before callbacks or loops ask for a
        loader); from-scratch backbones leave the dataset's statistics alone. channels_last=None turns NHWC
        on where `channels_last_by_default` says (Lightning moves the module to its device after this hook)."""
        if self.hparams.channels_last is None and channels_last_by_default(
                self.trainer.strategy.root_device, self.hparams.in_chans,
                getattr(self.trainer.datamodule, "image_size", None)):
            self.use_channels_last()
        if self.trunk.input_mean is None:
            return
        dm = self.trainer.datamodule
        if hasattr(dm, "set_input_normalization"):
            dm.set_input_normalization(self.trunk.input_mean, self.trunk.input_std)
        else:
            rank_zero_warn(f"the {self.hparams.backbone!r} weights expect inputs normalised with mean "
                           f"{self.trunk.input_mean}, std {self.trunk.input_std}; pass a datamodule with "
                           "set_input_normalization (an EmbeddingDataModule) so it is applied, or normalise "
                           "your loaders' images with these values")

    def on_before_backward(self, loss: torch.Tensor) -> None:
        """Records a non-finite loss without a host sync; `stop_if_loss_was_non_finite` acts on it."""
        self._non_finite_loss.record(loss.detach(), self.global_step, self.current_epoch)

    def stop_if_loss_was_non_finite(self) -> None:
        """The divergence stop for a loss that was NaN or inf at a step since the last check (one host sync;
        an all-reduce under DDP, so every rank stops together)."""
        first = self._non_finite_loss.first(self.trainer.strategy if self._trainer is not None else None)
        if first is not None:
            step, epoch, loss = first
            raise FloatingPointError(divergence_message(f"non-finite loss ({loss})", epoch, step,
                                                        saved_checkpoint(self.trainer)))

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        for target, source in self.ema_pairs:
            ema_update(getattr(self, target), getattr(self, source), self.hparams.ema_decay)
        self._periodic_loss_check()

    def _periodic_loss_check(self) -> None:
        if self.global_step % NonFiniteLoss.every == 0:
            self.stop_if_loss_was_non_finite()

    def on_validation_start(self) -> None:
        self.stop_if_loss_was_non_finite()

    def on_train_epoch_end(self) -> None:
        self.stop_if_loss_was_non_finite()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.stop_if_loss_was_non_finite()

    def configure_optimizers(self):
        optimizer = build_optimizer(parameter_groups(self, self.optim), self.optim)
        max_epochs = self.trainer.max_epochs if self._trainer is not None else 1
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda epoch: lr_factor(epoch, self.schedule, max_epochs))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def on_train_epoch_start(self) -> None:
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=False, on_epoch=True)
