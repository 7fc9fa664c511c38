"""The one place figures are drawn from: matplotlib off-screen, labelled bars with error bars, saving.

    plt = figures.pyplot()                    # matplotlib with the Agg backend (no display)
    figures.labelled_bars(ax, names, values, stds, label)   # bars, ±std, each labelled with its value
    figures.save(fig, path, banner="SYNTHETIC DATA")         # tight layout, 100 dpi, closed

Every figure of the library (a run's curves, the study's comparison, tables' bar charts, the speed
study's plots) goes through these three.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence


def pyplot():
    """matplotlib.pyplot with the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def labelled_bars(ax, names: Sequence[Any], values: Sequence[Optional[float]], stds: Sequence[Optional[float]],
                  label: Callable[[float], str], color: Any = "C0"):
    """One bar per name (a missing value drawn at 0 and labelled ``n/a``), ±std error bars when any
    std is non-zero, and each bar labelled above with ``label(value)``; returns the bars."""
    stds = [s or 0.0 for s in stds]
    bars = ax.bar(names, [v if v is not None else 0.0 for v in values], yerr=stds if any(stds) else None,
                  capsize=3, color=color)
    for bar, v in zip(bars, values):
        ax.annotate("n/a" if v is None else label(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.margins(y=0.15)
    return bars


def save(fig, path: str, banner: Optional[str] = None, banner_size: int = 28, banner_alpha: float = 0.3,
         banner_rotation: int = 15) -> str:
    """Writes ``fig`` to ``path`` (tight layout, 100 dpi) and closes it; ``banner``: a large red
    translucent text across the figure (for SYNTHETIC data). Returns ``path``."""
    if banner:
        fig.text(0.5, 0.5, banner, ha="center", va="center", fontsize=banner_size, color="red",
                 alpha=banner_alpha, rotation=banner_rotation)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path
