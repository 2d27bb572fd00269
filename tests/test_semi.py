"""Semi-supervised base: MixMatch's sharpening and MixUp, the consistency loss, the ramps and the EMA rule
on hand-computed cases; the labeled split of digits; the Snowball curriculum and lr restarts."""
from __future__ import annotations

import copy
import math

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from datamodules.digits import DigitsDataModule
from lightning_modules.base import Schedule, ema_update
from lightning_modules.semi import (
    SemiSupervised,
    batch_cross_entropy,
    ema_decay_at,
    linear_rampup,
    mixup,
    probability_mse,
    sharpen,
    sigmoid_rampup,
    soft_cross_entropy,
    softmax_mse,
)
from lightning_modules.snowball import Curriculum, Snowball


def test_sharpen_hand_computed():
    p = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.2, 0.8]])
    # T = 0.5 squares: 0.36 / (0.36 + 0.16), 0.16 / 0.52
    expected = torch.tensor([[0.36 / 0.52, 0.16 / 0.52], [0.5, 0.5], [0.04 / 0.68, 0.64 / 0.68]])
    assert torch.allclose(sharpen(p, 0.5), expected)
    assert torch.allclose(sharpen(p, 1.0), p)
    assert sharpen(p, 0.05)[0, 0] > 0.99  # T -> 0 tends to one-hot


def test_mixup_keeps_each_row_closer_to_itself():
    x = torch.tensor([[0.0], [10.0], [4.0]])
    y = torch.eye(3)
    lam = torch.tensor([0.3, 0.8, 0.5])  # lam' = max(lam, 1 - lam) = 0.7, 0.8, 0.5
    partner = torch.tensor([1, 0, 2])
    mixed_x, mixed_y = mixup(x, y, lam, partner)
    assert mixed_x.squeeze(1).tolist() == pytest.approx([0.7 * 0 + 0.3 * 10, 0.8 * 10 + 0.2 * 0, 4.0])
    assert torch.allclose(mixed_y, torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.8, 0.0], [0.0, 0.0, 1.0]]))
    images = torch.arange(2 * 3 * 2 * 2, dtype=torch.float).view(2, 3, 2, 2)
    mixed_images, _ = mixup(images, torch.eye(2), torch.tensor([0.25, 1.0]), torch.tensor([1, 0]))
    assert torch.allclose(mixed_images[0], 0.75 * images[0] + 0.25 * images[1])
    assert torch.equal(mixed_images[1], images[1])


def test_consistency_and_mixmatch_losses_hand_computed():
    a = torch.tensor([[0.0, 0.0]])
    b = torch.tensor([[math.log(3.0), 0.0]])  # softmax (0.75, 0.25)
    assert softmax_mse(a, b).item() == pytest.approx(0.0625)  # mean over classes of 0.25^2
    assert softmax_mse(b, b).item() == 0.0
    assert probability_mse(a, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.25)
    assert soft_cross_entropy(b, torch.tensor([[0.5, 0.5]])).item() == pytest.approx(
        -0.5 * (math.log(0.75) + math.log(0.25)))
    logits = torch.zeros(1, 2, requires_grad=True)
    softmax_mse(logits, b.requires_grad_()).backward()
    assert b.grad is None  # the target side is a constant


def test_ramps():
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(10, 10) == sigmoid_rampup(3, 0) == 1.0
    assert linear_rampup(4, 16) == 0.25 and linear_rampup(20, 16) == linear_rampup(0, 0) == 1.0


def test_ema_rule_and_teacher_decay_schedule():
    # MT: a true average over the first steps, 0.99 during the ramp-up, 0.999 after it
    assert ema_decay_at(1, 0.999, 0.99, 100) == 0.5
    assert ema_decay_at(5, 0.999, 0.99, 100) == pytest.approx(1 - 1 / 6)
    assert ema_decay_at(150, 0.999, 0.99, 200) == 0.99
    assert ema_decay_at(5000, 0.999, 0.99, 100) == 0.999
    teacher, student = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        student.weight.fill_(3.0)
        student.running_mean.fill_(7.0)
    ema_update(teacher, student, 0.75)
    assert teacher.weight.tolist() == [1.5, 1.5]  # 0.75 * 1 + 0.25 * 3
    assert teacher.running_mean.tolist() == [7.0, 7.0]  # BN statistics copied from the student


