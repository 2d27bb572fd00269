"""Offline keypoint matching for TAC-CCL's cross-image supervision (dissertation §4.3.4).

Once, before training: SIFT keypoints of every training image (OpenCV; affine-SIFT with `asift=True`),
matched against the other images of its epoch-0 k-means cluster with Lowe's ratio test, an affine fitted
by RANSAC (confidence = inliers), and the top-k partners with at least `min_inliers` inliers kept for the
whole run. Each pair keeps the inliers' crop boxes in both images, up to `max_keypoints` inlier keypoints
and the affine between the crops. The table is cached on disk (an .npz named by a hash of the images, the
clusters and the settings), so a rerun or a resume does not match again. The matched-pair precision
against the true labels is logged for monitoring only (77 % on CUB in the dissertation).
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torchvision.transforms import functional as TF

from datamodules.base import load_image
from datamodules.files import atomic_write


def _cv2():
    try:
        import cv2
    except ImportError as err:  # pragma: no cover - a dependency of the project
        raise ImportError("offline cross pairs need OpenCV: pip install opencv-python-headless") from err
    return cv2


@dataclass
class Keypoints:
    """SIFT keypoints of one image: (n, 2) pixel (x, y) in the original image and (n, 128) descriptors."""

    points: np.ndarray
    descriptors: np.ndarray


@dataclass
class Match:
    """An image pair (a, b): `affine` (2, 3) maps b's pixels to a's; inlier points in each image."""

    affine: np.ndarray
    points_a: np.ndarray
    points_b: np.ndarray

    @property
    def inliers(self) -> int:
        return len(self.points_a)


def to_gray(image) -> np.ndarray:
    """uint8 (H, W) from a uint8 array (H, W[, C]), a PIL image or a path."""
    array = np.asarray(load_image(image).convert("L")) if not isinstance(image, np.ndarray) else image
    if array.ndim == 3:
        array = _cv2().cvtColor(array, _cv2().COLOR_RGB2GRAY)
    return np.ascontiguousarray(array, dtype=np.uint8)


def sift_keypoints(image, longer_side: int = 256, asift: bool = False) -> Keypoints:
    """SIFT (or affine-SIFT) on the image resized to `longer_side`; points in the original's pixels."""
    cv2 = _cv2()
    gray = to_gray(image)
    scale = longer_side / max(gray.shape)
    resized = cv2.resize(gray, (round(gray.shape[1] * scale), round(gray.shape[0] * scale)),
                         interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    detector = cv2.SIFT_create()
    if asift:
        detector = cv2.AffineFeature_create(detector)
    keypoints, descriptors = detector.detectAndCompute(resized, None)
    if descriptors is None:
        return Keypoints(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32))
    points = np.array([k.pt for k in keypoints], np.float32).reshape(-1, 2)
    return Keypoints((points + 0.5) / scale - 0.5, descriptors.astype(np.float32))


def match_keypoints(a: Keypoints, b: Keypoints, ratio: float = 0.75, reprojection: float = 5.0,
                    pixel_scale: float = 1.0) -> Match | None:
    """Lowe-ratio matches of b's descriptors in a's, then a RANSAC affine b -> a (`reprojection` pixels at
    the matching resolution; `pixel_scale` = original pixels per matching pixel). None if no affine."""
    cv2 = _cv2()
    if len(a.points) < 3 or len(b.points) < 3:
        return None
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(b.descriptors, a.descriptors, k=2)
    good = [m[0] for m in pairs if len(m) == 2 and m[0].distance < ratio * m[1].distance]
    if len(good) < 3:
        return None
    source = b.points[[m.queryIdx for m in good]]
    target = a.points[[m.trainIdx for m in good]]
    affine, inlier = cv2.estimateAffine2D(source, target, method=cv2.RANSAC,
                                          ransacReprojThreshold=reprojection * pixel_scale)
    if affine is None:
        return None
    keep = inlier.ravel().astype(bool)
    return Match(affine, target[keep], source[keep])


