"""EmbeddingEvaluator: weighted kNN, Recall@K and NMI from the eval loaders' roles.

The validation loop yields {"embedding", "target", "index"} per batch; the evaluator collects them per
role, gathers all ranks, drops the distributed sampler's padding by `index`, and scores:
  reference + query  -> val/knn_top1 (weighted kNN of queries against the reference)
  query (+ gallery)  -> val/recall@K, val/map@r, val/r_precision (leave-one-out on query, or query ->
                        gallery), val/nmi (on query)
NMI comes from one k-means clustering in both normalisations (val/nmi_arithmetic, val/nmi_geometric; val/nmi
repeats the configured one); `nmi: last` runs it only in the random-init pass and the final validation.
The validation run before the first training step (Lightning's sanity check, run over the full loaders)
gives the random-init metrics `initial`; every later validation updates `latest` and `best`.
"""
from __future__ import annotations

import statistics
import warnings
from collections.abc import Callable, Sequence
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from callbacks.refine import refined_recall_at_k
from embedding_core import metrics
from embedding_core.distributed import gather_unique
from embedding_core.search import resolve_backend
from lightning_modules.base import divergence_message, saved_checkpoint


def require_finite(trainer, name: str, values: torch.Tensor) -> None:
    """`metrics.check_finite` as a divergence stop: non-finite embeddings (or logits) end the run with the
    epoch and the checkpoint to resume from, never with a score."""
    try:
        metrics.check_finite(name, values)
    except FloatingPointError as err:
        raise FloatingPointError(divergence_message(str(err), trainer.current_epoch, trainer.global_step,
                                                    saved_checkpoint(trainer))) from None


class Scoreboard(L.Callback):
    """The bookkeeping every evaluator shares: `initial` (the random-init network, from Lightning's sanity
    check over the full eval loaders), `latest` and `best` after every validation, kept across a resume."""

    higher_is_better = True

    def __init__(self):
        self.initial: dict[str, float] = {}
        self.latest: dict[str, float] = {}
        self.best: dict[str, float] = {}

    def record(self, trainer, pl_module, scores: Callable[[], dict[str, float]], complete: bool) -> None:
        """Store (and log) `scores()`; in the sanity check only when it saw every eval image."""
        if trainer.sanity_checking:
            if not complete:
                warnings.warn("the sanity check saw part of the eval data: set trainer.num_sanity_val_steps=-1 "
                              "to get the random-init metrics")
            elif not self.initial:  # a resumed run keeps the initial metrics of its first start
                self.initial = scores()
            return
        self.latest = scores()
        pick = max if self.higher_is_better else min
        for name, value in self.latest.items():
            self.best[name] = pick(self.best.get(name, value), value)
        pl_module.log_dict(self.latest, sync_dist=False, rank_zero_only=False)
        pl_module.log_dict({f"best/{k[4:]}": v for k, v in self.best.items()}, sync_dist=False)

    def on_fit_start(self, trainer, pl_module) -> None:
        """`final` is the last epoch's metrics (and `nmi: last` runs there): refuse a schedule whose last
        epoch is not validated."""
        every, last = trainer.check_val_every_n_epoch, trainer.max_epochs
        if trainer.enable_validation and trainer.max_steps == -1 and every and last and last > 0 and last % every:
            raise ValueError(f"max_epochs {last} is not a multiple of check_val_every_n_epoch {every}: the last "
                             f"validation would be epoch {last - last % every}, not the last epoch, so 'final' "
                             f"would not be the final model. Set --trainer.max_epochs "
                             f"{last - last % every or every} or --trainer.check_val_every_n_epoch 1")

    def state_dict(self) -> dict:
        return {"initial": self.initial, "latest": self.latest, "best": self.best}

    def load_state_dict(self, state_dict: dict) -> None:
        self.initial = dict(state_dict["initial"])
        self.latest = dict(state_dict["latest"])
        self.best = dict(state_dict["best"])


