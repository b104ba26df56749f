"""Bundled data sources, preprocessing and per-worker shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data as skdata
from sklearn.datasets import load_digits

from downpour.config import DataConfig
from downpour.data import load_dataset, sources, worker_slice
from downpour.data.sources import crop_positions, random_crops
from downpour.data.whitening import zca_matrix
from downpour.errors import DataError


@pytest.mark.parametrize(
    ("source", "shape"),
    [("natural-patches", (1, 16, 16)), ("lfw-faces", (1, 25, 25)), ("digits", (1, 8, 8))],
)
def test_each_bundled_source_loads_with_a_disjoint_held_out_set(source: str, shape: tuple[int, int, int]) -> None:
    """Examples are flattened, mean-removed, whitened; no held-out example is also a training example."""
    dataset = load_dataset(DataConfig(source=source, examples=3000, held_out=20), seed=0)  # lfw-faces bundles 100
    assert dataset.shape == shape
    assert dataset.train.shape[1] == dataset.held_out.shape[1] == shape[0] * shape[1] * shape[2]
    assert torch.isfinite(dataset.train).all()
    train_rows = {tuple(row) for row in dataset.train.numpy().round(5).tolist()}
    repeated = [row for row in dataset.held_out.numpy().round(5).tolist() if tuple(row) in train_rows]
    # Patches cut from flat regions (black sky, white paper) are identical by content though cut at other places;
    # every other held-out example must be new.
    assert all(max(abs(v) for v in row) < 1e-3 for row in repeated)


def test_natural_patches_are_whitened() -> None:
    """After ZCA the training covariance is close to the identity in the well-resolved directions."""
    dataset = load_dataset(DataConfig(examples=20000, patch_size=8, whiten_eps=1e-3), seed=1)
    x = dataset.train.double()
    covariance = (x - x.mean(0)).t() @ (x - x.mean(0)) / (x.shape[0] - 1)
    eigenvalues = torch.linalg.eigvalsh(covariance)
    # Mean removal per patch kills one direction (the DC component); the rest are near 1.
    assert eigenvalues[1:].median() == pytest.approx(1.0, abs=0.1)
    assert dataset.whitening is not None and torch.allclose(dataset.whitening, dataset.whitening.t(), atol=1e-5)


def test_whiten_centre_removes_the_training_mean_of_each_value_first() -> None:
    """data.whiten_centre: the training examples' mean of each value is removed before ZCA (Coates & Ng 2011), and
    the held-out examples lose the same mean. Without it (the default, as every run before), whitened digits are
    dominated by an offset: its squared norm outweighs the covariance's trace (30.7 against 17.7)."""
    dataset = load_dataset(DataConfig(source="digits", whiten_centre=True), seed=0)
    assert dataset.centre is not None and dataset.whitening is not None
    assert float(dataset.train.mean(0).norm()) < 1e-4  # centred, then a linear map: still centred
    plain = load_dataset(DataConfig(source="digits", whiten=False), seed=0)  # the same split, mean-removed pixels
    torch.testing.assert_close(dataset.centre, plain.train.double().mean(0).float())
    torch.testing.assert_close(dataset.held_out, (plain.held_out - dataset.centre) @ dataset.whitening)
    old = load_dataset(DataConfig(source="digits"), seed=0)
    assert old.centre is None and set(old.whitening_tensors()) == {"zca"}
    torch.testing.assert_close(old.train, plain.train @ old.whitening)
    offset = float(old.train.mean(0).norm() ** 2)
    assert offset > 1.5 * float(old.train.var(0).sum())  # what it was: the offset outweighed the variance


def test_whitening_off_keeps_mean_removed_pixels() -> None:
    """``data.whiten = false``: examples are the mean-removed pixels, no matrix is kept."""
    dataset = load_dataset(DataConfig(source="digits", whiten=False), seed=0)
    assert dataset.whitening is None
    assert torch.allclose(dataset.train.mean(1), torch.zeros(dataset.train.shape[0]), atol=1e-5)


