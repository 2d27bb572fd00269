"""Periodic k-means pseudo labels (TAC-CCL; ROUL and unsupervised SAN reuse it).

Before the first epoch and every `every_n_epochs` epochs, the training split is embedded in order through
the eval transform (`extract_features`, gathered over ranks), clustered by k-means with a fixed seed
(`embedding_core.search.kmeans`: greedy k-means++ seeds, Lloyd's iterations on faiss, on GPU when present),
and the labels go to the datamodule (`set_pseudo_labels`: the P x K sampler re-keys) and, if it has the
setter, to the module (`set_pseudo_labels(labels, centers, embedding)`). A loader's iterator, and its
workers' copy of the sampler, exists before `on_train_epoch_start`, so the labels of epoch e are computed
at the end of epoch e - 1 (the first epoch's at fit start).
Ground-truth labels of the training split are read for monitoring only (NMI, pair precision).
"""
from __future__ import annotations

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from embedding_core.clusters import cluster_centers
from embedding_core.features import extract_features
from embedding_core.metrics import nmi_from_labels
from embedding_core.search import check_init, kmeans, resolve_backend


def pair_precision(targets: np.ndarray, labels: np.ndarray) -> float:
    """Share (%) of same-cluster pairs of distinct images that share the true class (TAC-CCL's "true
    positive pair rate", 39.1% for k-means on CUB)."""
    _, cluster = np.unique(labels, return_inverse=True)
    _, target = np.unique(targets, return_inverse=True)
    joint = np.zeros((cluster.max() + 1, target.max() + 1), dtype=np.int64)
    np.add.at(joint, (cluster, target), 1)
    sizes = joint.sum(1)
    pairs = (sizes * (sizes - 1)).sum()
    return 100.0 * float((joint * (joint - 1)).sum() / pairs) if pairs else float("nan")


def cluster_statistics(labels: np.ndarray, targets: np.ndarray | None) -> dict[str, float]:
    """Cluster sizes, and agreement with the true classes where those exist (monitoring only)."""
    sizes = np.bincount(labels)
    stats = {"clusters": float(len(sizes)), "size_min": float(sizes.min()),
             "size_median": float(np.median(sizes)), "size_max": float(sizes.max()),
             "singletons": float((sizes == 1).sum())}
    if targets is not None:
        stats["nmi"] = nmi_from_labels(targets, labels)
        stats["pair_precision"] = pair_precision(targets, labels)
    return stats


class KMeansPseudoLabels(L.Callback):
    """k-means pseudo labels of the training split, refreshed every `every_n_epochs` epochs.

    num_clusters: K (TAC-CCL: 100 for CUB/Cars, 10,000 for SOP). seed, restarts, iterations, backend, init:
    the k-means run (`embedding_core.search.kmeans`; one run of 50 iterations from greedy k-means++ seeds by
    default; init="random" is the cheaper seeding that misses clusters, see there). Cluster ids come back
    contiguous (0..K'-1, empty clusters dropped). Under DDP every rank extracts (a collective), rank 0
    clusters, and labels and centres are broadcast. The labels survive a checkpoint (state_dict).
    """

    def __init__(self, num_clusters: int = 100, every_n_epochs: int = 20, seed: int = 0, restarts: int = 1,
                 iterations: int = 50, backend: str = "auto", init: str = "k-means++"):
        if num_clusters < 2 or every_n_epochs < 1:
            raise ValueError(f"num_clusters {num_clusters} must be >= 2 and every_n_epochs {every_n_epochs} "
                             ">= 1")
        self.num_clusters, self.every_n_epochs = num_clusters, every_n_epochs
        check_init(init)
        self.seed, self.restarts, self.iterations, self.backend = seed, restarts, iterations, backend
        if backend == "faiss-gpu":  # refused now, not at the first clustering
            resolve_backend(backend)
        self.init = init
        self.labels: Tensor | None = None   # (N,) int64, CPU
        self.centers: Tensor | None = None  # (K', d) float32, CPU
        self.epoch: int | None = None       # the epoch the labels were made for
        self.start_epoch = 0                # the first epoch of this fit (set on resume)
        self.stats: dict[str, float] = {}

    # -- schedule ----------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not hasattr(trainer.datamodule, "set_pseudo_labels"):
            raise RuntimeError("KMeansPseudoLabels needs an EmbeddingDataModule (train_eval_dataloader, "
                               "set_pseudo_labels): pass it as trainer.fit(model, datamodule=...)")
        epoch = self.start_epoch
        if self.labels is None or (epoch % self.every_n_epochs == 0 and self.epoch != epoch):
            self.refresh(trainer, pl_module, epoch)
        else:  # resumed between refreshes: the labels in force; the memory bank is in the module's checkpoint
            self.publish(trainer, pl_module, embedding=None)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """The epoch a resumed fit starts at (its first iterator is built before the loops are restored,
        so `trainer.current_epoch` still reads 0 in on_fit_start): the checkpoint's processed epochs."""
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        progress = fit_loop.get("epoch_progress", {}).get("current", {})
        self.start_epoch = int(progress.get("processed", checkpoint.get("epoch", 0)))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        upcoming = trainer.current_epoch + 1
        unbounded = trainer.max_epochs is None or trainer.max_epochs < 0
        if upcoming % self.every_n_epochs == 0 and (unbounded or upcoming < trainer.max_epochs):
            self.refresh(trainer, pl_module, upcoming)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log_dict({f"pseudo_labels/{k}": v for k, v in self.stats.items()}, on_step=False,
                           on_epoch=True)

    # -- work --------------------------------------------------------------------------------------
    def refresh(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        """Embed the training split, cluster it, and hand the result on (every rank calls this)."""
        loader = trainer.datamodule.train_eval_dataloader(reveal_targets=True)
        embedding, targets, _ = extract_features(pl_module, loader)
        result = self.cluster(embedding) if trainer.is_global_zero else None
        self.labels, self.centers = trainer.strategy.broadcast(result, src=0)
        self.epoch = epoch
        known = targets.cpu().numpy() if bool((targets >= 0).all()) else None
        self.stats = cluster_statistics(self.labels.numpy(), known)
        rank_zero_info(f"k-means pseudo labels for epoch {epoch}: "
                       + ", ".join(f"{k} {v:.4g}" for k, v in self.stats.items()))
        self.publish(trainer, pl_module, embedding)

    def cluster(self, embedding: Tensor) -> tuple[Tensor, Tensor]:
        """(labels (N,) contiguous ids, centres (K', d)), both on the CPU: this callback's k-means run."""
        labels = kmeans(embedding, self.num_clusters, seed=self.seed, restarts=self.restarts,
                        iterations=self.iterations, backend=self.backend, init=self.init)
        labels = torch.unique(labels, return_inverse=True)[1]
        return labels.cpu(), cluster_centers(embedding.float(), labels, int(labels.max()) + 1, empty=0.0).cpu()

    def publish(self, trainer: L.Trainer, pl_module: L.LightningModule, embedding: Tensor | None) -> None:
        trainer.datamodule.set_pseudo_labels(self.labels)
        setter = getattr(pl_module, "set_pseudo_labels", None)
        if setter is not None:
            setter(self.labels, self.centers, embedding)

    # -- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"labels": self.labels, "centers": self.centers, "epoch": self.epoch, "stats": self.stats}

    def load_state_dict(self, state_dict: dict) -> None:
        self.labels, self.centers = state_dict["labels"], state_dict["centers"]
        self.epoch, self.stats = state_dict["epoch"], dict(state_dict["stats"])
