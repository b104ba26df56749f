"""Bundled example sources (nothing is downloaded): patches of scikit-image's photos, LFW faces, digits.

Each loader returns raw examples as a float32 array ``(N, C, H, W)`` with values in [0, 1].
"""

from __future__ import annotations

import numpy as np
from skimage import data

from downpour.data.gray import luminance
from downpour.errors import DataError

# Natural photographs and textures that ship inside scikit-image (no network needed).
PHOTOS = (
    "camera",
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "coins",
    "moon",
    "brick",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
)


# The photos among PHOTOS that are in colour (used when data.channels = 3).
COLOUR_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


def _grayscale(image: np.ndarray) -> np.ndarray:
    if image.dtype.kind in "ui":
        image = image.astype(np.float32) / np.iinfo(image.dtype).max
    if image.ndim == 3:
        image = luminance(image[..., :3], channel_axis=-1)[..., 0]  # (H, W)
    image = image.astype(np.float32)
    if image.max() > 1.0:
        image /= 255.0
    return image


def bundled_photos() -> list[np.ndarray]:
    """scikit-image's bundled photos and textures as grayscale float32 arrays in [0, 1]."""
    return [_grayscale(getattr(data, name)()) for name in PHOTOS]


def bundled_colour_photos() -> list[np.ndarray]:
    """The colour photos among the bundled ones as float32 arrays ``(3, H, W)`` in [0, 1]."""
    photos = []
    for name in COLOUR_PHOTOS:
        image = getattr(data, name)()[..., :3].astype(np.float32)
        photos.append(np.moveaxis(image / 255.0 if image.max() > 1.0 else image, -1, 0))
    return photos


def _positions(images: list[np.ndarray], size: int) -> list[int]:
    """Each picture's number of crop positions of side ``size`` (0 for one smaller than that)."""
    return [max(0, p.shape[1] - size + 1) * max(0, p.shape[2] - size + 1) for p in images]


def crop_positions(images: list[np.ndarray], size: int) -> int:
    """How many distinct crops of side ``size`` the pictures ``(C, H, W)`` hold: the most :func:`random_crops` can
    cut without repeating one."""
    return sum(_positions(images, size))


def random_crops(images: list[np.ndarray], count: int, size: int, rng: np.random.Generator, *,
                 where: str = "the pictures") -> np.ndarray:  # fmt: skip
    """``count`` square crops of side ``size`` cut at uniformly random places from ``images`` (each ``(C, H, W)``,
    float in [0, 1] or uint8): ``(count, C, size, size)`` float32 in [0, 1].

    Each picture is picked with probability proportional to its number of possible crop positions, so every
    position of every picture is equally likely; pictures smaller than ``size`` are left out.
    """
    images = [p for p in images if min(p.shape[1:]) >= size]
    if not images:
        raise DataError(f"no picture in {where} is at least {size} pixels on its shorter side")
    positions = np.array(_positions(images, size), dtype=np.float64)
    per_image = rng.multinomial(count, positions / positions.sum())
    pieces = []
    for image, n in zip(images, per_image, strict=True):
        if n == 0:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(image, (size, size), axis=(1, 2))  # (C, H', W', p, p)
        ys = rng.integers(0, windows.shape[1], size=n)
        xs = rng.integers(0, windows.shape[2], size=n)
        pieces.append(np.moveaxis(windows[:, ys, xs], 0, 1))  # (n, C, p, p)
    crops = np.concatenate(pieces)[rng.permutation(count)]  # (count, C, p, p)
    if crops.dtype == np.uint8:
        return crops.astype(np.float32) / 255.0
    return crops.astype(np.float32)


def natural_patches(count: int, patch_size: int, rng: np.random.Generator, *, channels: int = 1) -> np.ndarray:
    """``count`` square patches (or image crops) cut at random places from the bundled photos:
    ``(count, channels, p, p)``; grayscale for 1 channel, the colour photos for 3 (see :func:`random_crops`).
    """
    photos = [p[None] for p in bundled_photos()] if channels == 1 else bundled_colour_photos()  # each (C, H, W)
    return random_crops(photos, count, patch_size, rng, where="the bundled photos")


def lfw_faces() -> np.ndarray:
    """The 100 face crops of scikit-image's ``lfw_subset``: ``(100, 1, 25, 25)``."""
    images = data.lfw_subset()  # (200, 25, 25): 100 faces, then 100 non-faces
    return images[:100, None].astype(np.float32)


def lfw_labelled() -> tuple[np.ndarray, np.ndarray]:
    """All 200 images of ``lfw_subset`` ``(200, 1, 25, 25)`` and labels (1 = face, 0 = not a face)."""
    images = data.lfw_subset()
    labels = np.r_[np.ones(100, dtype=np.int64), np.zeros(100, dtype=np.int64)]
    return images[:, None].astype(np.float32), labels


def digits() -> np.ndarray:
    """scikit-learn's 1,797 handwritten digits, scaled to [0, 1]: ``(1797, 1, 8, 8)``."""
    from sklearn.datasets import load_digits

    return (load_digits().images / 16.0)[:, None].astype(np.float32)
