"""ImageNet (ILSVRC-2012) and ImageNet-100 in the ImageFolder layout; file paths are kept, not pixels.

Layout: root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG (the validation images sorted into wnid
folders, as torchvision.datasets.ImageNet or the usual valprep script leave them). Class index = position
of the wnid in sorted order, as in torchvision.
Protocol seen: UMM (ImageNet-1k, SimCLR augmentation) and EIR (ImageNet-100, NPID augmentation at 224);
kNN reference = the train split, queries = val.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from datamodules.base import EmbeddingDataModule, Records, require_paths
from datamodules.folder import class_folders, scan_class_folders

IMAGENET_URL = "https://image-net.org/download.php (ILSVRC 2012)"

# ImageNet-100 as used by CMC (Tian et al. 2020; github.com/HobbitLong/CMC imagenet100.txt). EIR gives no
# list; we use this one [R] (docs/methods/eir.md) (126,689 train / 5,000 val images).
CMC_IMAGENET100 = (
    "n02869837", "n01749939", "n02488291", "n02107142", "n13037406", "n02091831", "n04517823", "n04589890",
    "n03062245", "n01773797", "n01735189", "n07831146", "n07753275", "n03085013", "n04485082", "n02105505",
    "n01983481", "n02788148", "n03530642", "n04435653", "n02086910", "n02859443", "n13040303", "n03594734",
    "n02085620", "n02099849", "n01558993", "n04493381", "n02109047", "n04111531", "n02877765", "n04429376",
    "n02009229", "n01978455", "n02106550", "n01820546", "n01692333", "n07714571", "n02974003", "n02114855",
    "n03785016", "n03764736", "n03775546", "n02087046", "n07836838", "n04099969", "n04592741", "n03891251",
    "n02701002", "n03379051", "n02259212", "n07715103", "n03947888", "n04026417", "n02326432", "n03637318",
    "n01980166", "n02113799", "n02086240", "n03903868", "n02483362", "n04127249", "n02089973", "n03017168",
    "n02093428", "n02804414", "n02396427", "n04418357", "n02172182", "n01729322", "n02113978", "n03787032",
    "n02089867", "n02119022", "n03777754", "n04238763", "n02231487", "n03032252", "n02138441", "n02104029",
    "n03837869", "n03494278", "n04136333", "n03794056", "n03492542", "n02018207", "n04067472", "n03930630",
    "n03584829", "n02123045", "n04229816", "n02100583", "n03642806", "n04336792", "n03259280", "n02116738",
    "n02108089", "n03424325", "n01855672", "n02090622",
)


def read_class_list(classes: list[str] | str) -> list[str]:
    """Class folder names from a list or from a text file with one name per line (blank lines ignored)."""
    if isinstance(classes, str):
        return [line.strip() for line in Path(classes).read_text().splitlines() if line.strip()]
    return list(classes)


class ImageNetDataModule(EmbeddingDataModule):
    """ImageNet-1k, or any subset of its classes.

    classes: wnids to keep (a list, or a text file with one per line); None keeps every folder.
    train_dir, test_dir: the split folders under root.
    """

    name = "ImageNet"
    protocols = ("seen",)
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)
    published_counts: ClassVar[dict[str, int]] = {"train": 1_281_167, "test": 50_000}

    def __init__(self, root: str | None = None, image_size: int = 224, train_transform: str = "simclr",
                 eval_transform: str = "resize_center", classes: list[str] | str | None = None,
                 train_dir: str = "train", test_dir: str = "val", **kwargs):
        super().__init__(root=root, image_size=image_size, train_transform=train_transform,
                         eval_transform=eval_transform, **kwargs)
        self.classes = None if classes is None else read_class_list(classes)
        self.train_dir, self.test_dir = train_dir, test_dir

    def read_records(self) -> dict[str, Records]:
        root = require_paths(self.name, self.root, [self.train_dir, self.test_dir], IMAGENET_URL)
        classes = sorted(self.classes) if self.classes is not None else class_folders(root / self.train_dir)
        splits = {}
        for split, folder in (("train", root / self.train_dir), ("test", root / self.test_dir)):
            missing = sorted(set(classes) - set(class_folders(folder)))
            if missing:
                raise FileNotFoundError(
                    f"{self.name}: {len(missing)} class folder(s) missing under {str(folder)!r} (e.g. "
                    f"{', '.join(missing[:3])}); expected {folder.name}/<wnid>/<image> for every class, with "
                    "the validation images sorted into wnid folders (as torchvision.datasets.ImageNet does)")
            splits[split] = scan_class_folders(folder, classes)
        return splits


class ImageNet100DataModule(ImageNetDataModule):
    """ImageNet-100 (EIR): the CMC class list by default; a different `classes` list skips the count check."""

    name = "ImageNet-100"
    published_counts: ClassVar[dict[str, int]] = {"train": 126_689, "test": 5_000}

    def __init__(self, root: str | None = None, train_transform: str = "npid",
                 classes: list[str] | str | None = None, **kwargs):
        super().__init__(root=root, train_transform=train_transform,
                         classes=CMC_IMAGENET100 if classes is None else classes, **kwargs)

    def expected_counts(self) -> dict[str, int]:
        return self.published_counts if sorted(self.classes) == sorted(CMC_IMAGENET100) else {}
