"""The local-optima test's report (:mod:`downpour.study.optima`): its answer in one sentence, ``optima.json``,
``optima.md`` and three pictures."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from downpour.study.paired_tests import rankable
from downpour.study.tilted_wells import TiltedWells

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _p(p: float) -> str:
    return f"{p:.2g}" if p >= 0.001 else f"{p:.1e}"


def answer_sentence(result: dict[str, Any], *, alpha: float = 0.05) -> str:
    """One plain verdict per comparison with the first arm: which arm reached the global minimum more often (exact
    McNemar), whether the minima reached differ (Stuart–Maxwell), which arm ended lower (Wilcoxon), each with its
    p-value and whether it is significant at ``alpha``."""
    arms = {arm["name"]: arm for arm in result["arms"]}
    seeds = result["settings"]["seeds"]
    sentences = []
    for comparison in result["comparisons"]:
        base, other = comparison["base"], comparison["other"]
        g, w, m = comparison["global_minimum"], comparison["final_loss"], comparison["minima"]
        hits = f"{g['other_hits']}/{seeds} runs for {other} vs {g['base_hits']}/{seeds} for {base}"
        if g["p"] < alpha:
            more, fewer = (other, base) if g["other_hits"] > g["base_hits"] else (base, other)
            verdict = f"{more} reached the global minimum significantly more often than {fewer}"
        else:
            verdict = f"no significant difference between {other} and {base} in reaching the global minimum"
        a, b = arms[other], arms[base]
        minima = (
            f"the minima reached {'differ' if m['p'] < alpha else 'do not differ significantly'} "
            f"({_counts(a)} vs {_counts(b)}; Stuart–Maxwell p={_p(m['p'])}; {other} left its starting basin for a "
            f"better minimum in {a['escaped_to_better']} runs and for a worse one in {a['fell_to_worse']}, {base} in "
            f"{b['escaped_to_better']} and {b['fell_to_worse']})"
        )
        if w["p"] < alpha:
            lower = other if w["rank_biserial"] < 0 else base
            loss = f"final losses are significantly lower for {lower}"
        else:
            loss = "final losses do not differ significantly"
        loss += (
            f" ({other} lower in {w['other_lower']} pairs, {base} in {w['other_higher']}, {w['ties']} ties; median "
            f"paired difference {other} − {base} = {w['median_difference']:+.3g}, rank-biserial "
            f"r={w['rank_biserial']:+.2f}; Wilcoxon p={_p(w['p'])})"
        )
        sentences.append(f"{verdict[0].upper()}{verdict[1:]}: {hits} (exact McNemar p={_p(g['p'])}); {minima}; {loss}.")
    if any(min(c[t]["p"] for t in ("global_minimum", "minima", "final_loss")) < alpha for c in result["comparisons"]):
        tests = 3 * len(result["comparisons"])
        sentences.append(f"({tests} tests, each at {alpha:g} without correction for multiplicity: rerun with other "
                         "seeds (--first-seed) before believing a difference.)")  # fmt: skip
    return " ".join(sentences)


def _counts(arm: dict[str, Any]) -> str:
    parts = [f"{k} {v}" for k, v in arm["counts"].items() if k != "diverged" or v]
    return ", ".join(parts)


def _json_ready(value: Any) -> Any:
    """Non-finite floats become None (JSON has no inf or NaN); tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return _json_ready(value.item())
    return value


