"""The run report: which classes each specialist owns and why, and what they gained.

`write_report` turns plain arrays (class names, the C x C matrix of the generalist's
predicted probabilities, the clusters) and the run's metrics into one directory:

    index.html         self-contained page (PNGs embedded as data URIs)
    summary.md         the same tables in Markdown, PNGs referenced beside it
    heatmap.png        the matrix with classes reordered by cluster, blocks outlined
    cluster_sizes.png  histogram of cluster sizes

With an `ensemble` section in the metrics, the page opens with the test results as the
paper's Tables 3 and 4; `format_results` prints the same tables for the terminal.

    analysis.py   the numbers: cluster order, within/between, errors inside clusters
    document.py   the document model and its HTML and Markdown renderers
    plots.py      the two PNGs
    tables.py     the tables, and the plain-text results for the terminal

Only numpy, matplotlib (Agg, no pyplot state), stdlib and rundir's atomic writer: this
package takes arrays, not objects from the rest of the package.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..rundir import write_bytes
from .analysis import (
    check_error_pairs,
    check_finite,
    check_groups,
    check_matrix,
    cluster_order,
    confused_pairs,
    error_share_inside,
    errors_inside,
    random_share,
    reordered_image,
    resolve_uncovered,
    within_between,
)
from .document import Bullets, Doc, Heading, Image, Names, Para, Table, fmt, md_escape, render_html, render_md
from .plots import heatmap_png, sizes_png
from .tables import (
    format_results,
    format_summary,
    metric_blocks,
    results_blocks,
    settings_table,
    share_text,
    summary_table,
)

__all__ = [
    "cluster_order",
    "within_between",
    "reordered_image",
    "error_share_inside",
    "random_share",
    "confused_pairs",
    "check_groups",
    "format_summary",
    "format_results",
    "summary_table",
    "md_escape",
    "write_report",
    "write_results_report",
]

TOP_PAIRS = 20  # rows of the confused-pairs table


@dataclass(frozen=True)
class _Inputs:
    """write_report's arguments, checked once; the sections only read them."""

    names: list[str]
    matrix: np.ndarray  # (C, C)
    groups: list[list[int]]
    uncovered: list[int]
    pairs: np.ndarray | None  # (E, 2) (true, predicted), None when not given
    matrix_kind: str
    heldout_pairs: np.ndarray | None = None  # (E', 2) errors on rows the clusters never saw
    heldout_name: str = "test"

    @property
    def n(self) -> int:
        return len(self.names)


def write_report(
    out_dir: Path,
    class_names: Sequence[str],
    matrix: np.ndarray,
    groups: Sequence[Sequence[int]],
    *,
    matrix_kind: str = "correlation",
    uncovered: Sequence[int] | None = None,
    error_pairs: np.ndarray | None = None,
    heldout_pairs: np.ndarray | None = None,
    heldout_name: str = "test",
    metrics: Mapping | None = None,
    settings: Mapping | None = None,
    title: str = "Specialist clusters",
    max_cells: int = 1000,
) -> dict[str, Path]:
    """Write the clustering inspection report into out_dir (created if missing).

    class_names: C names, any text (escaped in HTML and Markdown).
    matrix: (C, C) covariance or correlation of the generalist's predicted
        probabilities (any real dtype; float32 is fine at C = 15,000).
    groups: one list of class indices per cluster (= per specialist).
    uncovered: classes no specialist covers; None = every class in no group.
    error_pairs: (E, 2) (true, predicted) class indices of the generalist's
        validation errors, for the "errors specialists can fix" section.
    heldout_pairs: (E', 2) the same for the errors on the split `heldout_name`, whose
        rows the clusters never saw: the honest share, shown beside the share that
        random clusters of the same sizes would hold.
    metrics: nested dict of results (the run's metrics.json), rendered generically
        (dicts -> tables, lists of dicts -> tables with a row each); with an
        `ensemble` section the page opens with the results tables of format_results.
    settings: the run's config.
    max_cells: heatmap side in cells; larger C is block-averaged down to it.

    Every input is checked before any file is written; every file is written
    atomically, index.html last. Returns {"html", "markdown", "heatmap",
    "cluster_sizes"} -> path.
    """
    inp = _check_inputs(class_names, matrix, groups, uncovered, error_pairs, matrix_kind)
    if heldout_pairs is not None:
        inp = replace(inp, heldout_pairs=check_error_pairs(heldout_pairs, inp.n), heldout_name=str(heldout_name))
    doc = Doc(title)
    doc.add(*_results_section(metrics or {}))
    doc.add(*_summary_section(inp, max_cells))
    doc.add(*_clusters_section(inp))
    doc.add(*_uncovered_section(inp))
    doc.add(*_errors_section(inp))
    doc.add(*_metrics_section(metrics))
    doc.add(*_settings_section(settings))
    return _write(Path(out_dir), doc)


