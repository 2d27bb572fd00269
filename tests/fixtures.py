"""Tiny datasets written in each dataset's exact on-disk format, for tests and smoke runs.

Every writer takes the folder to write into and returns the path to pass as `--data.root`. Pixel values
come from `pattern(index, height, width)`, so a test can check that a reader puts every pixel back in
place (row/column/channel order). Their image counts differ from the published ones, so a DataModule built
on them needs allow_partial=True (`--data.allow_partial=true`), or its setup raises DatasetSizeError.
"""
from __future__ import annotations

import pickle
from collections.abc import Sequence
from itertools import zip_longest
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat


def pattern(index: int, height: int, width: int) -> np.ndarray:
    """A uint8 HxWx3 image that differs along rows, columns and channels, and from image to image."""
    y, x, c = np.meshgrid(np.arange(height), np.arange(width), np.arange(3), indexing="ij")
    return ((index * 37 + y * 3 + x * 7 + c * 61) % 256).astype(np.uint8)


def write_jpeg(path: Path, index: int, size: tuple[int, int] = (20, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pattern(index, size[1], size[0])).save(path, quality=95)


def write_corrupt_image(path: Path) -> None:
    """Bytes that PIL cannot decode, under an image file name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not an image at all")


def class_labels(num_classes: int, per_class: int) -> np.ndarray:
    """0,1,..,C-1 repeated per_class times (classes interleaved, as in the real files)."""
    return np.tile(np.arange(num_classes), per_class)


# -- CIFAR ------------------------------------------------------------------------------------------
def _cifar_rows(first_index: int, count: int) -> np.ndarray:
    """(count, 3072) rows: each image's R plane, G plane, B plane, each row-major."""
    return np.stack([pattern(first_index + i, 32, 32).transpose(2, 0, 1).reshape(-1) for i in range(count)])


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: Path, per_class: int = 3, test_per_class: int = 2) -> Path:
    """root/cifar-10-batches-py/: data_batch_1..5 (train images dealt round-robin), test_batch, batches.meta.
    Train image i has pattern(i); test image j has pattern(1000 + j)."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    labels, data = class_labels(10, per_class), _cifar_rows(0, 10 * per_class)
    for b in range(5):
        keep = np.arange(b, len(labels), 5)
        _pickle(folder / f"data_batch_{b + 1}", {"batch_label": f"training batch {b + 1} of 5",
                                                 "data": data[keep], "labels": labels[keep].tolist(),
                                                 "filenames": [f"img_{i}.png" for i in keep]})
    test_labels = class_labels(10, test_per_class)
    _pickle(folder / "test_batch", {"batch_label": "testing batch 1 of 1",
                                    "data": _cifar_rows(1000, len(test_labels)),
                                    "labels": test_labels.tolist(),
                                    "filenames": [f"test_{i}.png" for i in range(len(test_labels))]})
    _pickle(folder / "batches.meta", {"label_names": [f"class_{c}" for c in range(10)],
                                      "num_cases_per_batch": 10000, "num_vis": 3072})
    return Path(root)


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_cifar10_folders(root: Path, per_class: int = 3, test_per_class: int = 2) -> Path:
    """root/train/<class>/NNNN.png and root/test/<class>/NNNN.jpg, the image-folder layout of CIFAR-10.
    Train image k of class c has pattern(10 * k + c) (PNG, lossless); test images are JPEGs."""
    for split, count, suffix in (("train", per_class, "png"), ("test", test_per_class, "jpg")):
        for c, name in enumerate(CIFAR10_CLASSES):
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                Image.fromarray(pattern(10 * k + c, 32, 32)).save(folder / f"{k:04d}.{suffix}", quality=95)
    return Path(root)


def write_cifar100(root: Path, per_class: int = 2, test_per_class: int = 1) -> Path:
    """root/cifar-100-python/: train, test, meta; coarse labels differ from fine ones (fine = target)."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, first, count in (("train", 0, per_class), ("test", 1000, test_per_class)):
        fine = class_labels(100, count)
        _pickle(folder / name, {"batch_label": name, "data": _cifar_rows(first, len(fine)),
                                "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist(),
                                "filenames": [f"{name}_{i}.png" for i in range(len(fine))]})
    _pickle(folder / "meta", {"fine_label_names": [f"fine_{c}" for c in range(100)],
                              "coarse_label_names": [f"coarse_{c}" for c in range(20)]})
    return Path(root)


