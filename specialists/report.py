"""The run report: which classes each specialist owns and why, and what they gained.

`write_report` turns plain arrays (class names, the C x C matrix of the generalist's
predicted probabilities, the clusters) and the run's metrics into one directory:

    index.html         self-contained page (PNGs embedded as data URIs)
    summary.md         the same tables in Markdown, PNGs referenced beside it
    heatmap.png        the matrix with classes reordered by cluster, blocks outlined
    cluster_sizes.png  histogram of cluster sizes

With an `ensemble` section in the metrics, the page opens with the test results as the
paper's Tables 3 and 4; `format_results` prints the same tables for the terminal.

The small pure helpers it is built from (`cluster_order`, `within_between`,
`reordered_image`, `error_share_inside`, `format_summary`, `format_results`, `md_escape`)
are public so the CLI and tests can use them. Only numpy, matplotlib (Agg, no pyplot state) and stdlib:
this module takes arrays, not objects from the rest of the package.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import math
import os
import re
import tempfile
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = [
    "cluster_order",
    "within_between",
    "reordered_image",
    "error_share_inside",
    "format_summary",
    "format_results",
    "md_escape",
    "write_report",
]

NAMES_SHOWN = 12  # class names shown per cluster before "… (+N more)"
TOP_PAIRS = 20  # rows of the confused-pairs table
MAX_LABELED_CLASSES = 100  # heatmap gets class-name ticks up to this many classes
MAX_BOUNDARIES = 200  # above this many clusters the block outlines would hide the blocks
_CHUNK_ELEMENTS = 4_000_000  # matrix entries read per step (~32 MB as float64)


# --------------------------------------------------------------------------- helpers


def cluster_order(groups: Sequence[Sequence[int]], n_classes: int) -> np.ndarray:
    """(C,) permutation: the classes of groups[0], then groups[1], ..., then every
    class in no group (ascending). A class in several groups is placed with the first."""
    _check_groups(groups, n_classes)
    placed = np.zeros(n_classes, dtype=bool)
    order = []
    for g in groups:
        for c in g:
            if not placed[c]:
                placed[c] = True
                order.append(int(c))
    order.extend(np.flatnonzero(~placed).tolist())
    return np.asarray(order, dtype=np.int64)


def within_between(matrix: np.ndarray, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """(G, 2) float64: per group, [mean of matrix[i, j] over i != j both in the group,
    mean of matrix[i, j] over i in the group and j outside it].

    The diagonal (a class with itself) is left out of the within mean: it says nothing
    about confusability. NaN where a mean has no pairs (a singleton group's within,
    a group holding every class's between). Reads the matrix in row chunks, so a
    15,000-class float32 matrix never needs a float64 copy.
    """
    matrix = _check_matrix(matrix)
    n = matrix.shape[0]
    _check_groups(groups, n)
    out = np.full((len(groups), 2), np.nan)
    rows_per_step = max(1, _CHUNK_ELEMENTS // n)
    for gi, g in enumerate(groups):
        g = np.asarray(g, dtype=np.int64)
        total = inside = diag = 0.0
        for a in range(0, len(g), rows_per_step):
            rows = g[a : a + rows_per_step]
            block = np.asarray(matrix[rows], dtype=np.float64)  # (rows, C)
            total += block.sum()
            inside += block[:, g].sum()
            diag += block[np.arange(len(rows)), rows].sum()
        k = len(g)
        if k > 1:
            out[gi, 0] = (inside - diag) / (k * (k - 1))
        if k < n:
            out[gi, 1] = (total - inside) / (k * (n - k))
    return out


def reordered_image(
    matrix: np.ndarray, order: np.ndarray, max_cells: int = 1000
) -> tuple[np.ndarray, int]:
    """The heatmap's pixels: matrix[order][:, order] averaged over f x f blocks.

    Returns (image, f): image is (ceil(C/f), ceil(C/f)) float64 with the smallest
    f such that a side has at most max_cells cells (f = 1: the reordered matrix
    itself). The last row/column of blocks may be narrower than f; it is averaged
    over the classes it has. Streams row chunks, never the full reordered copy.
    """
    matrix = _check_matrix(matrix)
    n = matrix.shape[0]
    order = np.asarray(order, dtype=np.int64)
    if order.shape != (n,) or not np.array_equal(np.sort(order), np.arange(n)):
        raise ValueError(f"order must be a permutation of range({n}), got shape {order.shape}")
    if max_cells < 1:
        raise ValueError(f"max_cells={max_cells} must be >= 1")
    f = max(1, math.ceil(n / max_cells))
    starts = np.arange(0, n, f)
    counts = np.diff(np.append(starts, n)).astype(np.float64)  # classes per cell side
    image = np.empty((len(starts), len(starts)))
    # a whole number of f-row blocks per step, about _CHUNK_ELEMENTS entries
    rows_per_step = min(n, f * max(1, _CHUNK_ELEMENTS // (n * f)))
    rows_buf = np.empty((rows_per_step, n), dtype=matrix.dtype)  # reused: no page faults per step
    perm_buf = np.empty((rows_per_step, n), dtype=matrix.dtype)
    for a in range(0, n, rows_per_step):
        b = min(a + rows_per_step, n)
        rows, block = rows_buf[: b - a], perm_buf[: b - a]
        np.take(matrix, order[a:b], axis=0, out=rows)
        np.take(rows, order, axis=1, out=block)  # (b-a, C) reordered rows and columns
        col_sums = np.zeros((b - a, len(starts)))  # (b-a, cells)
        for k in range(f):  # f strided adds beat reduceat's many tiny segments
            part = block[:, k::f]
            col_sums[:, : part.shape[1]] += part
        cell_sums = np.add.reduceat(col_sums, np.arange(0, b - a, f), axis=0)
        r0 = a // f
        r1 = r0 + cell_sums.shape[0]
        image[r0:r1] = cell_sums / np.outer(counts[r0:r1], counts)
    return image, f


def error_share_inside(
    error_pairs: np.ndarray, groups: Sequence[Sequence[int]]
) -> tuple[int, int, float]:
    """(inside_count, total, share) of the generalist's errors whose (true, predicted)
    pair lies inside one cluster: the errors a specialist can fix.

    error_pairs: (E, 2) class indices, one row per misclassified validation example.
    share = inside_count / total, NaN when there are no errors.
    """
    pairs = _check_error_pairs(error_pairs, None)
    n = int(max([pairs.max(initial=-1)] + [max(g, default=-1) for g in groups])) + 1
    _check_groups(groups, n)
    inside, _ = _errors_inside(pairs, groups, n)
    total = len(pairs)
    count = int(inside.sum())
    return count, total, (count / total if total else math.nan)


def format_summary(
    n_classes: int,
    groups: Sequence[Sequence[int]],
    *,
    uncovered: Sequence[int] | None = None,
    error_pairs: np.ndarray | None = None,
) -> str:
    """A few plain-text lines for the terminal: clusters, size range, uncovered
    classes, share of the generalist's errors that fall inside one cluster."""
    _check_groups(groups, n_classes)
    uncovered = _resolve_uncovered(uncovered, groups, n_classes)
    sizes = np.array([len(g) for g in groups])
    covered = n_classes - len(uncovered)
    if len(sizes):
        lines = [
            f"clusters: {len(groups)} covering {covered} of {n_classes} classes "
            f"(sizes {sizes.min()}-{sizes.max()}, median {_fmt(float(np.median(sizes)))})"
        ]
    else:
        lines = [f"clusters: 0 (none of {n_classes} classes covered)"]
    lines.append(f"uncovered classes: {len(uncovered)}")
    if error_pairs is not None:
        pairs = _check_error_pairs(error_pairs, n_classes)
        inside, _ = _errors_inside(pairs, groups, n_classes)
        share = _share_text(int(inside.sum()), len(pairs))
        lines.append(f"errors inside one cluster (specialists can fix): {share}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- validation


def _check_matrix(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be square (C, C), got shape {matrix.shape}")
    if not np.issubdtype(matrix.dtype, np.number) or np.iscomplexobj(matrix):
        raise ValueError(f"matrix must be real numbers, got dtype {matrix.dtype}")
    return matrix


def _check_finite(matrix: np.ndarray) -> None:
    rows_per_step = max(1, _CHUNK_ELEMENTS // max(1, matrix.shape[1]))
    for a in range(0, matrix.shape[0], rows_per_step):  # chunked: no (C, C) bool array
        bad = ~np.isfinite(matrix[a : a + rows_per_step])
        if bad.any():
            i, j = np.argwhere(bad)[0]
            i += a
            raise ValueError(f"matrix has a non-finite entry: matrix[{i}, {j}] = {matrix[i, j]}")


def _check_groups(groups: Sequence[Sequence[int]], n_classes: int) -> None:
    for gi, g in enumerate(groups):
        if len(g) == 0:
            raise ValueError(f"groups[{gi}] is empty")
        arr = np.asarray(g)
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"groups[{gi}] must hold class indices (ints), got dtype {arr.dtype}")
        bad = arr[(arr < 0) | (arr >= n_classes)]
        if len(bad):
            raise ValueError(f"groups[{gi}] has class index {int(bad[0])} outside [0, {n_classes})")
        if len(np.unique(arr)) != len(arr):
            vals, counts = np.unique(arr, return_counts=True)
            raise ValueError(f"groups[{gi}] lists class {int(vals[counts > 1][0])} twice")


def _check_error_pairs(error_pairs: np.ndarray, n_classes: int | None) -> np.ndarray:
    pairs = np.asarray(error_pairs)
    if pairs.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"error_pairs must be (E, 2) (true, predicted), got shape {pairs.shape}")
    if not np.issubdtype(pairs.dtype, np.integer):
        raise ValueError(f"error_pairs must hold class indices (ints), got dtype {pairs.dtype}")
    pairs = pairs.astype(np.int64)
    hi = n_classes if n_classes is not None else np.iinfo(np.int64).max
    bad = np.flatnonzero(((pairs < 0) | (pairs >= hi)).any(axis=1))
    if len(bad):
        t, p = pairs[bad[0]]
        bound = f"[0, {n_classes})" if n_classes is not None else ">= 0"
        raise ValueError(f"error_pairs[{bad[0]}] = ({t}, {p}) has a class index outside {bound}")
    same = np.flatnonzero(pairs[:, 0] == pairs[:, 1])
    if len(same):
        t = pairs[same[0], 0]
        raise ValueError(
            f"error_pairs[{same[0]}] = ({t}, {t}) is not an error (true == predicted); "
            "pass only the generalist's misclassified examples"
        )
    return pairs


def _resolve_uncovered(
    uncovered: Sequence[int] | None, groups: Sequence[Sequence[int]], n_classes: int
) -> list[int]:
    """None -> every class in no group; otherwise validated against the groups."""
    in_group = np.zeros(n_classes, dtype=bool)
    for g in groups:
        in_group[np.asarray(g, dtype=np.int64)] = True
    if uncovered is None:
        return np.flatnonzero(~in_group).tolist()
    arr = np.asarray(list(uncovered), dtype=np.int64)
    bad = arr[(arr < 0) | (arr >= n_classes)]
    if len(bad):
        raise ValueError(f"uncovered has class index {int(bad[0])} outside [0, {n_classes})")
    clash = arr[in_group[arr]]
    if len(clash):
        raise ValueError(f"uncovered class {int(clash[0])} is also in a cluster")
    return sorted(set(arr.tolist()))


def _errors_inside(
    pairs: np.ndarray, groups: Sequence[Sequence[int]], n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(E,) bool: pair inside some group; (G,) int: pairs inside each group."""
    owner = np.full(n_classes, -1, dtype=np.int64)
    overlapping = False
    for gi, g in enumerate(groups):
        g = np.asarray(g, dtype=np.int64)
        overlapping |= bool((owner[g] >= 0).any())
        owner[g] = gi
    if not overlapping:  # the usual case: one label per class, one vectorised compare
        t, p = owner[pairs[:, 0]], owner[pairs[:, 1]]
        inside = (t >= 0) & (t == p)
        return inside, np.bincount(t[inside], minlength=len(groups))
    inside = np.zeros(len(pairs), dtype=bool)
    per_group = np.zeros(len(groups), dtype=np.int64)
    member = np.zeros(n_classes, dtype=bool)
    for gi, g in enumerate(groups):
        member[g] = True
        hit = member[pairs[:, 0]] & member[pairs[:, 1]]
        per_group[gi] = hit.sum()
        inside |= hit
        member[g] = False
    return inside, per_group


# --------------------------------------------------------------------------- formatting


def _fmt(value) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def _share_text(inside: int, total: int) -> str:
    if total == 0:
        return "no errors given"
    return f"{inside} / {total} ({100 * inside / total:.1f}%)"


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, np.generic))


# A tiny document model, rendered twice (HTML, Markdown) so the two never drift apart.


@dataclass
class _Names:
    """A table cell listing class names, truncated after NAMES_SHOWN."""

    names: list[str]


@dataclass
class _Table:
    headers: list[str]
    rows: list[list[str | _Names]]
    html_id: str | None = None


@dataclass
class _Heading:
    level: int
    text: str


@dataclass
class _Para:
    text: str


@dataclass
class _Note(_Para):
    """A paragraph that explains a table: on the page, left out of the terminal's text."""


@dataclass
class _List:
    items: list[str]


@dataclass
class _Image:
    filename: str
    png: bytes
    alt: str
    caption: str


@dataclass
class _Doc:
    title: str
    blocks: list = field(default_factory=list)

    def add(self, *blocks) -> None:
        self.blocks.extend(blocks)


def _numeric_columns(table: _Table) -> set[int]:
    def is_num(cell) -> bool:
        if isinstance(cell, _Names):
            return False
        if cell in ("", "—"):
            return True
        try:
            float(cell.rstrip("%"))
            return True
        except ValueError:
            return False

    return {j for j in range(len(table.headers)) if all(is_num(r[j]) for r in table.rows)}


def _render_html(doc: _Doc) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(doc.title)}</title>",
        f"<style>{_CSS}</style>",
        "</head><body><main>",
        f"<h1>{e(doc.title)}</h1>",
    ]
    for block in doc.blocks:
        if isinstance(block, _Heading):
            lvl = min(block.level, 6)
            out.append(f"<h{lvl}>{e(block.text)}</h{lvl}>")
        elif isinstance(block, _Para):
            out.append(f"<p>{e(block.text)}</p>")
        elif isinstance(block, _List):
            out.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, _Image):
            data = base64.b64encode(block.png).decode("ascii")
            out.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{e(block.alt)}" '
                f'data-file="{e(block.filename)}"><figcaption>{e(block.caption)} '
                f'(<a href="{e(block.filename)}">{e(block.filename)}</a>)</figcaption></figure>'
            )
        elif isinstance(block, _Table):
            num = _numeric_columns(block)
            ident = f' id="{e(block.html_id)}"' if block.html_id else ""
            out.append(f'<div class="scroll"><table{ident} data-rows="{len(block.rows)}"><thead><tr>')
            out.extend(f"<th>{e(h)}</th>" for h in block.headers)
            out.append("</tr></thead><tbody>")
            for row in block.rows:
                cells = []
                for j, cell in enumerate(row):
                    if isinstance(cell, _Names):
                        cells.append(f'<td class="names">{_names_html(cell.names)}</td>')
                    else:
                        cls = ' class="num"' if j in num else ""
                        cells.append(f"<td{cls}>{e(cell)}</td>")
                out.append("<tr>" + "".join(cells) + "</tr>")
            out.append("</tbody></table></div>")
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


