"""KMeansPseudoLabels: statistics on hand cases, the first batch after a refresh is drawn over the new
labels, and a resumed fit continues exactly (labels, memory bank, weights)."""
import itertools

import lightning as L
import numpy as np
import pytest
import torch

from callbacks import pseudo_labels
from callbacks.pseudo_labels import KMeansPseudoLabels, cluster_statistics, pair_precision
from datamodules.digits import DigitsDataModule
from embedding_core.clusters import cluster_centers
from experiments.train import last_checkpoint
from lightning_modules.tac_ccl import TACCCL


def test_pair_precision_hand_computed():
    # cluster 0 holds classes (0, 0, 1): 2 of its 6 ordered pairs agree; cluster 1 holds (1, 1): 2 of 2
    assert pair_precision(np.array([0, 0, 1, 1, 1]), np.array([0, 0, 0, 1, 1])) == pytest.approx(50.0)


def test_cluster_centers_are_member_means_and_statistics_count_sizes():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]])
    centers = cluster_centers(x, torch.tensor([0, 0, 1]), 2)
    assert torch.equal(centers, torch.tensor([[1.0, 0.0], [5.0, 5.0]]))
    stats = cluster_statistics(np.array([0, 0, 1]), np.array([3, 3, 4]))
    assert stats["size_min"] == 1 and stats["size_max"] == 2 and stats["singletons"] == 1
    assert stats["nmi"] == pytest.approx(100.0) and stats["pair_precision"] == pytest.approx(100.0)


def small_model(**losses) -> TACCCL:
    return TACCCL(backbone="small_cnn", in_chans=1, embedding_dim=16, **losses)


def digits(**kwargs) -> DigitsDataModule:
    return DigitsDataModule(protocol="unseen", batch_size=40, eval_batch_size=512, sampler="pk",
                            samples_per_class=5, **kwargs)


def trainer(epochs: int, *callbacks, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_epochs=epochs, limit_train_batches=1, num_sanity_val_steps=0,
                     logger=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=list(callbacks), **kwargs)


class BatchLabels(L.Callback):
    """Per training batch: the epoch and the batch's pseudo labels as the module sees them, P x K."""

    def __init__(self):
        self.seen: list[tuple[int, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        labels = pl_module.pseudo_labels[batch["index"]].view(-1, trainer.datamodule.samples_per_class)
        self.seen.append((trainer.current_epoch, labels.cpu()))


def test_the_first_batch_after_a_refresh_is_drawn_over_the_new_labels(monkeypatch):
    calls = itertools.count()

    def random_clusters(x, num_clusters, **kwargs):  # a different labelling at every refresh
        return torch.randint(num_clusters, (len(x),), generator=torch.Generator().manual_seed(next(calls)))

    monkeypatch.setattr(pseudo_labels, "kmeans", random_clusters)
    L.seed_everything(0)
    probe = BatchLabels()
    data = digits()
    callback = KMeansPseudoLabels(num_clusters=10, every_n_epochs=2)
    baseline = small_model(ccl_weight=0.0, tac_weight=0.0, feature_weight=0.0)
    trainer(3, callback, probe, limit_val_batches=0, enable_checkpointing=False).fit(baseline, data)
    assert next(calls) == 2  # at fit start (epoch 0) and at the end of epoch 1 (for epoch 2)
    assert [epoch for epoch, _ in probe.seen] == [0, 1, 2]
    for _, labels in probe.seen:  # every row of P x K shares one label under the labels of its epoch
        assert (labels == labels[:, :1]).all()
    assert torch.equal(torch.as_tensor(data.pseudo_labels), callback.labels)


def fit(tmp_path, epochs: int, ckpt_path=None) -> tuple[TACCCL, KMeansPseudoLabels]:
    L.seed_everything(0)
    model, callback = small_model(), KMeansPseudoLabels(num_clusters=8, every_n_epochs=1)
    trainer(epochs, callback, last_checkpoint(str(tmp_path)), limit_val_batches=1).fit(model, digits(),
                                                                                        ckpt_path=ckpt_path)
    return model, callback


def test_resume_continues_with_the_same_labels_bank_and_weights(tmp_path):
    straight, straight_labels = fit(tmp_path / "straight", 2)
    fit(tmp_path / "half", 1)
    resumed, resumed_labels = fit(tmp_path / "resumed", 2, ckpt_path=tmp_path / "half" / "last.ckpt")
    assert torch.equal(resumed_labels.labels, straight_labels.labels) and resumed_labels.epoch == 1
    assert torch.equal(resumed.pseudo_labels, straight.pseudo_labels)
    assert torch.equal(resumed.memory_index, straight.memory_index)
    assert torch.allclose(resumed.memory_embedding, straight.memory_embedding, atol=1e-6)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
