"""EmbeddingDataModule: protocols, multi-view training sets and eval loaders named by role.

A dataset subclass only says how to read its images from disk (`read_records`); everything else
(protocol split, semi-supervised labeled set, views, samplers, distributed sharding, seeded
augmentation, sanity checks on what was read) lives here.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.datasets.utils import download_and_extract_archive

from datamodules.device_augment import ResidentViewDataset, device_pipeline, make_views, resident_images
from datamodules.samplers import EpochSampler, PKSampler, SubsetSampler
from datamodules.transforms import MultiView, build_transform
from embedding_core.seeds import sample_seed

__all__ = ["DatasetSizeError", "DatasetSizeWarning", "EmbeddingDataModule", "EpochSampler", "ImageDataset",
           "MultiViewDataset", "Records", "dataset_dir", "draw_labeled", "fetch_archive", "has_files", "load_image",
           "proportional_counts", "require_paths"]

EVAL_ROLES = ("reference", "query", "gallery")
HIDDEN = -1  # target value of every training sample whose label the protocol hides
SAMPLERS = ("random", "pk")
LABEL_SPLITS = ("balanced", "proportional")


class DatasetSizeWarning(UserWarning):
    """A split's image count differs from the published one, and the user allowed it (allow_partial)."""


class DatasetSizeError(ValueError):
    """A split's image count differs from the published one (a partial or different copy of the data):
    its results would not be comparable with the papers, so it fails unless allow_partial is set."""


@dataclass(frozen=True)
class Records:
    """Images (uint8 arrays HxW[xC] or file paths) with integer class targets, aligned by position."""

    items: Sequence
    targets: np.ndarray

    def __post_init__(self):
        if len(self.items) != len(self.targets):
            raise ValueError(f"Records: {len(self.items)} items but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.targets)

    def select(self, mask_or_index) -> Records:
        index = np.flatnonzero(mask_or_index) if np.asarray(mask_or_index).dtype == bool else mask_or_index
        index = np.asarray(index, dtype=np.int64)
        items = self.items[index] if isinstance(self.items, np.ndarray) else [self.items[i] for i in index]
        return Records(items, np.asarray(self.targets)[index])

    def by_class(self, classes) -> Records:
        """The records whose target is in `classes`, re-labelled 0..len(classes)-1 in sorted order."""
        classes = np.sort(np.asarray(list(classes)))
        kept = self.select(np.isin(self.targets, classes))
        return Records(kept.items, np.searchsorted(classes, kept.targets))


# Pillow identifies a file by its bytes, not its name: without this list an EPS renamed .jpg would be
# handed to Ghostscript. These are the raster formats photo datasets ship in (decoders, no interpreters).
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "PPM", "TIFF", "WEBP", "GIF")


def load_image(item) -> Image.Image:
    """A PIL image from an in-memory uint8 array or a file; a broken file names its path."""
    if isinstance(item, np.ndarray):
        return Image.fromarray(item)
    try:
        with Image.open(item, formats=IMAGE_FORMATS) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as err:
        raise OSError(f"cannot read image {item!r} ({err}); delete or replace the file") from err