def write_report(result: dict[str, Any], out: Path) -> list[Path]:
    """Write ``optima.json`` (the whole result, strict JSON: inf and NaN as null), ``optima.md`` (the tables and
    the answer) and three pictures: ``optima_landscape.png`` (the expected loss, its minima and basin boundaries,
    every run's end point per policy and the first seeds' trajectories), ``optima_final_loss.png`` (final-loss
    distributions and paired differences), ``optima_minima.png`` (runs per minimum per policy). Returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "optima.json", out / "optima.md"]
    payload = _json_ready({k: v for k, v in result.items() if k != "files"})
    paths[0].write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
    paths[1].write_text(_markdown(result))
    paths += _pictures(result, out)
    return paths


def _markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    minima = result["task"]["minima"]
    incomplete = []  # Ctrl-C: the arms that finished (two at least)
    if result.get("complete") is False:
        incomplete = [f"**Incomplete: interrupted after {len(result['arms'])} of {len(s['policies'])} arms**; the "
                      "comparisons hold the arms that finished.", ""]  # fmt: skip
    lines = [
        "# The local-optima test",
        "",
        f"**Answer.** {result['answer']}",
        "",
        *incomplete,
        f"Reproduce: `{result['command']}`" if result.get("command") else f"Reproduce: `{result['call']}`",
        "",
        f"Task: `{result['task']['formula']}` with tilts c = {list(s['task']['tilts'])}, noise = {s['task']['noise']}"
        f", batch size {s['task']['batch_size']} (gradient noise σ = {result['task']['gradient_noise']:.3g} per "
        "coordinate). A run reaches the minimum whose basin (an orthant with its corner at the per-coordinate local "
        f"maxima {[round(b, 4) for b in result['task']['basin_boundaries']]}) holds its final parameters.",
        "",
        f"Cluster: {s['workers']} simulated workers, lognormal compute times (σ = {s['compute_sigma']}), network "
        f"delay {s['network_mean']}; {s['seeds']} paired seeds (the same start and simulator seed in every arm), "
        f"starts uniform in [−{s['start_box']}, {s['start_box']}]^d. Learning rate matched per "
        f"{'gradient' if s['lr_match'] == 'gradient' else 'server update'}: lr = {s['lr']}.",
        "",
        "| minimum | location | loss |",
        "|---|---|---|",
    ]
    lines += [f"| {m['name']} | ({', '.join(f'{v:+.4f}' for v in m['location'])}) | {m['loss']:+.4f} |" for m in minima]
    lines += [
        "",
        "| arm | server lr | pushes | updates | "
        + " | ".join(m["name"] for m in minima)
        + " | diverged | escaped to a better basin | fell to a worse one | median final loss | mean final loss |",
        "|---|---|---|---|" + "---|" * (len(minima) + 5),
    ]
    for arm in result["arms"]:
        counts = " | ".join(str(arm["counts"][m["name"]]) for m in minima)
        lines.append(
            f"| {arm['name']} | {arm['lr']:.4g} | {arm['pushes']} | {arm['updates']} | {counts} | "
            f"{arm['counts']['diverged']} | {arm['escaped_to_better']} | {arm['fell_to_worse']} | "
            f"{arm['final_loss_median']:+.4f} | {arm['final_loss_mean']:+.4f} |"
        )
    lines += [
        "",
        "| comparison | global minimum (McNemar) | minima (Stuart–Maxwell) | final loss (Wilcoxon) |",
        "|---|---|---|---|",
    ]
    for c in result["comparisons"]:
        g, m, w = c["global_minimum"], c["minima"], c["final_loss"]
        lines.append(
            f"| {c['other']} vs {c['base']} | {g['other_hits']} vs {g['base_hits']}; discordant {g['other_only']}/"
            f"{g['base_only']}; odds ratio {g['odds_ratio']:.3g}; p = {_p(g['p'])} | χ² = {m['statistic']:.3g}, "
            f"df = {m['df']}, p = {_p(m['p'])} | {c['other']} lower in {w['other_lower']} pairs, {c['base']} in "
            f"{w['other_higher']} ({w['ties']} ties); median diff {w['median_difference']:+.3g}; "
            f"r = {w['rank_biserial']:+.2f}; p = {_p(w['p'])} |"
        )
    lines += ["", f"Wall time: {result.get('seconds', math.nan):.1f} s.", ""]
    return "\n".join(lines)


def _pictures(result: dict[str, Any], out: Path) -> list[Path]:
    paths = []
    for name, draw in (("optima_landscape.png", landscape_figure), ("optima_final_loss.png", final_loss_figure),
                       ("optima_minima.png", minima_figure)):  # fmt: skip
        paths.append(out / name)
        draw(result).savefig(paths[-1], dpi=110, bbox_inches="tight")
    return paths


def _task(result: dict[str, Any]) -> TiltedWells:
    return TiltedWells(**{k: tuple(v) if k == "tilts" else v for k, v in result["settings"]["task"].items()})


def _colors() -> list[str]:
    import matplotlib

    return matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]


def landscape_figure(result: dict[str, Any]) -> Figure:
    """The expected loss in the first two coordinates (the others at the global minimum), its minima (stars) and
    basin boundaries (dotted), every run's end point per policy and the first seeds' trajectories."""
    from matplotlib.figure import Figure  # not pyplot: a caller's backend and open figures stay as they were

    task = _task(result)
    minima = task.minima()
    arms = result["arms"]
    colors = _colors()
    markers = "oxs^vD*P"

    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    lim = max(2.0, result["settings"]["start_box"] + 0.3)
    grid = np.linspace(-lim, lim, 241)
    gx, gy = np.meshgrid(grid, grid)
    points = np.broadcast_to(np.asarray(minima[0].location), (*gx.shape, task.dim)).copy()  # (H, W, d)
    points[..., 0] = gx
    if task.dim > 1:
        points[..., 1] = gy
    z = task.loss(points)
    ax.contourf(gx, gy, z, levels=np.linspace(z.min(), min(z.max(), z.min() + 8.0), 30), cmap="Greys_r")
    boundaries = [r[1] for r in task.roots()]
    ax.axvline(boundaries[0], color="k", lw=0.8, ls=":")
    if task.dim > 1:
        ax.axhline(boundaries[1], color="k", lw=0.8, ls=":")
    for k, arm in enumerate(arms):
        end = np.asarray(arm["end"], dtype=float)
        ok = np.isfinite(end).all(1)
        end = np.clip(end[ok], -lim, lim)
        ax.scatter(
            end[:, 0],
            end[:, 1] if task.dim > 1 else np.zeros(len(end)),
            s=14,
            alpha=0.6,
            marker=markers[k % len(markers)],
            color=colors[k % len(colors)],
            label=f"{arm['name']} end points",
        )
        for j, trace in enumerate(arm["traces"]):
            t = np.clip(np.asarray(trace, dtype=float), -lim, lim)
            label = f"{arm['name']} path (seed {arm['seeds'][j]})" if j == 0 else None
            y = t[:, 1] if task.dim > 1 else np.zeros(len(t))
            ax.plot(t[:, 0], y, lw=0.7, alpha=0.8, color=colors[k % len(colors)], label=label)
    for m in minima:
        if all(abs(a - b) < 1e-12 for a, b in zip(m.location[2:], minima[0].location[2:], strict=True)):
            y = m.location[1] if task.dim > 1 else 0.0
            ax.plot(m.location[0], y, "*", color="gold", ms=14, mec="k")
            ax.annotate(
                f"{m.name}: f={m.loss:+.3f}",
                (m.location[0], y),
                xytext=(8, 10),
                textcoords="offset points",
                fontsize=9,
                bbox={"boxstyle": "round", "fc": "white", "alpha": 0.8},
            )
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_xlabel("x₁")
    ax.set_ylabel("x₂")
    ax.set_title("expected loss, minima (stars), basin boundaries (dotted), end points")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def final_loss_figure(result: dict[str, Any]) -> Figure:
    """Final-loss distributions per arm (the minima dashed) and the paired differences with the first arm, per seed
    (a count on its y axis, ticked at whole seeds)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    minima = _task(result).minima()
    arms = result["arms"]
    colors = _colors()

    fig = Figure(figsize=(11, 4.5))
    (left, right) = fig.subplots(1, 2)
    losses = [rankable(np.asarray(arm["final_loss"], float))[0] for arm in arms]
    left.boxplot(losses, showfliers=False)
    left.set_xticks(range(1, len(arms) + 1), [arm["name"] for arm in arms])
    rng = np.random.default_rng(0)
    for k, values in enumerate(losses):
        left.scatter(k + 1 + rng.uniform(-0.15, 0.15, len(values)), values, s=8, alpha=0.5, color=colors[k])
    for m in minima:
        left.axhline(m.loss, color="gold", lw=0.8, ls="--")
    left.set_ylabel("final expected loss f(x) (dashed: the minima)")
    left.set_title("final loss per run")
    for k, c in enumerate(result["comparisons"]):
        diff = losses[k + 1] - losses[0]
        right.hist(
            diff,
            bins=30,
            alpha=0.6,
            color=colors[(k + 1) % len(colors)],
            label=f"{c['other']} − {c['base']} (Wilcoxon p={_p(c['final_loss']['p'])})",
        )
    right.axvline(0.0, color="k", lw=0.8)
    right.set_xlabel("paired difference in final loss (same seed)")
    right.set_ylabel("seeds")
    right.yaxis.set_major_locator(MaxNLocator(integer=True))
    right.legend(fontsize=8)
    right.set_title("paired differences")
    return fig


def minima_figure(result: dict[str, Any]) -> Figure:
    """Runs per minimum (and diverged) per arm, side by side (a count, ticked at whole runs)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    minima = _task(result).minima()
    arms = result["arms"]
    colors = _colors()

    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    labels = [m.name for m in minima] + ["diverged"]
    width = 0.8 / len(arms)
    for k, arm in enumerate(arms):
        heights = [arm["counts"][name] for name in labels]
        ax.bar(
            np.arange(len(labels)) + (k - (len(arms) - 1) / 2) * width,
            heights,
            width,
            label=arm["name"],
            color=colors[k % len(colors)],
        )
    ax.set_xticks(range(len(labels)), [f"{m.name}\n{m.loss:+.3f}" for m in minima] + ["diverged"])
    ax.set_ylabel("runs")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    g = result["comparisons"][0]["global_minimum"]
    ax.set_title(f"minimum reached per run (global minimum: McNemar p={_p(g['p'])})")
    ax.legend()
    return fig
