"""Bringing images to a model's input: resize, channels, random jitter, and reading a user's image file."""

from __future__ import annotations

import math
from collections.abc import Callable
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


_TO_RGB = ("P", "PA", "1", "YCbCr", "LAB", "HSV")  # Pillow modes whose values are no gray or RGB: converted


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
            if turned.mode in _TO_RGB:
                turned = turned.convert("RGB")
            return np.asarray(turned)  # L, LA, RGB, RGBA, and 16-bit or float gray, scaled as the main reader does
    except (UnidentifiedImageError, OSError, ValueError):  # not a picture PIL knows: the main reader says what
        return None


# How Pillow turns a picture for each EXIF orientation (as ImageOps.exif_transpose does); 5 to 8 swap its sides.
_TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
          5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_90}  # fmt: skip
_AS_RGB = (*_TO_RGB, "CMYK", "RGBA")  # read as RGB, as :func:`_as_training_reads` reads them (its alpha dropped)


def _stored_size(path: Path) -> tuple[int, int] | None:
    """``(H, W)`` of the picture at ``path`` as its header stores it (before an EXIF turn, which keeps its pixel
    count), read without decoding a pixel; None for a file Pillow cannot open (the reader then says why)."""
    try:
        with large_pictures(), Image.open(path) as image:
            return image.height, image.width
    except Exception:  # not a picture PIL knows, or one over Pillow's limit: the reader's own error speaks
        return None


def _read_reduced(path: Path, height: int, width: int) -> tuple[np.ndarray, tuple[int, int]] | None:
    """The picture at ``path`` decoded at a reduced size no smaller than ``height`` x ``width`` (sides as stored),
    where that halves it or more: a JPEG by its decoder (at 1/2, 1/4 or 1/8), then any picture averaged over blocks
    of k x k pixels as soon as it is decoded, so that a picture scanned at a fraction of its size never exists at
    full size as floats (a 1,000 MP gray PNG at ``--scale 0.1``: 1 GB, not 4 GB per float copy). Turned upright,
    with the picture's own size ``(H, W)`` upright. None where it would not halve, and for a float picture (its
    scale is decided on all its values: see :func:`~downpour.data.gray.float_picture_unit`) or a mode not read
    here."""
    with Image.open(path) as image:
        if min(image.height // height, image.width // width) < 2 or image.mode == "F":
            return None
        whole = (image.height, image.width)  # before a JPEG's draft shrinks it
        if image.format == "JPEG":
            image.draft(None, (width, height))  # the largest of 1/2, 1/4, 1/8 that keeps at least this size
        image.load()  # decoded as stored (8 or 16 bits a channel): the only full-size copy
        orientation = image.getexif().get(0x0112, 1)
        picture: Image.Image = image
        if image.mode.startswith("I;16"):
            picture = image.convert("I")  # 16-bit gray: Pillow reduces 32-bit integers, not 16-bit ones
        elif image.mode == "LA":
            picture = image.convert("L")  # its gray; the alpha is dropped, as read_image drops it
        elif image.mode in _AS_RGB:
            picture = image.convert("RGB")
        elif image.mode not in ("L", "RGB", "I"):
            return None
        factor = min(picture.height // height, picture.width // width)
        if factor >= 2:
            picture = picture.reduce(factor)
        if orientation in _TURNS:
            picture = picture.transpose(_TURNS[orientation])
        return np.asarray(picture), whole[::-1] if orientation in (5, 6, 7, 8) else whole


def read_image(path: Path, channels: int, *, size: Callable[[int, int], tuple[int, int]] | None = None) -> np.ndarray:
    """An image file as a float32 array ``(channels, H, W)`` in [0, 1] (of an animation or a multi-page file: its
    first frame); an unreadable file raises DataError.

    ``size`` maps the picture's ``(H, W)`` to the size to return it at, and may refuse it by raising: it is asked
    from the file's header before any pixel is decoded (where Pillow reads the header), so a picture too large is
    refused in a moment instead of after seconds and gigabytes; one wanted at half its size or less is decoded
    reduced (:func:`_read_reduced`)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"image {path} is a directory (name one image file)")
    if not path.is_file():
        raise DataError(f"image {path} does not exist")
    stored = _stored_size(path) if size is not None else None
    wanted = size(*stored) if size is not None and stored is not None else None  # may refuse it, before decoding
    reduced = None
    try:
        with large_pictures():
            reduced = _read_reduced(path, *wanted) if wanted is not None else None
            image = reduced[0] if reduced is not None else _as_training_reads(path)  # (H, W[, C]): one picture
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
    shape = reduced[1] if reduced is not None else image.shape[1:]  # the picture's own size, upright
    if size is not None:
        shape = size(*shape)  # a file Pillow cannot open is refused here, once decoded
    return fit_images(image[None], (channels, *shape))[0]  # channels converted, resized to the size wanted
