"""The combination against the generalist on labelled examples: the paper's Tables 3 and 4.

Pure numpy: probabilities, labels and the specialists' class groups in, the
`ensemble` section of metrics.json out. Table 3's conditional accuracy takes
the argmax over only the classes of the specialists covering an example's
true class; Table 4 splits the examples by how many specialists cover it.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def membership(groups: Sequence[Sequence[int]], n_classes: int) -> np.ndarray:
    """(M, C) bool: member[m, c] is whether specialist m covers class c."""
    member = np.zeros((len(groups), n_classes), dtype=bool)
    for m, classes in enumerate(groups):
        member[m, list(classes)] = True
    return member


def conditional_correct(probs: np.ndarray, labels: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """(N,) whether the argmax of (N, C) `probs` over each row's allowed classes ((N, C) bool) is its label."""
    return np.where(allowed, probs, -np.inf).argmax(1) == labels


def covering_classes(member: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(covered, allowed): (N,) bool whether some specialist covers the row's true class, and
    (N_covered, C) bool the classes of every specialist that covers it, for the covered rows."""
    covering = member[:, labels]  # (M, N)
    covered = covering.any(0)
    allowed = (covering[:, covered].T.astype(np.float32) @ member.astype(np.float32)) > 0
    return covered, allowed


def by_covering(correct: np.ndarray, general_correct: np.ndarray, counts: np.ndarray) -> list[dict]:
    """Table 4: per number k of specialists covering the true class ((N,) `counts`), the examples,
    the generalist's correct ones and the change in correct ones ((N,) bool `correct` of the combination)."""
    rows = []
    for k in range(int(counts.max()) + 1 if len(counts) else 0):
        chosen = counts == k
        if chosen.any():
            base = int(general_correct[chosen].sum())
            delta = int(correct[chosen].sum()) - base
            rows.append({"specialists_covering": k, "examples": int(chosen.sum()), "generalist_correct": base,
                         "change_in_correct": delta, "relative_gain": delta / base if base else float("nan")})
    return rows


def sum_by_covering(tables: Iterable[Sequence[dict]]) -> list[dict]:
    """Table 4 rows of several runs (e.g. seeds) added up per number of covering specialists."""
    sums: dict[int, list[int]] = {}
    for rows in tables:
        for row in rows:
            examples, base, change = sums.get(row["specialists_covering"], (0, 0, 0))
            sums[row["specialists_covering"]] = [examples + row["examples"], base + row["generalist_correct"],
                                                 change + row["change_in_correct"]]
    return [{"specialists_covering": k, "examples": n, "generalist_correct": b, "change_in_correct": d,
             "relative_gain": d / b if b else float("nan")} for k, (n, b, d) in sorted(sums.items())]


def compare_with_generalist(general_probs: np.ndarray, combined_probs: np.ndarray, labels: np.ndarray,
                            groups: Sequence[Sequence[int]]) -> dict:
    """Tables 3-4 on one labelled split: (N, C) probabilities of the generalist and of the
    combination, (N,) labels, the specialists' class groups. Keys as in metrics.json's `ensemble`."""
    return StreamedComparison(groups, general_probs.shape[1]).update(general_probs, combined_probs, labels).result()


class StreamedComparison:
    """`compare_with_generalist` fed batch by batch, so no (N, C) array is ever whole.

    `update` takes each batch's (B, C) probabilities of the generalist and of
    the combination and its (B,) labels, in any split into batches; memory is
    one batch plus a few (N,) flags. `result` gives the same dict.
    """

    def __init__(self, groups: Sequence[Sequence[int]], n_classes: int):
        self.member = membership(groups, n_classes)  # (M, C)
        self._classes = [np.sort(np.asarray(list(g), dtype=np.int64)) for g in groups]  # ascending, as argmax ranks
        self._flags: dict[str, list[np.ndarray]] = {
            name: [] for name in ("general_correct", "correct", "cond_general", "cond_combined", "counts")}

    def _conditional_correct(self, probs: np.ndarray, labels: np.ndarray, covering: np.ndarray) -> np.ndarray:
        """`conditional_correct` on the covered rows, from each covering specialist's (r, k) columns in turn
        instead of (B, C) masks: the highest probability over the union of their classes, a tie going to
        the lowest class id, as argmax over a mask. covering: (M, B) bool."""
        best = np.full(len(labels), -np.inf)
        best_class = np.full(len(labels), np.iinfo(np.int64).max)
        for m in np.flatnonzero(covering.any(1)):
            rows, classes = np.flatnonzero(covering[m]), self._classes[m]
            values = probs[np.ix_(rows, classes)]  # (r, k)
            top = values.argmax(1)
            value, label = values[np.arange(len(rows)), top], classes[top]
            better = (value > best[rows]) | ((value == best[rows]) & (label < best_class[rows]))
            best[rows[better]], best_class[rows[better]] = value[better], label[better]
        covered = covering.any(0)
        return best_class[covered] == labels[covered]

    def update(self, general_probs: np.ndarray, combined_probs: np.ndarray, labels: np.ndarray) -> "StreamedComparison":
        covering = self.member[:, labels]  # (M, B)
        flags = self._flags
        flags["general_correct"].append(general_probs.argmax(1) == labels)
        flags["correct"].append(combined_probs.argmax(1) == labels)
        flags["cond_general"].append(self._conditional_correct(general_probs, labels, covering))
        flags["cond_combined"].append(self._conditional_correct(combined_probs, labels, covering))
        flags["counts"].append(covering.sum(0))
        return self

    def result(self) -> dict:
        flags = {name: np.concatenate(parts) if parts else np.zeros(0, dtype=bool)
                 for name, parts in self._flags.items()}
        general_correct, correct = flags["general_correct"], flags["correct"]
        cond_general, cond_combined = flags["cond_general"], flags["cond_combined"]  # (N_covered,)
        covered = len(cond_general)
        general_errors, errors = int((~general_correct).sum()), int((~correct).sum())
        return {
            "test_accuracy": float(correct.mean()),
            "generalist_test_accuracy": float(general_correct.mean()),
            "test_errors": errors,
            "generalist_test_errors": general_errors,
            "error_reduction": (general_errors - errors) / general_errors if general_errors else 0.0,
            "relative_accuracy_gain": float(correct.mean() / general_correct.mean() - 1),
            "conditional_accuracy": float(cond_combined.mean()) if covered else float("nan"),
            "generalist_conditional_accuracy": float(cond_general.mean()) if covered else float("nan"),
            "covered_test_examples": covered,
            "by_covering": by_covering(correct, general_correct, flags["counts"]),
        }


# ---------------------------------------------------------------------------
# calibration of a full model on labelled validation examples

TEMPERATURES = np.geomspace(0.25, 4.0, 41)  # the grid fit_temperature searches


def temper(probs: np.ndarray, temperature: float) -> np.ndarray:
    """(N, C) softmax(log p / T): a model's probabilities at temperature T from its (N, C) T=1 ones."""
    log_p = np.log(np.clip(probs, np.finfo(np.float64).tiny, None)) / temperature
    log_p -= log_p.max(1, keepdims=True)
    out = np.exp(log_p)
    return out / out.sum(1, keepdims=True)


def fit_temperature(probs: np.ndarray, labels: np.ndarray, temperatures: Sequence[float] = TEMPERATURES) -> float:
    """The T of `temperatures` whose tempered (N, C) `probs` give (N,) `labels` the least mean negative
    log-likelihood (temperature scaling, fitted on a validation split)."""
    probs = np.asarray(probs, dtype=np.float64)
    rows = np.arange(len(labels))
    nll = [-np.log(np.clip(temper(probs, t)[rows, labels], np.finfo(np.float64).tiny, None)).mean()
           for t in temperatures]
    return float(temperatures[int(np.argmin(nll))])
