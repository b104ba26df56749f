"""Detection: one unit's response at every window of a larger image, as a heat map over that image.

Every window of the model's input size, ``stride`` pixels apart, is cut out, preprocessed like the training
examples and run through the network in batches of whole rows of windows (about ``WINDOWS_PER_BATCH``
windows, so memory stays bounded on large images). The time per megapixel is reported: scanning images window
by window is the costly stage of putting such a network to use.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from downpour.data.gray import luminance
from downpour.errors import DownpourError
from downpour.eval.images import read_image
from downpour.eval.results import eval_dir, read_result
from downpour.eval.stimulus import check_units
from downpour.runs import TrainedRun, load_run

WINDOWS_PER_BATCH = 2048
MAX_MEGAPIXELS = 100  # the largest (resized) image scanned: 10000x10000 pixels, 400 MB per channel in float32
MAX_STRIDE = 1 << 20  # pixels between windows: beyond any image scanned (a stride past the image gives one window)


def heat_map_formats() -> list[str]:
    """The file suffixes matplotlib can write a heat map as (png, pdf, svg, jpg, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return sorted(set(FigureCanvasBase.get_supported_filetypes()) - {"pgf"})  # pgf needs a LaTeX installation


def check_out(out: Path, image: Path | None = None, run_dir: Path | None = None) -> None:
    """Refuse an ``--out`` that no heat map could be written to, before any work: an unknown suffix, a directory, a
    missing parent directory, the scanned ``image`` itself (the map would replace the user's picture), or a file of
    ``run_dir`` other than a heat map in its ``eval/`` folder (a map written as ``filters.png`` replaced the run's
    filter picture, and the report showed the map as its filters)."""
    if image is not None and out.resolve() == image.resolve():
        raise DownpourError(f"invalid --out: {out} is the picture being scanned; the heat map would replace it "
                            "(name another file)")  # fmt: skip
    if run_dir is not None:
        target, run = out.resolve(), Path(run_dir).resolve()
        if target.is_relative_to(run) and not (target.parent == run / "eval" and target.name.startswith("detect_")):
            ours = Path(run_dir) / "eval" / "detect_<name>.png"
            raise DownpourError(f"invalid --out: {out} is inside run {run_dir}, whose files it could replace (write "
                                f"the heat map outside the run, or as {ours})")  # fmt: skip
    suffix = out.suffix.lstrip(".").lower()
    formats = heat_map_formats()
    if suffix not in formats:
        raise DownpourError(f"invalid --out: {out} (the heat map is a picture: end the name in .{', .'.join(formats)})")
    if out.is_dir():
        raise DownpourError(f"invalid --out: {out} is a directory (name the picture file to write)")
    if not out.parent.is_dir():
        raise DownpourError(f"invalid --out: {out} (its directory {out.parent} does not exist)")


def check_scale(scale: float) -> None:
    """Refuse a ``--scale`` that is not a finite number > 0."""
    if not (math.isfinite(scale) and scale > 0):
        raise DownpourError(f"invalid --scale: {scale} (must be a finite number > 0)")


def _side(exact: float) -> int | float:
    """A resized side in whole pixels (at least 1); one too long to round (``--scale 1e308`` makes it inf) as it is."""
    return max(1, round(exact)) if exact < 2**63 else exact


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """``(height, width)`` resized by ``scale``; an image of more than :data:`MAX_MEGAPIXELS` is refused (its sides
    shown to 12 digits: ``--scale 1e300`` made them 300 digits long)."""
    check_scale(scale)
    new_height, new_width = _side(height * scale), _side(width * scale)
    if new_height * new_width > MAX_MEGAPIXELS * 1e6:
        finite = math.isfinite(new_height) and math.isfinite(new_width)
        shown = f"{new_width:.12g}x{new_height:.12g} pixels" if finite else "too large to count"
        fits = math.floor(math.sqrt(MAX_MEGAPIXELS * 1e6 / (height * width)) * 100) / 100  # rounded down
        while fits > 0 and _side(height * fits) * _side(width * fits) > MAX_MEGAPIXELS * 1e6:
            fits = round(fits - 0.01, 2)  # a side held at 1 pixel shrinks no more: step down to a scale that fits
        hint = f": --scale {fits:g} or less fits" if fits > 0 else ""
        raise DownpourError(f"invalid --scale: {scale:g} (the {width}x{height} image would become {shown}; at most "
                            f"{MAX_MEGAPIXELS} megapixels are scanned{hint})")  # fmt: skip
    return int(new_height), int(new_width)


@torch.no_grad()
def response_map(trained: TrainedRun, image: np.ndarray, unit: int, *, stride: int) -> np.ndarray:
    """``unit``'s response to every window of ``image`` ``(C, H, W)``: ``(rows, cols)``, window ``(i, j)`` at
    pixel ``(i·stride, j·stride)``."""
    channels, height, width = trained.input_shape
    if image.shape[1] < height or image.shape[2] < width:
        raise DownpourError(f"image of {image.shape[2]}x{image.shape[1]} pixels is smaller than the model's "
                            f"{width}x{height} input")  # fmt: skip
    tensor = torch.from_numpy(np.ascontiguousarray(image))[None]  # (1, C, H, W)
    rows = (image.shape[1] - height) // stride + 1
    cols = (image.shape[2] - width) // stride + 1
    out = np.empty((rows, cols), dtype=np.float32)
    per_batch = max(1, WINDOWS_PER_BATCH // cols)  # rows of windows per batch
    for first in range(0, rows, per_batch):
        count = min(per_batch, rows - first)
        strip = tensor[:, :, first * stride : (first + count - 1) * stride + height]  # (1, C, h', W)
        windows = F.unfold(strip, (height, width), stride=stride)  # (1, C·h·w, count·cols), row-major
        windows = windows[0].t().reshape(-1, channels, height, width)  # (count·cols, C, h, w)
        features = trained.features(windows, batch_size=len(windows))  # (count·cols, F)
        if first == 0:
            check_units([unit], features.shape[1])
        out[first : first + count] = features[:, unit].reshape(count, cols).numpy()
    return out


def save_heat_map(image: np.ndarray, responses: np.ndarray, window: tuple[int, int], stride: int, path: Path,
                  title: str) -> None:  # fmt: skip
    """The image in gray with the response map over it (each window's value at its centre, interpolated)."""
    from matplotlib.figure import Figure  # not pyplot: a caller's backend and open figures stay as they were

    gray = luminance(image, channel_axis=0)[0] if len(image) == 3 else image[0]  # (H, W)
    height, width = gray.shape
    rows, cols = responses.shape
    extent = (window[1] / 2 - stride / 2, window[1] / 2 + (cols - 0.5) * stride,  # window centres, pixel units
              window[0] / 2 + (rows - 0.5) * stride, window[0] / 2 - stride / 2)  # fmt: skip
    fig = Figure(figsize=(8, 8 * height / width))
    ax = fig.subplots()
    ax.imshow(gray, cmap="gray", vmin=0, vmax=1, extent=(0, width, height, 0))
    shown = ax.imshow(responses, cmap="inferno", alpha=0.55, extent=extent, interpolation="bilinear")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_title(title)
    ax.axis("off")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label="response")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def default_unit(trained: TrainedRun) -> int:
    """The face-neuron test's most chosen unit when the run has been evaluated, else unit 0."""
    face = read_result(trained.run_dir, "face_neuron")
    return int(face["most_chosen_unit"]) if face and isinstance(face.get("most_chosen_unit"), int) else 0


def default_map_name(image_path: Path) -> str:
    """The heat map's file name for ``image_path``: ``detect_<name>-<extension>.png`` (``a.bmp`` and ``a.webp``
    get a map each), or ``detect_<name>.png`` for a file without an extension."""
    extension = image_path.suffix.lstrip(".")
    return f"detect_{image_path.stem}-{extension}.png" if extension else f"detect_{image_path.name}.png"


def run(run_dir: Path, image_path: Path, *, unit: int | None = None, stride: int | None = None,
        scale: float = 1.0, out: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Scan ``image_path`` (resized by ``scale``) with ``run_dir``'s network; save the heat map of ``unit``.

    ``stride`` defaults to a quarter of the model's input side; ``out`` to ``RUN_DIR/eval/``
    :func:`default_map_name`.
    """
    check_scale(scale)  # the flags first: loading the run takes seconds
    if out is not None:
        check_out(Path(out), Path(image_path), Path(run_dir))
    trained = load_run(run_dir)
    stride = max(1, trained.input_shape[1] // 4) if stride is None else stride
    if not 1 <= stride <= MAX_STRIDE:
        raise DownpourError(f"invalid --stride: {stride} (must be 1..{MAX_STRIDE})")
    unit = default_unit(trained) if unit is None else unit
    # (C, H', W'): refused from its header if too large, before a pixel is decoded; shrunk as it is decoded
    image = read_image(image_path, trained.input_shape[0], size=lambda height, width: scaled_size(height, width, scale))
    start = time.perf_counter()
    responses = response_map(trained, image, unit, stride=stride)
    seconds = time.perf_counter() - start
    megapixels = image.shape[1] * image.shape[2] / 1e6
    out = out if out is not None else eval_dir(run_dir) / default_map_name(Path(image_path))
    title = f"unit {unit} of {trained.run_dir.name} over {Path(image_path).name}"
    save_heat_map(image, responses, trained.input_shape[1:], stride, out, title)
    return {
        "run_dir": str(trained.run_dir),
        "image": str(image_path),
        "image_shape": list(image.shape),
        "unit": unit,
        "stride": stride,
        "windows": int(responses.size),
        "map_shape": list(responses.shape),
        "seconds": seconds,
        "seconds_per_megapixel": seconds / megapixels,
        "max_response_at": [int(v) * stride for v in np.unravel_index(int(responses.argmax()), responses.shape)],
        "heat_map": str(out),
    }
