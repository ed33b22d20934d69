"""The run report: real files in tmp_path, a planted 30-class example, and the results
tables (Tables 3-4) from a realistic metrics.json, on the page and in the terminal."""

from __future__ import annotations

import base64
import copy
import html
import math
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from specialists.report import (
    analysis,
    check_groups,
    cluster_order,
    confused_pairs,
    error_share_inside,
    format_results,
    format_summary,
    md_escape,
    reordered_image,
    summary_table,
    within_between,
    write_report,
)
from specialists.rundir import RunDir, write_json

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
C = 30


def planted(seed: int = 0):
    """30 classes, 5 clusters of scattered (not contiguous) classes, 2 classes uncovered.

    matrix: +0.6 inside each cluster, N(0, 0.05) noise, 1 on the diagonal.
    error_pairs: a known pair (cluster 0) 7 times, 20 errors inside clusters, 15 outside.
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(C)
    groups = [sorted(perm[i * 6 : (i + 1) * 6].tolist()) for i in range(5)]
    groups[4] = groups[4][:4]  # its other two classes are uncovered
    uncovered = sorted(set(range(C)) - {c for g in groups for c in g})
    noise = rng.normal(0, 0.05, (C, C))
    matrix = (noise + noise.T) / 2
    for g in groups:
        matrix[np.ix_(g, g)] += 0.6
    np.fill_diagonal(matrix, 1.0)
    names = [f"class_{i}" for i in range(C)]
    names[groups[0][1]] = "fish <b>& chips"  # user data that breaks unescaped HTML/Markdown
    names[groups[3][0]] = "a $x$ | *b*"
    names[uncovered[0]] = "</table><script>x</script>"
    g0 = groups[0]
    pairs = [(g0[0], g0[1])] * 7  # the most confused pair, inside cluster 0
    for k in range(13):  # inside cluster k % 5, never the pair above
        g, j = groups[k % 5], k // 5
        pairs.append((g[j + 1], g[j + 2]))
    for k in range(15):  # outside: cluster k % 4 -> cluster k % 4 + 1
        pairs.append((groups[k % 4][0], groups[k % 4 + 1][1]))
    return dict(names=names, matrix=matrix, groups=groups, uncovered=uncovered, pairs=np.array(pairs))


METRICS = {
    "generalist": {"val_accuracy": 0.8123, "test_accuracy": 0.80041},
    "timings": {"train_s": 12.3456, "cluster_s": 0.0123},
    "by_covering": [{"covering": 1, "accuracy": 0.81}, {"covering": 2, "accuracy": 0.83, "n": 100}],
    "stage_from_the_future": {"val": {"top1": 0.912}, "test": {"top1": 0.905}},
}


@pytest.fixture(scope="module")
def example():
    return planted()


@pytest.fixture(scope="module")
def written(example, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    paths = write_report(
        out,
        example["names"],
        example["matrix"],
        example["groups"],
        uncovered=example["uncovered"],
        error_pairs=example["pairs"],
        metrics=METRICS,
        settings={"cluster": {"n_clusters": 5, "method": "kmeans"}, "seed": 0},
        title="Planted <report>",
    )
    return out, paths


class TableParser(HTMLParser):
    """Text of every cell of every table, keyed by the table's id (or its index)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[str]]] = {}
        self._rows = self._cell = self._cell_saved = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._rows = self.tables.setdefault(dict(attrs).get("id") or str(len(self.tables)), [])
        elif tag == "tr" and self._rows is not None:
            self._rows.append([])
        elif tag in ("td", "th") and self._rows is not None:
            self._cell = []
        elif tag == "details":  # the expandable full list repeats the names; skip it
            self._cell_saved, self._cell = self._cell, None

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "details":
            self._cell = self._cell_saved
        elif tag == "table":
            self._rows = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def tables_of(page: str) -> dict[str, list[list[str]]]:
    p = TableParser()
    p.feed(page)
    return p.tables


# --------------------------------------------------------------------------- files