# -- STL-10 -----------------------------------------------------------------------------------------
def _stl_bytes(first_index: int, count: int) -> bytes:
    """Images as STL-10 stores them: per image, each channel column-major (C, x, y with y fastest)."""
    return b"".join(pattern(first_index + i, 96, 96).transpose(2, 1, 0).tobytes() for i in range(count))


def write_stl10(root: Path, per_class: int = 3, test_per_class: int = 2, unlabeled: int = 7) -> Path:
    """root/stl10_binary/: train_X/y.bin (pattern(i)), test_X/y.bin (pattern(1000 + j)), unlabeled_X.bin
    (pattern(2000 + k)), class_names.txt, fold_indices.txt. Labels stored 1..10."""
    folder = Path(root) / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    train, test = class_labels(10, per_class), class_labels(10, test_per_class)
    (folder / "train_X.bin").write_bytes(_stl_bytes(0, len(train)))
    (folder / "train_y.bin").write_bytes((train + 1).astype(np.uint8).tobytes())
    (folder / "test_X.bin").write_bytes(_stl_bytes(1000, len(test)))
    (folder / "test_y.bin").write_bytes((test + 1).astype(np.uint8).tobytes())
    (folder / "unlabeled_X.bin").write_bytes(_stl_bytes(2000, unlabeled))
    (folder / "class_names.txt").write_text("\n".join(f"class_{c}" for c in range(10)) + "\n")
    (folder / "fold_indices.txt").write_text("\n".join(" ".join(map(str, range(f, len(train), 10)))
                                                       for f in range(10)) + "\n")
    return Path(root)


