"""Sample discovery: unlabeled training images given a (pseudo) label and added to the semi-supervised
labeled set between training iterations.

`ConfidentSampleDiscovery` is Snowball's (dissertation chapter 2, §2.3.3): features of the
whole training split from one model (default the master, eval mode, no augmentation), class centres of
the current labeled set (Eq. 2.8), every remaining unlabeled image labeled by its nearest centre, and
the N closest added (N = the labeled set's size, so it doubles). The pure functions at the top (centres,
distances, fusion, selection) are what LMCS's critical sample discovery reuses.

`CriticalSampleDiscovery` is LMCS's (dissertation chapter 3, §3.3.3-3.3.4): once per generation, the
candidates confined to the rho N nearest to a labeled class centre, a rank-weighted soft-label vote over
the labeled images (Eqs. 3.10-3.11), the N of highest vote entropy (Eq. 3.12) with the voted hard label;
they go to the look-ahead set the master trains on, and to the student's labeled set one generation later.
"""
from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from embedding_core.clusters import cluster_centers
from embedding_core.features import extract_features
from embedding_core.seeds import own_random_stream

RULES = ("min", "max", "random", "min_then_max")
FUSIONS = ("none", "avg_distance", "cascade", "avg_rank")
SELECTORS = ("center_distance", "softmax_confidence")
CENTERS_FROM = ("current", "original")
CRITICAL_MODES = ("confined_max_entropy", "confined_min_entropy", "unconfined_max_entropy",
                  "unconfined_min_entropy", "min_distance", "none")
LABEL_RULES = ("soft_argmax", "nearest_center", "agree_only")