def test_teacher_and_master_are_outside_the_optimizer():
    model = Snowball(backbone="small_cnn", in_chans=1, num_classes=10)
    names = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"trunk", "head"}
    assert [p.shape for p in model.teacher.parameters()] == [p.shape for p in model.student.parameters()]
    two = SemiSupervised(backbone="small_cnn", in_chans=1, num_classes=10, two_heads=True)
    logits, consistency = two.student(torch.randn(3, 1, 8, 8))
    assert logits.shape == consistency.shape == (3, 10) and not torch.equal(logits, consistency)
    with pytest.raises(ValueError, match="report_model 'master'"):
        SemiSupervised(backbone="small_cnn", in_chans=1, report_model="master")


def test_digits_labeled_split_is_n_per_class_seeded_and_disjoint_from_the_unlabeled_pool():
    dm = DigitsDataModule(protocol="semi", labels_per_class=5, split_seed=3)
    labeled, unlabeled = dm.labeled_indices, dm.unlabeled_indices
    targets = dm.splits["train"].targets
    assert np.bincount(targets[labeled]).tolist() == [5] * 10
    assert not set(labeled) & set(unlabeled) and len(labeled) + len(unlabeled) == len(targets)
    again = DigitsDataModule(protocol="semi", labels_per_class=5, split_seed=3)
    assert again.labeled_indices.tolist() == labeled.tolist()
    other = DigitsDataModule(protocol="semi", labels_per_class=5, split_seed=4)
    assert other.labeled_indices.tolist() != labeled.tolist()
    mt = DigitsDataModule(protocol="semi", labels_per_class=5, split_seed=3, unlabeled_includes_labeled=True)
    assert len(mt.unlabeled_indices) == len(targets)  # MT convention: the stream holds every image


def test_curriculum_positions_and_lr_restart():
    c = Curriculum(phase0_epochs=3, iteration_epochs=2, generations=2, iterations=2)
    assert c.total_epochs == 11
    assert [c.position(e) for e in range(11)] == [None] * 3 + [(1, 1), (1, 1), (1, 2), (1, 2), (2, 1), (2, 1),
                                                             (2, 2), (2, 2)]
    assert [e for e in range(12) if c.starts_iteration(e)] == [3, 5, 7, 9]
    assert c.phase_epoch(1) == (1, 3) and c.phase_epoch(8) == (1, 2)
    model = Snowball(backbone="small_cnn", in_chans=1, curriculum=c, schedule=Schedule(name="cosine"))
    factors = [model.lr_factor_at(e) for e in range(11)]
    assert factors[0] == factors[3] == factors[5] == 1.0 and factors[4] == factors[6] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="phase0_epochs >= 0"):
        Curriculum(iteration_epochs=0)


def random_batch(labeled: int = 4, unlabeled: int = 6) -> tuple[dict, dict]:
    def part(n: int, target: torch.Tensor) -> dict:
        return {"views": [torch.randn(n, 1, 8, 8), torch.randn(n, 1, 8, 8)], "target": target,
                "index": torch.arange(n)}
    return part(labeled, torch.tensor([0, 1, 2, 3])[:labeled]), part(unlabeled, torch.full((unlabeled,), -1))


@pytest.mark.parametrize("learner, two_heads, expected", [
    ("mean_teacher", True, {"classification", "consistency", "logit_distance", "master"}),
    ("mixmatch", False, {"classification", "unlabeled", "consistency", "master"}),
    ("supervised", False, {"classification", "consistency", "master"}),
])
def test_learner_steps_with_the_master_term(learner, two_heads, expected):
    torch.manual_seed(0)
    model = Snowball(backbone="small_cnn", in_chans=1, num_classes=10, learner=learner, two_heads=two_heads)
    labeled, unlabeled = random_batch()
    terms, student = model.learner_terms(labeled, unlabeled)
    assert (student is None) == (learner != "mean_teacher")
    terms = model.add_master_terms(terms, student, labeled, unlabeled)
    assert expected <= set(terms) and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert model.head.weight.grad is not None
    assert all(p.grad is None for p in [*model.teacher.parameters(), *model.master.parameters()])


def test_mean_teacher_cross_entropy_is_divided_by_the_whole_batch():
    # both MT codes: the labeled rows' summed cross-entropy over labeled + unlabeled rows
    uniform = torch.zeros(2, 4)  # each row costs log 4
    assert batch_cross_entropy(uniform, torch.tensor([0, 3]), 8).item() == pytest.approx(2 * math.log(4) / 8)
    logits = torch.tensor([[math.log(3.0), 0.0]])  # p(class 0) = 0.75
    assert batch_cross_entropy(logits, torch.tensor([0]), 4).item() == pytest.approx(-math.log(0.75) / 4)
    with pytest.raises(ValueError, match="pass the whole batch"):
        batch_cross_entropy(uniform, torch.tensor([0, 3]), 1)
    model = SemiSupervised(backbone="small_cnn", in_chans=1, num_classes=10)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()  # every row's logits are 0: cross-entropy log 10 per labeled row
    labeled, unlabeled = random_batch(labeled=4, unlabeled=6)
    terms, _ = model.mean_teacher_terms(labeled, unlabeled)
    assert terms["classification"].item() == pytest.approx(4 * math.log(10) / 10, rel=1e-6)


