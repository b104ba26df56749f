"""``downpour eval face-neuron``, ``eval probe``, ``viz`` and ``detect`` on short real runs, and ``load_run``.

Two runs are trained once per session (in-process, on the simulator backend, bundled photos): a small RICA and a
tiny cat network. Every command then runs end to end through ``downpour.cli.main`` on them.
"""

from __future__ import annotations

import json
import math
import shutil
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from skimage import data, io

from downpour import config as config_mod
from downpour.cli import main
from downpour.data import load_dataset
from downpour.errors import DownpourError
from downpour.eval import viz
from downpour.eval.detect import default_map_name
from downpour.eval.images import fit_images, jitter_images
from downpour.eval.selectivity import best_unit, half_splits, heldout_accuracy
from downpour.eval.stimulus import Ascent, optimal_stimuli
from downpour.models.rica import RICA as RicaModel
from downpour.report.html import build_report
from downpour.runs import TrainedRun, load_run
from downpour.train import run_training

PNG = b"\x89PNG\r\n\x1a\n"
RICA = {"data": {"examples": 1500, "held_out": 200}, "model": {"features": 64},
        "train": {"steps": 300, "seconds": 0, "batch_size": 64}, "ps": {"shards": 1},
        "cluster": {"backend": "sim", "workers": 2}}  # fmt: skip
DIVERGED = {"data": {"examples": 600, "held_out": 100}, "model": {"features": 16},
            "train": {"steps": 10, "seconds": 0, "batch_size": 32}, "ps": {"shards": 1, "rule": "sgd", "lr": 1e30},
            "cluster": {"backend": "sim", "workers": 2}}  # fmt: skip
CAT = {"data": {"source": "natural-images", "image_size": 16, "examples": 300, "held_out": 60},
       "model": {"name": "cat", "receptive_field": 6, "maps": 2, "pool": 3, "lcn": 3},
       "train": {"steps": 20, "seconds": 0, "batch_size": 16}, "ps": {"shards": 1},
       "cluster": {"backend": "sim", "workers": 2}}  # fmt: skip


def _train(raw: dict, out: Path) -> Path:
    run_training(config_mod.from_dict(raw), out, console=Console(stderr=True, quiet=True), show_progress=False)
    return out


@pytest.fixture(scope="session")
def rica_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short RICA run (64 units on whitened 16x16 patches), trained once for all tests here."""
    return _train(RICA, tmp_path_factory.mktemp("eval") / "rica")


@pytest.fixture(scope="session")
def cat_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny cat network (one stage, 2 maps, 16x16 crops), trained for a few steps."""
    return _train(CAT, tmp_path_factory.mktemp("eval") / "cat")


@pytest.fixture(scope="session")
def diverged_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RICA run whose SGD at lr 1e30 diverged: its saved checkpoint holds finite weights near 1e29, whose
    response gradients overflow float32."""
    run = _train(DIVERGED, tmp_path_factory.mktemp("eval") / "diverged")
    assert json.loads((run / "summary.json").read_text())["diverged"] is True
    return run


@pytest.fixture(scope="session")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-image's astronaut, shrunk to 64x64, as a PNG file."""
    path = tmp_path_factory.mktemp("img") / "astronaut.png"
    io.imsave(path, (fit_images(data.astronaut().transpose(2, 0, 1)[None] / 255.0, (3, 64, 64))[0].transpose(1, 2, 0)
                     * 255).astype(np.uint8))  # fmt: skip
    return path


def _untrained(model: torch.nn.Module, shape: tuple[int, int, int],
               whitening: torch.Tensor | None = None) -> TrainedRun:  # fmt: skip
    """A :class:`TrainedRun` around ``model`` as built (no training, no run directory): for the protocols' own
    arithmetic, where a trained model adds seconds and nothing else."""
    return TrainedRun(Path("untrained"), config_mod.from_dict({}), model.eval(), shape, whitening, 0)


class _NoiseFeatures(torch.nn.Module):
    """A "model" whose features are Gaussian noise, whatever the picture: they carry no information about it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width, self.generator = width, torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(len(x), self.width, generator=self.generator)


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_load_run_rebuilds_the_trained_model_and_its_preprocessing(rica_run: Path) -> None:
    """The loaded model gives the summary's final held-out loss on the held-out batch training used."""
    trained = load_run(rica_run)
    summary = json.loads((rica_run / "summary.json").read_text())
    dataset = load_dataset(trained.config.data, seed=trained.config.train.seed)
    assert trained.input_shape == dataset.shape == (1, 16, 16)
    assert torch.equal(trained.whitening, dataset.whitening)
    assert trained.centre is None and dataset.centre is None  # data.whiten_centre is off by default
    assert float(trained.model.loss(dataset.held_out)) == pytest.approx(summary["final_loss"], rel=1e-4)
    assert summary["final_loss"] < 0.7 * summary["initial_loss"]  # the fixture run did learn
    images = torch.rand(5, 1, 16, 16)
    assert trained.features(images).shape == (5, 64)
    assert torch.allclose(trained.preprocess(images + 0.3), trained.preprocess(images), atol=1e-5)  # brightness out


