"""Confident sample discovery: nearest class centres on a hand-built 2-D case, the selection rules and
fusion modes, and the callback inside a Snowball fit (doubling, reset per generation, no image picked
twice, state across a resume)."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from callbacks.evaluation import ClassificationEvaluator
from callbacks.sample_discovery import (
    ConfidentSampleDiscovery,
    fused_scores,
    select,
    select_per_class,
)
from datamodules.digits import DigitsDataModule
from datamodules.folder import FolderDataModule
from embedding_core.clusters import cluster_centers
from experiments.train import last_checkpoint
from lightning_modules.snowball import Curriculum, Snowball
from tests.fixtures import write_jpeg

pytestmark = pytest.mark.usefixtures("one_thread")

# rows 0-3: the labeled images (class 0 around (0, 1), class 1 around (10, 1)); rows 4-8: candidates
FEATURES = torch.tensor([[0.0, 0.0], [0.0, 2.0], [10.0, 0.0], [10.0, 2.0],
                         [0.0, 1.5], [9.0, 1.0], [5.5, 1.0], [1.0, 4.0], [10.0, 3.0]])
REFERENCE, REFERENCE_LABELS = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 1, 1])
CANDIDATES = torch.tensor([4, 5, 6, 7, 8])


def test_nearest_centre_labels_and_distances_on_a_hand_built_case():
    centers = cluster_centers(FEATURES[REFERENCE], REFERENCE_LABELS, 3)
    assert centers[:2].tolist() == [[0.0, 1.0], [10.0, 1.0]] and centers[2].isnan().all()  # class 2: no labels
    labels, scores = fused_scores([FEATURES], REFERENCE, REFERENCE_LABELS, CANDIDATES, num_classes=3)
    assert labels.tolist() == [0, 1, 1, 0, 1]
    assert scores.tolist() == pytest.approx([0.5, 1.0, 4.5, math.sqrt(10), 2.0])


def test_selection_rules_pick_distinct_rows():
    _, scores = fused_scores([FEATURES], REFERENCE, REFERENCE_LABELS, CANDIDATES, num_classes=2)
    assert CANDIDATES[select(scores, 2, "min")].tolist() == [4, 5]  # the nearest to their centres
    assert CANDIDATES[select(scores, 2, "max")].tolist() == [6, 7]
    # MixMatch variant: of the 3 x 1 most confident (4, 5, 8), the least confident one
    assert CANDIDATES[select(scores, 1, "min_then_max", pool_factor=3)].tolist() == [8]
    picked = select(scores, 4, "random", generator=torch.Generator().manual_seed(0))
    assert len(set(picked.tolist())) == 4
    assert len(select(scores, 10, "min")) == 5  # never more than the candidates, each once
    labels = torch.tensor([0, 1, 1, 0, 1])
    assert sorted(CANDIDATES[select_per_class(scores, labels, 2, 2, rule="min")].tolist()) == [4, 5]
    ties = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert select(ties, 3, "min").tolist() == [1, 3, 0]  # ties to the lower position


def test_fusion_modes():
    shifted = FEATURES.clone()
    shifted[6] = torch.tensor([1.0, 1.0])  # the newer model puts candidate 6 next to class 0
    both = [FEATURES, shifted]
    labels, scores = fused_scores(both, REFERENCE, REFERENCE_LABELS, CANDIDATES, 2, "avg_distance")
    assert labels[2].item() == 0 and scores[2].item() == pytest.approx((5.5 + 1.0) / 2)  # centre 0: 5.5 and 1
    labels, _ = fused_scores([FEATURES, FEATURES], REFERENCE, REFERENCE_LABELS, CANDIDATES, 2, "cascade")
    assert labels.tolist() == [0, 1, 1, 0, 1]
    labels, scores = fused_scores([FEATURES, shifted], REFERENCE, REFERENCE_LABELS, CANDIDATES, 2, "avg_rank")
    assert labels[2].item() == 0  # a 1-1 vote goes to the newest model
    # ranks of the nearest-centre distances: [0, 1, 4, 3, 2] and [0, 1, 2, 4, 3] (ties in index order)
    assert scores.tolist() == pytest.approx([0.0, 1.0, 3.0, 3.5, 2.5])


def snowball_fit(tmp_path, max_epochs: int, ckpt_path=None):
    """Snowball on a 20 % digits training split (359 images, 3 labels per class): no phase 0, 2 generations
    x 2 iterations of 1 epoch, one training batch and one validation batch each."""
    L.seed_everything(0)
    model = Snowball(backbone="small_cnn", in_chans=1, curriculum=Curriculum(0, 1, 2, 2), rampup_steps=2)
    data = DigitsDataModule(protocol="semi", labels_per_class=3, test_fraction=0.8, batch_size=64,
                            labeled_batch_size=16, eval_batch_size=128, unlabeled_includes_labeled=True)
    discovery = ConfidentSampleDiscovery()
    trainer = L.Trainer(accelerator="cpu", max_epochs=max_epochs, limit_train_batches=1, limit_val_batches=1,
                        num_sanity_val_steps=0,
                        callbacks=[ClassificationEvaluator(), discovery, last_checkpoint(str(tmp_path / "ckpt"))],
                        logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return discovery, data


@pytest.mark.filterwarnings("ignore:trainer.max_epochs 2 stops the run")
def test_discovery_doubles_the_labeled_set_resets_each_generation_and_survives_a_resume(tmp_path):
    straight, data = snowball_fit(tmp_path / "straight", max_epochs=4)
    original = set(DigitsDataModule(protocol="semi", labels_per_class=3, test_fraction=0.8).labeled_indices)
    steps = [(h["generation"], h["iteration"], h["count"], h["labeled"]) for h in straight.history]
    assert steps == [(1, 1, 30, 60), (1, 2, 60, 120), (2, 1, 30, 60), (2, 2, 60, 120)]
    for generation in (1, 2):
        found = [i for h in straight.history if h["generation"] == generation for i in h["index"]]
        assert len(found) == len(set(found)) == 90 and not set(found) & original  # no image picked twice
    assert all(0 <= h["error"] <= 100 for h in straight.history)
    last = straight.history[-2:]  # generation 2: the labeled set = the original labels + its discoveries
    assert set(data.labeled_indices.tolist()) == original | {i for h in last for i in h["index"]}
    table = dict(zip(data.labeled_indices.tolist(), data.labeled_targets.tolist()))
    assert all(table[i] == label for h in last for i, label in zip(h["index"], h["label"]))
    assert (tmp_path / "straight" / "discovery.json").is_file()

    # the checkpoint of epoch 1 is written at its validation end, before the discovery for epoch 2
    snowball_fit(tmp_path / "half", max_epochs=2)
    resumed, resumed_data = snowball_fit(tmp_path / "resumed", max_epochs=4,
                                         ckpt_path=tmp_path / "half" / "ckpt" / "last.ckpt")
    assert [(h["generation"], h["iteration"], h["index"]) for h in resumed.history] == \
        [(h["generation"], h["iteration"], h["index"]) for h in straight.history]
    assert resumed_data.labeled_indices.tolist() == data.labeled_indices.tolist()


def test_bad_options_name_the_fix():
    with pytest.raises(ValueError, match="rule 'closest'"):
        ConfidentSampleDiscovery(rule="closest")
    with pytest.raises(ValueError, match="leave fusion none"):
        ConfidentSampleDiscovery(selector="softmax_confidence", fusion="cascade")


def test_discovery_caps_n_at_the_pool_left_and_the_heads_come_from_the_folder_classes(tmp_path):
    """3 class folders x 8 images, 18 training images, 2 labels per class: the doublings ask for +6, +12, +18
    but only 12, then 6, then 0 unlabeled images are left (the 40-class run that died at epoch 29)."""
    for c in range(3):
        for i in range(8):
            write_jpeg(tmp_path / "data" / f"class_{c}" / f"{i}.jpg", 8 * c + i, size=(8, 8))
    L.seed_everything(0)
    model = Snowball(backbone="small_cnn", curriculum=Curriculum(0, 1, 1, 3), rampup_steps=2)  # no num_classes
    data = FolderDataModule(root=str(tmp_path / "data"), protocol="semi", test_fraction=0.25, labels_per_class=2,
                            batch_size=6, eval_batch_size=8, image_size=8, train_transform="weak",
                            eval_transform="plain", unlabeled_includes_labeled=True)
    discovery = ConfidentSampleDiscovery()
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, limit_train_batches=1, num_sanity_val_steps=0,
                        callbacks=[ClassificationEvaluator(), discovery], logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, default_root_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="6 unlabeled images left, fewer than the 12 asked for") as caught:
        trainer.fit(model, data)
    assert any("0 unlabeled images left, fewer than the 18" in str(w.message) for w in caught)
    assert [(h["count"], h["labeled"]) for h in discovery.history] == [(6, 12), (6, 18), (0, 18)]
    assert sorted(data.labeled_indices.tolist()) == list(range(18))  # the whole pool, each image once
    assert model.num_classes == 3 and model.head.out_features == model.master.head.out_features == 3


def test_a_class_count_that_contradicts_the_data_names_the_fix():
    model = Snowball(backbone="small_cnn", in_chans=1, num_classes=12)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="10 training classes but model num_classes is 12: drop"):
        trainer.fit(model, DigitsDataModule(protocol="semi", labels_per_class=3))
