"""``downpour study staleness`` (through the real command, in a subprocess) and ``downpour study optima`` and the
flag checks (in this process, through ``cli.main``)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import CliResult, downpour


def test_study_staleness_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "study"
    result = downpour("study", "staleness", "--policies", "downpour,staleness-lr", "--workers", "1,16", "--seeds", "2",
                      "--steps", "300", "--no-progress", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "| staleness-lr | 16 |" in result.stdout
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert len(runs) == 2 * 2 * 2
    for name in ("loss_vs_updates.png", "loss_vs_time.png", "staleness_histograms.png", "final_loss.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_study_optima_answers_with_a_test(tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    out = tmp_path / "optima"
    result = cli("study", "optima", "--workers", "8", "--seeds", "6", "--steps", "300", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "McNemar p=" in result.stdout
    report = json.loads((out / "optima.json").read_text())
    assert report["settings"]["workers"] == 8 and report["answer"] in result.stdout


def test_study_flags_are_checked(tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    bad = cli("study", "staleness", "--workers", "0,8", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "invalid --workers: '0'" in bad.stderr
    bad = cli("study", "optima", "--seeds", "0", "--out", str(tmp_path / "y"))
    assert bad.returncode == 2 and "invalid --seeds: 0" in bad.stderr
    bad = cli("study", "optima", "--first-seed", "-1", "--out", str(tmp_path / "y"))
    assert bad.returncode == 2 and "invalid --first-seed: -1 (must be >= 0)" in bad.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    bad = cli(
        "study",
        "staleness",
        "--backend",
        "local",
        "--policies",
        "downpour,ssp",
        "--workers",
        "2",
        "--set",
        "ps.n_fetch=2",
        "--out",
        str(tmp_path / "t"),
    )  # the ssp runs would refuse it after downpour's had run
    assert bad.returncode == 2 and "invalid ps.n_fetch: 2 (ssp bounds staleness" in bad.stderr
    assert not (tmp_path / "t").exists()
    bad = cli("study", "staleness", "--steps", "0", "--policies", "downpour", "--out", str(tmp_path / "u"))
    assert bad.returncode == 2 and "invalid --steps: 0" in bad.stderr
    assert "study" not in bad.stdout + bad.stderr.replace("downpour: error", "")  # no bar drawn before the error
    bad = cli("study", "staleness", "--set", "cluster.backend=ray", "--out", str(tmp_path / "z"))  # ran on sim
    assert bad.returncode == 2 and "cluster.backend = 'ray' is not how this study chooses" in bad.stderr
    assert "pass --backend" in bad.stderr and not (tmp_path / "z").exists()
    # the study's default config already says "local": named by hand, it must still agree with --backend (sim)
    bad = cli("study", "staleness", "--set", "cluster.backend=local", "--out", str(tmp_path / "w"))
    assert bad.returncode == 2 and "cluster.backend = 'local' is not how" in bad.stderr and "now sim" in bad.stderr
    config = tmp_path / "study.toml"
    config.write_text('[cluster]\nbackend = "local"\n')
    bad = cli("study", "staleness", "--config", str(config), "--out", str(tmp_path / "v"))
    assert bad.returncode == 2 and "cluster.backend = 'local' is not how" in bad.stderr
    for setting, flag in (("ps.policy=sync", "--policies"), ("cluster.workers=7", "--workers")):  # ran the grid's
        bad = cli("study", "staleness", "--set", setting, "--out", str(tmp_path / "g"))  # and recorded these
        assert bad.returncode == 2 and f"is set per run by the study's grid: pass {flag} instead" in bad.stderr
    bad = cli("study", "staleness", "--set", "train.seconds=5", "--out", str(tmp_path / "g"))  # was dropped unsaid
    assert bad.returncode == 2 and "train.seconds is not this study's budget: every run computes --steps" in bad.stderr
    config.write_text("[cluster]\nworkers = 7\n")
    bad = cli("study", "staleness", "--config", str(config), "--out", str(tmp_path / "g"))
    assert bad.returncode == 2 and "cluster.workers is set per run" in bad.stderr and not (tmp_path / "g").exists()
    for study in ("staleness", "optima", "designs"):  # found after the whole study had run
        bad = cli("study", study, "--out", str(config / "report"))
        assert bad.returncode == 2 and f"cannot be made: {config} is a file, not a directory" in bad.stderr
        bad = cli("study", study, "--out", "/proc/nope/report")  # root passes os.access there; mkdir fails
        assert bad.returncode == 2 and "invalid --out: /proc/nope/report cannot be" in bad.stderr, bad.stderr
    assert not (tmp_path / "g").exists()  # trying to make a folder leaves none behind


def test_a_study_does_not_replace_another_ones_results(tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    """A staleness or optima study rerun into its --out with the same settings repeats it; with other settings,
    or into another study's folder, it is refused before any run (it replaced the earlier results silently)."""
    out = tmp_path / "study"
    grid = ["--policies", "downpour", "--workers", "1,2", "--seeds", "1", "--no-progress", "--out", str(out)]
    assert cli("study", "staleness", "--steps", "40", *grid).returncode == 0
    before = (out / "results.json").read_text()
    assert cli("study", "staleness", "--steps", "40", *grid).returncode == 0  # the same settings: repeated
    written = json.loads((out / "results.json").read_text())
    written["config"]["cluster"]["backend"] = "local"  # as results written before the backend was recorded there
    (out / "results.json").write_text(json.dumps(written))
    assert cli("study", "staleness", "--steps", "40", *grid).returncode == 0  # still the same settings
    other = cli("study", "staleness", "--steps", "50", *grid)
    assert other.returncode == 2 and "holds the results of another study or of other settings" in other.stderr
    assert json.loads((out / "results.json").read_text())["grid"] == json.loads(before)["grid"]
    optima = ["--workers", "4", "--seeds", "2", "--steps", "40", "--out", str(tmp_path / "optima")]
    assert cli("study", "optima", *optima).returncode == 0
    replication = cli("study", "optima", *optima, "--first-seed", "5")
    assert replication.returncode == 2 and "(optima.json): use another --out" in replication.stderr
    (tmp_path / "designs").mkdir()
    (tmp_path / "designs" / "results.json").write_text('{"setup": {}, "rows": []}')  # a designs study's
    bad = cli("study", "staleness", "--steps", "40", *grid[:-1], str(tmp_path / "designs"))
    assert bad.returncode == 2 and "another study" in bad.stderr
    # studies that keep their results in different files refused each other only by luck (a reviewer's staleness
    # study wrote its results beside an optima study's, and the other way round)
    bad = cli("study", "staleness", "--steps", "40", *grid[:-1], str(tmp_path / "optima"))
    assert bad.returncode == 2 and "holds the results of another kind of study (optima.json)" in bad.stderr
    bad = cli("study", "optima", "--workers", "4", "--seeds", "2", "--steps", "40", "--out", str(out))
    assert bad.returncode == 2 and "holds the results of another kind of study (results.json)" in bad.stderr
    assert not (tmp_path / "optima" / "results.json").exists() and not (out / "optima.json").exists()