def test_load_run_refuses_missing_corrupt_and_mismatched_runs(rica_run: Path, tmp_path: Path) -> None:
    with pytest.raises(DownpourError, match="does not exist"):
        load_run(tmp_path / "nowhere")
    with pytest.raises(DownpourError, match=r"holds no config\.toml"):
        load_run(tmp_path)
    copy = shutil.copytree(rica_run, tmp_path / "copy")
    config_text = (copy / "config.toml").read_text()
    (copy / "config.toml").write_text(config_text.replace("features = 64", "features = 32"))
    with pytest.raises(DownpourError, match="does not fit the model"):
        load_run(copy)
    # the same shapes, other data: another run's checkpoint (it would be scored through the wrong preprocessing,
    # and could bring weights fitted on the face test's own faces past its refusal)
    (copy / "config.toml").write_text(config_text.replace("seed = 0", "seed = 3"))
    with pytest.raises(DownpourError, match=r"was saved by a run trained otherwise than .*\(train\.seed 0 vs 3\)"):
        load_run(copy)
    (copy / "config.toml").write_text(config_text)
    (copy / "whitening.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DownpourError, match="corrupt whitening matrix"):
        load_run(copy)
    zca = load_file(str(rica_run / "whitening.safetensors"))["zca"]
    save_file({"zca": torch.full_like(zca, float("nan"))}, str(copy / "whitening.safetensors"))  # flat data's ZCA
    with pytest.raises(DownpourError, match="holds NaN or Inf values"):
        load_run(copy)
    shutil.copy(rica_run / "whitening.safetensors", copy / "whitening.safetensors")
    params = next((copy / "checkpoint").glob("params-*.safetensors"))
    params.write_bytes(params.read_bytes()[:100])
    with pytest.raises(DownpourError, match="corrupt checkpoint"):
        load_run(copy)


def test_best_unit_finds_a_planted_unit_of_either_polarity() -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(40, dtype=np.int64), np.zeros(40, dtype=np.int64)]
    values = rng.normal(size=(80, 30))
    values[:, 17] = np.where(labels == 1, -2.0, 2.0) + rng.normal(scale=0.5, size=80)  # low means "face"
    rule = best_unit(values, labels)
    assert (rule.unit, rule.polarity) == (17, -1)
    assert rule.accuracy == pytest.approx(float((rule.predict(values) == labels).mean()))
    assert rule.accuracy > 0.95
    train, test = half_splits(labels, 1, seed=3)[0]
    assert len(np.intersect1d(train, test)) == 0 and labels[train].sum() == labels[test].sum() == 20
    accuracy, unit = heldout_accuracy(values, labels, train, test)
    assert unit == 17 and accuracy > 0.9
    noise = rng.normal(size=(80, 30))
    assert heldout_accuracy(noise, labels, train, test)[0] < best_unit(noise[train], labels[train]).accuracy


def test_best_unit_never_cuts_between_equal_values() -> None:
    """A threshold cannot fall between two equal values: for 0, 0, 1 labelled 0, 1, 1 the best realisable rule gets
    2 of 3 right (a cut between the two zeros would claim all 3). On data full of ties, each rule's accuracy is that
    of its own predictions."""
    values, labels = np.array([[0.0], [0.0], [1.0]]), np.array([0, 1, 1])
    rule = best_unit(values, labels)
    assert rule.accuracy == pytest.approx(2 / 3)
    assert float((rule.predict(values) == labels).mean()) == pytest.approx(2 / 3)
    rng = np.random.default_rng(5)
    for _ in range(20):
        tied = rng.integers(0, 3, size=(15, 4)).astype(np.float64)  # three levels: ties everywhere
        y = rng.integers(0, 2, size=15)
        rule = best_unit(tied, y)
        assert rule.accuracy == pytest.approx(float((rule.predict(tied) == y).mean()))


def test_half_splits_draw_a_new_split_each_time() -> None:
    """``count`` random halves are ``count`` different halves (their spread is what the ± reports), each a
    stratified partition of the examples; the same seed gives the same halves."""
    labels = np.r_[np.ones(30, dtype=np.int64), np.zeros(30, dtype=np.int64)]
    splits = half_splits(labels, 6, seed=4)
    trains = {tuple(train) for train, _ in splits}
    assert len(trains) == 6
    for train, test in splits:
        assert np.array_equal(np.sort(np.r_[train, test]), np.arange(60))
        assert labels[train].sum() == labels[test].sum() == 15
    again = half_splits(labels, 6, seed=4)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(splits, again, strict=True))


def test_jittered_held_out_accuracy_chooses_its_unit_on_jittered_values() -> None:
    """``jitter_heldout_accuracy`` chooses unit and threshold on the jittered pictures' values: with a unit that
    separates the classes only in the jittered values (pure noise in the clean ones), it finds that unit and scores
    high, while the clean held-out accuracy stays near chance."""
    from downpour.eval.face_neuron import _summary

    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(50, dtype=np.int64), np.zeros(50, dtype=np.int64)]
    clean = rng.normal(size=(100, 8))
    jittered = rng.normal(size=(100, 8))
    jittered[:, 5] += 4.0 * labels  # unit 5 tells faces apart, in the jittered values only
    summary, _, jitter_units = _summary({"clean": clean, "jitter": jittered}, labels, half_splits(labels, 4, 0),
                                        heldout_accuracy, 8)  # fmt: skip
    assert jitter_units == [5, 5, 5, 5] and summary["jitter_heldout_accuracy"] > 0.9
    assert summary["heldout_accuracy"] < 0.75


