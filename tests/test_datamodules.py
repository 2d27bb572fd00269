"""Dataset readers on tiny fixtures in each dataset's exact on-disk format: splits by class id, labels,
counts, eval roles, views and their shapes, hidden training labels, and the documented errors."""
from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from datamodules import DATAMODULES, datamodule_class
from datamodules.base import DatasetSizeError, DatasetSizeWarning, EmbeddingDataModule
from datamodules.cars import CarsDataModule
from datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
from datamodules.cub import CUBDataModule
from datamodules.digits import DigitsDataModule
from datamodules.folder import FolderDataModule
from datamodules.imagenet import CMC_IMAGENET100, ImageNet100DataModule, ImageNetDataModule
from datamodules.inshop import InShopDataModule
from datamodules.sop import SOPDataModule
from datamodules.stl10 import STL10DataModule
from datamodules.svhn import SVHNDataModule
from tests import fixtures as F

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "datasets"


def setup(dm: EmbeddingDataModule) -> EmbeddingDataModule:
    with pytest.warns(DatasetSizeWarning):  # fixtures are tiny: every published count differs
        dm.setup()
    return dm


def all_batches(loader) -> list[dict]:
    return list(loader)


def check_train_batches(dm: EmbeddingDataModule, views: int, shape: tuple[int, ...]) -> None:
    """Every training batch: `views` views of the given shape, and no label (target -1 everywhere)."""
    batches = all_batches(dm.train_dataloader())
    assert batches
    for batch in batches:
        assert len(batch["views"]) == views
        assert all(tuple(v.shape[1:]) == shape for v in batch["views"])
        assert (batch["target"] == -1).all()


# -- in-memory datasets ------------------------------------------------------------------------------
def test_cifar10_reads_every_pixel_and_maps_the_seen_protocol(tmp_path):
    dm = setup(CIFAR10DataModule(root=str(F.write_cifar10(tmp_path)), batch_size=8, allow_partial=True))
    train, test = dm.splits["train"], dm.splits["query"]
    assert (len(train), len(test)) == (30, 20)
    assert dm.eval_roles == ["reference", "query"] and dm.splits["reference"] is train
    # data_batch_b holds train images b, b+5, ...: reading all five in order gives this permutation
    order = np.concatenate([np.arange(b, 30, 5) for b in range(5)])
    for position, original in enumerate(order):
        np.testing.assert_array_equal(train.items[position], F.pattern(original, 32, 32))
        assert train.targets[position] == original % 10
    np.testing.assert_array_equal(test.items[3], F.pattern(1003, 32, 32))
    assert dm.num_classes == {"train": 10, "reference": 10, "query": 10}
    check_train_batches(dm, views=2, shape=(3, 32, 32))
    reference, query = dm.val_dataloader()
    assert len(reference.dataset) == 30 and len(query.dataset) == 20
    batch = next(iter(query))
    assert batch["image"].shape == (20, 3, 32, 32)
    assert batch["target"].tolist() == test.targets.tolist()  # eval loaders reveal labels


def test_cifar10_image_folders_read_as_the_pickles_and_map_every_protocol(tmp_path):
    root = str(F.write_cifar10_folders(tmp_path, per_class=4, test_per_class=2))
    dm = setup(CIFAR10DataModule(root=root, batch_size=8, allow_partial=True))
    train, test = dm.splits["train"], dm.splits["query"]
    assert (len(train), len(test)) == (40, 20)
    # classes in the official label order, files sorted within a class, pixels exact for lossless files
    assert train.targets.tolist() == np.repeat(np.arange(10), 4).tolist()
    np.testing.assert_array_equal(train.items[4 * 3 + 2], F.pattern(10 * 2 + 3, 32, 32))
    assert test.items.shape == (20, 32, 32, 3) and test.targets.tolist() == np.repeat(np.arange(10), 2).tolist()
    check_train_batches(dm, views=2, shape=(3, 32, 32))

    unseen = setup(CIFAR10DataModule(root=root, protocol="unseen", batch_size=4, allow_partial=True))
    assert unseen.splits["train"].targets.tolist() == np.repeat(np.arange(5), 4).tolist()
    np.testing.assert_array_equal(unseen.splits["train"].items[-1], F.pattern(10 * 3 + 4, 32, 32))
    assert unseen.splits["query"].targets.tolist() == np.repeat(np.arange(5), 2).tolist()  # classes 5-9
    assert unseen.eval_roles == ["query"]

    semi = setup(CIFAR10DataModule(root=root, protocol="semi", labels_per_class=1, batch_size=4,
                                   allow_partial=True))
    assert len(semi.splits["train"]) == 40 and len(semi.splits["query"]) == 20


