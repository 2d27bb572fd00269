"""The semi-supervised protocol: seeded labeled split, labeled/unlabeled loaders, the add_labeled /
reset_labeled hooks, resume state, and the combined loader inside a Lightning fit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.base import DatasetSizeWarning, draw_labeled
from datamodules.cifar import CIFAR10DataModule
from datamodules.digits import DigitsDataModule
from datamodules.svhn import SVHNDataModule
from tests import fixtures as F
from tests.test_datamodules_samplers import fit


def semi_cifar(tmp_path, **kwargs) -> CIFAR10DataModule:
    dm = CIFAR10DataModule(root=str(F.write_cifar10(tmp_path, per_class=5)), protocol="semi",
                           labels_per_class=2, batch_size=8, labeled_batch_size=4, train_transform="weak",
                           allow_partial=True, **kwargs)
    with pytest.warns(DatasetSizeWarning):
        dm.setup()
    return dm


def test_labeled_split_is_balanced_seeded_and_the_rest_is_unlabeled(tmp_path):
    dm = semi_cifar(tmp_path)
    targets = dm.splits["train"].targets
    assert np.bincount(targets[dm.labeled_indices]).tolist() == [2] * 10
    assert dm.labeled_targets.tolist() == targets[dm.labeled_indices].tolist()
    assert sorted([*dm.labeled_indices, *dm.unlabeled_indices]) == list(range(50))
    assert dm.eval_roles == ["query"] and len(dm.splits["query"]) == 20
    again = draw_labeled(targets, 2, seed=0)
    assert again.tolist() == dm.labeled_indices.tolist()
    assert draw_labeled(targets, 2, seed=1).tolist() != again.tolist()
    everything = semi_cifar(tmp_path / "all", unlabeled_includes_labeled=True)
    assert everything.unlabeled_indices.tolist() == list(range(50))
    with pytest.raises(ValueError, match="fewer than labels_per_class=6"):
        draw_labeled(targets, 6, seed=0)


def test_labeled_loader_reveals_targets_and_unlabeled_loader_hides_them(tmp_path):
    dm = semi_cifar(tmp_path)
    loaders = dm.train_dataloader()
    assert set(loaders) == {"labeled", "unlabeled"}
    unlabeled, labeled = list(loaders["unlabeled"]), list(loaders["labeled"])
    assert len(unlabeled) == len(labeled) == 30 // 8  # the 20 labeled images are cycled to match
    for batch in unlabeled:
        assert (batch["target"] == -1).all() and len(batch["views"]) == 2
        assert not set(batch["index"].tolist()) & set(dm.labeled_indices.tolist())
    truth = dm.splits["train"].targets
    for batch in labeled:
        assert batch["views"][0].shape == (4, 3, 32, 32)
        assert set(batch["index"].tolist()) <= set(dm.labeled_indices.tolist())
        assert batch["target"].tolist() == truth[batch["index"].numpy()].tolist()


def test_a_cycled_labeled_image_gets_a_fresh_augmentation(tmp_path):
    dm = CIFAR10DataModule(root=str(F.write_cifar10(tmp_path, per_class=5)), protocol="semi",
                           labels_per_class=1, batch_size=10, labeled_batch_size=10, train_transform="npid",
                           num_views=1, allow_partial=True)
    with pytest.warns(DatasetSizeWarning):
        batches = list(dm.labeled_dataloader())  # 10 labeled images, 4 batches: each image drawn 4 times
    views: dict[int, list[torch.Tensor]] = {}
    for batch in batches:
        for index, view in zip(batch["index"].tolist(), batch["views"][0]):
            views.setdefault(index, []).append(view)
    assert all(len(v) == 4 for v in views.values())
    assert all(not torch.equal(v[0], v[1]) for v in views.values())


def test_add_labeled_grows_the_labeled_loader_and_reset_restores_it(tmp_path):
    dm = semi_cifar(tmp_path)
    loader = dm.labeled_dataloader()  # built once, like Lightning's; sees later additions
    drawn = dm.labeled_indices.copy()
    new = dm.unlabeled_indices[:6]
    dm.add_labeled(new, torch.full((6,), 7))
    assert sorted(dm.labeled_indices.tolist()) == sorted([*drawn.tolist(), *new.tolist()])
    assert (dm.labeled_targets[np.isin(dm.labeled_indices, new)] == 7).all()
    assert dm.unlabeled_indices.tolist()[:6] == new.tolist()  # discovered images stay in the unlabeled pool
    indices = torch.cat([b["index"] for b in loader])
    targets = torch.cat([b["target"] for b in loader])
    assert set(indices.tolist()) <= set(dm.labeled_indices.tolist())
    assert (targets[np.isin(indices.numpy(), new)] == 7).all()
    state = dm.state_dict()
    dm.reset_labeled()
    assert dm.labeled_indices.tolist() == drawn.tolist()
    dm.load_state_dict(state)
    assert len(dm.labeled_indices) == 26


def test_add_labeled_rejects_bad_calls_with_the_fix(tmp_path):
    dm = semi_cifar(tmp_path)
    with pytest.raises(ValueError, match="already have a label"):
        dm.add_labeled(dm.labeled_indices[:1], [0])
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.9"):
        dm.add_labeled(dm.unlabeled_indices[:1], [10])
    with pytest.raises(ValueError, match="distinct"):
        dm.add_labeled([dm.unlabeled_indices[0]] * 2, [1, 1])
    with pytest.raises(RuntimeError, match="--data.protocol semi"):
        CIFAR10DataModule(root=dm.root).add_labeled([0], [0])
    with pytest.raises(ValueError, match="leave supervised=False"):
        CIFAR10DataModule(protocol="semi", supervised=True)


def test_svhn_semi_uses_weak_augmentation_without_flip(tmp_path):
    dm = SVHNDataModule(root=str(F.write_svhn(tmp_path, per_class=4)), protocol="semi", labels_per_class=1,
                        batch_size=10, train_transform="weak", drop_ops=["flip"], allow_partial=True)
    with pytest.warns(DatasetSizeWarning):
        batch = next(iter(dm.train_dataloader()["labeled"]))
    assert batch["views"][0].shape == (10, 3, 32, 32)
    assert not any(type(op).__name__ == "RandomHorizontalFlip" for op in dm.train_transform.transforms)


def test_semi_loaders_inside_lightning():
    dm = DigitsDataModule(protocol="semi", labels_per_class=5, batch_size=256, labeled_batch_size=32)
    model = fit(dm, epochs=1)
    assert len(model.seen) == len(dm.unlabeled_indices) // 256
    for _, batch in model.seen:
        assert (batch["unlabeled"]["target"] == -1).all() and (batch["labeled"]["target"] >= 0).all()
        assert batch["labeled"]["views"][0].shape == (32, 1, 8, 8)
