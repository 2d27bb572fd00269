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

from datamodules.base import Records, RetrievalDataModule, dataset_dir
from datamodules.safe_io import int_column, read_rows

CUB_URL = "https://www.vision.caltech.edu/datasets/cub_200_2011/"
FILES = ("images.txt", "image_class_labels.txt", "images")


def read_id_table(path: Path) -> dict[int, str]:
    """{id: rest of the line} from a CUB `<id> <value>` text file; a malformed line names the file."""
    rows = read_rows(path, columns=2, maxsplit=1)
    ids = int_column(path, [row[0] for row in rows], "image id")
    return {int(key): row[1].strip() for key, row in zip(ids, rows)}


def read_cub(folder: Path) -> Records:
    """All listed images with 0-based class targets (class_id - 1), in image-id order."""
    names, classes = read_id_table(folder / "images.txt"), read_id_table(folder / "image_class_labels.txt")
    if names.keys() != classes.keys():
        raise ValueError(f"{folder}: images.txt and image_class_labels.txt list different image ids")
    ids = sorted(names)
    paths = [str(folder / "images" / names[i]) for i in ids]
    labels = folder / "image_class_labels.txt"
    return Records(paths, int_column(labels, [classes[i] for i in ids], "class id") - 1)


class CUBDataModule(RetrievalDataModule):
    """CUB-200-2011, 200 bird classes; train = classes 1-100, test = 101-200 (each relabelled 0-99)."""

    name = "CUB"
    published_counts: ClassVar[dict[str, int]] = {"train": 5_864, "test": 5_924}

    def read_records(self) -> dict[str, Records]:
        everything = read_cub(dataset_dir(self.name, self.root, "CUB_200_2011", FILES, CUB_URL))
        return {"train": everything.by_class(range(100)), "test": everything.by_class(range(100, 200))}
