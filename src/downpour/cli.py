"""The ``downpour`` command: ``train``, ``bench``, ``study``, ``report``, ``eval``, ``viz`` and ``detect``.

Errors a user can fix (bad config keys or values, missing or corrupt files) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import gc
import math
import signal
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from downpour import config as config_mod
from downpour import rundir
from downpour.cli_eval import add_eval, cmd_detect, cmd_eval, cmd_viz
from downpour.cli_paths import path_argument
from downpour.cli_report import add_report, cmd_report
from downpour.cli_study import add_study, cmd_study
from downpour.console import warn
from downpour.errors import NESTS_TOO_DEEPLY, DownpourError, nests_too_deeply, out_of_memory
from downpour.signals import as_interrupt, routed

# What a failed allocation in the command itself (not in a worker) asks the user to make smaller.
MEMORY_HINT = "reduce model.features / data.examples / data.image_size / train.batch_size, or the size of the input"

SHORTHANDS = {
    "workers": "cluster.workers",
    "shards": "ps.shards",
    "backend": "cluster.backend",
    "seconds": "train.seconds",
    "steps": "train.steps",
    "seed": "train.seed",
}


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model with Downpour SGD", description="Train a model with Downpour SGD.")
    p.add_argument("--config", type=path_argument, help="TOML file with [data] [model] [train] [ps] [cluster] sections")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config key (repeatable)",
    )
    p.add_argument("--out", type=path_argument, help="run directory (default: runs/<timestamp>)")
    p.add_argument("--resume", type=path_argument, metavar="RUN_DIR", help="continue a stopped run")
    p.add_argument("--workers", type=str, help="cluster.workers")
    p.add_argument("--shards", type=str, help="ps.shards")
    p.add_argument("--backend", type=str, help="cluster.backend")
    p.add_argument("--seconds", type=str, help="train.seconds (wall-clock budget)")
    p.add_argument("--steps", type=str, help="train.steps (pushes across all workers, rejected ones too)")
    p.add_argument("--seed", type=str, help="train.seed")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    p.add_argument("--tensorboard", action="store_true", help="train.tensorboard: also write RUN_DIR/tensorboard/")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks", description="Benchmarks that print tables or --json.")
    which = p.add_subparsers(dest="bench", required=True)
    ps = which.add_parser("ps", help="parameter-server throughput against plain, Hogwild and copy baselines")
    ps.add_argument("--seconds", type=float, default=0.5, help="seconds per measured window")
    ps.add_argument("--rounds", type=int, default=12, help="rounds of windows, every configuration once a round")
    ps.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ps.add_argument(
        "--backend", choices=("local", "ray"), default="local",
        help="ray: the Ray backend against Ray's documented parameter-server pattern and the local backend",
    )  # fmt: skip
    ps.add_argument("--address", default="", help="--backend ray: a running Ray cluster (default: a private one)")
    layers = which.add_parser("layers", help="LocallyConnected2d against unfold+bmm, and untied against tied")
    layers.add_argument("--repeats", type=int, default=5, help="repetitions per timing (the fastest is reported)")
    layers.add_argument("--no-memory", action="store_true", help="skip the saved-for-backward memory count")
    layers.add_argument(
        "--skip-steps", type=int, default=150, help="training steps per tau for the variance skip's loss (0: none)"
    )
    layers.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    sim = which.add_parser("sim", help="the simulator's overhead over a plain loop doing the same gradients")
    sim.add_argument("--workers", type=int, default=1000, help="simulated workers")
    sim.add_argument("--steps", type=int, default=3000, help="pushes per repeat")
    sim.add_argument("--repeats", type=int, default=5, help="repeats (the median ratio is reported)")
    sim.add_argument("--policy", type=str, default="downpour", help="ps.policy to simulate (e.g. ssp:4)")
    sim.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


class _ShowsDefaults(argparse.HelpFormatter):
    """Help that names each option's default, where it has one worth naming (not None or False) and its text does
    not name it already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (not text or "default" in text or default is None or default is argparse.SUPPRESS or default == []
                or isinstance(default, bool) or not action.option_strings):  # fmt: skip
            return action.help  # (a flag's False, an unset option's None, a repeatable one's []: nothing to name)
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Every parser of the command (subcommands included) shows the options' defaults in its help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _ShowsDefaults)
        if kwargs.get("description"):  # module docstrings: reST's ``code`` marks read as noise in a terminal
            kwargs["description"] = kwargs["description"].replace("``", "")
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``downpour`` command."""
    parser = _Parser(prog="downpour", description=__doc__.splitlines()[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_bench(sub)
    add_study(sub)
    add_report(sub)
    add_eval(sub)
    return parser


def _train_config(args: argparse.Namespace) -> tuple[config_mod.Config, Path | None, bool]:
    """The run's config, its directory (None: a new one under runs/, made once nothing else can refuse the run)
    and whether it resumes."""
    overrides = list(args.overrides)
    for flag, key in SHORTHANDS.items():
        value = getattr(args, flag)
        if value is not None:
            _refuse_a_disagreeing_set(f"--{flag} {value}", key, str(value), args.overrides)
            overrides.append(f"{key}={value}")
    if args.tensorboard:
        _refuse_a_disagreeing_set("--tensorboard", "train.tensorboard", "true", args.overrides)
        overrides.append("train.tensorboard=true")
    if args.resume is not None:
        if args.config is not None:
            raise DownpourError("--resume reads the run's own config.toml; drop --config")
        if args.out is not None and _resolved(args.out) != _resolved(args.resume):  # the same folder, however named
            raise DownpourError("--resume continues RUN_DIR in place; drop --out")
        if not (args.resume / rundir.CONFIG).is_file():
            raise DownpourError(rundir.not_resumable(args.resume))
        config = config_mod.load(args.resume / rundir.CONFIG, overrides)
        return config, args.resume, True
    config = config_mod.load(args.config, overrides)
    out = args.out if args.out is not None else Path("runs") / "new"
    if (run := _run_around(out)) is not None:
        where = f"--out {args.out}" if args.out is not None else "the default --out runs/<time>"
        raise DownpourError(f"invalid --out: {where} is inside run {run}, whose files a run there could replace "
                            "(name a folder outside it)")  # fmt: skip
    return config, args.out, False


def _resolved(path: Path) -> Path:
    """``path`` with its links followed and made absolute; as it is where that cannot be done (a link loop: its
    own error comes where the path is used)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path


