"""The class-proportional labelled split (MixMatch's create_split.py, LMCS on SVHN): per-class counts by
MixMatch's rule, seeded draws, and a real SVHN-format datamodule whose training classes are skewed."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.io import savemat

from datamodules.base import DatasetSizeWarning, draw_labeled, proportional_counts
from datamodules.digits import DigitsDataModule
from datamodules.svhn import SVHNDataModule
from tests import fixtures as F

# class c has 2 (c + 1) training images: 110 in all, shares (c + 1) / 10. 20 labels: picks 1-10 give one to
# each class, 9 down to 0 (a class holding the max count has share - 1 <= 0); at max count 1 then 2 the
# values share - count / max send picks 11-17 to 9, 8, 7, 6, 5, 4 (0.5 - 1/2 = 0 ties class 9's 1 - 2/2,
# the lower index wins), 9; at max count 3, picks 18-20 go to 8 (0.9 - 2/3), 7 (0.8 - 2/3), 3 (0.4 - 1/3)
SKEWED_SIZES = [2 * (c + 1) for c in range(10)]
SKEWED_COUNTS = [1, 1, 1, 2, 2, 2, 2, 3, 3, 3]


@pytest.mark.parametrize("sizes, total, expected", [
    # shares 1, .6, .4: c0; c1 (.6 > .4 > 0); c2; c0 (0 > -.4 > -.6); c1 (.6 - 1/2 = .1); c0 (0 > -.1);
    # c2 (.4 - 1/3 = .07 > 0); c0; c1 (.6 - 2/4 = .1); c0
    ([50, 30, 20], 10, [5, 3, 2]),
    ([10, 10, 10], 4, [2, 1, 1]),       # all shares 1: one each in class order, then class 0 on the tie
    ([1, 3, 3], 4, [1, 2, 1]),          # shares 1/3, 1, 1: c1, c2, c0, then c1 (1 - 1 = 0 beats 1/3 - 1)
    ([97, 2, 1], 10, [8, 1, 1]),        # every class one first, then class 0 is always furthest below
    ([0, 5, 5], 3, [0, 2, 1]),          # an empty class gets none
    (SKEWED_SIZES, 20, SKEWED_COUNTS),
])
def test_proportional_counts_follow_mixmatchs_rule(sizes, total, expected):
    assert proportional_counts(sizes, total).tolist() == expected


def test_proportional_counts_reject_impossible_totals():
    with pytest.raises(ValueError, match="between 1 and 15"):
        proportional_counts([5, 5, 5], 0)
    with pytest.raises(ValueError, match="labels_per_class"):
        proportional_counts([5, 5, 5], 16)


def test_proportional_draw_is_seeded_and_follows_the_histogram():
    targets = np.repeat(np.arange(10), SKEWED_SIZES)
    drawn = draw_labeled(targets, 2, seed=0, split="proportional")
    assert np.bincount(targets[drawn], minlength=10).tolist() == SKEWED_COUNTS
    assert len(set(drawn.tolist())) == 20 and drawn.tolist() == sorted(drawn.tolist())
    assert draw_labeled(targets, 2, seed=0, split="proportional").tolist() == drawn.tolist()
    assert draw_labeled(targets, 2, seed=1, split="proportional").tolist() != drawn.tolist()
    balanced = draw_labeled(targets, 2, seed=0)
    assert np.bincount(targets[balanced]).tolist() == [2] * 10
    with pytest.raises(ValueError, match=r"'balanced', 'proportional'"):
        draw_labeled(targets, 2, seed=0, split="stratified")


def test_an_unknown_label_split_names_the_choices():
    with pytest.raises(ValueError, match=r"label_split 'stratified' is not one of \('balanced', 'proportional'\)"):
        DigitsDataModule(protocol="semi", label_split="stratified")


def write_skewed_svhn(root):
    """SVHN's .mat format with class c holding 2 (c + 1) training images (digit 0 stored as 10)."""
    F.write_svhn(root, per_class=1, test_per_class=2)
    digits = np.repeat(np.arange(10), SKEWED_SIZES)
    images = np.stack([F.pattern(i, 32, 32) for i in range(len(digits))], axis=-1)
    stored = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(-1, 1)
    savemat(root / "train_32x32.mat", {"X": images, "y": stored})
    return root


@pytest.mark.parametrize("split_seed", [0, 3])
def test_svhn_datamodule_draws_the_proportional_split(tmp_path, split_seed):
    dm = SVHNDataModule(root=str(write_skewed_svhn(tmp_path)), protocol="semi", labels_per_class=2,
                        label_split="proportional", split_seed=split_seed, batch_size=10, allow_partial=True)
    with pytest.warns(DatasetSizeWarning):
        dm.setup("fit")
    targets = dm.splits["train"].targets
    assert np.bincount(targets, minlength=10).tolist() == SKEWED_SIZES
    assert np.bincount(dm.labeled_targets, minlength=10).tolist() == SKEWED_COUNTS
    assert dm.labeled_indices.tolist() == draw_labeled(targets, 2, split_seed, "proportional").tolist()
    assert sorted([*dm.labeled_indices, *dm.unlabeled_indices]) == list(range(110))
    batch = next(iter(dm.train_dataloader()["labeled"]))
    assert set(batch["index"].tolist()) <= set(dm.labeled_indices.tolist())
