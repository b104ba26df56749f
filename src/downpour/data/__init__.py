"""Data: bundled sources and users' own (folders, videos, torchvision sets), preprocessing, a fixed held-out set,
and disjoint per-worker shards."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from downpour.config import DataConfig
from downpour.data import own, sources
from downpour.data.whitening import remove_example_mean, zca_matrix
from downpour.errors import ConfigError, DataError

DEFAULT_HELD_OUT = DataConfig.held_out  # capped at a fifth of the data without a word (it suits large sources)
GENERATED_SOURCES = ("natural-patches", "natural-images")  # cut from the bundled photos (users' sources are cut too)


@dataclass
class Dataset:
    """Preprocessed training examples, a disjoint held-out set, and how they were made."""

    train: Tensor  # (N, D) float32
    held_out: Tensor  # (M, D) float32, never in any worker's shard
    shape: tuple[int, int, int]  # (C, H, W) of one example
    whitening: Tensor | None  # (D, D) ZCA matrix applied after mean removal, or None
    read_report: dict | None = None  # users' folders and videos: files read and skipped (downpour.data.own)
    centre: Tensor | None = None  # (D,) the training mean removed before whitening (data.whiten_centre), or None

    def whitening_tensors(self) -> dict[str, Tensor]:
        """What ``whitening.safetensors`` holds for this data: the ZCA matrix, and the mean removed before it when
        ``data.whiten_centre`` is on."""
        assert self.whitening is not None
        tensors = {"zca": self.whitening.contiguous()}
        return tensors if self.centre is None else {**tensors, "mean": self.centre.contiguous()}

    @property
    def dim(self) -> int:
        """Values per example."""
        return self.train.shape[1]


def _raw_examples(config: DataConfig, rng: np.random.Generator) -> tuple[np.ndarray, own.ReadReport | None]:
    if ":" in config.source:  # users' own data: folder:, video:, torchvision:
        count = config.examples + _held_out_to_cut(config)
        _check_memory(config, count, config.channels * config.image_size**2)  # (the pictures themselves come on top)
        return own.own_examples(config, rng, count)
    return _bundled_examples(config, rng), None


def _check_memory(config: DataConfig, count: int, values: int) -> None:
    """Refuse to cut ``count`` examples of ``values`` float32 values each when they could not fit in memory (while
    being preprocessed they are held about four times over, seven with whitening's float64 copies: measured 1.35
    and 2.34 times the three copies this once assumed): a clear error instead of the kernel's OOM killer."""
    from downpour.backends.local import available_memory

    copies = 7 if config.whiten else 4
    needed, available = copies * 4 * count * values, available_memory()
    if needed > available:
        raise DataError(
            f"data.examples = {config.examples} (+ {count - config.examples} held out) examples of {values} values "
            f"need about {needed / 2**30:,.1f} GiB; {available / 2**30:,.1f} GiB is available: reduce data.examples"
        )


def _cut_into_examples(source: str) -> bool:
    """Whether ``source`` is cut into ``data.examples`` crops (the bundled photos, users' own data), rather than a
    set of fixed size (lfw-faces, digits)."""
    return source in GENERATED_SOURCES or ":" in source


