"""README.md stays true: every ```python block runs as written, each on its own, and a comment that is a value
(``# 0``, ``# (32, 8, 37, 37)``, ``# PushResult(...)``) must be what its line gives; every ``downpour`` command in a
```bash block or with options in a code span of the prose parses with the command's own parser, and its ``--set``
keys and values pass the config's checks; the synopsis in "The CLI" names every subcommand and option as the parser
has them; the TOML in "Configuration" shows the real defaults; the error transcripts are what the command prints.
Nothing here trains or benchmarks."""

from __future__ import annotations

import argparse
import ast
import io
import math
import re
import shlex
import tokenize
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch

from downpour import config as config_mod
from downpour.cli import SHORTHANDS, _train_config, build_parser
from downpour.errors import DownpourError
from downpour.study.staleness import study_config

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```[ \t]*$", re.S | re.M)
NO_VALUE = object()  # a statement that gives no value (an import, a `for` loop, ...)


def _blocks(language: str) -> list[tuple[int, str]]:
    """``(line of the opening fence, text)`` of every fenced block in ``language`` ("" for unlabelled ones)."""
    return [(TEXT.count("\n", 0, m.start()) + 1, m.group(2)) for m in FENCE.finditer(TEXT) if m.group(1) == language]


def _logical_lines(first: int, block: str) -> list[tuple[int, str]]:
    """``(README line, text)`` of a shell block's lines, backslash continuations joined; an indented line continues
    a synopsis line (``downpour ... [--opt]``), as the synopsis wraps without backslashes."""
    lines: list[tuple[int, str]] = []
    continued = False
    for n, raw in enumerate(block.splitlines(), start=first + 1):
        if continued:
            lines[-1] = (lines[-1][0], lines[-1][1][:-1] + raw)
        elif lines and raw[:1].isspace() and "[--" in lines[-1][1]:
            lines[-1] = (lines[-1][0], f"{lines[-1][1]} {raw.strip()}")
        else:
            lines.append((n, raw))
        continued = lines[-1][1].endswith("\\")
    return lines


def _shell_lines() -> list[tuple[int, str]]:
    return [line for first, block in _blocks("bash") for line in _logical_lines(first, block)]


SYNOPSES = [(n, line) for n, line in _shell_lines() if line.startswith("downpour ") and "[--" in line]


def _commands() -> list[tuple[int, list[str]]]:
    """Every ``downpour`` command of the ```bash blocks, comments stripped, split at ``&&``, ``||``, ``|``, ``;``."""
    commands = []
    for n, line in _shell_lines():
        if (n, line) in SYNOPSES:
            continue
        command: list[str] = []
        for word in [*shlex.split(line, comments=True), ";"]:
            if word not in ("&&", "||", "|", ";"):
                command.append(word)
                continue
            if command[:1] == ["downpour"]:
                commands.append((n, command[1:]))
            command = []
    return commands


INLINE = re.compile(r"`(downpour [^`]*--[^`]*)`")  # a command with options in a code span of the prose
PLACEHOLDER = re.compile(r"(?:^|=)(?:\.\.\.|[A-Z])$")  # --seed N, ps.policy=P, ps.lr=...: a value left to the reader


def _inline_commands() -> list[tuple[int, list[str]]]:
    """The prose's ``downpour ...`` code spans that show options (a span may wrap a line), outside fenced blocks; a
    span holding a placeholder value (``--seed N``, ``--set ps.lr=...``) is left out, a placeholder path (``RUN``,
    ``--out DIR``) is not."""
    fenced = [m.span() for m in FENCE.finditer(TEXT)]
    commands = []
    for m in INLINE.finditer(TEXT):
        words = m.group(1).split()
        if any(a <= m.start() < b for a, b in fenced) or any(PLACEHOLDER.search(word) for word in words):
            continue
        commands.append((TEXT.count("\n", 0, m.start()) + 1, words[1:]))
    return commands


COMMANDS = _commands() + _inline_commands()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every runnable command path (``("bench", "ps")``, ``("report",)``, ...) and its parser."""
    children = _subparsers(parser)
    if not children:
        return {path: parser}
    return {leaf: p for name, child in children.items() for leaf, p in _leaves(child, (*path, name)).items()}