def test_ctrl_c_while_repeating_a_study_keeps_the_complete_one(tmp_path: Path, cli: Callable[..., CliResult],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Ctrl-C during a repeat of a finished study (same settings) leaves its complete results as they were (they
    were replaced by the repeat's few runs); Ctrl-C before any run of a new study says nothing was written. A
    config file with a byte-order mark is read (its keys were read again without it: a TOML traceback)."""
    from downpour.study import staleness

    config = tmp_path / "bom.toml"
    config.write_bytes(b"\xef\xbb\xbf[ps]\nlr = 0.03\n")
    out = tmp_path / "study"
    grid = ["--config", str(config), "--policies", "downpour", "--workers", "1,2", "--seeds", "2", "--steps", "30",
            "--no-progress", "--out", str(out)]  # fmt: skip
    assert cli("study", "staleness", *grid).returncode == 0
    complete = (out / "results.json").read_text()
    real_run, calls = staleness._one_run, []

    def ctrl_c_on_the_third(*args: object, **kwargs: object) -> dict:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_run(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(staleness, "_one_run", ctrl_c_on_the_third)
    repeat = cli("study", "staleness", *grid)
    assert repeat.returncode == 130
    assert (out / "results.json").read_text() == complete
    assert "keeps the earlier complete study" in " ".join(repeat.stderr.split())
    calls[:] = [1, 1]  # the next call is the third again: the first run of a new study
    fresh = cli("study", "staleness", *grid[:-1], str(tmp_path / "fresh"))
    assert fresh.returncode == 130 and "nothing was written" in " ".join(fresh.stderr.split())


def test_optima_json_is_strict_json(tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    """With one seed the odds ratio is NaN: --json printed ``NaN``, which strict parsers refuse; now null."""
    result = cli("study", "optima", "--workers", "1", "--seeds", "1", "--steps", "10", "--json", "--out",
                 str(tmp_path / "o"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    strict = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} in --json output"))
    assert "odds_ratio" in json.dumps(strict)


def test_help_names_every_study_and_each_options_default(cli: Callable[..., CliResult]) -> None:
    """--help is where a user looks first: it names every study, shows defaults (they were only in the README),
    and no reST ``marks``."""
    study = cli("study", "--help")
    assert study.returncode == 0 and "designs comparison" in " ".join(study.stdout.split()) and "``" not in study.stdout
    assert "(default: [])" not in cli("train", "--help").stdout  # --set, repeatable, has nothing to name
    bench = cli("bench", "sim", "--help")
    assert "(default: 1000)" in " ".join(bench.stdout.split()) and "(default: 3000)" in " ".join(bench.stdout.split())
    face = " ".join(cli("eval", "face-neuron", "--help").stdout.split())
    assert "(default: 10)" in face and "(default: 0)" in face and "--json print the result as JSON" in face
    detect = " ".join(cli("detect", "--help").stdout.split())
    assert "picture to write, by its suffix: .png, .pdf, .svg" in detect and "(default: 1.0)" in detect
    layers = " ".join(cli("bench", "layers", "--help").stdout.split())
    assert "(default: 5)" in layers and "(default: 150)" in layers
    assert "(default: False)" not in layers  # --json, --no-memory: flags, off unless given


def test_ctrl_c_in_the_optima_study_says_what_was_kept(tmp_path: Path, cli: Callable[..., CliResult],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Ctrl-C after the first of the two default arms: exit 130, nothing to compare, and the command says so (it
    said nothing)."""
    from downpour.study import optima

    real, calls = optima._run_arm, []

    def run_arm(*args: object, **kwargs: object) -> dict:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(optima, "_run_arm", run_arm)
    out = tmp_path / "optima"
    result = cli("study", "optima", "--workers", "4", "--seeds", "2", "--steps", "40", "--out", str(out))
    assert result.returncode == 130, result.stderr
    assert "interrupted before two arms finished: nothing was written into" in " ".join(result.stderr.split())
    assert not (out / "optima.json").exists()


def test_a_study_out_in_a_folder_it_cannot_write_is_refused_up_front(
    tmp_path: Path, cli: Callable[..., CliResult]
) -> None:
    """An --out under an existing folder this process may not write is refused before any run, rather than when the
    report is written after the whole study: a read-only folder, or for root (whom modes do not stop) ``/proc/sys``."""
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    if os.access(folder, os.W_OK | os.X_OK):
        folder = Path("/proc/sys")
    if not folder.is_dir() or os.access(folder, os.W_OK | os.X_OK):
        pytest.skip("no folder here that this process may not write")
    out = folder / "report"
    bad = cli("study", "optima", "--seeds", "1", "--out", str(out))
    assert bad.returncode == 2
    assert f"invalid --out: {out} cannot be written: {folder} is not writable" in bad.stderr


@pytest.mark.parametrize(
    ("study", "argv", "message"),
    [
        ("optima", ["--steps", "10"], "invalid --steps: 10 (fewer than 64 pushes, one round of sync at --workers 64"),
        ("optima", ["--workers", "5000"], "invalid --steps: 4000 (fewer than 5000 pushes, one round of sync at "),
        ("optima", ["--steps", "0"], "invalid --steps: 0"),
        ("optima", ["--workers", "-1"], "invalid --workers: -1"),
        ("optima", ["--seeds", "0"], "invalid --seeds: 0"),
        ("optima", ["--first-seed", "-1"], "invalid --first-seed: -1"),
        ("staleness", ["--steps", "0"], "invalid --steps: 0"),
        ("staleness", ["--seeds", "0"], "invalid --seeds: '0'"),
        ("staleness", ["--workers", "1,x"], "invalid --workers: 'x'"),
        ("staleness", ["--policies", "nope"], "invalid --policies: 'nope'"),
        ("designs", ["--steps", "0"], "invalid --steps: 0"),
        ("designs", ["--seconds", "-1"], "invalid --seconds: -1.0"),
        ("designs", ["--workers", "0"], "invalid --workers: 0"),
        ("designs", ["--seed", "-1"], "invalid --seed: -1"),
    ],
)
def test_a_bad_study_flag_is_named_as_typed(
    tmp_path: Path, cli: Callable[..., CliResult], study: str, argv: list[str], message: str
) -> None:
    """Every study's bad flag is refused in one line that names the flag the user typed (``--steps``), not the
    parameter it becomes inside (optima's too few steps for one round of sync said ``invalid steps``), before any run
    and before --out is made."""
    out = tmp_path / "out"
    bad = cli("study", study, *argv, *(["--no-progress"] if study != "optima" else []), "--out", str(out))
    assert bad.returncode == 2 and bad.stdout == ""
    assert f"downpour: error: {message}" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert not out.exists()
