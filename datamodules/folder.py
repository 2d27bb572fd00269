"""Your own data: one folder per class, `root/<class>/<image>` (the layout torchvision's ImageFolder reads).

Classes are the sub-folders in sorted order (class index = position). Hidden files (`.*`, macOS `._*`)
and files without an image extension are skipped.
Protocols:
  seen / semi  a stratified random split of every class's images (test_fraction, split_seed).
  unseen       a class split: the first `train_classes` of the sorted classes train, the rest test
               (the DML convention of CUB/Cars/SOP: first half vs second half); or name them.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from datamodules.base import EmbeddingDataModule, Records

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
LAYOUT = "<class>/<image> (one sub-folder per class)"


def class_folders(folder: Path) -> list[str]:
    """Names of the non-hidden sub-folders of `folder`, sorted."""
    return sorted(entry.name for entry in os.scandir(folder)
                  if entry.is_dir() and not entry.name.startswith("."))


def scan_class_folders(folder: Path, classes: Sequence[str]) -> Records:
    """Image paths under folder/<class>/ for each of `classes` (file names sorted), target = class index."""
    paths, targets = [], []
    for target, name in enumerate(classes):
        files = sorted(entry.name for entry in os.scandir(folder / name)
                       if entry.is_file() and not entry.name.startswith(".")
                       and entry.name.lower().endswith(IMAGE_EXTENSIONS))
        paths += [str(folder / name / f) for f in files]
        targets += [target] * len(files)
    return Records(paths, np.asarray(targets, dtype=np.int64))


def stratified_split(records: Records, test_fraction: float, seed: int) -> dict[str, Records]:
    """{"train", "test"}: every class split test_fraction / rest, seeded; order kept within each split."""
    train, test = train_test_split(np.arange(len(records)), test_size=test_fraction,
                                   stratify=records.targets, random_state=seed)
    return {"train": records.select(np.sort(train)), "test": records.select(np.sort(test))}


class FolderDataModule(EmbeddingDataModule):
    """Images in `root/<class>/<image>`.

    test_fraction: seen/semi, the share of every class held out for evaluation.
    train_classes: unseen, a fraction of the sorted classes (the first ones train) or their names.
    """

    name = "folder"
    protocols = ("seen", "unseen", "semi")
    mean = (0.485, 0.456, 0.406)  # ImageNet statistics: the usual choice for photos and pretrained backbones
    std = (0.229, 0.224, 0.225)

    def __init__(self, root: str | None = None, protocol: str = "unseen", image_size: int = 227,
                 train_transform: str = "fine_grained", eval_transform: str = "center",
                 test_fraction: float = 0.2, train_classes: float | list[str] = 0.5, **kwargs):
        super().__init__(root=root, protocol=protocol, image_size=image_size, train_transform=train_transform,
                         eval_transform=eval_transform, **kwargs)
        self.test_fraction, self.train_classes = test_fraction, train_classes

    def _train_class_names(self, classes: list[str]) -> list[str]:
        if isinstance(self.train_classes, (int, float)):
            count = round(self.train_classes * len(classes))
            if not 0 < count < len(classes):
                raise ValueError(f"train_classes={self.train_classes} of {len(classes)} classes leaves a "
                                 "side without classes; use a fraction strictly between 0 and 1")
            return classes[:count]
        unknown = sorted(set(self.train_classes) - set(classes))
        if unknown:
            raise ValueError(f"train_classes {unknown} are not folders under {self.root!r}")
        return sorted(self.train_classes)

    def read_records(self) -> dict[str, Records]:
        root = Path(self.root) if self.root is not None else None
        classes = class_folders(root) if root is not None and root.is_dir() else []
        if not classes:
            raise FileNotFoundError(f"folder dataset: no class folders under --data.root {self.root!r}; "
                                    f"expected root/{LAYOUT}")
        everything = scan_class_folders(root, classes)
        if self.protocol != "unseen":
            return stratified_split(everything, self.test_fraction, self.split_seed)
        train_names = set(self._train_class_names(classes))
        train_ids = [i for i, c in enumerate(classes) if c in train_names]
        test_ids = [i for i, c in enumerate(classes) if c not in train_names]
        return {"train": everything.by_class(train_ids), "test": everything.by_class(test_ids)}
