"""The device path (datamodules/device_augment.py) against the PIL path it replaces.

Two kinds of checks: exact ones (each op against torchvision's tensor functional for fixed parameters), and
distribution ones (the whole preset against `build_transform` on PIL images, 1,000 images a side, on seven
image statistics). The distribution checks use fixed seeds, so they cannot flake; their two-sample
Kolmogorov-Smirnov bound of 0.10 sits above the 0.02-0.06 measured for the four presets (uint8 rounding
between PIL's ops) and below what a wrong parameter gives: crop scale 0.6-1 instead of 0.2-1 and jitter 0.8
instead of 0.4 give 0.21-0.27, asserted above 0.15 below, so the bound has power. The crop draw itself is
checked on 20,000 boxes, where scale 0.08 instead of 0.2 is caught too.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from scipy.stats import ks_2samp
from sklearn.datasets import load_digits
from torchvision import transforms as T

from datamodules.base import load_image
from datamodules.device_augment import (
    Blur,
    ColorJitter,
    Flip,
    PadCrop,
    ResidentViewDataset,
    Rotation,
    crop_boxes,
    device_pipeline,
    resident_images,
    resized_crop,
)
from datamodules.digits import DigitsDataModule
from datamodules.transforms import build_transform
from embedding_core.seeds import sample_seed
from tests.host_syncs import HostSyncs

N = 1_000  # images a side in the distribution checks
KS_BOUND = 0.10
CIFAR = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))


def smooth_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8 photo-like images: a colour gradient plus a blob, different per image, tinted
    warm (less blue) so that a hue turn shows in the red-blue statistic."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        base = g.uniform(0, 1, (3, 1, 1)) * x + g.uniform(0, 1, (3, 1, 1)) * (1 - y)
        cy, cx, r = g.uniform(0.2, 0.8, 3)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (0.05 + 0.1 * r))
        img = 0.5 * base + 0.5 * blob * g.uniform(0, 1, (3, 1, 1))
        img = img * np.array([1.0, 0.7, 0.3]).reshape(3, 1, 1)
        out.append(np.clip(img.transpose(1, 2, 0) * 255, 0, 255).astype(np.uint8))
    return np.stack(out)


def digit_images() -> np.ndarray:
    return np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)


def both_paths(transform: T.Compose, images: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """N outputs of the PIL pipeline and N of the device pipeline, over the same images, fixed seeds."""
    pick = np.arange(N) % len(images)
    torch.manual_seed(0)
    pil = torch.stack([transform(load_image(images[i])) for i in pick])
    pipeline = device_pipeline(transform, size)
    noise = torch.rand(N, pipeline.draws, generator=torch.Generator().manual_seed(1))
    return pil, pipeline(resident_images(images)[torch.from_numpy(pick)], noise)


STATISTICS = {
    "mean": lambda x: x.mean((1, 2, 3)),
    "contrast": lambda x: x.std((1, 2, 3)),
    "colourfulness": lambda x: (x - x.mean(1, keepdim=True)).abs().mean((1, 2, 3)),
    "left-right": lambda x: x[..., : x.shape[-1] // 2].mean((1, 2, 3)) - x[..., x.shape[-1] // 2:].mean((1, 2, 3)),
    "top-bottom": lambda x: x[..., : x.shape[-2] // 2, :].mean((1, 2, 3)) - x[..., x.shape[-2] // 2:, :].mean((1, 2, 3)),
    "sharpness": lambda x: (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3)),
    "red-blue": lambda x: (x[:, 0] - x[:, -1]).mean((1, 2)),  # hue turns move it
}


def ks(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(ks_2samp(a.numpy(), b.numpy()).statistic)


def worst_ks(pil: torch.Tensor, dev: torch.Tensor) -> tuple[float, str]:
    return max((ks(fn(pil), fn(dev)), name) for name, fn in STATISTICS.items())


@pytest.mark.parametrize(("preset", "size", "source"), [
    ("npid", 32, "cifar"), ("simclr", 32, "cifar"), ("weak", 32, "cifar"), ("digits", 8, "digits"),
])
def test_every_small_dataset_preset_matches_the_pil_pipeline_in_distribution(preset, size, source):
    images = digit_images() if source == "digits" else smooth_images(300, size)
    mean, std = ((0.5,), (0.5,)) if source == "digits" else CIFAR
    pil, dev = both_paths(build_transform(preset, size, mean, std), images, size)
    assert dev.shape == pil.shape
    distance, statistic = worst_ks(pil, dev)
    assert distance < KS_BOUND, f"{preset}: {statistic} differs (KS {distance:.3f})"


@pytest.mark.parametrize(("op", "wrong"), [
    ("crop", T.RandomResizedCrop(32, scale=(0.6, 1.0))),
    ("color", T.ColorJitter(0.8, 0.8, 0.8, 0.4)),
    ("color", T.ColorJitter(0.4, 0.4, 0.4, 0.1)),
])
def test_the_distribution_bound_catches_a_wrong_parameter(op, wrong):
    images = smooth_images(300, 32)
    right = build_transform("npid", 32, *CIFAR, drop_ops=[o for o in ("crop", "color", "gray", "flip") if o != op])
    mutated = T.Compose([wrong, *right.transforms[1:]])
    pipeline = device_pipeline(mutated, 32)
    noise = torch.rand(N, pipeline.draws, generator=torch.Generator().manual_seed(1))
    dev = pipeline(resident_images(images)[torch.arange(N) % len(images)], noise)
    torch.manual_seed(0)
    pil = torch.stack([right(load_image(images[i % len(images)])) for i in range(N // 2)])  # half: enough
    assert worst_ks(pil, dev)[0] > 1.5 * KS_BOUND


def test_crop_boxes_draw_torchvision_scales_and_ratios():
    """RandomResizedCrop.get_params vs the batched draw: crop area fraction and aspect ratio, 20,000 each,
    at CIFAR's and at digits' size (where rounding and the centre fallback matter). KS bound 0.04: measured
    0.001-0.015; a scale range off by 0.12 (0.08 for 0.2, 0.5 for 0.6) gives 0.14-0.17."""
    for size, scale, ratio, wrong in [(32, (0.2, 1.0), (3 / 4, 4 / 3), (0.08, 1.0)), (8, (0.6, 1.0), (0.8, 1.25), (0.5, 1.0))]:
        torch.manual_seed(0)
        image = torch.zeros(1, size, size)
        ref = torch.tensor([T.RandomResizedCrop.get_params(image, scale, ratio) for _ in range(10_000)]).float()
        u = torch.rand(10_000, 40, generator=torch.Generator().manual_seed(0))
        ours, off = crop_boxes(u, size, size, scale, ratio), crop_boxes(u, size, size, wrong, ratio)
        for column in (0, 1):  # top, left
            assert ks(ref[:, column], ours[:, column]) < 0.04
        assert ks(ref[:, 2] * ref[:, 3], ours[:, 2] * ours[:, 3]) < 0.04
        assert ks(ref[:, 3] / ref[:, 2], ours[:, 3] / ours[:, 2]) < 0.04
        assert ks(ref[:, 2] * ref[:, 3], off[:, 2] * off[:, 3]) > 0.1
        assert ours[:, 2:].min() >= 1 and ours[:, 2:].max() <= size


def test_crop_falls_back_to_torchvision_centre_crop_when_no_try_fits():
    image = torch.zeros(1, 10, 20)  # ratio 2 > the allowed 4/3, and an area no try can reach
    ref = T.RandomResizedCrop.get_params(image, (1.5, 2.0), (3 / 4, 4 / 3))
    ours = crop_boxes(torch.rand(3, 40), 10, 20, (1.5, 2.0), (3 / 4, 4 / 3))
    assert ours.tolist() == [list(map(float, ref))] * 3 == [[0.0, 3.0, 10.0, 13.0]] * 3


def test_resized_crop_is_torchvision_resized_crop_on_tensors():
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[0, 0, 32, 32], [5, 9, 14, 20], [20, 1, 12, 7]], dtype=torch.float32)
    ours = resized_crop(x, boxes, 32)
    for image, (top, left, h, w), got in zip(x, boxes.int().tolist(), ours):
        want = TF.resized_crop(image, top, left, h, w, [32, 32], antialias=False)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_rotation_is_torchvision_rotate_nearest():
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for u, degrees in [(0.9, 12 * 0.8), (0.1, -12 * 0.8)]:  # uniform u in [-12, 12]
        ours = Rotation((-12.0, 12.0))(x, torch.tensor([[u]]))[0]
        want = TF.rotate(x[0], degrees, interpolation=T.InterpolationMode.NEAREST)
        assert (ours - want).abs().amax(0).le(1e-6).float().mean() > 0.97  # a few pixels on rounding edges


def test_colour_adjustments_are_torchvision_s():
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    adjust = [(0, TF.adjust_brightness, (0.5, 1.5)), (1, TF.adjust_contrast, (0.5, 1.5)),
              (2, TF.adjust_saturation, (0.5, 1.5)), (3, TF.adjust_hue, (-0.4, 0.4))]
    for k, fn, bounds in adjust:
        ranges = [bounds if i == k else None for i in range(4)]
        u = torch.tensor([[0.0, 0.75, 0.75, 0.75, 0.75, 0.1, 0.2, 0.3, 0.4]])  # factor 3/4 of the way
        factor = bounds[0] + 0.75 * (bounds[1] - bounds[0])
        torch.testing.assert_close(ColorJitter(ranges)(x, u)[0], fn(x[0], factor), atol=2e-3, rtol=0)


def test_jitter_factors_span_the_preset_ranges_in_random_order():
    """npid's ColorJitter(0.4): brightness factor uniform on [0.6, 1.4], read off a mid-grey image."""
    jitter = ColorJitter([(0.6, 1.4), None, None, None])
    factor = jitter(torch.full((20_000, 3, 1, 1), 0.5), torch.rand(20_000, 9, generator=torch.Generator()
                                                                      .manual_seed(0)))[:, 0, 0, 0] / 0.5
    assert 0.6 <= factor.min() < 0.601 and 1.399 < factor.max() <= 1.4
    assert abs(factor.mean() - 1.0) < 0.01 and abs(factor.std() - 0.8 / 12**0.5) < 0.005
    # the order is random per image: brightness x2 then contrast 0 turns (0.2, 0.6) into the mean of
    # (0.4, 1.0) = 0.7; contrast first gives 0.4, then x2 = 0.8
    both = ColorJitter([(2.0, 2.0), (0.0, 0.0), None, None])
    x = torch.tensor([0.2, 0.6]).view(1, 1, 1, 2).expand(20_000, 3, 1, 2)
    out = both(x, torch.rand(20_000, 9, generator=torch.Generator().manual_seed(1)))[:, 0, 0, 0]
    brightness_first = torch.isclose(out, torch.tensor(0.7))
    assert (brightness_first | torch.isclose(out, torch.tensor(0.8))).all()
    assert 0.45 < brightness_first.float().mean() < 0.55  # sigma 0.0035


