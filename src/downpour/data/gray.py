"""Colour to gray, one way for every source and for evaluation: ITU-R BT.709 luminance, the weights of
scikit-image's ``rgb2gray`` (so a model sees the same gray at training, in the face-neuron test and in ``detect``)."""

from __future__ import annotations

import numpy as np

LUMINANCE = (0.2125, 0.7154, 0.0721)  # R, G, B weights (ITU-R BT.709)


def luminance(images: np.ndarray, channel_axis: int) -> np.ndarray:
    """The luminance of RGB ``images`` along ``channel_axis`` (which must hold 3 channels), as float32 in the
    images' own scale (0..255 stays 0..255); the channel axis is kept with size 1."""
    if images.shape[channel_axis] != 3:
        raise ValueError(f"luminance needs 3 colour channels on axis {channel_axis}, got shape {images.shape}")
    weights = np.asarray(LUMINANCE, dtype=np.float32)
    moved = np.moveaxis(images.astype(np.float32, copy=False), channel_axis, -1)  # (..., 3)
    return np.expand_dims(moved @ weights, channel_axis)


def float_picture_unit(values: np.ndarray) -> np.ndarray:
    """A float picture (gray in Pillow's "F" mode, as TIFFs store it, or any that imageio reads as floats) as
    float32 in [0, 1]: a picture whose finite values all lie in [0, 1] is taken as stored on that scale, any other
    as on 0..255; NaN counts as black, and what lies outside the scale is clipped. Training and evaluation read
    float pictures by this one rule."""
    values = np.asarray(values, dtype=np.float32)
    finite = values[np.isfinite(values)]
    top = 255.0 if finite.size and finite.max() > 1.0 else 1.0
    return np.clip(np.nan_to_num(values / top, nan=0.0), 0.0, 1.0)