def write_results_report(out_dir: Path, results: Mapping, metrics: Mapping | None = None,
                         settings: Mapping | None = None, title: str = "Results") -> dict[str, Path]:
    """A report without clusters (a distilled student's run): the results tables of `results` (sections
    as a run's metrics.json has them; none: no tables), then `metrics` and `settings` generically.
    Writes summary.md, then index.html; returns {"markdown", "html"} -> path."""
    doc = Doc(title)
    doc.add(*_results_section(results))
    doc.add(*_metrics_section(metrics))
    doc.add(*_settings_section(settings))
    out_dir = Path(out_dir)
    return {"markdown": write_bytes(out_dir / "summary.md", render_md(doc).encode("utf-8")),
            "html": write_bytes(out_dir / "index.html", render_html(doc).encode("utf-8"))}


def _check_inputs(class_names, matrix, groups, uncovered, error_pairs, matrix_kind) -> _Inputs:
    names = [str(n) for n in class_names]
    matrix = check_matrix(matrix)
    n = matrix.shape[0]
    if n != len(names):
        raise ValueError(f"matrix is {n}x{n} but there are {len(names)} class_names")
    check_finite(matrix)
    groups = check_groups(groups, n)
    return _Inputs(
        names=names,
        matrix=matrix,
        groups=groups,
        uncovered=resolve_uncovered(uncovered, groups, n),
        pairs=check_error_pairs(error_pairs, n) if error_pairs is not None else None,
        matrix_kind=matrix_kind,
    )


# --------------------------------------------------------------------------- sections


def _results_section(metrics: Mapping) -> list:
    results = results_blocks(metrics)
    return [Heading(2, "Test results"), *results] if results else []


def _summary_section(inp: _Inputs, max_cells: int) -> list:
    kind = inp.matrix_kind
    summary = format_summary(inp.n, inp.groups, uncovered=inp.uncovered, error_pairs=inp.pairs,
                             heldout_pairs=inp.heldout_pairs, heldout_name=inp.heldout_name)
    heatmap = Image(
        "heatmap.png",
        heatmap_png(inp.matrix, inp.names, inp.groups, cluster_order(inp.groups, inp.n, inp.matrix), kind,
                    max_cells),
        alt=f"{kind} heatmap, classes reordered by cluster",
        caption=f"{kind.capitalize()} matrix, classes reordered by cluster "
        "(uncovered classes last); outlined squares are the clusters. Inside a cluster, similar classes "
        "are neighbours (leaf order of a hierarchical clustering), so sub-blocks show.",
    )
    sizes = Image(
        "cluster_sizes.png",
        sizes_png(np.array([len(g) for g in inp.groups], dtype=np.int64), len(inp.uncovered)),
        alt="histogram of cluster sizes",
        caption="How many classes each specialist covers.",
    )
    return [Heading(2, "Summary"), Bullets(summary.splitlines()), heatmap, sizes]


