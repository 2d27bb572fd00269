"""The fast path: the training augmentations of `datamodules/transforms.py`, batched on tensors.

The decoded training split lives on the training device as one uint8 tensor (N, C, H, W); a training item
is then only its index, the image each view comes from, and the uniform numbers its augmentation draws
(`noise`, from the suite's per-sample seed `sample_seed(seed, epoch, index, draw)`, so the views do not
depend on batch composition, worker count or world size). `EmbeddingDataModule.on_after_batch_transfer`
turns that into `views` on the device with a `DevicePipeline`.

The pipeline is translated from the torchvision transform the PIL path builds (`build_transform`), so each
parameter (crop scale, jitter strength, probabilities, mean / std) has one owner: the preset. Each op mirrors
torchvision's sampling rule (RandomResizedCrop's 10 tries and centre fallback, ColorJitter's random order,
RandomApply, RandomCrop's reflect padding) and its tensor arithmetic, kept on uint8 values as PIL's
images between ops are (`pil_uint8`: resampling rounds, ImageEnhance's blend truncates), so ColorJitter
gives PIL's pixels exactly and RandomResizedCrop within one grey level (PIL's fixed-point bilinear); the
distribution tests in tests/test_device_augment.py bound the rest.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import transforms as T

from datamodules.transforms import ResizeIfNeeded
from embedding_core.seeds import sample_seed

GRAY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma: PIL's convert("L") and torchvision's rgb_to_grayscale


def to_uint8_grid(x: torch.Tensor) -> torch.Tensor:
    """x in [0, 1] rounded onto the 1/255 grid, as PIL stores an image between ops (resampling,
    convert("L"))."""
    return torch.round(x.clamp(0, 1) * 255) / 255


class Op:
    """One augmentation on a float batch (B, C, H, W) in [0, 1]; `draws` uniforms per image in `u`.
    `pil_uint8`: keep the result uint8-valued with PIL's rounding, as the PIL pipeline's images between its
    ops are (`device_pipeline` sets it; off, the op is torchvision's float tensor arithmetic)."""

    draws = 1
    pil_uint8 = False

    def __call__(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def crop_boxes(u: torch.Tensor, height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
               tries: int = 10) -> torch.Tensor:
    """(B, 4) boxes (top, left, h, w) by torchvision's RandomResizedCrop.get_params, from (B, 4 * tries)
    uniforms: the first of `tries` (area, log-ratio, top, left) draws that fits, else the centre crop."""
    area = height * width
    u = u.double().view(-1, tries, 4)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    top = torch.floor(u[..., 2] * (height - h + 1))
    left = torch.floor(u[..., 3] * (width - w + 1))
    first = torch.argmax(fits.int(), dim=1)  # index of the first fitting try (0 when none fits)
    pick = lambda t: t.gather(1, first[:, None])[:, 0]
    boxes = torch.stack([pick(top), pick(left), pick(h), pick(w)], dim=1)
    in_ratio = width / height  # the fallback: the whole image, or its centre at the nearest allowed ratio
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fh, fw = height, round(height * max(ratio))
    else:
        fw, fh = width, height
    fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=boxes.dtype).to(
        u.device, non_blocking=True)  # no host sync
    return torch.where(fits.any(1, keepdim=True), boxes, fallback).to(torch.float32)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each image's box (top, left, h, w) resized to size x size, bilinear: F.interpolate on the crop
    (align_corners=False, samples clamped inside the crop), batched with one grid_sample."""
    _, _, height, width = x.shape
    steps = (torch.arange(size, device=x.device, dtype=torch.float32) + 0.5) / size
    top, left, h, w = boxes.unbind(1)
    ys = (top[:, None] + steps * h[:, None] - 0.5).clamp(top[:, None], (top + h - 1)[:, None])
    xs = (left[:, None] + steps * w[:, None] - 0.5).clamp(left[:, None], (left + w - 1)[:, None])
    grid = torch.stack(torch.broadcast_tensors(((2 * xs + 1) / width - 1)[:, None, :],
                                               ((2 * ys + 1) / height - 1)[:, :, None]), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class ResizedCrop(Op):
    """RandomResizedCrop(size, scale, ratio), bilinear."""

    tries = 10

    def __init__(self, size: int, scale: Sequence[float], ratio: Sequence[float]):
        self.size, self.scale, self.ratio, self.draws = size, tuple(scale), tuple(ratio), 4 * self.tries

    def __call__(self, x, u):
        boxes = crop_boxes(u, x.shape[2], x.shape[3], self.scale, self.ratio, self.tries)
        out = resized_crop(x, boxes.to(x.device), self.size)
        return to_uint8_grid(out) if self.pil_uint8 else out


class Rotation(Op):
    """RandomRotation(degrees) about the centre, nearest neighbour, zero fill (torchvision's defaults)."""

    def __init__(self, degrees: Sequence[float]):
        self.degrees = tuple(degrees)

    def __call__(self, x, u):
        angle = torch.deg2rad(self.degrees[0] + (self.degrees[1] - self.degrees[0]) * u[:, 0])
        cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
        # output pixel -> input pixel is the inverse rotation; positive angles turn counter-clockwise
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        theta[:, 0, 1] *= x.shape[2] / x.shape[3]  # normalised coordinates of a non-square image
        theta[:, 1, 0] *= x.shape[3] / x.shape[2]
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def grayscale(x: torch.Tensor, pil_uint8: bool = False) -> torch.Tensor:
    """Luma, as many channels as the input (a 1-channel image is its own gray); rounded to uint8 as PIL's
    convert("L") with `pil_uint8`."""
    if x.shape[1] == 1:
        return x
    weights = torch.tensor(GRAY, dtype=x.dtype).to(x.device, non_blocking=True).view(1, 3, 1, 1)  # no host sync
    gray = (x * weights).sum(1, keepdim=True)
    return (to_uint8_grid(gray) if pil_uint8 else gray).expand_as(x)


def _per_image(factor: torch.Tensor) -> torch.Tensor:
    return factor.view(-1, 1, 1, 1)


def blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor,
          pil_uint8: bool = False) -> torch.Tensor:
    """ImageEnhance's Image.blend(degenerate, x, factor). With `pil_uint8` (uint8-valued inputs) PIL's own
    arithmetic: degenerate + factor * (x - degenerate) in float32, clipped to [0, 255] and truncated, not
    rounded, to an integer (libImaging/Blend.c), which float arithmetic misses by 0.3-0.5 of a grey level."""
    if not pil_uint8:
        return (_per_image(factor) * x + (1 - _per_image(factor)) * degenerate).clamp(0, 1)
    a, b = torch.round(degenerate * 255), torch.round(x * 255)
    return torch.floor((a + _per_image(factor) * (b - a)).clamp(0, 255)) / 255


def brightness(x: torch.Tensor, factor: torch.Tensor, pil_uint8: bool = False) -> torch.Tensor:
    return blend(torch.zeros_like(x), x, factor, pil_uint8)


def gray_mean(gray: torch.Tensor, pil_uint8: bool = False) -> torch.Tensor:
    """(B, 1, 1, 1) mean of each image's luma `gray` (from `grayscale`), Contrast's degenerate image; with
    `pil_uint8` ImageEnhance.Contrast's int(mean of the uint8 L image + 0.5)."""
    if pil_uint8:
        levels = torch.round(gray[:, :1].double() * 255)
        return (torch.floor(levels.mean(dim=(1, 2, 3), keepdim=True) + 0.5) / 255).to(gray.dtype)
    return gray[:, :1].mean(dim=(1, 2, 3), keepdim=True)


def contrast(x: torch.Tensor, factor: torch.Tensor, pil_uint8: bool = False) -> torch.Tensor:
    return blend(gray_mean(grayscale(x, pil_uint8), pil_uint8).expand_as(x), x, factor, pil_uint8)


def saturation(x: torch.Tensor, factor: torch.Tensor, pil_uint8: bool = False) -> torch.Tensor:
    return blend(grayscale(x, pil_uint8), x, factor, pil_uint8)


def hue(x: torch.Tensor, factor: torch.Tensor, pil_uint8: bool = False) -> torch.Tensor:
    """Hue turned by factor of a full turn (torchvision's hue_factor in [-0.5, 0.5])."""
    if x.shape[1] == 1:
        return x
    hsv = kornia.color.rgb_to_hsv(x)
    turned = torch.remainder(hsv[:, :1] + _per_image(factor) * 2 * math.pi, 2 * math.pi)
    out = kornia.color.hsv_to_rgb(torch.cat([turned, hsv[:, 1:]], 1)).clamp(0, 1)
    return to_uint8_grid(out) if pil_uint8 else out  # PIL turns the hue of a uint8 HSV image


class ColorJitter(Op):
    """ColorJitter with its ranges ((lo, hi) or None per adjustment), in a random order per image, applied
    with probability p (RandomApply around it).

    Two equal computations (the same pixels, tests/test_device_augment.py): on an accelerator `by_selection`,
    which never blocks the host; on the CPU, where a host sync costs nothing, `by_gathering`, which adjusts
    only the images an adjustment applies to (4x less hue work). `sync_free` forces one (None: by device)."""

    adjust = (brightness, contrast, saturation, hue)
    sync_free: bool | None = None

    def __init__(self, ranges: Sequence[Sequence[float] | None], p: float = 1.0):
        self.ranges, self.p, self.draws = list(ranges), p, 1 + 4 + 4

    def __call__(self, x, u):
        sync_free = x.device.type != "cpu" if self.sync_free is None else self.sync_free
        return self.by_selection(x, u) if sync_free else self.by_gathering(x, u)

    def by_gathering(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Each adjustment on the images that take it at each position (a boolean-mask gather and an `any()`
        per adjustment and position: host syncs on a GPU)."""
        apply, factors, order = u[:, 0] < self.p, u[:, 1:5], torch.argsort(u[:, 5:9], dim=1)
        x = x.clone()
        for position in range(4):
            for k, (fn, bounds) in enumerate(zip(self.adjust, self.ranges)):
                rows = apply & (order[:, position] == k)
                if bounds is None or not rows.any():
                    continue
                factor = bounds[0] + (bounds[1] - bounds[0]) * factors[rows, k]
                x[rows] = fn(x[rows], factor.to(x.dtype), self.pil_uint8)
        return x

    def by_selection(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Sync-free: at each of the 4 positions every image takes the adjustment its order puts there, chosen
        with `torch.where`. Brightness, contrast and saturation are one `blend` with each image's own
        degenerate (black, its mean luma, its luma); hue is computed for the whole batch and kept where
        chosen. Each image's arithmetic is that of its adjustment, so the pixels equal `by_gathering`'s."""
        apply, order = u[:, 0] < self.p, torch.argsort(u[:, 5:9], dim=1)
        factors = torch.stack([lo_hi[0] + (lo_hi[1] - lo_hi[0]) * u[:, 1 + k] if lo_hi is not None
                               else torch.zeros_like(u[:, 1 + k]) for k, lo_hi in enumerate(self.ranges)], 1)
        factors = factors.to(x.dtype)
        on = [k for k, lo_hi in enumerate(self.ranges) if lo_hi is not None]
        blends = [k for k in on if k < 3]
        for position in range(4):
            chosen = torch.where(apply, order[:, position], -1)  # the adjustment of each image; -1: none
            factor = factors.gather(1, order[:, position:position + 1])[:, 0]
            out = x
            if blends:
                degenerate = torch.zeros_like(x)  # brightness
                if 1 in blends or 2 in blends:
                    gray = grayscale(x, self.pil_uint8)
                    if 1 in blends:
                        degenerate = torch.where(_per_image(chosen == 1), gray_mean(gray, self.pil_uint8),
                                                 degenerate)
                    if 2 in blends:
                        degenerate = torch.where(_per_image(chosen == 2), gray, degenerate)
                blended = blend(degenerate, x, factor, self.pil_uint8)
                take = torch.stack([chosen == k for k in blends]).any(0)
                out = torch.where(_per_image(take), blended, out)
            if 3 in on:
                out = torch.where(_per_image(chosen == 3), hue(x, factor, self.pil_uint8), out)
            x = out
        return x


class Grayscale(Op):
    def __init__(self, p: float):
        self.p = p

    def __call__(self, x, u):
        return torch.where(_per_image(u[:, 0] < self.p), grayscale(x, self.pil_uint8), x)


class Flip(Op):
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, x, u):
        return torch.where(_per_image(u[:, 0] < self.p), x.flip(-1), x)


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size) normalised 1-D Gaussians, torchvision's gaussian_blur kernel."""
    half = (size - 1) * 0.5
    steps = torch.linspace(-half, half, size, device=sigma.device, dtype=sigma.dtype)
    kernel = torch.exp(-0.5 * (steps / sigma[:, None]) ** 2)
    return kernel / kernel.sum(1, keepdim=True)