def test_the_pixel_probe_and_pca_baselines_are_fitted_on_the_training_half_only() -> None:
    """The baselines learn from the training half alone: their scores on the test half do not change when the
    test rows of the input they are fitted on are replaced by noise (scored on the original rows), and a probe on
    noise pixels (625 dimensions for 100 rows a half) scores near chance (fitted on the test rows, it would
    score 1.0)."""
    from threadpoolctl import threadpool_limits

    from downpour.data.sources import lfw_labelled
    from downpour.eval.face_neuron import _pca_scorer, _probe_scorer

    raw, labels = lfw_labelled()
    pixels = raw.reshape(200, -1).astype(np.float64)  # (200, 625)
    rng = np.random.default_rng(1)
    splits = half_splits(labels, 3, seed=2)
    with threadpool_limits(limits=1):  # as the face-neuron test runs them: BLAS threads only cost time here
        for train, test in splits:
            spoiled = pixels.copy()
            spoiled[test] = rng.normal(scale=5.0, size=(len(test), pixels.shape[1]))
            for scorer in (_pca_scorer, _probe_scorer):
                assert scorer(spoiled, labels, train, test, pixels) == scorer(pixels, labels, train, test, pixels)
        noise = rng.normal(size=pixels.shape)
        accuracies = [_probe_scorer(noise, labels, train, test)[0] for train, test in splits]
    assert np.mean(accuracies) < 0.7


def test_face_neuron_in_sample_rule_is_chosen_and_scored_on_all_images() -> None:
    """The paper's in-sample protocol chooses unit, threshold and polarity on all 200 images: the reported rule,
    applied to every image here, gets exactly the reported accuracy."""
    from downpour.data.sources import lfw_labelled
    from downpour.eval import face_neuron

    trained = _untrained(RicaModel(64, 16, generator=torch.Generator().manual_seed(0)), (1, 8, 8))
    result = face_neuron.evaluate(trained, splits=1, seed=0)
    raw, labels = lfw_labelled()
    features = trained.features(torch.from_numpy(fit_images(raw, trained.input_shape))).numpy()  # (200, 16)
    values = features[:, result["insample_unit"]]
    predicted = result["insample_polarity"] * (values - result["insample_threshold"]) > 0
    assert result["insample_accuracy"] == pytest.approx(float((predicted == labels).mean()), abs=1e-12)
    assert result["insample_accuracy"] < 1.0  # 16 random units do not separate these faces perfectly


def test_face_neuron_random_filters_see_the_models_preprocessed_input() -> None:
    """The random-filter baseline is applied to the same preprocessed input as the model: with a preprocessing
    that leaves nothing of the pictures (a zero whitening matrix) its responses are all 0 and it scores chance,
    exactly, though the raw pixels tell these faces apart."""
    from downpour.eval import face_neuron

    trained = _untrained(RicaModel(64, 16, generator=torch.Generator().manual_seed(0)), (1, 8, 8), torch.zeros(64, 64))
    result = face_neuron.evaluate(trained, splits=2, seed=0)
    random_filter = result["baselines"]["random_filter"]
    assert random_filter["heldout_accuracy"] == random_filter["jitter_heldout_accuracy"] == 0.5
    assert result["baselines"]["raw_pixel"]["heldout_accuracy"] > 0.75


def test_probe_is_fitted_on_the_training_split_only() -> None:
    """Features of pure noise, 200 per image: a probe fitted on the training 80% scores about chance (0.1) on the
    other 20%; one fitted on the test examples themselves would all but memorise them."""
    from downpour.eval.probe import evaluate

    result = evaluate(_untrained(_NoiseFeatures(200), (1, 8, 8)))
    assert result["features"] == 200 and result["test_examples"] == 360
    assert result["accuracy"] < 2.5 * result["chance"]
    assert result["raw_pixels_accuracy"] > 0.9  # the digits themselves are easy


