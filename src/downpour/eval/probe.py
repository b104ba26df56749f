"""Linear probe: how linearly separable a labelled data set is in the frozen features of a trained run.

Logistic regression (standardised inputs, L2, C = 1) is fitted on a fixed, seeded, stratified 80% of the
examples and scored on the other 20%, once on the model's features and once on the raw pixels of the same
images, so the two accuracies compare the representation, not the classifier.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from downpour.errors import DownpourError
from downpour.eval.images import fit_images
from downpour.eval.results import print_rows, write_result
from downpour.runs import TrainedRun, load_run

DATASETS = ("digits",)
SEED = 0
TEST_FRACTION = 0.2


def labelled_data(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, C, H, W)`` in [0, 1] and integer labels of a bundled labelled set."""
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return (digits.images / 16.0)[:, None].astype(np.float32), digits.target.astype(np.int64)  # (1797, 1, 8, 8)
    raise DownpourError(f"invalid --data: {name!r} (choose one of {', '.join(DATASETS)})")


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Test accuracy of a logistic-regression probe fitted on ``(train_x, train_y)``."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    with threadpool_limits(limits=1):  # a problem this small only loses time to BLAS threads
        probe.fit(train_x, train_y)
        return float(probe.score(test_x, test_y))


def evaluate(trained: TrainedRun, data: str = "digits") -> dict[str, Any]:
    """Probe accuracy of ``trained``'s features and of raw pixels on ``data`` (resized to the model's input)."""
    raw, labels = labelled_data(data)
    images = fit_images(raw, trained.input_shape)  # (N, C, H, W)
    features = trained.features(torch.from_numpy(images)).numpy()  # (N, F)
    pixels = images.reshape(len(images), -1)  # (N, D)
    train, test = train_test_split(np.arange(len(labels)), test_size=TEST_FRACTION, random_state=SEED,
                                   stratify=labels)  # fmt: skip
    return {
        "test": "probe",
        "run_dir": str(trained.run_dir),
        "model": trained.config.model.name,
        "step": trained.step,
        "data": data,
        "examples": len(labels),
        "classes": len(np.unique(labels)),
        "train_examples": len(train),
        "test_examples": len(test),
        "input_shape": list(trained.input_shape),
        "original_shape": list(raw.shape[1:]),
        "features": int(features.shape[1]),
        "accuracy": probe_accuracy(features[train], labels[train], features[test], labels[test]),
        "raw_pixels_accuracy": probe_accuracy(pixels[train], labels[train], pixels[test], labels[test]),
        "chance": float(np.bincount(labels[test]).max() / len(test)),
    }


def run(run_dir: Path, data: str = "digits") -> dict[str, Any]:
    """Load ``run_dir``, probe it on ``data``, write ``eval/probe_<data>.json``; return the result."""
    if data not in DATASETS:
        raise DownpourError(f"invalid --data: {data!r} (choose one of {', '.join(DATASETS)})")
    result = evaluate(load_run(run_dir), data)
    write_result(run_dir, f"probe_{data}", result)
    return result


def print_table(result: dict[str, Any], console: Any) -> None:
    """Probe accuracy of the features next to raw pixels."""
    rows = [[f"model features ({result['features']})", f"{result['accuracy']:.3f}"],
            [f"raw pixels ({int(np.prod(result['input_shape']))})", f"{result['raw_pixels_accuracy']:.3f}"],
            ["chance (largest class)", f"{result['chance']:.3f}"]]  # fmt: skip
    title = (f"linear probe on {result['data']}: {result['run_dir']} ({result['model']}), "
             f"{result['train_examples']} train / {result['test_examples']} test")  # fmt: skip
    print_rows(title, ["", "test accuracy"], rows, console)