def test_cifar10_validation_split_holds_out_train_images_and_never_the_test_split(tmp_path):
    root = str(F.write_cifar10_folders(tmp_path, per_class=4, test_per_class=2))
    seen = setup(CIFAR10DataModule(root=root, validation_per_class=1, validation_seed=100, batch_size=4,
                                   allow_partial=True))
    train, val = seen.splits["train"], seen.splits["query"]
    assert (len(train), len(val)) == (30, 10) and seen.splits["reference"] is train
    assert np.bincount(val.targets).tolist() == [1] * 10
    every_train = {F.pattern(i, 32, 32).tobytes() for i in range(40)}
    held, kept = {x.tobytes() for x in val.items}, {x.tobytes() for x in train.items}
    assert held <= every_train and not held & kept  # train images, left out of training
    again = setup(CIFAR10DataModule(root=root, validation_per_class=1, validation_seed=100, allow_partial=True))
    other = setup(CIFAR10DataModule(root=root, validation_per_class=1, validation_seed=101, allow_partial=True))
    np.testing.assert_array_equal(again.splits["query"].items, val.items)
    assert not np.array_equal(other.splits["query"].items, val.items)

    unseen = setup(CIFAR10DataModule(root=root, protocol="unseen", validation_per_class=3, allow_partial=True))
    query = unseen.splits["query"]
    assert len(unseen.splits["train"]) == 20 and np.bincount(query.targets).tolist() == [3] * 5
    unseen_train_images = {F.pattern(10 * k + c, 32, 32).tobytes() for k in range(4) for c in range(5, 10)}
    assert {x.tobytes() for x in query.items} <= unseen_train_images
    with pytest.raises(ValueError, match="lower --data.validation_per_class"):
        setup(CIFAR10DataModule(root=root, validation_per_class=4, allow_partial=True))


def test_cifar10_train_subset_is_fixed_per_class_and_leaves_the_evaluation_images_alone(tmp_path):
    root = str(F.write_cifar10_folders(tmp_path, per_class=4, test_per_class=2))
    full = setup(CIFAR10DataModule(root=root, validation_per_class=1, allow_partial=True))
    sub = setup(CIFAR10DataModule(root=root, validation_per_class=1, train_per_class=2, allow_partial=True))
    train = sub.splits["train"]
    assert np.bincount(train.targets).tolist() == [2] * 10 and sub.splits["reference"] is train
    assert {x.tobytes() for x in train.items} < {x.tobytes() for x in full.splits["train"].items}
    np.testing.assert_array_equal(sub.splits["query"].items, full.splits["query"].items)  # same validation images
    other = setup(CIFAR10DataModule(root=root, validation_per_class=1, train_per_class=2, train_subset_seed=1,
                                    allow_partial=True))
    assert not np.array_equal(other.splits["train"].items, train.items)
    unseen = setup(CIFAR10DataModule(root=root, protocol="unseen", train_per_class=1, allow_partial=True))
    assert unseen.splits["train"].targets.tolist() == list(range(5)) and len(unseen.splits["query"]) == 10
    with pytest.raises(ValueError, match="lower --data.train_per_class"):
        setup(CIFAR10DataModule(root=root, validation_per_class=1, train_per_class=3, allow_partial=True))
    with pytest.raises(ValueError, match="train_per_class=-1"):
        CIFAR10DataModule(root=root, train_per_class=-1)