def _held_out_to_cut(config: DataConfig) -> int:
    """Held-out examples to cut besides the ``data.examples`` training ones: ``data.held_out``, the default capped at
    a quarter of ``data.examples`` (a fifth of all that is cut), so that training gets exactly ``data.examples``."""
    return min(config.held_out, config.examples // 4) if config.held_out == DEFAULT_HELD_OUT else config.held_out


def counts_before_exact_examples(config: DataConfig) -> tuple[int, int] | None:
    """(training, held-out) examples that a source cut into examples gave before ``data.examples`` was exact (runs
    made before 2026-11-27): ``data.examples + data.held_out`` were cut and a fifth at most held out; None for the
    sources of fixed size (lfw-faces, digits), which this did not change."""
    if not _cut_into_examples(config.source):
        return None
    count = config.examples + config.held_out
    held = min(config.held_out, count // 5)
    return count - held, held


def _bundled_examples(config: DataConfig, rng: np.random.Generator) -> np.ndarray:
    count = config.examples + _held_out_to_cut(config)
    if config.source in GENERATED_SOURCES:
        side = config.patch_size if config.source == "natural-patches" else config.image_size
        channels = 1 if config.source == "natural-patches" else config.channels
        _check_memory(config, count, channels * side * side)
    if config.source == "natural-patches":
        return sources.natural_patches(count, config.patch_size, rng)
    if config.source == "natural-images":
        return sources.natural_patches(count, config.image_size, rng, channels=config.channels)
    if config.source == "lfw-faces":
        return sources.lfw_faces()
    if config.source == "digits":
        return sources.digits()
    raise ConfigError(f"invalid data.source: {config.source!r}")


def _held_out_count(config: DataConfig, count: int) -> int:
    """How many of ``count`` examples to hold out: ``data.held_out``, at most a fifth of them. The default is capped
    silently (it suits large sources); a value set beyond a fifth is refused, so that config.toml never records more
    held-out examples than the run had."""
    most = count // 5
    if config.held_out > most and config.held_out != DEFAULT_HELD_OUT and most >= 1:
        if _cut_into_examples(config.source):  # cut besides data.examples: a quarter of those is a fifth of all
            raise DataError(
                f"data.held_out = {config.held_out} is more than a quarter of data.examples = {config.examples} "
                f"(at most {config.examples // 4} can be held out): lower data.held_out or raise data.examples"
            )
        raise DataError(
            f"data.held_out = {config.held_out} is more than a fifth of the {count} examples of data.source "
            f"{config.source!r} (at most {most} can be held out): lower data.held_out"
        )
    held_count = min(config.held_out, most)
    if held_count < 1 or count - held_count < 1:
        more = "; raise data.examples" if _cut_into_examples(config.source) else ""
        raise DataError(f"data.source {config.source!r} has too few examples ({count}) to hold any out{more}")
    return held_count


def as_recorded(config: DataConfig, dataset: Dataset) -> DataConfig:
    """``config`` as a run's ``config.toml`` records it: ``data.held_out`` is the number of examples held out. Only
    the default can differ from that (it is capped at a fifth of the data without a word); the count in its place
    cuts the very same examples again on ``--resume``."""
    held = len(dataset.held_out)
    return config if config.held_out == held else dataclasses.replace(config, held_out=held)


def _check_variance(flat: Tensor, source: str) -> None:
    """Refuse examples ``(N, D)`` (means removed) that are all alike: whitening would divide by 0, training learns
    nothing, and every loss would be NaN or 0."""
    spread = float(flat.abs().max()) if flat.numel() else 0.0
    if not spread > 1e-6:  # pixel values lie in [0, 1]; rounding leaves ~1e-8 behind a removed mean
        raise DataError(
            f"the data has no variance after removing each example's mean: every example of data.source {source!r} "
            "is uniform (one flat colour?)"
        )
    if not math.isfinite(spread):
        raise DataError(f"data.source {source!r} holds NaN or Inf values")


def load_dataset(config: DataConfig, *, seed: int) -> Dataset:
    """Load ``data.source``, split off the held-out set, remove example means and (optionally) ZCA-whiten. With
    ``data.whiten_centre`` the training examples' mean of each value is removed before the ZCA matrix is applied
    (as Coates & Ng 2011 do); without it (the default) whitened digits carry their mean's offset, whose squared
    norm is 30.7 against a covariance trace of 17.7 (natural patches: about 0)."""
    rng = np.random.default_rng(seed)
    raw, report = _raw_examples(config, rng)  # (N, C, H, W)
    shape = tuple(int(s) for s in raw.shape[1:])
    order = rng.permutation(len(raw))
    held_count = _held_out_count(config, len(raw))
    flat = torch.from_numpy(raw.reshape(len(raw), -1)[order])  # (N, D)
    flat = remove_example_mean(flat)
    _check_variance(flat, config.source)
    held_out, train = flat[:held_count], flat[held_count:]
    whitening = mean = None
    if config.whiten:
        whitening = zca_matrix(train, eps=config.whiten_eps, what=f"data.source {config.source!r}")
        if config.whiten_centre:
            mean = train.mean(dim=0, dtype=torch.float64).float()  # (D,) of the training examples only, no copy
            train, held_out = train - mean, held_out - mean
        train, held_out = train @ whitening, held_out @ whitening  # ZCA is symmetric
    summary = report.summary() if report is not None else None
    return Dataset(train.contiguous(), held_out.contiguous(), shape, whitening, summary, mean)  # type: ignore[arg-type]


def worker_slice(num_examples: int, workers: int, worker: int) -> slice:
    """The contiguous, disjoint range of examples that ``worker`` of ``workers`` reads."""
    if workers > num_examples:
        raise DataError(f"cluster.workers={workers} is more than the {num_examples} training examples")
    return slice(worker * num_examples // workers, (worker + 1) * num_examples // workers)


def capped_batch_warning(num_examples: int, workers: int, batch_size: int) -> str | None:
    """One line when ``batch_size`` exceeds the smallest worker's share of the examples: its epochs then draw
    batches of its whole share (:func:`~downpour.ps.worker.epoch_batches`), smaller than asked."""
    smallest = num_examples // workers
    if batch_size <= smallest:
        return None
    return (f"train.batch_size = {batch_size} is more than the {smallest} examples of a worker's share "
            f"({num_examples} over {workers} workers): its batches hold {smallest}; lower train.batch_size or "
            "raise data.examples")  # fmt: skip


REPEATS_WARNED = 0.05  # warn when about this fraction of the held-out crops also occur among the training ones


def data_warnings(dataset: Dataset) -> list[str]:
    """The lines to warn of about the data read: files that could not be read (:func:`unread_warning`), pictures
    smaller than a crop (left out), videos that ended early (truncated: their frames kept), and crops that repeat.
    Crops are cut at random positions, with replacement; from pictures holding few distinct crops (one small
    picture, a short video), many held-out examples are then copies of training ones and the held-out loss is partly
    a training loss: about ``1 − exp(−training crops / positions)`` of them."""
    lines = [line] if (line := unread_warning(dataset)) is not None else []
    report = dataset.read_report or {}
    if too_small := report.get("too_small") or 0:
        side = dataset.shape[1]
        lines.append(f"{too_small} of the {report['pictures']} pictures of {report['source']} are smaller than a "
                     f"{side}×{side} crop (data.image_size; after shrinking to data.max_side) and were left out: "
                     "lower data.image_size, or raise data.max_side")  # fmt: skip
    if cut_short := report.get("cut_short") or 0:
        lines.append(f"{cut_short} of the videos of {report['source']} ended before the frames their headers declare, "
                     f"truncated or damaged ({_first_and_more(report['cut_short_files'], cut_short)}); the frames "
                     "decoded were kept")  # fmt: skip
    positions = report.get("crop_positions") or 0
    if positions:
        repeated = 1.0 - math.exp(-len(dataset.train) / positions)
        if repeated >= REPEATS_WARNED:
            lines.append(f"the pictures of {report['source']} hold {positions:,} distinct crops for "
                         f"{len(dataset.train):,} training examples: about {repeated:.0%} of the held-out examples "
                         "are copies of training ones, so the held-out loss is partly a training loss; lower "
                         "data.examples, or add pictures")  # fmt: skip
    return lines


def unread_warning(dataset: Dataset) -> str | None:
    """One line naming the data files that could not be read (None when all were, or for bundled sources)."""
    report = dataset.read_report
    if not report or not report["skipped"]:
        return None
    return (f"{report['skipped']} of {report['files']} files of {report['source']} could not be read and were "
            f"skipped ({_first_and_more(report['skipped_files'], report['skipped'])}; listed in summary.json under "
            "data_files)")  # fmt: skip


def _first_and_more(named: list[str], count: int) -> str:
    """The first of ``count`` files (``named``: the first few, as the summary lists them) and how many more."""
    return named[0] + (f" and {count - 1} more" if count > 1 else "")
