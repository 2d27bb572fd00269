"""In-Shop Clothes Retrieval (DeepFashion) from Eval/list_eval_partition.txt; file paths are kept.

Layout: root/Eval/list_eval_partition.txt and the images under root/Img/img/... (the official Img/img.zip
unpacked in place) or root/img/.... The list: line 1 = number of images, line 2 = the header
`image_name item_id evaluation_status`, then `img/WOMEN/.../02_1_front.jpg id_00000001 train` rows with
status train / query / gallery.
Protocol unseen: train 25,882 images / 3,997 items; evaluate 14,218 queries against a 12,612-image gallery
(3,985 items, disjoint from the train items; no self-exclusion since the sets are disjoint).
Targets: train items numbered 0..3,996 in sorted id order; query and gallery share one numbering.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from datamodules.base import Records, RetrievalDataModule, require_paths
from datamodules.safe_io import read_rows

INSHOP_URL = "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html"
PARTITION = "Eval/list_eval_partition.txt"
HEADER = ["image_name", "item_id", "evaluation_status"]
STATUSES = ("train", "query", "gallery")


def image_base(root: Path) -> Path:
    """The folder the list's `img/...` names are relative to: root/Img (official) or root."""
    for base in (root / "Img", root):
        if (base / "img").is_dir():
            return base
    raise FileNotFoundError(f"In-Shop: no image folder under {str(root)!r}: expected Img/img/ (Img/img.zip "
                            f"unpacked in place) or img/. The dataset is published at {INSHOP_URL}")


def read_partition(root: Path) -> dict[str, Records]:
    """{"train", "query", "gallery"} with item ids numbered from 0 (query and gallery numbered together)."""
    lines = read_rows(root / PARTITION, columns=len(HEADER), skip=1)  # line 1: the image count
    if not lines or lines[0] != HEADER:
        raise ValueError(f"{root / PARTITION}: line 2 must be the header {' '.join(HEADER)!r}")
    base = image_base(root)
    rows = {status: [row for row in lines[1:] if row[2] == status] for status in STATUSES}

    def records(status_rows: list[list[str]], items: list[str]) -> Records:
        index = {item: i for i, item in enumerate(items)}
        return Records([str(base / row[0]) for row in status_rows],
                       np.array([index[row[1]] for row in status_rows], dtype=np.int64))

    test_items = sorted({row[1] for status in ("query", "gallery") for row in rows[status]})
    return {"train": records(rows["train"], sorted({row[1] for row in rows["train"]})),
            "query": records(rows["query"], test_items), "gallery": records(rows["gallery"], test_items)}


class InShopDataModule(RetrievalDataModule):
    """In-Shop Clothes Retrieval: eval roles `query` and `gallery`."""

    name = "In-Shop"
    published_counts: ClassVar[dict[str, int]] = {"train": 25_882, "query": 14_218, "gallery": 12_612}

    def __init__(self, root: str | None = None, protocol: str = "unseen", image_size: int = 227,
                 train_transform: str = "resized_crop", eval_transform: str = "resize_center", **kwargs):
        super().__init__(root=root, protocol=protocol, image_size=image_size, train_transform=train_transform,
                         eval_transform=eval_transform, **kwargs)

    def read_records(self) -> dict[str, Records]:
        root = require_paths(self.name, self.root, [PARTITION], INSHOP_URL,
                             hint="; the images go under Img/img/ (Img/img.zip unpacked in place) or img/")
        return read_partition(root)