class EmbeddingEvaluator(Scoreboard):
    """Scores the embedding on the datamodule's eval roles after every validation loop.

    Args:
      recall_ks: K list for Recall@K (CUB/Cars 1,2,4,8; SOP 1,10,100; In-Shop 1,10,20,30,40,50).
      knn_k, knn_temperature: weighted kNN (k = 200, weights exp(s / 0.1), NPID/ISIF rule).
      knn_extra_ks: more k's for the same vote, logged as val/knn_top1@k (EIR Table 2: k = 5, 20).
      nmi: run k-means on the query embeddings (one cluster per class) and report NMI: true (every
        validation), false, or "last" (the random-init pass and the final validation only: SOP's
        11,316-cluster k-means is too costly to run at every validation).
      nmi_average: the normalisation `val/nmi` reports: "arithmetic" (lifted-struct formula, sklearn >=
        0.22) or "geometric" (ISIF era); both are logged as val/nmi_<average> from the same clustering.
      kmeans_restarts, seed: k-means restarts and seed, set explicitly so NMI is reproducible.
      backend: "auto" (faiss, on GPU when present), "faiss-gpu" (refused without faiss's GPU build) or "torch".
      refine_m, refine_alpha, refine_lambda, refine_max_sweeps: test-time refinement (ROUL, callbacks.refine):
        each query's top-M re-ranked by the module's predicted relative orders (`predict_orders` on the
        "order_feature" its validation_step returns), reported as val/recall@K_refined beside val/recall@K;
        refine_m 0 = off.
      map_at_r: also report val/map@r and val/r_precision (metrics.map_at_r) on the Recall@K queries.
    A module with `validation_extras()` (SAN: val/san_moved) has those scores added to each validation's.
    """

    def __init__(self, recall_ks: Sequence[int] = (1, 2, 4, 8), knn_k: int = 200, knn_temperature: float = 0.1,
                 nmi: bool | Literal["last"] = True, nmi_average: str = "arithmetic", kmeans_restarts: int = 10,
                 seed: int = 0, backend: str = "auto", knn_extra_ks: Sequence[int] = (), refine_m: int = 0,
                 refine_alpha: float = 10.0, refine_lambda: float = 1.0, refine_max_sweeps: int | None = None,
                 map_at_r: bool = True):
        if knn_k < 1 or any(k < 1 for k in knn_extra_ks) or any(k < 1 for k in recall_ks):
            raise ValueError(f"evaluation knn_k={knn_k}, knn_extra_ks={list(knn_extra_ks)}, recall_ks={list(recall_ks)}: "
                             "every k counts neighbours, so use k >= 1 (--evaluation.knn_k=200)")
        if nmi_average not in metrics.NMI_AVERAGES:
            raise ValueError(f"nmi_average {nmi_average!r}: use arithmetic or geometric")
        if nmi not in (True, False, "last"):
            raise ValueError(f"nmi {nmi!r}: use true (every validation), false, or last (random-init pass and "
                             "final validation only)")
        self.recall_ks, self.knn_k, self.knn_temperature = list(recall_ks), knn_k, knn_temperature
        self.nmi, self.nmi_average, self.kmeans_restarts = nmi, nmi_average, kmeans_restarts
        self.seed, self.backend, self.knn_extra_ks = seed, backend, list(knn_extra_ks)
        self.map_at_r = map_at_r
        if backend == "faiss-gpu":  # refused now, not at the first validation
            resolve_backend(backend)
        if refine_m == 1 or refine_m < 0:
            raise ValueError(f"refine_m {refine_m}: use 0 (no refinement) or a top-M list of M >= 2")
        self.refine = {"m": refine_m, "alpha": refine_alpha, "lam": refine_lambda, "max_sweeps": refine_max_sweeps}
        super().__init__()
        self._buffers: dict[int, list[dict]] = {}

    # -- collection -----------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._buffers = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        keys = ("embedding", "target", "index") + (("order_feature",) if "order_feature" in outputs else ())
        self._buffers.setdefault(dataloader_idx, []).append({k: outputs[k].detach() for k in keys})

    def _collect(self, pl_module, dataloader_idx: int):
        parts = self._buffers.get(dataloader_idx, [])
        return gather_unique(pl_module, *(torch.cat([p[k] for p in parts]) for k in ("embedding", "target", "index")))

    def has_embeddings(self, loaders: int) -> bool:
        """Whether this validation collected the embeddings of all `loaders` eval loaders."""
        return all(self._buffers.get(i) for i in range(loaders))

    def embeddings(self, pl_module, dataloader_idx: int):
        """(embedding, target, index) of one eval loader in this validation, gathered: for other callbacks
        (pictures) that would otherwise run a second pass over the eval set."""
        return self._collect(pl_module, dataloader_idx)

    def _order_features(self, pl_module, dataloader_idx: int) -> torch.Tensor:
        """The role's "order_feature" rows, gathered and deduplicated like its embeddings."""
        parts = self._buffers.get(dataloader_idx, [])
        if not parts or "order_feature" not in parts[0] or not hasattr(pl_module, "predict_orders"):
            raise ValueError("evaluation.refine_m > 0 needs a module whose validation_step returns "
                             "'order_feature' and that has predict_orders (lightning_modules.roul.ROUL); set "
                             "--evaluation.refine_m=0 for other methods")
        index = torch.cat([p["index"] for p in parts])
        return gather_unique(pl_module, torch.cat([p["order_feature"] for p in parts]), index, index)[0]

    def refined_scores(self, pl_module, sets: dict, features: dict[str, torch.Tensor]) -> dict[str, float]:
        """val/recall@K_refined: Recall@K after re-ranking each query's top-M (callbacks.refine)."""
        gallery = sets.get("gallery", (None, None))
        recalls = refined_recall_at_k(*sets["query"], features["query"], self.recall_ks, pl_module.predict_orders,
                                      self.refine["m"], self.refine["alpha"], self.refine["lam"], *gallery,
                                      features.get("gallery"), self.refine["max_sweeps"])
        return {f"val/recall@{k}_refined": v for k, v in recalls.items()}

    # -- scoring --------------------------------------------------------------------------------
    def score(self, sets: dict[str, tuple[torch.Tensor, torch.Tensor]], nmi: bool | None = None) -> dict[str, float]:
        """Metrics from {role: (embedding, target)}; a pure function of the embeddings. `nmi` overrides
        whether NMI runs (default: unless configured off)."""
        out: dict[str, float] = {}
        query_emb, query_target = sets["query"]
        if "reference" in sets:
            ref_emb, ref_target = sets["reference"]
            out["val/knn_top1"] = metrics.weighted_knn_top1(query_emb, query_target, ref_emb, ref_target,
                                                            k=self.knn_k, temperature=self.knn_temperature)
            for k in self.knn_extra_ks:
                out[f"val/knn_top1@{k}"] = metrics.weighted_knn_top1(query_emb, query_target, ref_emb, ref_target,
                                                                     k=k, temperature=self.knn_temperature)
        if self.recall_ks:
            gallery = sets.get("gallery", (None, None))
            recalls = metrics.recall_at_k(query_emb, query_target, self.recall_ks, *gallery)
            out.update({f"val/recall@{k}": v for k, v in recalls.items()})
        if self.map_at_r and self.recall_ks:
            gallery = sets.get("gallery", (None, None))
            out.update({f"val/{name}": v for name, v in
                        metrics.map_at_r(query_emb, query_target, *gallery, backend=self.backend).items()})
        if self.nmi if nmi is None else nmi:
            scores = metrics.nmi_scores(query_emb, query_target, seed=self.seed, restarts=self.kmeans_restarts,
                                        backend=self.backend)
            out["val/nmi"] = scores[self.nmi_average]
            out.update({f"val/nmi_{average}": value for average, value in scores.items()})
        return out

    def runs_nmi(self, trainer) -> bool:
        """Whether this validation computes NMI: always with nmi=true; with nmi="last" in the random-init
        pass, outside fit (trainer.validate) and at the validation that ends training."""
        if self.nmi != "last":
            return bool(self.nmi)
        return trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or is_final_validation(trainer)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        roles = trainer.datamodule.eval_roles
        sets, complete = {}, True
        for i, role in enumerate(roles):
            emb, target, index = self._collect(pl_module, i)
            complete &= len(index) == len(trainer.val_dataloaders[i].dataset)
            require_finite(trainer, f"the {role} embeddings", emb)
            sets[role] = (emb, target)
        nmi = self.runs_nmi(trainer)
        # a module's own held-out diagnostics (SAN: the share of moved points), reported with the scores
        extras = pl_module.validation_extras() if hasattr(pl_module, "validation_extras") else {}
        if self.refine["m"] and self.recall_ks:
            features = {role: self._order_features(pl_module, i) for i, role in enumerate(roles)
                        if role in ("query", "gallery")}
            self.record(trainer, pl_module, lambda: {**self.score(sets, nmi), **extras,
                                                     **self.refined_scores(pl_module, sets, features)}, complete)
            return
        self.record(trainer, pl_module, lambda: {**self.score(sets, nmi), **extras}, complete)


