"""Stanford Online Products from Ebay_train.txt / Ebay_test.txt; file paths are kept.

Layout (root, or root/Stanford_Online_Products as the archive unpacks): Ebay_train.txt, Ebay_test.txt,
<super class>_final/<image>.JPG. Each list has the header `image_id class_id super_class_id path`, then
one space-separated row per image; class ids are global and 1-based (train 1-11,318, test 11,319-22,634).
Protocol unseen: train 59,551 images / 11,318 classes, retrieve among 60,502 / 11,316 (each relabelled
from 0).
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from datamodules.base import Records, RetrievalDataModule, dataset_dir
from datamodules.safe_io import int_column, read_rows

SOP_URL = "https://cvgl.stanford.edu/projects/lifted_struct/"
FILES = ("Ebay_train.txt", "Ebay_test.txt")
HEADER = ["image_id", "class_id", "super_class_id", "path"]


def read_ebay_list(folder: Path, name: str) -> Records:
    """Image paths and class ids from one Ebay_*.txt list, relabelled 0..(classes in the list - 1)."""
    lines = read_rows(folder / name, columns=len(HEADER))
    if not lines or lines[0] != HEADER:
        raise ValueError(f"{folder / name}: first line must be the header {' '.join(HEADER)!r}")
    paths = [str(folder / row[3]) for row in lines[1:]]
    classes = int_column(folder / name, [row[1] for row in lines[1:]], "class_id")
    return Records(paths, classes).by_class(np.unique(classes))


class SOPDataModule(RetrievalDataModule):
    """Stanford Online Products, 22,634 products in 12 super classes."""

    name = "SOP"
    published_counts: ClassVar[dict[str, int]] = {"train": 59_551, "test": 60_502}

    def read_records(self) -> dict[str, Records]:
        folder = dataset_dir(self.name, self.root, "Stanford_Online_Products", FILES, SOP_URL)
        return {"train": read_ebay_list(folder, "Ebay_train.txt"),
                "test": read_ebay_list(folder, "Ebay_test.txt")}
