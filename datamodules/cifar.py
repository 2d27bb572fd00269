"""CIFAR-10 / CIFAR-100, read into uint8 arrays in memory from either of two layouts.

The official python pickles (what the official archive unpacks to, under root or as root itself):
  cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch
  cifar-100-python/train, test
Each file is a Py2 pickle of a dict: `data` uint8 (N, 3072) = [1024 R | 1024 G | 1024 B], every plane
row-major 32x32; labels under `labels` (CIFAR-10) or `fine_labels` (CIFAR-100).
Or image folders, the official split as `train/<class>/<image>` and `test/<class>/<image>` (JPEG or PNG
re-encodings of the same images); the class folders are the official class names, whose sorted order is
the official label order for both datasets.

Protocols:
  seen    ISIF, UMM, EIR: unsupervised on the train images, kNN reference = train, queries = test.
  unseen  TAC-CCL, SAN, ROUL: train on the train images of the first half of the classes (CIFAR-10:
          0-4), retrieve among the test images of the other half (5-9), relabelled from 0.
  semi    Snowball, LMCS: labels_per_class labeled images per class.
`validation_per_class` > 0 evaluates on a validation split instead of the test images, so that budgets
and hyperparameters can be chosen without seeing the test split: that many train images of every
evaluated class (seen/semi: every class, then left out of training; unseen: the held-out classes, never
trained on), drawn with `validation_seed`.
`train_per_class` > 0 trains on that many images of every training class, drawn with `train_subset_seed`
(fixed across run seeds: the subset is part of the budget, not of the seed), after the validation split is
held out: a CPU-budget study that should see each image several times (a memory bank rewritten every pass)
trains on a subset rather than on a fraction of one pass. The seen protocol's kNN reference is that subset.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import numpy as np
from torchvision.datasets import CIFAR10, CIFAR100

from datamodules.base import (
    DOWNLOAD_HINT,
    EmbeddingDataModule,
    Records,
    dataset_dir,
    fetch_archive,
    load_image,
)
from datamodules.folder import class_folders, image_files
from datamodules.safe_io import load_data_pickle

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


def read_cifar_file(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8, labels (N,) int64) from one pickled CIFAR batch, unpickled without
    running code (the file may come from anywhere); a malformed batch names its file."""
    batch = load_data_pickle(path)
    try:
        data, labels = np.asarray(batch["data"]), np.asarray(batch[label_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise ValueError(f"data {data.dtype} {data.shape} with {len(labels)} labels, expected uint8 "
                             "(N, 3072) with N labels")
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a CIFAR batch ({err!r}); replace it with the file from the official "
                         "archive (or pass --data.download true into an empty root)") from err
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def decode_folder(folder: Path, classes: tuple[str, ...], size: int = 32) -> Records:
    """Every image under folder/<class>/ decoded to uint8 (N, size, size, 3), target = position of the
    class in `classes`; file names sorted within a class. An image of another size names its file."""
    paths, targets = [], []
    for target, name in enumerate(classes):
        files = image_files(folder / name)
        paths += [folder / name / f for f in files]
        targets += [target] * len(files)

    def decode(path: Path) -> np.ndarray:
        image = load_image(path)
        if image.size != (size, size):
            raise ValueError(f"{path}: {image.size[0]}x{image.size[1]} pixels, CIFAR images are {size}x{size}; "
                             "point --data.root at the CIFAR images as released")
        return np.asarray(image, dtype=np.uint8)

    with ThreadPoolExecutor(max_workers=4) as pool:  # PIL releases the GIL while decoding
        images = list(pool.map(decode, paths, chunksize=256))
    items = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return Records(items, np.asarray(targets, dtype=np.int64))


def hold_out(records: Records, per_class: int, seed: int, setting: str = "validation_per_class"
             ) -> tuple[Records, Records]:
    """(rest, held): `per_class` images of every class drawn with `seed` into `held`, order kept on both
    sides. A class with no more than `per_class` images is an error naming the fix (`setting` is the
    option that asked for them)."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(records.targets):
        members = np.flatnonzero(records.targets == c)
        if len(members) <= per_class:
            raise ValueError(f"class {c} has {len(members)} training images, not more than "
                             f"{setting}={per_class}; lower --data.{setting}")
        held.append(rng.choice(members, per_class, replace=False))
    mask = np.zeros(len(records), dtype=bool)
    mask[np.concatenate(held)] = True
    return records.select(~mask), records.select(mask)


class CIFAR10DataModule(EmbeddingDataModule):
    """CIFAR-10: 50,000 train / 10,000 test, 10 classes, 32x32.

    download: fetch the official archive into root with torchvision's downloader when it is missing.
    validation_per_class: evaluate on that many held-out train images per class instead of the test split
    (0: the test split); validation_seed draws them.
    train_per_class: train on that many images of every training class (0: all of them); train_subset_seed
    draws them.
    """

    name = "CIFAR-10"
    protocols = ("seen", "unseen", "semi")
    class_count = 10
    # image-folder layout: the class folder names (None: any `class_count` folders, taken in sorted order)
    classes: ClassVar[tuple[str, ...] | None] = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                 "horse", "ship", "truck")
    mean = (0.4914, 0.4822, 0.4465)  # ISIF/NPID code values (std as in that code, not the true 0.247...)
    std = (0.2023, 0.1994, 0.2010)
    published_counts: ClassVar[dict[str, int]] = {"train": 50_000, "test": 10_000}
    source = CIFAR10  # torchvision class that knows the archive's URL and md5
    train_files = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
    test_files = ("test_batch",)
    label_key = "labels"

    def __init__(self, root: str | None = None, image_size: int = 32, download: bool = False,
                 validation_per_class: int = 0, validation_seed: int = 0, train_per_class: int = 0,
                 train_subset_seed: int = 0, **kwargs):
        super().__init__(root=root, image_size=image_size, **kwargs)
        if validation_per_class < 0:
            raise ValueError(f"validation_per_class={validation_per_class}: use 0 (evaluate on the test "
                             "split) or a positive count of held-out train images per class")
        if train_per_class < 0:
            raise ValueError(f"train_per_class={train_per_class}: use 0 (train on every image) or a positive "
                             "count of train images per class")
        self.download = download
        self.validation_per_class, self.validation_seed = validation_per_class, validation_seed
        self.train_per_class, self.train_subset_seed = train_per_class, train_subset_seed

    def image_folders(self) -> Path | None:
        """root when it holds train/ and test/ class folders (the image-folder layout), else None."""
        root = Path(self.root) if self.root is not None else None
        if root is None or not ((root / "train").is_dir() and (root / "test").is_dir()):
            return None
        for split in ("train", "test"):
            found = class_folders(root / split)
            if self.classes is not None and found != sorted(self.classes):
                missing, extra = sorted(set(self.classes) - set(found)), sorted(set(found) - set(self.classes))
                raise FileNotFoundError(f"{self.name}: {root / split} should hold one folder per class named as "
                                        f"the official classes; missing {missing[:10]}, unexpected {extra[:10]}")
            if len(found) != self.class_count:
                raise FileNotFoundError(f"{self.name}: {root / split} holds {len(found)} class folders, the "
                                        f"dataset has {self.class_count}; point --data.root at the whole dataset")
        return root

    def prepare_data(self) -> None:
        if not self.download or self.root is None or self.image_folders() is not None:
            return
        fetch_archive(self.root, self.source.base_folder, (*self.train_files, *self.test_files), self.source.url,
                      self.source.filename, self.source.tgz_md5)

    def read_records(self) -> dict[str, Records]:
        folders = self.image_folders()
        if folders is not None:
            classes = tuple(class_folders(folders / "train"))
            return {split: decode_folder(folders / split, classes) for split in ("train", "test")}
        self.prepare_data()
        files = (*self.train_files, *self.test_files)
        folder = dataset_dir(self.name, self.root, self.source.base_folder, files, CIFAR_URL,
                             hint=DOWNLOAD_HINT)

        def read(names: tuple[str, ...]) -> Records:
            parts = [read_cifar_file(folder / name, self.label_key) for name in names]
            return Records(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

        return {"train": read(self.train_files), "test": read(self.test_files)}

    def protocol_splits(self, records: dict[str, Records]) -> dict[str, Records]:
        """The protocol's splits, with the validation split in place of the test images when asked."""
        train, test = records["train"], records["test"]
        if self.protocol == "unseen":
            half = self.class_count // 2
            train_classes, test_classes = range(half), range(half, self.class_count)
            if self.validation_per_class:
                _, test = hold_out(train.by_class(test_classes), self.validation_per_class, self.validation_seed)
                return {"train": self.subset(train.by_class(train_classes)), "query": test}
            return {"train": self.subset(train.by_class(train_classes)), "query": test.by_class(test_classes)}
        if self.validation_per_class:
            train, test = hold_out(train, self.validation_per_class, self.validation_seed)
        return super().protocol_splits({"train": self.subset(train), "test": test})

    def subset(self, train: Records) -> Records:
        """`train_per_class` images of every class of `train` (all of them at 0), order kept."""
        if not self.train_per_class:
            return train
        return hold_out(train, self.train_per_class, self.train_subset_seed, "train_per_class")[1]


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100: 50,000 train / 10,000 test, 100 fine classes (targets = `fine_labels`), 32x32."""

    name = "CIFAR-100"
    mean = (0.5071, 0.4865, 0.4409)  # CIFAR-100's own statistics [R]
    std = (0.2673, 0.2564, 0.2762)
    source = CIFAR100
    class_count, classes = 100, None  # the fine label names, whose sorted order is the label order
    train_files = ("train",)
    test_files = ("test",)
    label_key = "fine_labels"
