"""Semi-supervised classification base: a student classifier, its EMA teacher, and the base learners that
Snowball (chapter 2) and LMCS (chapter 3) wrap, trained on the "semi" protocol's {"labeled",
"unlabeled"} batches.

Learners (`learner`):
  mean_teacher  cross-entropy summed over the labeled rows and divided by the whole batch (labeled +
                unlabeled rows, as both MT codes do, which their lambda_max values assume) + w(t) *
                softmax-MSE(student, teacher) on every row of the batch; student and teacher see
                independently augmented views (views[0] / views[1]); w(t) ramps up by MT's sigmoid over
                `rampup_steps`.
  mixmatch      MixMatch: label guess = sharpened mean prediction over the K = num_views unlabeled views,
                per-sample MixUp over the shuffled union of labeled and unlabeled rows, soft cross-entropy
                + w(t) * probability MSE; w(t) ramps up linearly. The teacher is the evaluation EMA.
                Decoupled weight decay on kernels only = optim `adamw` with `decay_norm_and_bias: false`
                (AdamW's p <- p (1 - lr wd) is MixMatch's p <- p (1 - 0.02 lr) for wd = 0.02).
  supervised    cross-entropy on the labeled batch only: the supervised-only baseline.

The teacher's decay is MT's: `ema_decay_rampup` during the ramp-up, `ema_decay` after it, and a true
average over the first steps (min(1 - 1/(t + 1), decay)). Validation yields the reported model's
logits as "logits" (val/error) and every model's as "logits_<name>".
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_modules.base import EmbeddingModule, ema_update, hparam
from lightning_modules.batchnorm import untracked_batchnorm
from lightning_modules.losses import fp32

LEARNERS = ("mean_teacher", "mixmatch", "supervised")


# -- pure pieces -------------------------------------------------------------------------------------
@hparam
@dataclass
class Curriculum:
    """Epoch layout of a Snowball run: `phase0_epochs` of the base learner (the initial model), then
    `generations` x `iterations` iterations of `iteration_epochs` each."""

    phase0_epochs: int = 0
    iteration_epochs: int = 1
    generations: int = 3
    iterations: int = 3

    def __post_init__(self):
        if self.phase0_epochs < 0 or self.iteration_epochs < 1 or self.generations < 1 or self.iterations < 1:
            raise ValueError(f"curriculum {self}: phase0_epochs >= 0 and the other counts >= 1")

    @property
    def total_epochs(self) -> int:
        return self.phase0_epochs + self.generations * self.iterations * self.iteration_epochs

    def check_run_length(self, max_epochs: int | None) -> None:
        """A run may stop before the curriculum ends (to be resumed), never after it."""
        total = self.total_epochs
        if max_epochs is None or not 0 < max_epochs <= total:
            raise ValueError(f"trainer.max_epochs is {max_epochs} but the curriculum {self} lasts "
                             f"{total} epochs: set --trainer.max_epochs {total} or change model.init_args.curriculum")
        if max_epochs < total:
            rank_zero_warn(f"trainer.max_epochs {max_epochs} stops the run before the curriculum's {total} "
                           "epochs (fine for a run to be resumed)")

    def position(self, epoch: int) -> tuple[int, int] | None:
        """(generation, iteration), both 1-based, of the iteration `epoch` belongs to; None in phase 0."""
        if epoch < self.phase0_epochs:
            return None
        last = self.generations * self.iterations - 1
        step = min((epoch - self.phase0_epochs) // self.iteration_epochs, last)
        return step // self.iterations + 1, step % self.iterations + 1

    def starts_iteration(self, epoch: int) -> bool:
        return (self.phase0_epochs <= epoch < self.total_epochs
                and (epoch - self.phase0_epochs) % self.iteration_epochs == 0)

    def phase_epoch(self, epoch: int) -> tuple[int, int]:
        """(epoch within its phase, the phase's length): phase 0, or the iteration it belongs to."""
        if epoch < self.phase0_epochs:
            return epoch, self.phase0_epochs
        return (epoch - self.phase0_epochs) % self.iteration_epochs, self.iteration_epochs


def sharpen(probs: Tensor, temperature: float) -> Tensor:
    """MixMatch's Sharpen: p_c^(1/T) / sum_j p_j^(1/T) per row; T -> 0 tends to one-hot."""
    powered = probs.pow(1.0 / temperature)
    return powered / powered.sum(dim=1, keepdim=True)


def mixup(inputs: Tensor, targets: Tensor, lam: Tensor, partner: Tensor) -> tuple[Tensor, Tensor]:
    """Row i mixed with row partner[i] with weight lam'_i = max(lam_i, 1 - lam_i) on itself, so every
    mixed row stays closer to its own input (MixMatch's per-sample MixUp)."""
    lam = torch.maximum(lam, 1 - lam)
    x_weight = lam.view(-1, *([1] * (inputs.ndim - 1)))
    mixed_inputs = x_weight * inputs + (1 - x_weight) * inputs[partner]
    mixed_targets = lam[:, None] * targets + (1 - lam[:, None]) * targets[partner]
    return mixed_inputs, mixed_targets


@fp32
def softmax_mse(logits: Tensor, target_logits: Tensor) -> Tensor:
    """Consistency: squared difference of the two softmax outputs, averaged over classes and rows (MT's
    convention; not summed over classes); the target side is a constant."""
    return F.mse_loss(logits.softmax(dim=1), target_logits.detach().softmax(dim=1))


@fp32
def probability_mse(logits: Tensor, target_probs: Tensor) -> Tensor:
    """MixMatch's L_U: squared difference of softmax(logits) and target probabilities, averaged over
    classes and rows."""
    return F.mse_loss(logits.softmax(dim=1), target_probs.detach())


@fp32
def batch_cross_entropy(labeled_logits: Tensor, target: Tensor, batch_rows: int) -> Tensor:
    """Mean Teacher's J_C: the labeled rows' cross-entropy summed and divided by the number of rows in the
    whole batch (labeled + unlabeled), not by the labeled rows alone (MT-PyTorch: sum / minibatch_size;
    MT-TF: the mean over a batch whose unlabeled rows cost 0)."""
    if batch_rows < len(labeled_logits):
        raise ValueError(f"batch_rows {batch_rows} < {len(labeled_logits)} labeled rows: pass the whole batch")
    return F.cross_entropy(labeled_logits, target, reduction="sum") / batch_rows


@fp32
def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Cross-entropy against soft targets (MixMatch's L_X on mixed rows), mean over rows."""
    return -(target_probs.detach() * logits.log_softmax(dim=1)).sum(dim=1).mean()


def sigmoid_rampup(step: int, length: int) -> float:
    """MT's ramp-up exp(-5 (1 - t/T)^2) from ~0 to 1 over `length` steps; 1 without a ramp-up."""
    if length <= 0 or step >= length:
        return 1.0
    return math.exp(-5.0 * (1.0 - step / length) ** 2)


def linear_rampup(step: int, length: int) -> float:
    """MixMatch's warm-up t/T of the unlabeled weight; 1 without a warm-up."""
    return 1.0 if length <= 0 else min(step / length, 1.0)


def ema_decay_at(step: int, decay: float, rampup_decay: float, rampup_steps: int) -> float:
    """The teacher's decay after optimizer step `step` (1-based): `rampup_decay` during the ramp-up,
    `decay` after (a hard switch, MT-TF), capped by 1 - 1/(step + 1) so the first steps average."""
    alpha = rampup_decay if step < rampup_steps else decay
    return min(1.0 - 1.0 / (step + 1), alpha)


# -- models --------------------------------------------------------------------------------------------
class Classifier(nn.Module):
    """trunk -> class logits, plus a consistency head where the network has two (MT's ResNet-26): the
    structure student, teacher and master share, so EMA can pair their parameters in order."""

    def __init__(self, trunk: nn.Module, head: nn.Module, consistency_head: nn.Module | None = None):
        super().__init__()
        self.trunk, self.head, self.consistency_head = trunk, head, consistency_head

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(class logits, consistency logits); the same tensor twice with a single head."""
        features = self.trunk(images)
        logits = self.head(features)
        return logits, (self.consistency_head(features) if self.consistency_head is not None else logits)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy that the optimizer never sees (moved by EMA only)."""
    clone = copy.deepcopy(model)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


class SemiSupervised(EmbeddingModule):
    """Student (the base's trunk + a linear class head) and an EMA teacher, trained by `learner`.

    num_classes: classes of the dataset; None (the default) takes them from the datamodule in `setup`, and a
      given value must match the data's.
    learner: mean_teacher | mixmatch | supervised (module docstring).
    consistency_weight: MT's lambda_max or MixMatch's lambda_U (the unlabeled weight).
    rampup_steps: length of the consistency ramp-up (sigmoid for MT, linear for MixMatch) and of the
      teacher's `ema_decay_rampup` phase, in optimizer steps.
    ema_decay_rampup: the teacher's decay during the ramp-up; `ema_decay` (base) after it.
    two_heads: a second, consistency head (MT's ResNet-26): the class head gets the cross-entropy, the
      consistency head the consistency term, and `logit_distance_cost` * MSE ties the two.
    sharpen_temperature, mixup_alpha: MixMatch's T and alpha.
    report_model: the model whose error is val/error (student | teacher), fixed before the run.
    """

    ema_pairs = (("teacher", "student"),)
    model_names: tuple[str, ...] = ("student", "teacher")

    def __init__(self, num_classes: int | None = None, learner: str = "mean_teacher",
                 consistency_weight: float = 1.0, rampup_steps: int = 0, ema_decay_rampup: float = 0.99, two_heads: bool = False,
                 logit_distance_cost: float = 0.01, sharpen_temperature: float = 0.5, mixup_alpha: float = 0.75,
                 report_model: str = "teacher", **kwargs):
        if kwargs.get("center_features"):
            raise ValueError("center_features centres an embedding head's input; the semi-supervised classifiers "
                             "have none: drop --model.init_args.center_features")
        super().__init__(**kwargs)
        if learner not in LEARNERS:
            raise ValueError(f"learner {learner!r}: use one of {', '.join(LEARNERS)}")
        if report_model not in self.model_names:
            raise ValueError(f"report_model {report_model!r}: use one of {', '.join(self.model_names)}")
        self.learner, self.consistency_weight = learner, consistency_weight
        self.rampup_steps, self.ema_decay_rampup = rampup_steps, ema_decay_rampup
        self.logit_distance_cost, self.sharpen_temperature = logit_distance_cost, sharpen_temperature
        self.mixup_alpha, self.report_model, self.two_heads = mixup_alpha, report_model, two_heads
        self.num_classes: int | None = None
        self.head = self.consistency_head = None  # the base's embedding head goes; class heads come with C
        if num_classes is not None:
            self.build_models(num_classes)

    def build_models(self, num_classes: int) -> None:
        """The class head(s) and the EMA copies, once the class count is known (the constructor's, or the
        datamodule's in `setup`)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.trunk.out_dim, num_classes)
        self.consistency_head = nn.Linear(self.trunk.out_dim, num_classes) if self.two_heads else None
        self.teacher = frozen_copy(self.student)

    def setup(self, stage: str) -> None:
        """Before the optimizer and any checkpoint restore: build the heads for the data's class count, or
        check the given one against it."""
        super().setup(stage)
        dm = self.trainer.datamodule
        found = dm.num_classes["train"] if dm is not None else None
        if self.num_classes is None:
            if found is None:
                raise ValueError(f"{type(self).__name__} takes its class count from the datamodule: fit with one, "
                                 "or set --model.init_args.num_classes")
            self.build_models(found)
            self.hparams["num_classes"] = found  # saved in checkpoints, so load_from_checkpoint rebuilds the heads
        elif found is not None and found != self.num_classes:
            raise ValueError(f"the dataset has {found} training classes but model num_classes is "
                             f"{self.num_classes}: drop --model.init_args.num_classes (it comes from the data) "
                             f"or set it to {found}")

    @property
    def student(self) -> Classifier:
        """The trained network, viewed with the teacher's structure (not a registered submodule)."""
        return Classifier(self.trunk, self.head, self.consistency_head)

    # -- what callbacks and the evaluator read ---------------------------------------------------------
    def features(self, images: Tensor, model: str = "teacher") -> Tensor:
        """Penultimate (pooled) features of one of `model_names`: what sample discovery compares."""
        if model not in self.model_names:
            raise ValueError(f"{type(self).__name__} has no model {model!r}; use one of {self.model_names}")
        return getattr(self, model).trunk(images)

    def logits(self, images: Tensor, model: str = "teacher") -> Tensor:
        """Class logits of one of `model_names` (softmax-confidence discovery)."""
        return getattr(self, model).head(self.features(images, model))

    def embed(self, images: Tensor) -> Tensor:
        return self.features(images, self.report_model)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        outputs = {"target": batch["target"], "index": batch["index"]}
        for name in self.model_names:
            net = getattr(self, name)
            features = net.trunk(batch["image"])
            outputs[f"logits_{name}"] = net.head(features).float()
            if name == self.report_model:
                outputs["embedding"], outputs["logits"] = features.float(), outputs[f"logits_{name}"]
        return outputs

    # -- schedules (pure functions of the optimizer step) ----------------------------------------------
    def consistency_weight_at(self, step: int) -> float:
        ramp = linear_rampup if self.learner == "mixmatch" else sigmoid_rampup
        return self.consistency_weight * ramp(step, self.rampup_steps)

    def ema_decay_for(self, target: str) -> float:
        """Decay of the EMA pair whose target is `target`, after the current optimizer step."""
        return ema_decay_at(self.global_step, self.hparams.ema_decay, self.ema_decay_rampup, self.rampup_steps)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """The base's EMA pairs, each with its own scheduled decay (in `ema_pairs` order)."""
        for target, source in self.ema_pairs:
            ema_update(getattr(self, target), getattr(self, source), self.ema_decay_for(target))
        self._periodic_loss_check()

    # -- training --------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        if getattr(dm, "protocol", None) != "semi":
            raise ValueError(f"{type(self).__name__} trains on labeled + unlabeled batches: set "
                             "--data.init_args.protocol semi")
        if self.learner != "supervised" and dm.num_views < 2:
            raise ValueError(f"learner {self.learner!r} needs two views per image (student/teacher, or "
                             "MixMatch's K = 2): set --data.init_args.num_views 2")

    def learner_terms(self, labeled: dict, unlabeled: dict) -> tuple[dict[str, Tensor], Tensor | None]:
        """The base learner's loss terms, and the student's consistency logits on the un-mixed student
        views (labeled rows first) where the learner computed them (Mean Teacher), else None."""
        if self.learner == "mean_teacher":
            return self.mean_teacher_terms(labeled, unlabeled)
        if self.learner == "mixmatch":
            return self.mixmatch_terms(labeled, unlabeled), None
        loss = F.cross_entropy(self(labeled["views"][0]).float(), labeled["target"])
        return {"loss": loss, "classification": loss}, None

    def consistency_views(self, labeled: dict, unlabeled: dict) -> tuple[Tensor, Tensor]:
        """(student views, teacher views) of the batch's rows, labeled rows first."""
        return (torch.cat([labeled["views"][0], unlabeled["views"][0]]),
                torch.cat([labeled["views"][1], unlabeled["views"][1]]))

    def mean_teacher_terms(self, labeled: dict, unlabeled: dict) -> tuple[dict[str, Tensor], Tensor]:
        student_views, teacher_views = self.consistency_views(labeled, unlabeled)
        logits, consistency_logits = self.student(student_views)  # one forward: BN over the whole batch
        with torch.no_grad():
            teacher_logits, _ = self.teacher(teacher_views)
        num_labeled = len(labeled["target"])
        classification = batch_cross_entropy(logits[:num_labeled], labeled["target"], len(logits))
        consistency = softmax_mse(consistency_logits, teacher_logits)
        weight = self.consistency_weight_at(self.global_step)
        terms = {"classification": classification, "consistency": consistency,
                 "consistency_weight": torch.tensor(weight)}
        loss = classification + weight * consistency
        if self.consistency_head is not None:
            terms["logit_distance"] = F.mse_loss(logits.float(), consistency_logits.float())
            loss = loss + self.logit_distance_cost * terms["logit_distance"]
        return {"loss": loss, **terms}, consistency_logits

    @torch.no_grad()
    def label_guess(self, views: list[Tensor]) -> Tensor:
        """MixMatch's guessed distribution for the unlabeled rows: the student's mean prediction over the
        K views, sharpened. A method that guesses with another model (LMCS's master) overrides this. The pass
        normalises with each view's batch statistics and leaves the running ones alone: only the training
        forward of the mixed batch moves them, as in MixMatch's code (see docs/methods/lmcs.md)."""
        with untracked_batchnorm(self.trunk, self.head):
            mean_probs = torch.stack([self(v).float().softmax(dim=1) for v in views]).mean(dim=0)
        return sharpen(mean_probs, self.sharpen_temperature)

    def mixmatch_terms(self, labeled: dict, unlabeled: dict, guess: Tensor | None = None) -> dict[str, Tensor]:
        """guess: the guessed distribution of the unlabeled rows when the caller has it (LMCS's master);
        None: `label_guess`."""
        x = labeled["views"][0]
        views = unlabeled["views"]
        guess = self.label_guess(views) if guess is None else guess
        inputs = torch.cat([x, *views])
        targets = torch.cat([F.one_hot(labeled["target"], self.num_classes).float(), *[guess] * len(views)])
        lam = torch.distributions.Beta(self.mixup_alpha, self.mixup_alpha, validate_args=False).sample(
            (len(inputs),)).to(x.device, non_blocking=True)  # no host sync: no argument checks, async copy
        mixed_inputs, mixed_targets = mixup(inputs, targets, lam, torch.randperm(len(inputs), device=x.device))
        logits = self(mixed_inputs).float()  # one forward over labeled and unlabeled rows
        n = len(x)
        supervised = soft_cross_entropy(logits[:n], mixed_targets[:n])
        unsupervised = probability_mse(logits[n:], mixed_targets[n:])
        weight = self.consistency_weight_at(self.global_step)
        return {"loss": supervised + weight * unsupervised, "classification": supervised,
                "unlabeled": unsupervised, "consistency_weight": torch.tensor(weight)}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        terms, _ = self.learner_terms(batch["labeled"], batch["unlabeled"])
        self.log_terms(terms)
        return terms["loss"]
