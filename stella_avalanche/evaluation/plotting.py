"""Figures without pyplot: the one way the package makes a matplotlib figure and writes it as a PNG.

``Figure`` + ``FigureCanvasAgg`` keeps plotting thread-safe and free of global pyplot state (runs write
their plots from worker threads and from tests in one process); the PNG is written atomically.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from stella_avalanche.utils import atomic_write

__all__ = ["new_figure", "save_png"]


def new_figure(width: float, height: float) -> Any:
    """A matplotlib ``Figure`` of ``width`` x ``height`` inches at 100 dpi, with an Agg canvas attached."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: str | os.PathLike, **savefig: Any) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically (``savefig`` options, e.g. ``dpi``, pass through)."""
    path = Path(path)
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", **savefig)
    return path
