"""Single-unit classifiers: one unit, one threshold, one polarity — the face-neuron protocol of Le et al. 2012.

A unit ``j`` with threshold ``t`` and polarity ``s ∈ {+1, −1}`` predicts "face" when ``s·(f_j(x) − t) > 0``. The
unit, threshold and polarity with the best accuracy are chosen on one set of images; the paper chose them on its
test set (in-sample), :func:`heldout_accuracy` chooses them on a training half and scores a held-out half.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class UnitRule:
    """The best single-unit classifier found on some examples: unit index, threshold, polarity, its accuracy."""

    unit: int
    threshold: float
    polarity: int  # +1: face when above the threshold; -1: face when below
    accuracy: float  # on the examples it was chosen on

    def predict(self, values: np.ndarray) -> np.ndarray:
        """Labels (1 = positive) for ``values`` ``(N, F)`` from this rule's unit."""
        return (self.polarity * (values[:, self.unit] - self.threshold) > 0).astype(np.int64)


def best_unit(values: np.ndarray, labels: np.ndarray) -> UnitRule:
    """The unit, threshold and polarity with the highest accuracy on ``values`` ``(N, F)`` and 0/1 ``labels``.

    Every cut between two consecutive distinct sorted values of every unit is tried (with both polarities), all
    units at once: sorting each column once makes the accuracy of every cut a cumulative sum of the sorted labels.
    Ties between units go to the lowest index.
    """
    values = np.asarray(values, dtype=np.float64)
    n, _ = values.shape
    order = np.argsort(values, axis=0, kind="stable")  # (N, F)
    ordered = np.take_along_axis(values, order, axis=0)  # (N, F), each column ascending
    positive = labels[order].astype(np.int64)  # (N, F), labels in each column's order
    total_pos = int(labels.sum())
    # Cut k (0..N) puts the k smallest values below the threshold: predicted negative.
    below_pos = np.vstack([np.zeros((1, positive.shape[1]), dtype=np.int64), np.cumsum(positive, axis=0)])  # (N+1, F)
    below = np.arange(n + 1)[:, None]
    correct_up = (below - below_pos) + (total_pos - below_pos)  # negatives below + positives above
    valid = np.ones_like(correct_up, dtype=bool)  # a cut between equal values cannot be realised by a threshold
    valid[1:n] = ordered[1:] > ordered[:-1]
    accuracy_up = np.where(valid, correct_up / n, -1.0)  # (N+1, F)
    accuracy_down = np.where(valid, 1.0 - correct_up / n, -1.0)  # the flipped rule
    best_up, best_down = accuracy_up.max(axis=0), accuracy_down.max(axis=0)  # (F,)
    per_unit = np.maximum(best_up, best_down)
    unit = int(np.argmax(per_unit))
    polarity = 1 if best_up[unit] >= best_down[unit] else -1
    cut = int(np.argmax(accuracy_up[:, unit] if polarity == 1 else accuracy_down[:, unit]))
    column = ordered[:, unit]
    if cut == 0:
        threshold = column[0] - 1.0
    elif cut == n:
        threshold = column[-1] + 1.0
    else:
        threshold = 0.5 * (column[cut - 1] + column[cut])  # midway between the last negative and first positive
    return UnitRule(unit, float(threshold), polarity, float(per_unit[unit]))


def heldout_accuracy(values: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray,
                     scored_on: np.ndarray | None = None) -> tuple[float, int]:  # fmt: skip
    """Choose the best unit rule on rows ``train``, score it on rows ``test``: ``(accuracy, unit)``. ``scored_on``:
    other values of the same examples to score it on (the same pictures transformed: is the unit invariant?)."""
    rule = best_unit(values[train], labels[train])
    scored = values if scored_on is None else scored_on
    return float((rule.predict(scored[test]) == labels[test]).mean()), rule.unit


def half_splits(labels: np.ndarray, count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` random stratified halves ``(train_rows, test_rows)``: each class split in two, seeded."""
    rng = np.random.default_rng(seed)
    splits = []
    for _ in range(count):
        train_parts, test_parts = [], []
        for cls in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == cls))
            train_parts.append(rows[: len(rows) // 2])
            test_parts.append(rows[len(rows) // 2 :])
        splits.append((np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(test_parts))))
    return splits