def crop_box(points: np.ndarray, shape: tuple[int, int], margin: float = 0.15, min_side: float = 64.0,
             pixel_scale: float = 1.0) -> np.ndarray:
    """(x0, y0, x1, y1) pixels: the points' box grown by `margin` per side, at least `min_side` matching
    pixels on each side, clipped to the image."""
    low, high = points.min(0), points.max(0)
    side = np.maximum((high - low) * (1 + 2 * margin), min_side * pixel_scale)
    center = (low + high) / 2
    height, width = shape
    size = np.array([width, height], np.float32)
    side = np.minimum(side, size)
    start = np.clip(center - side / 2, 0, size - side)
    return np.concatenate([start, start + side]).astype(np.float32)


def normalize_points(points: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Pixel points to the crop's normalised coordinates ([-1, 1], align_corners=False)."""
    return (2 * (points + 0.5 - box[:2]) / (box[2:] - box[:2]) - 1).astype(np.float32)


def crop_affine(affine: np.ndarray, box_a: np.ndarray, box_b: np.ndarray) -> np.ndarray:
    """(2, 3): the pixel affine b -> a rewritten between the crops' normalised coordinates."""
    def to_pixels(box):  # normalised crop point -> pixel
        half = (box[2:] - box[:2]) / 2
        return np.array([[half[0], 0, box[0] + half[0] - 0.5], [0, half[1], box[1] + half[1] - 0.5], [0, 0, 1]])
    full = np.vstack([affine, [0, 0, 1]])
    return (np.linalg.inv(to_pixels(box_a)) @ full @ to_pixels(box_b))[:2].astype(np.float32)


@dataclass
class PairTable:
    """Partners of each training image (top-k by inliers, -1 = none), fixed for the run.

    partner (N, k); inliers (N, k); box_self / box_partner (N, k, 4) pixel crops; points_self /
    points_partner (N, k, m, 2) matched inlier keypoints in normalised crop coordinates (padded, with
    `point_count` (N, k) valid); affine (N, k, 2, 3): partner-crop -> own-crop normalised coordinates."""

    partner: np.ndarray
    inliers: np.ndarray
    box_self: np.ndarray
    box_partner: np.ndarray
    points_self: np.ndarray
    points_partner: np.ndarray
    point_count: np.ndarray
    affine: np.ndarray

    def save(self, path: Path) -> None:
        """Written atomically (datamodules.files): a kill mid-save leaves no truncated cache behind."""
        atomic_write(path, lambda f: np.savez_compressed(f, **self.__dict__))

    @classmethod
    def load(cls, path: Path) -> PairTable:
        """The table cached in `path`; an unreadable or incomplete file is a ValueError naming it."""
        try:
            with np.load(path) as data:
                return cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"cross-pairs cache {path} is unreadable ({type(err).__name__}: {err}); delete it "
                             "and the pairs are mined again") from err

    def precision(self, targets: np.ndarray) -> float:
        """Share (%) of kept (image, partner) pairs of one true class: monitoring only."""
        kept = self.partner >= 0
        if not kept.any():
            return float("nan")
        own = np.broadcast_to(targets[:, None], self.partner.shape)[kept]
        return 100.0 * float((targets[self.partner[kept]] == own).mean())


