"""The face-neuron test of Le et al. 2012 ("Building high-level features using large scale unsupervised learning",
ICML 2012), run honestly.

The paper reports the best single unit's accuracy at telling faces from non-faces with the unit and threshold
chosen on the test set itself (81.7%). Here, on scikit-image's ``lfw_subset`` (100 faces, 100 non-faces):

* ``insample_accuracy``: that protocol — unit, threshold and polarity chosen and scored on all 200 images;
* ``heldout_accuracy``: chosen on a random stratified half, scored on the other half, mean over ``splits`` halves;
* ``jitter_heldout_accuracy``: the same, with every image scaled 0.8–1.2, rotated ±15° and shifted ±4 px (unit
  and threshold chosen on jittered pictures too: does *some* unit separate jittered faces?);
* ``invariance_accuracy``: the paper's invariance test (its Fig. 6): the unit and threshold chosen on the clean
  training half, scored on the jittered test half (does *the* face unit survive the jitter?);
* ``baselines``: the held-out protocol on the same halves for the best raw pixel, the best PCA component (fitted
  on the training half), the best of as many random linear filters as the model has units (applied to the same
  preprocessed input as the model), and a logistic-regression probe on raw pixels.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from downpour.data.sources import lfw_labelled
from downpour.errors import DownpourError
from downpour.eval.images import fit_images, jitter_images
from downpour.eval.results import eval_dir, print_rows, write_result
from downpour.eval.selectivity import best_unit, half_splits, heldout_accuracy
from downpour.runs import TrainedRun, load_run

NAME = "face_neuron"
MAX_RANDOM_FILTERS = 4096
# The most --splits taken. The held-out accuracy of one half varies by about 0.03 from half to half (100 test
# pictures), so the mean over 1,000 halves is within about 0.001 of the mean over every half: the last digit the
# table shows. More halves only cost time (0.03 s each for a 256-unit RICA on 16x16 patches here, 0.15 s for 4,096
# units on 32x32; 10 million took days, and their row indices alone 16 GB).
MAX_SPLITS = 1000

Split = tuple[np.ndarray, np.ndarray]
# Told after each candidate set is scored over one split: (scorings done, scorings in all, the candidate set's name)
ProgressFn = Callable[[int, int, str], None]
# A held-out scorer: (all images' values or pixels, labels, train rows, test rows, values to score the test rows on
# when not those) -> (accuracy, chosen unit or -1)
Scorer = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None], tuple[float, int]]


def _pca_scorer(pixels: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray,
                scored_on: np.ndarray | None = None) -> tuple[float, int]:  # fmt: skip
    """PCA fitted on the training half's pixels (unsupervised); then the best single component, held out."""
    mean = pixels[train].mean(axis=0)
    _, _, components = np.linalg.svd(pixels[train] - mean, full_matrices=False)  # (k, D), k = min(n, D)
    projected = (pixels - mean) @ components.T  # (N, k)
    scored = None if scored_on is None else (scored_on - mean) @ components.T  # (N, k)
    return heldout_accuracy(projected, labels, train, test, scored)


