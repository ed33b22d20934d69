"""The report's two PNGs: the reordered matrix as a heatmap, and the cluster sizes.

matplotlib through the Agg canvas on a bare Figure: no pyplot, no global state.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .analysis import reordered_image
from .document import fmt

MAX_LABELED_CLASSES = 100  # heatmap gets class-name ticks up to this many classes
MAX_BOUNDARIES = 200  # above this many clusters the block outlines would hide the blocks


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _plain_text(name: str, limit: int = 24) -> str:
    """A class name as matplotlib text: no mathtext (`$`), one line, bounded length."""
    name = " ".join(name.split())
    if len(name) > limit:
        name = name[: limit - 1] + "…"
    return name.replace("$", r"\$")


def heatmap_png(
    matrix: np.ndarray,
    class_names: list[str],
    groups: Sequence[Sequence[int]],
    order: np.ndarray,
    matrix_kind: str,
    max_cells: int,
) -> bytes:
    """The (C, C) matrix with classes in `order`, clusters outlined, at most max_cells a side."""
    n = len(order)
    image, f = reordered_image(matrix, order, max_cells)
    # colour limits from the off-diagonal cells: the diagonal (a class with itself)
    # would otherwise wash out the between-class structure
    off = image[~np.eye(len(image), dtype=bool)]
    lim = float(np.percentile(np.abs(off), 99.5)) if off.size else 0.0
    if lim == 0.0:
        lim = float(np.abs(image).max()) or 1.0

    labeled = n <= MAX_LABELED_CLASSES
    size = 10.0 if labeled else 8.5
    fig = Figure(figsize=(size, size * 0.9), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(image, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label=f"{matrix_kind} (clipped at ±{fmt(lim)})")

    # block outlines at the first position of each cluster's classes in `order`
    placed = np.zeros(n, dtype=bool)
    edges, pos = [], 0
    for g in groups:
        new = [c for c in g if not placed[c]]
        placed[new] = True
        pos += len(new)
        edges.append(pos)
    if len(groups) <= MAX_BOUNDARIES:
        lw = 1.0 if len(groups) <= 30 else 0.4
        for edge in [0] + edges:
            x = edge / f - 0.5
            ax.axhline(x, color="black", lw=lw)
            ax.axvline(x, color="black", lw=lw)
        note = ""
    else:
        note = f"; {len(groups)} clusters, outlines omitted"

    if labeled:
        fs = float(np.clip(500 / n, 4, 9))
        labels = [_plain_text(class_names[c]) for c in order]
        ax.set_xticks(np.arange(n), labels, rotation=90, fontsize=fs)
        ax.set_yticks(np.arange(n), labels, fontsize=fs)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{n} classes in cluster order ({f}x{f} classes per pixel{note})")
    ax.set_title(f"{matrix_kind.capitalize()} of predicted probabilities, classes grouped by cluster")
    return _png(fig)


def sizes_png(sizes: np.ndarray, n_uncovered: int) -> bytes:
    """Histogram of classes per cluster; one bar per size when the sizes span <= 60."""
    fig = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    if len(sizes):
        lo, hi = int(sizes.min()), int(sizes.max())
        if hi - lo <= 60:  # one bar per size
            ax.hist(sizes, bins=np.arange(lo - 0.5, hi + 1.5), color="#4c72b0", edgecolor="white")
            ax.set_xlim(lo - 1.5, hi + 1.5)
        else:
            ax.hist(sizes, bins=40, color="#4c72b0", edgecolor="white")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("classes per cluster")
    ax.set_ylabel("clusters")
    ax.set_title(f"Cluster sizes ({len(sizes)} clusters, {n_uncovered} uncovered classes)")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


FRONTIER_LABELS = {"peer": "(a) peer ensemble", "specialists": "(b) generalist + specialists", "hybrid": "(c) hybrid"}


def frontier_png(budgets: Sequence[float], means: dict[str, dict[float, float]], generalist: float,
                 title: str) -> bytes:
    """Mean test errors against the extra training budget B (x the generalist's examples), one line
    per method of `means` ({"peer" | "specialists" | "hybrid": {B: mean errors}}), the generalist dashed."""
    fig = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.axhline(generalist, color="grey", linestyle="--", label="generalist alone")
    for (method, points), marker in zip(means.items(), "osd^v"):
        xs = [b for b in budgets if b in points]
        ax.plot(xs, [points[b] for b in xs], marker=marker, label=FRONTIER_LABELS.get(method, method))
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(budgets), [fmt(b) for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("extra training examples B (x the generalist's)")
    ax.set_ylabel("test errors (mean over seeds)")
    ax.set_title(_plain_text(f"Accuracy-compute frontier: {title}", 80))
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)