def mine_pairs(images, groups: np.ndarray, top_k: int = 2, min_inliers: int = 20, ratio: float = 0.75,
               reprojection: float = 5.0, longer_side: int = 256, asift: bool = False, margin: float = 0.15,
               min_side: float = 64.0, max_keypoints: int = 20) -> PairTable:
    """Each image matched against every other image of its group (epoch-0 cluster), top-k kept."""
    n = len(images)
    gray = [to_gray(im) for im in images]
    features = [sift_keypoints(g, longer_side, asift) for g in gray]
    scales = [max(g.shape) / longer_side for g in gray]
    table = PairTable(np.full((n, top_k), -1), np.zeros((n, top_k), np.int64),
                      np.zeros((n, top_k, 4), np.float32), np.zeros((n, top_k, 4), np.float32),
                      np.zeros((n, top_k, max_keypoints, 2), np.float32),
                      np.zeros((n, top_k, max_keypoints, 2), np.float32), np.zeros((n, top_k), np.int64),
                      np.zeros((n, top_k, 2, 3), np.float32))
    for i in range(n):
        found = []
        for j in np.flatnonzero(groups == groups[i]):
            if j == i:
                continue
            match = match_keypoints(features[i], features[j], ratio, reprojection, scales[i])
            if match is not None and match.inliers >= min_inliers:
                found.append((match.inliers, j, match))
        for slot, (count, j, match) in enumerate(sorted(found, key=lambda f: -f[0])[:top_k]):
            box_i = crop_box(match.points_a, gray[i].shape, margin, min_side, scales[i])
            box_j = crop_box(match.points_b, gray[j].shape, margin, min_side, scales[j])
            m = min(count, max_keypoints)
            table.partner[i, slot], table.inliers[i, slot], table.point_count[i, slot] = j, count, m
            table.box_self[i, slot], table.box_partner[i, slot] = box_i, box_j
            table.points_self[i, slot, :m] = normalize_points(match.points_a[:m], box_i)
            table.points_partner[i, slot, :m] = normalize_points(match.points_b[:m], box_j)
            table.affine[i, slot] = crop_affine(match.affine, box_i, box_j)
    return table


