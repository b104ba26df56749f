"""``downpour report``: one self-contained HTML page about a run (every picture inlined as base64 PNG, no links).

The page shows the run summary, the loss curves (per-push mini-batch loss and held-out loss), throughput, the
staleness histogram of each shard, the first-layer filters, whatever the evaluation commands wrote into
``RUN_DIR/eval/`` (``*.json`` as tables, ``*.png`` as pictures), and the resolved config.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
import tomllib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from downpour import rundir
from downpour.errors import NESTS_TOO_DEEPLY, DownpourError
from downpour.eval.results import ASCENT_FAILURE_CAUSES
from downpour.report import plots
from downpour.report.runlog import RunLog, read_run_log

REPORT = "report.html"
SMALL_PICTURE = 240  # pixels: narrower pictures are shown enlarged by a whole factor
EVAL_DIR = "eval"
EVAL_HINT = "downpour eval face-neuron {run} · downpour eval probe {run} --data digits · downpour viz {run}"

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; margin-top: 2em; }
table { border-collapse: collapse; font-size: 13px; } td, th { padding: 2px 10px; border-bottom: 1px solid #eee; }
td.v { text-align: right; font-variant-numeric: tabular-nums; } th { text-align: left; }
pre { background: #f6f6f6; padding: 0.8em; font-size: 12px; overflow-x: auto; }
figure { margin: 1em 0; } figcaption { font-size: 13px; color: #555; }
img { max-width: 100%; } img.filters { max-width: 560px; }
.note { color: #8a5a00; background: #fff6e0; padding: 0.4em 0.8em; }
"""


