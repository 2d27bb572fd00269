"""CUB-200-2011 with the DML class split (classes 1-100 train, 101-200 test); file paths are kept.

Layout (root, or root/CUB_200_2011 as the archive unpacks): images.txt (`<image_id> <relative path>`),
image_class_labels.txt (`<image_id> <class_id 1..200>`), images/<NNN.Name>/<file>.jpg.
`train_test_split.txt` (the classification split) and the bounding boxes are deliberately unused: the
ISIF/UMM/TAC-CCL/SAN/ROUL protocol splits by class id and trains on uncropped images.
Protocol unseen: train on classes 1-100 (5,864 images), retrieve among classes 101-200 (5,924).
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from datamodules.base import Records, RetrievalDataModule, dataset_dir

CUB_URL = "https://www.vision.caltech.edu/datasets/cub_200_2011/"
FILES = ("images.txt", "image_class_labels.txt", "images")


def read_id_table(path: Path) -> dict[int, str]:
    """{id: rest of the line} from a CUB `<id> <value>` text file."""
    table = {}
    for line in path.read_text().splitlines():
        if line.strip():
            key, value = line.split(maxsplit=1)
            table[int(key)] = value.strip()
    return table


def read_cub(folder: Path) -> Records:
    """All listed images with 0-based class targets (class_id - 1), in image-id order."""
    names, classes = read_id_table(folder / "images.txt"), read_id_table(folder / "image_class_labels.txt")
    if names.keys() != classes.keys():
        raise ValueError(f"{folder}: images.txt and image_class_labels.txt list different image ids")
    ids = sorted(names)
    paths = [str(folder / "images" / names[i]) for i in ids]
    return Records(paths, np.array([int(classes[i]) - 1 for i in ids]))


class CUBDataModule(RetrievalDataModule):
    """CUB-200-2011, 200 bird classes; train = classes 1-100, test = 101-200 (each relabelled 0-99)."""

    name = "CUB"
    published_counts: ClassVar[dict[str, int]] = {"train": 5_864, "test": 5_924}

    def read_records(self) -> dict[str, Records]:
        everything = read_cub(dataset_dir(self.name, self.root, "CUB_200_2011", FILES, CUB_URL))
        return {"train": everything.by_class(range(100)), "test": everything.by_class(range(100, 200))}
