"""The Tables 3-4 maths on hand-made probabilities."""

import json

import numpy as np
import pytest

from specialists.evaluation import (StreamedComparison, by_covering, compare_with_generalist, conditional_correct,
                                    covering_classes, membership, sum_by_covering)

# 4 classes; specialist 0 covers {0, 1}, specialist 1 covers {1, 2}; class 3 is uncovered
GROUPS = [[0, 1], [1, 2]]
LABELS = np.array([0, 1, 2, 3, 1])
GENERAL = np.array([  # argmax: 3 (wrong), 1, 0 (wrong), 3, 2 (wrong)
    [0.3, 0.1, 0.2, 0.4],
    [0.1, 0.6, 0.2, 0.1],
    [0.5, 0.3, 0.1, 0.1],
    [0.1, 0.1, 0.1, 0.7],
    [0.1, 0.3, 0.4, 0.2],
])
COMBINED = np.array([  # argmax: 0, 1, 2, 3, 2 (wrong)
    [0.5, 0.1, 0.1, 0.3],
    [0.1, 0.6, 0.2, 0.1],
    [0.2, 0.1, 0.6, 0.1],
    [0.1, 0.1, 0.1, 0.7],
    [0.1, 0.3, 0.4, 0.2],
])


def test_conditional_correct_takes_the_argmax_over_allowed_classes():
    allowed = np.array([[True, True, False, False], [False, False, True, True]])
    probs = np.array([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]])
    assert conditional_correct(probs, np.array([1, 2]), allowed).tolist() == [True, False]


def test_covering_classes_unites_every_covering_specialist():
    member = membership(GROUPS, 4)
    assert member.tolist() == [[True, True, False, False], [False, True, True, False]]
    covered, allowed = covering_classes(member, LABELS)
    assert covered.tolist() == [True, True, True, False, True]
    assert allowed.tolist() == [[True, True, False, False], [True, True, True, False], [False, True, True, False],
                                [True, True, True, False]]


def test_tables_3_and_4_by_hand():
    m = compare_with_generalist(GENERAL, COMBINED, LABELS, GROUPS)
    assert (m["test_errors"], m["generalist_test_errors"]) == (1, 3)
    assert m["test_accuracy"] == 4 / 5 and m["generalist_test_accuracy"] == 2 / 5
    assert m["error_reduction"] == 2 / 3 and m["relative_accuracy_gain"] == pytest.approx(1.0)
    # covered rows 0, 1, 2, 4; inside their allowed classes the generalist gets rows 0 and 1 right (row 2,
    # allowed {1, 2}, it puts on 1), the combination rows 0, 1, 2; row 4 (allowed {0, 1, 2}) neither
    assert m["covered_test_examples"] == 4
    assert (m["generalist_conditional_accuracy"], m["conditional_accuracy"]) == (2 / 4, 3 / 4)
    assert m["by_covering"] == [
        {"specialists_covering": 0, "examples": 1, "generalist_correct": 1, "change_in_correct": 0,
         "relative_gain": 0.0},
        {"specialists_covering": 1, "examples": 2, "generalist_correct": 0, "change_in_correct": 2,
         "relative_gain": m["by_covering"][1]["relative_gain"]},
        {"specialists_covering": 2, "examples": 2, "generalist_correct": 1, "change_in_correct": 0,
         "relative_gain": 0.0},
    ]
    assert np.isnan(m["by_covering"][1]["relative_gain"])  # no correct generalist answer to grow from


def test_by_covering_skips_empty_counts_and_sums_over_runs():
    rows = by_covering(np.array([True, True, False]), np.array([False, True, True]), np.array([0, 2, 2]))
    assert [r["specialists_covering"] for r in rows] == [0, 2]
    assert by_covering(np.zeros(0, bool), np.zeros(0, bool), np.zeros(0, int)) == []
    total = sum_by_covering([rows, rows])
    assert total == [
        {"specialists_covering": 0, "examples": 2, "generalist_correct": 0, "change_in_correct": 2,
         "relative_gain": total[0]["relative_gain"]},
        {"specialists_covering": 2, "examples": 4, "generalist_correct": 4, "change_in_correct": -2,
         "relative_gain": -0.5},
    ]
    assert np.isnan(total[0]["relative_gain"])


def test_the_streamed_comparison_equals_the_whole_one_in_any_batches():
    rng = np.random.default_rng(0)
    n, c = 300, 30
    groups = [list(range(0, 10)), list(range(8, 20)), [25, 3, 21]]  # overlapping; classes 20, 22-24, 26-29 uncovered
    labels = rng.integers(0, c, n)
    general = rng.dirichlet(np.ones(c), n).astype(np.float32)
    combined = (0.7 * general + 0.3 * np.eye(c, dtype=np.float32)[labels] * rng.random((n, 1))).astype(np.float32)
    whole = compare_with_generalist(general, combined, labels, groups)
    streamed = StreamedComparison(groups, c)
    for start, stop in [(0, 1), (1, 8), (8, 108), (108, 300)]:
        streamed.update(general[start:stop], combined[start:stop], labels[start:stop])
    assert json.dumps(streamed.result()) == json.dumps(whole)  # NaN gains (no correct generalist) too
    # the conditional accuracy equals the argmax over (N, C) masks, ties included
    tied = np.round(general * 20) / 20  # many equal probabilities
    covered, allowed = covering_classes(membership(groups, c), labels)
    by_mask = conditional_correct(tied[covered], labels[covered], allowed)
    assert by_mask.sum() > 0
    m = StreamedComparison(groups, c).update(tied, tied, labels).result()
    assert m["generalist_conditional_accuracy"] == by_mask.mean() and m["covered_test_examples"] == covered.sum()
    assert whole["covered_test_examples"] == int(np.isin(labels, sum(groups, [])).sum())
    assert [row["specialists_covering"] for row in whole["by_covering"]] == [0, 1, 2]