def _parse(argv: list[str], capsys: pytest.CaptureFixture[str]) -> argparse.Namespace:
    """``argv`` parsed by the ``downpour`` parser; a usage error fails the test with argparse's own message."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"argparse refuses `downpour {shlex.join(argv)}`: {capsys.readouterr().err.strip()}")


def _cases(cases: list[tuple]) -> list[Any]:
    """Parametrized cases named by their README line (the first item of each)."""
    return [pytest.param(*case, id=f"README.md:{case[0]}") for case in cases]


# ---- ```python blocks ------------------------------------------------------------------------------------------


def _claim(comment: str | None) -> tuple[str, Any] | None:
    """What a comment claims about its line's value: a Python literal, or a repr like ``Name(a=1)``; prose: None."""
    if not comment:
        return None
    try:
        return "literal", ast.literal_eval(comment)
    except (ValueError, SyntaxError, TypeError):
        pass
    return ("repr", comment) if re.fullmatch(r"[A-Z]\w*\(.*\)", comment) else None


def _holds(claim: Any, value: Any) -> bool:
    """A tuple claims a tensor's shape, a dict each of its values; a number with a decimal point holds to 1% (the
    README rounds); anything else must be equal and of the same type."""
    if isinstance(claim, tuple) and isinstance(value, torch.Tensor):
        return tuple(value.shape) == claim
    if isinstance(claim, dict):
        same_keys = isinstance(value, dict) and claim.keys() == value.keys()
        return same_keys and all(_holds(claim[k], value[k]) for k in claim)
    if isinstance(claim, float) and isinstance(value, int | float) and not isinstance(value, bool):
        return math.isclose(value, claim, rel_tol=0.01)
    return type(claim) is type(value) and claim == value


def _run_statement(statement: ast.stmt, namespace: dict[str, Any]) -> Any:
    """Run one top-level statement; return the value of an expression or of a plain ``name = ...``."""
    if isinstance(statement, ast.Expr):
        return eval(compile(ast.Expression(statement.value), str(README), "eval"), namespace)
    exec(compile(ast.Module([statement], type_ignores=[]), str(README), "exec"), namespace)
    targets = statement.targets if isinstance(statement, ast.Assign) else []
    return namespace[targets[0].id] if len(targets) == 1 and isinstance(targets[0], ast.Name) else NO_VALUE


@pytest.mark.parametrize("first, code", _cases(_blocks("python")))
def test_python_block_runs_and_its_values_hold(first: int, code: str) -> None:
    """One fresh namespace per block, so each must be self-contained (users copy one block at a time); the global
    torch RNG is restored afterwards. One torch thread: the simulator block's thousands of tiny products took 45 times
    longer on two threads of a busy 2-core machine. Tracebacks name README.md and its line numbers."""
    tree = ast.parse(code)
    ast.increment_lineno(tree, first)
    tokens = tokenize.generate_tokens(io.StringIO(code).readline)
    comments = {t.start[0] + first: t.string[1:].strip() for t in tokens if t.type == tokenize.COMMENT}
    namespace: dict[str, Any] = {"__name__": "__readme__"}
    with torch.random.fork_rng(devices=[]):
        for statement in tree.body:
            value = _run_statement(statement, namespace)
            claim = _claim(comments.get(statement.end_lineno or statement.lineno))
            if claim is None:
                continue
            where = f"README.md:{statement.end_lineno}"
            assert value is not NO_VALUE, f"{where}: the comment claims a value, but the line gives none"
            kind, expected = claim
            ok = repr(value) == expected if kind == "repr" else _holds(expected, value)
            shown = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
            said = expected if kind == "repr" else repr(expected)
            assert ok, f"{where}: the comment says {said}, the line gives {shown}"


