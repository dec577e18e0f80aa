"""Normalisation and augmentations of point clouds.

Derived in notebooks/part2_point_peft/10_point_clouds.ipynb (used from
notebooks/part2_point_peft/11_shape_data.ipynb on).

Every function takes one cloud (N, 3) or a batch (B, N, 3), returns a new tensor of the same
shape (the input is not modified), and draws its randomness from an optional
`torch.Generator`, so that a seeded generator gives the same augmentation every run.
Batched calls draw one scale / shift / angle per cloud.

Up axis: the course takes **y as up by default**, as Point-MAE's ScanObjectNN pipeline does
(its rotation augmentation turns clouds about y). Every function that cares has an `up_axis`
argument ("x", "y" or "z"); pass "z" for z-up data.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "UP_AXIS",
    "axis_index",
    "jitter",
    "normalize_to_unit_sphere",
    "random_scale_translate",
    "rotate_about_up_axis",
]

#: The course's default up axis.
UP_AXIS = "y"
_AXES = {"x": 0, "y": 1, "z": 2}


def axis_index(axis: str) -> int:
    """0, 1, 2 for "x", "y", "z" (the course's up axis is "y" unless said otherwise)."""
    if axis not in _AXES:
        raise ValueError(f"axis must be one of 'x', 'y', 'z', got {axis!r}")
    return _AXES[axis]


def _as_batch(points: Tensor) -> tuple[Tensor, bool]:
    """(N, 3) -> (1, N, 3) with a flag to undo it; (B, N, 3) passes; anything else is an error."""
    if not isinstance(points, Tensor):
        raise TypeError(f"points must be a torch.Tensor of shape (N, 3) or (B, N, 3), got {type(points).__name__}")
    if points.dim() not in (2, 3) or points.shape[-1] != 3:
        raise ValueError(f"points must have shape (N, 3) or (B, N, 3), got {tuple(points.shape)}")
    if not points.is_floating_point():
        raise TypeError(f"points must be a floating-point tensor, got dtype {points.dtype}")
    return (points.unsqueeze(0), True) if points.dim() == 2 else (points, False)


def _uniform(
    low: float, high: float, shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None
) -> Tensor:
    """Uniform samples in [low, high) with the dtype/device of `like` (drawn on the CPU for CPU generators)."""
    device = generator.device if generator is not None else like.device
    sample = torch.rand(shape, generator=generator, device=device, dtype=like.dtype)
    return (low + (high - low) * sample).to(like.device)


def normalize_to_unit_sphere(points: Tensor) -> Tensor:
    """Centre each cloud at its centroid and scale it so that its farthest point is at distance 1.

    p <- (p - mean(p)) / max_j ||p_j - mean(p)||, as Point-MAE's `pc_norm`. A cloud whose points
    all coincide is only centred.
    """
    batch, was_single = _as_batch(points)
    centred = batch - batch.mean(dim=1, keepdim=True)  # (B, N, 3)
    radius = centred.norm(dim=-1).amax(dim=1)  # farthest point from the centroid     (B,)
    radius = torch.where(radius > 0, radius, torch.ones_like(radius))
    normalised = centred / radius[:, None, None]
    return normalised[0] if was_single else normalised


def random_scale_translate(
    points: Tensor,
    scale_range: tuple[float, float] = (2.0 / 3.0, 3.0 / 2.0),
    translate_range: float = 0.2,
    anisotropic: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """p <- s * p + t with s ~ U(scale_range), t ~ U(-translate_range, translate_range), per cloud.

    The defaults are Point-MAE's `PointcloudScaleAndTranslate` (one scale per axis when
    `anisotropic`); Point-PEFT uses scale (0.9, 1.1) for ScanObjectNN's hardest split.
    """
    low, high = scale_range
    if not 0 < low <= high:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
    if translate_range < 0:
        raise ValueError(f"translate_range must be >= 0, got {translate_range}")
    batch, was_single = _as_batch(points)
    batch_size = batch.shape[0]
    scale = _uniform(low, high, (batch_size, 1, 3 if anisotropic else 1), batch, generator)  # (B, 1, 3 or 1)
    shift = _uniform(-translate_range, translate_range, (batch_size, 1, 3), batch, generator)  # (B, 1, 3)
    moved = batch * scale + shift
    return moved[0] if was_single else moved


def rotate_about_up_axis(
    points: Tensor,
    angle: float | Tensor | None = None,
    up_axis: str = UP_AXIS,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Rotate each cloud by `angle` radians about the up axis (right-handed: counter-clockwise
    seen from the positive up axis). `angle`: a float, a (B,) tensor, or None for a random angle
    in [0, 2 pi) per cloud. The up coordinate and every distance are unchanged."""
    batch, was_single = _as_batch(points)
    batch_size = batch.shape[0]
    if angle is None:
        angles = _uniform(0.0, 2.0 * math.pi, (batch_size,), batch, generator)  # (B,)
    else:
        angles = torch.as_tensor(angle, dtype=batch.dtype, device=batch.device)
        if angles.dim() == 0:
            angles = angles.expand(batch_size)
        if angles.shape != (batch_size,):
            raise ValueError(
                f"angle must be a number or a tensor of shape (B,) = ({batch_size},), got {tuple(angles.shape)}"
            )
    up = axis_index(up_axis)
    # (a, b) are the two other axes in cyclic order (y up: z, x; z up: x, y; x up: y, z), so
    # a' = cos a - sin b, b' = sin a + cos b is the right-handed rotation about `up`.
    a, b = (up + 1) % 3, (up + 2) % 3
    cos, sin = torch.cos(angles)[:, None], torch.sin(angles)[:, None]  # (B, 1)
    rotated = batch.clone()
    rotated[..., a] = cos * batch[..., a] - sin * batch[..., b]
    rotated[..., b] = sin * batch[..., a] + cos * batch[..., b]
    return rotated[0] if was_single else rotated


def jitter(points: Tensor, sigma: float = 0.01, clip: float = 0.05, generator: torch.Generator | None = None) -> Tensor:
    """Add Gaussian noise to every coordinate: p <- p + clip(sigma * n, -clip, clip), n ~ N(0, 1)."""
    if sigma < 0 or clip <= 0:
        raise ValueError(f"sigma must be >= 0 and clip > 0, got sigma={sigma}, clip={clip}")
    batch, was_single = _as_batch(points)
    device = generator.device if generator is not None else batch.device
    noise = torch.randn(batch.shape, generator=generator, device=device, dtype=batch.dtype).to(batch.device)
    shaken = batch + (sigma * noise).clamp(-clip, clip)
    return shaken[0] if was_single else shaken