def _img(png: bytes, alt: str, css: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    extra = f' class="{css}"' if css else ""
    width = int.from_bytes(png[16:20], "big")  # the IHDR chunk: width, then height, big-endian
    if 0 < width < SMALL_PICTURE:  # tiny pictures (8x8 filters of digits) shown enlarged, pixels kept sharp
        extra += f' width="{width * (SMALL_PICTURE // width)}" style="image-rendering: pixelated"'
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"{extra}>'


def _drawn(draw: Callable[[RunLog], bytes | None], log: RunLog) -> bytes | str | None:
    """``draw(log)``, or the reason it could not be drawn (values a figure cannot place, such as ±1e308 from an
    edited metrics.jsonl): the page says so instead of failing."""
    try:
        with warnings.catch_warnings():  # numpy's overflow warnings from such values: the note below says it
            warnings.simplefilter("ignore", RuntimeWarning)
            return draw(log)
    except (ValueError, OverflowError) as exc:
        return f"This figure could not be drawn from metrics.jsonl ({type(exc).__name__}: {exc})."


def _figure(png: bytes | str | None, alt: str, caption: str, missing: str, css: str = "") -> str:
    if png is None or isinstance(png, str):
        return f'<p class="note">{html.escape(png if isinstance(png, str) else missing)}</p>'
    return f"<figure>{_img(png, alt, css)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _format(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "—"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) < 10**15 else f"{value:.4g}"
    if isinstance(value, float):
        if not math.isfinite(value) or abs(value) >= 1e15:  # 32 digits of an overflowing response say nothing
            return f"{value:.4g}"
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    if isinstance(value, list):
        shown = ", ".join(_format(v) for v in value[:8])
        return f"[{shown}{', …' if len(value) > 8 else ''}]" + (f" ({len(value)} values)" if len(value) > 8 else "")
    return str(value)


def _count(n: int, noun: str, plural: str | None = None) -> str:
    """``1 update``, ``2,048 updates`` (``plural`` where it is not ``noun + "s"``)."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def _flatten(payload: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in payload.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(_flatten(value, f"{name}."))
        else:
            rows.append((name, value))
    return rows


def _table(payload: dict[str, Any]) -> str:
    body = "".join(
        f'<tr><th>{html.escape(k)}</th><td class="v">{html.escape(_format(v))}</td></tr>' for k, v in _flatten(payload)
    )
    return f"<table>{body}</table>"


def _comparison(payload: dict[str, Any]) -> str:
    """The run against its baselines, side by side, when an evaluation has ``baselines: {name: {metric: value}}``."""
    baselines = payload.get("baselines")
    if not isinstance(baselines, dict) or not all(isinstance(v, dict) for v in baselines.values()):
        return ""
    metrics = [k for k, v in payload.items() if isinstance(v, float) and any(k in b for b in baselines.values())]
    if not metrics:
        return ""
    rows = [("this run", payload), *baselines.items()]
    head = "".join(f"<th>{html.escape(m)}</th>" for m in metrics)
    body = "".join(
        f"<tr><th>{html.escape(name)}</th>"
        + "".join(f'<td class="v">{html.escape(_format(values.get(m)))}</td>' for m in metrics)
        + "</tr>"
        for name, values in rows
    )
    return f"<table><tr><th></th>{head}</tr>{body}</table><p></p>"


def _read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"could not read {path.name}: {exc}"
    except RecursionError:
        return None, f"could not read {path.name}: it {NESTS_TOO_DEEPLY}"
    if not isinstance(payload, dict):
        return None, f"{path.name} does not hold a JSON object"
    return payload, None


def _read_png(path: Path) -> bytes | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if data.startswith(b"\x89PNG\r\n\x1a\n") else None


def _summary_section(run_dir: Path) -> str:
    path = run_dir / rundir.SUMMARY
    if not path.exists():
        return '<p class="note">No summary.json: the run is still going, or its driver was killed before the end.</p>'
    summary, problem = _read_json(path)
    if summary is None:
        return f'<p class="note">{html.escape(problem or "")}</p>'
    notes = ""
    if summary.get("diverged") is True:
        divergence = str(summary.get("divergence") or "training diverged")
        notes += f'<p class="note">{html.escape(divergence[:1].upper() + divergence[1:])}.</p>'
    if summary.get("interrupted") is True:
        notes += ('<p class="note">The last session was interrupted (Ctrl-C or SIGTERM) and stopped cleanly: '
                  "<code>downpour train --resume</code> continues it.</p>")  # fmt: skip
    files = summary.get("data_files")
    if isinstance(files, dict) and files.get("skipped"):
        notes += (f'<p class="note">{_format(files["skipped"])} of {_format(files.get("files", 0))} data files could '
                 "not be read and were skipped (see data_files below).</p>")  # fmt: skip
    return notes + _table(summary)


def _shown(pair: Any) -> str:
    """A recorded change ``[before, after]`` as ``before → after``."""
    if isinstance(pair, list) and len(pair) == 2:
        return f"{pair[0]!r} → {pair[1]!r}"
    return repr(pair)


_FAULT_ROWS = {  # the metrics rows of faults the report lists, and what each is called there
    "worker_died": "died",
    "worker_error": "failed",
    "worker_out_of_memory": "ran out of memory",
    "worker_stuck": "killed as it did not stop",
    "worker_push_rows": "push rows recovered after it died",
    "worker_restarted": "restarted (Ray)",
    "shard_restored": "restored from its checkpoint (Ray)",
}


def _log_notes(log: RunLog, *, log_missing: bool = False) -> str:
    items = [f"{rundir.METRICS} is missing from the run directory: no curves or events to show"] if log_missing else []
    for event in log.events:
        kind = event.get("event")
        if kind in _FAULT_ROWS:
            detail = str(event.get("detail", "")).strip().splitlines()
            who = f"shard {event.get('shard')}" if kind == "shard_restored" else f"worker {event.get('worker')}"
            items.append(f"{who}: {_FAULT_ROWS[kind]} — {detail[-1] if detail else ''}")
    if log.rejected:
        items.append(f"{_count(log.rejected, 'update')} rejected by the shards (NaN or Inf)")
    if log.not_applied:
        items.append(f"{_count(log.not_applied, 'push', 'pushes')} not applied: late ones that sync dropped (backup "
                     "workers), or lost with a shard restored from its checkpoint")  # fmt: skip
    if log.discarded:
        items.append(f"{log.discarded:,} pushes logged after the checkpoint that a later session resumed from are "
                     "left out of the counts and curves: that work was undone (a driver killed between checkpoints, "
                     "or a session that diverged)")  # fmt: skip
    for index, row in enumerate(log.starts if log.sessions > 1 else ()):
        changed = row.get("changed") if isinstance(row.get("changed"), dict) else {}
        what = "; ".join(f"{key} {_shown(pair)}" for key, pair in changed.items()) or "settings unchanged"
        items.append(f"session {row.get('session', index)} from step {_format(row.get('step', 0))}"
                     + (f": {what}" if row.get("resume") else ""))  # fmt: skip
    if log.bad_lines:
        items.append(f"{_count(log.bad_lines, 'line')} of metrics.jsonl could not be read and "
                     f"{'was' if log.bad_lines == 1 else 'were'} skipped")  # fmt: skip
    if not items:
        return ""
    return "<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in items) + "</ul>"


def _data_source(run_dir: Path) -> Any:
    try:
        return tomllib.loads((run_dir / rundir.CONFIG).read_text()).get("data", {}).get("source")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, AttributeError):
        return None


def _checkpoint_step(run_dir: Path) -> int | None:
    state, _ = _read_json(run_dir / rundir.CHECKPOINT / rundir.CHECKPOINT_STATE)  # (not checkpoint: torch)
    step = state.get("step") if state is not None else None
    return step if isinstance(step, int) else None


def _ascent_note(viz: dict[str, Any]) -> str:
    """A note naming the units whose optimal-stimulus ascent did not raise their response (``viz.json``'s
    ``ascent_raised``, with the start and final responses), or "" when every ascent did or the file predates it."""
    units, raised = viz.get("units"), viz.get("ascent_raised")
    if not isinstance(units, list) or not isinstance(raised, list) or len(units) != len(raised) or all(raised):
        return ""
    start, final = viz.get("start_responses"), viz.get("responses")
    pairs = isinstance(start, list) and isinstance(final, list) and len(start) == len(final) == len(units)
    failed = [
        f"{_format(unit)} ({_format(start[i])} → {_format(final[i])})" if pairs else _format(unit)
        for i, (unit, ok) in enumerate(zip(units, raised, strict=True))
        if ok is not True
    ]
    return (f'<p class="note">The gradient ascent did not raise the response of {_count(len(failed), "unit")}: '
            f"{html.escape(', '.join(failed))} (start → final; — where not finite). Their pictures show no "
            f"optimum ({ASCENT_FAILURE_CAUSES}).</p>")  # fmt: skip


def _eval_section(run_dir: Path) -> str:
    from downpour.runs import diverged_checkpoint

    folder = run_dir / EVAL_DIR
    results = sorted(folder.glob("*.json")) if folder.is_dir() else []
    pictures = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if not results and not pictures:
        hint = EVAL_HINT.format(run=run_dir)
        if _data_source(run_dir) == "lfw-faces":  # the face test's faces would be its own training pictures
            hint = hint.split(" · ", 1)[1]
        return f'<p class="note">Not evaluated yet: run {html.escape(hint)}</p>'
    parts = []
    if (divergence := diverged_checkpoint(run_dir)) is not None:
        parts.append(f'<p class="note">The checkpoint is the one training diverged with ({html.escape(divergence)}): '
                     "these results describe that network.</p>")  # fmt: skip
    now = _checkpoint_step(run_dir)
    for path in results:
        payload, problem = _read_json(path)
        parts.append(f"<h3>{html.escape(path.stem)}</h3>")
        if payload is None:
            parts.append(f'<p class="note">{html.escape(problem or "")}</p>')
            continue
        step = payload.get("step")
        if isinstance(step, int) and now is not None and step != now:
            parts.append(f'<p class="note">Measured at step {step:,}; the checkpoint is now at step {now:,}: run '
                         "it again for the current network.</p>")  # fmt: skip
        if path.stem == "viz":
            parts.append(_ascent_note(payload))
        parts.append(_comparison(payload) + _table(payload))
    for path in pictures:
        png = _read_png(path)
        parts.append(_figure(png, path.stem, f"{EVAL_DIR}/{path.name}", f"{EVAL_DIR}/{path.name} is not a PNG"))
    return "".join(parts)


def build_report(run_dir: Path) -> str:
    """The HTML text of the report on ``run_dir`` (raises :class:`DownpourError` if it is not a run directory)."""
    run_dir = Path(run_dir)
    if not (run_dir / rundir.CONFIG).is_file():
        raise DownpourError(f"{run_dir} is not a run directory: {rundir.config_missing(run_dir)}")
    log = read_run_log(run_dir / rundir.METRICS)
    config_text = (run_dir / rundir.CONFIG).read_text(errors="replace")
    filters = _read_png(run_dir / rundir.FILTERS)
    stale = ", ".join(
        f"shard {s}: {h.total:,} updates, mean {h.summary()['mean']:.2f}, p99 {h.summary()['p99']}"
        for s, h in log.staleness.items()
    )
    sections = [
        ("Summary", _summary_section(run_dir) + _log_notes(log, log_missing=not (run_dir / rundir.METRICS).exists())),
        ("Loss", _figure(_drawn(plots.loss_figure, log), "loss curves",
                         "Mini-batch loss of each push (dots: thinned to 20,000) with its running mean, and the loss "
                         "on the fixed held-out batch (at the start, every train.eval_every seconds when set, about 50 "
                         "times in a simulated run, and at the end).",
                         "No losses in metrics.jsonl yet.")),
        ("Throughput", _figure(_drawn(plots.throughput_figure, log), "throughput",
                               "Examples per second, one point a second while the workers train.",
                               "No throughput rows in metrics.jsonl: they are written once a second, so a run "
                               "that trained for under a second has none, and a simulated run logs none; the "
                               "summary above gives the rate.")),
        ("Staleness", _figure(_drawn(plots.staleness_figure, log), "staleness histograms",
                              f"Applied updates by staleness, per shard ({stale}).", "No applied pushes logged.")),
        ("First-layer filters", _figure(filters, "filters", rundir.FILTERS,
                                        f"No {rundir.FILTERS} in the run directory (written at the end of training).",
                                        "filters")),
        ("Evaluation", _eval_section(run_dir)),
        ("Resolved config", f"<pre>{html.escape(config_text)}</pre>"),
    ]  # fmt: skip
    body = "".join(f"<h2>{html.escape(title)}</h2>{content}" for title, content in sections)
    title = f"downpour run {run_dir.name}"
    made = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(str(run_dir))} · {log.sessions} session(s) · report written {made}</p>{body}</body></html>\n"
    )


PAGE_SUFFIXES = (".html", ".htm")


def checked_out(out: Path, run_dir: Path) -> Path:
    """The file ``report --out`` names, refused before any work unless a page belongs there: its name must end in
    .html or .htm, and it must not be one of the run's own files (a page written over ``checkpoint/state.json``
    lost the run), nor something that exists as other than a file (a directory, a device such as /dev/null, a
    pipe: the page replaced it with a file). A link to a page is followed: the page it points to is written."""
    target, run = out.resolve(), Path(run_dir).resolve()
    if target.is_relative_to(run) and target != run / REPORT:
        raise DownpourError(f"invalid --out: {out} is inside run {run_dir}, whose files it could replace (write "
                            f"{Path(run_dir) / REPORT}, or a page outside the run)")  # fmt: skip
    if target.exists() and not target.is_file():
        raise DownpourError(f"invalid --out: {out} exists and is not a file (name the page to write)")
    if out.suffix.lower() not in PAGE_SUFFIXES:
        raise DownpourError(f"invalid --out: {out} (the report is a web page: end the name in .html)")
    return target if out.is_symlink() else out


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report on ``run_dir`` to ``out`` (default ``RUN_DIR/report.html``; see :func:`checked_out`),
    atomically; return its path."""
    path = checked_out(Path(out), Path(run_dir)) if out is not None else Path(run_dir) / REPORT
    text = build_report(run_dir)
    rundir.atomic_write_text(path, text)
    return path


def write_report_after_training(run_dir: Path, warn: Callable[[str], None]) -> Path | None:
    """Write ``RUN_DIR/report.html`` at the end of ``downpour train``; on any failure call ``warn`` and go on (the
    run is already saved: a page that cannot be drawn must not turn a finished run into a failed command)."""
    try:
        return write_report(run_dir)
    except Exception as exc:  # any failure: see the docstring
        warn(f"could not write the report ({type(exc).__name__}: {exc}); the run is saved: "
             f"try `downpour report {run_dir}`")  # fmt: skip
        return None