def test_claims_are_read_from_comments() -> None:
    """The rules above, on their own: prose is no claim, and a wrong claim is caught."""
    assert _claim("the RICA objective on a batch (B, D)") is None and _claim(None) is None
    assert _claim("(32, 8, 37, 37)") == ("literal", (32, 8, 37, 37))
    assert _claim("PushResult(applied=True)") == ("repr", "PushResult(applied=True)")
    assert _holds((2, 3), torch.zeros(2, 3)) and not _holds((3, 2), torch.zeros(2, 3))
    assert _holds({"mean": 575.7, "p99": 1333}, {"mean": 575.733, "p99": 1333})
    assert not _holds({"mean": 575.7, "p99": 1333}, {"mean": 575.733, "p99": 1334})
    assert not _holds(8.1, 8.5) and not _holds(0, 0.0) and not _holds(1, True)


# ---- ```bash blocks: commands ----------------------------------------------------------------------------------


@pytest.mark.parametrize("line, argv", _cases(COMMANDS))
def test_command_parses_and_its_config_is_valid(
    line: int, argv: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The command's own parser, then the command's own config resolution (``--set`` keys, the shorthands, design
    defaults, every check of ``config.validate``) for ``train`` and ``study staleness``; a key the chosen design never
    reads would only be warned about at run time, so here it fails."""
    args = _parse(argv, capsys)
    try:
        if args.command == "train":
            args.resume = None  # a README run directory does not exist here: check the --set keys on the defaults
            args.out = tmp_path  # so that no runs/<timestamp> is created
            ignored = config_mod.ignored_keys(_train_config(args)[0])
            assert not ignored, f"README.md:{line}: {'; '.join(ignored)}"
        elif args.command == "study" and args.study == "staleness":
            study_config(args.config, args.set)
    except DownpourError as exc:
        pytest.fail(f"README.md:{line}: `downpour {shlex.join(argv)}`: {exc}")


# ---- ```bash blocks: the synopsis ------------------------------------------------------------------------------

OPTION = re.compile(r"(\[)?(--[a-z][\w-]*)(?:\s+(?!-)([^\s\[\]]+))?")


def _synopsis(line: str) -> tuple[tuple[str, ...], list[str], list[tuple[bool, str, str | None]]]:
    """``downpour eval probe RUN_DIR [--data digits]`` -> the command path, the positional placeholders, and
    ``(bracketed, option, value)`` of each option."""
    words = line.split()[1:]
    path = tuple(words[: next((i for i, w in enumerate(words) if not re.fullmatch(r"[a-z][a-z-]*", w)), len(words))])
    rest = words[len(path) :]
    positionals = rest[: next((i for i, w in enumerate(rest) if w[0] in "[-"), len(rest))]
    options = [(bool(m[1]), m[2], m[3]) for m in OPTION.finditer(" ".join(rest))]
    return path, positionals, options


def _is_placeholder(value: str) -> bool:
    """``N``, ``FILE.toml``, ``HOST:PORT``, ``...``, ``section.key=value``: not a value the README claims."""
    return value[0].isupper() or value == "..." or "=" in value


def _same(shown: str, default: Any) -> bool:
    if isinstance(default, int | float) and not isinstance(default, bool):
        try:
            return float(shown) == float(default)
        except ValueError:
            return False
    return shown == str(default)


def _synopsis_problems() -> list[str]:
    leaves = _leaves(build_parser())
    seen: dict[tuple[str, ...], set[str]] = {}
    problems = []
    for n, line in SYNOPSES:
        path, positionals, options = _synopsis(line)
        where = f"README.md:{n} `downpour {' '.join(path)}`"
        parser = leaves.get(path)
        if parser is None:
            problems.append(f"{where}: no such command (commands: {sorted(' '.join(p) for p in leaves)})")
            continue
        wanted = [a.metavar or a.dest.upper() for a in parser._actions if not a.option_strings]
        if positionals != wanted:
            problems.append(f"{where}: positionals {positionals}, the parser takes {wanted}")
        for bracketed, name, value in options:
            action = parser._option_string_actions.get(name)
            if action is None:
                problems.append(f"{where}: no option {name}")
                continue
            seen.setdefault(path, set()).add(name)
            if action.required and bracketed:
                problems.append(f"{where}: {name} is required, shown in brackets")
            if value is None or _is_placeholder(value):
                continue
            if "|" in value:
                problems += _choice_problems(where, path, name, value.split("|"), action)
            elif action.default is not None and not _same(value, action.default):
                problems.append(f"{where}: {name} {value}, but its default is {action.default!r}")
    for path, parser in leaves.items():
        options = {s for a in parser._actions for s in a.option_strings if s.startswith("--")} - {"--help"}
        missing = sorted(options - seen.get(path, set()))
        if missing:
            problems.append(f"`downpour {' '.join(path)}`: the synopsis lacks {missing}")
    return problems


def _choice_problems(where: str, path: tuple[str, ...], name: str, shown: list[str], action: Any) -> list[str]:
    """``--backend local|sim|ray``: argparse's choices, or for ``train``'s shorthands the config key's checks."""
    if action.choices is not None:
        return [] if sorted(shown) == sorted(action.choices) else [f"{where}: {name} {shown}, choices {action.choices}"]
    if path == ("train",) and name[2:] in SHORTHANDS:
        problems = []
        for value in shown:
            try:
                config_mod.load(None, [f"{SHORTHANDS[name[2:]]}={value}"])
            except DownpourError as exc:
                problems.append(f"{where}: {name} {value}: {exc}")
        return problems
    return [f"{where}: {name} shows choices, the parser has none"]


def test_synopsis_matches_the_parser() -> None:
    """Every subcommand and option in the synopsis exists, no option is missing, the positional placeholders are the
    parser's metavars, required options are not in brackets, ``a|b`` lists the choices, and a value shown that is not
    a placeholder (``[--seeds 10]``) is the default (``[--units 0,1,2]``, with no default, is an example)."""
    problems = _synopsis_problems()
    assert not problems, "\n".join(problems)


# ---- ```toml and the error transcripts -------------------------------------------------------------------------


def test_configuration_block_shows_every_key_and_its_default() -> None:
    (block,) = [code for _, code in _blocks("toml")]
    assert tomllib.loads(block) == config_mod.Config().to_dict()


TRANSCRIPTS = [
    (first + 1 + i, lines[i][2:], lines[i + 1])
    for first, block in _blocks("")
    for lines in [block.splitlines()]
    for i in range(len(lines) - 1)
    if lines[i].startswith("$ downpour train ")
]


@pytest.mark.parametrize("line, command, expected", _cases(TRANSCRIPTS))
def test_error_transcript_is_what_the_command_prints(
    line: int, command: str, expected: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``$ downpour train --set ...`` followed by its one-line error: the config is resolved as the command does it,
    without training (a transcript of a command that is accepted fails here)."""
    args = _parse(shlex.split(command)[1:], capsys)
    args.out = tmp_path
    with pytest.raises(DownpourError) as refused:
        _train_config(args)
    assert f"downpour: error: {refused.value}" == expected, f"README.md:{line}"


def test_the_readme_has_what_these_tests_read() -> None:
    """A changed fence or synopsis layout would otherwise leave the parametrized tests with nothing to check."""
    assert len(_blocks("python")) >= 3 and len(COMMANDS) >= 10 and len(TRANSCRIPTS) >= 2
    assert {_synopsis(line)[0] for _, line in SYNOPSES} == set(_leaves(build_parser()))