def test_cifar10_image_folders_name_missing_classes(tmp_path):
    root = F.write_cifar10_folders(tmp_path, per_class=1, test_per_class=1)
    (root / "test" / "truck").rename(root / "test" / "lorry")
    with pytest.raises(FileNotFoundError, match=r"missing \['truck'\], unexpected \['lorry'\]"):
        CIFAR10DataModule(root=str(root), allow_partial=True).setup()


def test_count_mismatch_fails_naming_the_counts_and_the_flag_which_downgrades_it(tmp_path):
    root = str(F.write_cifar10(tmp_path))
    counts = (r"CIFAR-10 train: 30 images, published 50,000 \(49,970 fewer\); "
              r"CIFAR-10 test: 20 images, published 10,000 \(9,980 fewer\)")
    with pytest.raises(DatasetSizeError, match=counts + r".*--data\.allow_partial=true"):
        CIFAR10DataModule(root=root).setup()
    dm = CIFAR10DataModule(root=root, allow_partial=True)
    with pytest.warns(DatasetSizeWarning, match=counts):
        dm.setup()
    assert len(dm.splits["train"]) == 30


def test_published_counts_pass_without_the_flag_or_a_warning(tmp_path):
    dm = CIFAR10DataModule(root=str(F.write_cifar10(tmp_path)))
    dm.published_counts = {"train": 30, "test": 20}  # what the fixture holds
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetSizeWarning)
        dm.setup()
    assert len(dm.splits["query"]) == 20


def test_cifar_root_may_be_the_unpacked_folder_itself(tmp_path):
    F.write_cifar10(tmp_path)
    dm = setup(CIFAR10DataModule(root=str(tmp_path / "cifar-10-batches-py"), allow_partial=True))
    assert len(dm.splits["train"]) == 30


def test_cifar100_uses_fine_labels(tmp_path):
    dm = setup(CIFAR100DataModule(root=str(F.write_cifar100(tmp_path)), batch_size=16, allow_partial=True))
    assert dm.num_classes["train"] == 100 and len(dm.splits["train"]) == 200
    assert dm.splits["train"].targets[:3].tolist() == [0, 1, 2]
    assert dm.mean != CIFAR10DataModule.mean


def test_stl10_column_major_images_and_reference_is_the_labeled_train_split(tmp_path):
    root = str(F.write_stl10(tmp_path))
    dm = setup(STL10DataModule(root=root, batch_size=8, allow_partial=True))
    train, reference, test = dm.splits["train"], dm.splits["reference"], dm.splits["query"]
    assert (len(train), len(reference), len(test)) == (37, 30, 20)
    np.testing.assert_array_equal(reference.items[4], F.pattern(4, 96, 96))
    np.testing.assert_array_equal(train.items[30], F.pattern(2000, 96, 96))  # unlabeled images come last
    np.testing.assert_array_equal(test.items[1], F.pattern(1001, 96, 96))
    assert reference.targets.tolist() == F.class_labels(10, 3).tolist()  # stored 1..10, read 0..9
    assert (train.targets[30:] == -1).all()
    check_train_batches(dm, views=2, shape=(3, 96, 96))
    small = setup(STL10DataModule(root=root, train_split="train", allow_partial=True))
    assert len(small.splits["train"]) == 30


def test_svhn_maps_label_10_to_digit_0(tmp_path):
    dm = setup(SVHNDataModule(root=str(F.write_svhn(tmp_path)), batch_size=8, allow_partial=True))
    train = dm.splits["train"]
    assert train.targets.tolist() == F.class_labels(10, 3).tolist()
    np.testing.assert_array_equal(train.items[7], F.pattern(7, 32, 32))
    check_train_batches(dm, views=2, shape=(3, 32, 32))


def test_digits_still_works_for_every_protocol():
    assert len(DigitsDataModule(protocol="seen").eval_roles) == 2
    unseen = DigitsDataModule(protocol="unseen")
    unseen.setup()
    assert unseen.eval_roles == ["query"] and unseen.num_classes == {"train": 5, "query": 5}
    semi = DigitsDataModule(protocol="semi", labels_per_class=4, batch_size=32)
    assert len(semi.labeled_indices) == 40 and semi.eval_roles == ["query"]