def _run_around(path: Path) -> Path | None:
    """The downpour run directory that ``path`` lies inside (one holding config.toml, metrics.jsonl and its lock
    file), if any."""
    for folder in _resolved(path).parents:
        if all((folder / name).is_file() for name in (rundir.CONFIG, rundir.METRICS, rundir.LOCK)):
            return folder
    return None


def _refuse_a_disagreeing_set(flag: str, key: str, value: str, overrides: list[str]) -> None:
    """A ``--set KEY=...`` beside the shorthand flag for the same key, with another value, is refused: which one
    the user meant cannot be known (the flag used to win silently, whatever the order)."""
    wanted = config_mod.parse_override(f"{key}={value}")[2]
    for override in overrides:
        name, _, _ = override.partition("=")
        if name.strip() == key and config_mod.parse_override(override)[2] != wanted:  # 10 and 10.0 agree
            raise DownpourError(f"{flag} and --set {override.strip()} disagree: give one of them")


def _cmd_train(args: argparse.Namespace, console: Console) -> int:
    config, out, resume = _train_config(args)  # config errors come back at once, before torch is imported
    for note in config_mod.ignored_keys(config):
        warn(console, note)
    _check_environment()
    from downpour.train import headline, raise_if_diverged, run_training, summary_json

    if out is not None:
        summary = run_training(config, out, resume=resume, console=console, show_progress=not args.no_progress)
    else:
        root_made = not Path("runs").exists()
        out = rundir.new_run_dir()
        try:
            summary = run_training(config, out, resume=False, console=console, show_progress=not args.no_progress)
        except BaseException:
            rundir.remove_unused(out, root_too=root_made)  # a refused run leaves no empty runs/<timestamp>
            raise
    if args.json:
        print(summary_json(summary))
    raise_if_diverged(summary)
    print(headline(summary), file=sys.stderr if args.json else sys.stdout)
    if summary["interrupted"]:
        return 130
    if summary["session_worker_deaths"] >= config.cluster.workers:  # this session's: a resumed run counts all
        return 1
    return 0


def _check_environment() -> None:
    """Refuse a bad environment switch before a run starts (see :func:`downpour.nn.triton_autotune.switch`)."""
    from downpour.nn import triton_autotune

    triton_autotune.switch()


