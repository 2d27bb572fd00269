"""Snowball: iterative model evolution and confident sample discovery (Yang Li, dissertation chapter 2;
IEEE TMM 2020).

A third model, the master, is an EMA of the teacher (Eq. 2.6, beta = 0.999), itself an EMA of the
student (Eq. 2.2). The student's loss adds to the base learner a master-student consistency term on the
labeled rows of the batch (Eq. 2.7; `master_consistency_on`), with the same weight w(t) as the teacher
term. Training follows a `Curriculum` in one fit: phase 0 is the plain base learner (the master is off
and tracks the teacher, so it starts as a copy of it), then `generations` x `iterations`
iterations of `iteration_epochs` each. Before every iteration the `ConfidentSampleDiscovery` callback
labels unlabeled images with the master's nearest class centre and doubles the labeled set; each
generation restarts from the original labels. The lr schedule restarts with every phase and iteration
(warm start [R]) as a fresh ramp-down: its warm-up runs in phase 0 only, like the consistency
ramp-up and the teacher's decay switch, which are not re-run either.

With the MixMatch learner the teacher-student term of Eq. 2.7 is added too (MixMatch has none of its
own), on the un-mixed views, once the master is on (docs/methods/snowball.md).
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from lightning_modules.base import lr_factor
from lightning_modules.semi import Curriculum, SemiSupervised, frozen_copy, softmax_mse

MASTER_ROWS = ("labeled", "all", "none")


class Snowball(SemiSupervised):
    """Master-teacher-student Snowball on a base learner (mean_teacher by default, or mixmatch).

    master_decay: beta of Eq. 2.6.
    master_consistency_on: "labeled" (Eq. 2.7: the labeled, incl. discovered, rows), "all" (the
      introduction's reading, an ablation) or "none" (MT + sample discovery, Table 2.11).
    curriculum: the epoch layout; trainer.max_epochs is its total (less only for a run to be resumed).
    report_model: student | teacher | master (default teacher [R], as Mean Teacher reports).
    """

    ema_pairs = (("teacher", "student"), ("master", "teacher"))  # master after the updated teacher
    model_names = ("student", "teacher", "master")

    def __init__(self, master_decay: float = 0.999, master_consistency_on: str = "labeled",
                 curriculum: Curriculum | None = None, **kwargs):
        super().__init__(**kwargs)
        if master_consistency_on not in MASTER_ROWS:
            raise ValueError(f"master_consistency_on {master_consistency_on!r}: use one of {MASTER_ROWS}")
        self.master_decay, self.master_consistency_on = master_decay, master_consistency_on
        self.curriculum = curriculum or Curriculum()

    def build_models(self, num_classes: int) -> None:
        super().build_models(num_classes)
        self.master = frozen_copy(self.student)

    def master_active(self, epoch: int) -> bool:
        return self.curriculum.position(epoch) is not None

    def ema_decay_for(self, target: str) -> float:
        if target == "master":
            return self.master_decay if self.master_active(self.current_epoch) else 0.0  # 0: a copy
        return super().ema_decay_for(target)

    def lr_factor_at(self, epoch: int) -> float:
        """The configured schedule run over each phase: phase 0, then every iteration afresh, without its
        warm-up (a warm-started iteration restarts the ramp-down only)."""
        phase_epoch, length = self.curriculum.phase_epoch(epoch)
        in_phase0 = self.curriculum.position(epoch) is None
        return lr_factor(phase_epoch, self.schedule if in_phase0 else replace(self.schedule, warmup_epochs=0),
                         length)

    def configure_optimizers(self):
        """The base's optimizer; only the schedule's clock changes (restarts with every iteration)."""
        config = super().configure_optimizers()
        config["lr_scheduler"]["scheduler"] = torch.optim.lr_scheduler.LambdaLR(config["optimizer"],
                                                                                self.lr_factor_at)
        return config

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.curriculum.check_run_length(self.trainer.max_epochs)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        labeled, unlabeled = batch["labeled"], batch["unlabeled"]
        terms, student = self.learner_terms(labeled, unlabeled)
        if self.master_active(self.current_epoch) and self.master_consistency_on != "none":
            terms = self.add_master_terms(terms, student, labeled, unlabeled)
        self.log_terms(terms)
        return terms["loss"]

    def add_master_terms(self, terms: dict[str, Tensor], student: Tensor | None, labeled: dict,
                         unlabeled: dict) -> dict[str, Tensor]:
        """Eq. 2.7's master-student term (and, for learners without one, its teacher-student term) on the
        un-mixed views; the master sees the teacher's view."""
        student_views, teacher_views = self.consistency_views(labeled, unlabeled)
        weight = self.consistency_weight_at(self.global_step)
        terms = dict(terms)
        if student is None:
            _, student = self.student(student_views)
            with torch.no_grad():
                teacher_logits, _ = self.teacher(teacher_views)
            terms["consistency"] = softmax_mse(student, teacher_logits)
            terms["loss"] = terms["loss"] + weight * terms["consistency"]
        rows = slice(None) if self.master_consistency_on == "all" else slice(0, len(labeled["target"]))
        with torch.no_grad():
            master_logits, _ = self.master(teacher_views[rows])
        terms["master"] = softmax_mse(student[rows], master_logits)
        terms["loss"] = terms["loss"] + weight * terms["master"]
        return terms
