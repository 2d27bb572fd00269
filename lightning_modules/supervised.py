"""Metric learning on class labels: the baseline SAN is added to (dissertation ch. 5; docs/methods/san.md).

    L = L_batch(z, y) + memory_weight L_memory(z, y; queue of momentum keys)

L_batch is pytorch-metric-learning's Multi-Similarity loss with its miner (`loss: ms`) or Proxy-Anchor
(`loss: proxy_anchor`, the proxies a submodule `proxies`, lr via `optim.lr_mult`). The memory is MoCo's:
a key network, the EMA of the whole network (SAN included), embeds the same augmented batch without
gradient; its keys go to a FIFO queue of capacity N_train that is read by dataset index (so labels are
always the current ones) and compared with the queries before the new keys enter (MoCo order).

Labels (`labels`):
  target: the true training labels. This is the ONE family of configs that reads training labels: the
    datamodule must reveal them (`data.init_args.supervised: true`); hidden (-1) targets stop the run.
  pseudo: k-means labels from `callbacks.pseudo_labels.KMeansPseudoLabels` through `set_pseudo_labels`
    (the unsupervised setting, TAC-CCL's pipeline); batch targets are never read.

The queue is pre-filled with a key-network pass over the training split at fit start (true labels), or
with the clustered embeddings at every k-means refresh (pseudo labels).

Why not PML's `CrossBatchMemory`: it stores labels by value (stale after a k-means refresh), enqueues the
keys before it scores the queries, keeps its cursor outside the state dict (a resume would restart it) and
does not gather keys across DDP ranks; the queue here does those four, and its loss is PML's.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor

from embedding_core.features import extract_features
from lightning_modules.base import EmbeddingModule
from lightning_modules.losses import (
    cbml_loss,
    contrastive_memory_loss,
    gradient_shares,
    multi_similarity_loss,
    proxy_anchor,
    proxy_anchor_loss,
)
from lightning_modules.memory import IndexedMemory

LOSSES = ("ms", "proxy_anchor")
MEMORY_LOSSES = ("cbml", "contrastive", "ms")
LABEL_SOURCES = ("target", "pseudo")


class MetricLearning(IndexedMemory, EmbeddingModule):
    """Trunk -> head (L2) trained by a metric loss on true or pseudo labels, with an optional momentum memory.

    loss: ms | proxy_anchor. ms_alpha, ms_beta, ms_threshold, ms_margin: MS α, β, λ, ε (MS code: 2, 40,
      0.5, 0.1). pa_alpha, pa_margin: Proxy-Anchor α, δ (PA code: 32, 0.1). num_classes: the proxies' count
      (None: the training split's class count).
    memory_weight: weight of the memory term (0 = no memory, no key network); memory_loss: cbml (the
      contrastive Bayesian loss the dissertation cites as [126], `losses.cbml_loss`; its variance term over
      the queue summed or averaged, `cbml_variance`) | contrastive (XBM's, margin `memory_margin`) | ms; the
      key network's EMA momentum m is the base's `ema_decay`. See docs/methods/san.md.
    labels: target | pseudo (see the module docstring).
    """

    def __init__(self, loss: str = "ms", ms_alpha: float = 2.0, ms_beta: float = 40.0, ms_threshold: float = 0.5,
                 ms_margin: float = 0.1, pa_alpha: float = 32.0, pa_margin: float = 0.1,
                 num_classes: int | None = None, memory_weight: float = 1.0, memory_loss: str = "contrastive",
                 memory_margin: float = 0.5, labels: str = "target", cbml_variance: str = "sum", **kwargs):
        super().__init__(**kwargs)
        for name, value, allowed in (("loss", loss, LOSSES), ("memory_loss", memory_loss, MEMORY_LOSSES),
                                     ("labels", labels, LABEL_SOURCES)):
            if value not in allowed:
                raise ValueError(f"{name} {value!r}: use one of {', '.join(allowed)}")
        if loss == "proxy_anchor" and labels == "pseudo":
            raise ValueError("Proxy-Anchor needs a fixed class count: use loss=ms with labels=pseudo")
        self.loss_name, self.labels_from, self.memory_loss = loss, labels, memory_loss
        self.pa = {"alpha": pa_alpha, "margin": pa_margin}
        self.ms = {"alpha": ms_alpha, "beta": ms_beta, "threshold": ms_threshold, "margin": ms_margin}
        if cbml_variance not in ("sum", "mean"):
            raise ValueError(f"cbml_variance {cbml_variance!r}: use sum or mean")
        self.memory_weight, self.memory_margin, self.cbml_variance = memory_weight, memory_margin, cbml_variance
        self.proxies: torch.nn.Module | None = None
        if loss == "proxy_anchor" and num_classes is not None:
            self.proxies = proxy_anchor_loss(num_classes, embedding_dim(self), **self.pa)
        self.register_buffer("pseudo_labels", torch.zeros(0, dtype=torch.long))
        self.register_buffer("train_labels", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_memory(embedding_dim(self))
        keys = (("key_trunk", "trunk"), ("key_center", "center"), ("key_head", "head"))
        self.ema_pairs = keys if memory_weight else ()
        if memory_weight:
            self.make_key_network()

    # -- network --------------------------------------------------------------------------------
    def make_key_network(self) -> None:
        """(Re)make the key network as a frozen copy of the current one (call again after changing it)."""
        if not self.memory_weight:
            return
        self.key_trunk, self.key_center, self.key_head = map(copy.deepcopy, (self.trunk, self.center, self.head))
        for p in (*self.key_trunk.parameters(), *self.key_head.parameters()):
            p.requires_grad_(False)

    @torch.no_grad()
    def key_embed(self, images: Tensor) -> Tensor:
        return self.key_head(self.key_center(self.key_trunk(images))).float()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.trainer.datamodule
        if self.loss_name == "proxy_anchor" and self.proxies is None:
            classes = dm.num_classes["train"]
            self.proxies = proxy_anchor_loss(classes, embedding_dim(self), **self.pa).to(self.device)
        if stage == "fit" and self.labels_from == "target" and not getattr(dm, "supervised", False):
            raise ValueError("labels=target trains on the true training labels: the datamodule hides them; "
                             "pass --data.init_args.supervised=true (the supervised configs do), or use "
                             "labels=pseudo with callbacks.pseudo_labels.KMeansPseudoLabels")

    # -- labels and memory ----------------------------------------------------------------------
    def set_pseudo_labels(self, labels: Tensor, centers: Tensor, embedding: Tensor | None = None) -> None:
        """k-means labels (N,) (centres unused); `embedding` (N, d), the clustered embeddings, refills the
        queue (None on a resume, whose queue comes from the checkpoint)."""
        if self.labels_from != "pseudo":
            raise RuntimeError("pseudo labels given to a labels=target model: drop KMeansPseudoLabels from the "
                               "callbacks, or set labels=pseudo")
        self.pseudo_labels = torch.as_tensor(labels).to(self.device, torch.long)
        if embedding is not None:
            self.fill_memory(embedding)

    def fill_memory(self, embedding: Tensor) -> None:
        if self.memory_weight:
            self.refill_memory(embedding)

    def on_fit_start(self) -> None:
        """True labels: the training split's targets by index, and the queue pre-filled by the key network."""
        if self.labels_from != "target":
            return
        dm = self.trainer.datamodule
        if getattr(dm, "supervised", None) is False:
            raise ValueError("labels=target but the training labels are hidden (-1): pass "
                             "--data.init_args.supervised=true")
        self.train_labels = torch.as_tensor(dm.splits["train"].targets).to(self.device, torch.long)
        if self.memory_weight and len(self.memory_index) == 0:
            embedding, _, index = extract_features(self, dm.train_eval_dataloader(), forward=self.key_embed)
            self.fill_memory(embedding[index.argsort()])

    def memory_labels(self) -> Tensor:
        table = self.pseudo_labels if self.labels_from == "pseudo" else self.train_labels
        return table[self.memory_index]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.resize_buffers_from(checkpoint, ("memory_embedding", "memory_index", "pseudo_labels"))

    # -- training -------------------------------------------------------------------------------
    def batch_labels(self, batch: dict) -> Tensor:
        if self.labels_from == "pseudo":
            if len(self.pseudo_labels) == 0:
                raise RuntimeError("labels=pseudo but no pseudo labels were set: add callbacks.pseudo_labels."
                                   "KMeansPseudoLabels to trainer.callbacks (it sets them before the first epoch)")
            return self.pseudo_labels[batch["index"]]
        return batch["target"]  # revealed: on_fit_start checked the datamodule's setting (no per-step sync)

    def extra_terms(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(weighted loss terms, diagnostics to log) a subclass adds after the forward (SAN's regularisers)."""
        return {}, {}

    def gradient_diagnostics(self, metric: dict[str, Tensor], extra: dict[str, Tensor], z: Tensor) -> dict[str, Tensor]:
        """train/grad_share/<term>: each weighted metric term's share of the gradient at the embeddings, when
        there are two (`losses.gradient_shares`). `extra` (the subclass's terms) is for subclasses' shares."""
        if len(metric) < 2 or not torch.is_grad_enabled():
            return {}
        return {f"grad_share/{k}": v for k, v in gradient_shares(metric, z).items()}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images, index = batch["views"][0], batch["index"]
        labels = self.batch_labels(batch)
        z = self(images).float()
        if self.loss_name == "ms":
            terms = {"ms": multi_similarity_loss(z, labels, **self.ms)}
        else:
            terms = {"proxy_anchor": proxy_anchor(self.proxies, z, labels)}
        weighted = dict(terms)
        if self.memory_weight:
            keys = self.key_embed(images)
            queue_labels = self.memory_labels()
            if self.memory_loss == "cbml":
                terms["memory"] = cbml_loss(z, labels, self.memory_embedding, queue_labels,
                                            variance=self.cbml_variance)
            elif self.memory_loss == "contrastive":
                terms["memory"] = contrastive_memory_loss(z, labels, self.memory_embedding, queue_labels,
                                                          self.memory_margin)
            else:
                terms["memory"] = multi_similarity_loss(z, labels, self.memory_embedding, queue_labels, **self.ms)
            weighted["memory"] = self.memory_weight * terms["memory"]
            self.enqueue(keys, index)
        extra, logged = self.extra_terms()
        loss = sum(weighted.values()) + sum(extra.values())
        logged.update(self.gradient_diagnostics(weighted, extra, z))
        self.log_terms({"loss": loss, **terms, **logged}, embedding=z)
        return loss


def embedding_dim(module: EmbeddingModule) -> int:
    return module.head.linear.out_features
