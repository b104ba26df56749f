"""The report's figures, drawn with matplotlib's Agg canvas (no display, no global pyplot state) into PNG bytes."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from downpour.report.runlog import RunLog

MAX_POINTS = 20_000  # pushes drawn as dots; more are thinned evenly (the running mean still uses all of them)
MAX_SHARDS = 8  # staleness panels; more shards are summed into the last one


def _format_step(step: object) -> str:
    """A start row's step as the report's notes show it (``1,200``), or ``?`` where the row has none."""
    return f"{step:,}" if isinstance(step, int) and not isinstance(step, bool) else "?"


def _png(fig: Figure | None) -> bytes | None:
    """``fig`` as PNG bytes (None for no figure: nothing to draw)."""
    if fig is None:
        return None
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` finite values at each position (NaN where none is finite yet)."""
    finite = np.isfinite(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])  # (P + 1,)
    counts = np.concatenate([[0], np.cumsum(finite)])  # (P + 1,)
    end = np.arange(1, len(values) + 1)
    begin = np.maximum(end - window, 0)
    n = counts[end] - counts[begin]
    return np.where(n > 0, (sums[end] - sums[begin]) / np.maximum(n, 1), np.nan)


def _trailing_non_finite(steps: np.ndarray, values: np.ndarray) -> float | None:
    """The step of the first value of the non-finite run that ends ``values``, or None when the last is finite."""
    if not values.size or np.isfinite(values[-1]):
        return None
    finite = np.flatnonzero(np.isfinite(values))
    return float(steps[finite[-1] + 1 if finite.size else 0])


def diverged_step(log: RunLog) -> float | None:
    """Where the loss became non-finite for good: the earliest step from which the per-push losses or the held-out
    losses stay NaN or Inf to the end of the log; None when both end finite (a run that did not diverge).

    Pushes that were not applied for being late (``log.push_late``: the simulator logs no loss for them) are left
    out, and non-finite pushes followed by a finite held-out loss are not a divergence: those pushes were refused,
    and the parameters were measured finite after them."""
    counted = ~log.push_late
    pushes = _trailing_non_finite(log.push_step[counted], log.push_loss[counted])
    held = _trailing_non_finite(log.held_out_step, log.held_out_loss)
    if pushes is not None and held is None and log.held_out_loss.size and log.held_out_step[-1] >= pushes:
        pushes = None
    steps = [step for step in (pushes, held) if step is not None and np.isfinite(step)]  # an edited row: no step
    return min(steps) if steps else None