class Blur(Op):
    """GaussianBlur(kernel, sigma range) with probability p, reflect padding, one sigma per image."""

    def __init__(self, kernel: Sequence[int], sigma: Sequence[float], p: float = 1.0):
        self.kernel, self.sigma, self.p, self.draws = tuple(kernel), tuple(sigma), p, 2

    def __call__(self, x, u):
        b, c, h, w = x.shape
        sigma = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * u[:, 1].to(x.dtype)
        ky, kx = self.kernel[1], self.kernel[0]  # torchvision's kernel_size is (x, y)
        planes = F.pad(x.reshape(1, b * c, h, w), [kx // 2, kx // 2, ky // 2, ky // 2], mode="reflect")
        along_x = gaussian_kernels(sigma, kx).repeat_interleave(c, 0).view(b * c, 1, 1, kx)
        along_y = gaussian_kernels(sigma, ky).repeat_interleave(c, 0).view(b * c, 1, ky, 1)
        blurred = F.conv2d(F.conv2d(planes, along_x, groups=b * c), along_y, groups=b * c).view(b, c, h, w)
        blurred = to_uint8_grid(blurred) if self.pil_uint8 else blurred  # torchvision rounds a uint8 blur
        return torch.where(_per_image(u[:, 0] < self.p), blurred, x)


class PadCrop(Op):
    """RandomCrop(size, padding, padding_mode="reflect"): a size x size window of the padded image."""

    def __init__(self, size: int, padding: int):
        self.size, self.padding, self.draws = size, padding, 2

    def __call__(self, x, u):
        padded = F.pad(x, [self.padding] * 4, mode="reflect") if self.padding else x
        room_y, room_x = padded.shape[2] - self.size + 1, padded.shape[3] - self.size + 1
        top = torch.floor(u[:, 0] * room_y).long().clamp(max=room_y - 1)
        left = torch.floor(u[:, 1] * room_x).long().clamp(max=room_x - 1)
        steps = torch.arange(self.size, device=x.device)
        rows, cols = (top.to(x.device)[:, None] + steps), (left.to(x.device)[:, None] + steps)
        batch = torch.arange(len(x), device=x.device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class DevicePipeline:
    """uint8 (B, C, H, W) images + (B, draws) uniforms -> normalised float views, on the images' device."""

    def __init__(self, ops: Sequence[Op], mean: Sequence[float], std: Sequence[float], size: int):
        self.ops, self.mean, self.std, self.size = list(ops), tuple(mean), tuple(std), size
        self.draws = sum(op.draws for op in self.ops)

    def __call__(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.size or images.shape[-2] != self.size:
            raise ValueError(f"the device path takes images of the network's size {self.size} (got "
                             f"{tuple(images.shape[-2:])}); set --data.image_size to the dataset's native size "
                             "or use the standard path (--data.device_resident=false)")
        x = images.float() / 255
        noise = noise.to(x.device)
        start = 0
        for op in self.ops:
            x = op(x, noise[:, start:start + op.draws])
            start += op.draws
        mean, std = self.normalization(x.device)
        return (x - mean) / std

    def normalization(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, C, 1, 1) mean and std on `device`, built once per device (a tensor from a Python list is a
        host-to-device copy, which blocks on a GPU)."""
        cache = self.__dict__.setdefault("_normalization", {})
        if device not in cache:
            cache[device] = (torch.tensor(self.mean).to(device).view(1, -1, 1, 1),
                             torch.tensor(self.std).to(device).view(1, -1, 1, 1))
        return cache[device]


def _translate(op) -> Op | None:
    """The device op for one torchvision transform of a preset; None for ToTensor / an untouched resize."""
    if isinstance(op, T.RandomApply):
        inner = [_translate(t) for t in op.transforms]
        if len(inner) != 1 or not isinstance(inner[0], (ColorJitter, Blur)):
            raise ValueError(f"the device path has no batched form of {op!r}; use --data.device_resident=false")
        inner[0].p = op.p
        return inner[0]
    if isinstance(op, T.RandomResizedCrop):
        return ResizedCrop(op.size[0], op.scale, op.ratio)
    if isinstance(op, T.ColorJitter):
        return ColorJitter([op.brightness, op.contrast, op.saturation, op.hue])
    if isinstance(op, T.RandomGrayscale):
        return Grayscale(op.p)
    if isinstance(op, T.RandomHorizontalFlip):
        return Flip(op.p)
    if isinstance(op, T.RandomRotation) and op.center is None and not op.expand and not op.fill:
        return Rotation(op.degrees)
    if isinstance(op, T.GaussianBlur):
        return Blur(op.kernel_size, op.sigma)
    if isinstance(op, T.RandomCrop) and op.padding_mode == "reflect" and isinstance(op.padding, int):
        return PadCrop(op.size[0], op.padding)
    if isinstance(op, (T.ToTensor, ResizeIfNeeded)):  # native-size images pass a ResizeIfNeeded untouched
        return None
    raise ValueError(f"the device path has no batched form of {op!r} (presets with a batched form: npid, "
                     "simclr, weak, digits, plain); use --data.device_resident=false")


def device_pipeline(transform: T.Compose, size: int) -> DevicePipeline:
    """The batched equivalent of a `build_transform` pipeline (ops, then Normalize)."""
    *ops, normalize = transform.transforms
    if not isinstance(normalize, T.Normalize):
        raise TypeError(f"expected a build_transform pipeline ending in Normalize, got {transform!r}")
    device_ops = [d for d in (_translate(op) for op in ops) if d is not None]
    for op in device_ops:  # PIL's images between the ops are uint8, and so are these
        op.pil_uint8 = True
    return DevicePipeline(device_ops, normalize.mean, normalize.std, size)


def resident_images(items: np.ndarray) -> torch.Tensor:
    """The decoded split as one uint8 (N, C, H, W) tensor, from the readers' (N, H, W[, C]) arrays."""
    if not isinstance(items, np.ndarray) or items.dtype != np.uint8 or items.ndim not in (3, 4):
        raise ValueError("the device-resident path needs a dataset decoded into one uint8 array (digits, "
                         "CIFAR-10/100, STL-10, SVHN); image files are read by the standard path: "
                         "--data.device_resident=false")
    images = torch.from_numpy(items)
    return images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2).contiguous()


class ResidentViewDataset(Dataset):
    """Training items of the device path: {"index", "target", "source" (V,), "noise" (V, draws)}, the
    views' image indices and uniforms; on the device they become `views` (`make_views`). Same contract
    as MultiViewDataset otherwise (seeds, hidden targets, partners, extras, (index, draw) keys)."""

    def __init__(self, targets: np.ndarray, draws: int, num_views: int, seed: int = 0,
                 reveal_targets: bool = False, partners: np.ndarray | None = None):
        self.sample_seed, self.targets, self.draws, self.num_views = sample_seed, targets, draws, num_views
        self.seed, self.reveal_targets, self.partners = seed, reveal_targets, partners
        self.extras: Callable[[int, int], dict] | None = None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.targets)

    def _noise(self, index: int, draw: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.sample_seed(self.seed, self.epoch, index, draw))
        return torch.rand(self.num_views, self.draws, generator=generator)

    def __getitem__(self, key) -> dict:
        index, draw = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)
        noise, source = self._noise(index, draw), torch.full((self.num_views,), index)
        if self.partners is not None and self.partners[index] != index:
            noise[1:] = self._noise(index, draw + 1)[1:]
            source[1:] = int(self.partners[index])
        target = int(self.targets[index]) if self.reveal_targets else -1
        item = {"index": index, "target": target, "source": source, "noise": noise}
        if self.extras is not None:
            item.update(self.extras(index, self.sample_seed(self.seed, self.epoch, index, draw + 2)))
        return item


def make_views(batch: dict, images: torch.Tensor, pipeline: DevicePipeline) -> dict:
    """A device-path batch with `source` / `noise` replaced by the augmented `views`."""
    batch = dict(batch)
    source, noise = batch.pop("source"), batch.pop("noise")
    images = images.to(source.device)
    batch["views"] = [pipeline(images[source[:, v]], noise[:, v]) for v in range(source.shape[1])]
    return batch


JPEG_MAGIC = b"\xff\xd8\xff"


def decode_images(files: Sequence[str], device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """uint8 (3, H, W) RGB images from image files, the JPEGs decoded in one batched call on `device`
    (nvJPEG on a CUDA device; libjpeg-turbo, PIL's decoder, on the CPU) and the other formats on the CPU.
    The building block of JPEG decoding on the GPU for the large datasets (CUB, Cars, SOP, In-Shop, ImageNet);
    its output equals PIL's `convert("RGB")` up to the decoders' rounding (tests/test_device_augment.py)."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file

    data = [read_file(str(path)) for path in files]
    jpeg = [i for i, d in enumerate(data) if bytes(d[:3].tolist()) == JPEG_MAGIC]
    out: list[torch.Tensor | None] = [None] * len(data)
    if jpeg:
        decoded = decode_jpeg([data[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
        for i, image in zip(jpeg, decoded):
            out[i] = image
    for i, d in enumerate(data):
        if out[i] is None:
            out[i] = decode_image(d, mode=ImageReadMode.RGB).to(device)
    return out
