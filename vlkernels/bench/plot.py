"""PNG plot of one op's benchmark rows: one panel per mode (stacked), grouped bars (one per
provider) for each shape, median time in ms with 20/80 % quantile whiskers; the legend above
the panels, clear of every bar."""
from __future__ import annotations

import textwrap
from typing import Sequence

from vlkernels.bench.harness import MODES, ordered_unique, provider_order

# A log axis once the slowest bar is this many times the fastest: otherwise small shapes vanish.
LOG_SCALE_SPREAD = 20.0
PANEL_WIDTH_IN = (6.0, 12.0)  # narrowest and widest figure, inches
PANEL_HEIGHT_IN = 2.6
DPI = 110


def plot_op(rows: Sequence[dict], path: str) -> None:
    """Write the plot of the time_ms rows (of a single op) to ``path``."""
    import matplotlib.pyplot as plt

    fig = figure(rows)
    # bbox_inches="tight": nothing (a long tick label, the title) is cut at the figure's edge.
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def figure(rows: Sequence[dict]):
    """The matplotlib figure of the time_ms rows of a single op (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as plt

    times = [r for r in rows if r["metric"] == "time_ms"]
    if not times:
        raise ValueError("no time_ms rows to plot")
    op = times[0]["op"]
    modes = [m for m in MODES if any(r["mode"] == m for r in times)]
    shapes = ordered_unique(r["shape"] for r in times)
    providers = provider_order(r["provider"] for r in times)
    by_key = {(r["mode"], r["shape"], r["provider"]): r for r in times}

    # One panel per mode, stacked, each as wide as its shapes need (within PANEL_WIDTH_IN): a
    # row of panels grows without bound with many shapes (model_step's was 5000 px wide).
    width = min(PANEL_WIDTH_IN[1], max(PANEL_WIDTH_IN[0], 0.3 * len(shapes) * (len(providers) + 1) + 2.0))
    # Constrained layout places the suptitle, the legend ("outside": below the panels, clear
    # of every bar) and the panels without overlaps.
    fig, axes = plt.subplots(len(modes), 1, figsize=(width, 1.4 + PANEL_HEIGHT_IN * len(modes)), squeeze=False,
                             layout="constrained")
    bar_width = 0.8 / len(providers)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, mode in zip(axes[:, 0], modes):
        values = []
        for j, provider in enumerate(providers):
            xs, heights, low, high = [], [], [], []
            for i, shape in enumerate(shapes):
                row = by_key.get((mode, shape, provider))
                if row is None:
                    continue
                median, p20, p80 = (float(row[k]) for k in ("median", "p20", "p80"))
                xs.append(i - 0.4 + bar_width * (j + 0.5))
                heights.append(median)
                low.append(max(median - p20, 0.0))
                high.append(max(p80 - median, 0.0))
            values += heights
            ax.bar(xs, heights, bar_width, yerr=[low, high], capsize=2, label=provider,
                   color=colors[j % len(colors)], edgecolor="black", linewidth=0.4)
        positive = [v for v in values if v > 0]
        if positive and max(positive) / min(positive) > LOG_SCALE_SPREAD:
            ax.set_yscale("log")
        ax.set_title(mode, fontsize=10)
        ax.set_xticks(range(len(shapes)))
        ax.set_xlim(-0.6, len(shapes) - 0.4)
        ax.set_xticklabels(shapes if ax is axes[-1, 0] else [], rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("ms (median, 20-80 %)", fontsize=8)
        ax.grid(axis="y", alpha=0.3, which="both")
    first = times[0]
    title = f"{op} ({first['dtype']}) on {first['device']}; {first['versions']}; commit {first['commit']}"
    fig.suptitle(textwrap.fill(title, width=int(width * 11)), fontsize=9)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    return fig


__all__ = ["figure", "plot_op"]
