"""Augmentation presets per dataset family, and the MultiView wrapper.

Presets (train and eval are separate presets, chosen in config):
  npid          ISIF/NPID/EIR pipeline: RandomResizedCrop(scale 0.2-1), ColorJitter(0.4 x4, always on),
                RandomGrayscale(0.2), HorizontalFlip. Values from the authors' code [C]; CIFAR at
                32, STL at 96, EIR's ImageNet-100/CUB/Cars at 224.
  simclr        UMM's ImageNet pipeline ("same as SimCLR"): RandomResizedCrop(scale 0.08-1), flip,
                ColorJitter(0.8,0.8,0.8,0.2) with p 0.8, RandomGrayscale(0.2), GaussianBlur(kernel ~10% of the
                crop, sigma 0.1-2) with p 0.5.
  weak          MixMatch / Mean-Teacher weak augmentation: HorizontalFlip, reflect-pad by size/8 (4 px at 32)
                and RandomCrop(size). SVHN drops the flip (drop_ops: [flip]).
  plain         ToTensor + Normalize only, after a resize to size x size when needed (CIFAR/STL/SVHN
                evaluation; the "No DA" ablation as a train preset).
  fine_grained  RxR resize (aspect ratio ignored), RandomCrop(size) + HorizontalFlip (ISIF setting B).
  center        RxR resize, CenterCrop(size): evaluation for `fine_grained`.
  resized_crop  Resize(R) on the shorter side, RandomResizedCrop(size, scale 0.16-1), HorizontalFlip
                (multi-similarity code lineage: TAC-CCL, SAN, ROUL).
  resize_center Resize(R) on the shorter side, CenterCrop(size): evaluation for `resized_crop`, and the
                ImageNet evaluation at 224.
  digits        8x8 digits: small random resized crop and rotation, no flip (a 2 is not a mirrored 2).
R, the resize side, is 256 at the papers' crop sizes 224 and 227 [P] and keeps the 256/224 ratio at any other
size [R] (`resize_side`; --data.resize_size overrides it). `weak` and `plain` first resize an image that is not
size x size to size x size (aspect ratio ignored), and leave one that is untouched (CIFAR, SVHN, STL, digits at
their native size: byte-identical), so every preset yields size x size inputs from images of any size.
`drop_ops` removes single operations for the ISIF Table 7 ablation: crop, color, gray, flip, rotate, blur.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from PIL import Image
from torchvision import transforms as T

OPS = ("crop", "color", "gray", "flip", "rotate", "blur")
PRESETS = ("npid", "simclr", "weak", "plain", "fine_grained", "center", "resized_crop", "resize_center",
           "digits")
PAPER_RESIZE = {224: 256, 227: 256}  # crop size -> resize side in the papers' protocols [P]
RESIZED = ("fine_grained", "center", "resized_crop", "resize_center")  # the presets that use the resize side


def resize_side(size: int) -> int:
    """The resize side before a `size` crop: the papers' 256 at 224 and 227, else round(size * 256 / 224)."""
    return PAPER_RESIZE.get(size, round(size * 256 / 224))


class ResizeIfNeeded:
    """Resize to size x size (aspect ratio ignored) unless the image is already that size, which passes
    through untouched (no resampling): native-size datasets stay byte-identical."""

    def __init__(self, size: int):
        self.size, self.resize = size, T.Resize((size, size))

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.size == (self.size, self.size) else self.resize(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def _ops(preset: str, size: int, resize: int) -> list[tuple[str, Callable]]:
    if preset == "npid":
        return [("crop", T.RandomResizedCrop(size, scale=(0.2, 1.0))),
                ("color", T.ColorJitter(0.4, 0.4, 0.4, 0.4)),
                ("gray", T.RandomGrayscale(p=0.2)),
                ("flip", T.RandomHorizontalFlip())]
    if preset == "simclr":
        kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # odd, about 10% of the crop side
        return [("crop", T.RandomResizedCrop(size, scale=(0.08, 1.0))),
                ("flip", T.RandomHorizontalFlip()),
                ("color", T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8)),
                ("gray", T.RandomGrayscale(p=0.2)),
                ("blur", T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))]
    if preset == "weak":
        return [("resize", ResizeIfNeeded(size)), ("flip", T.RandomHorizontalFlip()),
                ("crop", T.RandomCrop(size, padding=size // 8, padding_mode="reflect"))]
    if preset == "fine_grained":
        return [("resize", T.Resize((resize, resize))), ("crop", T.RandomCrop(size)),
                ("flip", T.RandomHorizontalFlip())]
    if preset == "center":
        return [("resize", T.Resize((resize, resize))), ("center", T.CenterCrop(size))]
    if preset == "resized_crop":
        return [("resize", T.Resize(resize)), ("crop", T.RandomResizedCrop(size, scale=(0.16, 1.0))),
                ("flip", T.RandomHorizontalFlip())]
    if preset == "resize_center":
        return [("resize", T.Resize(resize)), ("center", T.CenterCrop(size))]
    if preset == "digits":
        return [("crop", T.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.8, 1.25))),
                ("rotate", T.RandomRotation(12)),
                ("color", T.ColorJitter(0.4, 0.4))]
    if preset == "plain":
        return [("resize", ResizeIfNeeded(size))]
    raise ValueError(f"unknown transform preset {preset!r}; use one of {', '.join(PRESETS)}")


def build_transform(preset: str, size: int, mean: Sequence[float], std: Sequence[float],
                    drop_ops: Sequence[str] = (), resize: int | None = None) -> T.Compose:
    """The preset's operations minus `drop_ops`, then ToTensor and Normalize(mean, std). `resize`: the
    resize side of the RESIZED presets (None: `resize_side(size)`)."""
    unknown = set(drop_ops) - set(OPS)
    if unknown:
        raise ValueError(f"drop_ops {sorted(unknown)} unknown; choose from {OPS}")
    resize = resize_side(size) if resize is None else resize
    if preset in RESIZED and resize < size:
        raise ValueError(f"preset {preset!r} resizes to {resize} before a {size}-pixel crop: set "
                         f"--data.resize_size >= --data.image_size ({size}), or leave it unset for "
                         f"{resize_side(size)}")
    ops = [op for name, op in _ops(preset, size, resize) if name not in drop_ops]
    return T.Compose([*ops, T.ToTensor(), T.Normalize(mean, std)])


class MultiView:
    """Applies the same (random) transform `num_views` times, independently: the views of a sample."""

    def __init__(self, transform: Callable, num_views: int = 2):
        if num_views < 1:
            raise ValueError("num_views must be >= 1")
        self.transform, self.num_views = transform, num_views

    def __call__(self, image) -> list:
        return [self.transform(image) for _ in range(self.num_views)]