# -- file datasets ------------------------------------------------------------------------------------
def test_imagenet_class_index_is_sorted_wnid_order(tmp_path):
    root = str(F.write_imagenet(tmp_path, ["n03", "n01", "n02"]))
    dm = setup(ImageNetDataModule(root=root, batch_size=3, image_size=64, allow_partial=True))
    train = dm.splits["train"]
    assert [Path(p).parent.name for p in train.items] == ["n01", "n01", "n02", "n02", "n03", "n03"]
    assert train.targets.tolist() == [0, 0, 1, 1, 2, 2] and len(dm.splits["query"]) == 3
    check_train_batches(dm, views=2, shape=(3, 64, 64))
    assert next(iter(dm.val_dataloader()[1]))["image"].shape == (3, 3, 64, 64)


def test_imagenet_class_list_from_a_file_and_missing_class_folder(tmp_path):
    root = F.write_imagenet(tmp_path / "data", ["n01", "n02", "n03"])
    (tmp_path / "classes.txt").write_text("n03\n\nn01\n")
    dm = setup(ImageNetDataModule(root=str(root), classes=str(tmp_path / "classes.txt"), allow_partial=True))
    assert {Path(p).parent.name for p in dm.splits["query"].items} == {"n01", "n03"}
    with pytest.raises(FileNotFoundError, match=r"1 class folder\(s\) missing .*n09"):
        ImageNetDataModule(root=str(root), classes=["n01", "n09"]).setup()


def test_imagenet100_defaults_to_the_cmc_list(tmp_path):
    extra = "n09999999"  # a folder outside the list is ignored
    root = str(F.write_imagenet(tmp_path, [*CMC_IMAGENET100, extra], per_class=1))
    dm = setup(ImageNet100DataModule(root=root, allow_partial=True))
    assert dm.num_classes == {"train": 100, "reference": 100, "query": 100}
    assert dm.expected_counts() == {"train": 126_689, "test": 5_000}
    assert ImageNet100DataModule(root=root, classes=["n01749939"]).expected_counts() == {}


def test_cub_splits_by_class_id_1_100_vs_101_200(tmp_path):
    dm = setup(CUBDataModule(root=str(F.write_cub(tmp_path)), batch_size=4, allow_partial=True))
    train, query = dm.splits["train"], dm.splits["query"]
    assert dm.eval_roles == ["query"]
    # classes 1, 2, 3, 100 train, 101, 102, 200 test (train_test_split.txt ignored); target = id - 1 (- 100)
    assert sorted(set(train.targets.tolist())) == [0, 1, 2, 99]
    assert sorted(set(query.targets.tolist())) == [0, 1, 99]
    assert all(re.search(r"/(001|002|003|100)\.Bird", p) for p in train.items)
    assert all(re.search(r"/(101|102|200)\.Bird", p) for p in query.items)
    assert (len(train), len(query)) == (12, 9)
    check_train_batches(dm, views=2, shape=(3, 227, 227))
    assert next(iter(dm.val_dataloader()[0]))["image"].shape == (9, 3, 227, 227)


def test_cars_splits_by_class_id_1_98_vs_99_196(tmp_path):
    dm = setup(CarsDataModule(root=str(F.write_cars(tmp_path)), batch_size=3, image_size=64, allow_partial=True))
    train, query = dm.splits["train"], dm.splits["query"]
    assert sorted(set(train.targets.tolist())) == [0, 1, 97]  # class ids 1, 2, 98
    assert sorted(set(query.targets.tolist())) == [0, 1, 97]  # class ids 99, 100, 196
    assert [Path(p).name for p in train.items[:3]] == ["000001.jpg", "000002.jpg", "000003.jpg"]
    assert all(Path(p).exists() for p in [*train.items, *query.items])
    check_train_batches(dm, views=2, shape=(3, 64, 64))


