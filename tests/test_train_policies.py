"""``ps.policy`` and ``cluster.backend = "sim"`` through the ``downpour train`` command (one simulated run as a real
subprocess, the others in this process through ``cli.main``)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import FAST, CliResult, downpour, read_jsonl


def test_simulated_run_writes_a_run_directory_with_the_staleness_of_its_workers(
    run_dir: Path, cli: Callable[..., CliResult]
) -> None:
    args = ["train", "--backend", "sim", "--workers", "16", "--steps", "400", *FAST, "--set", "ps.rule=sgd", "--set",
            "ps.lr=0.005", "--json"]  # fmt: skip
    result = downpour(*args, "--out", str(run_dir))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["backend"] == "sim" and summary["policy"] == "downpour"
    assert summary["steps"] == 400 and summary["updates_applied"] == 400
    assert summary["final_loss"] < summary["initial_loss"]
    # constant compute times: every worker waits for the 15 others between its fetch and its push
    assert 14 <= summary["staleness"]["mean"] <= 15
    assert summary["simulated_seconds"] > 0 and summary["gradient_evaluations"] == 400
    rows = read_jsonl(run_dir / "metrics.jsonl")
    pushes = [row for row in rows if row["event"] == "push"]
    evals = [row for row in rows if row["event"] == "eval"]
    assert len(pushes) == 400 and len(evals) >= 40
    assert [row["t"] for row in pushes] == sorted(row["t"] for row in pushes)  # in simulated-time order
    assert (run_dir / "checkpoint").is_dir() and (run_dir / "filters.png").stat().st_size > 0
    again = cli(*args, "--out", str(run_dir.parent / "again"))  # in this process: the same numbers
    assert json.loads(again.stdout)["final_loss"] == summary["final_loss"]  # deterministic


def test_a_simulated_run_that_diverges_says_so(run_dir: Path, cli: Callable[..., CliResult]) -> None:
    """ps.lr = 1e30 on the simulator: the summary and the exit status (2, one line) report it as the local backend's
    first session does, instead of a NaN loss and status 0."""
    result = cli("train", "--backend", "sim", "--workers", "8", "--steps", "50", *FAST, "--set", "ps.lr=1e30",
                 "--out", str(run_dir), "--json")  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert json.loads(result.stdout) == json.loads((run_dir / "summary.json").read_text())  # standard JSON: NaN is null
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["diverged"] is True and summary["final_loss"] is None and summary["checkpoint_step"] == 50
    message = " ".join(result.stderr.split())
    assert re.search(
        r"downpour: error: training diverged: held-out loss (nan|inf) at step 50; saved its checkpoint", message
    )  # nan or inf: which one the overflowing matmuls give depends on the CPU's kernels
    assert "lower ps.lr (now 1e+30)" in message and "Traceback" not in message


def test_a_simulated_run_with_rejected_updates_warns_and_checkpoints_the_rule_state(
    run_dir: Path, cli: Callable[..., CliResult]
) -> None:
    """easgd at α = lr·ρ = 0.95 on digits: every worker's copy blows up and its exchanges are rejected. The
    simulator warns as the local backend does (it used to exit 0 without a word); and its checkpoint holds the
    server rule's state (Adagrad's sums of squares, as a local run's checkpoint does), not an empty one."""
    result = cli("train", "--backend", "sim", "--steps", "40", "--no-progress", "--set", "data.source=digits", "--set",
                 "ps.policy=easgd", "--set", "ps.lr=0.19", "--out", str(run_dir), "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["updates_rejected"] > 0.5 * (summary["updates_applied"] + summary["updates_rejected"])
    message = " ".join(result.stderr.split())
    assert f"warning: {summary['updates_rejected']} of " in message and "lower ps.lr (now 0.19)" in message
    other = run_dir.parent / "p"  # beside the run: a run inside another's folder is refused
    plain = cli("train", "--backend", "sim", "--workers", "4", "--steps", "40", *FAST, "--out", str(other))
    assert plain.returncode == 0 and "rejected (NaN or Inf)" not in plain.stderr
    state = json.loads((other / "checkpoint" / "state.json").read_text())
    tensors = load_file(str(other / "checkpoint" / state["params_file"]))
    assert set(tensors) == {"shard0.values", "shard0.state.sum_sq"}  # ps.rule = adagrad, the default
    assert float(tensors["shard0.state.sum_sq"].min()) >= 0 and float(tensors["shard0.state.sum_sq"].sum()) > 0


def test_a_loss_that_blows_up_without_nan_is_warned_of(run_dir: Path, cli: Callable[..., CliResult]) -> None:
    """200 simulated workers at a fixed Adagrad rate of 0.5: every value stays finite, so nothing is rejected and
    the run is not "diverged", yet the loss ends 1e11 times where it began (the README's 1,000-worker example did
    this at lr 0.02). The run says so instead of exiting 0 in silence."""
    result = cli("train", "--backend", "sim", "--workers", "200", "--steps", "400", "--no-progress", "--set",
                 "data.source=digits", "--set", "ps.lr=0.5", "--out", str(run_dir), "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert not summary["diverged"] and summary["final_loss"] > 10 * summary["initial_loss"]
    message = " ".join(result.stderr.split())
    assert f"warning: the held-out loss grew from {summary['initial_loss']:.4g} to " in message
    assert "ps.policy = 'staleness-lr'" in message


@pytest.mark.parametrize("policy", ["sync", "ssp", "easgd"])
def test_every_policy_runs_on_the_simulator(policy: str, run_dir: Path, cli: Callable[..., CliResult]) -> None:
    result = cli("train", "--backend", "sim", "--workers", "8", "--steps", "160", *FAST, "--set",
                      "ps.rule=sgd", "--set", "ps.lr=0.005", "--set", f"ps.policy={policy}",
                      "--out", str(run_dir), "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["policy"] == policy and summary["final_loss"] < summary["initial_loss"]
    if policy == "sync":
        assert summary["staleness"]["max"] == 0
    if policy == "ssp":
        assert summary["staleness"]["max"] <= 8 * (3 + 1)  # bounded: at most (bound + 1) rounds of 8 workers


@pytest.mark.parametrize("policy", ["staleness-lr", "dc-asgd"])
def test_push_policies_run_on_the_local_backend(policy: str, run_dir: Path, cli: Callable[..., CliResult]) -> None:
    result = cli("train", "--workers", "2", "--steps", "200", "--seconds", "600", *FAST, "--set", f"ps.policy={policy}",
                      "--out", str(run_dir), "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["updates_applied"] >= 200 and summary["updates_rejected"] == 0
    assert summary["final_loss"] < 0.5 * summary["initial_loss"]


def test_ssp_on_the_local_backend_bounds_the_staleness(run_dir: Path, cli: Callable[..., CliResult]) -> None:
    """Bound 0 with 2 workers: at most (2·0 + 1)·(2 − 1) = 1 push of the other lands between a fetch and a push."""
    result = cli("train", "--workers", "2", "--steps", "200", "--seconds", "600", *FAST, "--set", "ps.policy=ssp",
                      "--set", "ps.staleness_bound=0", "--out", str(run_dir), "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["staleness"]["max"] <= 1
    assert summary["final_loss"] < 0.5 * summary["initial_loss"]
    pushes = [row for row in read_jsonl(run_dir / "metrics.jsonl") if row["event"] == "push"]
    assert len({row["worker"] for row in pushes}) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "ps.policy=sync", "--set", "ps.n_fetch=2"], "invalid ps.n_fetch: 2 (sync fetches once per round"),
        (["--set", "ps.policy=ssp", "--set", "ps.n_fetch=4"], "invalid ps.n_fetch: 4 (ssp bounds staleness by waiting"),
        (
            ["--set", "ps.policy=dc-asgd", "--set", "ps.local_apply=true"],
            "invalid ps.local_apply: True (dc-asgd compensates a push against the weights its worker fetched",
        ),
        (["--set", "ps.policy=easgd", "--set", "ps.n_push=4"], "invalid ps.n_push: 4 (easgd takes ps.easgd_tau"),
        (
            ["--set", "ps.policy=dc-asgd", "--set", "ps.n_push=2"],  # λ(g1+g2)⊙(g1+g2): 2.42 where 2.35 was due
            "invalid ps.n_push: 2 (dc-asgd compensates each gradient against the weights it was computed at",
        ),
        (
            ["--set", "ps.policy=staleness-lr", "--set", "ps.n_push=2"],  # n_fetch 1: a fetch inside every push
            "invalid ps.n_fetch: 1 (staleness-lr scales a push by its staleness, but with ps.n_push = 2",
        ),
        (
            ["--set", "ps.policy=staleness-lr", "--set", "ps.n_push=2", "--set", "ps.n_fetch=3"],
            "make ps.n_fetch a multiple of ps.n_push",
        ),
        (["--set", "ps.policy=bogus"], "invalid ps.policy: 'bogus' (choose one of"),
        (["--backend", "sim", "--set", "ps.n_push=2"], "invalid ps.n_push: 2 (the sim backend models one gradient"),
        (["--backend", "sim", "--set", "cluster.sim_stragglers=2"], "invalid cluster.sim_stragglers: 2"),
        (["--set", "ps.backup_workers=2"], "invalid ps.backup_workers: 2 (must be >= 0 and < cluster.workers = 2)"),
        (  # α = lr·rho = 0.1·10 = 1 exactly: the exchange would swap worker and center; it must be < 1
            ["--set", "ps.policy=easgd", "--set", "ps.lr=0.1", "--set", "ps.easgd_rho=10"],
            "invalid ps.easgd_rho: 10.0 (ps.lr · ps.easgd_rho must be < 1 (the elastic step α), got 1)",
        ),
        (["--set", "ps.policy=dc-asgd", "--set", "ps.dc_lambda=inf"], "invalid ps.dc_lambda: inf (must be >= 0)"),
        (["--set", "ps.policy=ssp", "--set", "ps.staleness_bound=-1"], "invalid ps.staleness_bound: -1 (must be >= 0)"),
        (["--set", "ps.policy=easgd", "--set", "ps.easgd_tau=0"], "invalid ps.easgd_tau: 0 (must be at least 1)"),
    ],
)
def test_bad_policy_settings_are_one_line_errors(
    args: list[str], message: str, run_dir: Path, cli: Callable[..., CliResult]
) -> None:
    """A setting the policies cannot run with is refused by the config check, before anything is written: exit 2,
    one line naming the key and the rule it breaks, and no run directory."""
    result = cli("train", "--steps", "10", *args, "--out", str(run_dir))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not run_dir.exists()


def test_a_simulated_run_is_not_resumed(run_dir: Path, cli: Callable[..., CliResult]) -> None:
    first = cli("train", "--backend", "sim", "--workers", "4", "--steps", "50", *FAST, "--out", str(run_dir))
    assert first.returncode == 0, first.stderr
    again = cli("train", "--backend", "sim", "--workers", "4", "--steps", "50", *FAST, "--resume", str(run_dir))
    assert again.returncode == 2 and "simulated runs are deterministic" in again.stderr
    files = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    local = cli("train", "--resume", str(run_dir), "--set", "cluster.backend=local", "--set", "ps.shards=1", *FAST)
    assert local.returncode == 2, local.stderr
    assert "it was simulated (cluster.backend = 'sim'), and simulated runs are deterministic" in local.stderr
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file() and path.name != ".lock"} == {
        path: data for path, data in files.items() if path.name != ".lock"
    }