# -- pure pieces -------------------------------------------------------------------------------------
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
    distances = [center_distances(f[candidates], cluster_centers(f[reference], reference_labels, num_classes))
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
    pool_factor * count most confident, the count least confident (the MixMatch variant, [R]).
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


def rank_weights(distances: Tensor, beta: float) -> Tensor:
    """Eq. 3.10 per row: W = beta / (beta + R / n), R the 1-based ascending rank of each of the n
    reference distances (ties in column order): a weight of rank only, never of the distance values."""
    n = distances.shape[1]
    ranks = torch.sort(distances, dim=1, stable=True).indices.argsort(dim=1) + 1
    return beta / (beta + ranks.to(distances.dtype) / n)


def rank_weighted_vote(distances: Tensor, reference_labels: Tensor, num_classes: int, beta: float) -> Tensor:
    """Eq. 3.11: (N, C) soft labels, each row the rank-weighted vote of the reference images' classes."""
    weights = rank_weights(distances, beta)
    votes = weights @ F.one_hot(reference_labels, num_classes).to(weights.dtype)
    return votes / weights.sum(dim=1, keepdim=True)


def entropy_bits(probs: Tensor) -> Tensor:
    """Eq. 3.12: -sum_l p_l log2 p_l per row (0 log 0 = 0)."""
    return -torch.special.xlogy(probs, probs).sum(dim=1) / math.log(2.0)


def critical_select(candidates: Tensor, reference: Tensor, reference_labels: Tensor, num_classes: int,
                    count: int, mode: str = "confined_max_entropy", pool_factor: int = 10,
                    beta: float | None = None, label_rule: str = "soft_argmax",
                    per_class_quota: bool = False) -> dict[str, Tensor]:
    """LMCS's confined maximum-entropy search over candidate features (dissertation §3.3.3). Returns "picked"
    (positions into `candidates`), "label", and per pick "distance" (to the nearest centre) and "entropy".

    confined_*: the pool_factor * count candidates nearest to a class centre of `reference` (Eq. 3.9, Delta
    set by quantile); unconfined_*: all. *_max_entropy / *_min_entropy: the count of highest / lowest
    entropy of the rank-weighted vote (beta: Eq. 3.10's, None = 1 / C), ties to the smaller distance.
    min_distance: the count nearest to a centre, labeled by it (Snowball's rule). label_rule: soft_argmax
    (the vote's argmax, Fig. 3.5), nearest_center (Eq. 3.8), agree_only (only picks where both agree,
    refilled down the entropy order). per_class_quota: at most count // C picks per assigned label, taken
    down the same order (not in the chapter: a guard against the class imbalance of the picks).
    """
    if mode not in CRITICAL_MODES or mode == "none":
        raise ValueError(f"mode {mode!r}: use one of {CRITICAL_MODES[:-1]}")
    if label_rule not in LABEL_RULES:
        raise ValueError(f"label_rule {label_rule!r}: use one of {LABEL_RULES}")
    beta = 1.0 / num_classes if beta is None else beta
    centre_label, distance = nearest_center(center_distances(candidates, cluster_centers(reference, reference_labels,
                                                                                        num_classes)))
    by_distance = select(distance, len(distance), "min")  # every candidate, nearest first
    if mode == "min_distance":
        picked = by_distance[:count]
        votes = rank_weighted_vote(_exact_cdist(candidates[picked], reference), reference_labels, num_classes, beta)
        return {"picked": picked, "label": centre_label[picked], "distance": distance[picked],
                "entropy": entropy_bits(votes)}
    pool = by_distance[: pool_factor * count] if mode.startswith("confined") else by_distance
    votes = rank_weighted_vote(_exact_cdist(candidates[pool], reference), reference_labels, num_classes, beta)
    entropy = entropy_bits(votes)
    sign = -1.0 if mode.endswith("max_entropy") else 1.0
    order = torch.sort(sign * entropy, stable=True).indices  # pool is nearest-first: ties to the smaller d
    voted = votes.argmax(dim=1)
    label = centre_label[pool] if label_rule == "nearest_center" else voted
    if label_rule == "agree_only":
        order = order[(voted == centre_label[pool])[order]]
    if per_class_quota:  # keep each pick whose label has fewer than count // C before it in the order
        onehot = F.one_hot(label[order], num_classes)
        order = order[(onehot.cumsum(dim=0) * onehot).sum(dim=1) <= count // num_classes]
    order = order[:count]
    return {"picked": pool[order], "label": label[order], "distance": distance[pool[order]],
            "entropy": entropy[order]}


def _exact_cdist(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances without the matmul expansion, so ranks do not depend on the batch layout."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


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

    feature_model: master | teacher | student (the master: dissertation §2.3.3).
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
               labeled: int, num_classes: int, extra: dict[str, float] | None = None) -> None:
        generation, iteration, epoch = when
        known = truth[chosen] >= 0
        wrong = labels[known] != truth[chosen][known]
        error = 100.0 * wrong.float().mean().item() if known.any() else None
        self.history.append({"generation": generation, "iteration": iteration, "epoch": epoch,
                             "count": len(chosen), "labeled": labeled, "error": error,
                             "class_counts": torch.bincount(labels, minlength=num_classes).tolist(),
                             "index": chosen.tolist(), "label": labels.tolist(), **(extra or {})})
        metrics = {"discovery/count": float(len(chosen)), "discovery/labeled": float(labeled),
                   "discovery/generation": float(generation), "discovery/iteration": float(iteration),
                   **{f"discovery/{k}": float(v) for k, v in (extra or {}).items()}}
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


class CriticalSampleDiscovery(ConfidentSampleDiscovery):
    """LMCS's critical sample discovery with look-ahead, once per generation of `pl_module.curriculum`
    (iterations = 1), on a module whose datamodule has a look-ahead set (`enable_lookahead`).

    At generation g: the previous generation's discoveries U_(g-1) join the student's labeled set
    (`add_labeled`), then U_g is found and becomes the look-ahead set (`set_lookahead`) the master trains
    on, so the master sees it one generation before the student (§3.3.4). The labeled set never resets
    (Eq. 3.13). N_g = the master's set size (it doubles), capped so that it never exceeds max_ratio x the
    original labels (R_L) nor the candidates left; num_discovered fixes N instead (Table 3.8's one shot).

    feature_model: student (line 679) | teacher (the EMA student).
    mode: confined_max_entropy (the method) | confined_min_entropy | unconfined_max_entropy |
      unconfined_min_entropy | min_distance (Table 3.8) | none (no discovery: Table 3.10's "w/o CSD").
    pool_factor: rho, the confined set's size over N (Delta by quantile [R], docs/methods/lmcs.md).
    beta: Eq. 3.10's; None = 1 / C [R].
    reference: original (the drawn labels, Eqs. 3.8 / 3.10) | current (the student's labeled set).
    label_rule: soft_argmax | nearest_center | agree_only (docs/methods/lmcs.md).
    lookahead: false gives the discoveries to the student at once (the look-ahead ablation).
    per_class_quota: at most N / C picks per assigned class (ours, off in the chapter).
    Logged per discovery, besides the base's count and error against the hidden truth: the confined set's
    size and the picks' mean centre distance and vote entropy.
    """

    def __init__(self, feature_model: str = "student", mode: str = "confined_max_entropy",
                 num_discovered: int | None = None, max_ratio: float = 10.0, pool_factor: int = 10,
                 beta: float | None = None, reference: str = "original", label_rule: str = "soft_argmax",
                 lookahead: bool = True, per_class_quota: bool = False):
        super().__init__(feature_model=feature_model, num_discovered=num_discovered, pool_factor=pool_factor,
                         per_class_quota=per_class_quota)
        for name, value, allowed in (("mode", mode, CRITICAL_MODES), ("reference", reference, CENTERS_FROM),
                                     ("label_rule", label_rule, LABEL_RULES)):
            if value not in allowed:
                raise ValueError(f"{name} {value!r}: use one of {allowed}")
        self.mode, self.max_ratio, self.beta, self.reference = mode, max_ratio, beta, reference
        self.label_rule, self.lookahead = label_rule, lookahead

    def discover_if_due(self, trainer, pl_module, epoch: int) -> None:
        curriculum = getattr(pl_module, "curriculum", None)
        if curriculum is None or curriculum.iterations != 1:
            raise TypeError(f"CriticalSampleDiscovery runs once per generation of a curriculum with iterations 1 "
                            f"(lightning_modules.lmcs.LMCS); {type(pl_module).__name__} has "
                            f"{getattr(curriculum, 'iterations', 'no curriculum')}")
        with own_random_stream():
            super().discover_if_due(trainer, pl_module, epoch)

    def discover(self, trainer, pl_module, generation: int, iteration: int, epoch: int) -> None:
        dm = trainer.datamodule
        discovered = [i for h in self.history for i in h["index"]]
        pending = self.history[-1] if self.history and self.lookahead else None
        if pending is not None and pending["count"]:  # U_(g-1): the student's from now on
            dm.add_labeled(pending["index"], pending["label"])
        labeled = torch.as_tensor(dm.labeled_indices, dtype=torch.long)
        labels = torch.as_tensor(dm.labeled_targets, dtype=torch.long)
        original = ~torch.isin(labeled, torch.as_tensor(discovered, dtype=torch.long))
        size = len(labeled)  # |Omega_(G-1)|, the master's set so far: N doubles it, up to R_L |Omega_L|
        wanted = self.num_discovered or min(size, int(self.max_ratio * int(original.sum())) - size)
        candidates = torch.as_tensor(np.setdiff1d(dm.unlabeled_indices, dm.labeled_indices), dtype=torch.long)
        features, truth = self.features(trainer, pl_module)
        count = 0 if self.mode == "none" else discovery_count(max(wanted, 0), len(candidates), (generation, 1))
        chosen, chosen_labels, extra = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), {}
        if count:
            reference, reference_labels = ((labeled[original], labels[original]) if self.reference == "original"
                                           else (labeled, labels))
            device = features.device
            found = critical_select(features[candidates.to(device)], features[reference.to(device)],
                                    reference_labels.to(device), pl_module.num_classes, count, self.mode,
                                    self.pool_factor, self.beta, self.label_rule, self.per_class_quota)
            chosen, chosen_labels = candidates[found["picked"].cpu()], found["label"].cpu()
            extra = {"confined": min(self.pool_factor * count, len(candidates)) if self.mode.startswith("confined")
                     else len(candidates), "distance": found["distance"].mean().item(),
                     "entropy": found["entropy"].mean().item()}
            # computed from the same gathered features on every rank; rank 0's result is the one all apply
            chosen, chosen_labels = (torch.as_tensor(x, dtype=torch.long) for x in trainer.strategy.broadcast(
                (chosen.tolist(), chosen_labels.tolist()), src=0))
        if self.lookahead:
            dm.set_lookahead(chosen, chosen_labels)
        else:
            dm.add_labeled(chosen, chosen_labels)
            dm.set_lookahead([], [])
        self.record(trainer, (generation, iteration, epoch), chosen, chosen_labels, truth.cpu(),
                    len(dm.lookahead_indices), pl_module.num_classes, extra)