def test_sop_splits_by_list_and_relabels_each_from_zero(tmp_path):
    dm = setup(SOPDataModule(root=str(F.write_sop(tmp_path)), batch_size=4, image_size=64, allow_partial=True))
    train, query = dm.splits["train"], dm.splits["query"]
    assert train.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]  # ids 1, 2, 3, 11318
    assert query.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # ids 11319, 11320, 22634
    assert all(Path(p).exists() for p in train.items)
    check_train_batches(dm, views=2, shape=(3, 64, 64))


def test_sop_rejects_a_list_without_its_header(tmp_path):
    F.write_sop(tmp_path)
    listing = tmp_path / "Stanford_Online_Products" / "Ebay_test.txt"
    listing.write_text("\n".join(listing.read_text().splitlines()[1:]))
    with pytest.raises(ValueError, match="header"):
        SOPDataModule(root=str(tmp_path)).setup()


@pytest.mark.parametrize("official_layout", [True, False])
def test_inshop_query_and_gallery_roles_share_item_labels(tmp_path, official_layout):
    root = str(F.write_inshop(tmp_path, official_layout=official_layout))
    dm = setup(InShopDataModule(root=root, batch_size=4, image_size=64, allow_partial=True))
    assert dm.eval_roles == ["query", "gallery"]
    train, query, gallery = dm.splits["train"], dm.splits["query"], dm.splits["gallery"]
    assert (len(train), len(query), len(gallery)) == (12, 3, 6)
    assert train.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert query.targets.tolist() == [0, 1, 2] and gallery.targets.tolist() == [0, 0, 1, 1, 2, 2]
    assert [Path(p).parent.name for p in query.items] == [Path(p).parent.name for p in gallery.items[::2]]
    assert not {Path(p).parent for p in train.items} & {Path(p).parent for p in query.items}
    assert all(Path(p).exists() for p in [*train.items, *query.items, *gallery.items])
    assert next(iter(dm.val_dataloader()[1]))["target"].tolist() == [0, 0, 1, 1, 2, 2]


def test_folder_unseen_splits_classes_and_seen_splits_images(tmp_path):
    root = str(F.write_folder(tmp_path))
    unseen = FolderDataModule(root=root, batch_size=4, image_size=32)
    unseen.setup()
    assert {Path(p).parent.name for p in unseen.splits["train"].items} == {"ant", "bee"}
    assert {Path(p).parent.name for p in unseen.splits["query"].items} == {"cat", "dog"}
    assert len(unseen.splits["train"]) == 10  # the ._ file and notes.txt are skipped
    named = FolderDataModule(root=root, train_classes=["dog", "ant"])
    named.setup()
    assert {Path(p).parent.name for p in named.splits["train"].items} == {"ant", "dog"}
    seen = FolderDataModule(root=root, protocol="seen", train_transform="npid", eval_transform="plain",
                            image_size=16, batch_size=4, test_fraction=0.4)
    seen.setup()
    assert np.bincount(seen.splits["query"].targets).tolist() == [2, 2, 2, 2]
    assert not set(seen.splits["train"].items) & set(seen.splits["query"].items)
    check_train_batches(seen, views=2, shape=(3, 16, 16))


# -- labels stay hidden ----------------------------------------------------------------------------------
def test_unsupervised_training_batches_carry_no_labels(tmp_path):
    """Every training batch of every protocol without labels: target == -1 everywhere; the train split
    seen through the eval transform (feature extraction) hides labels too unless asked."""
    modules = [CIFAR10DataModule(root=str(F.write_cifar10(tmp_path / "c")), batch_size=5, num_views=3,
                                 allow_partial=True),
               CUBDataModule(root=str(F.write_cub(tmp_path / "b")), batch_size=3, image_size=32, allow_partial=True)]
    for dm in modules:
        setup(dm)
        for batch in all_batches(dm.train_dataloader()):
            assert (batch["target"] == -1).all() and len(batch["views"]) == dm.num_views
        extraction = all_batches(dm.train_eval_dataloader())
        assert all((b["target"] == -1).all() for b in extraction)
        assert sum(len(b["index"]) for b in extraction) == len(dm.splits["train"])
        revealed = torch.cat([b["target"] for b in dm.train_eval_dataloader(reveal_targets=True)])
        assert revealed.tolist() == dm.splits["train"].targets.tolist()