def _names_html(names: list[str]) -> str:
    e = html.escape
    shown = ", ".join(e(n) for n in names[:NAMES_SHOWN])
    if len(names) <= NAMES_SHOWN:
        return shown
    rest = len(names) - NAMES_SHOWN
    return (
        f"{shown} … (+{rest} more)"
        f"<details><summary>all {len(names)}</summary>{', '.join(e(n) for n in names)}</details>"
    )


_MD_ALWAYS = re.compile(r"[\\`*\[\]<>|~$]")
_MD_UNDERSCORE = re.compile(r"(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")  # intraword `_` is literal
_MD_ENTITY = re.compile(r"&(?=#?\w+;)")  # `&amp;` would render as `&`


def md_escape(text: str) -> str:
    """Backslash-escape Markdown syntax so a class name renders literally, also
    inside a table cell (`|`); newlines become spaces. Leaves `snake_case` readable."""
    text = " ".join(str(text).splitlines())
    text = _MD_ALWAYS.sub(lambda m: "\\" + m.group(), text)
    text = _MD_UNDERSCORE.sub(r"\\_", text)
    return _MD_ENTITY.sub(r"\\&", text)


def _names_md(names: list[str]) -> str:
    shown = ", ".join(md_escape(n) for n in names[:NAMES_SHOWN])
    if len(names) > NAMES_SHOWN:
        shown += f" … (+{len(names) - NAMES_SHOWN} more)"
    return shown