def test_writes_every_file_atomically(written):
    out, paths = written
    assert set(paths) == {"html", "markdown", "heatmap", "cluster_sizes"}
    for path in paths.values():
        assert path.parent == out and path.stat().st_size > 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_html_table_lists_every_cluster_with_escaped_names(example, written):
    out, _ = written
    page = (out / "index.html").read_text(encoding="utf-8")
    rows = tables_of(page)["clusters"]
    assert rows[0][:5] == ["cluster", "size", "classes", "within", "between"]
    assert len(rows) - 1 == len(example["groups"])
    for gi, (g, row) in enumerate(zip(example["groups"], rows[1:])):
        # the browser's text equals the raw names: escaped exactly once
        assert row[:3] == [str(gi), str(len(g)), ", ".join(example["names"][c] for c in g)]
    for name in example["names"]:
        assert html.escape(name) in page
    assert "<b>&" not in page and "<script>" not in page and "<report>" not in page
    assert tables_of(page)["uncovered"][1] == [", ".join(example["names"][c] for c in example["uncovered"])]


def test_long_clusters_are_truncated(tmp_path):
    n = 40
    names = [f"n{i}" for i in range(n)]
    write_report(tmp_path, names, np.eye(n), [list(range(30)), list(range(30, 40))])
    rows = tables_of((tmp_path / "index.html").read_text())["clusters"]
    assert rows[1][2] == ", ".join(names[:12]) + " … (+18 more)"
    assert rows[2][2] == ", ".join(names[30:40])
    md = (tmp_path / "summary.md").read_text()
    assert "| 0 | 30 | " + ", ".join(names[:12]) + " … (+18 more) |" in md


def test_markdown_lists_every_cluster(example, written):
    out, _ = written
    md = (out / "summary.md").read_text(encoding="utf-8")
    for gi, g in enumerate(example["groups"]):
        names = ", ".join(md_escape(example["names"][c]) for c in g)
        assert re.search(rf"^\| {gi} \| {len(g)} \| {re.escape(names)} \|", md, re.M), f"cluster {gi}"
    assert "<b>" not in md and "| *b*" not in md
    assert "![" in md and "(heatmap.png)" in md and "(cluster_sizes.png)" in md


def test_md_escape():
    assert md_escape("fish <b>& chips") == r"fish \<b\>& chips"
    assert md_escape("a $x$ | *b*") == r"a \$x\$ \| \*b\*"
    assert md_escape("snake_case_name") == "snake_case_name"
    assert md_escape("_lead &amp; two\nlines") == r"\_lead \&amp; two lines"


@pytest.mark.parametrize("name", ["heatmap.png", "cluster_sizes.png"])
def test_pngs_are_real_plots(written, name):
    out, _ = written
    data = (out / name).read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    img = imread(out / name)
    assert img.shape[0] > 200 and img.shape[1] > 200
    q = (img[..., :3] * 255).round().astype(np.uint32).reshape(-1, 3)
    assert len(np.unique(q[:, 0] << 16 | q[:, 1] << 8 | q[:, 2])) > 50  # not flat: axes, text, colours


def test_html_embeds_the_written_pngs(written):
    out, _ = written
    page = (out / "index.html").read_text()
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    embedded = sorted(base64.b64decode(u) for u in uris)
    assert embedded == sorted((out / n).read_bytes() for n in ("heatmap.png", "cluster_sizes.png"))


# --------------------------------------------------------------------------- helpers


def test_the_report_package_imports_neither_torch_nor_ray():
    code = "import sys, specialists.report; print(sorted(m for m in sys.modules if m in ('torch', 'ray')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr



def test_cluster_order_groups_classes_and_puts_uncovered_last():
    groups = [[4, 1], [0, 5, 1]]  # class 1 in both: placed with the first
    order = cluster_order(groups, 7)
    assert order.tolist() == [4, 1, 0, 5, 2, 3, 6]


def test_reordered_matrix_shows_the_planted_blocks(example):
    m, groups = example["matrix"], example["groups"]
    order = cluster_order(groups, C)
    image, f = reordered_image(m, order)
    assert f == 1 and np.array_equal(image, m[np.ix_(order, order)])
    # the clusters are contiguous blocks in the reordered matrix
    pos = np.empty(C, dtype=np.int64)
    pos[order] = np.arange(C)
    blocks = [sorted(pos[g].tolist()) for g in groups]
    assert all(b == list(range(b[0], b[0] + len(b))) for b in blocks)
    wb = within_between(image, blocks)
    assert np.allclose(wb, within_between(m, groups))  # reordering moves, never changes, values
    assert np.all(wb[:, 0] > 0.5) and np.all(np.abs(wb[:, 1]) < 0.05)
    # the same contiguous positions without the reordering show no blocks
    assert np.all(within_between(m, blocks)[:, 0] < 0.3)


