"""``downpour report`` and the page ``downpour train`` writes (real runs, a real headless Chromium), and
``downpour train --tensorboard`` (its event files read back with TensorBoard's own reader)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import read_jsonl
from downpour.backends.processes import fork_server_available
from downpour.cli import main
from downpour.report import plots
from downpour.report.html import build_report, write_report_after_training
from downpour.report.runlog import read_run_log
from downpour.report.tensorboard import BLOCK

SMALL = ["--set", "data.source=digits", "--set", "data.held_out=64", "--set", "model.features=16", "--no-progress"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]  # fmt: skip
# Appended to a copy of the page: once everything has loaded, record each <img>'s state where --dump-dom shows it.
PROBE = (
    '<script>window.addEventListener("load", () => { const p = document.createElement("pre"); p.id = "img-check";'
    " p.textContent = JSON.stringify([...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight]));"
    " document.body.appendChild(p); });</script>"
)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short real run of the local backend (2 workers, 2 shards) with a finished page and TensorBoard files.
    It trains for some seconds, not a number of steps: throughput is logged each second from the first push.
    Workers forked from the fork server start in a fraction of a second (and train thousands of steps a second
    here); spawned ones import torch for seconds first."""
    out = tmp_path_factory.mktemp("report") / "run"
    seconds = "2.5" if fork_server_available() else "8"
    assert main(["train", "--out", str(out), "--steps", "0", "--seconds", seconds, "--tensorboard", *SMALL]) == 0
    return out


def _png_sizes(page: str) -> list[tuple[int, int]]:
    sizes = []
    for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page):
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            sizes.append(image.size)
    return sizes


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    pytest.skip("chromium not found: `apt-get install -y chromium` (make test installs it when run as root)")