def test_flip_and_grayscale_rates():
    x = torch.rand(8_000, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    u = torch.rand(8_000, 1, generator=torch.Generator().manual_seed(1))
    flipped = (Flip(0.5)(x, u) != x).flatten(1).any(1).float().mean()
    assert abs(flipped - 0.5) < 0.03  # sigma 0.0056
    npid_gray = build_transform("npid", 32, *CIFAR, drop_ops=["crop", "color", "flip"])
    images = smooth_images(50, 32)
    out = device_pipeline(npid_gray, 32)(resident_images(images)[torch.arange(8_000) % 50],
                                         torch.rand(8_000, 1, generator=torch.Generator().manual_seed(2)))
    raw = out * torch.tensor(CIFAR[1]).view(1, 3, 1, 1) + torch.tensor(CIFAR[0]).view(1, 3, 1, 1)
    gray = ((raw[:, 0] - raw[:, 1]).abs().amax((1, 2)) < 1e-5).float().mean()
    assert abs(gray - 0.2) < 0.025  # RandomGrayscale(0.2), sigma 0.0045


def test_blur_and_pad_crop_are_torchvision_s():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    blurred = Blur((3, 3), (0.1, 2.0))(x, torch.tensor([[0.0, 0.5], [0.0, 1.0]]))
    for image, sigma, got in zip(x, (1.05, 2.0), blurred):
        torch.testing.assert_close(got, TF.gaussian_blur(image, [3, 3], [sigma, sigma]), atol=1e-5, rtol=0)
    cropped = PadCrop(32, 4)(x, torch.tensor([[0.0, 0.99], [0.5, 0.2]]))
    padded = torch.nn.functional.pad(x, [4] * 4, mode="reflect")
    assert torch.equal(cropped[0], padded[0, :, 0:32, 8:40]) and torch.equal(cropped[1], padded[1, :, 4:36, 1:33])


def test_noise_is_a_function_of_seed_epoch_index_draw_and_partners_take_the_next_draw():
    dataset = ResidentViewDataset(np.zeros(10, dtype=np.int64), draws=5, num_views=2, seed=3)
    dataset.set_epoch(4)
    item = dataset[(7, 1)]
    want = torch.rand(2, 5, generator=torch.Generator().manual_seed(sample_seed(3, 4, 7, 1)))
    assert torch.equal(item["noise"], want) and item["source"].tolist() == [7, 7] and item["target"] == -1
    dataset.partners = np.array([0, 1, 2, 3, 4, 5, 6, 2, 8, 9])
    partnered = dataset[(7, 1)]
    second = torch.rand(2, 5, generator=torch.Generator().manual_seed(sample_seed(3, 4, 7, 2)))
    assert torch.equal(partnered["noise"][0], want[0]) and torch.equal(partnered["noise"][1], second[1])
    assert partnered["source"].tolist() == [7, 2]


def views_by_index(dm: DigitsDataModule) -> dict[int, list[torch.Tensor]]:
    out = {}
    for batch in dm.train_dataloader():
        batch = dm.on_after_batch_transfer(batch, 0)
        assert set(batch) == {"views", "index", "target"} and (batch["target"] == -1).all()
        for row, index in enumerate(batch["index"].tolist()):
            out[index] = [v[row] for v in batch["views"]]
    return out


def test_digits_device_path_gives_each_image_the_same_views_at_any_batch_size():
    small = views_by_index(DigitsDataModule(device_resident=True, batch_size=32, num_workers=0))
    large = views_by_index(DigitsDataModule(device_resident=True, batch_size=128, num_workers=0))
    shared = sorted(set(small) & set(large))
    assert len(shared) > 1_000
    for index in shared[:200]:
        assert all(torch.equal(a, b) for a, b in zip(small[index], large[index]))
        assert small[index][0].shape == (1, 8, 8) and not torch.equal(*small[index])


def test_semi_batches_get_views_in_every_loader():
    dm = DigitsDataModule(device_resident=True, protocol="semi", labels_per_class=4, batch_size=32, num_workers=0)
    loaders = dm.train_dataloader()
    batch = dm.on_after_batch_transfer({name: next(iter(loader)) for name, loader in loaders.items()}, 0)
    assert batch["labeled"]["views"][0].shape == (32, 1, 8, 8) and (batch["labeled"]["target"] >= 0).all()
    assert len(batch["unlabeled"]["views"]) == 2 and "noise" not in batch["unlabeled"]


def test_presets_and_sizes_without_a_batched_form_name_the_flag():
    with pytest.raises(ValueError, match="device_resident=false"):
        DigitsDataModule(device_resident=True, train_transform="fine_grained", image_size=8, resize_size=9)
    with pytest.raises(ValueError, match="image_size"):
        device_pipeline(build_transform("plain", 32, *CIFAR), 32)(torch.zeros(1, 3, 16, 16, dtype=torch.uint8),
                                                                  torch.zeros(1, 0))
    with pytest.raises(ValueError, match="device_resident=false"):
        resident_images(["a.jpg", "b.jpg"])


def test_a_lightning_fit_trains_on_device_made_views():
    """The Trainer calls the datamodule's on_after_batch_transfer: ISIF's step reads `views`, which only the
    device path's hook puts in the batch (its loader yields indices and noise)."""
    import lightning as L

    from lightning_modules.isif import ISIF

    dm = DigitsDataModule(device_resident=True, batch_size=64, num_workers=0)
    assert "views" not in next(iter(dm.train_dataloader()))
    model = ISIF(backbone="small_cnn", in_chans=1, embedding_dim=16)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 3


def test_decode_images_matches_pil_for_jpeg_and_png(tmp_path):
    """The GPU-decoding building block, run on the CPU: the same pixels as PIL's decode (libjpeg-turbo
    both; at most a rounding step apart where the IDCT / chroma upsampling differ)."""
    from PIL import Image

    from datamodules.device_augment import decode_images

    images = smooth_images(3, 40, seed=5)
    files = []
    for i, image in enumerate(images):
        path = tmp_path / (f"{i}.jpg" if i < 2 else f"{i}.png")
        Image.fromarray(image).save(path, quality=90) if i < 2 else Image.fromarray(image).save(path)
        files.append(path)
    Image.fromarray(images[0][..., 0]).save(tmp_path / "gray.jpg")  # a 1-channel JPEG comes back as RGB
    files.append(tmp_path / "gray.jpg")
    for path, decoded in zip(files, decode_images(files)):
        want = torch.from_numpy(np.asarray(load_image(path))).permute(2, 0, 1)
        assert decoded.shape == want.shape and decoded.dtype == torch.uint8
        assert (decoded.int() - want.int()).abs().max() <= 2


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "stl10", "svhn", "digits"])
def test_each_small_dataset_puts_the_same_pixels_on_the_device(tmp_path, dataset):
    """With every random op dropped, the device views are the PIL path's tensors: the resident layout
    (N, C, H, W) and the normalisation are each reader's."""
    from datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
    from datamodules.stl10 import STL10DataModule
    from datamodules.svhn import SVHNDataModule
    from tests import fixtures as F

    readers = {"cifar10": (CIFAR10DataModule, F.write_cifar10), "cifar100": (CIFAR100DataModule, F.write_cifar100),
               "stl10": (STL10DataModule, F.write_stl10), "svhn": (SVHNDataModule, F.write_svhn)}
    options = {"batch_size": 4, "num_workers": 0, "drop_ops": ["crop", "color", "gray", "flip", "rotate"]}
    if dataset == "digits":
        build = lambda resident: DigitsDataModule(device_resident=resident, **options)
    else:
        cls, write = readers[dataset]
        root = str(write(tmp_path))
        build = lambda resident: cls(root=root, allow_partial=True, device_resident=resident, **options)
    fast, standard = build(True), build(False)
    batch = fast.on_after_batch_transfer(next(iter(fast.train_dataloader())), 0)
    want = next(iter(standard.train_dataloader()))  # the same sampler seed: the same images
    assert torch.equal(batch["index"], want["index"])
    torch.testing.assert_close(batch["views"][1], want["views"][1], atol=1e-6, rtol=0)


