"""Sample discovery: unlabeled training images given a (pseudo) label and added to the semi-supervised
labeled set between training iterations.

`ConfidentSampleDiscovery` is Snowball's (dissertation chapter 2, §2.3.3, spec §3.4): features of the
whole training split from one model (default the master, eval mode, no augmentation), class centres of
the current labeled set (Eq. 2.8), every remaining unlabeled image labeled by its nearest centre, and
the N closest added (N = the labeled set's size, so it doubles). The pure functions at the top (centres,
distances, fusion, selection) are what LMCS's critical sample discovery reuses.
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from callbacks.features import extract_features

RULES = ("min", "max", "random", "min_then_max")
FUSIONS = ("none", "avg_distance", "cascade", "avg_rank")
SELECTORS = ("center_distance", "softmax_confidence")
CENTERS_FROM = ("current", "original")


# -- pure pieces -------------------------------------------------------------------------------------
def class_centers(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(C, d) mean feature per class (Eq. 2.8); NaN rows for classes with no labeled image."""
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).to(features.dtype)
    return sums / counts[:, None]


def center_distances(features: Tensor, centers: Tensor) -> Tensor:
    """(N, C) Euclidean distances to the class centres, computed exactly (no matmul expansion, so the
    ranking does not depend on the batch layout); inf to a class without a centre."""
    distances = torch.cdist(features, centers.nan_to_num(0.0), compute_mode="donot_use_mm_for_euclid_dist")
    return distances.masked_fill(centers.isnan().any(dim=1)[None, :], float("inf"))


def nearest_center(distances: Tensor) -> tuple[Tensor, Tensor]:
    """(label, distance) of each row's nearest class centre."""
    distance, label = distances.min(dim=1)
    return label, distance


def ascending_rank(values: Tensor) -> Tensor:
    """0 for the smallest value, ties in index order."""
    ranks = torch.empty_like(values, dtype=torch.long)
    ranks[torch.sort(values, stable=True).indices] = torch.arange(len(values), device=values.device)
    return ranks


def fused_scores(feature_sets: list[Tensor], reference: Tensor, reference_labels: Tensor, candidates: Tensor,
                 num_classes: int, fusion: str = "none", normalize: bool = False) -> tuple[Tensor, Tensor]:
    """(label, score) per candidate, smaller score = more confident, from the features of one or more
    models (newest last; rows = dataset index). Centres come from `reference` with `reference_labels`.

    none: the newest model's nearest centre. cascade: the same on the concatenated features.
    avg_distance: distances to each class centre averaged over the models, then the nearest.
    avg_rank: each model's nearest-centre distance ranked among the candidates; score = mean rank,
      label = majority vote of the models' nearest centres, ties to the newest model.
    """
    if fusion not in FUSIONS:
        raise ValueError(f"fusion {fusion!r}: use one of {FUSIONS}")
    sets = [F.normalize(f, dim=1) if normalize else f for f in feature_sets]
    if fusion == "none":
        sets = sets[-1:]
    elif fusion == "cascade":
        sets = [torch.cat(sets, dim=1)]
    distances = [center_distances(f[candidates], class_centers(f[reference], reference_labels, num_classes))
                 for f in sets]
    if fusion == "avg_rank":
        nearest = [nearest_center(d) for d in distances]
        score = torch.stack([ascending_rank(dist).float() for _, dist in nearest]).mean(dim=0)
        votes = sum(F.one_hot(label, num_classes).float() for label, _ in nearest)
        votes = votes + 0.5 * F.one_hot(nearest[-1][0], num_classes)  # breaks ties, never a majority
        return votes.argmax(dim=1), score
    return nearest_center(torch.stack(distances).mean(dim=0))


def select(scores: Tensor, count: int, rule: str = "min", pool_factor: int = 10,
           generator: torch.Generator | None = None) -> Tensor:
    """Positions of `count` rows by score (smaller = more confident), each at most once.

    min: the most confident (Snowball). max: the least confident. random: any. min_then_max: of the
    pool_factor * count most confident, the count least confident (the MixMatch variant, spec §3.4.7).
    Ties go to the lower position, so the choice does not depend on the process count.
    """
    if rule not in RULES:
        raise ValueError(f"rule {rule!r}: use one of {RULES}")
    count = min(count, len(scores))
    order = torch.sort(scores, stable=True).indices
    if rule == "min":
        return order[:count]
    if rule == "max":
        return torch.sort(-scores, stable=True).indices[:count]
    if rule == "random":
        return torch.randperm(len(scores), generator=generator)[:count].to(scores.device)
    pool = order[: pool_factor * count]
    return pool[torch.sort(-scores[pool], stable=True).indices[:count]]