def _probe_scorer(pixels: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray,
                  scored_on: np.ndarray | None = None) -> tuple[float, int]:  # fmt: skip
    """Logistic regression (standardised pixels, L2, C = 1) fitted on the training half, scored on the other."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(pixels[train], labels[train])
    scored = pixels if scored_on is None else scored_on
    return float(probe.score(scored[test], labels[test])), -1


def _over_splits(values: np.ndarray, labels: np.ndarray, splits: list[Split], scorer: Scorer,
                 scored_on: np.ndarray | None = None, scored: Callable[[], None] = lambda: None,
                 ) -> tuple[list, list]:  # fmt: skip
    scores = []
    with threadpool_limits(limits=1):  # 100-image problems only lose time to BLAS threads
        for train, test in splits:
            scores.append(scorer(values, labels, train, test, scored_on))
            scored()
    return [accuracy for accuracy, _ in scores], [unit for _, unit in scores]


def _summary(values: dict[str, np.ndarray], labels: np.ndarray, splits: list[Split], scorer: Scorer,
             candidates: int, scored: Callable[[], None] = lambda: None,
             ) -> tuple[dict[str, Any], list, list]:  # fmt: skip
    """One candidate set's three held-out scores over ``splits`` (clean, jittered, the clean rule on jittered
    pictures), and the units chosen on clean and on jittered pictures. ``scored`` is called after each split of
    each of the three."""
    clean, units = _over_splits(values["clean"], labels, splits, scorer, scored=scored)
    jittered, jitter_units = _over_splits(values["jitter"], labels, splits, scorer, scored=scored)
    invariant, _ = _over_splits(values["clean"], labels, splits, scorer, scored_on=values["jitter"], scored=scored)
    summary = {
        "heldout_accuracy": float(np.mean(clean)),
        "heldout_std": float(np.std(clean)),
        "jitter_heldout_accuracy": float(np.mean(jittered)),
        "jitter_heldout_std": float(np.std(jittered)),
        "invariance_accuracy": float(np.mean(invariant)),
        "invariance_std": float(np.std(invariant)),
        "candidates": candidates,
    }
    return summary, units, jitter_units


def check_splits(splits: int) -> None:
    """Refuse a ``--splits`` outside 1..:data:`MAX_SPLITS` with a :class:`DownpourError` naming the flag."""
    if isinstance(splits, bool) or not isinstance(splits, int) or not 1 <= splits <= MAX_SPLITS:
        raise DownpourError(f"invalid --splits: {splits!r} (must be 1..{MAX_SPLITS}: the mean over {MAX_SPLITS} "
                            "random halves is already within about 0.001 of the mean over all of them)")  # fmt: skip


def evaluate(
    trained: TrainedRun, *, splits: int = 10, seed: int = 0, progress: ProgressFn | None = None
) -> dict[str, Any]:
    """The face-neuron test of ``trained`` (see the module docstring); the result dict of :func:`run`.
    ``progress``: told after each split of each candidate set (the model's units and four baselines), three
    times a split (clean, jittered, the clean rule on jittered pictures)."""
    check_splits(splits)
    if not 0 <= seed < 2**64:  # torch's generators take 64 bits
        raise DownpourError(f"invalid --seed: {seed} (must be 0 .. 2**64 - 1)")
    if trained.config.data.source == "lfw-faces":
        raise DownpourError(
            f"run {trained.run_dir} was trained on data.source = 'lfw-faces', the very faces this test scores: its "
            "held-out accuracy would count faces its features (and whitening) were fitted on; test a run trained on "
            "other pictures (natural-images, natural-patches, a folder or video of your own)"
        )
    raw, labels = lfw_labelled()  # (200, 1, 25, 25), 1 = face
    jittered_raw = jitter_images(raw[:, 0], np.random.default_rng(seed))[:, None]  # (200, 1, 25, 25)
    images = {"clean": fit_images(raw, trained.input_shape), "jitter": fit_images(jittered_raw, trained.input_shape)}
    halves = half_splits(labels, splits, seed)
    features = {k: trained.features(torch.from_numpy(v)).numpy() for k, v in images.items()}  # each (200, F)
    pixels = {k: v.reshape(len(v), -1) for k, v in images.items()}  # each (200, D)
    width = features["clean"].shape[1]
    filters = torch.randn(min(width, MAX_RANDOM_FILTERS), trained.input_dim,
                          generator=torch.Generator().manual_seed(seed))  # fmt: skip
    random_responses = {k: (trained.preprocess(torch.from_numpy(v)) @ filters.t()).numpy() for k, v in images.items()}

    sets = (
        ("model", features, heldout_accuracy, width),
        ("raw_pixel", pixels, heldout_accuracy, trained.input_dim),
        ("pca_component", pixels, _pca_scorer, min(len(halves[0][0]), trained.input_dim)),
        ("random_filter", random_responses, heldout_accuracy, filters.shape[0]),
        ("pixel_probe", pixels, _probe_scorer, 1),
    )
    total, done = 3 * splits * len(sets), itertools.count(1)
    summaries = {}
    for name, values, scorer, candidates in sets:

        def scored(name: str = name) -> None:
            if progress is not None:
                progress(next(done), total, name)

        summaries[name] = _summary(values, labels, halves, scorer, candidates, scored)
    model, units, jitter_units = summaries.pop("model")
    insample = best_unit(features["clean"], labels)
    baselines = {name: summary for name, (summary, _, _) in summaries.items()}
    return {
        "test": "face-neuron",
        "run_dir": str(trained.run_dir),
        "model": trained.config.model.name,
        "step": trained.step,
        "data": "skimage.data.lfw_subset: 100 faces, 100 non-faces, resized to the model's input",
        "input_shape": list(trained.input_shape),
        "features": width,
        "splits": splits,
        "seed": seed,
        "chance": 0.5,
        **model,
        "units": units,
        "jitter_units": jitter_units,
        "most_chosen_unit": Counter(units).most_common(1)[0][0],
        "insample_accuracy": insample.accuracy,
        "insample_unit": insample.unit,
        "insample_threshold": insample.threshold,
        "insample_polarity": insample.polarity,
        "baselines": baselines,
    }


def save_picture(trained: TrainedRun, result: dict[str, Any], path: Path) -> None:
    """Histogram of the in-sample unit's responses to faces and non-faces, beside held-out accuracies."""
    from matplotlib.figure import Figure  # not pyplot: a caller's backend and open figures stay as they were

    raw, labels = lfw_labelled()
    values = trained.features(torch.from_numpy(fit_images(raw, trained.input_shape)))[:, result["insample_unit"]]
    fig = Figure(figsize=(10, 3.6))
    (left, right) = fig.subplots(1, 2)
    bins = np.linspace(float(values.min()), float(values.max()), 25)
    left.hist(values[labels == 1].numpy(), bins=bins, alpha=0.6, label="faces")
    left.hist(values[labels == 0].numpy(), bins=bins, alpha=0.6, label="non-faces")
    left.axvline(result["insample_threshold"], color="k", linestyle="--", linewidth=1)
    left.set_title(f"unit {result['insample_unit']} (in-sample {result['insample_accuracy']:.2f})")
    left.set_xlabel("response")
    left.legend()
    names = ["model unit", *result["baselines"]]
    rows = [result, *result["baselines"].values()]
    y = np.arange(len(names))
    right.barh(y + 0.27, [r["heldout_accuracy"] for r in rows], height=0.27, label="held-out")
    right.barh(y, [r["jitter_heldout_accuracy"] for r in rows], height=0.27, label="held-out, jittered")
    right.barh(y - 0.27, [r["invariance_accuracy"] for r in rows], height=0.27, label="clean rule, jittered")
    right.set_yticks(y, names)
    right.invert_yaxis()
    right.axvline(0.5, color="k", linewidth=1)
    right.set_xlim(0.4, 1.0)
    right.set_xlabel("accuracy")
    right.set_title("held-out accuracy of the unit and the baselines")
    right.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside the bars, not over them
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run(run_dir: Path, *, splits: int = 10, seed: int = 0, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Load ``run_dir``, run the face-neuron test, write ``eval/face_neuron.json`` and ``eval/face_neuron.png``.
    ``progress``: as :func:`evaluate` tells it."""
    check_splits(splits)  # before the run is loaded
    trained = load_run(run_dir)
    result = evaluate(trained, splits=splits, seed=seed, progress=progress)
    write_result(run_dir, NAME, result)
    save_picture(trained, result, eval_dir(run_dir) / f"{NAME}.png")
    return result


def print_table(result: dict[str, Any], console: Any) -> None:
    """The model's unit against the baselines: held-out, jittered held-out, the clean rule on jittered pictures
    and (model only) in-sample accuracy."""

    def spread(mean: float, std: float) -> str:  # one split has no spread to show
        return f"{mean:.3f} ± {std:.3f}" if result["splits"] > 1 else f"{mean:.3f}"

    def scores(row: dict[str, Any]) -> list[str]:
        return [spread(row["heldout_accuracy"], row["heldout_std"]),
                spread(row["jitter_heldout_accuracy"], row["jitter_heldout_std"]),
                spread(row["invariance_accuracy"], row["invariance_std"])]  # fmt: skip

    rows = [["model: best unit", *scores(result), f"{result['insample_accuracy']:.3f}", str(result["features"])]]
    for name, base in result["baselines"].items():
        rows.append([name.replace("_", " "), *scores(base), "", str(base["candidates"])])
    splits = f"{result['splits']} split{'s' if result['splits'] != 1 else ''}"
    title = (f"face neuron: {result['run_dir']} ({result['model']}), {splits}, seed {result['seed']}, "
             f"most chosen unit {result['most_chosen_unit']}")  # fmt: skip
    header = ["", "held-out", "jittered held-out", "clean rule, jittered", "in-sample", "candidates"]
    print_rows(title, header, rows, console)
