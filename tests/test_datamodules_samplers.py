"""P x K sampling over true or pseudo labels (re-keyable, distributed-aware), subset sampling, and how
both behave inside a real Lightning fit."""
from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from datamodules.base import DatasetSizeWarning
from datamodules.cub import CUBDataModule
from datamodules.digits import DigitsDataModule
from datamodules.samplers import PKSampler, SubsetSampler, with_draws
from tests import fixtures as F

# 12 classes of uneven size, two of them smaller than K = 4 (drawn with replacement)
LABELS = np.repeat(np.arange(12), [9, 7, 2, 12, 5, 8, 3, 10, 6, 4, 11, 7])


def batches(sampler: PKSampler) -> list[list[int]]:
    indices = [index for index, _ in sampler]
    return [indices[i:i + sampler.batch_size] for i in range(0, len(indices), sampler.batch_size)]


def test_every_batch_holds_p_classes_of_k_images():
    sampler = PKSampler(LABELS, classes_per_batch=3, samples_per_class=4, seed=1)
    assert len(sampler) == (len(LABELS) // 12) * 12
    for batch in batches(sampler):
        classes, counts = np.unique(LABELS[batch], return_counts=True)
        assert len(classes) == 3 and (counts == 4).all()


def test_two_ranks_get_disjoint_batches_of_equal_length():
    for epoch in range(3):
        per_rank = []
        for rank in (0, 1):
            sampler = PKSampler(LABELS, 3, 4, num_replicas=2, rank=rank, seed=5)
            sampler.set_epoch(epoch)
            per_rank.append(batches(sampler))
            for batch in per_rank[-1]:
                classes, counts = np.unique(LABELS[batch], return_counts=True)
                assert len(classes) == 3 and (counts == 4).all()
        assert len(per_rank[0]) == len(per_rank[1]) == len(LABELS) // (12 * 2)
        seen = [{i for batch in rank_batches for i in batch} for rank_batches in per_rank]
        assert not seen[0] & seen[1]


def test_set_epoch_reshuffles_deterministically_and_repeats_get_fresh_draws():
    def order(epoch: int, seed: int = 0) -> list[tuple[int, int]]:
        sampler = PKSampler(LABELS, 3, 4, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(2) == order(2) and order(2) != order(3) and order(2, seed=1) != order(2)
    pairs = order(0)
    assert len(set(pairs)) == len(pairs)  # an image drawn twice has two different draw numbers


def test_set_labels_rekeys_the_sampler_without_changing_its_length():
    sampler = PKSampler(LABELS, 3, 4)
    length = len(sampler)
    pseudo = np.arange(len(LABELS)) % 5
    sampler.set_labels(pseudo)
    assert len(sampler) == length
    for batch in batches(sampler):
        assert len(np.unique(pseudo[batch])) == 3
    unassigned = pseudo.copy()
    unassigned[:20] = -1
    sampler.set_labels(unassigned)
    assert all(i >= 20 for batch in batches(sampler) for i in batch)
    with pytest.raises(ValueError, match="labels for"):
        sampler.set_labels(pseudo[:-1])


def test_pk_sampler_errors_name_the_fix():
    with pytest.raises(RuntimeError, match="set_pseudo_labels"):
        list(PKSampler(None, 3, 4, dataset=range(40)))
    with pytest.raises(ValueError, match="fewer than P=5"):
        list(PKSampler(np.arange(40) % 4, 5, 2))
    with pytest.raises(ValueError, match="make no batch"):
        PKSampler(LABELS, 20, 6)


def test_subset_sampler_shards_and_cycles_with_fresh_draws():
    subset = np.array([3, 5, 8, 13, 21])
    one_pass = [list(SubsetSampler(range(30), subset, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(one_pass[0]) == len(one_pass[1]) == 2
    assert not {i for i, _ in one_pass[0]} & {i for i, _ in one_pass[1]}
    cycled = list(SubsetSampler(range(30), lambda: subset, num_samples=12))
    assert len(cycled) == 12 and {i for i, _ in cycled} == set(subset.tolist())
    assert len(set(cycled)) == 12  # a repeated index always carries a new draw number
    assert with_draws(np.array([4, 4, 1, 4])) == [(4, 0), (4, 1), (1, 0), (4, 2)]


def test_datamodule_pk_batches_follow_pseudo_labels_and_keep_targets_hidden(tmp_path):
    dm = CUBDataModule(root=str(F.write_cub(tmp_path, class_ids=(1, 2, 3, 4, 101), per_class=3)),
                       image_size=16, batch_size=4, sampler="pk", samples_per_class=2, allow_partial=True)
    with pytest.warns(DatasetSizeWarning):
        dm.setup()
    loader = dm.train_dataloader()  # built before any pseudo label exists, as Lightning does
    assert len(loader) == 12 // 4
    dm.set_pseudo_labels(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]))
    for batch in loader:
        pseudo = dm.pseudo_labels[batch["index"].numpy()]
        assert sorted(np.unique(pseudo, return_counts=True)[1].tolist()) == [2, 2]
        assert (batch["target"] == -1).all()
    restored = CUBDataModule(root=dm.root, image_size=16, batch_size=4, sampler="pk", samples_per_class=2,
                             allow_partial=True)
    with pytest.warns(DatasetSizeWarning):
        restored.load_state_dict(dm.state_dict())
    assert restored.pseudo_labels.tolist() == dm.pseudo_labels.tolist()
    with pytest.raises(ValueError, match="not a multiple of samples_per_class"):
        CUBDataModule(root=dm.root, batch_size=5, sampler="pk", samples_per_class=2,
                      allow_partial=True).train_dataloader()
    with pytest.raises(ValueError, match="1 clusters, but a P x K batch draws P = 2 .* use at least 2 clusters"):
        dm.set_pseudo_labels(torch.tensor([0] * 10 + [-1, -1]))  # one cluster (and two unassigned)


def test_supervised_pk_uses_true_labels(tmp_path):
    dm = CUBDataModule(root=str(F.write_cub(tmp_path, class_ids=(1, 2, 3, 4, 101), per_class=3)),
                       image_size=16, batch_size=6, sampler="pk", samples_per_class=3, supervised=True,
                       allow_partial=True)
    with pytest.warns(DatasetSizeWarning):
        batch = next(iter(dm.train_dataloader()))
    targets, counts = np.unique(batch["target"].numpy(), return_counts=True)
    assert len(targets) == 2 and (counts == 3).all()


class Recorder(L.LightningModule):
    """Records the training batches; the loss is a dummy."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, dict]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch))
        return (self.weight - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class PseudoLabeler(L.Callback):
    """Sets pseudo labels before the first epoch and re-keys them at epoch 1, as a k-means callback does."""

    def __init__(self, n: int):
        self.labels = {0: np.arange(n) % 10, 1: np.arange(n) // (n // 10)}

    def on_fit_start(self, trainer, pl_module):
        trainer.datamodule.set_pseudo_labels(self.labels[0])

    def on_train_epoch_start(self, trainer, pl_module):
        trainer.datamodule.set_pseudo_labels(self.labels[min(trainer.current_epoch, 1)])


def fit(dm, callbacks=(), epochs: int = 2, **trainer_args) -> Recorder:
    model = Recorder()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
                        callbacks=list(callbacks), **trainer_args)
    trainer.fit(model, datamodule=dm)
    return model


def test_pk_sampler_inside_lightning_sees_relabelling_from_the_next_epoch():
    dm = DigitsDataModule(batch_size=40, sampler="pk", samples_per_class=4)
    dm.setup()
    labeler = PseudoLabeler(len(dm.splits["train"]))
    model = fit(dm, [labeler], limit_train_batches=4)
    for epoch, batch in model.seen:
        pseudo = labeler.labels[epoch][batch["index"].numpy()]
        assert (np.unique(pseudo, return_counts=True)[1] == 4).all() and len(np.unique(pseudo)) == 10
        assert (batch["target"] == -1).all()
    assert [epoch for epoch, _ in model.seen] == [0] * 4 + [1] * 4


def test_resumed_fit_with_workers_replays_the_same_batches(tmp_path):
    """A resumed fit builds its first loader iterator (and worker copies of the dataset) before Lightning
    calls set_epoch; the loader must already start at the resumed epoch."""

    def run(name: str, epochs: int, ckpt_path=None) -> Recorder:
        model = Recorder()
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / name, save_last=True)
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                            callbacks=[checkpoint], enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, num_sanity_val_steps=0, limit_train_batches=2,
                            use_distributed_sampler=False)
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=16, num_workers=1), ckpt_path=ckpt_path)
        return model

    straight = run("straight", 2)
    run("half", 1)
    resumed = run("resumed", 2, ckpt_path=tmp_path / "half" / "last.ckpt")
    expected = [batch for epoch, batch in straight.seen if epoch == 1]
    assert len(resumed.seen) == len(expected) == 2
    for (_, got), want in zip(resumed.seen, expected):
        assert torch.equal(got["index"], want["index"]) and torch.equal(got["views"][0], want["views"][0])