def _render_md(doc: _Doc) -> str:
    out = [f"# {md_escape(doc.title)}", ""]
    for block in doc.blocks:
        if isinstance(block, _Heading):
            out += ["#" * min(block.level, 6) + " " + md_escape(block.text), ""]
        elif isinstance(block, _Para):
            out += [md_escape(block.text), ""]
        elif isinstance(block, _List):
            out += [f"- {md_escape(item)}" for item in block.items] + [""]
        elif isinstance(block, _Image):
            out += [f"![{md_escape(block.alt)}]({block.filename})", "", f"*{md_escape(block.caption)}*", ""]
        elif isinstance(block, _Table):
            num = _numeric_columns(block)
            out.append("| " + " | ".join(md_escape(h) for h in block.headers) + " |")
            out.append("|" + "|".join("---:" if j in num else "---" for j in range(len(block.headers))) + "|")
            for row in block.rows:
                cells = [_names_md(c.names) if isinstance(c, _Names) else md_escape(c) for c in row]
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


_CSS = """
body{margin:0;background:#fff;color:#1d1d1f;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
main{max-width:1100px;margin:0 auto;padding:20px 28px 60px}
h1{font-size:26px;margin:8px 0 12px}
h2{font-size:20px;margin:32px 0 8px;padding-bottom:4px;border-bottom:1px solid #ddd}
h3{font-size:16px;margin:20px 0 6px}
h4,h5,h6{font-size:15px;margin:14px 0 4px}
p{margin:6px 0}
.scroll{overflow-x:auto}
table{border-collapse:collapse;margin:6px 0 16px;font-size:13.5px}
th,td{border:1px solid #d0d0d0;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#f2f2f2;font-weight:600}
tbody tr:nth-child(even){background:#fafafa}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.names{min-width:320px;max-width:640px;overflow-wrap:anywhere}
details{margin-top:4px;color:#444}
summary{cursor:pointer;color:#555}
figure{margin:10px 0 18px}
img{display:block;max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:13px;margin-top:4px}
a{color:#333}
""".strip()


