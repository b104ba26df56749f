"""Bringing images to a model's input: resize, channels, random jitter, and reading a user's image file."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from skimage import io, transform

from downpour.data.gray import float_picture_unit, luminance
from downpour.data.own import large_pictures, upright
from downpour.errors import DataError


def fit_images(images: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Resize images ``(N, H, W)`` or ``(N, C, H, W)`` in [0, 1] to ``shape`` ``(C', H', W')``: ``(N, C', H', W')``.

    Each image is resized (anti-aliased when shrinking, bilinear when enlarging) to the model's side; one gray
    channel is repeated for a colour model, and colour becomes gray for a gray one by the luminance training uses.
    """
    channels, height, width = shape
    if images.ndim == 3:
        images = images[:, None]  # (N, 1, H, W)
    if images.ndim != 4:
        raise DataError(f"expected images (N, H, W) or (N, C, H, W), got shape {images.shape}")
    if images.shape[1] != channels:
        if channels == 1:
            images = luminance(images, channel_axis=1)  # (N, 1, H, W)
        elif images.shape[1] == 1:
            images = np.repeat(images, channels, axis=1)  # (N, C, H, W)
        else:
            raise DataError(f"cannot turn {images.shape[1]}-channel images into {channels} channels")
    if images.shape[2:] == (height, width):
        return images.astype(np.float32)
    shrinking = images.shape[2] > height or images.shape[3] > width
    out = np.stack(
        [transform.resize(image, (channels, height, width), order=1, anti_aliasing=shrinking) for image in images]
    )
    return np.clip(out, 0.0, 1.0).astype(np.float32)  # (N, C, H, W)


def jitter_images(
    images: np.ndarray,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = (0.8, 1.2),
    degrees: float = 15.0,
    shift: float = 4.0,
) -> np.ndarray:
    """Each image ``(N, H, W)`` under its own random similarity transform about its centre: a scale drawn from
    ``scale``, a rotation from ±``degrees``, a shift of ±``shift`` pixels on each axis (edges are extended)."""
    out = np.empty_like(images)
    for index, image in enumerate(images):
        s = rng.uniform(*scale)
        angle = math.radians(rng.uniform(-degrees, degrees))
        dy, dx = rng.uniform(-shift, shift, size=2)
        centre = np.array([image.shape[-1] - 1, image.shape[-2] - 1]) / 2.0  # (x, y)
        to_origin = transform.SimilarityTransform(translation=-centre)
        move = transform.SimilarityTransform(scale=s, rotation=angle, translation=centre + np.array([dx, dy]))
        forward = to_origin + move  # output pixel = move(to_origin(input pixel))
        out[index] = transform.warp(image, forward.inverse, mode="edge", preserve_range=True)
    return out


# The first bytes of the picture formats read (PNG, JPEG, GIF, BMP, TIFF both byte orders, WebP's RIFF container).
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")


def _has_image_signature(path: Path) -> bool:
    """Whether ``path`` starts like a picture file (a corrupt one still does; a text file does not)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError:
        return True  # unreadable: let the reader's own error speak
    return head.startswith(_SIGNATURES)


def _first_picture(image: np.ndarray) -> np.ndarray:
    """``(H, W[, C])`` from what imageio read of a one-frame file (files of several frames or pages are read by
    Pillow: :func:`_as_training_reads`): a GIF comes as ``(1, H, W, C)``, a one-page grey file may come as
    ``(1, H, W)``; grey plus alpha ``(H, W, 2)`` is its grey."""
    one_grey = image.ndim == 3 and image.shape[0] == 1 and image.shape[-1] not in (2, 3, 4)
    if image.ndim == 4 or one_grey:
        image = image[0]
    if image.ndim == 3 and image.shape[-1] == 2:
        image = image[..., 0]
    return image


def _as_training_reads(path: Path) -> np.ndarray | None:
    """The pictures that must be read as training's reader reads them, not as they are stored: a CMYK picture (JPEGs
    from print workflows) converted to RGB (read as it is, its C, M, Y would be taken for R, G, B: the negative),
    one with an EXIF orientation (a phone's portrait photo) turned upright, and one of several frames or pages as
    its first (imageio reads them all, and 3 or 4 gray frames came back as one picture's colour channels). None for
    any other file."""
    try:
        with Image.open(path) as image:
            turned = upright(image)
            if image.mode == "CMYK":
                return np.asarray(turned.convert("RGB"))
            if turned is image and getattr(image, "n_frames", 1) == 1:
                return None
            if turned.mode in ("P", "PA", "1", "YCbCr", "LAB", "HSV"):
                turned = turned.convert("RGB")
            return np.asarray(turned)  # L, LA, RGB, RGBA, and 16-bit or float gray, scaled as the main reader does
    except (UnidentifiedImageError, OSError, ValueError):  # not a picture PIL knows: the main reader says what
        return None


def read_image(path: Path, channels: int) -> np.ndarray:
    """An image file as a float32 array ``(channels, H, W)`` in [0, 1] (of an animation or a multi-page file: its
    first frame); an unreadable file raises DataError."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"image {path} is a directory (name one image file)")
    if not path.is_file():
        raise DataError(f"image {path} does not exist")
    try:
        with large_pictures():
            image = _as_training_reads(path)  # (H, W[, C]): one picture
            image = io.imread(path) if image is None else image
    except Exception as exc:  # imageio raises many kinds for a corrupt or unknown file
        if not _has_image_signature(path):
            raise DataError(f"not an image: {path} (its contents are no picture format; PNG, JPEG, GIF, BMP, TIFF "
                            "and WebP are read)") from None  # fmt: skip
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from None
    image = _first_picture(np.asarray(image))
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        image = image[..., :3]
    elif image.ndim != 2:
        raise DataError(f"image {path} has shape {image.shape}; expected a gray or colour picture")
    if image.dtype.kind in "ui":  # 8 bits, or 16 and 32-bit gray (Pillow's "I" modes): scaled as training scales it
        top = 255.0 if image.dtype.itemsize == 1 else 65535.0
        image = np.clip(image.astype(np.float32) / top, 0.0, 1.0)
    else:  # float gray, or a float colour picture: the rule training reads float pictures by
        image = float_picture_unit(image)
    image = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)  # (C, H, W)
    return fit_images(image[None], (channels, *image.shape[1:]))[0]  # channels converted, size unchanged
