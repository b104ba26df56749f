"""Bundled example sources (nothing is downloaded): patches of scikit-image's photos, LFW faces, digits.

Each loader returns raw examples as a float32 array ``(N, C, H, W)`` with values in [0, 1].
"""

from __future__ import annotations

import numpy as np
from skimage import color, data

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
    if image.ndim == 3:
        image = color.rgb2gray(image[..., :3])
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


def natural_patches(count: int, patch_size: int, rng: np.random.Generator, *, channels: int = 1) -> np.ndarray:
    """``count`` square patches (or image crops) cut at random places from the bundled photos:
    ``(count, channels, p, p)``; grayscale for 1 channel, the colour photos for 3.

    Each photo is picked with probability proportional to its number of possible patch positions.
    """
    photos = [p[None] for p in bundled_photos()] if channels == 1 else bundled_colour_photos()  # each (C, H, W)
    photos = [p for p in photos if min(p.shape[1:]) >= patch_size]
    if not photos:
        raise DataError(f"no bundled photo is large enough for data.patch_size={patch_size}")
    positions = np.array([(p.shape[1] - patch_size + 1) * (p.shape[2] - patch_size + 1) for p in photos])
    per_photo = rng.multinomial(count, positions / positions.sum())
    pieces = []
    for photo, n in zip(photos, per_photo, strict=True):
        if n == 0:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(photo, (patch_size, patch_size), axis=(1, 2))
        ys = rng.integers(0, windows.shape[1], size=n)  # windows: (C, H', W', p, p)
        xs = rng.integers(0, windows.shape[2], size=n)
        pieces.append(np.moveaxis(windows[:, ys, xs], 0, 1))  # (n, C, p, p)
    patches = np.concatenate(pieces)[rng.permutation(count)]
    return patches.astype(np.float32)  # (count, C, p, p)


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
