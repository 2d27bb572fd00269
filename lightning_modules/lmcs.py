"""LMCS: learned model composition with critical sample look-ahead (Yang Li, dissertation chapter 3).

The student trains with MixMatch (semi.py). A master is composed by a learned network from three versions
of the student: the current one, its snapshot at the end of the previous step (`step_epochs` epochs, the
chapter's 10) and the EMA student (the teacher). Each one's pooled penultimate feature h_j passes through
its own converter A_j (a linear layer, initialised I / 3), the sum z = sum_j A_j(h_j) feeds the master
decision network D_m (a linear class head, copied from the EMA student's when the master starts). Only
the A_j and D_m train; the three students run inside the master without gradient and their BatchNorm never
updates its running statistics, so a master update leaves every student parameter and BatchNorm statistic
as it was (docs/methods/lmcs.md). While training, that BatchNorm normalises with the batch's statistics
(`master_bn: batch`), as MixMatch's own label guess does [C]; eval mode (`master_bn: running`)
made the guesses poor: plain MixMatch guessing in eval mode ended at 11.7-50.8 % error on digits against
2.2-4.4 % (5 seeds), its running statistics being those of MixUp-mixed batches. The J_D centres and the
evaluated master (val/error_master) use the mode the master trains in (see docs/methods/lmcs.md).

The master is off in step 1 (there is no previous student). From step 2 on, every iteration adds
J_M = label_weight * J_CE + lambda_C * J_C + eta * J_D to the student's MixMatch loss; the two touch
disjoint parameters, so one Adam over both is two Adams (the LMC's kernels are excluded from weight
decay by the config's `optim.no_decay`). J_CE: cross-entropy of the master on a batch of the look-ahead
set (labels + the current generation's discoveries [R]; label_weight 0 = the printed J_M).
J_C (Eq. 3.5): softmax MSE of the master to the EMA student on the un-mixed first unlabeled view. J_D
(Eq. 3.6): the nearest and second-nearest of C k-means centres of the master's L2-normalised fused
features of the unlabeled pool, recomputed at every step boundary from the labeled class means (20
Lloyd iterations) and fixed within a step: jd_mode ratio d0 / d1 [R], literal (d0 - d1)^2 (the
printed form) or neg_gap -(d1 - d0). An EMA of the LMC (master_decay, the chapter's 0.99) guides the
student and is the master evaluated. guidance: label_guess (the EMA master guesses MixMatch's labels,
[R]), extra_mse (a student-master softmax MSE, weight lambda_U, on the first unlabeled view) or
none. The generations follow `curriculum` (phase 0, then one critical discovery per generation by
callbacks.sample_discovery.CriticalSampleDiscovery, which hands the master each generation's samples
one generation before the student). Multi-GPU: the composition network gets no gradient in the first step,
so DDP runs with --trainer.strategy=ddp_find_unused_parameters_true (Lightning's own error says so).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embedding_core.clusters import cluster_centers
from embedding_core.features import extract_features
from embedding_core.search import lloyd
from embedding_core.seeds import own_random_stream
from lightning_modules.batchnorm import batch_statistics
from lightning_modules.losses.clustering import JD_MODES, discriminative_power
from lightning_modules.semi import Classifier, Curriculum, SemiSupervised, frozen_copy, sharpen, softmax_mse

GUIDANCE = ("label_guess", "extra_mse", "none")
MASTER_BN = ("batch", "running")
VERSIONS = ("student", "previous", "teacher")  # current, previous-step and EMA student, in converter order


# -- pure pieces -------------------------------------------------------------------------------------
def compose(features: list[Tensor], converters: nn.ModuleList) -> Tensor:
    """The fused feature z = sum_j A_j(h_j) of Fig. 3.3."""
    return sum(convert(h) for convert, h in zip(converters, features, strict=True))


@contextlib.contextmanager
def eval_mode(*modules: nn.Module):
    """Every submodule in eval mode (BN uses and keeps its running statistics), each one's flag restored."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class Composition(nn.Module):
    """The learned part of the master: one converter per student version (Linear(d, d), I / 3 and bias 0,
    so z starts as the mean feature) and the decision network D_m (Linear(d, C))."""

    def __init__(self, dim: int, num_classes: int, versions: int = len(VERSIONS)):
        super().__init__()
        self.converters = nn.ModuleList(nn.Linear(dim, dim) for _ in range(versions))
        with torch.no_grad():
            for convert in self.converters:
                convert.weight.copy_(torch.eye(dim) / versions)
                convert.bias.zero_()
        self.decision = nn.Linear(dim, num_classes)