# --------------------------------------------------------------------------- plots


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


def _heatmap_png(
    matrix: np.ndarray,
    class_names: list[str],
    groups: Sequence[Sequence[int]],
    order: np.ndarray,
    matrix_kind: str,
    max_cells: int,
) -> bytes:
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
    fig.colorbar(im, ax=ax, shrink=0.8, label=f"{matrix_kind} (clipped at ±{_fmt(lim)})")

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


def _sizes_png(sizes: np.ndarray, n_uncovered: int) -> bytes:
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


# --------------------------------------------------------------------------- sections


def _metric_blocks(value, level: int) -> list:
    """Render any nested metrics value: scalars -> key/value tables, a dict of flat
    dicts or a list of dicts -> one table with a row each, deeper dicts -> headings."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if _is_scalar(value):
        return [_Para(_fmt(value))]
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, Mapping) for v in value):
            return [_rows_table(list(value))]
        shown = ", ".join(_fmt(v) if _is_scalar(v) else str(v) for v in value[:50])
        return [_Para(shown + (f" … (+{len(value) - 50} more)" if len(value) > 50 else ""))]
    if not isinstance(value, Mapping):
        return [_Para(str(value))]
    if value and all(
        isinstance(v, Mapping) and all(_is_scalar(x) for x in v.values()) for v in value.values()
    ):
        return [_rows_table([{"": k, **v} for k, v in value.items()])]
    blocks = []
    scalars = [(k, v) for k, v in value.items() if _is_scalar(v)]
    if scalars:
        blocks.append(_Table(["name", "value"], [[str(k), _fmt(v)] for k, v in scalars]))
    for k, v in value.items():
        if not _is_scalar(v):
            blocks.append(_Heading(level, str(k)))
            blocks.extend(_metric_blocks(v, level + 1))
    return blocks


def _rows_table(rows: list[Mapping]) -> _Table:
    rows = [{str(k): v for k, v in r.items()} for r in rows]
    headers = list(dict.fromkeys(k for r in rows for k in r))  # union, first-seen order
    return _Table(headers, [[_fmt(r.get(h)) for h in headers] for r in rows])


def _flatten(settings: Mapping, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for k, v in settings.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            items.extend(_flatten(v, key + "."))
        else:
            items.append((key, v))
    return items


# --------------------------------------------------------------------------- results tables
# Built from the `generalist`, `ensemble` and `peer_ensemble` sections of metrics.json,
# rendered as HTML/Markdown by write_report and as plain text by format_results.


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _rate(value) -> str:
    """An accuracy as a fraction, 4 decimals like the pipeline's log lines."""
    return "—" if _missing(value) else f"{value:.4f}"


