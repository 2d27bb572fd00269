"""scikit-learn's 8x8 digits (1,797 images, 10 classes): the embedded default that needs no download."""
from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from datamodules.base import EmbeddingDataModule, Records


class DigitsDataModule(EmbeddingDataModule):
    """seen / semi: stratified 80/20 train/test split (seeded by split_seed); unseen: digits 0-4 train,
    5-9 test."""

    name = "digits"
    protocols = ("seen", "unseen", "semi")
    mean, std = (0.5,), (0.5,)

    def __init__(self, image_size: int = 8, train_transform: str = "digits", eval_transform: str = "plain",
                 batch_size: int = 128, test_fraction: float = 0.2, **kwargs):
        super().__init__(image_size=image_size, train_transform=train_transform,
                         eval_transform=eval_transform, batch_size=batch_size, **kwargs)
        self.test_fraction = test_fraction

    def read_records(self) -> dict[str, Records]:
        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255, (N, 8, 8)
        everything = Records(images, digits.target.astype(np.int64))
        if self.protocol == "unseen":
            return {"train": everything.by_class(range(5)), "test": everything.by_class(range(5, 10))}
        train, test = train_test_split(np.arange(len(everything)), test_size=self.test_fraction,
                                       stratify=everything.targets, random_state=self.split_seed)
        return {"train": everything.select(np.sort(train)), "test": everything.select(np.sort(test))}
