"""PNG plot of one op's benchmark rows: one subplot per mode, grouped bars (one per provider)
for each shape, median time in ms with 20/80 % quantile whiskers."""
from __future__ import annotations

from typing import Sequence

from vlkernels.bench.harness import MODES, ordered_unique, provider_order

# A log axis once the slowest bar is this many times the fastest: otherwise small shapes vanish.
LOG_SCALE_SPREAD = 20.0


def plot_op(rows: Sequence[dict], path: str) -> None:
    """Write the plot of the time_ms rows (of a single op) to ``path``."""
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

    width_per_mode = max(4.5, 0.35 * len(shapes) * (len(providers) + 1) + 1.5)
    fig, axes = plt.subplots(1, len(modes), figsize=(width_per_mode * len(modes), 5.2), squeeze=False)
    bar_width = 0.8 / len(providers)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, mode in zip(axes[0], modes):
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
        ax.set_title(mode)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("time (ms, median; whiskers 20-80 %)")
        ax.grid(axis="y", alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    first = times[0]
    fig.suptitle(f"{op}  ({first['dtype']})  on {first['device']}\n{first['versions']}  commit {first['commit']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["plot_op"]