def _count(value) -> str:
    return "—" if _missing(value) else str(int(value))


def _signed(value, percent: bool = False) -> str:
    """'+222', '-1.7%' (value a fraction); exactly zero has no sign, like the paper's Table 4."""
    if _missing(value):
        return "—"
    if percent:
        return "0.0%" if value == 0 else f"{100 * value:+.1f}%"
    return "0" if value == 0 else f"{int(value):+d}"


def _comparison_table(metrics: Mapping) -> _Table:
    """Generalist vs generalist + specialists vs the equal-compute peer ensemble, on the test set.

    Rows appear as their sections allow: the specialists' row needs the ensemble's
    `test_errors` (absent when the run has no finished specialists), the peers' row
    the `peer_ensemble` section (absent when that stage is disabled)."""
    ens, gen = metrics["ensemble"], metrics.get("generalist", {})
    base_errors = ens.get("generalist_test_errors", gen.get("test_errors"))

    def change(errors) -> str:  # relative to the generalist's errors, negative = fewer
        if _missing(errors) or not base_errors:
            return "—"
        return _signed((errors - base_errors) / base_errors, percent=True)

    rows = [[
        "generalist",
        _rate(ens.get("generalist_test_accuracy", gen.get("test_accuracy"))),
        _count(base_errors),
        "—",
        _rate(ens.get("generalist_conditional_accuracy")),
    ]]
    if "test_errors" in ens:
        rows.append([
            "generalist + specialists",
            _rate(ens.get("test_accuracy")),
            _count(ens["test_errors"]),
            change(ens["test_errors"]),
            _rate(ens.get("conditional_accuracy")),
        ])
    peer = metrics.get("peer_ensemble")
    if peer and "test_accuracy" in peer:
        members = peer.get("members")
        label = "peer ensemble"
        if members is not None:
            label += f" of {members} generalist" + ("s" if members != 1 else "")
        rows.append([label, _rate(peer["test_accuracy"]), _count(peer.get("test_errors")),
                     change(peer.get("test_errors")), "—"])
    headers = ["model", "test accuracy", "test errors", "change in errors", "conditional accuracy"]
    return _Table(headers, rows, html_id="results")