def draw_loss(log: RunLog) -> Figure | None:
    """Per-push mini-batch losses (dots and a running mean) and the held-out loss, against the global step; a run
    whose loss ended non-finite gets a red dashed line labelled "diverged" where it became so (its curves stop at
    their last finite point) and the steps after it, to the end of the log, shaded. None when no loss is finite."""
    has_push = bool(np.isfinite(log.push_loss).any())
    has_held = bool(np.isfinite(log.held_out_loss).any())
    if not (has_push or has_held):
        return None
    fig = Figure(figsize=(8, 3.6), layout="constrained")
    ax = fig.add_subplot()
    values = []
    if has_push:
        thin = np.linspace(0, len(log.push_loss) - 1, min(len(log.push_loss), MAX_POINTS)).astype(np.int64)
        ax.plot(log.push_step[thin], log.push_loss[thin], ".", ms=2, alpha=0.25, color="tab:blue",
                label="mini-batch loss of each push")  # fmt: skip
        window = max(1, len(log.push_loss) // 100)
        ax.plot(log.push_step, running_mean(log.push_loss, window), color="tab:blue", lw=1.5,
                label=f"running mean ({window} pushes)")  # fmt: skip
        values.append(log.push_loss)
    if has_held:
        style = "o:" if len(log.held_out_loss) > 2 else "o"  # dotted: measured only at the points
        ax.plot(log.held_out_step, log.held_out_loss, style, color="tab:red", ms=5, lw=1.2, label="held-out loss")
        values.append(log.held_out_loss)
    if (step := diverged_step(log)) is not None:
        ax.axvline(step, color="tab:red", ls="--", lw=1.2, label=f"diverged: loss not finite from step {step:,.0f}")
        steps = np.concatenate([log.push_step, log.held_out_step]).astype(np.float64)
        last = float(np.nanmax(steps))  # where the log ends: the non-finite stretch shaded up to it
        if last > step:
            ax.axvspan(step, last, color="tab:red", alpha=0.07, lw=0)
    finite = np.concatenate(values)
    finite = finite[np.isfinite(finite)]
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 20:
        ax.set_yscale("log")
    ax.set_xlabel("global step (pushes)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # a count: no ticks at half a push
    ax.set_ylabel("loss per example")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    return fig


def loss_figure(log: RunLog) -> bytes | None:
    """:func:`draw_loss` as PNG bytes (None when no loss is finite)."""
    return _png(draw_loss(log))


def draw_throughput(log: RunLog) -> Figure | None:
    """Examples per second, each second of the run (the local backend logs it; the simulator does not); a resumed
    run's later sessions start at dotted vertical lines labelled with their session. None without throughput rows."""
    keep = np.isfinite(log.throughput) & np.isfinite(log.throughput_t)
    if not keep.any():
        return None
    fig = Figure(figsize=(8, 2.8), layout="constrained")
    ax = fig.add_subplot()
    t, rate = log.throughput_t[keep], log.throughput[keep]
    later = log.session_t[1:]  # (S - 1,) where each later session started
    if later.size:  # no line across the gap between sessions (the driver was down, or restarted)
        at = np.searchsorted(t, later, side="right")  # after a last point at the very time the next one starts
        t, rate = np.insert(t, at, np.nan), np.insert(rate, at, np.nan)
    ax.plot(t, rate, ".-", color="tab:green", lw=1.2, ms=4)  # one row shows
    for index, start in enumerate(later, start=1):
        row = log.starts[index] if index < len(log.starts) else {}
        ax.axvline(start, color="0.35", ls=":", lw=1.2)
        ax.text(start, 0.97, f" session {row.get('session', index)} from step {_format_step(row.get('step'))}",
                transform=ax.get_xaxis_transform(), ha="left", va="top", fontsize=8, color="0.25")  # fmt: skip
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("examples / s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    return fig


def throughput_figure(log: RunLog) -> bytes | None:
    """:func:`draw_throughput` as PNG bytes (None without throughput rows)."""
    return _png(draw_throughput(log))


def staleness_figure(log: RunLog) -> bytes | None:
    """:func:`draw_staleness` as PNG bytes (None without applied pushes)."""
    return _png(draw_staleness(log))


def draw_staleness(log: RunLog) -> Figure | None:
    """One histogram of applied updates by staleness per shard (shards past the eighth summed into the last)."""
    shards = sorted(log.staleness)
    if not shards or all(log.staleness[s].total == 0 for s in shards):
        return None
    panels: list[tuple[str, np.ndarray]] = []
    for shard in shards[: MAX_SHARDS - 1] if len(shards) > MAX_SHARDS else shards:
        panels.append((f"shard {shard}", log.staleness[shard].counts))
    if len(shards) > MAX_SHARDS:
        rest = shards[MAX_SHARDS - 1 :]
        width = max(log.staleness[s].counts.size for s in rest)
        summed = np.zeros(width, dtype=np.int64)
        for s in rest:
            summed[: log.staleness[s].counts.size] += log.staleness[s].counts
        panels.append((f"shards {rest[0]}–{rest[-1]}", summed))
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(2.4 * cols + 0.6, 2.2 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    for ax, (title, counts) in zip(axes.flat, panels, strict=False):
        total = max(int(counts.sum()), 1)
        mean = float((np.arange(counts.size) * counts).sum() / total)
        ax.bar(np.arange(counts.size), counts, width=0.9, color="tab:purple")
        ax.set_title(f"{title}: mean {mean:.2f}", fontsize=9)
        ax.set_xlabel("staleness (updates)", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # updates counted: none ticked at half of one
        ax.set_xlim(-0.6, max(counts.size, 2) - 0.4)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("applied updates", fontsize=8)
    return fig
