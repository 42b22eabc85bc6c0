"""Draws a suite's bar charts (harness.Chart) as PNG files with matplotlib.

matplotlib is in the `bench` optional dependencies (`pip install -e '.[bench]'`); without it
the tables are still printed and written, and the chart is skipped with one line saying so.
"""

from __future__ import annotations

import logging
from pathlib import Path

from bench.harness import Chart

log = logging.getLogger(__name__)


def draw(chart: Chart, path: Path) -> str | None:
    """Write CHART to PATH as a PNG; None when written, else why it was not."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: files only
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no chart drawn"
    points = [(label, value) for label, value in zip(chart.labels, chart.values, strict=True)
              if value == value and value > 0]
    if not points:
        return "no ratio to draw"
    labels = [p[0] for p in reversed(points)]  # the first row on top
    values = [p[1] for p in reversed(points)]
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(points) + 1.6))
    colours = ["#2a7ab9" if v < 1 else "#c0504d" for v in values]
    bars = ax.barh(range(len(values)), values, color=colours)
    ax.set_yticks(range(len(values)), labels, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(min(min(values) / 1.5, 0.5), max(max(values) * 1.6, 2.0))
    ax.axvline(1.0, color="black", linewidth=0.8)
    for bar, value in zip(bars, values, strict=True):
        ax.text(value * 1.08, bar.get_y() + bar.get_height() / 2, f"{value:.2f}x",
                va="center", fontsize=7)
    ax.set_xlabel(chart.axis, fontsize=8)
    ax.set_title(chart.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