def _rendered_images(page: Path, tmp_path: Path) -> list[list]:
    """Open ``page`` plus the probe in headless Chromium; [complete, naturalWidth, naturalHeight] of each <img>."""
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    profile = tmp_path / "chromium-profile"
    result = subprocess.run(
        [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom",
         probed.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    found = re.search(r'<pre id="img-check">([^<]*)</pre>', result.stdout)
    assert found, f"the page did not finish loading in Chromium: {result.stderr[-2000:]}"
    return json.loads(found.group(1))


def test_train_writes_a_self_contained_page(local_run: Path) -> None:
    page = (local_run / "report.html").read_text()
    assert "<script" not in page and "http://" not in page and "https://" not in page  # nothing loaded from outside
    sizes = _png_sizes(page)
    assert len(sizes) == 4, sizes  # loss curves, throughput, staleness per shard, filters
    for heading in ("Summary", "Loss", "Throughput", "Staleness", "First-layer filters", "Evaluation", "Resolved"):
        assert f"<h2>{heading}" in page
    assert re.search(r"shard 0: \d[\d,]* updates, mean [\d.]+", page) and "shard 1:" in page
    assert "Not evaluated yet: run downpour eval face-neuron" in page
    assert "[model]" in page and "name = &quot;rica&quot;" in page  # the resolved config, escaped


def test_a_run_trained_on_the_faces_is_not_sent_to_the_face_test(local_run: Path, tmp_path: Path) -> None:
    """The page suggested `eval face-neuron` for a run trained on lfw-faces, which that command always refuses."""
    run = tmp_path / "copy"
    shutil.copytree(local_run, run)
    config = (run / "config.toml").read_text()
    (run / "config.toml").write_text(re.sub(r'source = "[^"]*"', 'source = "lfw-faces"', config, count=1))
    page = build_report(run)
    assert "Not evaluated yet: run downpour eval probe" in page and "eval face-neuron" not in page


def test_the_page_renders_in_chromium_with_every_image(local_run: Path, tmp_path: Path) -> None:
    page = local_run / "report.html"
    expected = _png_sizes(page.read_text())
    # One broken picture appended to a copy shows that the check can fail.
    copy = tmp_path / "report.html"
    copy.write_text(page.read_text().replace("</body>", '<img src="data:image/png;base64,AAAA"></body>'))
    *images, broken = _rendered_images(copy, tmp_path)
    assert [tuple(i[1:]) for i in images] == expected and all(i[0] for i in images)
    assert all(w > 100 and h > 100 for w, h in expected)
    assert broken[1] == 0


def test_report_command_shows_evaluations_and_survives_a_cut_off_log(
    local_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "copy"
    shutil.copytree(local_run, run)
    (run / "eval").mkdir()
    (run / "eval" / "face_neuron.json").write_text(
        json.dumps({"heldout_accuracy": 0.8125, "baselines": {"raw_pixel": {"heldout_accuracy": 0.875}}})
    )
    picture = np.zeros((20, 30, 3), dtype=np.uint8)
    picture[5:15, 10:20] = 255
    Image.fromarray(picture).save(run / "eval" / "optimal_stimulus.png")
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"event":"push","t":9.9,"wor')  # a driver killed mid-line
    out = tmp_path / "page.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    page = out.read_text()
    assert "baselines.raw_pixel.heldout_accuracy" in page  # every value, flattened
    comparison = '<tr><th>this run</th><td class="v">0.8125</td></tr><tr><th>raw_pixel</th><td class="v">0.875</td>'
    assert comparison in page  # the run beside its baselines
    assert "Not evaluated yet" not in page
    assert (30, 20) in _png_sizes(page)
    assert "1 line of metrics.jsonl could not be read and was skipped" in page
    assert "Measured at step" not in page  # no step recorded: nothing to compare


def test_evaluations_of_an_earlier_checkpoint_diverged_and_interrupted_runs_are_called_out(
    local_run: Path, tmp_path: Path
) -> None:
    """After a resume, evaluations of the earlier checkpoint stayed on the page as if current (a reviewer's face
    test at step 19,052 shown beside a run at 25,496); a run that diverged or was interrupted says so at the top,
    and numbers too large to read as integers are shown in scientific notation."""
    run = tmp_path / "copy"
    shutil.copytree(local_run, run)
    step = json.loads((run / "checkpoint" / "state.json").read_text())["step"]
    (run / "eval").mkdir()
    (run / "eval" / "probe_digits.json").write_text(json.dumps({"step": step - 1, "accuracy": 0.9}))
    (run / "eval" / "viz.json").write_text(json.dumps({"step": step, "responses": [-1.6829241146059361e31]}))
    page = build_report(run)
    assert page.count("Measured at step") == 1 and f"Measured at step {step - 1:,}; the checkpoint is now at step " \
        f"{step:,}" in page  # fmt: skip
    assert "-1.683e+31" in page and "16,829" not in page
    assert "Training diverged" not in page and "was interrupted" not in page
    summary = json.loads((run / "summary.json").read_text())
    summary.update(diverged=True, divergence="training diverged: held-out loss inf at step 9", interrupted=True,
                   data_files={"files": 5, "skipped": 2})  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    page = build_report(run)
    assert '<p class="note">Training diverged: held-out loss inf at step 9.</p>' in page
    assert "The last session was interrupted" in page
    assert "2 of 5 data files could not be read" in page  # beside the notes above, not in their place


def test_a_run_without_its_metrics_log_says_so(local_run: Path, tmp_path: Path) -> None:
    """A local run whose metrics.jsonl was deleted: the page says the file is missing, not that "the simulator logs
    none" (it used to blame the simulator for a local run's missing throughput)."""
    run = tmp_path / "copy"
    shutil.copytree(local_run, run)
    (run / "metrics.jsonl").unlink()
    out = tmp_path / "page.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    page = out.read_text()
    assert "metrics.jsonl is missing from the run directory" in page and "the simulator logs none" not in page
    page = (local_run / "report.html").read_text()
    assert "is missing from the run directory" not in page


def test_a_run_without_throughput_rows_says_why_without_blaming_the_simulator(local_run: Path, tmp_path: Path) -> None:
    """A local run that trained for under a second has no throughput rows (they come once a second); the page says
    so and where the rate is, instead of calling it a simulated run."""
    run = tmp_path / "copy"
    shutil.copytree(local_run, run)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    assert any('"throughput"' in line for line in lines)
    metrics.write_text("".join(f"{line}\n" for line in lines if '"throughput"' not in line))
    out = tmp_path / "page.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    page = " ".join(out.read_text().split())
    assert "a run that trained for under a second has none" in page and "summary above gives the rate" in page


def test_report_on_a_directory_that_is_no_run_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No config.toml, or a directory in its place (said as such, where it was called missing), for ``report`` and
    ``eval`` alike."""
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"downpour: error: {tmp_path} is not a run directory: it holds no config.toml\n"
    (tmp_path / "config.toml").mkdir()
    for command in (["report", str(tmp_path)], ["eval", "probe", str(tmp_path)]):
        assert main(command) == 2
        assert capsys.readouterr().err == (f"downpour: error: {tmp_path} is not a run directory: its config.toml is a "
                                           "directory, not a file\n")  # fmt: skip


def test_a_page_that_cannot_be_written_warns_and_keeps_the_run(local_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "copy"
    shutil.copytree(local_run, run)
    (run / "report.html").unlink()
    (run / "report.html").mkdir()  # the page cannot replace a directory
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    warnings: list[str] = []
    assert write_report_after_training(run, warnings.append) is None
    assert len(warnings) == 1 and warnings[0].startswith("could not write the report (IsADirectoryError")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing else touched


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def _block_means(values: list[float]) -> list[float]:
    return [float(np.mean(values[i : i + BLOCK])) for i in range(0, len(values), BLOCK)]


def test_tensorboard_scalars_match_the_metrics_log(local_run: Path) -> None:
    run_dir = local_run
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_jsonl(run_dir / "metrics.jsonl")
    scalars = _scalars(run_dir / "tensorboard")

    held_out = scalars["loss/held_out"]
    assert held_out[0] == (0, np.float32(summary["initial_loss"]))
    assert held_out[-1] == (summary["steps"], np.float32(summary["final_loss"]))

    pushes = [r for r in rows if r["event"] == "push"]
    losses = [r["loss"] for r in pushes if r["shard"] == 0]
    steps = summary["steps"]
    assert len(losses) == steps > BLOCK
    assert [s for s, _ in scalars["loss/push"]] == [min(i + BLOCK, steps) for i in range(0, steps, BLOCK)]
    np.testing.assert_allclose([v for _, v in scalars["loss/push"]], _block_means(losses), rtol=1e-6)
    for shard in (0, 1):
        stale = [r["staleness"] for r in pushes if r["shard"] == shard and r["applied"]]
        got = [v for _, v in scalars[f"staleness/shard_{shard}"]]
        np.testing.assert_allclose(got, _block_means(stale), rtol=1e-6)

    rates = [(r["step"], r["examples_per_s"]) for r in rows if r["event"] == "throughput"]
    assert rates
    got_rates = scalars.get("throughput/examples_per_s", [])
    assert [s for s, _ in got_rates] == [s for s, _ in rates]
    np.testing.assert_allclose([v for _, v in got_rates], [v for _, v in rates], rtol=1e-6)


def test_the_log_of_a_resumed_run_continues_steps_and_time(tmp_path: Path) -> None:
    rows = [
        {"event": "start", "t": 0.1, "step": 0, "resume": False, "initial_loss": 50.0},
        *({"event": "push", "t": 1 + i, "worker": i % 2, "shard": s, "staleness": i % 3, "loss": 10.0 - i,
           "applied": True} for i in range(3) for s in (0, 1)),
        {"event": "throughput", "t": 2.0, "examples_per_s": 100.0, "step": 2},
        {"event": "end", "t": 4.0, "step": 3, "final_loss": 7.0},
        {"event": "start", "t": 0.2, "step": 3, "resume": True, "initial_loss": 50.0},  # a resumed session
        {"event": "push", "t": 1.0, "worker": 0, "shard": 0, "staleness": 0, "loss": 6.0, "applied": True},
        {"event": "push", "t": 1.0, "worker": 0, "shard": 1, "staleness": -1, "loss": 6.0, "applied": False},
        {"event": "push", "t": 1.1, "worker": 1, "shard": 1, "staleness": 5, "loss": None, "applied": False},  # late
        {"event": "throughput", "t": 1.5, "examples_per_s": 90.0, "step": 4},
        {"event": "end", "t": 2.0, "step": 4, "final_loss": 5.5},
        {"event": "worker_stuck", "t": 2.1, "worker": 1, "detail": "did not stop within 10 s of being asked"},
        {"event": "shard_restored", "t": 2.2, "shard": 0, "detail": "shard 0 restored at version 3 (incarnation 1)"},
    ]  # fmt: skip
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"event": "push", "t"')
    log = read_run_log(path)
    assert log.push_step.tolist() == [1, 2, 3, 4] and log.push_loss.tolist() == [10.0, 9.0, 8.0, 6.0]
    assert log.held_out_step.tolist() == [0, 3, 4] and log.held_out_loss.tolist() == [50.0, 7.0, 5.5]
    assert log.throughput_t.tolist() == [2.0, 5.5]  # the second session starts where the first ended (t = 4)
    assert log.staleness[0].counts.tolist() == [2, 1, 1] and log.staleness[1].counts.tolist() == [1, 1, 1]
    assert (log.rejected, log.not_applied, log.sessions, log.bad_lines) == (1, 1, 2, 1)  # a late push is no NaN
    from downpour.report.html import _log_notes

    notes = _log_notes(log)
    assert "1 update rejected by the shards (NaN or Inf)" in notes and "1 push not applied: late ones" in notes
    assert "worker 1: killed as it did not stop — did not stop within 10 s of being asked" in notes
    assert "shard 0: restored from its checkpoint (Ray) — shard 0 restored at version 3 (incarnation 1)" in notes


def test_rows_with_fields_no_driver_writes_are_counted_not_read(local_run: Path, tmp_path: Path) -> None:
    """Valid JSON with a field of the wrong type (edited by hand, or another tool's file) is skipped and counted like
    a cut-off line, never a traceback; a staleness beyond the rows in the file would ask for a histogram of that
    many bins (745 GiB for 99,999,999,999)."""
    path = tmp_path / "metrics.jsonl"
    good = [
        {"event": "start", "t": 0.0, "step": 0, "resume": False, "initial_loss": 9.0},
        {"event": "push", "t": 1.0, "worker": 0, "shard": 0, "staleness": 1, "loss": 5.0, "applied": True},
    ]
    odd = [
        {"event": "push", "t": 1.0, "worker": 0, "shard": None, "staleness": 0, "loss": 5.0, "applied": True},
        {"event": "push", "t": 1.0, "worker": 0, "shard": 0, "staleness": 99999999999, "loss": 5.0, "applied": True},
        {"event": "push", "t": 1.0, "worker": 0, "shard": 0, "staleness": "1", "loss": 5.0, "applied": True},
        {"event": "start", "t": 0.0, "step": "abc", "resume": True},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in [*good, *odd]))
    log = read_run_log(path)
    assert (log.sessions, log.bad_lines, log.push_step.tolist()) == (1, 4, [1])
    assert log.staleness[0].counts.tolist() == [0, 1]
    run = tmp_path / "copy"
    shutil.copytree(local_run, run)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in odd))
    assert main(["report", str(run), "--out", str(tmp_path / "page.html")]) == 0
    assert "4 lines of metrics.jsonl could not be read" in (tmp_path / "page.html").read_text()


def test_a_session_after_a_cut_off_row_starts_on_a_line_of_its_own(tmp_path: Path) -> None:
    """A driver killed mid-row leaves a cut-off last line; the next session's first row must not be glued to it (it
    would be lost with it, and the report would miss that session)."""
    from downpour.rundir import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event":"start","t":0.1,"step":0,"resume":false,"initial_loss":50.0}\n{"event":"push","t"')
    log = MetricsLog(path)
    log.write("start", t=0.2, step=0, resume=True, initial_loss=40.0)
    log.close()
    assert path.read_text().splitlines()[-1] == '{"event":"start","t":0.2,"step":0,"resume":true,"initial_loss":40.0}'
    read = read_run_log(path)
    assert (read.sessions, read.bad_lines) == (2, 1)
    MetricsLog(path).close()  # a file that ends its last row: nothing added
    assert path.read_text().endswith('"initial_loss":40.0}\n') and path.read_text().count("\n") == 3


def test_tensorboard_missing_is_one_line_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what Python does for a missing package
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--tensorboard", "--steps", "5", *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.startswith("downpour: error: train.tensorboard = true needs the tensorboard package")
    assert err.count("\n") == 1 and "pip install 'downpour-sgd[tensorboard]'" in err
    assert not out.exists()


def test_the_live_bar_counts_pushes_as_the_closing_line_counts_updates() -> None:
    """The bar's count is the global step (pushes across workers), named so: with 2 shards the closing line's
    "updates applied" is twice as many, and the bar used to call its count "updates" too."""
    from rich.console import Console

    from downpour.report.live import LiveProgress

    out = io.StringIO()
    with LiveProgress(steps=100, seconds=0, console=Console(file=out, width=160), enabled=True) as bar:
        bar.update(steps=40, elapsed=1.0, rate=1000.0, loss=2.5, stale=0.5)
    text = out.getvalue()
    assert "40 pushes" in text and "updates" not in text, text


@pytest.mark.parametrize("shards", [(0, 1), (1, 0)], ids=["shard 0 first", "shard 1 first (as Ray writes)"])
def test_pushes_past_the_checkpoint_a_later_session_resumed_from_are_left_out(
    tmp_path: Path, shards: tuple[int, int]
) -> None:
    """A driver killed at step 5 whose checkpoint was at step 3: its pushes 4 and 5 (one of them rejected) were
    undone, and the resumed session goes on from step 3. They are left out of the steps, losses, staleness and
    rejected counts (the report had more pushes than steps, its step axis went back, and it counted rejections
    the summary did not), and the notes say how many. Whatever order a push's rows come in."""
    rows = [
        {"event": "start", "t": 0.1, "step": 0, "resume": False, "initial_loss": 50.0},
        *({"event": "push", "t": 1 + i, "worker": 0, "shard": s, "staleness": 1, "loss": 10.0 - i,
           "applied": i != 4} | ({"staleness": -1} if i == 4 else {}) for i in range(5) for s in shards),
        {"event": "eval", "t": 5.5, "step": 5, "held_out_loss": 6.5},  # on the undone work: not on the curve
        {"event": "start", "t": 0.2, "step": 3, "resume": True, "initial_loss": 50.0},  # from the checkpoint at 3
        *({"event": "push", "t": 1.0, "worker": 0, "shard": s, "staleness": 0, "loss": 4.0, "applied": True}
          for s in shards),
        {"event": "end", "t": 2.0, "step": 4, "final_loss": 3.5},
    ]  # fmt: skip
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = read_run_log(path)
    assert log.push_step.tolist() == [1, 2, 3, 4] and log.push_loss.tolist() == [10.0, 9.0, 8.0, 4.0]
    assert log.staleness[0].counts.tolist() == [1, 3] and log.staleness[1].counts.tolist() == [1, 3]
    assert (log.rejected, log.discarded, log.sessions) == (0, 2, 2)
    assert log.held_out_step.tolist() == [0, 4] and log.held_out_loss.tolist() == [50.0, 3.5]
    from downpour.report.html import _log_notes

    notes = _log_notes(log)
    assert "2 pushes logged after the checkpoint that a later session resumed from are left out" in notes
    assert "session 1 from step 3: settings unchanged" in notes


def test_edited_files_give_notes_not_tracebacks(local_run: Path, tmp_path: Path) -> None:
    """A summary whose counts are text, a start row whose step no driver writes (10**23), push losses of ±1e308
    (which no figure can place): the page is written, with the reason where a figure could not be drawn."""
    run = tmp_path / "copy"
    shutil.copytree(local_run, run)
    summary = json.loads((run / "summary.json").read_text())
    summary["data_files"] = {"skipped": "3", "files": 5}
    (run / "summary.json").write_text(json.dumps(summary))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    pushes = [row for row in rows if row["event"] == "push" and row["shard"] == 0]
    pushes[0]["loss"], pushes[1]["loss"] = -1e308, 1e308
    rows.append({"event": "start", "t": 0.0, "step": 10**23, "resume": True, "session": 9})
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "page.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    page = out.read_text()
    assert "3 of 5 data files could not be read" in page
    assert "1 line of metrics.jsonl could not be read" in page  # the start row
    assert "This figure could not be drawn from metrics.jsonl (ValueError" in page


def test_report_out_never_replaces_what_is_no_page(local_run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """``report --out`` is refused, before any work and leaving every file as it was, for a run's own file (a page
    written over checkpoint/state.json lost the run), a name not ending in .html, and a path that exists as other
    than a file (a pipe here; /dev/null became a 5.8 MB file). A link to a page is written through; the run's own
    report.html may be named."""
    run = tmp_path / "run"
    shutil.copytree(local_run, run)
    files = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    pipe = tmp_path / "pipe.html"
    os.mkfifo(pipe)
    refused = {
        run / "checkpoint" / "state.json": "is inside run",
        run / "eval" / "page.html": "is inside run",
        tmp_path / "page.txt": "end the name in .html",
        pipe: "exists and is not a file",
    }
    for out, why in refused.items():
        assert main(["report", str(run), "--out", str(out)]) == 2, out
        assert why in capsys.readouterr().err, out
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == files
    assert stat.S_ISFIFO(pipe.stat().st_mode) and not (tmp_path / "page.txt").exists()
    page, link = tmp_path / "page.html", tmp_path / "link.html"
    page.write_text("old")
    link.symlink_to(page)
    assert main(["report", str(run), "--out", str(link)]) == 0
    assert link.is_symlink() and page.read_text().startswith("<!DOCTYPE html>")
    assert main(["report", str(run), "--out", str(run / "report.html")]) == 0


def test_a_page_under_a_file_names_the_page_not_a_temporary_file(
    local_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--out below a file: the error named the hidden temporary file (the failed clean-up's error hid the real one)."""
    afile = tmp_path / "notes.toml"
    afile.write_text("x")
    assert main(["report", str(local_run), "--out", str(afile / "page.html")]) == 2
    err = capsys.readouterr().err
    assert str(afile / "page.html") in err and ".tmp-" not in err


def test_the_staleness_caption_gives_each_shards_mean_and_p99(tmp_path: Path) -> None:
    """The page's staleness numbers, per shard, from a hand-written log: shard 0 applied 98 updates of staleness 1
    and 2 of staleness 7 (mean 1.12; p99 7, as only 98 of 100 are at or below 1), shard 1 applied 10 updates at 0
    and 10 at 3 (mean 1.50, p99 3). A rejected push is not counted."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("# hand-written run\n")
    rows = [{"event": "push", "shard": 0, "staleness": s, "applied": True, "loss": 1.0} for s in [1] * 98 + [7] * 2]
    rows += [{"event": "push", "shard": 1, "staleness": s, "applied": True, "loss": 1.0} for s in [0, 3] * 10]
    rows.append({"event": "push", "shard": 0, "staleness": -1, "applied": False, "loss": 1.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    page = build_report(run)
    assert "shard 0: 100 updates, mean 1.12, p99 7, shard 1: 20 updates, mean 1.50, p99 3" in page


def _sim_run(out: Path, lr: float) -> Path:
    """A 10-push simulated RICA run with plain SGD at ``lr`` (1e30 diverges at once; 0.03 does not)."""
    from rich.console import Console

    from downpour import config as config_mod
    from downpour.train import run_training

    raw = {"data": {"examples": 600, "held_out": 100}, "model": {"features": 16},
           "train": {"steps": 10, "seconds": 0, "batch_size": 32}, "ps": {"shards": 1, "rule": "sgd", "lr": lr},
           "cluster": {"backend": "sim", "workers": 2}}  # fmt: skip
    run_training(config_mod.from_dict(raw), out, console=Console(stderr=True, quiet=True), show_progress=False)
    return out


def test_a_diverged_runs_loss_plot_marks_where_the_loss_became_non_finite(tmp_path: Path) -> None:
    """A run that diverged: its curves stopped at their last finite point with nothing to say why. A red dashed line
    labelled "diverged" now stands at the first step of the non-finite stretch that ends the log (here the first
    held-out loss written as null), which is shaded; a finite run's plot has neither."""
    run = _sim_run(tmp_path / "diverged", 1e30)
    rows = read_jsonl(run / "metrics.jsonl")
    assert json.loads((run / "summary.json").read_text())["diverged"] is True
    first_null = min(row["step"] for row in rows if row["event"] == "eval" and row["held_out_loss"] is None)
    ax = plots.draw_loss(read_run_log(run / "metrics.jsonl")).axes[0]
    marks = [line for line in ax.get_lines() if line.get_label().startswith("diverged")]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [first_null, first_null]
    assert marks[0].get_color() == "tab:red" and marks[0].get_linestyle() == "--"
    assert f"diverged: loss not finite from step {first_null}" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(ax.patches) == 1 and ax.patches[0].get_x() == first_null  # the shaded stretch, to step 10
    assert plots.loss_figure(read_run_log(run / "metrics.jsonl"))[:8] == b"\x89PNG\r\n\x1a\n"

    finite = _sim_run(tmp_path / "finite", 0.03)
    ax = plots.draw_loss(read_run_log(finite / "metrics.jsonl")).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "mini-batch loss of each push", "running mean (1 pushes)", "held-out loss"
    ]  # fmt: skip
    assert not ax.patches


def test_a_resumed_runs_throughput_plot_marks_where_each_session_started(tmp_path: Path) -> None:
    """Three sessions (a run resumed twice): their throughput rows follow each other on one time axis, and each
    later session starts at a dotted line labelled with it and its step, where the earlier ones ended (t = 4 and
    6.5), and the rate's line breaks there. A run of one session has none."""
    rows = [
        {"event": "start", "t": 0.0, "session": 0, "step": 0, "resume": False, "initial_loss": 50.0},
        {"event": "throughput", "t": 1.0, "examples_per_s": 100.0, "step": 2},
        {"event": "throughput", "t": 2.0, "examples_per_s": 110.0, "step": 4},
        {"event": "end", "t": 4.0, "step": 5, "final_loss": 7.0},
        {"event": "start", "t": 0.0, "session": 1, "step": 5, "resume": True},
        {"event": "throughput", "t": 1.5, "examples_per_s": 90.0, "step": 7},
        {"event": "end", "t": 2.5, "step": 8, "final_loss": 6.0},
        {"event": "start", "t": 0.0, "session": 2, "step": 8, "resume": True},
        {"event": "throughput", "t": 1.0, "examples_per_s": 95.0, "step": 9},
        {"event": "end", "t": 1.5, "step": 10, "final_loss": 5.0},
    ]  # fmt: skip
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    log = read_run_log(path)
    assert log.session_t.tolist() == [0.0, 4.0, 6.5] and log.throughput_t.tolist() == [1.0, 2.0, 5.5, 7.5]
    ax = plots.draw_throughput(log).axes[0]
    dotted = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert [line.get_xdata()[0] for line in dotted] == [4.0, 6.5]
    assert [(t.get_text().strip(), t.get_position()[0]) for t in ax.texts] == [
        ("session 1 from step 5", 4.0), ("session 2 from step 8", 6.5)
    ]  # fmt: skip
    (rates,) = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
    assert np.isnan(rates.get_ydata()).sum() == 2  # the line breaks where each later session starts

    path.write_text("".join(json.dumps(row) + "\n" for row in rows[:4]))
    ax = plots.draw_throughput(read_run_log(path)).axes[0]
    assert not [line for line in ax.get_lines() if line.get_linestyle() == ":"] and not ax.texts


def _push(step: int, loss: float | None, *, staleness: int = 0, applied: bool = True) -> dict[str, Any]:
    """A push row of worker 0 to shard 0, applied as version ``step`` unless said otherwise."""
    return {"event": "push", "t": step / 10, "worker": 0, "shard": 0, "version": step, "staleness": staleness,
            "loss": loss, "applied": applied}  # fmt: skip


def test_only_a_loss_that_stays_non_finite_is_marked_diverged(tmp_path: Path) -> None:
    """A run whose last push was late (the simulator logs no loss for a push sync dropped: null), or refused (NaN)
    and then measured finite at the end, did not diverge: its plot has no "diverged" line (a reviewer's simulated
    sync run with backup workers got one at its last step). Pushes that stay NaN after the last finite held-out loss
    of a run whose driver was killed are marked from the first of them."""
    start = {"event": "start", "t": 0.0, "session": 0, "step": 0, "resume": False, "initial_loss": 50.0}
    path = tmp_path / "metrics.jsonl"
    cases = {
        "late last": [start, _push(1, 9.0), _push(2, 8.0), _push(3, None, staleness=1, applied=False),
                      {"event": "end", "t": 1.0, "step": 3, "final_loss": 7.0}],
        "refused, then measured": [start, _push(1, 9.0), _push(2, None, staleness=-1, applied=False),
                                   {"event": "end", "t": 1.0, "step": 2, "final_loss": 7.0}],
        "killed after NaN pushes": [start, _push(1, 9.0), {"event": "eval", "t": 0.15, "step": 1,
                                                           "held_out_loss": 8.5},
                                    _push(2, None, staleness=-1, applied=False),
                                    _push(3, None, staleness=-1, applied=False)],
    }  # fmt: skip
    found = {}
    for name, rows in cases.items():
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        log = read_run_log(path)
        found[name] = plots.diverged_step(log)
        labels = [t.get_text() for t in plots.draw_loss(log).axes[0].get_legend().get_texts()]
        assert any(label.startswith("diverged") for label in labels) == (found[name] is not None), (name, labels)
    assert found == {"late last": None, "refused, then measured": None, "killed after NaN pushes": 2.0}


def test_a_killed_sessions_last_throughput_point_stays_on_its_side_of_the_break(tmp_path: Path) -> None:
    """A session whose driver was killed wrote no end row, so its last throughput row is what the next session's
    clock starts from: the break in the rate's line comes after that point, not before it (which joined it to the
    next session's line)."""
    rows = [
        {"event": "start", "t": 0.0, "session": 0, "step": 0, "resume": False, "initial_loss": 50.0},
        *[{"event": "throughput", "t": float(t), "examples_per_s": 100.0 + t, "step": t} for t in range(1, 6)],
        {"event": "start", "t": 0.0, "session": 1, "step": 5, "resume": True},
        *[{"event": "throughput", "t": float(t), "examples_per_s": 90.0, "step": 5 + t} for t in range(1, 4)],
    ]  # fmt: skip
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    log = read_run_log(path)
    assert log.session_t.tolist() == [0.0, 5.0]
    (rates,) = [line for line in plots.draw_throughput(log).axes[0].get_lines() if line.get_linestyle() == "-"]
    x = rates.get_xdata()
    assert x[:5].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0] and np.isnan(x[5]) and x[6:].tolist() == [6.0, 7.0, 8.0]


def _visible_ticks(axis: Any) -> list[float]:
    """The major tick values of ``axis`` inside its view."""
    low, high = sorted(axis.get_view_interval())
    return [float(t) for t in axis.get_majorticklocs() if low <= t <= high]


def test_count_axes_tick_at_whole_pushes_and_updates(tmp_path: Path) -> None:
    """A run of two pushes on one shard (three updates logged in all): the loss plot's step axis ticked 0.25 of a push
    and the staleness panel 0.25 of an update; both are counts, ticked at whole numbers."""
    rows = [
        {"event": "start", "t": 0.0, "step": 0, "resume": False, "initial_loss": 50.0},
        {"event": "push", "t": 1.0, "worker": 0, "shard": 0, "staleness": 0, "loss": 40.0, "applied": True},
        {"event": "push", "t": 1.5, "worker": 1, "shard": 0, "staleness": 1, "loss": 30.0, "applied": True},
        {"event": "push", "t": 1.6, "worker": 0, "shard": 1, "staleness": 1, "loss": 30.0, "applied": True},
        {"event": "end", "t": 2.0, "step": 2, "final_loss": 25.0},
    ]  # fmt: skip
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    log = read_run_log(path)
    axes = [
        plots.draw_loss(log).axes[0].xaxis,
        *(ax.yaxis for ax in plots.draw_staleness(log).axes if ax.get_visible()),
    ]
    assert len(axes) == 3
    for axis in axes:
        ticks = _visible_ticks(axis)
        assert len(ticks) >= 2 and all(t == round(t) for t in ticks), ticks
