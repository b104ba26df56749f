"""What a resume trusts and what a session may overwrite: a corrupt, non-finite or nonsensical checkpoint is refused
before anything in the run directory is written, and a diverged session never replaces a good checkpoint.

Every test works on a copy of one real finished run (``base_run``), edited on disk the way a user, a bad disk or a
bad learning rate would."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import CliResult, read_jsonl
from downpour import checkpoint as ckpt
from downpour.cli import main
from downpour.data import load_dataset
from downpour.errors import CheckpointError, DownpourError
from downpour.ps.rules import make_rule
from downpour.ps.shard import Shard

TINY = ["--set", "data.examples=2000", "--set", "data.held_out=256", "--no-progress"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 20-step run (two shards, Adagrad): copy it before changing it."""
    run_dir = tmp_path_factory.mktemp("integrity") / "run"
    assert main(["train", "--steps", "20", "--seconds", "600", "--out", str(run_dir), *TINY]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["diverged"] is False and summary["checkpoint_step"] == summary["steps"] == 20
    assert math.isfinite(summary["final_loss"])
    return run_dir


@pytest.fixture
def run(base_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


def _files(run_dir: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def _state_path(run_dir: Path) -> Path:
    return run_dir / "checkpoint" / "state.json"


def _edit_state(run_dir: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    state = json.loads(_state_path(run_dir).read_text())
    edit(state)
    _state_path(run_dir).write_text(json.dumps(state))  # a NaN float becomes the bare NaN token json.loads takes


def _params_path(run_dir: Path) -> Path:
    return run_dir / "checkpoint" / json.loads(_state_path(run_dir).read_text())["params_file"]


def _refused(cli: Callable[..., CliResult], run_dir: Path, *expected: str) -> None:
    """``--resume`` (with a config change, so that a written config.toml would differ) is a one-line error naming
    what is wrong (exit 2), and every file of the run is byte-identical afterwards."""
    files = _files(run_dir)
    result = cli("train", "--resume", str(run_dir), "--steps", "40", "--set", "ps.lr=0.03", "--no-progress")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    changed = sorted(str(p.relative_to(run_dir)) for p in set(files) | set(_files(run_dir))
                     if files.get(p) != (p.read_bytes() if p.exists() else None))  # fmt: skip
    assert not changed, f"{changed} changed; {result.stderr}"
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    message = " ".join(result.stderr.split())
    for text in expected:
        assert text in message, message


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit setting the dotted ``path`` (list indices as numbers) of state.json to ``value``."""

    def edit(state: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = state
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value

    return edit


def _drop_version(state: dict[str, Any]) -> None:
    del state["shards"][0]["version"]


BAD_STATES = {
    "negative step": (_set("step", -5), "step must be an integer from 0 to 2**53, got -5"),
    "huge step": (_set("step", 10**30), "step must be an integer from 0 to 2**53"),
    "float step": (_set("step", 2.5), "step must be an integer"),
    "negative version": (_set("shards.0.version", -3), "shards[0].version must be an integer from 0 to 2**53, got -3"),
    "text version": (_set("shards.1.version", "zz"), "shards[1].version must be an integer from 0 to 2**53, got 'zz'"),
    "missing version": (_drop_version, "shards[0].version must be an integer from 0 to 2**53, got None"),
    "negative rejected": (_set("shards.0.rejected", -1), "shards[0].rejected must be"),
    "negative histogram": (_set("staleness_histogram", [-5, 3]), "staleness_histogram[0] must be an integer"),
    "histogram not a list": (_set("staleness_histogram", 7), "staleness_histogram must be a list, got 7"),
    "negative examples": (_set("examples", -100), "examples must be an integer from 0 to 2**53, got -100"),
    "negative session": (_set("rng.session", -1), "rng.session must be an integer from 0 to 2**53, got -1"),
    "NaN elapsed": (_set("elapsed_s", float("nan")), "elapsed_s must be a finite number >= 0, got nan"),
    "text initial loss": (_set("initial_loss", "x"), "initial_loss must be a finite number or null, got 'x'"),
    "text diverged": (_set("diverged", "no"), "diverged must be true or false, got 'no'"),
    "boolean deaths": (_set("worker_deaths", True), "worker_deaths must be an integer"),
    "negative lost updates": (_set("lost_updates", -2), "lost_updates must be an integer"),
    "model a string": (_set("model", "rica"), "model must be an object, got 'rica'"),
    "config a string": (_set("config", "x"), "config must be an object, got 'x'"),
    "config.data a string": (_set("config.data", "x"), "config.data must be an object, got 'x'"),
    "config.model a string": (_set("config.model", "oops"), "config.model must be an object, got 'oops'"),
    "config.ps a list": (_set("config.ps", []), "config.ps must be an object, got []"),
    "rng missing": (_set("rng", None), "rng must be an object, got None"),
    "shards a number": (_set("shards", 2), "shards must be a list, got 2"),
    "shards of strings": (_set("shards", ["a", "b"]), "shards[0] must be an object, got 'a'"),
    "params_file outside": (_set("params_file", "../config.toml"), "params_file must name a file"),
}


@pytest.mark.parametrize("case", BAD_STATES, ids=list(BAD_STATES))
def test_resume_refuses_nonsense_in_state_json(run: Path, cli: Callable[..., CliResult], case: str) -> None:
    edit, expected = BAD_STATES[case]
    _edit_state(run, edit)
    _refused(cli, run, "corrupt checkpoint", str(_state_path(run)), expected)


@pytest.mark.parametrize("case", ["model a string", "text step", "config.data a string"])
def test_evaluation_refuses_nonsense_in_state_json_in_one_line(run: Path, cli: Callable[..., CliResult],
                                                              case: str) -> None:  # fmt: skip
    """viz and eval load the same checkpoint as --resume: the same one-line refusal, not an AttributeError or
    ValueError traceback (the checks lived in the resume path only)."""
    edit, expected = {**BAD_STATES, "text step": (_set("step", "abc"), "step must be an integer")}[case]
    _edit_state(run, edit)
    for command in (["viz", str(run)], ["eval", "probe", str(run)]):
        result = cli(*command)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "corrupt checkpoint" in result.stderr and expected in " ".join(result.stderr.split())


def test_resume_refuses_nan_parameters(run: Path, cli: Callable[..., CliResult]) -> None:
    """The last 4 KB of the parameter file overwritten with 0xFF (float32 NaN): load refuses it, naming the file."""
    params = _params_path(run)
    data = bytearray(params.read_bytes())
    data[-4096:] = b"\xff" * 4096
    params.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="holds NaN or Inf parameters") as info:
        ckpt.load(run / "checkpoint")
    assert str(params) in str(info.value)
    _refused(cli, run, "holds NaN or Inf parameters", str(params))


def test_resume_refuses_infinite_rule_state(run: Path, cli: Callable[..., CliResult]) -> None:
    """An Inf in a shard's Adagrad accumulator (values finite) is refused too: that shard would never move again."""
    params = _params_path(run)
    tensors = load_file(str(params))
    tensors["shard1.state.sum_sq"][3] = float("inf")
    save_file(tensors, str(params))
    _refused(cli, run, "holds NaN or Inf parameters", "shard1.state.sum_sq")


def _rewrite_shard0(run_dir: Path, values: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
    """Replace shard 0's tensors, and its size in state.json, consistently (the file alone looks sound)."""
    params = _params_path(run_dir)
    tensors = {k: v for k, v in load_file(str(params)).items() if not k.startswith("shard0.")}
    tensors["shard0.values"] = values
    tensors.update({f"shard0.state.{name}": t for name, t in state.items()})
    save_file(tensors, str(params))
    _edit_state(run_dir, _set("shards.0.size", values.numel()))
    _edit_state(run_dir, _set("params_sha256", ckpt.file_sha256(params)))


def test_resume_refuses_a_shard_of_another_size_before_writing_anything(
    run: Path, cli: Callable[..., CliResult]
) -> None:
    """Shard 0 one value short (state.json agreeing): refused before config.toml is rewritten."""
    tensors = load_file(str(_params_path(run)))
    short = tensors["shard0.values"][:-1].clone()
    _rewrite_shard0(run, short, {"sum_sq": tensors["shard0.state.sum_sq"][:-1].clone()})
    _refused(cli, run, "shard 0 holds", f"needs {short.numel() + 1}")


def test_resume_refuses_a_shard_without_its_rule_state_before_writing_anything(
    run: Path, cli: Callable[..., CliResult]
) -> None:
    """Shard 0 without Adagrad's accumulator: refused before config.toml is rewritten."""
    _rewrite_shard0(run, load_file(str(_params_path(run)))["shard0.values"].clone(), {})
    _refused(cli, run, "shard 0 holds", "['sum_sq']")


def test_a_diverged_resume_keeps_the_last_good_checkpoint(run: Path, cli: Callable[..., CliResult]) -> None:
    """ps.lr = 1e30 makes the held-out loss NaN or inf (the shards accept the huge finite values): the good checkpoint
    and the config.toml that trained it are kept byte for byte, the summary says so, exit 2 with one line; a plain
    --resume then goes on from the kept step. The filter picture and the summary's Gabor fit are of the kept
    checkpoint's weights, not of those thrown away."""
    kept = {p: b for p, b in _files(run).items() if p.parent.name == "checkpoint" or p.name == "config.toml"}
    filters, gabor_fit = (run / "filters.png").read_bytes(), json.loads((run / "summary.json").read_text())["gabor_fit"]
    result = cli("train", "--resume", str(run), "--steps", "40", "--set", "ps.lr=1e30", "--no-progress")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    # nan or inf: huge finite weights overflow the matmuls, and whether +inf meets -inf depends on the CPU's kernels
    assert re.search(
        r"downpour: error: training diverged: held-out loss (nan|inf) at step 40; kept the checkpoint of "
        r"step 20 and the config.toml it was trained with; lower ps.lr \(now 1e\+30\)",
        message,
    ), message
    assert {p: b for p, b in _files(run).items() if p in kept} == kept
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == sorted(p.name for p in kept if p.parent.name
                                                                            == "checkpoint")  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    assert summary["diverged"] is True and summary["final_loss"] is None
    assert summary["steps"] == 40 and summary["checkpoint_step"] == 20
    assert (run / "filters.png").read_bytes() == filters and summary["gabor_fit"] == gabor_fit
    end = [r for r in read_jsonl(run / "metrics.jsonl") if r["event"] == "end"][-1]
    assert end["diverged"] is True and end["checkpoint_step"] == 20
    probed = cli("eval", "probe", str(run), "--json")  # the kept checkpoint is a good one: no warning
    assert probed.returncode == 0 and "diverged" not in probed.stderr, probed.stderr

    again = cli("train", "--resume", str(run), "--steps", "30", "--no-progress")
    assert again.returncode == 0, again.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["diverged"] is False and math.isfinite(summary["final_loss"])
    assert summary["checkpoint_step"] == summary["steps"] == 30
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["event"] == "start"] == [0, 20, 20]


def test_periodic_checkpoints_of_a_diverged_session_are_not_saved(run: Path, cli: Callable[..., CliResult]) -> None:
    """Checkpoints every 0.2 s of a diverging 400-step session: none replaces step 20's checkpoint, byte for byte.
    Those due while the workers start (still step 20) are not saved either: they used to rewrite state.json with the
    diverging lr beside the kept config.toml. (Steps, not seconds, end it: the workers' start-up may take seconds on
    a loaded machine.)"""
    before = load_file(str(_params_path(run)))
    checkpoint_files = {p: b for p, b in _files(run).items() if p.parent.name == "checkpoint"}
    result = cli("train", "--resume", str(run), "--steps", "400", "--seconds", "600", "--set", "ps.lr=1e30",
                 "--set", "train.checkpoint_every=0.2", "--no-progress")  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "kept the checkpoint of step 20" in " ".join(result.stderr.split())
    checkpoints = [r for r in read_jsonl(run / "metrics.jsonl") if r["event"] == "checkpoint"]
    assert any(not r["saved"] and r["step"] > 20 for r in checkpoints), checkpoints
    assert all(r["checkpoint_step"] == 20 for r in checkpoints), checkpoints
    assert "not saved over the checkpoint of step 20" in " ".join(result.stderr.split())
    state = json.loads(_state_path(run).read_text())
    assert state["step"] == 20
    after = load_file(str(_params_path(run)))
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert {p: b for p, b in _files(run).items() if p.parent.name == "checkpoint"} == checkpoint_files
    assert state["config"]["ps"]["lr"] != 1e30


def test_a_first_session_that_diverges_saves_its_checkpoint_and_says_so(
    tmp_path: Path, cli: Callable[..., CliResult]
) -> None:
    """No earlier checkpoint to lose: the session's is written, and the divergence is reported the same way."""
    run_dir = tmp_path / "run"
    result = cli("train", "--steps", "20", "--seconds", "600", "--out", str(run_dir), "--set", "ps.lr=1e30", *TINY)
    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert re.search(
        r"training diverged: held-out loss (nan|inf) at step 20; saved its checkpoint \(there was no "
        r"earlier one to keep; it cannot be resumed\); lower ps.lr",
        message,
    ), message
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["diverged"] is True and summary["final_loss"] is None and summary["checkpoint_step"] == 20
    assert json.loads(_state_path(run_dir).read_text())["step"] == 20
    # Its values are huge (lr 1e30): resumed with any lr it diverged again. Resuming is refused, nothing is written.
    files = _files(run_dir)
    again = cli("train", "--resume", str(run_dir), "--steps", "40", "--set", "ps.lr=0.02", "--no-progress")
    assert again.returncode == 2 and again.stderr.strip() == (
        f"downpour: error: run {run_dir} cannot be resumed: its checkpoint (step 20) was saved after training "
        "diverged in its first session, with no earlier one to keep; start a new run with a lower ps.lr (it was 1e+30)"
    )
    assert _files(run_dir) == files
    # evaluated, the diverged checkpoint's results come with a warning that they describe a diverged network
    probed = cli("eval", "probe", str(run_dir), "--json")
    assert probed.returncode == 0 and json.loads(probed.stdout)["step"] == 20
    assert re.search(
        rf"warning: the checkpoint of {re.escape(str(run_dir))} is the one its training diverged with "
        r"\(training diverged: held-out loss (nan|inf) at step 20\)",
        probed.stderr,
    ), probed.stderr
    # Most diverged runs hold NaN values: the same line, not the checkpoint's NaN check, speaks.
    tensors = load_file(str(_params_path(run_dir)))
    save_file({name: torch.full_like(t, float("nan")) for name, t in tensors.items()}, str(_params_path(run_dir)))
    files = _files(run_dir)
    again = cli("train", "--resume", str(run_dir), "--steps", "40", "--set", "ps.lr=0.02", "--no-progress")
    assert again.returncode == 2 and "cannot be resumed: its checkpoint (step 20)" in again.stderr, again.stderr
    assert _files(run_dir) == files


def _shard() -> Shard:
    return Shard(0, 0, torch.zeros(3), make_rule("sgd", lr=0.1))


@pytest.mark.parametrize("fetched", [3, 100, -1])
def test_push_refuses_a_version_the_shard_never_had(fetched: int) -> None:
    """A fetched version ahead of the shard (staleness < 0) or negative is a ValueError naming both; not applied."""
    shard = _shard()
    for version in range(2):
        shard.push(torch.ones(3), fetched_version=version)
    values = torch.empty(3)
    shard.fetch_into(values)
    with pytest.raises(ValueError, match=f"fetched at version {fetched}, but the shard is at version 2"):
        shard.push(torch.ones(3), fetched_version=fetched)
    after = torch.empty(3)
    assert shard.fetch_into(after) == 2
    assert torch.equal(after, values)
    assert shard.rejected == 0
    assert shard.push(torch.ones(3), fetched_version=2).staleness == 0  # the current version is fine


def test_resume_refuses_a_run_cut_into_other_examples(run: Path, cli: Callable[..., CliResult]) -> None:
    """The checkpoint records its training and held-out counts, and a resume that would cut others is refused, the
    run left as it was. A checkpoint from before they were recorded is checked against the rule of its time:
    data.examples = 400 with the default held_out cut 1424 and held out 284, where that config now gives exactly 400
    and 100 (checked on the driver's own function, without a run)."""
    from downpour import resume
    from downpour.config import Config

    state = json.loads(_state_path(run).read_text())
    assert state["data_counts"] == {"train": 2000, "held_out": 256}
    state["data_counts"] = {"train": 1999, "held_out": 256}
    _state_path(run).write_text(json.dumps(state))
    files = _files(run)
    result = cli("train", "--resume", str(run), "--steps", "40", "--no-progress")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"downpour: error: run {run} was trained on 1999 training and 256 held-out examples; its config now cuts 2000 "
        "and 256 (data.examples became exact on 2026-11-27), so it cannot be resumed on the same examples: start a "
        "new run"
    )
    assert _files(run) == files

    config = Config()
    config.data.examples, config.data.whiten = 400, False
    dataset = load_dataset(config.data, seed=0)
    del state["data_counts"]
    with pytest.raises(DownpourError, match=r"was trained on 1140 training and 284 held-out examples; its config "
                                            r"now cuts 400 and 100"):  # fmt: skip
        resume._check_same_examples(state, config, dataset, run)
    config.data.held_out = 100  # set: the old rule cut the same
    resume._check_same_examples(state, config, load_dataset(config.data, seed=0), run)


def test_resume_refuses_a_config_toml_cut_short(run: Path, cli: Callable[..., CliResult]) -> None:
    """downpour writes every key into config.toml: a file cut off mid-way (here after ``batch_size``, its value cut
    too) still parses, and resumed with the defaults of every key lost, and recorded them; it is refused, naming
    the keys missing, and nothing in the run changes."""
    config = run / "config.toml"
    text = config.read_text()
    cut = text.index("batch_size = ") + len("batch_size = 1")
    config.write_text(text[:cut] + "\n")
    _refused(cli, run, "config.toml lacks", "which the run's checkpoint recorded: the file was cut short or edited")


def _dataset_of(train: int, held_out: int, digest: str | None = None) -> Any:
    """A stand-in for a Dataset that holds ``train`` and ``held_out`` examples (only their counts are read) and,
    for users' folders and videos, the digest of the pictures read."""
    from types import SimpleNamespace

    return SimpleNamespace(train=[0] * train, held_out=[0] * held_out,
                           read_report=None if digest is None else {"digest": digest})  # fmt: skip


def test_resume_refuses_other_held_out_examples_as_it_does_other_training_ones(tmp_path: Path) -> None:
    """Both recorded counts must match, not only the training one: a checkpoint trained on 2000 examples with 256
    held out is refused on a split that holds 2000 and 300 (every loss of the run was measured on the 256), and the
    error names both pairs. The same split passes. Checked on the driver's function directly, without a run."""
    from downpour import resume
    from downpour.config import Config

    saved = {"data_counts": {"train": 2000, "held_out": 256}}
    resume._check_same_examples(saved, Config(), _dataset_of(2000, 256), tmp_path)  # the same split: resumed
    with pytest.raises(DownpourError, match=r"was trained on 2000 training and 256 held-out examples; its config now "
                                            r"cuts 2000 and 300"):  # fmt: skip
        resume._check_same_examples(saved, Config(), _dataset_of(2000, 300), tmp_path)
    with pytest.raises(DownpourError, match=r"was trained on 2000 training and 256 held-out examples; its config now "
                                            r"cuts 1999 and 256"):  # fmt: skip
        resume._check_same_examples(saved, Config(), _dataset_of(1999, 256), tmp_path)


def test_resume_refuses_a_folder_whose_pictures_changed(tmp_path: Path) -> None:
    """A users' folder whose pictures changed since the checkpoint (another digest of the files read, same counts)
    is refused: the run would go on training on other examples. A checkpoint of the current reader says the files
    changed; one of an earlier reader says the reader changed too. The same digest, or none recorded (a bundled
    source), resumes."""
    from downpour import resume
    from downpour.config import Config
    from downpour.data.own import READER_VERSION

    config = Config()
    counts = {"train": 50, "held_out": 10}
    saved = {"data_counts": {**counts, "pictures_digest": "aaaa", "pictures_reader": READER_VERSION}}
    resume._check_same_examples(saved, config, _dataset_of(50, 10, "aaaa"), tmp_path)
    resume._check_same_examples({"data_counts": counts}, config, _dataset_of(50, 10, "bbbb"), tmp_path)
    with pytest.raises(DownpourError, match=r"holds other pictures than when run .* was saved"):
        resume._check_same_examples(saved, config, _dataset_of(50, 10, "bbbb"), tmp_path)
    older = {"data_counts": {**counts, "pictures_digest": "aaaa", "pictures_reader": READER_VERSION - 1}}
    with pytest.raises(DownpourError, match=r"was saved by an earlier downpour that"):
        resume._check_same_examples(older, config, _dataset_of(50, 10, "bbbb"), tmp_path)


def test_a_resume_without_its_metrics_log_still_numbers_its_session_after_the_checkpoints(
    run: Path, cli: Callable[..., CliResult]
) -> None:
    """The session number comes from the checkpoint (its ``rng.session`` plus one), not only from the start rows of
    metrics.jsonl: with the log moved away, the resumed session of a one-session run is still session 1 (the
    workers' seeds derive from it, so a session 0 again would replay the first session's randomness), and its
    checkpoint records 1."""
    assert json.loads(_state_path(run).read_text())["rng"]["session"] == 0
    (run / "metrics.jsonl").unlink()
    result = cli("train", "--resume", str(run), "--steps", "25", "--no-progress")
    assert result.returncode == 0, result.stderr
    starts = [row for row in read_jsonl(run / "metrics.jsonl") if row["event"] == "start"]
    assert [(row["session"], row["step"]) for row in starts] == [(1, 20)]
    assert json.loads(_state_path(run).read_text())["rng"]["session"] == 1


def test_a_resume_carries_the_examples_and_seconds_of_earlier_sessions(
    run: Path, cli: Callable[..., CliResult]
) -> None:
    """The run's example count and training time add up across sessions: the checkpoint's ``examples`` and
    ``elapsed_s`` (set here to 1,000,000 examples and 1000 s, as a long first session saved them) are where the
    resumed session's counting starts, so that its checkpoint and summary hold more, not this session's alone."""
    _edit_state(run, lambda state: state.update(examples=1_000_000, elapsed_s=1000.0))
    result = cli("train", "--resume", str(run), "--steps", "25", "--no-progress")
    assert result.returncode == 0, result.stderr
    state = json.loads(_state_path(run).read_text())
    assert state["step"] == 25
    assert 1_000_000 < state["examples"] < 1_100_000 and 1000.0 < state["elapsed_s"] < 1600.0
    assert json.loads((run / "summary.json").read_text())["examples"] == state["examples"]


def test_a_checkpoint_of_another_shard_count_or_rule_is_refused_by_name(tmp_path: Path) -> None:
    """The compatibility check names each difference between the checkpoint and this config: two shards saved where
    ps.shards = 3, and another rule; a checkpoint of the same model, shards, rule and config passes. Called on the
    driver's function with a hand-made state (no run)."""
    from downpour import resume
    from downpour.config import Config

    config = Config()
    config.ps.shards = 2
    signature = {"num_params": 6, "param_shapes": {"w": [2, 3]}}
    state = {"model": {"name": config.model.name, "param_shapes": {"w": [2, 3]}}, "shards": [{}, {}],
             "rule": config.ps.rule, "config": config.to_dict()}  # fmt: skip
    resume._check_compatible(state, config, signature, tmp_path)
    config.ps.shards = 3
    with pytest.raises(CheckpointError, match=r"does not match this config: 2 shards vs ps.shards=3$"):
        resume._check_compatible(state, config, signature, tmp_path)
    config.ps.shards = 2
    other = "sgd" if config.ps.rule != "sgd" else "adagrad"
    with pytest.raises(CheckpointError, match=rf"does not match this config: rule {other!r} vs ps.rule="):
        resume._check_compatible({**state, "rule": other}, config, signature, tmp_path)


def test_changes_from_records_only_keys_both_configs_hold_and_no_budget(tmp_path: Path) -> None:
    """What a session changed is the keys its checkpoint recorded with another value: ps.lr 0.02 -> 0.05 is
    recorded; a key the checkpoint lacks (written before the key existed) is no change; each session's budget
    (train.steps, train.seconds) and data.held_out are never recorded; a checkpoint without a config dict gives
    none."""
    from downpour import resume
    from downpour.config import Config

    config = Config()
    config.ps.lr = 0.05
    config.train.steps, config.train.seconds, config.data.held_out = 999, 77.0, 128
    saved = Config().to_dict()
    saved["ps"]["lr"] = 0.02
    del saved["ps"]["policy"]  # an older checkpoint's config, without it
    del saved["model"]  # or without a whole section
    assert resume.changes_from(saved, config) == {"ps.lr": [0.02, 0.05]}
    assert resume.changes_from(None, config) == {}


def test_a_config_toml_may_lack_keys_this_downpour_no_longer_knows(tmp_path: Path) -> None:
    """Only keys this downpour knows must be in config.toml: a checkpoint recording a key since removed (here
    ``train.retired``, and a whole ``legacy`` section) resumes, while a known key missing from the file is refused
    by name."""
    from downpour import config as config_mod
    from downpour import resume
    from downpour.config import Config

    config_mod.write(Config(), tmp_path / "config.toml")
    saved = Config().to_dict()
    saved["train"]["retired"] = 3
    saved["legacy"] = {"knob": 1}
    resume._check_config_whole(tmp_path, saved, tmp_path / "state.json")
    text = (tmp_path / "config.toml").read_text()
    (tmp_path / "config.toml").write_text("\n".join(line for line in text.splitlines()
                                                    if not line.startswith("lr ")) + "\n")  # fmt: skip
    with pytest.raises(CheckpointError, match=r"lacks ps\.lr, which the run's checkpoint recorded"):
        resume._check_config_whole(tmp_path, saved, tmp_path / "state.json")