def run_seed() -> int:
    """The seed seed_everything set in this process (LightningCLI's `seed_everything`), else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", "0"))


def require_paths(name: str, root: str | os.PathLike | None, paths: Sequence[str], url: str,
                  hint: str = "") -> Path:
    """`root` as a Path once every expected file/folder exists under it; otherwise a FileNotFoundError
    that lists what is expected and where the dataset is published."""
    if root is None:
        problem = f"{name} needs a data root: pass --data.root"
    elif not Path(root).is_dir():
        problem = f"{name} root {str(root)!r} does not exist"
    else:
        missing = [p for p in paths if not (Path(root) / p).exists()]
        if not missing:
            return Path(root)
        problem = f"{name}: {', '.join(missing)} missing under {str(root)!r}"
    expected = "\n".join(f"  {p}" for p in paths)
    raise FileNotFoundError(f"{problem}.\nExpected under the root:\n{expected}\n"
                            f"The dataset is published at {url}{hint}")


def has_files(root: str | os.PathLike | None, paths: Sequence[str]) -> bool:
    return root is not None and all((Path(root) / p).exists() for p in paths)


DOWNLOAD_HINT = "; or pass --data.download true to fetch it with torchvision"


def fetch_archive(root: str | os.PathLike, folder: str, paths: Sequence[str], url: str, filename: str,
                  md5: str) -> None:
    """Download and unpack a dataset's official archive into root with torchvision's downloader, unless its
    files are already there: in root itself or in root/<folder> (the layout the archive unpacks to)."""
    if not (has_files(root, paths) or has_files(Path(root) / folder, paths)):
        download_and_extract_archive(url, root, filename=filename, md5=md5)


def dataset_dir(name: str, root: str | os.PathLike | None, folder: str, paths: Sequence[str], url: str,
                hint: str = "") -> Path:
    """The folder that holds `paths`: root itself, or root/<folder> (the layout the archive unpacks to)."""
    if has_files(root, paths):
        return Path(root)
    return require_paths(name, root, [f"{folder}/{p}" for p in paths], url, hint) / folder


def proportional_counts(class_sizes, total: int) -> np.ndarray:
    """Labels per class for `total` labels that follow the class histogram, as MixMatch's create_split.py
    draws them [C] (SVHN's classes are skewed; a balanced draw would not keep them): each label in turn goes
    to the class furthest below its share, the largest size / max size - count / max(max count, 1), the
    lower class index on a tie. Empty classes get none; with total >= the classes, every other gets one."""
    sizes = np.asarray(class_sizes, dtype=np.float64)
    if not 0 < total <= sizes.sum():
        raise ValueError(f"a proportional split of {total} labels needs between 1 and {int(sizes.sum())} (every "
                         "image); change --data.labels_per_class")
    share = np.where(sizes > 0, sizes / sizes.max(), -np.inf)
    counts = np.zeros(len(sizes), dtype=np.int64)
    for _ in range(total):
        counts[np.argmax(share - counts / max(counts.max(), 1))] += 1
    return counts


def draw_labeled(targets: np.ndarray, per_class: int, seed: int, split: str = "balanced") -> np.ndarray:
    """Sorted indices of the labeled images, drawn with `seed` (the semi-supervised split): `per_class` of
    every class (balanced), or `per_class` x classes in all, in proportion to the class sizes (proportional,
    see `proportional_counts`)."""
    if split not in LABEL_SPLITS:
        raise ValueError(f"label_split {split!r} is not one of {LABEL_SPLITS}")
    classes = np.unique(targets[targets >= 0])
    members = [np.flatnonzero(targets == c) for c in classes]
    counts = (proportional_counts([len(m) for m in members], per_class * len(classes))
              if split == "proportional" else [per_class] * len(classes))
    rng = np.random.default_rng(seed)
    picks = []
    for c, m, count in zip(classes, members, counts):
        if len(m) < count:
            raise ValueError(f"class {c} has {len(m)} training images, fewer than labels_per_class="
                             f"{count}; lower --data.labels_per_class")
        picks.append(rng.choice(m, size=count, replace=False))
    return np.sort(np.concatenate(picks))


def unreadable_images(paths: Sequence[str]) -> list[str]:
    """'path: reason' for every image file that PIL cannot decode."""
    def reason(path) -> str | None:
        try:
            load_image(path)
        except OSError as err:
            return str(err.__cause__ or err)
        return None

    with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) * 4)) as pool:
        reasons = list(pool.map(reason, paths))
    return [f"{path}: {why}" for path, why in zip(paths, reasons) if why is not None]


def seeded(fn: Callable, x, seed: int):
    """fn(x) with the CPU generator (which torchvision's random transforms draw from) seeded, and its
    previous state restored. torch.manual_seed would also seed CUDA and cost ~3 ms a call."""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        return fn(x)
    finally:
        generator.set_state(state)


class ImageDataset(Dataset):
    """Evaluation items: {"image", "index", "target"}; deterministic transform. The target is -1 unless
    revealed (the training split seen through the eval transform keeps its labels hidden)."""

    def __init__(self, records: Records, transform: Callable, reveal_targets: bool = True):
        self.records, self.transform, self.reveal_targets = records, transform, reveal_targets

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        image = self.transform(load_image(self.records.items[index]))
        target = int(self.records.targets[index]) if self.reveal_targets else HIDDEN
        return {"image": image, "index": index, "target": target}


class MultiViewDataset(Dataset):
    """Training items: {"views": [view, ...], "index", "target"}, with the target hidden (-1) unless the
    protocol reveals it, so that an unsupervised method cannot read a label even by mistake.
    Accepts an int index or an (index, draw) pair from a sampler that repeats images within an epoch."""

    def __init__(self, records: Records, transform: Callable, num_views: int, seed: int = 0,
                 reveal_targets: bool = False, partners: np.ndarray | None = None):
        self.records, self.views, self.seed = records, MultiView(transform, num_views), seed
        self.reveal_targets = reveal_targets
        self.partners = partners  # views after the first come from image partners[i] (NN positives)
        self.extras: Callable[[int, int], dict] | None = None  # more fields per item (set_train_extras)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key) -> dict:
        index, draw = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)
        image = load_image(self.records.items[index])
        views = seeded(self.views, image, sample_seed(self.seed, self.epoch, index, draw))
        if self.partners is not None and self.partners[index] != index:
            partner = load_image(self.records.items[self.partners[index]])
            views[1:] = seeded(self.views, partner, sample_seed(self.seed, self.epoch, index, draw + 1))[1:]
        target = int(self.records.targets[index]) if self.reveal_targets else HIDDEN
        item = {"views": views, "index": index, "target": target}
        if self.extras is not None:
            item.update(self.extras(index, sample_seed(self.seed, self.epoch, index, draw + 2)))
        return item


class EmbeddingDataModule(L.LightningDataModule):
    """Protocol-aware DataModule.

    protocol:
      - "seen": train on the train split (labels hidden); eval loaders `reference` (the reader's
        "reference" split if it has one, else the train split; eval transform, labels) and `query`
        (test split).
      - "unseen": classes split in two by the reader; eval loader `query` (test classes, leave-one-out
        retrieval), plus `gallery` for datasets with a query/gallery split.
      - "semi": `labels_per_class` training images per class keep their label (drawn with `split_seed`),
        the rest form the unlabeled pool; `train_dataloader` returns {"labeled", "unlabeled"} loaders,
        eval loader `query` (test split, for val/error). Discovery callbacks grow the labeled set with
        `add_labeled` and restore it with `reset_labeled`.
    Subclasses implement `read_records()` -> {"train": Records, "test": Records} (or "query"/"gallery";
    optionally "reference"), and set `name`, `mean`/`std` and `published_counts` as class attributes
    (override `expected_counts` when the counts depend on an option).

    Other options:
      supervised: reveal the training targets (supervised DML baselines); P x K then runs on true labels.
      sampler: "random" (shuffled instances) or "pk" (P classes x K = samples_per_class images per batch,
        P = per-process batch / K) over true labels (supervised) or pseudo labels (`set_pseudo_labels`).
      labeled_batch_size: labeled images per step in "semi" (default batch_size); the labeled set is
        cycled to as many batches as the unlabeled loader has.
      steps_per_epoch: "semi" steps per epoch (MixMatch's 1,024-step epoch), the unlabeled pool cycled to
        it; None: one pass over the pool.
      unlabeled_includes_labeled: "semi" unlabeled pool = the whole train split (Mean-Teacher convention)
        instead of the images without a label (MixMatch convention).
      seed: seeds the training order and every augmentation draw (per sample and epoch). None: the run's
        seed (seed_everything), so runs over seeds differ in their data as well as their initialisation.
      split_seed: seeds every random split the module draws (semi labeled set; digits/folder splits).
        None: the run's seed (seed_everything), so one seed draws the split and the initialisation.
      mean, std: override the dataset's normalisation for a from-scratch backbone; a pretrained backbone
        sets its own (`set_input_normalization`), and a mean/std that contradicts it is an error.
      verify_images: decode every image file at setup and list all unreadable ones in one error.
      allow_partial: run on a copy whose image counts differ from the published ones (a warning instead
        of the DatasetSizeError; tiny test fixtures, subsets).
      device_resident: the fast path: the decoded training split is held on the training device as one uint8
        tensor and the train preset runs batched there (datamodules/device_augment.py); loaders carry only
        indices and per-sample uniforms. For the in-memory datasets (digits, CIFAR, STL-10, SVHN) at their
        native size; the eval loaders are unchanged. None (the default): on for a run on a CUDA GPU where the
        path applies (`resident_path_applies`), off on the CPU, where the network, not the data, is the
        bottleneck and the PIL path's workers run beside it (`make bench` cpu_step).
      resize_size: the side the resizing presets resize to before cropping image_size (None: 256 at the
        papers' 224/227, else round(image_size * 256 / 224); see datamodules/transforms.py).
    """

    name: str = "dataset"
    protocols: tuple[str, ...] = ("seen", "unseen")
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    published_counts: ClassVar[dict[str, int]] = {}  # reader split -> images in the official release

    def __init__(
        self,
        root: str | None = None,
        protocol: str = "seen",
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        num_views: int = 2,
        train_transform: str = "npid",
        eval_transform: str = "plain",
        image_size: int = 32,
        drop_ops: Sequence[str] = (),
        drop_last: bool = True,
        seed: int | None = None,
        supervised: bool = False,
        sampler: str = "random",
        samples_per_class: int = 5,
        labels_per_class: int = 25,
        labeled_batch_size: int | None = None,
        unlabeled_includes_labeled: bool = False,
        split_seed: int | None = 0,
        label_split: str = "balanced",
        steps_per_epoch: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        verify_images: bool = False,
        allow_partial: bool = False,
        resize_size: int | None = None,
        device_resident: bool | None = None,
    ):
        super().__init__()
        if protocol not in self.protocols:
            raise ValueError(f"{type(self).__name__}: protocol {protocol!r} is not one of {self.protocols}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler {sampler!r} is not one of {SAMPLERS}")
        if protocol == "semi" and (supervised or sampler != "random"):
            raise ValueError("protocol 'semi' has its own labeled/unlabeled loaders: leave supervised=False "
                             "and sampler='random'")
        self.root = None if root is None else os.path.expanduser(root)
        self.protocol, self.batch_size, self.eval_batch_size = protocol, batch_size, eval_batch_size
        self.num_workers, self.num_views, self.drop_last, self.seed = num_workers, num_views, drop_last, seed
        self.supervised, self.sampler, self.samples_per_class = supervised, sampler, samples_per_class
        self.labels_per_class, self.labeled_batch_size = labels_per_class, labeled_batch_size or batch_size
        self.unlabeled_includes_labeled, self.split_seed = unlabeled_includes_labeled, split_seed
        if label_split not in LABEL_SPLITS:
            raise ValueError(f"label_split {label_split!r} is not one of {LABEL_SPLITS}; set "
                             f"--data.label_split to one of them")
        self.label_split = label_split
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch {steps_per_epoch}: use a positive count, or None for one pass")
        self.steps_per_epoch = steps_per_epoch
        self.verify_images, self.allow_partial = verify_images, allow_partial
        if mean is not None or std is not None:
            self.mean = tuple(mean) if mean is not None else self.mean
            self.std = tuple(std) if std is not None else self.std
        self._requested_normalization = (mean, std)  # what the user passed, checked against a backbone's
        self._presets = (train_transform, eval_transform, tuple(drop_ops))
        self.image_size = image_size
        self.resize_size = resize_size
        self.device_resident = device_resident
        self._resident: torch.Tensor | None = None  # device path: the training split, uint8 on the device
        self._build_transforms()
        self.splits: dict[str, Records] | None = None
        self.pseudo_labels: np.ndarray | None = None
        self._pk_sampler: PKSampler | None = None
        self.positive_partners: np.ndarray | None = None
        self.train_extras: Callable[[int, int], dict] | None = None
        self._train_set: MultiViewDataset | None = None
        self._original_labeled: np.ndarray | None = None
        self._label_table: np.ndarray | None = None  # semi: label per train image, -1 = unlabeled
        self._lookahead_table: np.ndarray | None = None  # semi, after enable_lookahead: the look-ahead set

    # -- what a dataset subclass provides -------------------------------------------------------
    def read_records(self) -> dict[str, Records]:
        raise NotImplementedError

    # -- protocol ---------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        if self.seed is None:
            self.seed = run_seed()
        if self.split_seed is None:
            self.split_seed = run_seed()
        records = self.read_records()
        self.check_counts(records)
        splits = self.protocol_splits(records)
        for role, split in splits.items():
            if len(split) == 0:
                raise ValueError(f"{self.name}: the {role!r} split is empty; --data.root {self.root!r} must "
                                 "hold the whole dataset")
        if self.verify_images:
            self.check_images(splits)
        if self.protocol == "semi":
            targets = np.asarray(splits["train"].targets)
            self._original_labeled = draw_labeled(targets, self.labels_per_class, self.split_seed,
                                                  self.label_split)
            self._label_table = np.empty(len(targets), dtype=np.int64)
            self._restore_drawn_labels(targets)
        self.splits = splits
        if self.device_resident is None:
            self.resolve_device_resident()

    def resolve_device_resident(self) -> None:
        """device_resident=None becomes True for a run on a CUDA GPU when `resident_path_applies`, else False."""
        trainer = getattr(self, "trainer", None)
        on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        self.device_resident = bool(on_gpu and self.resident_path_applies())
        if self.device_resident:
            self._build_transforms()

    def resident_path_applies(self) -> bool:
        """Whether the device path can run this dataset: its training split decoded into one uint8 array at the
        network's image size, and a train preset with a batched form (datamodules/device_augment.py)."""
        items = self.splits["train"].items
        if not (isinstance(items, np.ndarray) and items.dtype == np.uint8 and items.ndim in (3, 4)):
            return False
        if tuple(items.shape[1:3]) != (self.image_size, self.image_size):
            return False
        try:
            device_pipeline(self.train_transform, self.image_size)
        except (ValueError, TypeError):
            return False
        return True

    def protocol_splits(self, records: dict[str, Records]) -> dict[str, Records]:
        """Map the reader's splits to the training set and the eval roles of the protocol."""
        if self.protocol == "seen":
            return {"train": records["train"], "reference": records.get("reference", records["train"]),
                    "query": records["test"]}
        if "gallery" in records:
            return {"train": records["train"], "query": records["query"], "gallery": records["gallery"]}
        return {"train": records["train"], "query": records["test"]}

    def expected_counts(self) -> dict[str, int]:
        """Published image count per reader split, for the variant configured (default: the class's)."""
        return self.published_counts

    def check_counts(self, records: dict[str, Records]) -> None:
        """Fail (DatasetSizeError) when a split's size differs from the published one; only warn
        (DatasetSizeWarning) when allow_partial is set."""
        lines = []
        for split, expected in self.expected_counts().items():
            count = len(records[split]) if split in records else expected
            if count != expected:
                lines.append(f"{self.name} {split}: {count:,} images, published {expected:,} "
                             f"({abs(count - expected):,} {'fewer' if count < expected else 'more'})")
        if not lines:
            return
        problem = "; ".join(lines) + f". Results on this copy ({self.root!r}) are not comparable with the papers"
        if not self.allow_partial:
            raise DatasetSizeError(f"{problem}: point --data.root at the complete dataset, or pass "
                                   "--data.allow_partial=true to run on this copy anyway (a warning instead).")
        rank_zero_warn(problem + " (--data.allow_partial=true).", category=DatasetSizeWarning)

    def check_images(self, splits: dict[str, Records]) -> None:
        """Decode every image file once, so a broken download fails now with the full list of bad files."""
        paths = dict.fromkeys(item for split in splits.values() if not isinstance(split.items, np.ndarray)
                              for item in split.items)
        bad = unreadable_images(list(paths))
        if bad:
            listed = "\n  ".join(bad[:20]) + ("\n  ..." if len(bad) > 20 else "")
            raise OSError(f"{self.name}: {len(bad)} unreadable image(s):\n  {listed}\n"
                          "Delete or replace these files (or unpack the dataset again).")

    @property
    def eval_roles(self) -> list[str]:
        """Roles of the loaders `val_dataloader` returns, in order; the evaluator reads these."""
        self.setup()
        return [role for role in EVAL_ROLES if role in self.splits]

    @property
    def num_classes(self) -> dict[str, int]:
        self.setup()
        return {role: len(np.unique(r.targets[r.targets >= 0])) for role, r in self.splits.items()}

    def set_input_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """The normalisation a pretrained backbone's weights expect replaces the dataset's statistics in the
        train and eval transforms (EmbeddingModule.setup calls it before any loader is built). A mean or std
        the user passed explicitly that differs is a contradiction, so it fails instead of being ignored."""
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        for flag, asked, wanted in zip(("mean", "std"), self._requested_normalization, (mean, std)):
            if asked is not None and not np.allclose(asked, wanted, rtol=0, atol=1e-6):
                raise ValueError(f"--data.{flag}={list(asked)} contradicts the pretrained backbone, whose weights "
                                 f"expect mean {list(mean)}, std {list(std)} (set by the backbone itself); drop "
                                 "--data.mean / --data.std (and the config's mean:/std: lines)")
        self.mean, self.std = mean, std
        self._build_transforms()

    def _build_transforms(self) -> None:
        """The train and eval transforms from the presets, image_size, resize_size and mean / std."""
        train, evaluation, drop_ops = self._presets
        self.train_transform = build_transform(train, self.image_size, self.mean, self.std, drop_ops,
                                               resize=self.resize_size)
        self.eval_transform = build_transform(evaluation, self.image_size, self.mean, self.std,
                                              resize=self.resize_size)
        self.device_train = device_pipeline(self.train_transform, self.image_size) if self.device_resident else None

    # -- pseudo labels (P x K sampling) ------------------------------------------------------------
    def set_pseudo_labels(self, labels) -> None:
        """Cluster ids of the training images (one per train-split image, -1 = unassigned) from a
        pseudo-label callback. P x K batches are drawn over them from the next epoch's iterator on
        (call it in on_fit_start for the first epoch). Every rank must pass the same labels."""
        self.setup()
        labels = torch.as_tensor(labels).detach().cpu().numpy().astype(np.int64)
        if labels.shape != (len(self.splits["train"]),):
            raise ValueError(f"set_pseudo_labels: {labels.shape} labels for {len(self.splits['train'])} "
                             "training images")
        if self.sampler == "pk":
            per_rank = self._per_rank(self.batch_size)
            per_batch = per_rank // self.samples_per_class
            clusters = len(np.unique(labels[labels >= 0]))
            if clusters < per_batch:
                raise ValueError(f"set_pseudo_labels: {clusters} clusters, but a P x K batch draws P = {per_batch} "
                                 f"of them ({per_rank} images per process / samples_per_class "
                                 f"{self.samples_per_class}): use at least {per_batch} clusters, or lower "
                                 "--data.init_args.batch_size, or raise --data.init_args.samples_per_class")
        self.pseudo_labels = labels
        if self._pk_sampler is not None:
            self._pk_sampler.set_labels(labels)

    def set_positive_partners(self, partners) -> None:
        """partners[i]: the training image whose augmentation is image i's positive view (i itself = a
        second view of the same image; ISIF's nearest-neighbour positives otherwise). Applies from the next
        epoch's iterator on (call it in on_fit_start for the first epoch). Every rank passes the same."""
        self.setup()
        partners = torch.as_tensor(partners).detach().cpu().numpy().astype(np.int64)
        n = len(self.splits["train"])
        if partners.shape != (n,) or partners.min() < 0 or partners.max() >= n:
            raise ValueError(f"set_positive_partners: need {n} indices into the training split, got shape "
                             f"{partners.shape}")
        self.positive_partners = partners
        if self._train_set is not None:
            self._train_set.partners = partners

    def set_train_extras(self, extras: Callable[[int, int], dict] | None) -> None:
        """extras(index, seed) -> fixed-shape fields added to every training item (TAC-CCL's offline
        cross-pair crops). Applies from the next epoch's iterator on (call it in on_fit_start)."""
        self.train_extras = extras
        if self._train_set is not None:
            self._train_set.extras = extras

    # -- semi-supervised labeled set -------------------------------------------------------------
    def _require_semi(self) -> None:
        if self.protocol != "semi":
            raise RuntimeError(f"the labeled/unlabeled split exists only with protocol 'semi' (got "
                               f"{self.protocol!r}); set --data.protocol semi")
        self.setup()

    def _current_labeled(self) -> np.ndarray:
        return np.flatnonzero(self._label_table >= 0)

    @property
    def labeled_indices(self) -> np.ndarray:
        """Train-split indices that carry a label now: the drawn ones plus those added since."""
        self._require_semi()
        return self._current_labeled()

    @property
    def labeled_targets(self) -> np.ndarray:
        """Labels of `labeled_indices`: ground truth for the drawn images, the given label for added ones."""
        self._require_semi()
        return self._label_table[self._current_labeled()].copy()

    @property
    def unlabeled_indices(self) -> np.ndarray:
        """The unlabeled pool (fixed for the run): images outside the drawn labeled set, or all of them."""
        self._require_semi()
        everything = np.arange(len(self.splits["train"]))
        if self.unlabeled_includes_labeled:
            return everything
        return np.setdiff1d(everything, self._original_labeled)

    def add_labeled(self, indices, labels) -> None:
        """Give (pseudo) labels to unlabeled train images (sample discovery); used by the labeled loader from
        its next epoch on. The images stay in the unlabeled pool. Every rank must make the same call."""
        self._require_semi()
        indices = torch.as_tensor(indices).detach().cpu().numpy().astype(np.int64)
        labels = torch.as_tensor(labels).detach().cpu().numpy().astype(np.int64)
        classes = int(self.splits["train"].targets.max()) + 1
        if indices.ndim != 1 or indices.shape != labels.shape:
            raise ValueError(f"add_labeled: indices {indices.shape} and labels {labels.shape} must be "
                             "1-D and aligned")
        if len(np.unique(indices)) != len(indices) or indices.min(initial=0) < 0 \
                or indices.max(initial=0) >= len(self._label_table):
            raise ValueError("add_labeled: indices must be distinct train-split indices")
        if labels.min(initial=0) < 0 or labels.max(initial=0) >= classes:
            raise ValueError(f"add_labeled: labels must lie in 0..{classes - 1}")
        already = indices[self._label_table[indices] >= 0]
        if len(already):
            raise ValueError(f"add_labeled: {len(already)} images already have a label (e.g. index "
                             f"{already[0]}); discover among the images outside labeled_indices, or call "
                             "reset_labeled() first")
        self._label_table[indices] = labels

    # -- look-ahead labeled set (LMCS: the master trains on new labels a generation before the student)
    def enable_lookahead(self) -> None:
        """Add a "lookahead" loader to the semi batch: one view of the labeled set plus the images given by
        `set_lookahead` (which the "labeled" loader does not see), labeled_batch_size rows. Call it before the
        loaders are built (a module's `setup`)."""
        self._require_semi()
        if self._lookahead_table is None:
            self._lookahead_table = self._label_table.copy()

    def set_lookahead(self, indices, labels) -> None:
        """The look-ahead set = the labeled set plus these (index, label) pairs, replacing the previous ones
        (release those first with `add_labeled`). Every rank must make the same call."""
        if self._lookahead_table is None:
            raise RuntimeError("set_lookahead before enable_lookahead: the module enables it in its setup")
        indices = torch.as_tensor(indices).detach().cpu().numpy().astype(np.int64)
        if len(indices) and (self._label_table[indices] >= 0).any():
            raise ValueError("set_lookahead: some images already have a label; look ahead on unlabeled ones")
        self._lookahead_table[:] = self._label_table
        self._lookahead_table[indices] = torch.as_tensor(labels).detach().cpu().numpy().astype(np.int64)

    @property
    def lookahead_indices(self) -> np.ndarray:
        """Train-split indices of the look-ahead set (labeled + look-ahead images)."""
        return np.flatnonzero(self._lookahead_table >= 0)

    def reset_labeled(self) -> None:
        """Back to the drawn labeled set (a new Snowball generation), in place so live loaders see it."""
        self._require_semi()
        self._restore_drawn_labels(np.asarray(self.splits["train"].targets))

    def _restore_drawn_labels(self, targets: np.ndarray) -> None:
        self._label_table[:] = HIDDEN
        self._label_table[self._original_labeled] = targets[self._original_labeled]

    # -- state (resume) -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {}
        if self.pseudo_labels is not None:
            state["pseudo_labels"] = torch.from_numpy(self.pseudo_labels.copy())
        if self._label_table is not None:
            state["label_table"] = torch.from_numpy(self._label_table.copy())
        if self._lookahead_table is not None:
            state["lookahead_table"] = torch.from_numpy(self._lookahead_table.copy())
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        if "pseudo_labels" in state_dict:
            self.set_pseudo_labels(state_dict["pseudo_labels"])
        if "label_table" in state_dict:
            self._require_semi()
            self._label_table[:] = state_dict["label_table"].numpy()
        if "lookahead_table" in state_dict:
            self.enable_lookahead()
            self._lookahead_table[:] = state_dict["lookahead_table"].numpy()

    # -- loaders ----------------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _per_rank(self, batch_size: int) -> int:
        world, _ = self._world()
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by the {world} processes")
        return batch_size // world

    def _loader(self, dataset: Dataset, sampler: DistributedSampler, batch_size: int,
                drop_last: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=self.num_workers,
                          drop_last=drop_last, pin_memory=torch.cuda.is_available())

    def _loader_epoch(self) -> int:
        """The epoch Lightning will pass to set_epoch. A resumed fit builds its first iterator (and its
        workers, with a copy of the dataset) before that call, so the loader must start there already."""
        return self.trainer.fit_loop.epoch_progress.current.processed if self.trainer is not None else 0

    def _training_loader(self, dataset: Dataset, sampler: EpochSampler, batch_size: int,
                         drop_last: bool = True) -> DataLoader:
        sampler.set_epoch(self._loader_epoch())
        if drop_last and len(sampler) < batch_size:
            raise ValueError(f"{self.name}: {len(sampler)} training images per process, fewer than one batch "
                             f"of {batch_size}; lower --data.batch_size")
        return self._loader(dataset, sampler, batch_size, drop_last)

    def _views_dataset(self, records: Records, transform: Callable, num_views: int, seed: int = 0,
                       reveal_targets: bool = False, partners: np.ndarray | None = None) -> Dataset:
        """MultiViewDataset, or on the device path its index-and-noise twin (views made on the device)."""
        if not self.device_resident:
            return MultiViewDataset(records, transform, num_views, seed, reveal_targets, partners)
        return ResidentViewDataset(records.targets, self.device_train.draws, num_views, seed, reveal_targets,
                                   partners)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Device path: training batches (and the semi dict of them) get their views here, on the device."""
        if not self.device_resident or not isinstance(batch, dict):
            return batch
        if "noise" not in batch:
            return {k: self.on_after_batch_transfer(v, dataloader_idx) if isinstance(v, dict) else v
                    for k, v in batch.items()}
        device = batch["noise"].device
        if self._resident is None or self._resident.device != device:
            self._resident = resident_images(self.splits["train"].items).to(device)
        return make_views(batch, self._resident, self.device_train)

    def train_dataset(self) -> MultiViewDataset:
        self.setup()
        self._train_set = self._views_dataset(self.splits["train"], self.train_transform, self.num_views,
                                              seed=self.seed, reveal_targets=self.supervised,
                                              partners=self.positive_partners)
        self._train_set.extras = self.train_extras
        return self._train_set

    def train_dataloader(self) -> DataLoader | dict[str, DataLoader]:
        if self.protocol == "semi":
            loaders = {"labeled": self.labeled_dataloader(), "unlabeled": self.unlabeled_dataloader()}
            if self._lookahead_table is not None:
                loaders["lookahead"] = self.labeled_dataloader(lookahead=True)
            return loaders
        dataset = self.train_dataset()
        world, rank = self._world()
        per_rank = self._per_rank(self.batch_size)
        if self.sampler == "pk":
            if per_rank % self.samples_per_class:
                raise ValueError(f"{per_rank} images per process and batch is not a multiple of "
                                 f"samples_per_class {self.samples_per_class}; change --data.batch_size")
            labels = self.splits["train"].targets if self.supervised else self.pseudo_labels
            self._pk_sampler = PKSampler(labels, per_rank // self.samples_per_class, self.samples_per_class,
                                         num_replicas=world, rank=rank, seed=self.seed, dataset=dataset)
            return self._training_loader(dataset, self._pk_sampler, per_rank)
        sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed,
                               drop_last=self.drop_last)
        return self._training_loader(dataset, sampler, per_rank, self.drop_last)

    def unlabeled_dataloader(self) -> DataLoader:
        """Semi: the unlabeled pool, multi-view, targets hidden; one pass per epoch, or cycled (a fresh
        permutation per pass) to `steps_per_epoch` batches."""
        self._require_semi()
        dataset = self._views_dataset(self.splits["train"], self.train_transform, self.num_views,
                                      seed=self.seed)
        world, rank = self._world()
        per_rank = self._per_rank(self.batch_size)
        cycled = self.steps_per_epoch * per_rank if self.steps_per_epoch else None
        sampler = SubsetSampler(dataset, self.unlabeled_indices, num_samples=cycled, num_replicas=world,
                                rank=rank, seed=self.seed)
        return self._training_loader(dataset, sampler, per_rank)

    def labeled_dataloader(self, lookahead: bool = False) -> DataLoader:
        """Semi: the current labeled set, multi-view, targets revealed, cycled to as many batches as the
        unlabeled loader has (each repeat of an image gets a fresh augmentation). lookahead: the look-ahead
        set instead, one view, its own seed."""
        self._require_semi()
        table = self._lookahead_table if lookahead else self._label_table
        labeled = Records(self.splits["train"].items, table)  # shares the table: sees add_labeled
        # seed + 1: its own augmentation stream, apart from the same image's draw in the unlabeled loader
        seed = self.seed + (2 if lookahead else 1)
        dataset = self._views_dataset(labeled, self.train_transform, 1 if lookahead else self.num_views,
                                      seed=seed, reveal_targets=True)
        world, rank = self._world()
        per_rank = self._per_rank(self.labeled_batch_size)
        steps = self.steps_per_epoch or len(self.unlabeled_indices) // world // self._per_rank(self.batch_size)
        subset = (lambda: np.flatnonzero(table >= 0)) if lookahead else self._current_labeled
        sampler = SubsetSampler(dataset, subset, num_samples=max(steps, 1) * per_rank,
                                num_replicas=world, rank=rank, seed=seed)
        loader = self._training_loader(dataset, sampler, per_rank)
        if lookahead:  # its iterators' worker seeds come from its own generator, not the global stream, so
            loader.generator = torch.Generator().manual_seed(seed)  # the other loaders' runs stay as without it
        return loader

    def _eval_loader(self, records: Records, reveal_targets: bool) -> DataLoader:
        dataset = ImageDataset(records, self.eval_transform, reveal_targets=reveal_targets)
        world, rank = self._world()
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False, drop_last=False)
        return self._loader(dataset, sampler, self.eval_batch_size, drop_last=False)

    def eval_dataloader(self, role: str) -> DataLoader:
        if role not in self.eval_roles:
            raise ValueError(f"no eval role {role!r} under protocol {self.protocol!r}; roles: "
                             f"{self.eval_roles}")
        return self._eval_loader(self.splits[role], reveal_targets=True)

    def train_eval_dataloader(self, reveal_targets: bool = False) -> DataLoader:
        """The training split in order through the eval transform, for feature extraction (k-means pseudo
        labels, sample discovery, nearest-neighbour positives). Targets stay hidden unless asked for
        (monitoring only). Sharded like the eval loaders: drop the padding by `index`."""
        self.setup()
        return self._eval_loader(self.splits["train"], reveal_targets)

    def val_dataloader(self) -> list[DataLoader]:
        return [self.eval_dataloader(role) for role in self.eval_roles]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()


class RetrievalDataModule(EmbeddingDataModule):
    """The metric-learning benchmarks (CUB, Cars196, SOP, In-Shop): unseen classes only, ImageNet
    statistics (pretrained backbones), 227-pixel crops with the fine-grained augmentation by default."""

    protocols = ("unseen",)
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(self, root: str | None = None, protocol: str = "unseen", image_size: int = 227,
                 train_transform: str = "fine_grained", eval_transform: str = "center", **kwargs):
        super().__init__(root=root, protocol=protocol, image_size=image_size, train_transform=train_transform,
                         eval_transform=eval_transform, **kwargs)
