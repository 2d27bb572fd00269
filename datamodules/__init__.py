"""Datasets by their DATASET name. Importing this package stays cheap: classes load on first use."""
from __future__ import annotations

import importlib

DATAMODULES: dict[str, str] = {
    "digits": "datamodules.digits.DigitsDataModule",
    "cifar10": "datamodules.cifar.CIFAR10DataModule",
    "cifar100": "datamodules.cifar.CIFAR100DataModule",
    "stl10": "datamodules.stl10.STL10DataModule",
    "svhn": "datamodules.svhn.SVHNDataModule",
    "imagenet": "datamodules.imagenet.ImageNetDataModule",
    "imagenet100": "datamodules.imagenet.ImageNet100DataModule",
    "cub": "datamodules.cub.CUBDataModule",
    "cars": "datamodules.cars.CarsDataModule",
    "sop": "datamodules.sop.SOPDataModule",
    "inshop": "datamodules.inshop.InShopDataModule",
    "folder": "datamodules.folder.FolderDataModule",
}


def datamodule_class(name: str) -> type:
    """The DataModule class registered under a DATASET name."""
    if name not in DATAMODULES:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATAMODULES)}")
    module, _, cls = DATAMODULES[name].rpartition(".")
    return getattr(importlib.import_module(module), cls)