# -- SVHN -------------------------------------------------------------------------------------------
def write_svhn(root: Path, per_class: int = 3, test_per_class: int = 2) -> Path:
    """root/train_32x32.mat and test_32x32.mat: X (32, 32, 3, N) uint8, y (N, 1) with digit 0 stored as 10.
    Train image i has pattern(i) and digit i % 10; test image j has pattern(1000 + j)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, first, count in (("train", 0, per_class), ("test", 1000, test_per_class)):
        digits = class_labels(10, count)
        images = np.stack([pattern(first + i, 32, 32) for i in range(len(digits))], axis=-1)
        stored = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(-1, 1)
        savemat(root / f"{name}_32x32.mat", {"X": images, "y": stored})
    return root


# -- ImageNet ---------------------------------------------------------------------------------------
def write_imagenet(root: Path, wnids: Sequence[str], per_class: int = 2, val_per_class: int = 1) -> Path:
    """root/train/<wnid>/<wnid>_<n>.JPEG and root/val/<wnid>/ILSVRC2012_val_<n>.JPEG (val sorted into
    wnid folders), sizes varying like real photos."""
    root, count = Path(root), 0
    for wnid in wnids:
        for n in range(per_class):
            write_jpeg(root / "train" / wnid / f"{wnid}_{n}.JPEG", count, (24 + n, 18))
            count += 1
        for n in range(val_per_class):
            write_jpeg(root / "val" / wnid / f"ILSVRC2012_val_{count:08d}.JPEG", count, (18, 22))
            count += 1
    return root


# -- CUB-200-2011 -----------------------------------------------------------------------------------
def write_cub(root: Path, class_ids: Sequence[int] = (1, 2, 3, 100, 101, 102, 200),
              per_class: int = 3) -> Path:
    """root/CUB_200_2011/: images.txt, image_class_labels.txt, train_test_split.txt, classes.txt,
    bounding_boxes.txt, images/<NNN.Name>/<Name>_<n>.jpg, for the given 1-based class ids."""
    folder = Path(root) / "CUB_200_2011"
    names, labels, split, boxes = [], [], [], []
    image_id = 0
    for class_id in class_ids:
        bird = f"Bird_{class_id}"
        for n in range(per_class):
            image_id += 1
            name = f"{class_id:03d}.{bird}/{bird}_{n:04d}_{image_id}.jpg"
            write_jpeg(folder / "images" / name, image_id)
            names.append(f"{image_id} {name}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {n % 2}")
            boxes.append(f"{image_id} 1.0 2.0 10.0 8.0")
    (folder / "images.txt").write_text("\n".join(names) + "\n")
    (folder / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (folder / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (folder / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    (folder / "classes.txt").write_text("\n".join(f"{c} {c:03d}.Bird_{c}" for c in range(1, 201)) + "\n")
    return Path(root)


# -- Cars196 ----------------------------------------------------------------------------------------
def write_cars(root: Path, class_ids: Sequence[int] = (1, 2, 98, 99, 100, 196), per_class: int = 3) -> Path:
    """root/cars_annos.mat (annotations struct array: relative_im_path, bbox_x1..bbox_y2, class, test;
    class_names) and root/car_ims/NNNNNN.jpg, for the given 1-based class ids."""
    root = Path(root)
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    entries = []
    for class_id in class_ids:
        for n in range(per_class):
            number = len(entries) + 1
            path = f"car_ims/{number:06d}.jpg"
            write_jpeg(root / path, number, (30, 20))
            entries.append((path, 1, 2, 29, 19, class_id, n % 2))
    annotations = np.zeros((1, len(entries)), dtype=[(f, object) for f in fields])
    for i, entry in enumerate(entries):
        for field, value in zip(fields, entry):
            annotations[0, i][field] = np.array([value]) if isinstance(value, str) else np.array([[value]])
    class_names = np.array([[f"Car model {c}" for c in range(1, 197)]], dtype=object)
    savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": class_names})
    return root


# -- Stanford Online Products -----------------------------------------------------------------------
def write_sop(root: Path, class_ids: Sequence[int] = (1, 2, 3, 11318, 11319, 11320, 22634),
              per_class: int = 3) -> Path:
    """root/Stanford_Online_Products/: Ebay_train.txt (class ids <= 11,318), Ebay_test.txt, Ebay_info.txt
    (header `image_id class_id super_class_id path`) and <super>_final/<product>_<n>.JPG images."""
    folder = Path(root) / "Stanford_Online_Products"
    supers = ["bicycle", "cabinet", "chair", "coffee_maker", "fan", "kettle", "lamp", "mug", "sofa",
              "stapler", "table", "toaster"]
    rows = {"train": [], "test": []}
    image_id = 0
    for class_id in class_ids:
        super_id = class_id % 12 + 1
        for n in range(per_class):
            image_id += 1
            path = f"{supers[super_id - 1]}_final/{100000 + class_id}_{n}.JPG"
            write_jpeg(folder / path, image_id, (22, 22))
            rows["train" if class_id <= 11318 else "test"].append(f"{image_id} {class_id} {super_id} {path}")
    header = "image_id class_id super_class_id path"
    for split in ("train", "test"):
        (folder / f"Ebay_{split}.txt").write_text("\n".join([header, *rows[split]]) + "\n")
    (folder / "Ebay_info.txt").write_text("\n".join([header, *rows["train"], *rows["test"]]) + "\n")
    return Path(root)


# -- In-Shop Clothes Retrieval ----------------------------------------------------------------------
def write_inshop(root: Path, train_items: int = 4, test_items: int = 3, official_layout: bool = True) -> Path:
    """root/Eval/list_eval_partition.txt (line 1 = count, line 2 = header) and the images under
    root/Img/img/ (official_layout) or root/img/. Train items get 3 images each; test items 1 query and
    2 gallery images. Item ids interleave train and test, as in the real list."""
    root = Path(root)
    base = root / "Img" if official_layout else root
    pairs = zip_longest(["train"] * train_items, ["test"] * test_items)
    kinds = [kind for pair in pairs for kind in pair if kind]
    rows, count = [], 0
    for item, kind in enumerate(kinds, start=1):
        statuses = ["train"] * 3 if kind == "train" else ["query", "gallery", "gallery"]
        for n, status in enumerate(statuses):
            name = f"img/WOMEN/Blouses_Shirts/id_{item:08d}/{n + 1:02d}_1_front.jpg"
            write_jpeg(base / name, count, (16, 16))
            rows.append(f"{name} id_{item:08d} {status}")
            count += 1
    (root / "Eval").mkdir(parents=True, exist_ok=True)
    (root / "Eval" / "list_eval_partition.txt").write_text(
        "\n".join([str(len(rows)), "image_name item_id evaluation_status", *rows]) + "\n")
    return root


# -- generic class folders --------------------------------------------------------------------------
def write_folder(root: Path, classes: Sequence[str] = ("ant", "bee", "cat", "dog"),
                 per_class: int = 5) -> Path:
    """root/<class>/<class>_<n>.png, plus a hidden macOS `._` file and a non-image file to be skipped."""
    root, count = Path(root), 0
    for name in classes:
        for n in range(per_class):
            path = root / name / f"{name}_{n}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pattern(count, 14, 18)).save(path)
            count += 1
        (root / name / f"._{name}_0.png").write_bytes(b"\x00\x05\x16\x07")
        (root / name / "notes.txt").write_text("not an image\n")
    return root