def test_a_simulated_run_whose_time_ends_before_its_first_push_says_so(
    run_dir: Path, cli: Callable[..., CliResult]
) -> None:
    result = cli("train", "--backend", "sim", "--seconds", "0.5", "--steps", "0", *FAST, "--out", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert ("train.seconds = 0.5 simulated seconds ran out before the first push (one takes about 1): this run "
            "trained nothing; raise --seconds") in result.stderr  # fmt: skip
    easgd = cli("train", "--backend", "sim", "--seconds", "3", "--steps", "0", "--set", "ps.policy=easgd", *FAST,
                "--out", str(run_dir.with_name("easgd")))  # fmt: skip
    assert "(one takes about 4)" in easgd.stderr  # ps.easgd_tau = 4 local steps per push


def test_run_training_takes_the_run_directory_as_a_string(tmp_path: Path) -> None:
    """The README's API example names the directory; a string was an AttributeError deep inside."""
    from rich.console import Console

    from downpour import config as config_mod
    from downpour.train import run_training

    config = config_mod.load(None, ["cluster.backend=sim", "train.steps=5", "data.source=digits"])
    summary = run_training(config, str(tmp_path / "run"), console=Console(quiet=True), show_progress=False)
    assert summary["steps"] == 5 and (tmp_path / "run" / "summary.json").exists()
