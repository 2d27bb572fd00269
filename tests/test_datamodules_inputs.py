"""What a user's data root can do to the readers: planted pickles run no code and every bad file is named;
class folders that are empty or hold one image are named with the fix; presets scale with image_size, so
images of any size train at any size."""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from datamodules.cars import CarsDataModule
from datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
from datamodules.cub import CUBDataModule
from datamodules.folder import ClassFolderWarning, FolderDataModule
from datamodules.inshop import InShopDataModule
from datamodules.safe_io import load_data_pickle
from datamodules.sop import SOPDataModule
from datamodules.stl10 import STL10DataModule
from datamodules.svhn import SVHNDataModule
from datamodules.transforms import PRESETS, build_transform, resize_side
from experiments.train import RUN_DIR_ENV, main
from tests import fixtures as F


# -- planted files run no code -----------------------------------------------------------------------
class Payload:
    """Unpickling this creates `sentinel`: the proof that a reader ran code from a data file."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return open, (self.sentinel, "w")


# every reader that unpickles or loadmat-s a file from the root: (module, writer, file under the root)
PLANTED = [(CIFAR10DataModule, F.write_cifar10, "cifar-10-batches-py/data_batch_1"),
           (CIFAR100DataModule, F.write_cifar100, "cifar-100-python/train"),
           (SVHNDataModule, F.write_svhn, "train_32x32.mat"),
           (CarsDataModule, F.write_cars, "cars_annos.mat")]


@pytest.mark.parametrize("cls, write, name", PLANTED, ids=[p[2] for p in PLANTED])
def test_a_hostile_pickle_in_the_root_runs_nothing_and_is_named(tmp_path, cls, write, name):
    root = write(tmp_path / "data")
    sentinel = tmp_path / "pwned"
    planted = root / name
    planted.write_bytes(pickle.dumps({"data": Payload(sentinel), "labels": [0]}, protocol=2))
    with pytest.raises(ValueError, match=re.escape(str(planted))):
        cls(root=str(root), allow_partial=True).setup()
    assert not sentinel.exists()


def test_only_numpy_reconstruction_globals_load_and_a_refusal_names_the_file(tmp_path):
    """numpy-1 / Py2 files name numpy.core.multiarray (the real CIFAR batches); numpy 2 writes numpy._core."""
    batch = {"data": np.arange(12, dtype=np.uint8).reshape(2, 6), "labels": [3, np.int64(4)], "name": b"x"}
    new = pickle.dumps(batch, protocol=2)
    old = new.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in old and old != new
    for blob in (new, old):
        (tmp_path / "batch").write_bytes(blob)
        loaded = load_data_pickle(tmp_path / "batch")
        np.testing.assert_array_equal(loaded["data"], batch["data"])
        assert loaded["labels"] == [3, 4] and loaded["name"] == b"x"
    (tmp_path / "evil").write_bytes(pickle.dumps({"data": Payload(tmp_path / "pwned")}, protocol=2))
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / 'evil'))}: .*refused global io\.open"):
        load_data_pickle(tmp_path / "evil")
    (tmp_path / "short").write_bytes(new[: len(new) // 2])
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / 'short'))}: not a valid data pickle"):
        load_data_pickle(tmp_path / "short")
    assert not (tmp_path / "pwned").exists()


def test_a_py2_cpickle_batch_as_published_loads(tmp_path):
    """The real CIFAR files: protocol 2 from Python 2, keys and the array's bytes as Py2 `str` (BINSTRING),
    the array rebuilt with numpy.core.multiarray._reconstruct. Hand-assembled from pickle opcodes."""
    def s(text: bytes) -> bytes:  # SHORT_BINSTRING: a Py2 str
        return b"U" + bytes([len(text)]) + text

    pixels = bytes(range(6))
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
             b"(K\x01K\x02K\x03\x86cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R"
             b"(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89" + s(pixels) + b"tb")
    blob = b"\x80\x02}(" + s(b"data") + array + s(b"labels") + b"]K\x07a" + b"u."
    (tmp_path / "data_batch_1").write_bytes(blob)
    batch = load_data_pickle(tmp_path / "data_batch_1")
    assert batch["data"].dtype == np.uint8 and batch["data"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert batch["labels"] == [7]


def test_a_non_image_format_under_an_image_name_is_not_decoded(tmp_path):
    """Pillow picks a decoder from the bytes: an EPS named .png would reach Ghostscript. Only raster
    formats are opened; the file is named."""
    root = F.write_folder(tmp_path / "data", per_class=3)
    disguised = root / "ant" / "ant_0.png"
    Image.fromarray(F.pattern(0, 8, 8)).save(tmp_path / "x.eps")
    disguised.write_bytes((tmp_path / "x.eps").read_bytes())
    dm = FolderDataModule(root=str(root), protocol="seen", image_size=8, test_fraction=0.5, verify_images=True)
    with pytest.raises(OSError, match=rf"{re.escape(str(disguised))}: cannot identify image file"):
        dm.setup()  # not "Unable to locate Ghostscript": the EPS decoder is never tried


def test_malformed_lists_and_binaries_name_the_file_and_the_line(tmp_path):
    cub = F.write_cub(tmp_path / "cub") / "CUB_200_2011" / "images.txt"
    cub.write_text(cub.read_text() + "22\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(cub))}, line 22: '22' has 1 field\(s\), expected 2"):
        CUBDataModule(root=str(tmp_path / "cub")).setup()
    sop = F.write_sop(tmp_path / "sop") / "Stanford_Online_Products" / "Ebay_test.txt"
    sop.write_text(sop.read_text().replace(" 11319 ", " eleven ", 1))
    with pytest.raises(ValueError, match=rf"{re.escape(str(sop))}: a class_id that is not an integer"):
        SOPDataModule(root=str(tmp_path / "sop")).setup()
    inshop = F.write_inshop(tmp_path / "inshop") / "Eval" / "list_eval_partition.txt"
    inshop.write_text(inshop.read_text() + "img/lost.jpg id_00000001\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(inshop))}, line \d+: 'img/lost\.jpg id_00000001'"):
        InShopDataModule(root=str(tmp_path / "inshop")).setup()
    stl = F.write_stl10(tmp_path / "stl") / "stl10_binary"
    (stl / "test_y.bin").write_bytes((stl / "test_y.bin").read_bytes()[:-1])
    with pytest.raises(ValueError, match=rf"{re.escape(str(stl / 'test_X.bin'))} holds 20 images but "
                                         rf"{re.escape(str(stl / 'test_y.bin'))} 19 labels"):
        STL10DataModule(root=str(tmp_path / "stl")).setup()
    (stl / "test_y.bin").write_bytes(bytes([0, 1, 2]))  # 0 would silently become the hidden label -1
    with pytest.raises(ValueError, match=rf"{re.escape(str(stl / 'test_y.bin'))}: labels 0\.\.2, expected 1\.\.10"):
        STL10DataModule(root=str(tmp_path / "stl")).setup()


# -- honest class folders -------------------------------------------------------------------------------
def write_classes(root: Path, counts: dict[str, int], size: tuple[int, int] = (20, 20)) -> Path:
    """root/<class>/<n>.png with counts[class] images each (0 = an empty folder)."""
    index = 0
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for n in range(count):
            Image.fromarray(F.pattern(index, size[1], size[0])).save(root / name / f"{n}.png")
            index += 1
    return root


def test_an_empty_class_folder_is_skipped_named_and_not_counted_in_the_class_split(tmp_path):
    root = write_classes(tmp_path, {"a": 2, "b": 2, "c": 2, "d": 2, "e": 2, "f": 2, "g": 0})
    dm = FolderDataModule(root=str(root), image_size=8)
    with pytest.warns(ClassFolderWarning, match=rf"1 class folder\(s\) without image files .*{tmp_path / 'g'}"):
        dm.setup()
    train = {Path(p).parent.name for p in dm.splits["train"].items}
    test = {Path(p).parent.name for p in dm.splits["query"].items}
    assert (train, test) == ({"a", "b", "c"}, {"d", "e", "f"})  # 3 / 3 of the 6 real classes, not 4 / 2
    assert dm.num_classes["train"] == 3 and dm.num_classes["query"] == 3


def test_a_single_image_class_under_seen_is_an_error_naming_the_folder_and_the_fix(tmp_path):
    root = write_classes(tmp_path, {"a": 3, "lonely": 1, "c": 3})
    for protocol in ("seen", "semi"):
        with pytest.raises(ValueError, match=rf"single image: {re.escape(str(tmp_path / 'lonely'))}\. .*"
                                             r"add images to them, or move them out of --data\.root"):
            FolderDataModule(root=str(root), protocol=protocol, image_size=8).setup()


def test_a_class_with_fewer_training_images_than_labels_per_class_is_named(tmp_path):
    root = write_classes(tmp_path, {"a": 5, "few": 3, "c": 5})  # train sides 4, 2, 4 at test_fraction 0.2
    with pytest.raises(ValueError, match=rf"labels_per_class=3: {re.escape(str(tmp_path / 'few'))}; lower "
                                         r"--data\.labels_per_class \(at most 2\)"):
        FolderDataModule(root=str(root), protocol="semi", image_size=8, labels_per_class=3).setup()
    dm = FolderDataModule(root=str(root), protocol="semi", image_size=8, labels_per_class=2)
    dm.setup()
    assert len(dm.labeled_indices) == 6


def test_a_single_image_test_class_under_unseen_is_named_with_the_recall_cap(tmp_path):
    root = write_classes(tmp_path, {"a": 2, "b": 2, "c": 3, "solo": 1})
    dm = FolderDataModule(root=str(root), image_size=8)
    with pytest.warns(ClassFolderWarning, match=rf"{re.escape(str(tmp_path / 'solo'))}\. .*"
                                                r"Recall@K is capped at 75\.0%"):  # 1 of 4 queries
        dm.setup()
    assert len(dm.splits["query"]) == 4  # kept: the other queries still retrieve it as a negative


def test_a_test_fraction_that_leaves_a_side_without_every_class_names_the_flag(tmp_path):
    root = write_classes(tmp_path, {"a": 3, "b": 3, "c": 3, "d": 3})
    with pytest.raises(ValueError, match=r"holds out 2 of 12 images.*--data\.test_fraction between 0\.333 "):
        FolderDataModule(root=str(root), protocol="seen", test_fraction=0.1).setup()


# -- presets at any size ---------------------------------------------------------------------------------
def test_the_resize_side_is_the_papers_256_at_224_and_227_and_the_ratio_elsewhere():
    assert [resize_side(s) for s in (224, 227, 28, 8, 32, 112, 448)] == [256, 256, 32, 9, 37, 128, 512]
    center = build_transform("center", 227, (0.5,) * 3, (0.5,) * 3)
    assert tuple(center.transforms[0].size) == (256, 256)  # the paper's 256x256 resize before CenterCrop 227
    assert build_transform("center", 28, (0.5,) * 3, (0.5,) * 3, resize=40).transforms[0].size == (40, 40)
    with pytest.raises(ValueError, match=r"--data\.resize_size >= --data\.image_size \(28\)"):
        build_transform("resize_center", 28, (0.5,) * 3, (0.5,) * 3, resize=20)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_yields_image_size_from_images_of_other_sizes(preset):
    transform = build_transform(preset, 8, (0.5,) * 3, (0.5,) * 3)
    for width, height in ((20, 20), (31, 17), (5, 6), (8, 8)):
        image = Image.fromarray(F.pattern(1, height, width))
        assert transform(image).shape == (3, 8, 8), (preset, width, height)


def test_plain_and_weak_leave_a_native_size_image_byte_identical():
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    image = Image.fromarray(F.pattern(5, 32, 32))
    before = T.Compose([T.ToTensor(), T.Normalize(mean, std)])(image)  # the preset before it resized
    assert torch.equal(build_transform("plain", 32, mean, std)(image), before)
    weak = build_transform("weak", 32, mean, std, drop_ops=("flip", "crop"))
    assert torch.equal(weak(image), before)


def test_the_folder_datamodule_trains_on_images_of_another_size(tmp_path, monkeypatch):
    """20x20 PNG class folders at image_size 8 with small_cnn: a short real fit through the CLI."""
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    root = write_classes(tmp_path / "data", {f"class_{c}": 4 for c in range(4)})
    configs = Path("experiments/configs")
    main(["fit", "--config", str(configs / "base.yaml"), "--config", str(configs / "datasets" / "folder.yaml"),
          "--config", str(configs / "isif" / "folder.yaml"), "--data.root", str(root),
          "--run.dir", str(tmp_path / "run"), "--run.logger", "csv", "--model.pretrained=false",
          "--model.backbone=small_cnn", "--data.image_size=8", "--data.num_workers=0", "--data.batch_size=4",
          "--data.eval_batch_size=8", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
          "--trainer.precision=32-true", "--trainer.accelerator=cpu", "--trainer.check_val_every_n_epoch=1",
          "--trainer.enable_progress_bar=false", "--evaluation.kmeans_restarts=1"])
    metrics = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert metrics["final"] and set(metrics["final"]) == set(metrics["initial"])
    dm = FolderDataModule(root=str(root), image_size=8, batch_size=4)
    dm.setup()
    assert next(iter(dm.val_dataloader()[0]))["image"].shape[1:] == (3, 8, 8)
    assert all(v.shape[1:] == (3, 8, 8) for v in next(iter(dm.train_dataloader()))["views"])