def select_per_class(scores: Tensor, labels: Tensor, count: int, num_classes: int, **rule) -> Tensor:
    """`select` within each assigned class, count // num_classes each (the optional class quota)."""
    quota = count // num_classes
    picks = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        picks.append(members[select(scores[members], quota, **rule)])
    return torch.cat(picks)


def discovery_count(wanted: int, left: int, when: tuple[int, int]) -> int:
    """N capped at the `left` unlabeled candidates: doubling outgrows a small pool (e.g. 5 labels x 40 classes
    of 640 images run out at the third doubling); the cap is announced, not silent."""
    if wanted > left:
        rank_zero_warn(f"discovery (generation {when[0]}, iteration {when[1]}): {left} unlabeled images left, "
                       f"fewer than the {wanted} asked for; adding {left}. Fewer iterations "
                       "(model.init_args.curriculum.iterations) or a fixed num_discovered avoid it")
    return min(wanted, left)


# -- the callback --------------------------------------------------------------------------------------
class ConfidentSampleDiscovery(L.Callback):
    """Snowball's confident sample discovery at every iteration start of `pl_module.curriculum`.

    Timing: a loader's iterator (and its workers' copy of the dataset) exists before
    on_train_epoch_start, so the labeled set changes at on_train_epoch_end for the next epoch, or at
    on_fit_start for the first one. A discovery already in `history` (restored on resume) is not redone.
    At the first iteration of a generation the labeled set is reset to the original labels (Eq. 2.1).

    feature_model: master | teacher | student (spec §3.4.1; the master by default).
    rule: min | max | random | min_then_max (MixMatch variant), over the candidates' scores.
    num_discovered: images per discovery; None = the labeled set's size (the set doubles). Capped at the
      unlabeled images left (a warning says so); with none left the iteration trains on the set as it is.
    pool_factor: min_then_max's high-confidence pool, pool_factor x N.
    centers_from: "current" labeled set (original + this generation's discoveries) or "original" labels.
    normalize: L2-normalise the features first (off in the chapter).
    per_class_quota: N / C per assigned class instead of the global ranking.
    fusion: none | avg_distance | cascade | avg_rank over the features of the last `fusion_window`
      discoveries' models (Table 2.10); the bank of earlier features is part of the callback state.
    selector: center_distance (the chapter) | softmax_confidence (Fig. 2.7: the feature model's own
      prediction labels, its max probability ranks).
    seed: the random rule's draws, per (generation, iteration).
    Every discovery is logged (discovery/count, discovery/labeled, and discovery/error, the % of wrong
    labels against the hidden ground truth, for monitoring only) and written with its indices and labels
    to <default_root_dir>/discovery.json.
    """

    def __init__(self, feature_model: str = "master", rule: str = "min", num_discovered: int | None = None,
                 pool_factor: int = 10, centers_from: str = "current", normalize: bool = False,
                 per_class_quota: bool = False, fusion: str = "none", fusion_window: int = 3,
                 selector: str = "center_distance", seed: int = 0):
        for name, value, allowed in (("rule", rule, RULES), ("fusion", fusion, FUSIONS), ("selector", selector,
                                     SELECTORS), ("centers_from", centers_from, CENTERS_FROM)):
            if value not in allowed:
                raise ValueError(f"{name} {value!r}: use one of {allowed}")
        if selector == "softmax_confidence" and (fusion != "none" or centers_from != "current"):
            raise ValueError("selector softmax_confidence uses no centres: leave fusion none and centers_from "
                             "current")
        self.feature_model, self.rule, self.num_discovered, self.pool_factor = (
            feature_model, rule, num_discovered, pool_factor)
        self.centers_from, self.normalize, self.per_class_quota = centers_from, normalize, per_class_quota
        self.fusion, self.fusion_window, self.selector, self.seed = fusion, fusion_window, selector, seed
        self.history: list[dict] = []
        self.feature_bank: list[Tensor] = []  # fusion: earlier discoveries' features, oldest first

    # -- timing ------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        self.discover_if_due(trainer, pl_module, trainer.current_epoch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.discover_if_due(trainer, pl_module, trainer.current_epoch + 1)

    def discover_if_due(self, trainer, pl_module, epoch: int) -> None:
        curriculum = getattr(pl_module, "curriculum", None)
        if curriculum is None:
            raise TypeError(f"{type(pl_module).__name__} has no `curriculum`: ConfidentSampleDiscovery runs "
                            "with lightning_modules.snowball.Snowball")
        if not curriculum.starts_iteration(epoch):
            return
        generation, iteration = curriculum.position(epoch)
        if not any((h["generation"], h["iteration"]) == (generation, iteration) for h in self.history):
            self.discover(trainer, pl_module, generation, iteration, epoch)

    # -- one discovery -----------------------------------------------------------------------------------
    def features(self, trainer, pl_module) -> tuple[Tensor, Tensor]:
        """(features or logits of every training image, ground truth), rows = dataset index."""
        forward = pl_module.logits if self.selector == "softmax_confidence" else pl_module.features
        loader = trainer.datamodule.train_eval_dataloader(reveal_targets=True)  # truth: monitoring only
        features, truth, index = extract_features(pl_module, loader, partial(forward, model=self.feature_model))
        if not torch.equal(index.cpu(), torch.arange(len(loader.dataset))):
            raise RuntimeError("train_eval_dataloader must yield every training image once, by index")
        return features, truth

    def score(self, features: Tensor, reference: Tensor, reference_labels: Tensor, candidates: Tensor,
              generation: int, num_classes: int) -> tuple[Tensor, Tensor]:
        if self.selector == "softmax_confidence":
            confidence, label = features[candidates].softmax(dim=1).max(dim=1)
            return label, -confidence
        if self.centers_from == "original":
            this_generation = [i for h in self.history if h["generation"] == generation for i in h["index"]]
            keep = ~torch.isin(reference, torch.as_tensor(this_generation, dtype=torch.long))
            reference, reference_labels = reference[keep], reference_labels[keep]
        feature_sets = [f.to(features.device) for f in self.feature_bank] + [features]
        return fused_scores(feature_sets, reference.to(features.device), reference_labels.to(features.device),
                            candidates.to(features.device), num_classes, self.fusion, self.normalize)

    def discover(self, trainer, pl_module, generation: int, iteration: int, epoch: int) -> None:
        dm = trainer.datamodule
        if iteration == 1:
            dm.reset_labeled()  # Eq. 2.1: a generation starts again from the original labels
        reference = torch.as_tensor(dm.labeled_indices, dtype=torch.long)
        reference_labels = torch.as_tensor(dm.labeled_targets, dtype=torch.long)
        candidates = torch.as_tensor(np.setdiff1d(dm.unlabeled_indices, dm.labeled_indices), dtype=torch.long)
        features, truth = self.features(trainer, pl_module)
        num_classes = pl_module.num_classes
        labels, scores = self.score(features, reference, reference_labels, candidates, generation, num_classes)
        count = discovery_count(self.num_discovered or len(reference), len(candidates), (generation, iteration))
        seed = self.seed * 1_000_003 + generation * 1009 + iteration
        rule = {"rule": self.rule, "pool_factor": self.pool_factor, "generator": torch.Generator().manual_seed(seed)}
        picked = (select_per_class(scores, labels, count, num_classes, **rule) if self.per_class_quota
                  else select(scores, count, **rule)).cpu()
        chosen, chosen_labels = candidates[picked], labels.cpu()[picked]
        # computed from the same gathered features on every rank; rank 0's result is the one all apply
        chosen, chosen_labels = (torch.as_tensor(x, dtype=torch.long) for x in trainer.strategy.broadcast(
            (chosen.tolist(), chosen_labels.tolist()), src=0))
        dm.add_labeled(chosen, chosen_labels)
        if self.fusion != "none":  # keep the features of the last fusion_window - 1 models for the next one
            kept = max(self.fusion_window - 1, 0)
            self.feature_bank = [*self.feature_bank, features.cpu()][len(self.feature_bank) + 1 - kept:]
        self.record(trainer, (generation, iteration, epoch), chosen, chosen_labels, truth.cpu(),
                    len(dm.labeled_indices), num_classes)

    def record(self, trainer, when: tuple[int, int, int], chosen: Tensor, labels: Tensor, truth: Tensor,
               labeled: int, num_classes: int) -> None:
        generation, iteration, epoch = when
        known = truth[chosen] >= 0
        wrong = labels[known] != truth[chosen][known]
        error = 100.0 * wrong.float().mean().item() if known.any() else None
        self.history.append({"generation": generation, "iteration": iteration, "epoch": epoch,
                             "count": len(chosen), "labeled": labeled, "error": error,
                             "class_counts": torch.bincount(labels, minlength=num_classes).tolist(),
                             "index": chosen.tolist(), "label": labels.tolist()})
        metrics = {"discovery/count": float(len(chosen)), "discovery/labeled": float(labeled),
                   "discovery/generation": float(generation), "discovery/iteration": float(iteration)}
        if error is not None:
            metrics["discovery/error"] = error
        rank_zero_info(f"discovery (generation {generation}, iteration {iteration}, before epoch {epoch}): "
                       f"+{len(chosen)} images, labeled set {labeled}"
                       + (f", wrong labels {error:.2f}%" if error is not None else ""))
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            Path(trainer.default_root_dir).mkdir(parents=True, exist_ok=True)
            Path(trainer.default_root_dir, "discovery.json").write_text(json.dumps(self.history))

    # -- resume --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"history": self.history, "feature_bank": self.feature_bank}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict["history"])
        self.feature_bank = list(state_dict["feature_bank"])
