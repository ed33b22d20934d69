"""The report's tables, and the same results as plain text for the terminal.

The results tables (the paper's Tables 3 and 4) are built from the `generalist`,
`ensemble` and `peer_ensemble` sections of metrics.json; write_report renders them
as HTML/Markdown, `format_results` and `summary_table` as aligned text. Any other
metrics render generically (`metric_blocks`).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np

from .analysis import check_error_pairs, check_groups, errors_inside, random_share, resolve_uncovered
from .document import Heading, Note, Para, Table, fmt, numeric_columns


def share_text(inside: int, total: int) -> str:
    """'20 / 35 (57.1%)', or 'no errors given'."""
    if total == 0:
        return "no errors given"
    return f"{inside} / {total} ({100 * inside / total:.1f}%)"


def format_summary(
    n_classes: int,
    groups: Sequence[Sequence[int]],
    *,
    uncovered: Sequence[int] | None = None,
    error_pairs: np.ndarray | None = None,
    heldout_pairs: np.ndarray | None = None,
    heldout_name: str = "test",
) -> str:
    """A few plain-text lines for the terminal: clusters, size range, uncovered
    classes, share of the generalist's errors that fall inside one cluster, and with
    `heldout_pairs` (the errors on the `heldout_name` split, rows the clusters never
    saw) the same share on them beside the share random clusters of these sizes give."""
    groups = check_groups(groups, n_classes)
    uncovered = resolve_uncovered(uncovered, groups, n_classes)
    sizes = np.array([len(g) for g in groups])
    covered = n_classes - len(uncovered)
    if len(sizes):
        lines = [
            f"clusters: {len(groups)} covering {covered} of {n_classes} classes "
            f"(sizes {sizes.min()}-{sizes.max()}, median {fmt(float(np.median(sizes)))})"
        ]
    else:
        lines = [f"clusters: 0 (none of {n_classes} classes covered)"]
    lines.append(f"uncovered classes: {len(uncovered)}")
    if error_pairs is not None:
        pairs = check_error_pairs(error_pairs, n_classes)
        inside, _ = errors_inside(pairs, groups, n_classes)
        share = share_text(int(inside.sum()), len(pairs))
        lines.append(f"errors inside one cluster (specialists can fix): {share}")
    if heldout_pairs is not None:
        pairs = check_error_pairs(heldout_pairs, n_classes)
        inside, _ = errors_inside(pairs, groups, n_classes)
        lines.append(f"held out ({heldout_name} errors, never used to cluster): "
                     f"{share_text(int(inside.sum()), len(pairs))}; random clusters of these sizes: "
                     f"{100 * random_share(groups, n_classes):.1f}%")
    return "\n".join(lines)


# --------------------------------------------------------------------------- any metrics


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, np.generic))


def metric_blocks(value, level: int) -> list:
    """Render any nested metrics value: scalars -> key/value tables, a dict of flat
    dicts or a list of dicts -> one table with a row each, deeper dicts -> headings."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if _is_scalar(value):
        return [Para(fmt(value))]
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, Mapping) for v in value):
            return [_rows_table(list(value))]
        shown = ", ".join(fmt(v) if _is_scalar(v) else str(v) for v in value[:50])
        return [Para(shown + (f" … (+{len(value) - 50} more)" if len(value) > 50 else ""))]
    if not isinstance(value, Mapping):
        return [Para(str(value))]
    if value and all(
        isinstance(v, Mapping) and all(_is_scalar(x) for x in v.values()) for v in value.values()
    ):
        return [_rows_table([{"": k, **v} for k, v in value.items()])]
    blocks = []
    scalars = [(k, v) for k, v in value.items() if _is_scalar(v)]
    if scalars:
        blocks.append(Table(["name", "value"], [[str(k), fmt(v)] for k, v in scalars]))
    for k, v in value.items():
        if not _is_scalar(v):
            blocks.append(Heading(level, str(k)))
            blocks.extend(metric_blocks(v, level + 1))
    return blocks


def _rows_table(rows: list[Mapping]) -> Table:
    rows = [{str(k): v for k, v in r.items()} for r in rows]
    headers = list(dict.fromkeys(k for r in rows for k in r))  # union, first-seen order
    return Table(headers, [[fmt(r.get(h)) for h in headers] for r in rows])


def settings_table(settings: Mapping) -> Table:
    """Nested settings as one `a.b.c | value` table."""
    return Table(["setting", "value"], [[k, fmt(v)] for k, v in _flatten(settings)])


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


def _comparison_table(metrics: Mapping) -> Table:
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
    hybrid = ens.get("hybrid")
    if hybrid and "test_errors" in hybrid:  # combine.generalists > 1
        rows.append([
            f"{hybrid.get('generalists', '?')} full models + specialists",
            _rate(hybrid.get("test_accuracy")),
            _count(hybrid["test_errors"]),
            change(hybrid["test_errors"]),
            _rate(hybrid.get("conditional_accuracy")),
        ])
    peer = metrics.get("peer_ensemble")
    if peer and "test_accuracy" in peer:
        members = peer.get("members")
        label = "peer ensemble"
        if members is not None:
            label += f" of {members} generalist" + ("s" if members != 1 else "")
        rows.append([label, _rate(peer["test_accuracy"]), _count(peer.get("test_errors")),
                     change(peer.get("test_errors")), "—"])
    for key, teacher in DISTILLED_SECTIONS.items():  # a student distilled from this run (`specialists distill`)
        student = metrics.get(key)
        if student and "student_test_accuracy" in student:
            kept = student.get("kept_gain")
            label = f"one model distilled from {teacher}" + ("" if kept is None else f" (keeps {kept:.0%} of the gain)")
            rows.append([label, _rate(student["student_test_accuracy"]), _count(student.get("student_test_errors")),
                         change(student.get("student_test_errors")), "—"])
    headers = ["model", "test accuracy", "test errors", "change in errors", "conditional accuracy"]
    return Table(headers, rows, html_id="results")


