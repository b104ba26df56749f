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