def cache_key(images, groups: np.ndarray, settings: dict) -> str:
    """A hash of the images (in-memory arrays: their bytes; files: path, size and modification time, so
    an image replaced under the same name is a new key without reading every file), the clusters and the
    matching settings."""
    digest = hashlib.sha256(repr(sorted(settings.items())).encode())
    digest.update(np.asarray(groups, np.int64).tobytes())
    for item in images:
        if isinstance(item, np.ndarray):
            digest.update(repr((item.shape, str(item.dtype))).encode() + item.tobytes())
        else:
            stat = os.stat(item)
            digest.update(f"{item}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]


FLIP = np.diag([-1.0, 1.0]).astype(np.float32)


class CrossPairCrops:
    """Training-item extras (`datamodule.set_train_extras`): with probability `probability`, an image
    with partners becomes a cross item: `cross_views` = (its keypoint crop, a partner's crop), resized to
    `size` and normalised, both flipped together half the time; `cross_points` (2, m, 2) the matched
    keypoints in each crop's normalised frame, `cross_weights` (m,) which are real, `cross_affine` (2, 3)
    partner crop -> own crop. Self items carry zeros of the same shapes (the batch collates)."""

    def __init__(self, records, table: PairTable, probability: float, size: int, mean, std):
        self.items, self.table, self.probability, self.size = records.items, table, probability, size
        self.mean, self.std = list(mean), list(std)
        self.channels = len(self.mean)

    def crop(self, item, box: np.ndarray, flip: bool) -> torch.Tensor:
        image = load_image(item).resize((self.size, self.size), Image.BILINEAR, box=tuple(float(v) for v in box))
        image = image.transpose(Image.FLIP_LEFT_RIGHT) if flip else image
        return TF.normalize(TF.to_tensor(image), self.mean, self.std)

    def __call__(self, index: int, seed: int) -> dict:
        m = self.table.points_self.shape[2]
        item = {"cross": False, "cross_views": torch.zeros(2, self.channels, self.size, self.size),
                "cross_points": torch.zeros(2, m, 2), "cross_weights": torch.zeros(m),
                "cross_affine": torch.zeros(2, 3)}
        slots = np.flatnonzero(self.table.partner[index] >= 0)
        rng = np.random.default_rng(seed)
        if len(slots) == 0 or rng.random() >= self.probability:
            return item
        slot = int(rng.choice(slots))
        partner, count = int(self.table.partner[index, slot]), int(self.table.point_count[index, slot])
        flip = bool(rng.random() < 0.5)
        views = [self.crop(self.items[index], self.table.box_self[index, slot], flip),
                 self.crop(self.items[partner], self.table.box_partner[index, slot], flip)]
        points = np.stack([self.table.points_self[index, slot], self.table.points_partner[index, slot]])
        affine = self.table.affine[index, slot]
        if flip:  # mirror the keypoints; the affine between mirrored crops is F A F
            points = points @ FLIP
            affine = np.concatenate([FLIP @ affine[:, :2] @ FLIP, (FLIP @ affine[:, 2:])], 1)
        weights = np.arange(m) < count
        item.update(cross=True, cross_views=torch.stack(views), cross_points=torch.from_numpy(points.copy()),
                    cross_weights=torch.from_numpy(weights.astype(np.float32)),
                    cross_affine=torch.from_numpy(np.ascontiguousarray(affine, np.float32)))
        return item


class OfflineCrossPairs(L.Callback):
    """Mines the pair table once, at fit start, on the epoch-0 pseudo labels (list it after
    KMeansPseudoLabels), caches it in `cache_dir`, and has the training set deliver cross items (their two
    keypoint crops, `CrossPairCrops`) with probability `probability`; the module uses them in place of its
    in-batch matching. `probability` None (the default) reads the module's `offline_pair_probability`
    (TACCCL: cross.probability with cross.matching offline and a second branch on; 0 in the Baseline and
    +CCL rows, whose anchors then stay plain images and nothing is mined). Logs cross_pairs/precision (vs the
    hidden true labels, monitoring only), pairs and coverage."""

    def __init__(self, probability: float | None = None, cache_dir: str = ".cache/cross_pairs",
                 top_k: int = 2, min_inliers: int = 20,
                 ratio: float = 0.75, reprojection: float = 5.0, longer_side: int = 256, asift: bool = False,
                 margin: float = 0.15, min_side: float = 64.0, max_keypoints: int = 20):
        self.probability, self.cache_dir = probability, Path(cache_dir)
        self.settings = {"top_k": top_k, "min_inliers": min_inliers, "ratio": ratio,
                         "reprojection": reprojection, "longer_side": longer_side, "asift": asift,
                         "margin": margin, "min_side": min_side, "max_keypoints": max_keypoints}
        self.table: PairTable | None = None
        self.stats: dict[str, float] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        groups = getattr(datamodule, "pseudo_labels", None)
        if groups is None:
            raise RuntimeError("OfflineCrossPairs matches within the epoch-0 k-means clusters: list it after "
                               "callbacks.pseudo_labels.KMeansPseudoLabels in trainer.callbacks")
        probability = self.probability
        if probability is None:
            probability = getattr(pl_module, "offline_pair_probability", None)
            if probability is None:
                raise ValueError("OfflineCrossPairs(probability=None) reads the module's "
                                 f"offline_pair_probability, which {type(pl_module).__name__} lacks: pass "
                                 "a probability")
        if probability == 0:
            self.stats = {"pairs": 0.0, "coverage": 0.0}
            rank_zero_info("offline cross pairs: not used by this run (no cross pairs), nothing mined")
            return
        records = datamodule.splits["train"]
        path = self.cache_dir / f"pairs-{cache_key(records.items, groups, self.settings)}.npz"
        if path.is_file():
            self.table = PairTable.load(path)
        else:
            self.table = mine_pairs(records.items, np.asarray(groups), **self.settings)
            if trainer.is_global_zero:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.table.save(path)
        kept = self.table.partner >= 0
        self.stats = {"pairs": float(kept.sum()), "coverage": 100.0 * float(kept.any(1).mean()),
                      "precision": self.table.precision(np.asarray(records.targets))}
        rank_zero_info("offline cross pairs: " + ", ".join(f"{k} {v:.4g}" for k, v in self.stats.items()))
        datamodule.set_train_extras(CrossPairCrops(records, self.table, probability, datamodule.image_size,
                                                   datamodule.mean, datamodule.std))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log_dict({f"cross_pairs/{k}": v for k, v in self.stats.items()}, on_step=False,
                           on_epoch=True)
