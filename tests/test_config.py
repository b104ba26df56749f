"""Run configuration: defaults, TOML files, ``--set`` overrides, validation, and how the CLI reports bad input."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from conftest import finish_all
from downpour import config as config_mod
from downpour.cli import main
from downpour.config import Config, from_dict, load, overrides_to_dict, parse_override, validate
from downpour.errors import ConfigError


def _mentions(message: str, *tokens: str) -> bool:
    """Every token appears in ``message`` as a whole token (not as part of a longer word or number)."""
    return all(re.search(r"(?<![\w.])" + re.escape(token) + r"(?![\w.])", message) for token in tokens)


def test_mentions_helper() -> None:
    """The matcher used below rejects partial matches (so "0" is not found inside "10" or "0.5")."""
    assert _mentions("invalid ps.shards: 0 (must be at least 1)", "ps.shards", "0")
    assert not _mentions("invalid ps.shards: 10", "0")
    assert not _mentions("invalid ps.lr: 0.5", "0")
    assert not _mentions("invalid ps.lr: -1.0", "-1")


# ---------------------------------------------------------------------------------------------- defaults and files


def test_defaults_validate() -> None:
    """The default configuration is valid and matches the documented defaults."""
    config = Config()
    validate(config)
    assert load() == config
    assert (config.ps.shards, config.ps.rule, config.ps.lr) == (2, "adagrad", 0.02)
    assert (config.cluster.workers, config.data.source, config.model.name) == (2, "natural-patches", "rica")


def test_toml_file_loading(tmp_path: Path) -> None:
    """A TOML file sets the keys it names; the others keep their defaults."""
    path = tmp_path / "run.toml"
    path.write_text('[ps]\nshards = 4\nrule = "sgd"\nlr = 1\n\n[data]\nsource = "digits"\nwhiten = false\n')
    config = load(path)
    assert config.ps.shards == 4 and config.ps.rule == "sgd"
    assert config.ps.lr == 1.0 and isinstance(config.ps.lr, float)  # an integer is accepted for a float key
    assert config.data.source == "digits" and config.data.whiten is False
    assert config.model == Config().model and config.cluster == Config().cluster


def test_overrides_win_over_file(tmp_path: Path) -> None:
    """``--set`` overrides are applied after the file."""
    path = tmp_path / "run.toml"
    path.write_text("[ps]\nshards = 4\nlr = 0.5\n")
    config = load(path, ["ps.shards=8", "cluster.workers=3"])
    assert (config.ps.shards, config.ps.lr, config.cluster.workers) == (8, 0.5, 3)


def test_invalid_override_after_valid_file(tmp_path: Path) -> None:
    """A bad override is reported even when the file is fine."""
    path = tmp_path / "run.toml"
    path.write_text("[ps]\nshards = 4\n")
    with pytest.raises(ConfigError) as info:
        load(path, ["ps.lr=-1"])
    assert _mentions(str(info.value), "ps.lr", "-1.0")


def test_override_can_complete_a_file(tmp_path: Path) -> None:
    """Only the final, merged configuration should have to be valid."""
    path = tmp_path / "run.toml"
    path.write_text("[train]\nseconds = 0\n")
    config = load(path, ["train.steps=100"])
    assert (config.train.seconds, config.train.steps) == (0.0, 100)


def test_to_toml_round_trip(tmp_path: Path) -> None:
    """The resolved config written as TOML loads back equal."""
    config = load(None, ["ps.shards=3", "ps.rule=sgd", "data.whiten=false", "train.seconds=2.5", "model.features=64"])
    path = tmp_path / "config.toml"
    config_mod.write(config, path)
    assert tomllib.loads(path.read_text())["ps"]["shards"] == 3
    assert load(path) == config


def test_from_dict_does_not_mutate_base() -> None:
    """Building from a base copies its sections."""
    base = Config()
    changed = from_dict({"ps": {"lr": 0.5}}, base)
    assert changed.ps.lr == 0.5 and base.ps.lr == 0.02


def test_missing_file(tmp_path: Path) -> None:
    """A missing file is a ConfigError naming the path."""
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="not found") as info:
        load(path)
    assert str(path) in str(info.value)


def test_malformed_file(tmp_path: Path) -> None:
    """A malformed file is a ConfigError naming the path and where the TOML is wrong."""
    path = tmp_path / "bad.toml"
    path.write_text("[ps]\nlr = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load(path)
    assert str(path) in str(info.value) and "line 2" in str(info.value)


# ---------------------------------------------------------------------------------------------- --set parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ps.shards=4", ("ps", "shards", 4)),
        ("train.seed=0x10", ("train", "seed", 16)),
        ("ps.lr=0.5", ("ps", "lr", 0.5)),
        ("ps.lr=1e-3", ("ps", "lr", 1e-3)),
        ("ps.local_apply=true", ("ps", "local_apply", True)),
        ("data.whiten=false", ("data", "whiten", False)),
        ("data.source=digits", ("data", "source", "digits")),
        ("data.source=lfw-faces", ("data", "source", "lfw-faces")),
        ('data.source="lfw-faces"', ("data", "source", "lfw-faces")),
        (" ps.lr = 0.25 ", ("ps", "lr", 0.25)),
        ("data.source=a=b", ("data", "source", "a=b")),
        ("ps.lr=", ("ps", "lr", "")),
    ],
)
def test_parse_override_types(text: str, expected: tuple[str, str, Any]) -> None:
    """Values are TOML literals (ints, floats, bools, quoted strings), else bare strings."""
    section, key, value = parse_override(text)
    assert (section, key, value) == expected
    assert type(value) is type(expected[2])


@pytest.mark.parametrize("text", ["ps.lr", "lr=1", "a.b.c=1", ".lr=1", "ps.=1", "=1"])
def test_parse_override_malformed(text: str) -> None:
    """A --set that is not section.key=value is a ConfigError echoing it."""
    with pytest.raises(ConfigError, match=r"section\.key=value") as info:
        parse_override(text)
    assert repr(text) in str(info.value)


def test_overrides_to_dict_merges_sections() -> None:
    """Several overrides nest by section; the last one of a key wins."""
    nested = overrides_to_dict(["ps.lr=0.5", "ps.shards=3", "cluster.workers=1", "ps.lr=0.25"])
    assert nested == {"ps": {"lr": 0.25, "shards": 3}, "cluster": {"workers": 1}}


def test_overrides_apply_with_types() -> None:
    """Parsed overrides end up in the config with the declared types."""
    config = load(None, ["ps.lr=1", "ps.local_apply=true", "data.source=digits", "train.steps=7"])
    assert config.ps.lr == 1.0 and isinstance(config.ps.lr, float)
    assert config.ps.local_apply is True
    assert config.data.source == "digits"
    assert config.train.steps == 7


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("raw", "tokens"),
    [
        ({"foo": {"bar": 1}}, ["'foo'"]),
        ({"ps": {"foo": 1}}, ["ps.foo"]),
        ({"data": {"colour": "red"}}, ["data.colour"]),
        ({"ps": 3}, ["'ps'", "3"]),
    ],
)
def test_unknown_section_or_key(raw: dict[str, Any], tokens: list[str]) -> None:
    """Unknown sections and keys are refused, naming them."""
    with pytest.raises(ConfigError) as info:
        from_dict(raw)
    assert _mentions(str(info.value), *tokens), str(info.value)


@pytest.mark.parametrize(
    ("section", "key", "value", "shown"),
    [
        ("ps", "shards", 2.5, "2.5"),
        ("ps", "shards", "2", "'2'"),
        ("ps", "shards", True, "True"),
        ("ps", "lr", "fast", "'fast'"),
        ("ps", "lr", False, "False"),
        ("ps", "local_apply", 1, "1"),
        ("ps", "local_apply", "yes", "'yes'"),
        ("data", "source", 3, "3"),
        ("train", "seconds", [1], "[1]"),
    ],
)
def test_wrong_type(section: str, key: str, value: Any, shown: str) -> None:
    """A value of the wrong type is refused, naming the key and echoing the value."""
    with pytest.raises(ConfigError) as info:
        from_dict({section: {key: value}})
    message = str(info.value)
    assert f"{section}.{key}" in message and shown in message, message


OUT_OF_RANGE = [
    ("ps.shards=0", "ps.shards", "0"),
    ("ps.shards=-3", "ps.shards", "-3"),
    ("ps.lr=-1", "ps.lr", "-1.0"),
    ("ps.lr=0", "ps.lr", "0.0"),
    ("ps.lr=nan", "ps.lr", "nan"),
    ("ps.adagrad_eps=0", "ps.adagrad_eps", "0.0"),
    ("ps.n_fetch=0", "ps.n_fetch", "0"),
    ("ps.n_push=0", "ps.n_push", "0"),
    ("ps.rule=nope", "ps.rule", "'nope'"),
    ("cluster.workers=0", "cluster.workers", "0"),
    ("cluster.backend=mpi", "cluster.backend", "'mpi'"),
    ("cluster.threads_per_worker=-1", "cluster.threads_per_worker", "-1"),
    ("data.source=nope", "data.source", "'nope'"),
    ("data.patch_size=1", "data.patch_size", "1"),
    ("data.patch_size=129", "data.patch_size", "129"),
    ("data.examples=0", "data.examples", "0"),
    ("data.held_out=0", "data.held_out", "0"),
    ("data.whiten_eps=0", "data.whiten_eps", "0.0"),
    ("model.name=nope", "model.name", "'nope'"),
    ("model.features=0", "model.features", "0"),
    ("model.sparsity=-0.5", "model.sparsity", "-0.5"),
    ("model.epsilon=0", "model.epsilon", "0.0"),
    ("train.batch_size=0", "train.batch_size", "0"),
    ("train.seconds=-1", "train.seconds", "-1.0"),
    ("train.steps=-1", "train.steps", "-1"),
    ("train.seed=-1", "train.seed", "-1"),
    ("train.checkpoint_every=0", "train.checkpoint_every", "0.0"),
]


@pytest.mark.parametrize(("override", "key", "shown"), OUT_OF_RANGE)
def test_out_of_range(override: str, key: str, shown: str) -> None:
    """Each out-of-range value or unknown choice is refused, naming the key and echoing the value."""
    with pytest.raises(ConfigError) as info:
        load(None, [override])
    assert _mentions(str(info.value), key, shown), str(info.value)


def test_no_budget_at_all() -> None:
    """train.seconds = 0 and train.steps = 0 would run forever: refused."""
    with pytest.raises(ConfigError, match=r"train\.seconds") as info:
        load(None, ["train.seconds=0"])
    assert "train.steps" in str(info.value)
    assert load(None, ["train.seconds=0", "train.steps=10"]).train.steps == 10


def test_infinite_lr_is_refused() -> None:
    """An infinite learning rate turns every parameter into Inf or NaN on the first push."""
    with pytest.raises(ConfigError, match=r"ps\.lr"):
        load(None, ["ps.lr=inf"])


@pytest.mark.parametrize("value", ["inf", "1e400"])
def test_infinite_adagrad_eps_is_refused(value: str) -> None:
    """An infinite eps makes every Adagrad step lr·g/(√G + ∞) = 0: a run that trains nothing while it says it ran
    (1e400 overflows to inf as it is read). Refused by the config, naming ps.adagrad_eps."""
    with pytest.raises(ConfigError, match=r"^invalid ps\.adagrad_eps: inf \(must be a finite number > 0\)$"):
        load(None, ["ps.rule=adagrad", f"ps.adagrad_eps={value}"])


# ---------------------------------------------------------------------------------------------- the CLI, in process

# (arguments, tokens the one error line must hold). Run in process through ``cli.main`` (fast); a subset runs
# below as a real ``python -m downpour`` subprocess.
CLI_CASES: dict[str, tuple[list[str], list[str]]] = {
    "lr": (["--set", "ps.lr=-1"], ["ps.lr", "-1.0"]),
    "unknown-key": (["--set", "data.foo=1"], ["data.foo"]),
    "unknown-section": (["--set", "foo.bar=1"], ["'foo'"]),
    "shards": (["--shards", "0"], ["ps.shards", "0"]),
    "workers": (["--workers", "0"], ["cluster.workers", "0"]),
    "workers-type": (["--workers", "two"], ["cluster.workers", "'two'"]),
    "source": (["--set", "data.source=nope"], ["data.source", "'nope'"]),
    "model": (["--set", "model.name=nope"], ["model.name", "'nope'"]),
    "rule": (["--set", "ps.rule=nope"], ["ps.rule", "'nope'"]),
    "backend": (["--backend", "mpi"], ["cluster.backend", "'mpi'"]),
    "no-equals": (["--set", "ps.lr"], ["'ps.lr'"]),
}


def _one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert stderr.endswith("\n")
    assert lines[0].startswith("downpour: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_bad_value_in_process(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``downpour train`` with a bad value exits 2 with one error line naming key and value, writing nothing."""
    args, tokens = CLI_CASES[case]
    out = tmp_path / "run"
    assert main(["train", *args, "--out", str(out), "--no-progress"]) == 2
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert _mentions(line, *tokens), line
    assert captured.out == ""
    assert not out.exists()