def test_block_average_agrees_with_direct_reorder(monkeypatch):
    rng = np.random.default_rng(1)
    n = 103
    m = rng.normal(size=(n, n)).astype(np.float32)
    order = rng.permutation(n)
    direct = m[np.ix_(order, order)].astype(np.float64)
    edges = list(range(0, n, 11)) + [n]
    cells = list(zip(edges, edges[1:]))
    expect = np.array([[direct[a:b, c:d].mean() for c, d in cells] for a, b in cells])
    image, f = reordered_image(m, order, max_cells=10)
    assert f == 11 and image.shape == (10, 10)
    np.testing.assert_allclose(image, expect, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(analysis, "CHUNK_ELEMENTS", 3 * n)  # many row chunks, including a short last one
    np.testing.assert_allclose(reordered_image(m, order, max_cells=10)[0], expect, rtol=1e-5, atol=1e-6)


def test_within_between_hand_computed(monkeypatch):
    m = np.array(
        [[1.0, 0.5, 0.1, 0.2],
         [0.5, 1.0, 0.3, 0.0],
         [0.1, 0.3, 1.0, 0.4],
         [0.2, 0.0, 0.4, 1.0]]
    )
    expect = [[0.5, (0.1 + 0.2 + 0.3 + 0.0) / 4], [math.nan, (0.1 + 0.3 + 0.4) / 3]]
    np.testing.assert_allclose(within_between(m, [[0, 1], [2]]), expect)
    monkeypatch.setattr(analysis, "CHUNK_ELEMENTS", 4)  # one row per step
    np.testing.assert_allclose(within_between(m, [[0, 1], [2]]), expect)
    assert np.isnan(within_between(m, [[0, 1, 2, 3]])[0, 1])  # nothing outside


def test_error_share_inside_hand_computed():
    groups = [[0, 1, 2], [3, 4]]
    pairs = np.array([(0, 1), (1, 0), (2, 3), (3, 4), (5, 0), (4, 3)])  # 5 is in no cluster
    assert error_share_inside(pairs, groups) == (4, 6, 4 / 6)
    overlapping = [[0, 1], [1, 2]]
    assert error_share_inside(np.array([(0, 2), (2, 1), (0, 1)]), overlapping) == (2, 3, 2 / 3)
    inside, total, share = error_share_inside(np.zeros((0, 2), dtype=int), groups)
    assert (inside, total) == (0, 0) and math.isnan(share)
    assert error_share_inside(pairs, []) == (0, 6, 0.0)  # no clusters: nothing a specialist can fix
    with pytest.raises(ValueError, match=r"groups\[1\] is empty"):
        error_share_inside(pairs, [[0, 1], []])


def test_check_groups_allows_overlap_but_not_empty_or_repeated():
    assert check_groups([np.array([2, 0]), [0]], 3) == [[2, 0], [0]]  # class 0 in two clusters is fine
    assert all(type(c) is int for c in check_groups([np.array([2, 0])], 3)[0])
    for groups, match in [([[0], []], r"groups\[1\] is empty"), ([[0, 2, 0]], "lists class 0 twice"),
                          ([[3]], r"class index 3 outside \[0, 3\)")]:
        with pytest.raises(ValueError, match=match):
            check_groups(groups, 3)


def test_confused_pairs_most_frequent_first():
    pairs = np.array([(2, 3), (0, 1), (2, 3), (1, 0), (0, 1), (4, 0)])
    uniq, counts, same = confused_pairs(pairs, [[0, 1], [2, 4]], 5)
    # ties (count 2, then count 1) keep ascending pair order
    assert uniq.tolist() == [[0, 1], [2, 3], [1, 0], [4, 0]]
    assert counts.tolist() == [2, 2, 1, 1] and same.tolist() == [True, False, True, False]


def test_error_section_counts_and_top_pair(example, written):
    out, _ = written
    page = (out / "index.html").read_text()
    assert error_share_inside(example["pairs"], example["groups"]) == (20, 35, 20 / 35)
    assert "20 / 35 (57.1%)" in page
    names, g0 = example["names"], example["groups"][0]
    top = tables_of(page)["confused-pairs"]
    assert top[0] == ["true class", "predicted class", "count", "same cluster"]
    assert top[1] == [names[g0[0]], names[g0[1]], "7", "yes"]
    assert {row[3] for row in top[1:]} == {"yes", "no"}
    per_cluster = [int(row[5]) for row in tables_of(page)["clusters"][1:]]
    assert per_cluster == [7 + 3, 3, 3, 2, 2]  # the known pair + the 13 pairs in cluster k % 5


def test_metrics_tables_are_generic(written):
    out, _ = written
    page = (out / "index.html").read_text()
    cells = {tuple(r) for rows in tables_of(page).values() for r in rows}
    assert ("val_accuracy", "0.8123") in cells and ("test_accuracy", "0.8004") in cells
    assert ("train_s", "12.35") in cells
    assert ("covering", "accuracy", "n") in cells
    assert ("2", "0.83", "100") in cells and ("1", "0.81", "—") in cells  # missing key -> dash
    assert ("", "top1") in cells and ("val", "0.912") in cells  # a stage this module never heard of
    assert ("cluster.n_clusters", "5") in cells
    md = (out / "summary.md").read_text()
    assert "### by_covering" in md and "| 2 | 0.83 | 100 |" in md


def test_format_summary(example):
    text = format_summary(C, example["groups"], error_pairs=example["pairs"])
    assert text.splitlines() == [
        "clusters: 5 covering 28 of 30 classes (sizes 4-6, median 6)",
        "uncovered classes: 2",
        "errors inside one cluster (specialists can fix): 20 / 35 (57.1%)",
    ]
    assert "errors" not in format_summary(C, example["groups"])


# --------------------------------------------------------------------------- results tables

# A 1000-class run with a 20,000-example test set; the numbers add up like a real one:
# 6790 generalist-correct = 7 + 5431 + 1352, 222 fewer errors = 0 + 151 + 71.
RESULTS = {
    "generalist": {"val_accuracy": 0.3428, "test_accuracy": 0.3395, "test_errors": 13210,
                   "best_epoch": 15, "examples_seen": 1026000},
    "specialists": {"count": 99, "trained": 99, "examples_seen": 1022976},
    "ensemble": {
        "mode": "generalist + 99 specialists (top_n=1, dustbin=active, specialist_weight=1)",
        "test_accuracy": 0.3506, "generalist_test_accuracy": 0.3395,
        "test_errors": 12988, "generalist_test_errors": 13210,
        "error_reduction": 222 / 13210, "relative_accuracy_gain": 0.3506 / 0.3395 - 1,
        "conditional_accuracy": 0.42277, "generalist_conditional_accuracy": 0.41166,
        "covered_test_examples": 19980,
        "by_covering": [
            {"specialists_covering": 0, "examples": 20, "generalist_correct": 7,
             "change_in_correct": 0, "relative_gain": 0.0},
            {"specialists_covering": 1, "examples": 15980, "generalist_correct": 5431,
             "change_in_correct": 151, "relative_gain": 151 / 5431},
            {"specialists_covering": 2, "examples": 4000, "generalist_correct": 1352,
             "change_in_correct": 71, "relative_gain": 71 / 1352},
        ],
    },
    "peer_ensemble": {"members": 2, "budget_examples": 2048976, "examples_seen": 2026000,
                      "val_accuracy": 0.3511, "val_errors": 3893,
                      "test_accuracy": 0.3472, "test_errors": 13056,
                      "member_val_accuracies": [0.3428, 0.3401], "member_test_accuracies": [0.3395, 0.3377]},
    "timings": {"total": 64.621},
}
COMPARISON_HEADER = ["model", "test accuracy", "test errors", "change in errors", "conditional accuracy"]
COVERING_HEADER = ["specialists covering", "test examples", "change in correct", "relative accuracy change"]
GENERALIST_ROW = ["generalist", "0.3395", "13210", "—", "0.4117"]
ENSEMBLE_ROW = ["generalist + specialists", "0.3506", "12988", "-1.7%", "0.4228"]  # -222 / 13210
PEER_ROW = ["peer ensemble of 2 generalists", "0.3472", "13056", "-1.2%", "—"]  # -154 / 13210
COVERING_ROWS = [["0", "20", "0", "0.0%"], ["1", "15980", "+151", "+2.8%"], ["2", "4000", "+71", "+5.3%"]]


def without(metrics: dict, *path: str) -> dict:
    """A deep copy of metrics with one key removed, e.g. without(m, "ensemble", "by_covering")."""
    metrics = copy.deepcopy(metrics)
    parent = metrics
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    return metrics


NO_SPECIALISTS = {  # what evaluate_run writes for a run whose specialists are disabled
    "generalist": RESULTS["generalist"],
    "ensemble": {"mode": "generalist alone (no finished specialists in the run directory)",
                 "test_accuracy": 0.3395, "generalist_test_accuracy": 0.3395},
}


def text_tables(text: str) -> list[list[str]]:
    """Each plain-text table of format_results as its lines (header, rule, rows)."""
    tables, current, prev = [], None, ""
    for line in text.splitlines():
        if re.fullmatch(r"-+( +-+)+", line):  # the rule under a header: the header starts a table
            current = [prev, line]
            tables.append(current)
        elif current is not None and line and not line.endswith(":") and "  " in line:
            current.append(line)
        else:
            current = None
        prev = line
    return tables


def cells(line: str) -> list[str]:
    return re.split(r" {2,}", line.strip())


def test_results_text_shows_both_tables_aligned():
    text = format_results(RESULTS)
    comparison, covering = text_tables(text)
    assert cells(comparison[0]) == COMPARISON_HEADER
    assert [cells(line) for line in comparison[2:]] == [GENERALIST_ROW, ENSEMBLE_ROW, PEER_ROW]
    assert cells(covering[0]) == COVERING_HEADER
    assert [cells(line) for line in covering[2:]] == COVERING_ROWS
    for table in (comparison, covering):  # numbers right-aligned: every line ends in the same column
        assert len({len(line) for line in table}) == 1, table
    assert "Model: generalist + 99 specialists (top_n=1" in text
    assert "2,026,000 training examples processed, against 2,048,976" in text
    assert "Conditional accuracy:" not in text  # the page's notes stay off the terminal


def test_results_without_peers_or_by_covering():
    text = format_results(without(RESULTS, "peer_ensemble"))
    comparison, covering = text_tables(text)
    assert [cells(line) for line in comparison[2:]] == [GENERALIST_ROW, ENSEMBLE_ROW]
    assert "peer" not in text.lower()
    text = format_results(without(RESULTS, "ensemble", "by_covering"))
    assert len(text_tables(text)) == 1 and "Table 4" not in text
    assert [cells(line) for line in text_tables(text)[0][2:]] == [GENERALIST_ROW, ENSEMBLE_ROW, PEER_ROW]


def test_results_without_specialists_show_the_generalist_alone():
    text = format_results(NO_SPECIALISTS)
    (comparison,) = text_tables(text)
    assert [cells(line) for line in comparison[2:]] == [["generalist", "0.3395", "13210", "—", "—"]]
    assert "Model: generalist alone" in text and "Table 4" not in text
    assert format_results({"generalist": RESULTS["generalist"]}) == ""  # evaluate has not run
    assert format_results({}) == ""


def test_results_missing_values_show_a_dash():
    metrics = copy.deepcopy(RESULTS)
    metrics["ensemble"]["by_covering"].append(  # no generalist-correct example: relative gain undefined
        {"specialists_covering": 3, "examples": 2, "generalist_correct": 0, "change_in_correct": 1,
         "relative_gain": math.nan})
    metrics["ensemble"]["conditional_accuracy"] = math.nan
    comparison, covering = text_tables(format_results(metrics))
    assert cells(comparison[3]) == ["generalist + specialists", "0.3506", "12988", "-1.7%", "—"]
    assert cells(covering[-1]) == ["3", "2", "+1", "—"]


def test_report_shows_the_results_tables(example, tmp_path):
    write_report(tmp_path, example["names"], example["matrix"], example["groups"], metrics=RESULTS)
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    tables = tables_of(page)
    assert tables["results"] == [COMPARISON_HEADER, GENERALIST_ROW, ENSEMBLE_ROW, PEER_ROW]
    assert tables["by-covering"] == [COVERING_HEADER] + COVERING_ROWS
    assert page.index('id="results"') < page.index("<h2>Summary</h2>")  # the results open the page
    assert "on the 19980 test examples whose class a specialist covers" in page
    md = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "| peer ensemble of 2 generalists | 0.3472 | 13056 | -1.2% | — |" in md
    assert "| 2 | 4000 | +71 | +5.3% |" in md


def test_report_without_peers_or_specialists(example, tmp_path):
    args = example["names"], example["matrix"], example["groups"]
    write_report(tmp_path / "nopeer", *args, metrics=without(RESULTS, "peer_ensemble"))
    tables = tables_of((tmp_path / "nopeer" / "index.html").read_text())
    assert tables["results"][1:] == [GENERALIST_ROW, ENSEMBLE_ROW]
    assert tables["by-covering"][1:] == COVERING_ROWS
    write_report(tmp_path / "alone", *args, metrics=NO_SPECIALISTS)
    tables = tables_of((tmp_path / "alone" / "index.html").read_text())
    assert tables["results"][1:] == [["generalist", "0.3395", "13210", "—", "—"]]
    assert "by-covering" not in tables


def test_report_without_an_ensemble_has_no_results_section(written):
    out, _ = written  # METRICS has no ensemble section
    page = (out / "index.html").read_text()
    assert "Test results" not in page and "results" not in tables_of(page)


def test_summary_table_prints_the_results_tables(tmp_path):
    def summary():  # as the CLI prints it after `specialists run` and `evaluate`
        return summary_table(RunDir(tmp_path).read_metrics())

    write_json(tmp_path / "metrics.json", RESULTS)
    text = summary()
    assert re.search(r"^  generalist\.test_accuracy +0\.3395$", text, re.M)
    assert re.search(r"^  timings\.total +64\.6210$", text, re.M)
    assert "ensemble.test_errors" not in text and "peer_ensemble." not in text  # shown as tables instead
    comparison, covering = text_tables("\n".join(line[2:] for line in text.splitlines()))
    assert [cells(line) for line in comparison[2:]] == [GENERALIST_ROW, ENSEMBLE_ROW, PEER_ROW]
    assert [cells(line) for line in covering[2:]] == COVERING_ROWS

    write_json(tmp_path / "metrics.json", {"generalist": RESULTS["generalist"]})  # before evaluate
    assert summary().splitlines()[1].startswith("  generalist.test_accuracy")
    write_json(tmp_path / "metrics.json", NO_SPECIALISTS)
    text = summary()
    assert "ensemble.mode" not in text and "generalist alone" in text and "peer" not in text


def test_large_matrix_is_block_averaged(tmp_path):
    n = 1500
    rng = np.random.default_rng(2)
    m = rng.normal(0, 0.01, (n, n)).astype(np.float32)
    groups = [list(range(i, i + 50)) for i in range(0, n, 50)]
    for g in groups:
        m[g[0] : g[-1] + 1, g[0] : g[-1] + 1] += 0.5
    paths = write_report(tmp_path, [f"c{i}" for i in range(n)], m, groups, max_cells=300)
    img = imread(paths["heatmap"])
    assert img.shape[0] < 1000 and img.shape[1] < 1000
    image, f = reordered_image(m, cluster_order(groups, n), max_cells=300)
    assert (f, image.shape) == (5, (300, 300))
    assert np.all(within_between(image, [list(range(i, i + 10)) for i in range(0, 300, 10)])[:, 0] > 0.4)


# --------------------------------------------------------------------------- bad input


def with_entry(i, j, value):
    m = np.eye(C)
    m[i, j] = value
    return m


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(matrix=np.zeros((30, 29))), r"square .*\(30, 29\)"),
        (dict(matrix=np.eye(31)), "31x31 but there are 30 class_names"),
        (dict(matrix=with_entry(2, 5, np.nan)), r"non-finite entry: matrix\[2, 5\] = nan"),
        (dict(matrix=with_entry(2, 5, np.inf)), r"matrix\[2, 5\] = inf"),
        (dict(groups=[[0, 1], [2, 30]]), r"groups\[1\] has class index 30 outside \[0, 30\)"),
        (dict(groups=[[-1, 1]]), r"groups\[0\] has class index -1"),
        (dict(groups=[[0, 1], []]), r"groups\[1\] is empty"),
        (dict(groups=[[0, 1, 1]]), r"groups\[0\] lists class 1 twice"),
        (dict(groups=[[0.0, 1.0]]), "must hold class indices"),
        (dict(uncovered=[0]), "uncovered class 0 is also in a cluster"),
        (dict(uncovered=[30]), "uncovered has class index 30"),
        (dict(error_pairs=np.array([1, 2, 3])), r"\(E, 2\)"),
        (dict(error_pairs=np.array([(1, 2), (4, 4)])), r"error_pairs\[1\] = \(4, 4\) is not an error"),
        (dict(error_pairs=np.array([(1, 30)])), r"error_pairs\[0\] = \(1, 30\) has a class index outside"),
    ],
)
def test_bad_input_raises_and_writes_nothing(tmp_path, change, match):
    args = dict(matrix=np.eye(C), groups=[[0, 1], [2, 3]], uncovered=None, error_pairs=None)
    args.update(change)
    out = tmp_path / "report"
    with pytest.raises(ValueError, match=match):
        write_report(out, [f"c{i}" for i in range(C)], **args)
    assert not out.exists()


