"""Small matplotlib helpers for experiment figures (headless: the Agg backend, PNG out)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class Series:
    """One curve: medians at `x` with a spread band `[lo, hi]` (e.g. min/max over repeats)."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    lo: Sequence[float] | None = None  # lower end of the spread, same length as y
    hi: Sequence[float] | None = None  # upper end of the spread
    style: str = "-o"  # matplotlib format string


def line_plot(path: Path, series: Sequence[Series], *, xlabel: str, ylabel: str, title: str = "",
              logx: bool = False, logy: bool = False) -> Path:
    """Write a line plot of `series` (medians, with error bars for the spread) to `path`."""
    plt, fig, ax = _axes()
    for s in series:
        if s.lo is not None and s.hi is not None:
            # Error bars go below/above the median: matplotlib wants distances, not ends.
            err = [[max(m - lo, 0.0) for m, lo in zip(s.y, s.lo)], [max(hi - m, 0.0) for m, hi in zip(s.y, s.hi)]]
            ax.errorbar(s.x, s.y, yerr=err, fmt=s.style, capsize=3, label=s.label, markersize=4)
        else:
            ax.plot(s.x, s.y, s.style, label=s.label, markersize=4)
    if logx:
        from matplotlib.ticker import ScalarFormatter

        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())  # 4096, not 2^12
    ax.set_xlabel(xlabel)
    return _save(plt, fig, ax, path, ylabel, title, logy, grid_axis="both")


def bar_plot(path: Path, groups: Sequence[str], bars: dict[str, Sequence[float]], *, ylabel: str, title: str = "",
             logy: bool = False) -> Path:
    """Write grouped bars to `path`: one group per name in `groups`, one bar per key of `bars`
    (its values in group order), each labelled with its value."""
    plt, fig, ax = _axes()
    width = 0.8 / max(1, len(bars))
    for k, (label, values) in enumerate(bars.items()):
        xs = [g + (k - (len(bars) - 1) / 2) * width for g in range(len(groups))]
        drawn = ax.bar(xs, values, width, label=label)
        ax.bar_label(drawn, fmt="%.3g", fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    return _save(plt, fig, ax, path, ylabel, title, logy, grid_axis="y")


def _axes():
    """pyplot (headless), a new figure and its axes, in the size every figure here uses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    return plt, fig, ax


def _save(plt, fig, ax, path: Path, ylabel: str, title: str, logy: bool, grid_axis: str) -> Path:
    """The common finish: y scale and label, title, grid, legend; written to `path` as PNG."""
    if logy:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, axis=grid_axis, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
