"""SVHN (cropped digits) from the official .mat files, read into uint8 arrays in memory.

Layout: root/train_32x32.mat (73,257) and root/test_32x32.mat (26,032); the `extra` split is not used by
the papers. Each file holds `X` uint8 (32, 32, 3, N) and `y` (N, 1) with labels 1..10, where 10 is
the digit 0.
Protocols: semi (Snowball, LMCS) and seen (unsupervised kNN, our addition for the unsupervised methods).
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
from torchvision.datasets import SVHN
from torchvision.datasets.utils import download_url

from datamodules.base import DOWNLOAD_HINT, EmbeddingDataModule, Records, has_files, require_paths
from datamodules.safe_io import load_mat

SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
SPLITS = ("train", "test")


def read_svhn_file(path: Path) -> Records:
    """(N, 32, 32, 3) uint8 images and 0-based digit labels (10 -> 0) from one SVHN .mat file."""
    mat = load_mat(path, ("X", "y"))
    if mat["X"].ndim != 4 or mat["X"].shape[:3] != (32, 32, 3) or mat["y"].size != mat["X"].shape[3]:
        raise ValueError(f"{path}: X {mat['X'].shape} and y {mat['y'].shape}, expected (32, 32, 3, N) and "
                         "(N, 1); replace it with the file from the official download")
    images = np.ascontiguousarray(np.asarray(mat["X"], dtype=np.uint8).transpose(3, 0, 1, 2))
    labels = np.asarray(mat["y"], dtype=np.int64).reshape(-1) % 10
    return Records(images, labels)


class SVHNDataModule(EmbeddingDataModule):
    """SVHN, 10 classes, 32x32.

    download: fetch the two .mat files into root with torchvision's downloader when missing.
    """

    name = "SVHN"
    protocols = ("seen", "semi")
    mean = (0.4377, 0.4438, 0.4728)  # SVHN train statistics [R]
    std = (0.1980, 0.2010, 0.1970)
    published_counts: ClassVar[dict[str, int]] = {"train": 73_257, "test": 26_032}

    def __init__(self, root: str | None = None, image_size: int = 32, download: bool = False, **kwargs):
        super().__init__(root=root, image_size=image_size, **kwargs)
        self.download = download

    def prepare_data(self) -> None:
        if not self.download or self.root is None:
            return
        for split in SPLITS:
            url, filename, md5 = SVHN.split_list[split]
            if not has_files(self.root, [filename]):
                download_url(url, self.root, filename=filename, md5=md5)

    def read_records(self) -> dict[str, Records]:
        self.prepare_data()
        files = [SVHN.split_list[split][1] for split in SPLITS]
        root = require_paths(self.name, self.root, files, SVHN_URL,
                             hint=DOWNLOAD_HINT)
        return {split: read_svhn_file(root / filename) for split, filename in zip(SPLITS, files)}