def test_supervised_flag_reveals_training_targets(tmp_path):
    dm = setup(CUBDataModule(root=str(F.write_cub(tmp_path)), batch_size=4, image_size=32, supervised=True,
                             allow_partial=True))
    batch = next(iter(dm.train_dataloader()))
    assert batch["target"].tolist() == dm.splits["train"].targets[batch["index"]].tolist()


def test_views_are_independent_and_reproducible(tmp_path):
    root = str(F.write_cifar10(tmp_path))
    first = next(iter(setup(CIFAR10DataModule(root=root, batch_size=10, allow_partial=True)).train_dataloader()))
    again = next(iter(setup(CIFAR10DataModule(root=root, batch_size=10, allow_partial=True)).train_dataloader()))
    assert not torch.equal(first["views"][0], first["views"][1])
    assert torch.equal(first["views"][0], again["views"][0]) and torch.equal(first["index"], again["index"])


# -- errors that name the fix -----------------------------------------------------------------------------
@pytest.mark.parametrize("name, url", [("cub", "vision.caltech.edu"), ("cifar10", "cs.toronto.edu"),
                                       ("stl10", "acoates/stl10"), ("svhn", "housenumbers"),
                                       ("cars", "jkrause/cars"), ("sop", "lifted_struct"),
                                       ("inshop", "DeepFashion"), ("imagenet", "image-net.org")])
def test_missing_root_lists_the_expected_files_and_the_download_page(tmp_path, name, url):
    with pytest.raises(FileNotFoundError, match="--data.root") as no_root:
        datamodule_class(name)().setup()
    assert url in str(no_root.value)
    with pytest.raises(FileNotFoundError, match="does not exist") as wrong_root:
        datamodule_class(name)(root=str(tmp_path / "nowhere")).setup()
    assert "Expected under the root" in str(wrong_root.value) and url in str(wrong_root.value)


def test_missing_file_is_named(tmp_path):
    F.write_cub(tmp_path)
    (tmp_path / "CUB_200_2011" / "image_class_labels.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"CUB_200_2011/image_class_labels\.txt missing") as err:
        CUBDataModule(root=str(tmp_path)).setup()
    assert "CUB_200_2011/images.txt" in str(err.value)  # the full expected list
    F.write_stl10(tmp_path / "stl")
    (tmp_path / "stl" / "stl10_binary" / "unlabeled_X.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"unlabeled_X\.bin missing.*\n(.|\n)*--data.download true"):
        STL10DataModule(root=str(tmp_path / "stl")).setup()
    # the 5K variant does not need it
    setup(STL10DataModule(root=str(tmp_path / "stl"), train_split="train", allow_partial=True))


def test_folder_without_class_folders_explains_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"root/<class>/<image>"):
        FolderDataModule(root=str(tmp_path)).setup()


def test_corrupt_image_is_reported_with_its_path(tmp_path):
    F.write_cub(tmp_path)
    broken = next((tmp_path / "CUB_200_2011" / "images").glob("002.*/*.jpg"))
    F.write_corrupt_image(broken)
    listing = rf"1 unreadable image\(s\):\n  {re.escape(str(broken))}: .*\nDelete or replace"
    with pytest.raises(OSError, match=listing):
        CUBDataModule(root=str(tmp_path), verify_images=True, allow_partial=True).setup()
    # no check: fails on loading
    dm = setup(CUBDataModule(root=str(tmp_path), batch_size=12, image_size=32, allow_partial=True))
    with pytest.raises(OSError, match=rf"cannot read image '{re.escape(str(broken))}'.*delete or replace"):
        next(iter(dm.train_dataloader()))


def test_empty_split_is_a_hard_error(tmp_path):
    F.write_cub(tmp_path, class_ids=(1, 2, 3))  # no test classes
    with pytest.raises(ValueError, match=r"CUB: the 'query' split is empty"):
        CUBDataModule(root=str(tmp_path), allow_partial=True).setup()


def test_unknown_protocol_and_too_few_images_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"protocol 'unseen' is not one of \('seen', 'semi'\)"):
        SVHNDataModule(protocol="unseen")
    dm = setup(CUBDataModule(root=str(F.write_cub(tmp_path)), batch_size=64, allow_partial=True))
    with pytest.raises(ValueError, match="fewer than one batch of 64; lower --data.batch_size"):
        dm.train_dataloader()


