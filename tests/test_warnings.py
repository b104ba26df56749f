"""Warnings reach the user whole: one line each however narrow the terminal (or piped), and their text as it is,
a ``[`` in a path not taken for rich markup. The real command in a subprocess, on real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image
from skimage import data

from conftest import CliResult, finish_all


def _start(*args: str, columns: int) -> subprocess.Popen[str]:
    """``python -m downpour ARGS`` started with stderr a pipe ``columns`` characters wide."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": str(columns)}
    return subprocess.Popen([sys.executable, "-m", "downpour", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)  # fmt: skip


def _warnings_of(done: CliResult) -> list[str]:
    """The ``warning:`` lines of a command that succeeded."""
    assert done.returncode == 0, done.stderr
    return [line for line in done.stderr.splitlines() if line.startswith("warning: ")]


def _warnings(*args: str, columns: int) -> list[str]:
    """The ``warning:`` lines of ``python -m downpour ARGS`` run with stderr a pipe ``columns`` characters wide."""
    return _warnings_of(finish_all({"run": _start(*args, columns=columns)}, timeout=240)["run"])


def test_long_warnings_are_one_line_in_a_narrow_console_and_keep_their_brackets(tmp_path: Path) -> None:
    """A folder named ``pictures[bold]`` holding a broken ``cut[red].png`` among two photos: the warning about the
    file that could not be read (printed by the training driver) and the one about an ignored key (printed by the
    command) are each one line in a 40-column console, and name the folder and the file with their brackets."""
    root = tmp_path / "pictures[bold]"
    root.mkdir()
    Image.fromarray(data.camera()[:120, :160]).save(root / "camera.png")
    Image.fromarray(data.astronaut()[:100, :90]).save(root / "astronaut.png")
    whole = (root / "camera.png").read_bytes()
    (root / "cut[red].png").write_bytes(whole[: len(whole) // 2])
    warnings = _warnings(
        "train", "--out", str(tmp_path / "run"), "--backend", "sim", "--steps", "10", "--no-progress",
        "--set", f"data.source=folder:{root}", "--set", "data.image_size=8", "--set", "data.examples=300",
        "--set", "data.held_out=50", "--set", "model.features=8", "--set", "model.stages=3", columns=40,
    )  # fmt: skip
    ignored = "model.stages applies only to model.name=cat; ignored (model.stages = 3 with model.name = 'rica')"
    assert warnings[0] == f"warning: {ignored}", warnings
    unread = warnings[1]
    assert len(warnings) == 2, warnings
    assert unread.startswith(f"warning: 1 of 3 files of folder:{root} could not be read and were skipped ("), unread
    assert f"{root / 'cut[red].png'}" in unread, unread
    assert unread.endswith("; listed in summary.json under data_files)"), unread


CAT = [
    "--set", "model.name=cat", "--set", "data.source=natural-images", "--set", "data.examples=400", "--set",
    "data.held_out=64", "--set", "model.receptive_field=10", "--steps", "4", "--seconds", "0", "--no-progress",
]  # fmt: skip


def test_a_skip_variance_that_zeroes_every_field_is_warned_of_before_training(tmp_path: Path) -> None:
    """model.skip_variance = 1e9: every receptive field of the held-out examples is flatter than that, the network
    outputs zeros and learns nothing. A warning says so when the run starts (not only the headline's "flat fields
    zeroed 100.0%" at its end); at τ = 0.02, where some fields vary, there is none. (The simulator; the local
    backend, and its --resume, call the same function before their workers start.)"""
    run_dir = tmp_path / "run"
    every, some = (  # both at once: each is one process on one core
        _start("train", "--backend", "sim", "--workers", "1", "--out", str(out), *CAT, "--set",
               f"model.skip_variance={tau}", columns=40)
        for out, tau in ((run_dir, "1e9"), (tmp_path / "some", "0.02"))
    )  # fmt: skip
    finished = finish_all({"every": every, "some": some}, timeout=240)
    found_every, found_some = _warnings_of(finished["every"]), _warnings_of(finished["some"])
    assert found_every == ["warning: model.skip_variance = 1e+09 zeroes every receptive field of the held-out "
                           "examples (none varies that much): the network outputs zeros and learns nothing; lower "
                           "model.skip_variance"]  # fmt: skip
    assert json.loads((run_dir / "summary.json").read_text())["skip_variance"]["zeroed_fraction"] == 1.0
    assert found_some == []


def test_status_lines_are_one_line_and_printed_as_they_are() -> None:
    """What the driver says of its workers (died, failed, restarted) goes through ``say``: a worker's error message
    with brackets in it (``KeyError: ['x']``, a path) is printed whole, on one line, in a console 30 columns wide."""
    import io

    from rich.console import Console

    from downpour.console import say

    out = io.StringIO()
    console = Console(file=out, width=30, color_system=None)
    text = "worker 3 failed: KeyError: ['stages'] in /data/pictures[bold]/cut[red].png"
    say(console, text, "red")
    assert out.getvalue() == text + "\n"
