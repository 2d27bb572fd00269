"""Your own data: one folder per class, `root/<class>/<image>` (the layout torchvision's ImageFolder reads).

Classes are the sub-folders that hold at least one image, in sorted order (class index = position); an
empty sub-folder is skipped with a ClassFolderWarning naming it. Hidden files (`.*`, macOS `._*`) and files
without an image extension are skipped. A class with a single image cannot be split (seen/semi: an error
naming the folder) or ever be retrieved as a positive (unseen test classes: a warning naming the folder).
Protocols:
  seen / semi  a stratified random split of every class's images (test_fraction, split_seed).
  unseen       a class split: the first `train_classes` of the sorted classes train, the rest test
               (the DML convention of CUB/Cars/SOP: first half vs second half); or name them.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from sklearn.model_selection import train_test_split

from datamodules.base import EmbeddingDataModule, Records

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
LAYOUT = "<class>/<image> (one sub-folder per class)"
MOVE_OUT = "add images to them, or move them out of --data.root"


class ClassFolderWarning(UserWarning):
    """A class folder the protocol cannot use as it is: empty (skipped), or one image (never a positive)."""


def _is(entry: os.DirEntry, kind: str) -> bool:
    """entry.is_dir() / is_file() (following links); an entry that cannot be followed (a symlink loop
    (ELOOP), a dangling or unreadable link) is False, with a ClassFolderWarning naming it."""
    try:
        return entry.is_dir() if kind == "dir" else entry.is_file()
    except OSError as err:
        rank_zero_warn(f"folder dataset: {entry.path} skipped: it cannot be followed ({err.strerror or err}); "
                       "fix or remove the link", category=ClassFolderWarning)
        return False


def class_folders(folder: Path) -> list[str]:
    """Names of the non-hidden sub-folders of `folder`, sorted."""
    return sorted(entry.name for entry in os.scandir(folder)
                  if not entry.name.startswith(".") and _is(entry, "dir"))


def image_files(folder: Path) -> list[str]:
    """Sorted names of the image files in `folder` (not hidden, with an image extension)."""
    return sorted(entry.name for entry in os.scandir(folder)
                  if not entry.name.startswith(".") and entry.name.lower().endswith(IMAGE_EXTENSIONS)
                  and _is(entry, "file"))


def scan_class_folders(folder: Path, classes: Sequence[str]) -> Records:
    """Image paths under folder/<class>/ for each of `classes` (file names sorted), target = class index."""
    paths, targets = [], []
    for target, name in enumerate(classes):
        files = image_files(folder / name)
        paths += [str(folder / name / f) for f in files]
        targets += [target] * len(files)
    return Records(paths, np.asarray(targets, dtype=np.int64))


def stratified_split(records: Records, test_fraction: float, seed: int) -> dict[str, Records]:
    """{"train", "test"}: every class split test_fraction / rest, seeded; order kept within each split.
    Every class needs >= 2 images and each side >= one image per class (the caller names the folders)."""
    classes, n_test = len(np.unique(records.targets)), math.ceil(test_fraction * len(records))  # as sklearn
    if not classes <= n_test <= len(records) - classes:
        raise ValueError(f"test_fraction={test_fraction} holds out {n_test} of {len(records)} images, but "
                         f"both sides need one image of each of the {classes} classes: set --data.test_fraction "
                         f"between {classes / len(records):.3g} and {1 - classes / len(records):.3g}")
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

    def _train_class_names(self, classes: list[str], folders: list[str]) -> list[str]:
        """The train side of the unseen split among `classes` (the non-empty ones of `folders`)."""
        if isinstance(self.train_classes, (int, float)):
            count = round(self.train_classes * len(classes))
            if not 0 < count < len(classes):
                raise ValueError(f"train_classes={self.train_classes} of {len(classes)} classes leaves a "
                                 "side without classes; use a fraction strictly between 0 and 1")
            return classes[:count]
        unknown = sorted(set(self.train_classes) - set(folders))
        if unknown:
            raise ValueError(f"train_classes {unknown} are not folders under {self.root!r}")
        return sorted(set(self.train_classes) & set(classes))

    def read_records(self) -> dict[str, Records]:
        root = Path(self.root) if self.root is not None else None
        classes = class_folders(root) if root is not None and root.is_dir() else []
        if not classes:
            raise FileNotFoundError(f"folder dataset: no class folders under --data.root {self.root!r}; "
                                    f"expected root/{LAYOUT}")
        everything = scan_class_folders(root, classes)
        counts = np.bincount(everything.targets, minlength=len(classes))
        empty = [name for name, count in zip(classes, counts) if count == 0]
        if len(empty) == len(classes):
            raise FileNotFoundError(f"folder dataset: no image files in the class folders under --data.root "
                                    f"{self.root!r} (extensions read: {', '.join(IMAGE_EXTENSIONS)})")
        if empty:
            rank_zero_warn(f"folder dataset: {len(empty)} class folder(s) without image files skipped (not "
                           f"counted as classes): {self._listed(empty)}; {MOVE_OUT}", category=ClassFolderWarning)
        kept = [i for i, count in enumerate(counts) if count > 0]
        folders, classes = classes, [classes[i] for i in kept]
        everything = everything.by_class(kept)
        singles = [name for name, count in zip(classes, counts[kept]) if count == 1]
        if self.protocol != "unseen":
            if singles:
                raise ValueError(f"folder dataset: {len(singles)} class folder(s) with a single image: "
                                 f"{self._listed(singles)}. Protocol {self.protocol!r} splits every class's "
                                 f"images between train and test, so each class needs at least 2: {MOVE_OUT} "
                                 "(or use --data.protocol unseen)")
            splits = stratified_split(everything, self.test_fraction, self.split_seed)
            per_class = np.bincount(splits["train"].targets, minlength=len(classes))
            short = [name for name, count in zip(classes, per_class) if count < self.labels_per_class]
            if self.protocol == "semi" and short:
                raise ValueError(f"folder dataset: {len(short)} class folder(s) with fewer training images than "
                                 f"labels_per_class={self.labels_per_class}: {self._listed(short)}; lower "
                                 f"--data.labels_per_class (at most {per_class.min()}) or {MOVE_OUT}")
            return splits
        train_names = set(self._train_class_names(classes, folders))
        test_singles = [name for name in singles if name not in train_names]
        if test_singles:
            queries = sum(count for name, count in zip(classes, counts[kept]) if name not in train_names)
            rank_zero_warn(f"folder dataset: {len(test_singles)} test class folder(s) with a single image: "
                           f"{self._listed(test_singles)}. Under protocol 'unseen' such an image has no "
                           f"positive, so its query misses at every K: Recall@K is capped at "
                           f"{100 * (1 - len(test_singles) / queries):.1f}%; {MOVE_OUT}",
                           category=ClassFolderWarning)
        train_ids = [i for i, c in enumerate(classes) if c in train_names]
        test_ids = [i for i, c in enumerate(classes) if c not in train_names]
        return {"train": everything.by_class(train_ids), "test": everything.by_class(test_ids)}

    def _listed(self, names: list[str], limit: int = 10) -> str:
        """Class folders as paths under the root, the first `limit` of them."""
        shown = ", ".join(str(Path(self.root) / name) for name in names[:limit])
        return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")