def test_digits_pipeline_keeps_pil_s_uint8_pixels_and_jitter_truncation():
    """PIL stores every op's result as uint8 and ImageEnhance's Image.blend truncates toward zero; the device
    path does the same, so for fixed factors its brightness / contrast give PIL's pixels exactly. In float
    arithmetic the views came out 0.2-0.45 of a grey level brighter per jitter op (mean pixel +0.003 over the
    digits preset, an exact zero lifted wherever PIL truncated to 0) and off the 1/255 grid."""
    images = digit_images()[:300]
    size, stats = 8, ((0.5,), (0.5,))
    only_jitter = build_transform("digits", size, *stats, drop_ops=["crop", "rotate"])
    jitter = device_pipeline(only_jitter, size).ops[0]
    u = torch.rand(len(images), jitter.draws, generator=torch.Generator().manual_seed(0))
    u[:, 0] = 0.0  # always applied
    got = jitter(resident_images(images).float() / 255, u)
    # brightness and contrast factors, float32 as the op computes them
    factors = [lo + (hi - lo) * u[:, 1 + k] for k, (lo, hi) in enumerate(jitter.ranges[:2])]
    adjust = (TF.adjust_brightness, TF.adjust_contrast)
    for i, image in enumerate(images):
        pil = load_image(image)
        for k in torch.argsort(u[i, 5:9]).tolist():
            if k < 2:
                pil = adjust[k](pil, factors[k][i].item())
        want = torch.from_numpy(np.array(pil)).float() / 255
        off = (got[i, 0] - want).abs().max() * 255
        assert torch.equal(got[i, 0], want), f"image {i}: {off:.2f} grey levels off"
    pipeline = device_pipeline(build_transform("digits", size, *stats), size)
    views = pipeline(resident_images(images), torch.rand(len(images), pipeline.draws,
                                                         generator=torch.Generator().manual_seed(1)))
    levels = (views * 0.5 + 0.5) * 255
    assert (levels - levels.round()).abs().max() < 1e-3  # on the uint8 grid, as ToTensor of a PIL image


