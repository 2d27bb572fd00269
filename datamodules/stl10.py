"""STL-10 from the official binaries, read into uint8 arrays in memory.

Layout (under root, or root/stl10_binary as the archive unpacks): train_X.bin / train_y.bin (5,000),
test_X.bin / test_y.bin (8,000), unlabeled_X.bin (100,000). Images are packed uint8, 3 x 96 x 96, each
channel stored column-major; labels are uint8 1..10.
Protocol seen (ISIF, UMM, EIR): unsupervised training on `train` (5K) or `train+unlabeled` (105K); the
kNN / linear-probe reference is always the labeled 5K `train` split; queries are the 8K `test` split.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from torchvision.datasets import STL10

from datamodules.base import (
    DOWNLOAD_HINT,
    HIDDEN,
    EmbeddingDataModule,
    Records,
    dataset_dir,
    fetch_archive,
)
from datamodules.cifar import CIFAR10DataModule

STL10_URL = "https://cs.stanford.edu/~acoates/stl10/"
TRAIN_SPLITS = ("train", "train+unlabeled")


def read_stl_images(path: Path) -> np.ndarray:
    """(N, 96, 96, 3) uint8 from a column-major STL-10 image file."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % (3 * 96 * 96):
        raise ValueError(f"{path}: {raw.size} bytes is not a whole number of 3x96x96 images; the file is "
                         "truncated: download it again")
    # file order per image: channel, column (x), row (y) -> (N, C, X, Y) -> (N, Y, X, C)
    return np.ascontiguousarray(raw.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1))


def read_stl_labels(path: Path) -> np.ndarray:
    """0-based int64 labels from an STL-10 label file (stored 1..10)."""
    labels = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if labels.size and not 1 <= labels.min() <= labels.max() <= 10:
        raise ValueError(f"{path}: labels {labels.min()}..{labels.max()}, expected 1..10; download it again")
    return labels - 1


def read_stl_split(folder: Path, split: str) -> Records:
    """The `split` ("train" / "test") images and labels; files of different lengths are named."""
    images, labels = read_stl_images(folder / f"{split}_X.bin"), read_stl_labels(folder / f"{split}_y.bin")
    if len(images) != len(labels):
        raise ValueError(f"{folder / f'{split}_X.bin'} holds {len(images)} images but {folder / f'{split}_y.bin'} "
                         f"{len(labels)} labels; download the dataset again")
    return Records(images, labels)


class STL10DataModule(EmbeddingDataModule):
    """STL-10, 10 classes, 96x96.

    train_split: "train" (the 5K labeled images) or "train+unlabeled" (105K, the unlabeled ones last).
    download: fetch the official archive (2.6 GB) into root with torchvision's downloader when missing.
    """

    name = "STL-10"
    protocols = ("seen",)
    mean, std = CIFAR10DataModule.mean, CIFAR10DataModule.std  # ISIF code uses the CIFAR statistics for STL

    def __init__(self, root: str | None = None, image_size: int = 96, train_split: str = "train+unlabeled",
                 download: bool = False, **kwargs):
        if train_split not in TRAIN_SPLITS:
            raise ValueError(f"train_split {train_split!r} is not one of {TRAIN_SPLITS}")
        if train_split == "train+unlabeled" and kwargs.get("supervised"):
            raise ValueError("supervised training needs labels: use train_split 'train' (the unlabeled 100K "
                             "have none)")
        super().__init__(root=root, image_size=image_size, **kwargs)
        self.train_split, self.download = train_split, download

    def expected_counts(self) -> dict[str, int]:
        return {"train": 5_000 if self.train_split == "train" else 105_000, "reference": 5_000, "test": 8_000}

    def _files(self) -> tuple[str, ...]:
        labeled = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin")
        return (*labeled, "unlabeled_X.bin") if self.train_split == "train+unlabeled" else labeled

    def prepare_data(self) -> None:
        if not self.download or self.root is None:
            return
        fetch_archive(self.root, STL10.base_folder, self._files(), STL10.url, STL10.filename, STL10.tgz_md5)

    def read_records(self) -> dict[str, Records]:
        self.prepare_data()
        folder = dataset_dir(self.name, self.root, STL10.base_folder, self._files(), STL10_URL,
                             hint=DOWNLOAD_HINT)
        labeled, test = read_stl_split(folder, "train"), read_stl_split(folder, "test")
        train = labeled
        if self.train_split == "train+unlabeled":
            unlabeled = read_stl_images(folder / "unlabeled_X.bin")
            hidden = np.full(len(unlabeled), HIDDEN, dtype=np.int64)
            train = Records(np.concatenate([labeled.items, unlabeled]),
                            np.concatenate([labeled.targets, hidden]))
        return {"train": train, "reference": labeled, "test": test}