def _clusters_section(inp: _Inputs) -> list:
    """One row per cluster: its classes, within/between, and the errors inside it."""
    kind = inp.matrix_kind
    wb = within_between(inp.matrix, inp.groups)
    headers = ["cluster", "size", "classes", "within", "between"]
    if inp.pairs is not None:
        headers.append("errors inside")
        _, per_group = errors_inside(inp.pairs, inp.groups, inp.n)
    rows = []
    for gi, g in enumerate(inp.groups):
        within, between = (("—" if math.isnan(v) else f"{v:.3g}") for v in wb[gi])
        row = [str(gi), str(len(g)), Names([inp.names[c] for c in g]), within, between]
        if inp.pairs is not None:
            row.append(str(int(per_group[gi])))
        rows.append(row)
    explain = Para(
        f"within = mean {kind} between two different classes of the cluster; "
        f"between = mean {kind} between a class of the cluster and a class outside it."
    )
    return [Heading(2, "Clusters"), explain, Table(headers, rows, html_id="clusters")]


def _uncovered_section(inp: _Inputs) -> list:
    blocks: list = [Heading(2, "Uncovered classes")]
    if not inp.uncovered:
        return blocks + [Para("None: every class is in a cluster.")]
    return blocks + [
        Para(f"{len(inp.uncovered)} classes are left to the generalist alone:"),
        Table(["classes"], [[Names([inp.names[c] for c in inp.uncovered])]], html_id="uncovered"),
    ]


def _errors_section(inp: _Inputs) -> list:
    """The share of errors inside one cluster, and the most confused pairs."""
    blocks: list = [Heading(2, "Errors specialists can fix")]
    pairs = inp.pairs
    if pairs is None:
        return blocks + [Para("No validation errors given.")]
    inside, _ = errors_inside(pairs, inp.groups, inp.n)
    blocks.append(Para(
        "Generalist validation errors whose true and predicted class are in the same cluster: "
        + share_text(int(inside.sum()), len(pairs))
        + ". Only these can be corrected by a specialist."
    ))
    if inp.heldout_pairs is not None:
        held, _ = errors_inside(inp.heldout_pairs, inp.groups, inp.n)
        blocks.append(Para(
            f"The same on the {inp.heldout_name} errors, whose rows the clusters never saw (the honest "
            f"figure): {share_text(int(held.sum()), len(inp.heldout_pairs))}. Random clusters of the same "
            f"sizes would hold {100 * random_share(inp.groups, inp.n):.1f}% of any errors."
        ))
    if len(pairs):
        uniq, counts, same = confused_pairs(pairs, inp.groups, inp.n)
        top = min(TOP_PAIRS, len(uniq))
        names = inp.names
        blocks.append(Heading(3, f"Most confused pairs (top {top} of {len(uniq)})"))
        blocks.append(Table(
            ["true class", "predicted class", "count", "same cluster"],
            [[names[t], names[p], str(int(k)), fmt(bool(s))] for (t, p), k, s in zip(uniq[:top], counts, same)],
            html_id="confused-pairs",
        ))
    return blocks


def _metrics_section(metrics: Mapping | None) -> list:
    return [Heading(2, "Metrics"), *metric_blocks(metrics, level=3)] if metrics else []


def _settings_section(settings: Mapping | None) -> list:
    return [Heading(2, "Settings"), settings_table(settings)] if settings else []


def _write(out_dir: Path, doc: Doc) -> dict[str, Path]:
    """The PNGs, summary.md, then index.html: its presence means the report is complete."""
    png = {block.filename: block.png for block in doc.blocks if isinstance(block, Image)}
    return {  # written in this order
        "heatmap": write_bytes(out_dir / "heatmap.png", png["heatmap.png"]),
        "cluster_sizes": write_bytes(out_dir / "cluster_sizes.png", png["cluster_sizes.png"]),
        "markdown": write_bytes(out_dir / "summary.md", render_md(doc).encode("utf-8")),
        "html": write_bytes(out_dir / "index.html", render_html(doc).encode("utf-8")),
    }