def _covering_table(rows: Sequence[Mapping]) -> _Table:
    """The paper's Table 4: test examples by how many specialists cover their true class."""
    return _Table(
        ["specialists covering", "test examples", "change in correct", "relative accuracy change"],
        [
            [_count(r.get("specialists_covering")), _count(r.get("examples")),
             _signed(r.get("change_in_correct")), _signed(r.get("relative_gain"), percent=True)]
            for r in rows
        ],
        html_id="by-covering",
    )


def _results_blocks(metrics: Mapping) -> list:
    """Headings, notes and the two results tables; [] when there is no `ensemble` section."""
    ens = metrics.get("ensemble")
    if not ens:
        return []
    blocks = [_Heading(3, "Test accuracy of each model (like the paper's Table 3)")]
    if ens.get("mode"):
        blocks.append(_Para(f"Model: {ens['mode']}"))
    blocks.append(_comparison_table(metrics))
    peer = metrics.get("peer_ensemble")
    if peer and "examples_seen" in peer and "budget_examples" in peer:
        blocks.append(_Para(
            "Peer ensemble: the generalist and generalists trained with other seeds, probabilities "
            f"averaged; {peer['examples_seen']:,} training examples processed, against "
            f"{peer['budget_examples']:,} by the generalist and the specialists."
        ))
    notes = ["Change in errors: test errors relative to the generalist's (negative = fewer)."]
    if "covered_test_examples" in ens:
        notes.append(
            "Conditional accuracy: the argmax over only the classes of the specialists covering "
            f"the true class, on the {ens['covered_test_examples']} test examples whose class a "
            "specialist covers."
        )
    blocks.append(_Note(" ".join(notes)))
    by_covering = ens.get("by_covering")
    if by_covering:
        blocks.append(_Heading(3, "By number of specialists covering the true class (like Table 4)"))
        blocks.append(_covering_table(by_covering))
        blocks.append(_Note(
            "Change in correct: test examples the combination gets right minus those the generalist "
            "gets right; relative accuracy change: that change over the generalist's correct ones."
        ))
    return blocks