def test_detect_batches_of_rows_give_the_same_map_as_one_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows are run in batches of whole rows: with one row of windows per batch each strip starts at its own
    row of windows (``first · stride`` pixels down), so the map is the one of a single batch and each value is the
    unit's response to its window cut out by hand."""
    from downpour.eval import detect

    trained = _untrained(RicaModel(64, 6, generator=torch.Generator().manual_seed(0)), (1, 8, 8))
    image = np.random.default_rng(0).random((1, 30, 26)).astype(np.float32)
    whole = detect.response_map(trained, image, 2, stride=3)  # (8, 7), one batch
    monkeypatch.setattr(detect, "WINDOWS_PER_BATCH", 10)  # one row of 7 windows per batch
    by_rows = detect.response_map(trained, image, 2, stride=3)
    assert whole.shape == by_rows.shape == ((30 - 8) // 3 + 1, (26 - 8) // 3 + 1)
    np.testing.assert_allclose(by_rows, whole, rtol=1e-6, atol=1e-6)
    for i, j in ((0, 0), (3, 2), (7, 6)):
        window = torch.from_numpy(image[:, 3 * i : 3 * i + 8, 3 * j : 3 * j + 8].copy())[None]
        assert by_rows[i, j] == pytest.approx(float(trained.features(window)[0, 2]), rel=1e-5, abs=1e-6)


def test_optimal_stimuli_are_mean_free() -> None:
    """The stimuli are centred images on the norm bound ("the returned images are mean-free"): the search starts
    from a random image, whose mean the projection must remove."""
    trained = _untrained(RicaModel(64, 6, generator=torch.Generator().manual_seed(0)), (1, 8, 8))
    stimuli, _ = optimal_stimuli(trained, [0, 3], steps=5)
    flat = stimuli.flatten(1)
    assert torch.allclose(flat.mean(dim=1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(flat.norm(dim=1), torch.full((2,), 0.1 * 8), rtol=1e-4)


def test_jitter_is_seeded_and_keeps_images_in_range() -> None:
    faces = data.lfw_subset()[:6]
    one, two = jitter_images(faces, np.random.default_rng(1)), jitter_images(faces, np.random.default_rng(1))
    assert np.array_equal(one, two)
    assert not np.allclose(one, jitter_images(faces, np.random.default_rng(2)))
    assert one.shape == faces.shape and one.min() >= 0 and one.max() <= 1
    assert not np.allclose(one, faces)


def test_eval_face_neuron_writes_json_and_picture(rica_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from downpour.eval import face_neuron

    code, out, _ = _cli(capsys, "eval", "face-neuron", str(rica_run), "--splits", "3", "--json")
    assert code == 0
    result = json.loads(out)
    assert result == json.loads((rica_run / "eval" / "face_neuron.json").read_text())
    assert (rica_run / "eval" / "face_neuron.png").read_bytes()[:8] == PNG
    for key in ("heldout_accuracy", "insample_accuracy", "jitter_heldout_accuracy"):
        assert 0.0 <= result[key] <= 1.0
    assert result["insample_accuracy"] >= result["heldout_accuracy"] - 0.1  # chosen on the scored images
    assert len(result["units"]) == len(result["jitter_units"]) == 3
    assert all(0 <= u < result["features"] == 64 for u in result["units"])
    baselines = result["baselines"]
    assert set(baselines) == {"raw_pixel", "pca_component", "random_filter", "pixel_probe"}
    assert baselines["raw_pixel"]["heldout_accuracy"] > 0.8  # a single pixel already tells these faces apart
    assert baselines["pixel_probe"]["heldout_accuracy"] > 0.8
    assert all(0.5 < b["jitter_heldout_accuracy"] <= 1.0 for b in baselines.values())
    console = Console(record=True, width=120)
    face_neuron.print_table(result, console)
    table = console.export_text()
    assert "raw pixel" in table and f"{result['heldout_accuracy']:.3f}" in table
    assert "3 splits" in table and table.count("±") == 3 * (1 + len(baselines))
    one = {**result, "splits": 1}  # one split has no spread: no "± 0.000"
    console = Console(record=True, width=120)
    face_neuron.print_table(one, console)
    table = console.export_text()
    assert "1 split," in table and "±" not in table


def test_face_neuron_invariance_keeps_the_unit_and_threshold_chosen_on_clean_pictures(rica_run: Path) -> None:
    """``invariance_accuracy`` is Le et al.'s test of a face unit's invariance: the rule chosen on the clean training
    half, scored on the jittered test half (``jitter_heldout_accuracy`` chooses again on jittered pictures, and so
    seldom scores the same unit)."""
    from downpour.data.sources import lfw_labelled
    from downpour.eval import face_neuron

    trained = load_run(rica_run)
    result = face_neuron.evaluate(trained, splits=3, seed=0)
    raw, labels = lfw_labelled()
    clean = trained.features(torch.from_numpy(fit_images(raw, trained.input_shape))).numpy()
    jittered_raw = jitter_images(raw[:, 0], np.random.default_rng(0))[:, None]
    jittered = trained.features(torch.from_numpy(fit_images(jittered_raw, trained.input_shape))).numpy()
    expected = []
    for train, test in half_splits(labels, 3, 0):
        rule = best_unit(clean[train], labels[train])
        expected.append(float((rule.predict(jittered[test]) == labels[test]).mean()))
    assert result["invariance_accuracy"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert result["invariance_std"] == pytest.approx(np.std(expected), abs=1e-12)
    for base in result["baselines"].values():
        assert 0.4 <= base["invariance_accuracy"] <= 1.0


def test_face_neuron_refuses_a_run_trained_on_its_faces_and_a_seed_out_of_range(
    rica_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run trained on lfw-faces was fitted on the very faces the test scores (its "held-out" accuracy measured
    0.97 against 0.90 for the same model fitted without them): refused in one line, not reported. A seed beyond
    64 bits was a traceback from torch. (viz of its 4 units, without --units, asked for units 0..7 and failed.)"""
    faces = _train({**RICA, "data": {"source": "lfw-faces"}, "model": {"features": 4}, "train": {"steps": 10,
                   "seconds": 0, "batch_size": 16}}, tmp_path / "faces")  # fmt: skip
    code, _, err = _cli(capsys, "eval", "face-neuron", str(faces), "--splits", "1")
    assert code == 2 and "was trained on data.source = 'lfw-faces', the very faces this test scores" in err
    assert not (faces / "eval" / "face_neuron.json").exists()
    code, _, err = _cli(capsys, "viz", str(faces), "--steps", "3")  # 4 units: the default shows those 4, not 8
    assert code == 0, err
    assert json.loads((faces / "eval" / "viz.json").read_text())["units"] == [0, 1, 2, 3]
    code, _, err = _cli(capsys, "eval", "face-neuron", str(rica_run), "--seed", str(2**64))
    assert code == 2 and f"invalid --seed: {2**64} (must be 0 .. 2**64 - 1)" in err and "Traceback" not in err


def test_face_neuron_and_probe_on_a_cat_network(cat_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from downpour.eval import face_neuron

    result = face_neuron.run(cat_run, splits=1)
    assert result["model"] == "cat" and result["input_shape"] == [1, 16, 16]
    assert result["features"] == 2 * 9 * 9  # 2 maps of (16 - 6 + 1) - 3 + 1 = 9x9 pooled units
    code, out, _ = _cli(capsys, "eval", "probe", str(cat_run), "--data", "digits", "--json")
    assert code == 0
    probe = json.loads(out)
    assert probe["features"] == 162 and probe["test_examples"] == 360
    assert probe["accuracy"] > 5 * probe["chance"]  # ten classes: far above chance


def test_eval_probe_on_digits(rica_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "eval", "probe", str(rica_run), "--data", "digits", "--json")
    assert code == 0
    result = json.loads(out)
    assert result == json.loads((rica_run / "eval" / "probe_digits.json").read_text())
    assert result["original_shape"] == [1, 8, 8] and result["input_shape"] == [1, 16, 16]
    assert result["raw_pixels_accuracy"] > 0.9
    assert 0.5 < result["accuracy"] <= 1.0
    code, _, err = _cli(capsys, "eval", "probe", str(rica_run), "--data", "mnist")
    assert code == 2 and "invalid --data: 'mnist'" in err


def test_viz_writes_filters_and_optimal_stimuli(rica_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "viz", str(rica_run), "--units", "0,5", "--steps", "20", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["units"] == [0, 5]
    for name in ("filters.png", "optimal_stimuli.png"):
        assert (rica_run / "eval" / name).read_bytes()[:8] == PNG
    code, _, err = _cli(capsys, "viz", str(rica_run), "--units", "64")
    assert code == 2 and "invalid unit: 64 (this model has units 0..63)" in err


def test_viz_records_that_each_ascent_raised_its_response(rica_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On a trained run every unit's search climbs: viz.json holds each start and final response, all raised, and
    nothing is warned of."""
    code, out, err = _cli(capsys, "viz", str(rica_run), "--units", "0,5", "--steps", "20", "--json")
    assert code == 0 and "warning" not in err
    result = json.loads(out)
    assert result["ascent_raised"] == [True, True] and result["ascent_failed_units"] == []
    assert all(final > start for start, final in zip(result["start_responses"], result["responses"], strict=True))
    assert json.loads((rica_run / "eval" / "viz.json").read_text())["ascent_raised"] == [True, True]


def test_viz_says_which_units_ascent_failed_on_a_diverged_run(diverged_run: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """On a diverged network the gradient overflows and the search never leaves its start: the "optimal" responses
    (negative, about -1e30) are its random start's. viz.json, the console and the report say so, naming the units;
    viz still writes its pictures."""
    code, out, err = _cli(capsys, "viz", str(diverged_run), "--units", "3,0", "--steps", "5", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["ascent_raised"] == [False, False] and result["ascent_failed_units"] == [3, 0]
    warning = next(line for line in err.splitlines() if "did not raise" in line)
    assert warning.startswith("warning: the gradient ascent did not raise the response of unit(s) 3 (")
    assert ", 0 (" in warning and "→" in warning
    assert (diverged_run / "eval" / "optimal_stimuli.png").read_bytes()[:8] == PNG
    page = build_report(diverged_run)
    assert "The gradient ascent did not raise the response of 2 units: 3 (" in page


def test_an_ascent_raised_a_response_only_by_more_than_float_noise() -> None:
    """Raised: both responses finite and the final above the start by more than float noise (a search that never
    left its start on a diverged network still differs in the last bits: -6.252027e30 then -6.252026e30)."""
    start = torch.tensor([1.0, -6.252027e30, 0.0, float("nan"), 2.0])
    final = torch.tensor([1.5, -6.252026e30, float("inf"), 3.0, 2.0])
    assert Ascent(torch.zeros(5, 1, 2, 2), final, start).raised() == [True, False, False, False, False]


def test_viz_steps_are_bounded_before_the_run_is_loaded(rica_run: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """--steps 0 and --steps past 100,000 are one-line errors naming the value and the range, before the run is read
    (a run directory that does not exist is not what the message is about)."""
    for steps in ("0", "-3", "100001"):
        code, _, err = _cli(capsys, "viz", str(tmp_path / "no-run"), "--steps", steps)
        assert code == 2 and err.strip() == f"downpour: error: invalid --steps: {steps} (must be 1..100000)", err
    with pytest.raises(DownpourError, match=r"invalid --steps: True"):
        viz.run(rica_run, steps=True)


def test_a_long_ascent_shows_progress_on_a_terminal_only(rica_run: Path) -> None:
    """A terminal sees a bar of the ascent's steps (erased once it ends); a pipe or a log sees nothing."""
    terminal, pipe = StringIO(), StringIO()
    viz.run(rica_run, units=[1], steps=30, console=Console(file=terminal, force_terminal=True, width=100))
    assert "optimal stimuli" in terminal.getvalue() and "30/30" in terminal.getvalue()
    viz.run(rica_run, units=[1], steps=30, console=Console(file=pipe, width=100))
    assert pipe.getvalue() == ""


def test_optimal_stimulus_tiles_are_labelled_with_unit_and_response() -> None:
    """Each tile's title names its unit and its response, in the order given; a failed ascent's tile says so in red;
    the labels are readable at the picture's size (9 points on tiles of 1.5 inches); spare grid cells stay empty."""
    stimuli = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    fig = viz.stimuli_figure(stimuli, (1, 4, 4), [5, 9, 2], [1.5, float("nan"), -2.0], [True, False, False])
    axes = fig.get_axes()
    assert len(axes) == 4
    titles = [ax.title for ax in axes[:3]]
    assert [t.get_text() for t in titles] == ["unit 5\n1.5", "unit 9\nnan (failed)", "unit 2\n-2 (failed)"]
    assert [t.get_color() for t in titles] == ["black", "tab:red", "tab:red"]
    assert all(t.get_fontsize() >= 8 for t in titles)
    assert fig.get_size_inches()[0] / 2 >= 1.4  # two columns
    assert [len(ax.get_images()) for ax in axes] == [1, 1, 1, 0]


def test_optimal_stimulus_of_a_linear_unit_is_its_whitened_filter(rica_run: Path) -> None:
    """For RICA's ``w·Z(x − x̄)`` the maximiser on the ball is the centred ``Zw``; gradient ascent must find it."""
    trained = load_run(rica_run)
    stimuli, responses = optimal_stimuli(trained, [2, 7], steps=30)
    target = trained.model.weight[[2, 7]] @ trained.whitening  # (2, D)
    target = target - target.mean(dim=1, keepdim=True)
    cosine = torch.nn.functional.cosine_similarity(stimuli.flatten(1), target)
    assert torch.all(cosine > 0.999)
    radius = stimuli.flatten(1).norm(dim=1)
    assert torch.allclose(radius, torch.full_like(radius, 0.1 * 16), rtol=1e-4)  # on the norm bound
    assert torch.allclose(responses, trained.features(stimuli + 0.5)[torch.arange(2), [2, 7]], rtol=1e-4)


def test_optimal_stimulus_of_a_network_that_skips_faint_fields_leaves_its_start(cat_run: Path) -> None:
    """With ``model.skip_variance`` at a threshold above every field of a faint picture, a search that started
    faint (a tenth of the bound) had every field zeroed, no gradient, and returned its random start with response
    0; starting on the bound, it climbs."""
    from downpour.eval.stimulus import _project
    from downpour.nn.skip import field_variance

    trained = load_run(cat_run)
    stages = [m for m in trained.model.modules() if hasattr(m, "encoder") and hasattr(m, "skip_variance")]
    encoder = stages[0].encoder
    radius = 0.1 * math.sqrt(trained.input_dim)
    start = torch.randn(2, *trained.input_shape, generator=torch.Generator().manual_seed(0))

    def variances(scale: float) -> torch.Tensor:
        z = trained.preprocess(_project(start, scale * radius) + 0.5).view(-1, *trained.input_shape)  # (U, C, H, W)
        return field_variance(z, encoder.kernel_size, encoder.stride)

    threshold = 3 * float(variances(0.1).max())
    assert float((variances(1.0) >= threshold).float().mean()) > 0.5  # on the bound most fields are computed
    for stage in stages:
        stage.skip_variance = threshold
    _, responses = optimal_stimuli(trained, [0, 1], steps=30)
    assert torch.all(responses.abs() > 1e-3), responses


def test_detect_maps_a_unit_over_an_image(rica_run: Path, photo: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out_png = tmp_path / "heat.png"
    code, out, _ = _cli(capsys, "detect", str(rica_run), str(photo), "--unit", "3", "--stride", "4", "--out",
                        str(out_png), "--json")  # fmt: skip
    assert code == 0
    result = json.loads(out)
    assert result["map_shape"] == [(64 - 16) // 4 + 1] * 2 and result["windows"] == 13 * 13
    assert result["seconds_per_megapixel"] > 0
    assert out_png.read_bytes()[:8] == PNG
    # The map's value at window (2, 5) is the unit's response to that window, cut out by hand.
    from downpour.eval.detect import response_map
    from downpour.eval.images import read_image

    trained = load_run(rica_run)
    image = read_image(photo, 1)  # (1, 64, 64)
    responses = response_map(trained, image, 3, stride=4)
    window = torch.from_numpy(image[:, 8:24, 20:36].copy())[None]  # row 2, column 5: (1, 1, 16, 16)
    assert responses[2, 5] == pytest.approx(float(trained.features(window)[0, 3]), rel=1e-4, abs=1e-5)
    code, out, _ = _cli(capsys, "detect", str(rica_run), str(photo))
    assert code == 0 and "per megapixel" in out and (rica_run / "eval" / "detect_astronaut-png.png").exists()
    code, out, _ = _cli(capsys, "detect", str(rica_run), str(photo), "--json")  # the stride: a quarter of 16 px
    assert code == 0 and json.loads(out)["stride"] == 4 and json.loads(out)["map_shape"] == [13, 13]
    names = {default_map_name(Path(name)) for name in ("a.bmp", "a.webp", "dir/a.png", "a")}
    assert len(names) == 4 and "detect_a.png" in names  # one map per picture, none over another's


def test_pictures_leave_the_callers_matplotlib_backend_alone(tmp_path: Path) -> None:
    """The heat map, the face-neuron picture and the studies' figures are drawn on matplotlib Figures, not through
    pyplot: a notebook's backend stays its own (``matplotlib.use("Agg")`` inside them switched it for the caller)."""
    import matplotlib

    from downpour.eval.detect import save_heat_map

    before = matplotlib.get_backend()
    try:
        matplotlib.use("pdf")
        save_heat_map(np.zeros((1, 20, 20)), np.ones((3, 3)), (8, 8), 6, tmp_path / "map.png", "unit 0")
        assert matplotlib.get_backend() == "pdf"
        assert (tmp_path / "map.png").read_bytes()[:8] == PNG
    finally:
        matplotlib.use(before)


def test_deep_gray_pictures_are_scaled_as_training_scales_them(tmp_path: Path) -> None:
    """16 and 32-bit gray (Pillow's "I;16" and "I" modes, e.g. a 16-bit scan stored as int32) are scaled by 65,535
    as the folder reader scales them; a 32-bit one was divided by 2**31 - 1, and so reached detect 32,768x too
    dark."""
    from PIL import Image

    from downpour.data.own import _to_array
    from downpour.eval.images import read_image

    values = np.random.default_rng(0).integers(0, 65536, (12, 14))
    for name, write in (("deep.tif", lambda p: Image.fromarray(values.astype(np.int32), mode="I").save(p)),
                        ("deep.png", lambda p: Image.fromarray(values.astype(np.uint16)).save(p))):  # fmt: skip
        write(tmp_path / name)
        read = read_image(tmp_path / name, 1)
        np.testing.assert_allclose(read[0], values / 65535.0, atol=1e-6, err_msg=name)
        with Image.open(tmp_path / name) as image:
            trained_on = _to_array(image, 1, 0)[0] / 255.0  # (H, W): training's 8 bits of the same picture
        np.testing.assert_allclose(read[0], trained_on, atol=0.5 / 255 + 1e-6, err_msg=name)


def test_float_pictures_are_read_alike_by_training_and_evaluation(tmp_path: Path) -> None:
    """A float gray TIFF (Pillow's "F" mode) in [0, 1] is that picture, in training as in evaluation (training read
    it through Pillow's conversion, which clips to 0..255: black); one on 0..255 is scaled by 255 in both; NaN is
    black and values beyond the scale are clipped."""
    from PIL import Image

    from downpour.data.own import _to_array
    from downpour.eval.images import read_image

    unit = np.random.default_rng(1).random((12, 14)).astype(np.float32)
    wide = unit * 255.0
    wide[0, :3] = (np.nan, 300.0, -5.0)
    expected_wide = unit.copy()
    expected_wide[0, :3] = (0.0, 1.0, 0.0)
    for name, values, expected in (("unit.tif", unit, unit), ("wide.tif", wide, expected_wide)):
        Image.fromarray(values, mode="F").save(tmp_path / name)
        read = read_image(tmp_path / name, 1)[0]
        np.testing.assert_allclose(read, expected, atol=1e-6, err_msg=name)
        with Image.open(tmp_path / name) as image:
            assert image.mode == "F"
            trained_on = _to_array(image, 1, 0)[0] / 255.0  # (H, W): training's 8 bits of the same picture
        np.testing.assert_allclose(trained_on, expected, atol=0.5 / 255 + 1e-6, err_msg=name)


def test_gif_and_tiff_frames_are_read_as_their_first_picture(tmp_path: Path) -> None:
    """imageio returns frames for GIF (even one frame: ``(1, H, W, 3)``) and multi-page TIFF; a picture is read as
    its first frame, in gray or colour, not refused as "not a gray or colour picture". Grey with alpha ``(H, W, 2)``
    is its grey (the frames' rule must not take its 20 rows for 20 frames)."""
    from PIL import Image

    from downpour.eval.images import read_image

    rng = np.random.default_rng(0)
    first, second = (rng.integers(0, 256, (20, 30, 3), dtype=np.uint8) for _ in range(2))
    paths = {
        "palette.gif": lambda p: Image.fromarray(first).convert("P").save(p),
        "gray.gif": lambda p: Image.fromarray(first[..., 0]).save(p),
        "animated.gif": lambda p: Image.fromarray(first).convert("P").save(
            p, save_all=True, append_images=[Image.fromarray(second).convert("P")]),
        "pages.tiff": lambda p: Image.fromarray(first).save(p, save_all=True, append_images=[Image.fromarray(second)]),
        "grey-pages.tiff": lambda p: Image.fromarray(first[..., 0]).save(
            p, save_all=True, append_images=[Image.fromarray(second[..., 0])]),
        "grey-alpha.png": lambda p: Image.fromarray(first[..., :2].copy(), mode="LA").save(p),
        # 3 or 4 grey frames: imageio gave (N, H, W), and skimage took the frames for colour channels
        "grey-3.png": lambda p: Image.fromarray(first[..., 0]).save(
            p, save_all=True, append_images=[Image.fromarray(first[..., 1]), Image.fromarray(second[..., 0])]),
        "grey-4.tiff": lambda p: Image.fromarray(first[..., 0]).save(
            p, save_all=True, append_images=[Image.fromarray(x[..., i]) for x in (first, second) for i in (1, 2)][:3]),
    }  # fmt: skip
    for name, write in paths.items():
        write(tmp_path / name)
        expected = np.asarray(Image.open(tmp_path / name).convert("RGB"), dtype=np.float32) / 255  # frame 0
        if name == "grey-alpha.png":  # its grey level, without the alpha
            expected = np.repeat(first[..., :1], 3, axis=-1).astype(np.float32) / 255
        colour = read_image(tmp_path / name, 3)
        assert colour.shape == (3, 20, 30), name
        np.testing.assert_allclose(colour, np.moveaxis(expected, -1, 0), atol=1e-6, err_msg=name)
        assert read_image(tmp_path / name, 1).shape == (1, 20, 30), name
    Image.fromarray(first).convert("CMYK").save(tmp_path / "print.jpg", quality=100)  # a print workflow's JPEG
    expected = np.asarray(Image.open(tmp_path / "print.jpg").convert("RGB"), dtype=np.float32) / 255
    np.testing.assert_allclose(read_image(tmp_path / "print.jpg", 3), np.moveaxis(expected, -1, 0), atol=1e-6)
    gray = first.astype(np.float64) @ [0.2125, 0.7154, 0.0721]  # (20, 30): the luminance training uses
    assert np.corrcoef(read_image(tmp_path / "print.jpg", 1).ravel(), gray.ravel())[0, 1] > 0.9  # no negative


def test_an_eval_file_where_the_eval_folder_goes_is_named(rica_run: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """A file named RUN/eval gave 'downpour: error: File exists runs/x/eval', without saying it must be a folder."""
    run = tmp_path / "run"
    shutil.copytree(rica_run, run, ignore=shutil.ignore_patterns("eval"))
    (run / "eval").write_text("not a folder")
    code, _, err = _cli(capsys, "eval", "probe", str(run))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{run / 'eval'} is not a folder: evaluation results are written into RUN_DIR/eval/" in err
    assert (run / "eval").read_text() == "not a folder"


def test_detect_and_eval_errors_are_one_line(rica_run: Path, photo: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    broken = tmp_path / "broken.png"
    broken.write_bytes(PNG + b"no image data here")
    tiny = tmp_path / "tiny.png"
    io.imsave(tiny, np.zeros((8, 8), dtype=np.uint8), check_contrast=False)
    cases = [
        (("detect", str(rica_run), str(broken)), "cannot read image"),
        (("detect", str(rica_run), str(tmp_path / "missing.png")), "does not exist"),
        (("detect", str(rica_run), str(tiny)), "smaller than the model's 16x16 input"),
        (("detect", str(rica_run), str(photo), "--unit", "-1"), "invalid unit: -1"),
        (("detect", str(tmp_path / "norun"), str(photo)), "does not exist"),
        (("eval", "face-neuron", str(tmp_path / "norun")), "does not exist"),
        (("eval", "face-neuron", str(rica_run), "--splits", "0"), "invalid --splits: 0"),
        (("detect", str(rica_run), str(photo), "--stride", str(1 << 63)), "invalid --stride: 9223372036854775808"),
        (("detect", str(tmp_path / "norun"), str(photo), "--stride", "0"), "invalid --stride: 0 (must be 1.."),  # first
        (("detect", str(rica_run), str(photo), "--out", str(tmp_path / "heat.pgf")), "heat.pgf"),  # needs LaTeX
        (("detect", str(rica_run), str(photo), "--out", str(photo)), "is the picture being scanned"),
        (("detect", str(rica_run), str(photo), "--out", str(rica_run / "filters.png")), "whose files it could replace"),
        (("detect", str(rica_run), str(photo), "--out", str(rica_run / "eval" / "filters.png")), "inside run"),
    ]
    before, filters = photo.read_bytes(), (rica_run / "filters.png").read_bytes()
    for argv, message in cases:
        code, _, err = _cli(capsys, *argv)
        assert code == 2, argv
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert photo.read_bytes() == before  # --out the picture itself replaced it with its heat map
    assert (rica_run / "filters.png").read_bytes() == filters  # --out filters.png replaced the run's filter picture


def test_preprocess_removes_each_example_mean_then_the_training_centre_then_whitens() -> None:
    """Evaluation must feed the model what training fed it: each image's own mean removed, then the training mean
    of each value (data.whiten_centre), then the ZCA matrix. Checked by hand on two 1×1×3 images with a diagonal
    matrix, so that skipping, adding or reordering a step changes the numbers."""
    images = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]]).view(2, 1, 1, 3)  # means 3 and 1
    centre = torch.tensor([0.5, -1.0, 2.0])
    zca = torch.diag(torch.tensor([2.0, 3.0, 0.5]))
    trained = TrainedRun(Path("untrained"), config_mod.from_dict({}), torch.nn.Identity(), (1, 1, 3), zca, 0, centre)
    # [1, 2, 6] − 3 = [−2, −1, 3]; − centre = [−2.5, 0, 1]; · diag = [−5, 0, 0.5]
    # [0, 0, 3] − 1 = [−1, −1, 2]; − centre = [−1.5, 0, 0]; · diag = [−3, 0, 0]
    torch.testing.assert_close(trained.preprocess(images), torch.tensor([[-5.0, 0.0, 0.5], [-3.0, 0.0, 0.0]]))


def test_face_neuron_splits_and_viz_steps_out_of_range_are_refused_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--splits`` is 1..1000 and viz's ``--steps`` 1..100000: a typo's 10 million used to compute for days, in
    silence (its halves alone 16 GB). Each is refused in one line naming the flag, the value and the range, before
    the run is read (here there is none)."""
    from downpour.eval import face_neuron

    norun = str(tmp_path / "norun")
    for value in ("0", "-3", "1001", "10000000"):
        code, out, err = _cli(capsys, "eval", "face-neuron", norun, "--splits", value)
        assert code == 2 and out == ""
        assert f"invalid --splits: {value} (must be 1..1000" in err and len(err.strip().splitlines()) == 1, err
    for value in ("0", "-1", "100001", "10000000"):
        code, out, err = _cli(capsys, "viz", norun, "--steps", value)
        assert code == 2 and out == ""
        assert f"invalid --steps: {value} (must be 1..100000" in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(DownpourError, match=r"invalid --splits: 1001 \(must be 1\.\.1000"):
        face_neuron.run(tmp_path / "norun", splits=1001)
    assert not (tmp_path / "norun").exists()


def test_face_neuron_shows_its_progress_unless_told_not_to(
    rica_run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long face-neuron test draws a progress bar on a terminal's stderr (once it has taken PROGRESS_AFTER_S
    seconds, here 0): every split of each of the five candidate sets, three times (clean, jittered, the clean rule
    jittered); the JSON on stdout stays whole. In a pipe or a log, and with ``--no-progress``, it draws none."""
    from downpour import cli_eval

    monkeypatch.setattr(cli_eval, "PROGRESS_AFTER_S", 0.0)
    code, out, err = _cli(capsys, "eval", "face-neuron", str(rica_run), "--splits", "2", "--json")
    assert code == 0 and json.loads(out)["splits"] == 2
    assert "30/30" not in err and "face-neuron" not in err, err  # a log or a pipe: no bar left behind in it
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # Rich then takes standard error for a terminal
    code, out, err = _cli(capsys, "eval", "face-neuron", str(rica_run), "--splits", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["splits"] == 2
    assert "face-neuron" in err and "30/30" in err, err  # 5 candidate sets x 3 x 2 splits
    code, out, err = _cli(capsys, "eval", "face-neuron", str(rica_run), "--splits", "2", "--json", "--no-progress")
    assert code == 0 and json.loads(out)["splits"] == 2
    assert "30/30" not in err and "face-neuron" not in err, err