# metrics.json section of a distilled student (distill_run.RUN_SECTIONS) -> what it was distilled from
DISTILLED_SECTIONS = {"distilled": "generalist + specialists", "distilled_peers": "the peer ensemble",
                      "distilled_hybrid": "full models + specialists"}


def covering_table(rows: Sequence[Mapping]) -> Table:
    """The paper's Table 4: test examples by how many specialists cover their true class."""
    return Table(
        ["specialists covering", "test examples", "change in correct", "relative accuracy change"],
        [
            [_count(r.get("specialists_covering")), _count(r.get("examples")),
             _signed(r.get("change_in_correct")), _signed(r.get("relative_gain"), percent=True)]
            for r in rows
        ],
        html_id="by-covering",
    )


def results_blocks(metrics: Mapping) -> list:
    """Headings, notes and the two results tables; [] when there is no `ensemble` section."""
    ens = metrics.get("ensemble")
    if not ens:
        return []
    blocks = [Heading(3, "Test accuracy of each model (like the paper's Table 3)")]
    if ens.get("mode"):
        blocks.append(Para(f"Model: {ens['mode']}"))
    combine = ens.get("combine", {})
    if combine.get("chosen_on_validation"):
        blocks.append(Para(
            f"top_n and specialist_weight chosen on the validation split ({_count(ens.get('val_errors'))} "
            f"validation errors against the generalist's {_count(ens.get('generalist_val_errors'))}); "
            + ("the run serves this combination." if ens.get("served") != "the generalist alone" else
               "the run serves the generalist alone: on validation the combination did not clearly beat it "
               "(a one-sided sign test at combine.significance).")))
    blocks.append(_comparison_table(metrics))
    peer = metrics.get("peer_ensemble")
    if peer and "examples_seen" in peer and "budget_examples" in peer:
        blocks.append(Para(
            "Peer ensemble: the generalist and generalists trained with other seeds, probabilities "
            f"averaged; {peer['examples_seen']:,} training examples processed, against "
            f"{peer['budget_examples']:,} by the generalist"
            + (f", the hybrid's {peer['hybrid_full_models'] - 1} other full model(s)"
               if peer.get("hybrid_full_models", 1) > 1 else "")
            + " and the specialists."
        ))
    notes = ["Change in errors: test errors relative to the generalist's (negative = fewer)."]
    if "covered_test_examples" in ens:
        notes.append(
            "Conditional accuracy: the argmax over only the classes of the specialists covering "
            f"the true class, on the {ens['covered_test_examples']} test examples whose class a "
            "specialist covers."
        )
    blocks.append(Note(" ".join(notes)))
    by_covering = ens.get("by_covering")
    if by_covering:
        blocks.append(Heading(3, "By number of specialists covering the true class (like Table 4)"))
        blocks.append(covering_table(by_covering))
        blocks.append(Note(
            "Change in correct: test examples the combination gets right minus those the generalist "
            "gets right; relative accuracy change: that change over the generalist's correct ones."
        ))
    return blocks


# --------------------------------------------------------------------------- plain text


def _text_table(table: Table) -> list[str]:
    """Aligned plain-text lines: numeric columns right-aligned, a dashed rule under the header."""
    num = numeric_columns(table)
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
    for block in results_blocks(metrics):
        if isinstance(block, Heading):
            lines += ([""] if lines else []) + [block.text + ":"]
        elif isinstance(block, Para) and not isinstance(block, Note):
            lines += textwrap.wrap(block.text, width)
        elif isinstance(block, Table):
            lines += _text_table(block)
    return "\n".join(lines)


def summary_table(metrics: Mapping) -> str:
    """A run's metrics (metrics.json) as plain text: `section.key value` for each scalar,
    then the test results as tables (format_results), which stand in for the `ensemble`
    and `peer_ensemble` sections."""
    results = format_results(metrics)
    tabled = {"ensemble", "peer_ensemble", *DISTILLED_SECTIONS} if results else set()
    rows = []
    for section, values in metrics.items():
        if not isinstance(values, dict) or section in tabled:
            continue
        for key, value in values.items():
            if isinstance(value, float):
                value = f"{value:.4f}"
            if isinstance(value, (int, str)):
                rows.append((f"{section}.{key}", str(value)))
    width = max((len(k) for k, _ in rows), default=10)
    lines = [f"  {k:<{width}}  {v}" for k, v in rows]
    if results:
        lines += [""] + [f"  {line}".rstrip() for line in results.splitlines()]
    return "\n".join(lines)