def test_same_seed_same_data_and_other_seed_other_data() -> None:
    """The dataset is a pure function of the seed (resume relies on it)."""
    a = load_dataset(DataConfig(examples=2000, held_out=100), seed=3)
    b = load_dataset(DataConfig(examples=2000, held_out=100), seed=3)
    c = load_dataset(DataConfig(examples=2000, held_out=100), seed=4)
    assert torch.equal(a.train, b.train) and torch.equal(a.held_out, b.held_out)
    assert not torch.equal(a.train, c.train)


@pytest.mark.parametrize(("examples", "held_out"), [(4, 1), (9, 2), (100, 25), (4003, 1000), (6000, 1024)])
def test_data_examples_is_the_number_of_training_examples(examples: int, held_out: int) -> None:
    """``data.examples`` training examples exactly; the default held-out set is cut besides them, at most a quarter
    of them (a fifth of all). It used to be a fifth of examples + 1024, the rest training: 1 asked gave 820."""
    dataset = load_dataset(DataConfig(source="natural-patches", examples=examples, whiten=False), seed=0)
    assert (dataset.train.shape[0], dataset.held_out.shape[0]) == (examples, held_out)
    images = load_dataset(DataConfig(source="natural-images", examples=examples, held_out=1, image_size=8), seed=0)
    assert (images.train.shape[0], images.held_out.shape[0]) == (examples, 1)  # a held_out that is set is kept


@pytest.mark.parametrize(
    ("source", "examples"),
    [("natural-patches", 9), ("natural-patches", 403), ("natural-images", 404), ("digits", 50), ("lfw-faces", 50)],
)
def test_config_toml_records_the_held_out_count_and_it_cuts_the_same_examples(source: str, examples: int) -> None:
    """The default data.held_out is capped without a word; config.toml records the count instead (as_recorded), and
    that count, now an explicit value, must cut the very same training and held-out examples on --resume."""
    from downpour.data import as_recorded

    config = DataConfig(source=source, examples=examples, image_size=8, whiten=False)
    dataset = load_dataset(config, seed=5)
    recorded = as_recorded(config, dataset)
    assert recorded.held_out == len(dataset.held_out) < config.held_out
    again = load_dataset(recorded, seed=5)
    assert torch.equal(again.train, dataset.train) and torch.equal(again.held_out, dataset.held_out)
    explicit = DataConfig(source=source, examples=examples, image_size=8, held_out=1, whiten=False)
    assert as_recorded(explicit, load_dataset(explicit, seed=5)) is explicit  # a value that was set is what it held


def test_the_old_rule_differs_only_for_small_examples_with_the_default_held_out() -> None:
    """Runs from before data.examples was exact resume where the old rule cut the same counts: an explicit held_out,
    or 4096 examples and more with the default; lfw-faces and digits were never cut (None)."""
    from downpour.data import counts_before_exact_examples

    for config in (DataConfig(examples=300, held_out=60, whiten=False), DataConfig(examples=4096, whiten=False),
                   DataConfig(source="natural-images", examples=5000, image_size=8, whiten=False)):  # fmt: skip
        dataset = load_dataset(config, seed=0)
        assert counts_before_exact_examples(config) == (len(dataset.train), len(dataset.held_out))
    assert counts_before_exact_examples(DataConfig(examples=400)) == (1140, 284)
    assert counts_before_exact_examples(DataConfig(source="digits")) is None


def test_too_few_examples_to_hold_any_out_says_what_to_raise() -> None:
    with pytest.raises(DataError, match=r"too few examples \(1\) to hold any out; raise data.examples"):
        load_dataset(DataConfig(source="natural-patches", examples=1), seed=0)


def test_zca_matrix_whitens_correlated_gaussians() -> None:
    """ZCA of correlated data gives identity covariance (up to the regulariser)."""
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(5, 5, generator=generator)
    x = torch.randn(50000, 5, generator=generator) @ mixing
    white = (x - x.mean(0)) @ zca_matrix(x, eps=1e-9)
    covariance = white.t() @ white / (x.shape[0] - 1)
    assert torch.allclose(covariance, torch.eye(5), atol=2e-2)


