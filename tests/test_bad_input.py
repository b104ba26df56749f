"""Bad input gives one clear line naming what is wrong (``downpour: error: ...``, exit status 2), never a
traceback, a NaN run, a hang or the kernel's OOM killer: the findings of the bad-input audit, each reproduced on
small real files and in-process ``downpour`` calls."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from skimage import io

from conftest import CliResult
from downpour import cli as cli_mod
from downpour import config as config_mod
from downpour import rundir
from downpour.config import DataConfig
from downpour.data import load_dataset
from downpour.data.whitening import zca_matrix
from downpour.errors import ConfigError, DataError, DownpourError

Cli = Callable[..., CliResult]
TRAIN = ["train", "--steps", "10", "--no-progress", "--backend", "sim"]


def _one_error_line(result: CliResult, *needles: str, status: int = 2) -> str:
    """The command failed with ``status`` and printed one ``downpour: error:`` line holding every needle."""
    err = result.stderr.strip()
    assert result.returncode == status, (result.returncode, result.stdout, err)
    assert len(err.splitlines()) == 1 and err.startswith("downpour: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RICA run of a few simulated steps (8 units on whitened 16x16 patches): something to detect and report on."""
    from downpour.train import run_training

    raw = {"data": {"examples": 300, "held_out": 60}, "model": {"features": 8},
           "train": {"steps": 4, "seconds": 0, "batch_size": 16}, "ps": {"shards": 1},
           "cluster": {"backend": "sim", "workers": 1}}  # fmt: skip
    out = tmp_path_factory.mktemp("bad") / "run"
    run_training(config_mod.from_dict(raw), out, console=Console(stderr=True, quiet=True), show_progress=False)
    return out


@pytest.fixture(scope="module")
def picture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40x40 PNG of random gray pixels."""
    path = tmp_path_factory.mktemp("img") / "noise.png"
    io.imsave(path, np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8), check_contrast=False)
    return path


# 1. Images with no variance


def test_uniform_images_are_refused_instead_of_training_on_nan(cli: Cli, tmp_path: Path) -> None:
    folder = tmp_path / "grey"
    folder.mkdir()
    io.imsave(folder / "grey.png", np.full((64, 64), 128, dtype=np.uint8), check_contrast=False)
    result = cli(*TRAIN, "--out", str(tmp_path / "run"), "--set", f"data.source=folder:{folder}",
                 "--set", "data.image_size=16", "--set", "data.examples=200", "--set", "data.held_out=40")  # fmt: skip
    _one_error_line(result, "the data has no variance after removing each example's mean", f"folder:{folder}")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before training


def test_whitening_refuses_data_without_variance() -> None:
    same = torch.rand(1, 16).repeat(50, 1)  # 50 identical examples: every eigenvalue of the covariance is 0
    with pytest.raises(DataError, match=r"no variance.*every example of the test set is the same"):
        zca_matrix(same, eps=1.0, what="the test set")
    assert torch.isfinite(zca_matrix(torch.rand(50, 16), eps=1.0)).all()


# 2. Integers beyond int64, and sane upper bounds


@pytest.mark.parametrize(("override", "key"), [
    ("train.seed=99999999999999999999", "train.seed"),
    ("train.seed=4294967296", "train.seed"),
    ("model.features=99999999999999999999", "model.features"),
    ("model.features=1000000000", "model.features"),
    ("ps.shards=99999999999999999999", "ps.shards"),
])  # fmt: skip
def test_huge_integers_are_refused_naming_the_key(cli: Cli, tmp_path: Path, override: str, key: str) -> None:
    _one_error_line(cli(*TRAIN, "--out", str(tmp_path / "run"), "--set", override), f"invalid {key}: ")


def test_the_largest_allowed_seed_and_features_are_valid() -> None:
    config = config_mod.load(None, [f"train.seed={config_mod.MAX_SEED}", f"model.features={config_mod.MAX_FEATURES}"])
    assert config.train.seed == 2**32 - 1


# 3. Sizes too large for memory


def test_data_larger_than_memory_is_refused_before_it_is_cut(cli: Cli, tmp_path: Path) -> None:
    result = cli(*TRAIN, "--out", str(tmp_path / "run"), "--set", "data.examples=1000000000000")
    _one_error_line(result, "data.examples = 1000000000000", "GiB is available: reduce data.examples")


@pytest.mark.parametrize(("model", "source", "exact"), [
    ({"name": "rica"}, "natural-patches", True),
    ({"name": "cat", "receptive_field": 8, "maps": 4, "pool": 3, "lcn": 3}, "natural-images", True),
    ({"name": "sparse-ae", "penalty": "kl:0.05,3"}, "digits", False),
], ids=["rica", "cat", "sparse-ae-kl"])  # fmt: skip
def test_a_held_out_batch_of_large_responses_is_measured_in_chunks(monkeypatch: pytest.MonkeyPatch, model: dict,
                                                                   source: str, exact: bool) -> None:  # fmt: skip
    """At model.features = 10⁶ the driver computed the 1,024 held-out examples' responses at once (4 GB a copy)
    and peaked at 23.6 GB. Above held_out.CHUNK_VALUES responses the batch is measured in chunks: the same loss
    (each term is a mean over examples), but for the KL penalty, whose mean activation is then each chunk's."""
    from downpour import held_out

    config = config_mod.from_dict({"model": model, "data": {"examples": 600, "held_out": 150, "source": source}})
    dataset = load_dataset(config.data, seed=0)
    whole = held_out.HeldOutLoss(config, dataset)
    params = whole.flat.values.clone() * 3
    responses = whole.model(dataset.held_out[:1]).numel()
    monkeypatch.setattr(held_out, "CHUNK_VALUES", responses * 40)  # chunks of 40 examples: 40, 40, 40, 30
    chunked = held_out.HeldOutLoss(config, dataset)
    assert (whole.chunk, chunked.chunk) == (150, 40)
    calls = []
    loss = type(chunked.model).loss
    monkeypatch.setattr(type(chunked.model), "loss", lambda model, x: calls.append(len(x)) or loss(model, x))
    got, expected = chunked(params), whole(params)
    assert calls == [40, 40, 40, 30, 150]
    if exact:
        assert got == pytest.approx(expected, rel=1e-5)
    else:
        assert got != expected and got == pytest.approx(expected, rel=0.2)


