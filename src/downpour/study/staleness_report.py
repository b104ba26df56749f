"""The staleness study's statistics and report (:mod:`downpour.study.staleness`): per-cell summaries, ``table.md``,
``results.json`` and the plots of loss against gradients computed and time, staleness and final losses."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from downpour.ps.staleness import StalenessHistogram

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------


def finite_or_none(x: float | None) -> float | None:
    """``x`` as a float when it is finite, else None (JSON has no NaN)."""
    return float(x) if x is not None and math.isfinite(x) else None


def _final(run: dict[str, Any]) -> float:
    """A run's final loss for statistics: +inf when it is not finite."""
    x = run["final_loss"]
    return math.inf if x is None else float(x)


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1, linear interpolation) of values that may hold +inf (then so may the result)."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = q * (len(xs) - 1)
    low, high = math.floor(pos), math.ceil(pos)
    if low == high or xs[low] == xs[high]:
        return xs[low]
    if math.isinf(xs[high]):
        return math.inf
    return xs[low] + (xs[high] - xs[low]) * (pos - low)


def _pooled_histogram(runs: list[dict[str, Any]]) -> StalenessHistogram:
    histogram = StalenessHistogram()
    for run in runs:
        s = run["staleness"]
        histogram.add(np.repeat(np.asarray(s["values"], dtype=np.int64), np.asarray(s["counts"], dtype=np.int64)))
    return histogram


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (policy, workers), in grid order: final held-out loss median and quartiles over seeds (+inf for
    a non-finite loss; None in the JSON), fraction diverged, staleness mean and p99 pooled over seeds."""
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        cells.setdefault((run["policy"], run["workers"]), []).append(run)
    rows = []
    for (name, n), group in cells.items():
        finals = [_final(run) for run in group]
        initials = [run["initial_loss"] for run in group if run["initial_loss"] is not None]
        staleness = _pooled_histogram(group).summary()
        rows.append(
            {
                "policy": name,
                "workers": n,
                "runs": len(group),
                "initial_loss_median": finite_or_none(quantile(initials, 0.5)) if initials else None,
                "final_loss_median": finite_or_none(quantile(finals, 0.5)),
                "final_loss_q25": finite_or_none(quantile(finals, 0.25)),
                "final_loss_q75": finite_or_none(quantile(finals, 0.75)),
                "diverged": sum(run["diverged"] for run in group) / len(group),
                "staleness_mean": float(staleness["mean"]),
                "staleness_p99": int(staleness["p99"]),
                "sim_time_median": quantile([run["sim_time"] for run in group], 0.5),
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------


def _fmt(x: float | None) -> str:
    return "∞" if x is None or math.isinf(x) else f"{x:.4g}"


def table_markdown(result: dict[str, Any]) -> str:
    """The report's table (and a few lines saying what was run) as Markdown."""
    grid, config = result["grid"], result["config"]
    d, m, t, p = config["data"], config["model"], config["train"], config["ps"]
    sim = result.get("simulator", {})
    lines = [
        "# Staleness study",
        "",
        f"Model `{m['name']}` ({m['features']} features) on `{d['source']}` (patch {d['patch_size']}, "
        f"{d['examples']:,} examples, {d['held_out']} held out); rule `{p['rule']}`, lr {p['lr']:g}, "
        f"batch {t['batch_size']}; {grid['steps']:,} gradients per run (easgd: steps // τ exchanges; sync: whole "
        "rounds of N, steps // N · N, at least one); "
        f"{grid['seeds']} seeds (train.seed + 0..{grid['seeds'] - 1}).",
    ]
    if result.get("complete") is False:
        total = len(grid["policies"]) * len(grid["workers"]) * grid["seeds"]
        lines.append(f"**Incomplete: interrupted after {len(result['runs'])} of {total} runs**; the cells below hold "
                     "the runs that finished.")  # fmt: skip
    if result.get("backend", "sim") == "local":
        lines.append(
            "Local backend: every run is a real training session, worker processes pushing into shared-memory "
            "shards on this machine; times are wall-clock seconds from each run's first push, not simulated."
        )
    else:
        lines.append(
            "Simulated cluster: "
            + ", ".join(f"{k} {v:g}" for k, v in sim.items() if k not in ("seed", "seconds"))
            + "."
        )
    if sim and not sim.get("compute_sigma") and not sim.get("stragglers") and not sim.get("network_sigma"):
        lines.append(
            "Every worker takes the same time per push, so the workers run in lockstep: after the first round every "
            "asynchronous push has staleness N − 1, and an SSP bound never binds (ssp runs as downpour). Set "
            "cluster.sim_compute_sigma / cluster.sim_stragglers for a busier cluster."
        )
    lines += [
        "",
        "Final held-out loss over seeds (∞: not finite); *diverged*: non-finite loss, a rejected push, or a final "
        "loss above the initial one. Staleness pooled over the seeds' applied pushes.",
        "",
        "| policy | workers | final loss median | IQR (q25–q75) | diverged | staleness mean | staleness p99 "
        f"| {'wall' if result.get('backend') == 'local' else 'sim.'} time (median) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["cells"]:
        lines.append(
            f"| {row['policy']} | {row['workers']:,} | {_fmt(row['final_loss_median'])} "
            f"| {_fmt(row['final_loss_q25'])}–{_fmt(row['final_loss_q75'])} "
            f"| {row['diverged']:.0%} | {row['staleness_mean']:.1f} | {row['staleness_p99']} "
            f"| {row['sim_time_median']:.4g} s |"
        )
    initials = [row["initial_loss_median"] for row in result["cells"] if row["initial_loss_median"] is not None]
    if initials:
        lines += ["", f"Initial held-out loss (median over seeds): {quantile(initials, 0.5):.4g}."]
    if "wall_s" in result:
        runs = len(result["runs"])
        wall = result["wall_s"]
        verb = "trained" if result.get("backend") == "local" else "simulated"
        lines += ["", f"{runs} runs {verb} in {wall:.1f} s of wall time ({wall / runs:.2f} s per run)."]
    return "\n".join(lines) + "\n"


CAP_FACTOR = 10.0  # the plots show losses up to this many times the largest initial loss; above it: diverged


def _cap(result: dict[str, Any]) -> float:
    """The plots' ceiling: ``CAP_FACTOR`` × the largest initial held-out loss."""
    initials = [run["initial_loss"] for run in result["runs"] if run["initial_loss"] is not None]
    return CAP_FACTOR * max(initials, default=1.0)


def _capped(values: Sequence[float | None], cap: float) -> np.ndarray:
    """Losses with None (not finite) and anything above ``cap`` set to ``cap``."""
    array = np.array([cap if v is None else v for v in values], dtype=np.float64)
    array[~np.isfinite(array)] = cap
    return np.minimum(array, cap)


def _band(runs: list[dict[str, Any]], xkey: str, cap: float, points: int = 60) -> tuple[np.ndarray, ...]:
    """Every run's loss curve on a common x grid (log-linear interpolation): x, median, q25, q75 over runs."""
    end = min(run["curve"][xkey][-1] for run in runs)
    x = np.linspace(0.0, end, points)
    logs = np.stack(
        [np.interp(x, run["curve"][xkey], np.log(_capped(run["curve"]["loss"], cap))) for run in runs]
    )  # (R, points)
    q25, median, q75 = np.exp(np.percentile(logs, [25, 50, 75], axis=0))
    return x, median, q25, q75


def _cells(result: dict[str, Any]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in result["runs"]:
        cells.setdefault((run["policy"], run["workers"]), []).append(run)
    return cells


def _save(fig: Any, path: Path, *, bottom: float, hspace: float = 0.2, wspace: float = 0.2) -> Path:
    """Fixed margins in inches (``tight_layout`` costs seconds on a busy machine), then write the PNG."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=0.85 / width, right=1 - 0.15 / width, bottom=bottom / height, top=1 - 0.75 / height,
                        hspace=hspace, wspace=wspace)  # fmt: skip
    fig.savefig(path, dpi=100)
    return path


def _log_y(ax: Any) -> None:
    """A log y axis ticked at 1, 2, 5 × 10ᵏ in plain numbers, without minor ticks (slow to lay out)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_locator(NullLocator())


def _mark_cap(ax: Any, cap: float) -> None:
    """A dashed line at the plots' ceiling, where losses off the scale sit, and room above it. (It is not the
    table's "diverged", which also counts a final loss merely above the initial one, or a rejected push.)"""
    ax.axhline(cap, color="0.4", linestyle="--", linewidth=0.8)
    ax.text(0.99, cap * 1.1, f"off the scale (≥ {CAP_FACTOR:g}× initial, or not finite)",
            transform=ax.get_yaxis_transform(), va="bottom", ha="right", fontsize=7, color="0.3")  # fmt: skip
    ax.set_ylim(top=cap * 4)


def _curves_figure(result: dict[str, Any], xkey: str, xlabel: str, title: str) -> Figure:
    """One panel per worker count, one line per policy: median held-out loss over seeds with an IQR band."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    grid, cells, cap = result["grid"], _cells(result), _cap(result)
    workers = grid["workers"]
    fig = Figure(figsize=(4.3 * len(workers), 4.0))
    axes = fig.subplots(1, len(workers), squeeze=False)
    colors = matplotlib.colormaps["tab10"]
    for col, n in enumerate(workers):
        ax = axes[0, col]
        for i, name in enumerate(grid["policies"]):
            runs = cells.get((name, n), [])
            if not runs:
                continue
            x, median, q25, q75 = _band(runs, xkey, cap)
            diverged = sum(run["diverged"] for run in runs)
            label = f"{name} ({diverged}/{len(runs)} diverged)" if diverged else name
            ax.plot(x, median, color=colors(i % 10), linewidth=1.5, label=label)
            ax.fill_between(x, q25, q75, color=colors(i % 10), alpha=0.18, linewidth=0)
        _log_y(ax)
        if any((_capped(run["curve"]["loss"], cap) >= cap).any() for name in grid["policies"]
               for run in cells.get((name, n), [])):  # fmt: skip
            _mark_cap(ax, cap)
        ax.set_title(f"{n:,} worker{'s' if n > 1 else ''}")
        ax.set_xlabel(xlabel)
        if xkey == "grads":  # a count: no ticks at half a gradient
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, which="major", alpha=0.3)
        if ax.get_legend_handles_labels()[1]:  # a panel of an interrupted study may hold no run
            ax.legend(fontsize=7, loc="best")
    axes[0, 0].set_ylabel("held-out loss (median over seeds, IQR band)")
    fig.suptitle(title)
    return fig


def loss_vs_gradients_figure(result: dict[str, Any]) -> Figure:
    """Held-out loss against gradients computed, over all workers (written as ``loss_vs_updates.png``).

    Gradients, not server updates: every run is given the same gradient budget (``steps``), so on this axis every
    curve ends at the same x and policies are compared per unit of compute. Against server updates, ``sync`` (one
    update per N gradients) and ``easgd`` (one exchange per τ gradients) would end N or τ times sooner and look as
    many times more efficient than the asynchronous policies, whose every gradient is an update.
    """
    title = f"Held-out loss against gradients computed ({result['grid']['steps']:,} per run)"
    return _curves_figure(result, "grads", "gradients computed (all workers)", title)


def loss_vs_time_figure(result: dict[str, Any]) -> Figure:
    """Held-out loss against simulated time (wall-clock seconds with the local backend)."""
    when = "wall-clock" if result.get("backend") == "local" else "simulated"
    return _curves_figure(result, "time", f"{when} time (s)", f"Held-out loss against {when} time")


def staleness_histograms_figure(result: dict[str, Any]) -> Figure:
    """A grid of staleness histograms: one row per policy, one column per worker count (pooled over seeds)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    grid, cells = result["grid"], _cells(result)
    rows, cols = len(grid["policies"]), len(grid["workers"])
    fig = Figure(figsize=(3.5 * cols, 2.3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, name in enumerate(grid["policies"]):
        for c, n in enumerate(grid["workers"]):
            ax = axes[r, c]
            histogram = _pooled_histogram(cells.get((name, n), []))
            ax.set_title(f"{name}, {n:,} worker{'s' if n > 1 else ''}", fontsize=9)
            if histogram.total == 0:
                ax.text(0.5, 0.5, "no applied push", ha="center", va="center", transform=ax.transAxes)
                continue
            s = histogram.summary()
            fraction = histogram.counts / histogram.total
            ax.stairs(fraction, np.arange(fraction.size + 1) - 0.5, fill=True, color="tab:blue", alpha=0.8)
            _log_y(ax)
            ax.set_ylim(max(fraction[fraction > 0].min() / 3, 1e-7), 3.0)
            pad = 0.02 * fraction.size
            ax.set_xlim(-0.5 - pad, max(fraction.size - 0.5 + pad, 1.5))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # staleness is a count of versions
            ax.text(0.5, 0.95, f"mean {s['mean']:.1f}, p99 {s['p99']}", transform=ax.transAxes, ha="center",
                    va="top", fontsize=8, bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0})  # fmt: skip
            if r == rows - 1:
                ax.set_xlabel("staleness (versions)")
            if c == 0:
                ax.set_ylabel("fraction of pushes")
    fig.suptitle("Staleness of applied pushes (pooled over seeds)")
    return fig


def final_loss_figure(result: dict[str, Any]) -> Figure:
    """One panel per worker count: final held-out loss per policy over seeds (box + points; diverged as red x)."""
    from matplotlib.figure import Figure

    grid, cells, cap = result["grid"], _cells(result), _cap(result)
    workers, policies = grid["workers"], grid["policies"]
    fig = Figure(figsize=(max(4.0, 0.5 * len(policies) + 1.0) * len(workers), 4.4))
    axes = fig.subplots(1, len(workers), squeeze=False)
    for col, n in enumerate(workers):
        ax = axes[0, col]
        capped = False
        for i, name in enumerate(policies):
            runs = cells.get((name, n), [])
            if not runs:
                continue
            finals = _capped([run["final_loss"] for run in runs], cap)
            capped = capped or bool((finals >= cap).any())
            ax.boxplot([finals], positions=[i], widths=0.6, showfliers=False, medianprops={"color": "black"})
            jitter = np.linspace(-0.18, 0.18, len(runs)) if len(runs) > 1 else np.zeros(1)
            diverged = np.array([run["diverged"] for run in runs])
            ax.scatter(i + jitter[~diverged], finals[~diverged], s=12, color="tab:blue", zorder=3)
            first = diverged.any() and not ax.get_legend_handles_labels()[1]
            ax.scatter(i + jitter[diverged], finals[diverged], s=22, color="tab:red", marker="x", zorder=3,
                       label="diverged" if first else None)  # fmt: skip
        _log_y(ax)
        if capped:
            _mark_cap(ax, cap)
        ax.set_xticks(range(len(policies)), policies, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{n:,} worker{'s' if n > 1 else ''}")
        ax.grid(True, axis="y", which="major", alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7, loc="best")
    axes[0, 0].set_ylabel("final held-out loss (each point a seed)")
    fig.suptitle(f"Final held-out loss after {grid['steps']:,} gradients, over {grid['seeds']} seeds")
    return fig


def write_plots(result: dict[str, Any], out: Path) -> list[Path]:
    """The report's four PNGs (matplotlib figures without pyplot) in ``out``; returns their paths.

    ``loss_vs_updates.png`` keeps its name (scripts read it) but plots against gradients computed: see
    :func:`loss_vs_gradients_figure`.
    """
    return [
        _save(loss_vs_gradients_figure(result), out / "loss_vs_updates.png", bottom=0.6, wspace=0.22),
        _save(loss_vs_time_figure(result), out / "loss_vs_time.png", bottom=0.6, wspace=0.22),
        _save(staleness_histograms_figure(result), out / "staleness_histograms.png", bottom=0.55, hspace=0.55,
              wspace=0.25),
        _save(final_loss_figure(result), out / "final_loss.png", bottom=0.9, wspace=0.22),
    ]  # fmt: skip


def _deterministic(result: dict[str, Any]) -> dict[str, Any]:
    """What ``results.json`` holds: the result without wall-clock times and file paths."""
    return {k: v for k, v in result.items() if k not in ("wall_s", "files")}


def write_report(result: dict[str, Any], out: Path) -> list[Path]:
    """Write ``results.json``, ``table.md`` and the PNGs into ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    results.write_text(json.dumps(_deterministic(result), indent=1, allow_nan=False) + "\n")
    table = out / "table.md"
    table.write_text(table_markdown(result))
    return [results, table, *write_plots(result, out)]
