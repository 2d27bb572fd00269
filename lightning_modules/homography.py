"""Homographies on images and attention maps in normalised coordinates ([-1, 1], align_corners=False):
apply, warp, fit from four points, and random crops / zooms / rotations / perspective shifts. TAC-CCL's
second view and cross pairs and ROUL's self-augmented views both draw from here."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.base import hparam

HOMOGRAPHY_KINDS = ("crop", "zoom", "rotation", "perspective")


def cell_centers(height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
    """(h*w, 2) (x, y) centres of a grid's cells, row-major: the points grid_sample reads at."""
    xs = (2 * torch.arange(width, device=device) + 1) / width - 1
    ys = (2 * torch.arange(height, device=device) + 1) / height - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], -1).reshape(-1, 2)


def homogeneous(points: Tensor) -> Tensor:
    return torch.cat([points, torch.ones_like(points[..., :1])], -1)


def apply_homography(homography: Tensor, points: Tensor) -> Tensor:
    """(B, n, 2) points mapped by (B, 3, 3) homographies."""
    mapped = homogeneous(points) @ homography.transpose(1, 2)
    return mapped[..., :2] / mapped[..., 2:]


def warp(t: Tensor, homography: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(warped, valid): out(p) = t(H p) on an output grid of `size`, H mapping output-frame points to
    t's frame; valid (B, 1, h, w) marks cells whose centre lands inside t (from the grid, so a map and
    an image warped by the same H agree). Outside is zero (the mean colour of normalised images)."""
    h, w = size
    points = cell_centers(h, w, t.device).expand(len(t), -1, -1)
    grid = apply_homography(homography.to(t.device, torch.float32), points)
    valid = (grid.abs() <= 1).all(-1).reshape(-1, 1, h, w).to(t.dtype)
    warped = F.grid_sample(t, grid.reshape(-1, h, w, 2).to(t.dtype), mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    return warped, valid


def homography_from_points(source: Tensor, target: Tensor) -> Tensor:
    """(B, 3, 3) homographies (h33 = 1) mapping 4 source points onto 4 target points (DLT)."""
    x, y = source.unbind(-1)
    u, v = target.unbind(-1)
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -x * u, -y * u], -1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -x * v, -y * v], -1)
    h = torch.linalg.solve(torch.cat([rows_u, rows_v], 1), torch.cat([u, v], 1))
    return torch.cat([h, torch.ones_like(h[:, :1])], 1).reshape(-1, 3, 3)


@hparam
@dataclass
class TransformRanges:
    """The family 𝒯 of self-pair transforms (the chapter gives no ranges: docs/methods/tac_ccl.md); one kind per pair.
    Each maps second-view points to anchor points: crop = a square sub-window of side crop_scale,
    zoom about the centre (log-uniform), rotation of ±rotation_degrees, perspective = each corner moved by
    up to perspective_shift (normalised units; 8 parameters, the chapter's "6" being an affine)."""

    kinds: list[str] = field(default_factory=lambda: list(HOMOGRAPHY_KINDS))
    crop_scale: tuple[float, float] = (0.6, 1.0)
    zoom: tuple[float, float] = (0.75, 1.33)
    rotation_degrees: float = 30.0
    perspective_shift: float = 0.2


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _crop(n: int, ranges: TransformRanges, generator: torch.Generator) -> Tensor:
    s = _uniform(n, *ranges.crop_scale, generator)
    tx, ty = ((1 - s) * _uniform(n, -1.0, 1.0, generator) for _ in range(2))
    h = torch.eye(3).repeat(n, 1, 1)
    h[:, 0, 0], h[:, 1, 1], h[:, 0, 2], h[:, 1, 2] = s, s, tx, ty
    return h


def _zoom(n: int, ranges: TransformRanges, generator: torch.Generator) -> Tensor:
    z = _uniform(n, *(math.log(v) for v in ranges.zoom), generator).exp()
    h = torch.eye(3).repeat(n, 1, 1)
    h[:, 0, 0], h[:, 1, 1] = 1 / z, 1 / z
    return h


def _rotation(n: int, ranges: TransformRanges, generator: torch.Generator) -> Tensor:
    theta = torch.deg2rad(_uniform(n, -ranges.rotation_degrees, ranges.rotation_degrees, generator))
    h = torch.eye(3).repeat(n, 1, 1)
    h[:, 0, 0], h[:, 0, 1], h[:, 1, 0], h[:, 1, 1] = theta.cos(), -theta.sin(), theta.sin(), theta.cos()
    return h


def _perspective(n: int, ranges: TransformRanges, generator: torch.Generator) -> Tensor:
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]).expand(n, 4, 2)
    shift = ranges.perspective_shift * (2 * torch.rand(n, 4, 2, generator=generator) - 1)
    return homography_from_points(corners, corners + shift)


_SAMPLERS: dict[str, Callable[[int, TransformRanges, torch.Generator], Tensor]] = {
    "crop": _crop, "zoom": _zoom, "rotation": _rotation, "perspective": _perspective}


def sample_homographies(n: int, ranges: TransformRanges, generator: torch.Generator) -> Tensor:
    """(n, 3, 3) CPU homographies, the kind drawn uniformly per pair from `ranges.kinds`."""
    unknown = set(ranges.kinds) - set(HOMOGRAPHY_KINDS)
    if unknown or not ranges.kinds:
        raise ValueError(f"transforms.kinds {ranges.kinds}: choose from {HOMOGRAPHY_KINDS}")
    kind = torch.randint(len(ranges.kinds), (n,), generator=generator)
    every = torch.stack([_SAMPLERS[k](n, ranges, generator) for k in ranges.kinds])
    return every[kind, torch.arange(n)]