# -- download through torchvision -------------------------------------------------------------------------
def test_download_fetches_missing_archives_with_torchvision(tmp_path, monkeypatch):
    calls = []

    def fake_archive(url, root, filename=None, md5=None):
        calls.append((url, filename, md5))
        (F.write_cifar10 if "cifar-10" in url else F.write_stl10)(Path(root))

    def fake_file(url, root, filename=None, md5=None):
        calls.append((url, filename, md5))
        F.write_svhn(tmp_path / "svhn-source")
        Path(root).mkdir(parents=True, exist_ok=True)  # as torchvision's download_url does
        shutil.copy(tmp_path / "svhn-source" / filename, Path(root) / filename)

    monkeypatch.setattr("datamodules.base.download_and_extract_archive", fake_archive)  # CIFAR's and STL-10's
    monkeypatch.setattr("datamodules.svhn.download_url", fake_file)
    setup(CIFAR10DataModule(root=str(tmp_path / "c"), download=True, allow_partial=True))
    setup(STL10DataModule(root=str(tmp_path / "s"), download=True, allow_partial=True))
    setup(SVHNDataModule(root=str(tmp_path / "v"), download=True, allow_partial=True))
    assert [c[0] for c in calls] == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                                     "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
                                     "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
                                     "http://ufldl.stanford.edu/housenumbers/test_32x32.mat"]
    assert all(md5 for _, _, md5 in calls)
    # present: no second download
    setup(CIFAR10DataModule(root=str(tmp_path / "c"), download=True, allow_partial=True))
    assert len(calls) == 4


# -- registry and configs ---------------------------------------------------------------------------------
def test_registry_covers_every_dataset_name():
    names = ["digits", "cifar10", "cifar100", "stl10", "svhn", "imagenet", "imagenet100", "cub", "cars",
             "sop", "inshop", "folder"]
    assert list(DATAMODULES) == names
    assert all(issubclass(datamodule_class(n), EmbeddingDataModule) for n in names)


WRITERS = {"cifar10": F.write_cifar10, "cifar100": F.write_cifar100, "stl10": F.write_stl10,
           "svhn": F.write_svhn, "imagenet": lambda root: F.write_imagenet(root, ["n01", "n02"]),
           "imagenet100": lambda root: F.write_imagenet(root, CMC_IMAGENET100[:3], per_class=1),
           "cub": F.write_cub, "cars": F.write_cars, "sop": F.write_sop, "inshop": F.write_inshop,
           "folder": F.write_folder}


@pytest.mark.parametrize("name", list(DATAMODULES))
def test_dataset_config_builds_its_datamodule_on_the_fixture(tmp_path, name):
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["data"]
    cls = datamodule_class(name)
    assert config["class_path"] == f"{cls.__module__}.{cls.__qualname__}"
    args = dict(config.get("init_args", {}))
    if name in WRITERS:
        args["root"] = str(WRITERS[name](tmp_path))
    if name == "imagenet100":
        args["classes"] = list(CMC_IMAGENET100[:3])
    dm = cls(**args, allow_partial=True)  # the fixtures are tiny
    dm.setup()
    assert dm.eval_roles


def test_a_data_seed_of_none_is_the_run_seed(monkeypatch):
    """Runs over seeds differ in their training order and augmentations, not only their initialisation."""
    def first_batch(**kwargs) -> tuple[list[int], torch.Tensor]:
        dm = DigitsDataModule(batch_size=8, **kwargs)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        return batch["index"].tolist(), batch["views"][0]

    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert first_batch()[0] == first_batch(seed=0)[0]  # no seed_everything: seed 0
    L.seed_everything(3)
    order, views = first_batch()
    assert order == first_batch(seed=3)[0] and torch.equal(views, first_batch(seed=3)[1])
    L.seed_everything(4)
    assert first_batch()[0] != order