def _cmd_bench(args: argparse.Namespace, console: Console) -> int:
    if args.bench == "ps":
        if not (math.isfinite(args.seconds) and args.seconds >= 0.1) or args.rounds < 1:
            raise DownpourError(f"bench ps needs a finite --seconds >= 0.1 (a window must hold some work) and "
                                f"--rounds >= 1, got {args.seconds} and {args.rounds}")  # fmt: skip
        if args.address and args.backend != "ray":
            raise DownpourError(f"--address {args.address} joins a Ray cluster: it needs --backend ray")
        from downpour.bench import ps as bench_ps  # after the flags, and only for this benchmark (it imports torch)

        if args.backend == "ray":
            from downpour.backends import require_ray

            require_ray("bench ps --backend ray")
            from downpour.bench import ray_ps as bench_ps  # type: ignore[no-redef]

            result = bench_ps.run(seconds=args.seconds, rounds=args.rounds, address=args.address)
        else:
            result = bench_ps.run(seconds=args.seconds, rounds=args.rounds)
        if args.json:
            print(rundir.json_text(result))
        else:
            bench_ps.print_table(result, Console(width=None if sys.stdout.isatty() else 120))
        return 0
    if args.bench == "layers":
        from downpour.bench import layers as bench_layers

        if args.repeats < 1:
            raise DownpourError(f"bench layers needs --repeats >= 1, got {args.repeats}")
        if args.skip_steps < 0:
            raise DownpourError(f"bench layers needs --skip-steps >= 0, got {args.skip_steps}")
        result = bench_layers.run(repeats=args.repeats, memory=not args.no_memory, skip_steps=args.skip_steps)
        if args.json:
            print(rundir.json_text(result))
        else:
            bench_layers.print_tables(result, Console(width=None if sys.stdout.isatty() else 120))
        return 0
    if args.bench == "sim":
        from downpour.bench import sim as bench_sim

        if args.workers < 1 or args.steps < 1 or args.repeats < 1:
            raise DownpourError(
                f"bench sim needs --workers, --steps and --repeats >= 1, got {args.workers}, {args.steps}, "
                f"{args.repeats}"
            )
        result = bench_sim.run(workers=args.workers, steps=args.steps, repeats=args.repeats, policy=args.policy)
        if args.json:
            print(rundir.json_text(result))
        else:
            bench_sim.print_table(result, Console(width=None if sys.stdout.isatty() else 120))
        return 0
    raise AssertionError(args.bench)  # pragma: no cover - argparse restricts the choices


def main(argv: list[str] | None = None) -> int:
    """Run the ``downpour`` command; return its exit status."""
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        if args.command in ("bench", "study"):  # they run models: torch is imported anyway (train: once its config
            _check_environment()  # is read, so that config errors come back without waiting for torch)
        if args.command == "train":
            return _cmd_train(args, console)
        if args.command == "bench":
            return _cmd_bench(args, console)
        if args.command == "study":
            return cmd_study(args, console)
        if args.command == "eval":
            return cmd_eval(args, console)
        if args.command == "viz":
            return cmd_viz(args, console)
        if args.command == "detect":
            return cmd_detect(args, console)
        if args.command == "report":
            return cmd_report(args, console)
    except DownpourError as exc:
        print(f"downpour: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or directory that cannot be read or written: the input's fault, not a bug
        where = f" {exc.filename}" if exc.filename else ""
        print(f"downpour: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except RecursionError as exc:  # a JSON or TOML file nested past the limit, where its reader does not say which
        if not nests_too_deeply(exc):
            raise  # a bug, reported as one
        print(f"downpour: error: a JSON or TOML file that the command reads {NESTS_TOO_DEEPLY}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:  # numpy's _ArrayMemoryError, torch's allocators
        detail = out_of_memory(exc)
        if detail is None:  # another RuntimeError: a bug, reported as one
            raise
        print(f"downpour: error: out of memory: {detail} ({MEMORY_HINT})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("downpour: interrupted", file=sys.stderr)
        return 130
    raise AssertionError(args.command)  # pragma: no cover


def entry() -> None:
    """The ``downpour`` console script and ``python -m downpour``: :func:`main`, then exit without the interpreter's
    final garbage collections over every object torch created (about a second here; all output is written and
    closed by then, and exit handlers still run). Not where Triton was imported (``torch.optim`` imports it through
    ``torch._dynamo`` when it is installed): its objects are freed only by those collections, and nanobind prints
    every one still alive at exit as a "leak".

    A ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM routed to one) that passed through an ``exec`` of a string on its
    way to :func:`main` (scipy's imports make such calls while a run loads its data) leaves a flag in CPython that
    makes ``python -m downpour`` die by SIGINT at exit, though :func:`main` handled it and returned 130; one ``exec``
    of a string clears that flag, so the status returned is the one the process ends with. Once :func:`main` has
    returned, Ctrl-C is ignored: the run is over and saved, and a press during the exit handlers would only print a
    traceback.

    SIGTERM is Ctrl-C throughout (:func:`~downpour.signals.as_interrupt`, where a command does not route it itself):
    one that came after a session had routed it back to its default, as the last line was printed, killed the
    process with status 143 instead of 130; after :func:`main` has returned it is ignored too."""
    with routed(as_interrupt, [signal.SIGTERM]):
        status = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    exec("None")  # clears CPython's record of an interrupt that an exec'd string passed on (see above)
    if "triton" not in sys.modules:
        gc.freeze()
    raise SystemExit(status)


if __name__ == "__main__":
    entry()
