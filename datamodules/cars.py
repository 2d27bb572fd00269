"""Cars196 in the DML layout (cars_annos.mat + car_ims/), class split 1-98 / 99-196; file paths are kept.

Layout: root/cars_annos.mat, root/car_ims/000001.jpg .. 016185.jpg. `annotations` is a struct array with
fields relative_im_path ('car_ims/000001.jpg'), bbox_x1..bbox_y2, class (1..196) and test (the
classification split). The `test` flag and the boxes are deliberately unused: the DML protocol splits by
class id on uncropped images. (torchvision's StanfordCars reads a different layout, devkit/ + cars_train/.)
Protocol unseen: train on classes 1-98 (8,054 images), retrieve among classes 99-196 (8,131).
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from datamodules.base import Records, RetrievalDataModule, require_paths
from datamodules.safe_io import load_mat

CARS_URL = "https://ai.stanford.edu/~jkrause/cars/car_dataset.html (cars_annos.mat and car_ims.tgz)"
FILES = ("cars_annos.mat", "car_ims")


def read_cars(root: Path) -> Records:
    """Every annotated image with its 0-based class (class - 1), in annotation order."""
    path = root / "cars_annos.mat"
    annotations = np.atleast_1d(load_mat(path, ("annotations",), squeeze_me=True)["annotations"])
    missing = {"relative_im_path", "class"} - set(annotations.dtype.names or ())
    if missing:
        raise ValueError(f"{path}: `annotations` lacks the field(s) {sorted(missing)}; this is not the DML "
                         f"cars_annos.mat (published at {CARS_URL})")
    paths = [str(root / str(name)) for name in annotations["relative_im_path"]]
    return Records(paths, annotations["class"].astype(np.int64) - 1)


class CarsDataModule(RetrievalDataModule):
    """Cars196, 196 car models; train = classes 1-98, test = 99-196 (each relabelled 0-97)."""

    name = "Cars196"
    published_counts: ClassVar[dict[str, int]] = {"train": 8_054, "test": 8_131}

    def read_records(self) -> dict[str, Records]:
        everything = read_cars(require_paths(self.name, self.root, FILES, CARS_URL))
        return {"train": everything.by_class(range(98)), "test": everything.by_class(range(98, 196))}