def test_a_refused_run_without_out_leaves_no_run_directory(cli: Cli, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Without --out, the run's directory under runs/ was made before the data were checked, and a refused run left
    it behind holding only its lock file (three stray runs/<timestamp> folders in a reviewer's minute). A refused
    run now removes it, as it does a --out folder it made; a run that starts keeps its own."""
    monkeypatch.chdir(tmp_path)
    # the last one is refused before the run's lock is taken
    for refused in (["--set", "data.examples=1000000000000"], ["--set", "data.source=folder:/nonexistent"],
                    ["--backend", "local", "--workers", "5000"]):  # fmt: skip
        result = cli(*TRAIN, *refused)
        assert result.returncode == 2 and "downpour: error:" in result.stderr, result.stderr
        assert not (tmp_path / "runs").exists()  # nor the runs/ folder made for it
    assert cli(*TRAIN).returncode == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "summary.json").is_file()


@pytest.mark.parametrize("allocate", [
    lambda: torch.empty(2**50),  # torch: RuntimeError "DefaultCPUAllocator: can't allocate memory"
    lambda: np.empty(2**50, dtype=np.float32),  # numpy: _ArrayMemoryError, a MemoryError
])  # fmt: skip
def test_failed_allocations_are_one_line(cli: Cli, monkeypatch: pytest.MonkeyPatch,
                                         allocate: Callable[[], object]) -> None:  # fmt: skip
    monkeypatch.setattr(cli_mod, "_cmd_train", lambda args, console: allocate())
    err = _one_error_line(cli("train"), "out of memory: ", "reduce model.features / data.examples")
    assert "enforce fail" not in err


# ``downpour ARGS`` in a process whose address space ends {margin} bytes above what it has mapped after a first
# tiny run (which imports and maps everything the second one uses): the second run's first large allocation fails.
LIMITED_DRIVER = """import resource
import sys

from downpour.cli import main

tiny = ["--backend", "sim", "--steps", "2", "--no-progress", "--set", "data.source=digits", "--set",
        "data.held_out=256", "--set", "model.features=8"]
assert main(["train", "--out", sys.argv[1], *tiny]) == 0
with open("/proc/self/status") as status:
    mapped = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (mapped + {margin}, resource.getrlimit(resource.RLIMIT_AS)[1]))
raise SystemExit(main(sys.argv[2:]))
"""


def test_a_failed_allocation_of_megabytes_says_how_many(tmp_path: Path) -> None:
    """A real allocation failure in the command itself (not a worker): the 160000-feature model's 39 MiB weight
    does not fit in the 16 MiB left. The line says "could not allocate 39.1 MiB", not "0.0 GiB"."""
    driver = tmp_path / "driver.py"
    driver.write_text(LIMITED_DRIVER.format(margin=16 * 2**20))
    result = subprocess.run(
        [sys.executable, str(driver), str(tmp_path / "warm"), *TRAIN, "--out", str(tmp_path / "run"), "--set",
         "data.source=digits", "--set", "data.held_out=256", "--set", "model.features=160000"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(err) == 1, result.stderr
    assert re.fullmatch(r"downpour: error: out of memory: could not allocate [\d.]+ MiB \(reduce model\.features "
                        r"/ data\.examples / data\.image_size / train\.batch_size, or the size of the input\)",
                        err[0]), err[0]  # fmt: skip
    assert float(err[0].split("allocate ")[1].split()[0]) > 10


def test_other_runtime_errors_are_not_taken_for_memory(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(args: object, console: object) -> int:
        raise RuntimeError("a bug, not the input's fault")

    monkeypatch.setattr(cli_mod, "_cmd_train", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli("train")


# 4. detect --scale and --out


@pytest.mark.parametrize("scale", ["inf", "nan", "-1"])
def test_detect_needs_a_finite_positive_scale(cli: Cli, tmp_path: Path, picture: Path, scale: str) -> None:
    # checked before the run is read: no run directory is needed to be refused
    _one_error_line(cli("detect", str(tmp_path / "norun"), str(picture), "--scale", scale),
                    f"invalid --scale: {scale}", "finite number > 0")  # fmt: skip


def test_detect_refuses_a_scale_that_makes_a_huge_image(cli: Cli, tiny_run: Path, picture: Path) -> None:
    # a 40x40 picture: 250 times its side is 10,000
    _one_error_line(cli("detect", str(tiny_run), str(picture), "--scale", "1000000"),
                    "invalid --scale: 1e+06", "40000000x40000000 pixels", "at most 100 megapixels",
                    "--scale 250 or less fits")  # fmt: skip


@pytest.mark.parametrize(("height", "width"), [(12000, 12000), (1, 300_000_000), (7, 99_999_999)])
def test_the_scale_a_refusal_suggests_fits(height: int, width: int) -> None:
    """The hint assumed the area shrinks with the scale squared, which a side held at 1 pixel does not: for a
    1x300,000,000 picture it named 0.57, itself refused."""
    from downpour.eval.detect import scaled_size

    with pytest.raises(DownpourError, match=r"--scale ([0-9.]+) or less fits\)$") as refused:
        scaled_size(height, width, 1.0)
    fits = float(re.search(r"--scale ([0-9.]+) or less fits", str(refused.value)).group(1))
    rows, columns = scaled_size(height, width, fits)
    assert rows * columns <= 100e6 and fits > 0


def test_detect_checks_out_before_any_work(cli: Cli, tmp_path: Path, picture: Path) -> None:
    norun = str(tmp_path / "norun")  # the --out checks come first: no run directory is needed to be refused
    _one_error_line(cli("detect", norun, str(picture), "--out", str(tmp_path / "h.txt")),
                    f"invalid --out: {tmp_path / 'h.txt'}", ".png")  # fmt: skip
    _one_error_line(cli("detect", norun, str(picture), "--out", str(tmp_path / "missing" / "h.png")),
                    "does not exist")  # fmt: skip
    (tmp_path / "d.png").mkdir()
    _one_error_line(cli("detect", norun, str(picture), "--out", str(tmp_path / "d.png")), "is a directory")


def test_detect_still_writes_a_pdf_heat_map(cli: Cli, tiny_run: Path, picture: Path, tmp_path: Path) -> None:
    result = cli("detect", str(tiny_run), str(picture), "--out", str(tmp_path / "h.pdf"), "--scale", "0.5")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "h.pdf").read_bytes().startswith(b"%PDF")


# 5. bench ps --seconds, and --address without ray


@pytest.mark.parametrize("seconds", ["inf", "nan", "0", "1e-9"])
def test_bench_ps_needs_finite_positive_seconds(cli: Cli, seconds: str) -> None:
    """A window too short to hold work divided by zero (1e-9 s gave a ZeroDivisionError traceback)."""
    _one_error_line(cli("bench", "ps", "--seconds", seconds, "--rounds", "1"), "finite --seconds >= 0.1")


def test_bench_ps_refuses_an_address_without_ray(cli: Cli) -> None:
    _one_error_line(cli("bench", "ps", "--address", "10.0.0.1:6379"), "--address 10.0.0.1:6379", "--backend ray")


@pytest.mark.parametrize(
    ("command", "needles"),
    [(("bench", "ps", "--rounds", "0"), ("--rounds >= 1", "got 0.5 and 0")),
     (("bench", "layers", "--repeats", "0"), ("bench layers needs --repeats >= 1, got 0",)),
     (("bench", "layers", "--skip-steps", "-1"), ("bench layers needs --skip-steps >= 0, got -1",)),
     (("bench", "sim", "--workers", "0"), ("bench sim needs --workers, --steps and --repeats >= 1, got 0, 3000, 5",)),
     (("bench", "sim", "--steps", "0"), ("got 1000, 0, 5",)),
     (("bench", "sim", "--repeats", "0"), ("got 1000, 3000, 0",))],
)  # fmt: skip
def test_bench_counts_below_their_minimum_are_one_line(cli: Cli, command: tuple[str, ...],
                                                       needles: tuple[str, ...]) -> None:  # fmt: skip
    """A benchmark with no round, repeat or worker has nothing to report (a median of nothing, a division by 0)."""
    _one_error_line(cli(*command), *needles)


def test_resume_takes_neither_another_config_nor_another_out(cli: Cli, tmp_path: Path) -> None:
    """``--resume RUN_DIR`` reads RUN_DIR's config.toml and writes into RUN_DIR: a ``--config`` or an ``--out``
    elsewhere would be silently ignored, so each is refused (before RUN_DIR is even looked at)."""
    run, other = str(tmp_path / "run"), str(tmp_path / "other")
    _one_error_line(cli("train", "--resume", run, "--config", other), "--resume reads the run's own config.toml",
                    "drop --config")  # fmt: skip
    _one_error_line(cli("train", "--resume", run, "--out", other), "--resume continues RUN_DIR in place",
                    "drop --out")  # fmt: skip
    _one_error_line(cli("train", "--resume", run, "--out", run), str(tmp_path / "run"))  # the same: only not a run
    spelled_otherwise = str(tmp_path / "other" / ".." / "run")
    _one_error_line(cli("train", "--resume", run, "--out", spelled_otherwise), "not a run directory")


def test_a_shorthand_flag_and_a_set_of_its_key_must_agree(cli: Cli, tmp_path: Path) -> None:
    """``--steps 5 --set train.steps=7`` trained 5 steps without a word, whatever the order: which one was meant
    cannot be known, so two values are refused; the same value twice is not a disagreement."""
    out = str(tmp_path / "run")
    _one_error_line(cli(*TRAIN, "--set", "train.steps=7", "--out", out), "--steps 10 and --set train.steps=7 disagree")
    _one_error_line(cli("train", "--set", "cluster.workers=3", "--workers", "2", "--out", out),
                    "--workers 2 and --set cluster.workers=3 disagree: give one of them")  # fmt: skip
    _one_error_line(cli(*TRAIN, "--tensorboard", "--set", "train.tensorboard=false", "--out", out),
                    "--tensorboard and --set train.tensorboard=false disagree")  # fmt: skip
    assert not (tmp_path / "run").exists()
    # the same values, written otherwise
    same = ["--set", "train.steps=10", "--set", "cluster.backend='sim'", "--seconds", "600", "--set",
            "train.seconds=600.0"]  # fmt: skip
    assert cli(*TRAIN, *same, "--out", out).returncode == 0


def test_out_inside_a_run_is_refused_but_not_inside_other_folders(cli: Cli, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A new run inside another run's folder (it nested a whole run in another's checkpoint/) is refused, also as
    the default runs/<time> when the command runs there; a folder of another tool that happens to hold a
    config.toml and a checkpoint/ is no run; a link loop is the one-line error it was."""
    run = tmp_path / "run"
    assert cli(*TRAIN, "--out", str(run)).returncode == 0
    inside = run / "checkpoint" / "x"
    _one_error_line(cli(*TRAIN, "--out", str(inside)), f"--out {inside} is inside run {run}")
    monkeypatch.chdir(run)
    _one_error_line(cli(*TRAIN), f"the default --out runs/<time> is inside run {run}")
    assert not (run / "runs").exists()
    other = tmp_path / "project"
    (other / "checkpoint").mkdir(parents=True)
    (other / "config.toml").write_text("[model]\n")
    assert cli(*TRAIN, "--out", str(other / "experiments" / "a")).returncode == 0
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    _one_error_line(cli(*TRAIN, "--out", str(loop / "x")), "loop")


@pytest.mark.parametrize(("flag", "key"), [("--steps", "train.steps"), ("--seed", "train.seed"),
                                         ("--workers", "cluster.workers")])  # fmt: skip
def test_an_empty_shorthand_flag_is_refused_not_dropped(cli: Cli, tmp_path: Path, flag: str, key: str) -> None:
    """``--steps "$STEPS"`` with the variable unset sets the key to '' (refused, naming it), rather than being
    dropped as if the flag were not there and training with the default."""
    out = tmp_path / "run"
    _one_error_line(cli("train", flag, "", "--out", str(out), "--no-progress", "--backend", "sim"),
                    f"{key} must be an integer, got ''")  # fmt: skip
    assert not out.exists()


def test_viz_units_are_comma_separated_numbers(cli: Cli) -> None:
    """``--units`` takes unit numbers separated by commas, blanks and a trailing comma allowed; a list with no unit
    is refused as argparse refuses a bad value (exit 2, naming the option), before any run is read."""
    from downpour.cli_eval import _units

    assert _units("3") == [3] and _units("0, 2,") == [0, 2]
    result = cli("viz", "no-run", "--units", " , ")
    assert result.returncode == 2 and "argument --units: expected at least one unit, got ' , '" in result.stderr
    result = cli("viz", "no-run", "--units", "0,face")
    assert result.returncode == 2 and "expected comma-separated unit numbers, got '0,face'" in result.stderr


# 6. cluster.threads_per_worker


def test_threads_per_worker_is_capped(cli: Cli, tmp_path: Path) -> None:
    result = cli(*TRAIN, "--out", str(tmp_path / "run"), "--set", "cluster.threads_per_worker=100000")
    _one_error_line(result, "invalid cluster.threads_per_worker: 100000", "1024")


# 7. bench sim --workers


def test_bench_sim_refuses_more_workers_than_examples(cli: Cli) -> None:
    # 2000 is refused as surely as 1000000000 (which would allocate per worker for tens of GB before failing)
    _one_error_line(cli("bench", "sim", "--workers", "2000", "--steps", "10", "--repeats", "1"),
                    "invalid --workers: 2000", "training examples")  # fmt: skip


# 8. study designs


def test_study_designs_refuses_workers_up_front(cli: Cli, tmp_path: Path) -> None:
    result = cli("study", "designs", "--workers", "100000", "--out", str(tmp_path / "D"), "--no-progress")
    _one_error_line(result, "invalid --workers: 100000")
    assert not (tmp_path / "D").exists()  # no cell was started


def test_study_designs_fails_when_every_cell_failed(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from downpour.study import designs

    rows = [{"question": "q", "error": "invalid cluster.workers: 3"}, {"question": "q", "error": "boom"}]
    monkeypatch.setattr(designs, "run_designs_study",
                        lambda **kwargs: {"rows": rows, "table": "t", "answers": []})  # fmt: skip
    result = cli("study", "designs", "--out", str(tmp_path / "D"), "--no-progress")
    assert result.returncode == 1
    assert "all 2 runs of the study failed; the first: invalid cluster.workers: 3" in result.stderr
    rows[1] = {"question": "q"}  # one cell ran: the study is a (partial) result
    assert cli("study", "designs", "--out", str(tmp_path / "D"), "--no-progress").returncode == 0


# 9. data.held_out


def test_held_out_beyond_a_fifth_is_refused(cli: Cli, tmp_path: Path) -> None:
    result = cli(*TRAIN, "--out", str(tmp_path / "run"), "--set", "data.examples=2000", "--set", "data.held_out=1000")
    _one_error_line(result, "data.held_out = 1000 is more than a quarter of data.examples = 2000",
                    "at most 500 can be held out", "raise data.examples")  # (it said 600: refused too)  # fmt: skip


def test_the_default_held_out_is_still_capped_at_a_fifth() -> None:
    dataset = load_dataset(DataConfig(examples=2000, patch_size=8, whiten=False), seed=0)  # default held_out 1024
    assert (len(dataset.train), len(dataset.held_out)) == (2000, 2000 // 4)  # a fifth of all that is cut


# 10. cluster.workers = 0


def test_zero_workers_names_cluster_workers(cli: Cli, tmp_path: Path) -> None:
    err = _one_error_line(cli(*TRAIN, "--out", str(tmp_path / "run"), "--set", "cluster.workers=0"),
                          "invalid cluster.workers: 0 (must be at least 1)")  # fmt: skip
    assert "backup_workers" not in err


# 11. atomic writes name the user's path


def test_atomic_writes_name_the_users_path(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError) as exc:
        rundir.atomic_write_text(tmp_path, "x")
    assert exc.value.filename == str(tmp_path)
    missing = tmp_path / "missing" / "r.html"
    with pytest.raises(FileNotFoundError) as exc2:
        rundir.atomic_write_text(missing, "x")
    assert exc2.value.filename == str(missing)
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_atomic_writes_are_durable_before_they_replace_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An atomic write syncs its temporary file to disk before renaming it over the old one (a crash after the
    rename but before the data reached the disk would leave an empty or cut-off file in the old one's place), and
    the old file keeps its contents until the rename: the order of the calls is checked, not only the result."""
    path = tmp_path / "summary.json"
    path.write_text("old")
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync")
        assert path.read_text() == "old"  # not written over yet
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append("replace")
        assert Path(dst) == path and Path(src) != path and Path(src).read_text() == "new"
        real_replace(src, dst)

    monkeypatch.setattr(rundir.os, "fsync", fsync)
    monkeypatch.setattr(rundir.os, "replace", replace)
    rundir.atomic_write_text(path, "new")
    assert calls == ["fsync", "replace"]
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_report_out_errors_name_the_users_path(cli: Cli, tiny_run: Path, tmp_path: Path) -> None:
    err = _one_error_line(
        cli("report", str(tiny_run), "--out", str(tmp_path)), "exists and is not a file", str(tmp_path)
    )
    assert ".tmp-" not in err
    missing = tmp_path / "no" / "r.html"
    err = _one_error_line(cli("report", str(tiny_run), "--out", str(missing)), str(missing))
    assert ".tmp-" not in err


@pytest.mark.parametrize(("out", "why"), [(".", "is inside run"), ("/", "exists and is not a file"),
                                          ("..", "exists and is not a file")])  # fmt: skip
def test_report_out_that_names_no_file_is_one_line(
    cli: Cli, tiny_run: Path, out: str, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``.``, ``/`` and ``..`` have no file name to write (a traceback from ``Path.with_name`` before); ``.`` is
    the run itself here."""
    monkeypatch.chdir(tiny_run)
    before = sorted(path.name for path in tiny_run.iterdir())
    _one_error_line(cli("report", str(tiny_run), "--out", out), why, out)
    assert sorted(path.name for path in tiny_run.iterdir()) == before  # no temporary file left behind


@pytest.mark.parametrize("command", [
    ["train", "--steps", "1", "--out", ""], ["train", "--resume", ""], ["report", ""], ["report", "x", "--out", ""],
    ["eval", "probe", ""], ["detect", "x", ""], ["study", "optima", "--out", ""],
])  # fmt: skip
def test_an_empty_path_is_refused_not_taken_for_the_current_directory(cli: Cli, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      command: list[str]) -> None:  # fmt: skip
    """``Path("")`` is ``.``: an unset shell variable in ``--out "$RUN"`` wrote a whole run into the working
    directory. Every path argument refuses it, before anything is read or written."""
    monkeypatch.chdir(tmp_path)
    result = cli(*command)
    assert result.returncode == 2 and "an empty path" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


# 12. detect on a non-image or a directory; study --out an existing file


def test_detect_says_what_the_image_path_is(cli: Cli, tiny_run: Path, tmp_path: Path) -> None:
    text = tmp_path / "textfile.jpg"
    text.write_text("hello, not a picture\n")
    _one_error_line(cli("detect", str(tiny_run), str(text)), f"not an image: {text}")
    _one_error_line(cli("detect", str(tiny_run), str(tmp_path)), f"image {tmp_path} is a directory")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nno image data here")
    _one_error_line(cli("detect", str(tiny_run), str(broken)), "cannot read image")  # corrupt, not "not an image"


@pytest.mark.parametrize("study", [["optima"], ["designs"], ["staleness"]])
def test_study_out_must_not_be_a_file(cli: Cli, tmp_path: Path, study: list[str]) -> None:
    file = tmp_path / "report"
    file.write_text("mine\n")
    _one_error_line(cli("study", *study, "--out", str(file)), f"invalid --out: {file} is a file")
    assert file.read_text() == "mine\n"


def test_config_errors_stay_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"invalid cluster\.threads_per_worker"):
        config_mod.load(None, ["cluster.threads_per_worker=-1"])


# 13. keys that the design or source never reads


def test_design_only_keys_are_warned_of_when_ignored(cli: Cli, tmp_path: Path) -> None:
    result = cli(*TRAIN, "--out", str(tmp_path / "run"), "--set", "data.examples=300", "--set", "data.held_out=60",
                 "--set", "model.skip_variance=0.1", "--set", "model.stages=2", "--set", "model.pool=3",
                 "--set", "data.channels=3")  # fmt: skip
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert [line.split(";")[0] for line in warnings] == [
        "warning: model.stages applies only to model.name=cat",
        "warning: model.pool applies only to model.name=cat",
        "warning: model.skip_variance applies only to model.name=cat",
        "warning: data.channels applies only to data.source=natural-images and users' own pictures",
    ]


def test_source_only_keys_and_sim_shards_are_warned_of_when_ignored() -> None:
    """Data keys the chosen source never reads, and ps.shards on the simulator (one parameter vector), each get their
    line; the same keys where they are read get none."""
    ignored = config_mod.load(None, ["data.source=digits", "data.examples=500", "data.patch_size=12",
                                     "data.image_size=24", "data.frame_stride=3", "data.max_side=64",
                                     "data.cache_dir=/tmp/x", "cluster.backend=sim", "ps.shards=4"])  # fmt: skip
    assert [line.split(" applies")[0] for line in config_mod.ignored_keys(ignored)] == [
        "data.patch_size", "data.image_size", "data.examples", "data.frame_stride", "data.max_side", "data.cache_dir",
        "ps.shards",
    ]  # fmt: skip
    assert config_mod.ignored_keys(ignored)[-1] == ("ps.shards applies only to the local and Ray backends (the "
                                                    "simulator keeps one parameter vector); ignored (ps.shards = 4 "
                                                    "with cluster.backend = 'sim')")  # fmt: skip
    read = {
        "natural-patches": ["data.examples=500", "data.patch_size=12"],
        "natural-images": ["data.examples=500", "data.image_size=24", "data.channels=3"],
        "video:clips": ["data.examples=500", "data.image_size=24", "data.frame_stride=3", "data.max_side=64"],
        "folder:pictures": ["data.examples=500", "data.image_size=24", "data.max_side=64"],
        "torchvision:CIFAR10": ["data.examples=500", "data.image_size=24", "data.cache_dir=/tmp/x"],
    }
    for source, keys in read.items():
        assert config_mod.ignored_keys(config_mod.load(None, [f"data.source={source}", *keys, "ps.shards=4"])) == []


def test_backend_and_policy_only_keys_are_warned_of_when_ignored() -> None:
    """The simulator's cluster.sim_* keys on another backend, train.eval_every on the simulator, and a policy's own
    key (ps.staleness_bound, ...) under another policy each get their line; where they are read, none."""
    ignored = config_mod.load(None, ["cluster.sim_stragglers=0.5", "cluster.sim_network_mean=0.1",
                                     "ps.staleness_bound=5", "ps.backup_workers=1", "ps.dc_lambda=0.1",
                                     "ps.easgd_tau=8"])  # fmt: skip
    lines = config_mod.ignored_keys(ignored)
    assert [line.split(" applies")[0] for line in lines] == [
        "cluster.sim_stragglers", "cluster.sim_network_mean", "ps.staleness_bound", "ps.backup_workers",
        "ps.dc_lambda", "ps.easgd_tau",
    ]  # fmt: skip
    assert lines[2] == ("ps.staleness_bound applies only to ps.policy = 'ssp'; ignored (ps.staleness_bound = 5 with "
                        "ps.policy = 'downpour')")  # fmt: skip
    sim = config_mod.load(None, ["cluster.backend=sim", "train.eval_every=2", "cluster.sim_stragglers=0.5"])
    assert [line.split(" applies")[0] for line in config_mod.ignored_keys(sim)] == ["train.eval_every"]
    for policy, key in [("ssp", "ps.staleness_bound=5"), ("sync", "ps.backup_workers=1"),
                        ("dc-asgd", "ps.dc_lambda=0.1"), ("easgd", "ps.easgd_tau=8")]:  # fmt: skip
        assert config_mod.ignored_keys(config_mod.load(None, [f"ps.policy={policy}", key])) == []


def test_keys_the_design_reads_are_not_warned_of() -> None:
    cat = config_mod.load(None, ["model.name=cat", "model.pool=3", "model.skip_variance=0.1", "data.channels=3"])
    assert config_mod.ignored_keys(cat) == []
    conv = config_mod.load(None, ["model.name=conv"])  # its design default model.receptive_field = 8 is read
    assert config_mod.ignored_keys(conv) == []
    for read in (["model.sparsity=0.3"], ["model.name=cat", "model.sparsity=0.3"], ["model.features=16"],
                 ["ps.rule=adagrad", "ps.adagrad_eps=1e-6"], ["ps.policy=sync", "ps.rule=sgd"]):  # fmt: skip
        assert config_mod.ignored_keys(config_mod.load(None, read)) == [], read


@pytest.mark.parametrize(
    ("settings", "line"),
    [
        (
            ["model.name=cat", "model.features=64"],
            "model.features applies only to model.name=rica or sparse-ae or "
            "rbm or conv; ignored (model.features = 64 with model.name = 'cat')",
        ),
        (
            ["model.name=sparse-ae", "model.sparsity=0.5"],
            "model.sparsity is λ of the rica penalty that rica, conv, cat "
            "use by default; ignored (model.name = 'sparse-ae' has another default penalty; model.sparsity = 0.5)",
        ),
        (["model.name=rbm", "model.sparsity=0.5"], "(model.name = 'rbm' has another default penalty"),
        (
            ["model.penalty=l1:0.2", "model.sparsity=0.7"],
            "ignored (model.penalty = 'l1:0.2' names the penalty; model.sparsity = 0.7)",
        ),
        (
            ["ps.policy=easgd", "ps.rule=sgd"],
            "ps.rule is the shards' update rule, which easgd's elastic exchange "
            "replaces; ignored (ps.rule = 'sgd' with ps.policy = 'easgd')",
        ),
        (
            ["ps.rule=sgd", "ps.adagrad_eps=1e-6"],
            "ps.adagrad_eps applies only to ps.rule = 'adagrad'; ignored "
            "(ps.adagrad_eps = 1e-06 with ps.rule = 'sgd', ps.policy = 'downpour')",
        ),
    ],
)
def test_model_and_rule_keys_no_part_reads_are_warned_of(settings: list[str], line: str) -> None:
    """Keys the README promised a warning for, which had none (a bug hunt and a README audit found them): the cat
    network's width is model.maps, model.sparsity only weighs the default rica penalty, easgd uses no ps.rule."""
    lines = config_mod.ignored_keys(config_mod.load(None, settings))
    assert len(lines) == 1 and line in lines[0], lines


@pytest.mark.parametrize("command", [("train", "--seconds", "1"), ("bench", "layers"), ("study", "optima")])
def test_a_bad_autotune_switch_is_refused_before_anything_runs(cli: Cli, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               command: tuple[str, ...]) -> None:  # fmt: skip
    """``DOWNPOUR_TRITON_AUTOTUNE`` is read by the CUDA kernels, deep inside a run: a typo is refused in one line at
    the start, on any machine, and nothing is written."""
    monkeypatch.setenv("DOWNPOUR_TRITON_AUTOTUNE", "yes")
    out = tmp_path / "run"
    result = cli(*command, "--out", str(out)) if command[0] != "bench" else cli(*command)
    assert result.returncode == 2
    assert result.stderr.strip() == "downpour: error: DOWNPOUR_TRITON_AUTOTUNE must be 0 (off) or 1 (on), got 'yes'"
    assert not out.exists()


def test_a_full_disk_while_saving_tensors_is_an_os_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """safetensors reports its writer's I/O errors as its own exception type; a full disk must reach the command's
    one-line error like any OSError (it was a traceback), and leave no temporary file behind."""
    import errno

    import safetensors.torch
    from safetensors import SafetensorError

    from downpour import rundir

    def full(tensors: object, filename: str) -> None:
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    target = tmp_path / "weights.safetensors"
    with pytest.raises(OSError) as error:
        rundir.save_tensors({"w": torch.zeros(2)}, target)
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


def test_ray_missing_is_one_line_before_anything_is_written(
    tmp_path: Path, cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without Ray (the ``[ray]`` extra), ``train --backend ray`` is refused before the run directory is made (it
    used to load the data and leave config.toml, metrics.jsonl and whitening behind), and ``bench ps --backend ray``
    says the same in one line instead of a ModuleNotFoundError traceback."""
    monkeypatch.setitem(sys.modules, "ray", None)  # as where Ray is not installed: find_spec and import fail
    out = tmp_path / "run"
    refused = cli("train", "--backend", "ray", "--steps", "5", "--out", str(out), "--no-progress")
    assert refused.returncode == 2
    assert "cluster.backend = \"ray\" needs Ray: pip install 'downpour-sgd[ray]'" in refused.stderr
    assert not out.exists()
    bench = cli("bench", "ps", "--backend", "ray", "--seconds", "0.1", "--rounds", "1")
    assert bench.returncode == 2 and "Traceback" not in bench.stderr
    assert "bench ps --backend ray needs Ray: pip install 'downpour-sgd[ray]'" in bench.stderr


# 14. detect reads a picture's size from its header: a huge one is refused, or shrunk as it is decoded


def _blank_png(path: Path, width: int, height: int) -> None:
    """A black 8-bit gray PNG of ``width`` x ``height``, written a block of rows at a time: a 144-megapixel picture
    in 0.6 MB of file, without ever holding it in memory."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, rows = zlib.compressobj(1), bytes((width + 1) * 500)  # each row: filter byte 0, then its pixels
    with open(path, "wb") as out:
        out.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)))
        body = b"".join(packer.compress(rows[: (width + 1) * min(500, height - top)]) for top in range(0, height, 500))
        out.write(chunk(b"IDAT", body + packer.flush()) + chunk(b"IEND", b""))


# ``downpour detect`` on a small picture (so that everything the command imports and loads is in the baseline), then
# twice on a huge one; the peak memory (bytes) before and after each of those two.
PEAK_DRIVER = """import json
import resource
import sys

from downpour.cli import main


def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


run, small, huge, out = sys.argv[1:]
assert main(["detect", run, small, "--out", out]) == 0
before = peak()
refused = main(["detect", run, huge])
after_refusal = peak()
scanned = main(["detect", run, huge, "--scale", "0.1", "--out", out, "--json"])
print("PEAKS", json.dumps([refused, scanned, before, after_refusal, peak()]))
"""


def test_detect_refuses_a_huge_picture_unread_and_shrinks_one_as_decoded(tiny_run: Path, picture: Path,
                                                                          tmp_path: Path) -> None:  # fmt: skip
    """A 12000x12000 gray PNG (144 megapixels, 0.6 MB): at --scale 1 it is refused from its header, before a pixel
    is decoded (a 20000x20000 one took 24 s and 3.9 GB to be refused); at --scale 0.1 it is decoded once as stored
    (144 MB) and averaged down to 1200x1200 at once, never turned into 576 MB float copies (a 31600x31600 one ran
    out of memory at a legal --scale 0.1)."""
    huge, driver = tmp_path / "huge.png", tmp_path / "driver.py"
    _blank_png(huge, 12000, 12000)
    driver.write_text(PEAK_DRIVER)
    result = subprocess.run(
        [sys.executable, str(driver), str(tiny_run), str(picture), str(huge), str(tmp_path / "heat.png")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert "PEAKS " in result.stdout, result.stderr
    _, _, rest = result.stdout.partition("\n")  # the small picture's line, then the JSON of the scan
    shown, _, peaks = rest.rpartition("PEAKS ")
    refused, scanned, before, after_refusal, after_scan = json.loads(peaks)
    err = result.stderr.strip()
    assert (refused, scanned) == (2, 0), result.stderr
    assert len(err.splitlines()) == 1, err
    assert err.startswith("downpour: error: invalid --scale: 1 (the 12000x12000 image would become 12000x12000 "
                          "pixels; at most 100 megapixels are scanned: --scale 0.83 or less fits)"), err  # fmt: skip
    assert after_refusal - before < 64 * 2**20, (before, after_refusal)  # nothing decoded
    assert after_scan - before < 2**30, (before, after_scan)
    assert json.loads(shown)["image_shape"] == [1, 1200, 1200]


def test_pictures_decoded_reduced_are_the_pictures_shrunk(tmp_path: Path) -> None:
    """What detect scans at --scale 0.25 of a PNG (gray, colour, palette, 16-bit) and of a JPEG stored sideways
    (EXIF orientation 6) is the picture read whole and then shrunk, within a few grey levels, and upright."""
    from PIL import Image
    from skimage import data

    from downpour.eval.images import fit_images, read_image

    astronaut = data.astronaut()[:, :480]  # (512, 480, 3): not square, so a turn would show
    pictures = {"gray.png": Image.fromarray(astronaut[..., 1]), "colour.png": Image.fromarray(astronaut),
                "palette.png": Image.fromarray(astronaut).convert("P"),
                "deep.png": Image.fromarray(astronaut[..., 0].astype(np.uint16) * 257)}  # fmt: skip
    for name, image in pictures.items():
        image.save(tmp_path / name)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter left: shown turned right, 512 wide and 480 high
    Image.fromarray(np.ascontiguousarray(np.rot90(astronaut))).save(tmp_path / "side.jpg", exif=exif, quality=95)
    for name in (*pictures, "side.jpg"):
        for channels in (1, 3):
            whole = read_image(tmp_path / name, channels)
            assert whole.shape[1:] == (512, 480), name
            wanted = (channels, 128, 120)
            reduced = read_image(tmp_path / name, channels, size=lambda h, w: (round(h / 4), round(w / 4)))
            assert reduced.shape == wanted, (name, reduced.shape)
            assert np.abs(reduced - fit_images(whole[None], wanted)[0]).mean() < 4 / 255, name


# 15. detect on a float picture with NaN pixels


def test_detect_maps_a_float_picture_with_nan_pixels_to_finite_responses(cli: Cli, tiny_run: Path,
                                                                         tmp_path: Path) -> None:  # fmt: skip
    """A float gray TIFF (Pillow's "F" mode) with a block of NaN pixels is scanned as black there: every response
    of the map is finite, and its maximum is where the command says."""
    from PIL import Image

    from downpour.eval.detect import response_map
    from downpour.eval.images import read_image
    from downpour.runs import load_run

    values = np.random.default_rng(0).random((48, 48)).astype(np.float32) * 255
    values[10:30, 10:30] = np.nan
    tiff = tmp_path / "nan.tif"
    Image.fromarray(values, mode="F").save(tiff)
    result = cli("detect", str(tiny_run), str(tiff), "--stride", "2", "--out", str(tmp_path / "heat.png"), "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    image = read_image(tiff, 1)
    assert np.isfinite(image).all() and (image[0, 10:30, 10:30] == 0).all()
    responses = response_map(load_run(tiny_run), image, shown["unit"], stride=2)
    assert responses.shape == tuple(shown["map_shape"]) and np.isfinite(responses).all()
    assert shown["max_response_at"] == [int(v) * 2 for v in np.unravel_index(responses.argmax(), responses.shape)]


# 16. paths that look like rich markup


def test_paths_with_brackets_are_shown_as_they_are(cli: Cli, tiny_run: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """``mk[/]x`` ended ``eval probe`` in a MarkupError (exit 1, after its JSON was written) and ``runs/[v2]`` showed
    as ``runs/`` in the table's title; a study interrupted with such an ``--out`` said so through rich markup too."""
    from downpour.cli_study import _says_what_was_kept

    monkeypatch.chdir(tmp_path)
    for name in ("mk[/]x", "runs/[v2]"):
        shutil.copytree(tiny_run, name)
        result = cli("eval", "probe", name)
        assert result.returncode == 0, result.stderr
        assert f"linear probe on digits: {name} (rica)" in result.stdout, result.stdout
    console = Console(record=True, width=200)
    with pytest.raises(KeyboardInterrupt), _says_what_was_kept(console, Path("out[/]x"), "rerun it"):
        raise KeyboardInterrupt
    assert "nothing was written into out[/]x" in console.export_text()


# 17. JSON and TOML nested past Python's recursion limit


def test_input_nested_too_deeply_is_one_line_naming_it(cli: Cli, tiny_run: Path, tmp_path: Path) -> None:
    """``[[[...]]]`` 500 deep in a --set value or a config file, or 100,000 deep in a run's state.json or
    summary.json, was a 3,000-line RecursionError traceback (a RuntimeError, and not one of memory)."""
    deep_toml, deep_json = "[" * 500 + "]" * 500, "[" * 100_000 + "]" * 100_000
    _one_error_line(cli(*TRAIN, "--out", str(tmp_path / "a"), "--set", f"data.source={deep_toml}"),
                    "invalid data.source: its value nests too deeply to read")  # fmt: skip
    config = tmp_path / "deep.toml"
    config.write_text(f"[data]\nsource = {deep_toml}\n")
    _one_error_line(cli(*TRAIN, "--out", str(tmp_path / "b"), "--config", str(config)),
                    f"config file {config} is not valid TOML: it nests too deeply to read")  # fmt: skip
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "checkpoint" / "state.json").write_text(deep_json)
    _one_error_line(cli("eval", "probe", str(run)),
                    f"corrupt checkpoint file {run / 'checkpoint' / 'state.json'}: it nests too deeply")  # fmt: skip
    shutil.rmtree(run)
    shutil.copytree(tiny_run, run)
    (run / "summary.json").write_text(deep_json)  # the report says so on the page, as of any unreadable JSON
    with open(run / "metrics.jsonl", "a") as metrics:
        metrics.write(deep_json + "\n")
    result = cli("report", str(run))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    page = (run / "report.html").read_text()
    assert "could not read summary.json: it nests too deeply to read" in page
    assert "1 line of metrics.jsonl could not be read" in page


def test_recursion_errors_of_bugs_are_not_taken_for_deep_input(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(args: object, console: object) -> int:
        return bug(args, console)

    monkeypatch.setattr(cli_mod, "_cmd_train", bug)
    with pytest.raises(RecursionError):
        cli("train")


# 18. a checkpoint's state.json that is there but no file; --out where no file can be made; a huge --scale


@pytest.mark.parametrize("kind", ["directory", "loop"])
def test_a_state_json_that_is_no_file_is_not_called_missing(cli: Cli, tiny_run: Path, tmp_path: Path,
                                                            kind: str) -> None:  # fmt: skip
    """A ``state.json`` that is a directory or a link in a loop was reported as "missing (deleted or moved)"."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    state = run / "checkpoint" / "state.json"
    state.unlink()
    if kind == "directory":
        state.mkdir()
    else:
        state.symlink_to("state.json")
    said = "is a directory, not a file" if kind == "directory" else "is a link in a loop that never reaches a file"
    for command in (["train", "--resume", str(run), "--no-progress"], [*TRAIN, "--out", str(run)],
                    ["eval", "probe", str(run)]):  # fmt: skip
        result = cli(*command)
        err = result.stderr.strip().splitlines()[-1]  # after the warnings a resume gives of the run's config
        assert result.returncode == 2 and err.startswith("downpour: error: ") and f"{state} {said}" in err, err
        assert "missing" not in err and "Traceback" not in result.stderr, err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs a /proc file system")
def test_an_out_where_no_file_can_be_made_is_not_said_to_disappear(cli: Cli) -> None:
    err = _one_error_line(cli(*TRAIN, "--out", "/proc/self"), "run directory /proc/self cannot hold a run",
                          "its lock file /proc/self/.lock cannot be created")  # fmt: skip
    assert "disappearing" not in err


def test_detect_says_a_huge_scale_in_a_few_digits(cli: Cli, tiny_run: Path, picture: Path) -> None:
    err = _one_error_line(cli("detect", str(tiny_run), str(picture), "--scale", "1e300"),
                          "invalid --scale: 1e+300 (the 40x40 image would become 4e+301x4e+301 pixels")  # fmt: skip
    assert len(err) < 200, err
    _one_error_line(cli("detect", str(tiny_run), str(picture), "--scale", "1e308"),
                    "the 40x40 image would become too large to count")  # fmt: skip