@pytest.mark.parametrize("pil_uint8", [True, False], ids=["pil-uint8", "float"])
@pytest.mark.parametrize("ranges", [[(0.6, 1.4)] * 3 + [(-0.1, 0.1)], [(0.6, 1.4), None, (0.6, 1.4), None],
                                    [None, None, None, (-0.5, 0.5)]], ids=["all", "no-contrast-hue", "hue"])
def test_sync_free_jitter_gives_the_gathering_jitter_s_pixels(ranges, pil_uint8):
    """The accelerator's jitter (`torch.where` per position) equals the CPU's (gather the images of each
    adjustment) bit for bit, on a fixed seed, with 80% of the images jittered and every order drawn."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (96, 3, 12, 12), generator=generator).float() / 255
    u = torch.rand(96, 9, generator=generator)
    jitter = ColorJitter(ranges, p=0.8)
    jitter.pil_uint8 = pil_uint8
    gathered, selected = jitter.by_gathering(x, u), jitter.by_selection(x, u)
    assert not torch.equal(gathered, x) and torch.equal(selected, gathered)


def test_the_device_pipeline_runs_without_a_host_sync_when_jitter_is_sync_free(monkeypatch):
    """simclr's preset (crop, jitter, grayscale, flip, normalise) as an accelerator runs it: no op that
    blocks the host; the gathering jitter (the CPU's) has them, which shows the count sees them."""
    pipeline = device_pipeline(build_transform("simclr", 16, (0.5,) * 3, (0.25,) * 3), 16)
    images = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    noise = torch.rand(32, pipeline.draws, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(ColorJitter, "sync_free", True)
    with HostSyncs() as syncs:
        views = pipeline(images, noise)
    assert dict(syncs.calls) == {} and views.shape == (32, 3, 16, 16)
    assert pipeline.normalization(views.device)[0] is pipeline.normalization(views.device)[0]  # built once
    monkeypatch.setattr(ColorJitter, "sync_free", False)
    with HostSyncs() as syncs:
        assert torch.equal(pipeline(images, noise), views)
    assert syncs.calls["_local_scalar_dense"] > 0


@pytest.mark.parametrize("device, options, resident", [
    ("cuda", {}, True),  # digits at its native 8 px with a batched preset: the fast path on a GPU
    ("cpu", {}, False),  # the CPU keeps the DataLoader + PIL path
    ("cuda", {"image_size": 16}, False),  # not the native size: the standard path resizes
    ("cuda", {"train_transform": "fine_grained", "resize_size": 9}, False),  # no batched form of the preset
])
def test_device_resident_by_default_where_it_applies_on_a_gpu(device, options, resident):
    from types import SimpleNamespace

    dm = DigitsDataModule(batch_size=32, num_workers=0, **options)
    assert dm.device_resident is None
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
    dm.setup("fit")
    assert dm.device_resident is resident and (dm.device_train is not None) == resident
    explicit = DigitsDataModule(batch_size=32, num_workers=0, device_resident=False)
    explicit.trainer = dm.trainer
    explicit.setup("fit")
    assert explicit.device_resident is False