def is_final_validation(trainer) -> bool:
    """The validation after the last training step of the run: the last batch of the last epoch, or
    max_steps reached, or a stop requested before the validation began."""
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return True
    last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
    last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
    return last_batch and (last_epoch or trainer.should_stop)


def error_rate(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Top-1 error in percent."""
    return 100.0 * (logits.argmax(dim=1) != target).float().mean().item()


def median_of_last(values: Sequence[float], window: int) -> float | None:
    """Median of the last `window` values (MixMatch's report: the last 20 checkpoints); None until there
    are that many."""
    return statistics.median(values[-window:]) if len(values) >= window else None


class ClassificationEvaluator(Scoreboard):
    """Top-1 test error (%) of a classifier module on the `role` eval loader (semi protocol: `query`).

    validation_step yields "logits" (the model the method reports: val/error) and "logits_<name>" for
    every model it keeps (val/error_<name>, e.g. student / teacher / master, for comparison), with
    "target" and "index". Like EmbeddingEvaluator: gathered over ranks, padding dropped by index,
    `initial` from the full sanity-check pass, then `latest` and `best` (lowest) after every validation.

    median_window: also report val/error_median<window>, the median val/error of the last `window`
      validations once there are that many (MixMatch's rule: 20, one per 1,024 steps); 0 = off.
    The last epoch must be a validated one (final = the last epoch): fit refuses a max_epochs that
    check_val_every_n_epoch does not divide.
    """

    higher_is_better = False

    def __init__(self, role: str = "query", median_window: int = 0):
        super().__init__()
        if median_window < 0:
            raise ValueError(f"median_window {median_window}: use 0 (off) or the number of validations")
        self.role, self.median_window = role, median_window
        self.errors: list[float] = []  # the last median_window val/error values
        self._buffers: list[dict] = []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._buffers = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.datamodule.eval_roles[dataloader_idx] == self.role:
            self._buffers.append({k: v.detach() for k, v in outputs.items()
                                  if k in ("target", "index") or k.startswith("logits")})

    def score(self, pl_module) -> tuple[dict[str, float], int]:
        """({val/error[_name]: %}, number of distinct images scored) over all ranks."""
        out, count = {}, 0
        target, index = (torch.cat([b[k] for b in self._buffers]) for k in ("target", "index"))
        for key in (k for k in self._buffers[0] if k.startswith("logits")):
            logits = torch.cat([b[key] for b in self._buffers])
            logits, truth, unique = gather_unique(pl_module, logits, target, index)
            require_finite(pl_module.trainer, f"the {key}", logits)
            out["val/error" + key.removeprefix("logits")] = error_rate(logits, truth)
            count = len(unique)
        return out, count

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self._buffers or "logits" not in self._buffers[0]:
            raise ValueError(f"ClassificationEvaluator needs validation_step to return 'logits' (got "
                             f"{sorted(self._buffers[0]) if self._buffers else 'no outputs'}); use a "
                             "classifier module such as lightning_modules.semi.SemiSupervised")
        scores, count = self.score(pl_module)
        if self.median_window and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.errors = [*self.errors, scores["val/error"]][-self.median_window:]
            median = median_of_last(self.errors, self.median_window)
            if median is not None:
                scores[f"val/error_median{self.median_window}"] = median
        role_index = trainer.datamodule.eval_roles.index(self.role)
        self.record(trainer, pl_module, lambda: scores, count == len(trainer.val_dataloaders[role_index].dataset))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "errors": self.errors}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.errors = list(state_dict.get("errors", []))  # checkpoints from before median_window have none