def test_the_lr_warmup_runs_in_phase_0_only():
    # phase 0 = 3 epochs with a 2-epoch warm-up, then iterations of 2 epochs that restart the cosine only
    c = Curriculum(phase0_epochs=3, iteration_epochs=2, generations=1, iterations=2)
    model = Snowball(backbone="small_cnn", in_chans=1, curriculum=c,
                     schedule=Schedule(name="cosine", warmup_epochs=2))
    factors = [model.lr_factor_at(e) for e in range(c.total_epochs)]
    # phase 0: warm 1/2 x cos 1; cos(pi/3) -> 0.75; cos(2 pi/3) -> 0.25; each iteration: 1, cos(pi/2) -> 0.5
    assert factors == pytest.approx([0.5, 0.75, 0.25, 1.0, 0.5, 1.0, 0.5])


def test_a_split_seed_of_none_is_the_run_seed(monkeypatch):
    """One seed changes the labeled subset and the initialisation (semi configs: split_seed null)."""
    def labeled(**kwargs) -> list[int]:
        return DigitsDataModule(protocol="semi", labels_per_class=5, **kwargs).labeled_indices.tolist()

    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert labeled(split_seed=None) == labeled(split_seed=0)  # no seed_everything: seed 0
    L.seed_everything(3)
    assert labeled(split_seed=None) == labeled(split_seed=3)
    L.seed_everything(4)
    assert labeled(split_seed=None) == labeled(split_seed=4) != labeled(split_seed=3)


def test_steps_per_epoch_sets_the_semi_epoch_length():
    """MixMatch's epoch is 1,024 steps, not a pass over the unlabeled images: the pool is cycled to it."""
    def lengths(**kwargs) -> tuple[int, int]:
        loaders = DigitsDataModule(protocol="semi", labels_per_class=3, batch_size=64, labeled_batch_size=16,
                                   **kwargs).train_dataloader()
        return len(loaders["unlabeled"]), len(loaders["labeled"])

    assert lengths() == (21, 21)  # (1,437 - 30) // 64: one pass
    assert lengths(steps_per_epoch=50) == (50, 50)  # 3,200 draws from 1,407 images
    loader = DigitsDataModule(protocol="semi", labels_per_class=3, batch_size=64, steps_per_epoch=50,
                              num_views=1, train_transform="plain").train_dataloader()["unlabeled"]
    seen = torch.cat([b["index"] for b in loader])
    assert len(seen) == 3200 and len(set(seen.tolist())) == 1407  # every unlabeled image, then again
    with pytest.raises(ValueError, match="steps_per_epoch 0"):
        DigitsDataModule(protocol="semi", steps_per_epoch=0)


def bn_counts(model: nn.Module) -> list[int]:
    return [m.num_batches_tracked.item() for m in model.trunk.modules() if isinstance(m, nn.BatchNorm2d)]


def test_the_mixmatch_label_guess_leaves_the_bn_statistics_to_the_training_forward():
    """MixMatch's code keeps only the BN updates of the mixed batch's forward: the K guess passes normalise
    with their batch's statistics but neither move the running ones nor count (0 -> 2 per step before)."""
    torch.manual_seed(0)
    model = SemiSupervised(backbone="small_cnn", in_chans=1, num_classes=4, learner="mixmatch").train()
    labeled, unlabeled = random_batch()
    running = [b.clone() for name, b in model.trunk.named_buffers() if "running" in name]
    reference = copy.deepcopy(model).train()  # a plain training-mode pass: the same batch statistics
    guess = model.label_guess(unlabeled["views"])
    assert set(bn_counts(model)) == {0}
    assert all(torch.equal(a, b) for a, b in zip(running, [b for n, b in model.trunk.named_buffers() if "running" in n]))
    with torch.no_grad():
        expected = sharpen(torch.stack([reference(v).softmax(dim=1) for v in unlabeled["views"]]).mean(0), 0.5)
    assert torch.allclose(guess, expected, atol=1e-6)
    model.mixmatch_terms(labeled, unlabeled)  # guess + one forward over the mixed batch
    assert set(bn_counts(model)) == {1}


def test_semi_supervised_classifiers_refuse_center_features():
    """Centring feeds an embedding head; the class heads have none, so the flag is an error, not ignored."""
    with pytest.raises(ValueError, match="drop --model.init_args.center_features"):
        Snowball(backbone="small_cnn", in_chans=1, center_features=True)