def test_cli_missing_and_malformed_config_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing or malformed --config file exits 2 naming the file."""
    missing = tmp_path / "missing.toml"
    assert main(["train", "--config", str(missing), "--out", str(tmp_path / "run")]) == 2
    assert str(missing) in _one_error_line(capsys.readouterr().err)
    bad = tmp_path / "bad.toml"
    bad.write_text("[ps\nshards = 2\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(bad) in line and "TOML" in line


def test_cli_resume_with_config_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--resume reads the run's own config, so --config alongside it is a usage error."""
    (tmp_path / "c.toml").write_text("")
    assert main(["train", "--resume", str(tmp_path), "--config", str(tmp_path / "c.toml")]) == 2
    assert "--config" in _one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------- the CLI, subprocess

# Each run imports torch and matplotlib before it reads its arguments (about 3 s of CPU on a small machine), so only
# one case per kind of failure runs as a real subprocess, all started together once per module: a bad value, a bad
# file, and more shards than parameters, which is found only after the dataset loads (fewer examples keep that quick;
# the model still has 256 features × 16·16 inputs = 65,536 parameters).
SUBPROCESS_CASES: dict[str, tuple[list[str], list[str]]] = {
    "lr": (["--set", "ps.lr=-1"], ["ps.lr", "-1.0"]),
    "malformed-config": (["--config", "{tmp}/bad.toml"], ["{tmp}/bad.toml"]),
    "shards-over-params": (
        ["--set", "ps.shards=100000000", "--set", "data.examples=2000", "--set", "data.held_out=256"],
        ["ps.shards", "100000000", "65536"],
    ),
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    """Run every subprocess case at once; return each one's completed process and its --out directory."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "bad.toml").write_text('[ps]\nrule = "sgd\n')
    procs = {}
    for name, (args, _) in SUBPROCESS_CASES.items():
        out = tmp / f"run-{name}"
        command = [sys.executable, "-m", "downpour", "train", *(a.format(tmp=tmp) for a in args), "--out", str(out)]
        procs[name] = (
            subprocess.Popen(command, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            out,
            command,
        )
    finished = finish_all({name: proc for name, (proc, _, _) in procs.items()}, timeout=120)
    return {name: (subprocess.CompletedProcess(command, *finished[name]), out)
            for name, (_, out, command) in procs.items()}  # fmt: skip


@pytest.mark.parametrize("case", list(SUBPROCESS_CASES))
def test_cli_bad_value_subprocess(
    case: str, cli_runs: dict[str, tuple[subprocess.CompletedProcess[str], Path]]
) -> None:
    """``python -m downpour train`` exits 2, prints exactly one line naming key (or file) and value, no traceback."""
    result, out = cli_runs[case]
    assert result.returncode == 2, result.stderr
    line = _one_error_line(result.stderr)
    tmp = out.parent
    tokens = [t.format(tmp=tmp) for t in SUBPROCESS_CASES[case][1]]
    assert _mentions(line, *tokens), line
    assert not out.exists()


def test_a_config_error_comes_back_before_torch_is_imported() -> None:
    """The CLI checks the config first: a typo costs a fraction of a second, not torch's import."""
    code = (
        "import sys\n"
        "from downpour.cli import main\n"
        "status = main(['train', '--set', 'ps.policy=bogus'])\n"
        "print(status, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["2", "False"], result.stderr
    assert "invalid ps.policy" in result.stderr


def test_a_config_file_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Some Windows editors start UTF-8 files with a BOM: it was "not valid TOML ... at line 1, column 1"."""
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf[train]\nsteps = 5\n")
    assert config_mod.load(path).train.steps == 5


def test_chaos_schedule_parses_and_errors_name_the_key() -> None:
    """``cluster.chaos`` reads KIND:TIME items in any order, sorted by time (minutes are 60 s); every mistake names
    cluster.chaos, the value and what is wrong. Parsing needs no Ray: a config is checked where Ray is missing."""
    from downpour.backends.chaos import parse_chaos

    assert parse_chaos("") == []
    assert parse_chaos("kill-shard:60s, kill-worker:30s") == [("kill-worker", 30.0), ("kill-shard", 60.0)]
    assert parse_chaos("kill-worker:2m,kill-worker:1.5") == [("kill-worker", 1.5), ("kill-worker", 120.0)]
    assert parse_chaos("kill-shard:.5s") == [("kill-shard", 0.5)]
    for bad, words in [
        ("kill-node:30s", ["kill-node", "kill-worker, kill-shard"]),
        ("kill-worker", ["KIND:TIME"]),
        ("kill-worker:", ["KIND:TIME"]),
        ("kill-worker:soon", ["'soon'"]),
        ("kill-worker:-5s", ["'-5s'", ">= 0"]),
        ("kill-worker:30s,,kill-shard:60s", ["empty item"]),
        ("kill-worker:30s,", ["empty item"]),
        ("kill-worker:30h", ["'30h'"]),
        ("kill-worker:" + "9" * 400, ["not finite"]),  # digits enough to overflow a float
    ]:
        with pytest.raises(ConfigError) as error:
            parse_chaos(bad)
        message = str(error.value)
        assert message.startswith("invalid cluster.chaos: ") and repr(bad) in message
        for word in words:
            assert word in message, (bad, message)


def test_a_chaos_schedule_is_checked_when_the_config_is_read() -> None:
    """cluster.chaos is for the ray backend only, and a bad schedule is refused as the config is read."""
    config = load(None, ["cluster.backend=ray", "cluster.chaos=kill-shard:2s"])
    assert config.cluster.chaos == "kill-shard:2s"
    for overrides, words in [
        (["cluster.chaos=kill-worker:1s"], ["cluster.chaos", "ray backend only"]),
        (["cluster.backend=ray", "cluster.chaos=kill-worker"], ["invalid cluster.chaos", "KIND:TIME"]),
    ]:
        with pytest.raises(ConfigError) as error:
            load(None, overrides)
        for word in words:
            assert word in str(error.value), (overrides, str(error.value))
