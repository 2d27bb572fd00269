"""CIFAR-10 / CIFAR-100 from the official python pickles, read into uint8 arrays in memory.

Layout (what the official archive unpacks to, under root or as root itself):
  cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch
  cifar-100-python/train, test
Each file is a Py2 pickle of a dict: `data` uint8 (N, 3072) = [1024 R | 1024 G | 1024 B], every plane
row-major 32x32; labels under `labels` (CIFAR-10) or `fine_labels` (CIFAR-100).
Protocols: seen (ISIF, UMM, EIR: unsupervised on the 50K train images, kNN reference = train, queries =
10K test) and semi (Snowball, LMCS: labels_per_class labeled images per class).
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import download_and_extract_archive

from datamodules.base import EmbeddingDataModule, Records, dataset_dir, has_files
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


class CIFAR10DataModule(EmbeddingDataModule):
    """CIFAR-10: 50,000 train / 10,000 test, 10 classes, 32x32.

    download: fetch the official archive into root with torchvision's downloader when it is missing.
    """

    name = "CIFAR-10"
    protocols = ("seen", "semi")
    mean = (0.4914, 0.4822, 0.4465)  # ISIF/NPID code values (std as in that code, not the true 0.247...)
    std = (0.2023, 0.1994, 0.2010)
    published_counts: ClassVar[dict[str, int]] = {"train": 50_000, "test": 10_000}
    source = CIFAR10  # torchvision class that knows the archive's URL and md5
    train_files = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
    test_files = ("test_batch",)
    label_key = "labels"

    def __init__(self, root: str | None = None, image_size: int = 32, download: bool = False, **kwargs):
        super().__init__(root=root, image_size=image_size, **kwargs)
        self.download = download

    def prepare_data(self) -> None:
        if not self.download or self.root is None:
            return
        files = (*self.train_files, *self.test_files)
        if not (has_files(self.root, files) or has_files(Path(self.root) / self.source.base_folder, files)):
            download_and_extract_archive(self.source.url, self.root, filename=self.source.filename,
                                         md5=self.source.tgz_md5)

    def read_records(self) -> dict[str, Records]:
        self.prepare_data()
        files = (*self.train_files, *self.test_files)
        folder = dataset_dir(self.name, self.root, self.source.base_folder, files, CIFAR_URL,
                             hint="; or pass --data.download true to fetch it with torchvision")

        def read(names: tuple[str, ...]) -> Records:
            parts = [read_cifar_file(folder / name, self.label_key) for name in names]
            return Records(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

        return {"train": read(self.train_files), "test": read(self.test_files)}


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100: 50,000 train / 10,000 test, 100 fine classes (targets = `fine_labels`), 32x32."""

    name = "CIFAR-100"
    mean = (0.5071, 0.4865, 0.4409)  # CIFAR-100's own statistics [R]
    std = (0.2673, 0.2564, 0.2762)
    source = CIFAR100
    train_files = ("train",)
    test_files = ("test",)
    label_key = "fine_labels"