def _text_table(table: _Table) -> list[str]:
    """Aligned plain-text lines: numeric columns right-aligned, a dashed rule under the header."""
    num = _numeric_columns(table)
    cells = [table.headers] + [[str(c) for c in row] for row in table.rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(table.headers))]

    def line(row) -> str:
        padded = (c.rjust(w) if j in num else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths)))
        return "  ".join(padded).rstrip()

    return [line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]]


def format_results(metrics: Mapping, width: int = 100) -> str:
    """The run's test results as plain text for the terminal: generalist vs generalist +
    specialists vs the equal-compute peer ensemble (like the paper's Table 3), then the
    change by number of specialists covering the true class (Table 4). Without the page's
    explanatory notes; lines of text wrap at `width` columns. "" when the metrics have no
    `ensemble` section."""
    lines: list[str] = []
    for block in _results_blocks(metrics):
        if isinstance(block, _Heading):
            lines += ([""] if lines else []) + [block.text + ":"]
        elif isinstance(block, _Para) and not isinstance(block, _Note):
            lines += textwrap.wrap(block.text, width)
        elif isinstance(block, _Table):
            lines += _text_table(block)
    return "\n".join(lines)


# --------------------------------------------------------------------------- the report


def write_report(
    out_dir: Path,
    class_names: Sequence[str],
    matrix: np.ndarray,
    groups: Sequence[Sequence[int]],
    *,
    matrix_kind: str = "correlation",
    uncovered: Sequence[int] | None = None,
    error_pairs: np.ndarray | None = None,
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
    metrics: nested dict of results (the run's metrics.json), rendered generically
        (dicts -> tables, lists of dicts -> tables with a row each); with an
        `ensemble` section the page opens with the results tables of format_results.
    settings: the run's config.
    max_cells: heatmap side in cells; larger C is block-averaged down to it.

    Every file is written atomically, index.html last. Returns
    {"html", "markdown", "heatmap", "cluster_sizes"} -> path.
    """
    out_dir = Path(out_dir)
    names = [str(n) for n in class_names]
    matrix = _check_matrix(matrix)
    n = matrix.shape[0]
    if n != len(names):
        raise ValueError(f"matrix is {n}x{n} but there are {len(names)} class_names")
    _check_finite(matrix)
    _check_groups(groups, n)
    groups = [np.asarray(g, dtype=np.int64).tolist() for g in groups]
    uncovered = _resolve_uncovered(uncovered, groups, n)
    pairs = _check_error_pairs(error_pairs, n) if error_pairs is not None else None

    order = cluster_order(groups, n)
    wb = within_between(matrix, groups)
    sizes = np.array([len(g) for g in groups], dtype=np.int64)
    if pairs is not None:
        inside, per_group = _errors_inside(pairs, groups, n)

    heatmap = _Image(
        "heatmap.png",
        _heatmap_png(matrix, names, groups, order, matrix_kind, max_cells),
        alt=f"{matrix_kind} heatmap, classes reordered by cluster",
        caption=f"{matrix_kind.capitalize()} matrix, classes reordered by cluster "
        "(uncovered classes last); outlined squares are the clusters.",
    )
    sizes_img = _Image(
        "cluster_sizes.png",
        _sizes_png(sizes, len(uncovered)),
        alt="histogram of cluster sizes",
        caption="How many classes each specialist covers.",
    )

    doc = _Doc(title)
    results = _results_blocks(metrics or {})
    if results:
        doc.add(_Heading(2, "Test results"), *results)
    doc.add(_Heading(2, "Summary"))
    doc.add(_List(format_summary(n, groups, uncovered=uncovered, error_pairs=pairs).splitlines()))
    doc.add(heatmap, sizes_img)

    doc.add(_Heading(2, "Clusters"))
    doc.add(_Para(
        f"within = mean {matrix_kind} between two different classes of the cluster; "
        f"between = mean {matrix_kind} between a class of the cluster and a class outside it."
    ))
    headers = ["cluster", "size", "classes", "within", "between"]
    if pairs is not None:
        headers.append("errors inside")
    rows = []
    for gi, g in enumerate(groups):
        within, between = (("—" if math.isnan(v) else f"{v:.3g}") for v in wb[gi])
        row = [str(gi), str(len(g)), _Names([names[c] for c in g]), within, between]
        if pairs is not None:
            row.append(str(int(per_group[gi])))
        rows.append(row)
    doc.add(_Table(headers, rows, html_id="clusters"))

    doc.add(_Heading(2, "Uncovered classes"))
    if uncovered:
        doc.add(_Para(f"{len(uncovered)} classes are left to the generalist alone:"))
        doc.add(_Table(["classes"], [[_Names([names[c] for c in uncovered])]], html_id="uncovered"))
    else:
        doc.add(_Para("None: every class is in a cluster."))

    doc.add(_Heading(2, "Errors specialists can fix"))
    if pairs is None:
        doc.add(_Para("No validation errors given."))
    else:
        doc.add(_Para(
            "Generalist validation errors whose true and predicted class are in the same cluster: "
            + _share_text(int(inside.sum()), len(pairs))
            + ". Only these can be corrected by a specialist."
        ))
        if len(pairs):
            uniq, counts = np.unique(pairs, axis=0, return_counts=True)
            same, _ = _errors_inside(uniq, groups, n)
            top = np.argsort(-counts, kind="stable")[:TOP_PAIRS]
            doc.add(_Heading(3, f"Most confused pairs (top {len(top)} of {len(uniq)})"))
            doc.add(_Table(
                ["true class", "predicted class", "count", "same cluster"],
                [
                    [names[uniq[i, 0]], names[uniq[i, 1]], str(int(counts[i])), _fmt(bool(same[i]))]
                    for i in top
                ],
                html_id="confused-pairs",
            ))

    if metrics:
        doc.add(_Heading(2, "Metrics"))
        doc.add(*_metric_blocks(metrics, level=3))
    if settings:
        doc.add(_Heading(2, "Settings"))
        doc.add(_Table(["setting", "value"], [[k, _fmt(v)] for k, v in _flatten(settings)]))

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "heatmap": out_dir / heatmap.filename,
        "cluster_sizes": out_dir / sizes_img.filename,
        "markdown": out_dir / "summary.md",
        "html": out_dir / "index.html",
    }
    _write_atomic(paths["heatmap"], heatmap.png)
    _write_atomic(paths["cluster_sizes"], sizes_img.png)
    _write_atomic(paths["markdown"], _render_md(doc).encode("utf-8"))
    _write_atomic(paths["html"], _render_html(doc).encode("utf-8"))  # last: its presence means done
    return paths


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, then rename over path: a reader
    never sees a half-written file, and a crash leaves the old one intact."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a report is meant to be read
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