def test_small_eigendecompositions_run_on_one_thread_and_the_count_comes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to SINGLE_THREAD_EIGH_MAX_DIM dimensions ``eigh`` runs single-threaded (parallel LAPACK stalls for seconds on
    shared cores); above it, on EIGH_THREADS whatever the caller's (its result depends on its thread count: a run's
    values followed OMP_NUM_THREADS). Either way the caller's thread count is restored, also after an error inside
    the block."""
    from downpour.data import whitening
    from downpour.threads import torch_threads

    seen: list[tuple[int, int]] = []
    real_eigh = torch.linalg.eigh

    def eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append((matrix.shape[0], torch.get_num_threads()))
        return real_eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    monkeypatch.setattr(whitening, "SINGLE_THREAD_EIGH_MAX_DIM", 8)  # so that a small matrix is "large"
    with torch_threads(2):
        zca_matrix(torch.randn(100, 8), eps=1e-3)
        zca_matrix(torch.randn(100, 9), eps=1e-3)
        assert torch.get_num_threads() == 2
        with pytest.raises(DataError, match="no variance"), torch_threads(1):
            zca_matrix(torch.ones(10, 3), eps=1e-3)
        assert torch.get_num_threads() == 2
    with torch_threads(1):
        zca_matrix(torch.randn(100, 9), eps=1e-3)  # one thread asked for: still EIGH_THREADS
        assert torch.get_num_threads() == 1
    assert seen == [(8, 1), (9, whitening.EIGH_THREADS), (3, 1), (9, whitening.EIGH_THREADS)]


def test_worker_slices_are_disjoint_and_cover_every_example() -> None:
    """Each worker reads only its own contiguous range; together they read every example once."""
    for workers in (1, 2, 3, 7):
        seen = []
        for worker in range(workers):
            part = worker_slice(100, workers, worker)
            seen += list(range(100))[part]
        assert seen == list(range(100))


def test_more_workers_than_examples_is_a_clear_error() -> None:
    """A shard must hold at least one example."""
    with pytest.raises(DataError, match=r"cluster\.workers=5"):
        worker_slice(4, 5, 0)


def test_zca_matrix_is_u_diag_inverse_sqrt_of_eigenvalues_plus_relative_eps_u_transposed() -> None:
    """The ZCA matrix is ``U diag(1/sqrt(λ + ε·mean(λ))) Uᵀ`` of the sample covariance (``N − 1``), built here with
    numpy from a hand-made data set, with a large ε so that ε inside the square root (not added after it), the
    relative ε and the unbiased covariance each change the matrix well beyond rounding."""
    # 6 examples of 3 values; columns centred by hand below, so the covariance is exact
    x = np.array([[1.0, 2.0, 0.0], [3.0, -1.0, 1.0], [-2.0, 0.5, 2.0], [0.0, 1.0, -1.0], [4.0, 0.0, 0.5],
                  [-1.0, -2.0, 1.5]])  # fmt: skip
    centred = x - x.mean(axis=0)
    covariance = centred.T @ centred / (len(x) - 1)
    eigenvalues, u = np.linalg.eigh(covariance)
    eps = 0.5
    expected = u @ np.diag(1.0 / np.sqrt(eigenvalues + eps * eigenvalues.mean())) @ u.T
    got = zca_matrix(torch.tensor(x, dtype=torch.float32), eps=eps).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_the_whitening_matrix_is_fitted_on_the_training_examples_only() -> None:
    """The ZCA matrix kept with the data is the one of the training examples' covariance: fitting it on the
    held-out examples too would leak them into the preprocessing the held-out loss is measured through. The
    matrix is recomputed from the formula (numpy) on the mean-removed training digits of the same split."""
    config = DataConfig(source="digits", held_out=300)  # a large held-out set, so that a leak shows
    dataset = load_dataset(config, seed=2)
    plain = load_dataset(DataConfig(source="digits", held_out=300, whiten=False), seed=2)  # same split, unwhitened
    train = plain.train.double().numpy()
    centred = train - train.mean(axis=0)
    eigenvalues, u = np.linalg.eigh(centred.T @ centred / (len(train) - 1))
    eigenvalues = np.clip(eigenvalues, 0, None)
    expected = u @ np.diag(1.0 / np.sqrt(eigenvalues + config.whiten_eps * eigenvalues.mean())) @ u.T
    assert dataset.whitening is not None
    np.testing.assert_allclose(dataset.whitening.double().numpy(), expected, rtol=1e-3, atol=1e-3)


def test_crops_count_every_position_up_to_the_edges() -> None:
    """A picture of H×W holds (H − s + 1)·(W − s + 1) crops of side s, one no smaller than s yields them all, the
    last row and column included, and a picture exactly s wide is its own single crop (counted by hand)."""
    assert crop_positions([np.zeros((1, 5, 4)), np.zeros((1, 3, 3)), np.zeros((1, 2, 9))], 3) == 3 * 2 + 1 + 0
    picture = np.arange(5 * 4, dtype=np.float32).reshape(1, 5, 4) / 20  # every pixel distinct: a crop's corner
    crops = random_crops([picture], 600, 3, np.random.default_rng(0))  # (600, 1, 3, 3)
    corners = {(int(np.argwhere(picture[0] == c[0, 0, 0])[0][0]), int(np.argwhere(picture[0] == c[0, 0, 0])[0][1]))
               for c in crops}  # fmt: skip
    assert corners == {(y, x) for y in range(3) for x in range(2)}  # 600 draws of 6 positions: each one comes up
    exact = np.random.default_rng(1).random((1, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(random_crops([exact], 2, 4, np.random.default_rng(0)), np.stack([exact, exact]))


def test_every_crop_position_of_every_picture_is_equally_likely() -> None:
    """Pictures are drawn in proportion to their crop positions: a picture of 1 position beside one of 9 gives
    about a tenth of the crops (binomial, n = 4000, p = 0.1: sd 19, so 400 ± 100 is 5 sd), not half."""
    small, large = np.zeros((1, 2, 2), np.float32), np.ones((1, 4, 4), np.float32)  # 1 and 3·3 = 9 positions of 2
    crops = random_crops([small, large], 4000, 2, np.random.default_rng(0))
    assert 300 < int((crops.max(axis=(1, 2, 3)) == 0).sum()) < 500


def test_bundled_sources_are_scaled_to_the_unit_interval() -> None:
    """uint8 crops are divided by 255 (255 → exactly 1), the colour photos lie in [0, 1] with bright pixels
    near 1, a float picture already in [0, 1] is kept as it is (even one whose brightest pixel is exactly 1),
    digits are their 0-16 counts over 16, and lfw-faces is the face half of lfw_subset (the first 100)."""
    white = np.full((1, 3, 3), 255, np.uint8)
    np.testing.assert_array_equal(random_crops([white], 1, 3, np.random.default_rng(0)), np.ones((1, 1, 3, 3)))
    for photo in sources.bundled_colour_photos():
        assert photo.shape[0] == 3 and photo.min() >= 0.0 and 0.9 < photo.max() <= 1.0
    unit = np.array([[0.0, 0.5], [0.25, 1.0]])
    np.testing.assert_array_equal(sources._grayscale(unit), unit.astype(np.float32))
    digits = sources.digits()
    np.testing.assert_allclose(digits[:, 0] * 16, load_digits().images, atol=1e-5)
    np.testing.assert_allclose(sources.lfw_faces()[:, 0], skdata.lfw_subset()[:100], atol=1e-6)


def test_the_held_out_examples_of_a_fixed_source_are_drawn_at_random_by_the_seed() -> None:
    """lfw-faces and digits are stored in order (digits by writer): the held-out set must be a seeded random draw
    from all of them, not the first examples of the file, so other seeds hold out other digits. Each held-out
    example is matched back to its row of sklearn's digits (its pixels, less their mean)."""
    raw = torch.from_numpy(load_digits().images.reshape(-1, 64) / 16.0).float()
    raw = raw - raw.mean(dim=1, keepdim=True)
    drawn = []
    for seed in (0, 1):
        held = load_dataset(DataConfig(source="digits", held_out=100, whiten=False), seed=seed).held_out
        rows = torch.cdist(held, raw).argmin(dim=1)  # the row of the file each held-out example is
        assert torch.allclose(raw[rows], held, atol=1e-5)
        drawn.append(set(rows.tolist()))
    assert drawn[0] != drawn[1] and drawn[0] != set(range(100))
    assert max(drawn[0]) > 1000  # spread over the file, not its first rows