class ComposedTrunk(nn.Module):
    """x -> z: the students' trunks (held, not registered: their owner trains or averages them) run without
    gradient, then the converters. Their BatchNorm never updates its running statistics here; it normalises
    with them (running_stats: eval mode) or with the batch's (`batch_statistics`), in training and in
    evaluation alike, so the master is evaluated, and its J_D centres computed, on the features it trains
    on (see docs/methods/lmcs.md)."""

    def __init__(self, trunks: list[nn.Module], converters: nn.ModuleList, running_stats: bool = True):
        super().__init__()
        self.trunks, self.converters, self.running_stats = trunks, converters, running_stats

    def student_features(self, images: Tensor) -> list[Tensor]:
        norm = eval_mode if self.running_stats else batch_statistics
        with torch.no_grad(), norm(*self.trunks):
            return [trunk(images) for trunk in self.trunks]

    def forward(self, images: Tensor) -> Tensor:
        return compose(self.student_features(images), self.converters)


class LMCS(SemiSupervised):
    """MixMatch student + learned model composition master + critical sample look-ahead.

    curriculum: phase0_epochs (the initial model), then `generations` of `iteration_epochs`, iterations 1.
    step_epochs: the chapter's step (10 epochs): snapshot of the student and k-means refresh at its end;
      the master trains from the second step on.
    master_decay: the EMA of the LMC (the chapter's 0.99 for the master's decision network).
    guidance: label_guess | extra_mse | none (module docstring).
    label_weight, master_consistency_weight, jd_weight: J_M's weights of J_CE, J_C (None: lambda_U with its
      warm-up) and J_D (eta).
    master_bn: how the students' BatchNorm normalises inside the master while training (its guesses and J_M):
      batch (default) = the batch's statistics without updating the running ones, as MixMatch's own guess
      pass [C]; running = eval mode (the other reading; docs/methods/lmcs.md). The J_D centres and the
      evaluated master use the same mode: batch = each evaluation batch's statistics, dropout and noise off.
    jd_mode: ratio | literal | neg_gap. kmeans_iterations / kmeans_samples: the J_D centres' Lloyd iterations
      and the unlabeled images they cluster (a seeded subsample beyond it).
    report_model: student | teacher | master (default teacher, the EMA student [R]: docs/methods/lmcs.md).
    """

    ema_pairs = (("teacher", "student"), ("lmc_ema", "lmc"))
    model_names = ("student", "teacher", "master")

    def __init__(self, curriculum: Curriculum | None = None, step_epochs: int = 10, master_decay: float = 0.99,
                 guidance: str = "label_guess", label_weight: float = 1.0,
                 master_consistency_weight: float | None = None, jd_mode: str = "ratio", jd_weight: float = 0.1,
                 kmeans_iterations: int = 20, kmeans_samples: int = 10_000, master_bn: str = "batch", **kwargs):
        kwargs.setdefault("learner", "mixmatch")
        super().__init__(**kwargs)
        if self.learner != "mixmatch":
            raise ValueError(f"LMCS's student is MixMatch's (learner {self.learner!r}): set "
                             "--model.init_args.learner mixmatch")
        if guidance not in GUIDANCE:
            raise ValueError(f"guidance {guidance!r}: use one of {GUIDANCE}")
        if jd_mode not in JD_MODES:
            raise ValueError(f"jd_mode {jd_mode!r}: use one of {JD_MODES}")
        if master_bn not in MASTER_BN:
            raise ValueError(f"master_bn {master_bn!r}: use one of {MASTER_BN}")
        self.master_bn = master_bn
        self.curriculum = curriculum or Curriculum(iterations=1)
        if self.curriculum.iterations != 1 or step_epochs < 1:
            raise ValueError(f"curriculum {self.curriculum}, step_epochs {step_epochs}: LMCS discovers once per "
                             "generation (curriculum.iterations 1) and a step lasts >= 1 epoch")
        self.step_epochs, self.master_decay, self.guidance = step_epochs, master_decay, guidance
        self.label_weight, self.master_consistency_weight = label_weight, master_consistency_weight
        self.jd_mode, self.jd_weight = jd_mode, jd_weight
        self.kmeans_iterations, self.kmeans_samples = kmeans_iterations, kmeans_samples

    def build_models(self, num_classes: int) -> None:
        super().build_models(num_classes)
        self.previous = frozen_copy(self.student)
        with own_random_stream():  # its draws are replaced (I / 3, D_m copied at the start); MixUp's stay MixMatch's
            self.lmc = Composition(self.trunk.out_dim, num_classes)
        self.lmc_ema = frozen_copy(self.lmc)
        self.register_buffer("jd_centers", torch.zeros(num_classes, self.trunk.out_dim))
        self.register_buffer("master_started", torch.zeros((), dtype=torch.bool))

    # -- the master ----------------------------------------------------------------------------------
    def composed_trunk(self, ema: bool = True, running_stats: bool | None = None) -> ComposedTrunk:
        """The composition's trunk; running_stats None: the students' BatchNorm as `master_bn` says."""
        trunks = [getattr(self, version).trunk for version in VERSIONS]
        running = self.master_bn == "running" if running_stats is None else running_stats
        return ComposedTrunk(trunks, (self.lmc_ema if ema else self.lmc).converters, running)

    @property
    def master(self) -> Classifier:
        """The EMA master as a classifier (trunk = the composition, the students' BatchNorm as `master_bn`
        says, the mode it trains in): what is evaluated."""
        return Classifier(self.composed_trunk(ema=True), self.lmc_ema.decision)

    def master_active(self, epoch: int) -> bool:
        return epoch >= self.step_epochs

    def ema_decay_for(self, target: str) -> float:
        if target == "lmc_ema":
            return self.master_decay if self.master_active(self.current_epoch) else 0.0  # 0: a copy
        return super().ema_decay_for(target)

    # -- schedule: steps, the master's start, the J_D centres ----------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.curriculum.check_run_length(self.trainer.max_epochs)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.trainer.datamodule is not None and getattr(self.trainer.datamodule, "protocol", None) == "semi":
            self.trainer.datamodule.enable_lookahead()  # before the loaders are built

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        epoch = self.current_epoch
        if epoch == 0 or epoch % self.step_epochs:
            return
        self.previous.load_state_dict(self.student.state_dict())  # the student as the step just ended left it
        if not bool(self.master_started):  # D_m from the EMA student's head, once (docs/methods/lmcs.md)
            with torch.no_grad():
                self.lmc.decision.load_state_dict(self.teacher.head.state_dict())
                self.lmc_ema.load_state_dict(self.lmc.state_dict())
            self.master_started.fill_(True)
        with own_random_stream():  # the feature pass's loader draws a seed
            self.jd_centers.copy_(self.kmeans_centers())

    @torch.no_grad()
    def kmeans_centers(self) -> Tensor:
        """C centres of the master's L2-normalised fused features over the unlabeled pool, from the labeled
        class means, by Lloyd's iterations (docs/methods/lmcs.md). The features are normalised as J_D's in training
        (`master_bn`), with dropout and noise off."""
        dm = self.trainer.datamodule
        trunk = self.composed_trunk(ema=False)
        features, _, _ = extract_features(self, dm.train_eval_dataloader(),
                                          lambda x: F.normalize(trunk(x), dim=1))
        unlabeled = torch.as_tensor(dm.unlabeled_indices, device=features.device)
        if len(unlabeled) > self.kmeans_samples:
            generator = torch.Generator().manual_seed(self.current_epoch)
            unlabeled = unlabeled[torch.randperm(len(unlabeled), generator=generator)[: self.kmeans_samples]]
        labeled = torch.as_tensor(dm.labeled_indices, device=features.device)
        targets = torch.as_tensor(dm.labeled_targets, device=features.device)
        centers = cluster_centers(features[labeled], targets, self.num_classes).nan_to_num(0.0)
        lloyd(features[unlabeled].float(), centers, self.kmeans_iterations)  # moves `centers` in place
        return centers

    # -- training ------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        labeled, unlabeled = batch["labeled"], batch["unlabeled"]
        if not self.master_active(self.current_epoch):
            terms = self.mixmatch_terms(labeled, unlabeled)
            self.log_terms(terms)
            return terms["loss"]
        trunk = self.composed_trunk(ema=True)
        views = [trunk.student_features(v) for v in unlabeled["views"]]  # h_j per view, no gradient
        with torch.no_grad():
            master_probs = [self.lmc_ema.decision(compose(h, trunk.converters)).float().softmax(dim=1)
                            for h in views]
        guess = (sharpen(torch.stack(master_probs).mean(dim=0), self.sharpen_temperature)
                 if self.guidance == "label_guess" else None)
        terms = dict(self.mixmatch_terms(labeled, unlabeled, guess))
        if self.guidance == "extra_mse":
            terms["guidance"] = F.mse_loss(self(unlabeled["views"][0]).float().softmax(dim=1), master_probs[0])
            terms["loss"] = terms["loss"] + self.consistency_weight_at(self.global_step) * terms["guidance"]
        master = self.master_terms(views[0], batch["lookahead"])
        terms.update({f"master_{k}": v for k, v in master.items()})
        terms["loss"] = terms["loss"] + master["loss"]
        self.log_terms(terms)
        return terms["loss"]

    def master_terms(self, unlabeled_features: list[Tensor], lookahead: dict) -> dict[str, Tensor]:
        """J_M of the trained (raw) LMC: J_CE on the look-ahead batch, J_C and J_D on the unlabeled view."""
        z = compose(unlabeled_features, self.lmc.converters)
        logits = self.lmc.decision(z)
        consistency = softmax_mse(logits, self.teacher.head(unlabeled_features[VERSIONS.index("teacher")]))
        discrimination = discriminative_power(z, self.jd_centers, self.jd_mode)
        lookahead_features = self.composed_trunk(ema=False).student_features(lookahead["views"][0])
        lookahead_logits = self.lmc.decision(compose(lookahead_features, self.lmc.converters))
        classification = F.cross_entropy(lookahead_logits.float(), lookahead["target"])
        weight = (self.consistency_weight_at(self.global_step) if self.master_consistency_weight is None
                  else self.master_consistency_weight)
        loss = self.label_weight * classification + weight * consistency + self.jd_weight * discrimination
        return {"loss": loss, "classification": classification, "consistency": consistency,
                "discrimination": discrimination}
