"""Bundled data sources, preprocessing and per-worker shards."""

from __future__ import annotations

import pytest
import torch

from downpour.config import DataConfig
from downpour.data import load_dataset, worker_slice
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