# --------------------------------------------------------------------------- real browser


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs the chromium binary (apt-get install -y chromium)"
)
def test_report_renders_in_headless_chromium(written, tmp_path):
    out, _ = written
    script = REPO / "jobs" / "check_report_browser.py"
    shot = tmp_path / "shot.png"
    cmd = [sys.executable, script, out, "--screenshot", shot]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "DOM ok: 5 cluster rows, 2 embedded PNG images" in ok.stdout
    assert imread(shot).shape[:2] == (2400, 1280)
    # the check fails on a page whose images are gone
    broken = tmp_path / "broken"
    broken.mkdir()
    page = (out / "index.html").read_text()
    (broken / "index.html").write_text(re.sub(r"<img [^>]*>", "", page))
    bad = subprocess.run([sys.executable, script, broken], capture_output=True, text=True, timeout=180)
    assert bad.returncode == 1 and "FAIL" in bad.stderr and "images" in bad.stderr, bad.stderr


# --------------------------------------------------------------------------- issue 12: order inside a cluster, held-out share


def test_similarity_order_puts_planted_sub_blocks_side_by_side():
    # one cluster of 8 classes listed interleaved: 0, 4, 1, 5, ... ; classes 0-3 and 4-7 form two sub-blocks
    rng = np.random.default_rng(0)
    matrix = rng.normal(0, 0.02, (10, 10))
    matrix = (matrix + matrix.T) / 2
    matrix[:4, :4] += 0.5
    matrix[4:8, 4:8] += 0.5
    np.fill_diagonal(matrix, 1.0)
    group = [0, 4, 1, 5, 2, 6, 3, 7]
    order = cluster_order([group, [8, 9]], 10, matrix)
    assert sorted(order.tolist()) == list(range(10))
    inside = order[:8].tolist()
    assert {frozenset(inside[:4]), frozenset(inside[4:])} == {frozenset(range(4)), frozenset(range(4, 8))}
    assert cluster_order([group, [8, 9]], 10).tolist() == group + [8, 9]  # without a matrix: as listed


def test_random_share_and_held_out_line(example):
    groups = example["groups"]  # sizes 6, 6, 6, 6, 4 of 30 classes
    expected = (4 * 6 * 5 + 4 * 3) / (C * (C - 1))
    assert analysis.random_share(groups, C) == pytest.approx(expected)
    held = example["pairs"][:10]
    inside, total, _ = error_share_inside(held, groups)
    text = format_summary(C, groups, error_pairs=example["pairs"], heldout_pairs=held, heldout_name="test")
    assert text.splitlines()[-1] == (f"held out (test errors, never used to cluster): {inside} / {total} "
                                     f"({100 * inside / total:.1f}%); random clusters of these sizes: "
                                     f"{100 * expected:.1f}%")
