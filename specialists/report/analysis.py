"""Numbers about a clustering: the one home of the cluster analysis.

Input checks, the heatmap's class order and pixels, how tight each cluster is
(within vs between), and which of the generalist's errors fall inside one cluster.
numpy only (scipy, which scikit-learn brings, for the leaf order inside a cluster);
the matrix may be any real (C, C) array and is read in row chunks,
so a 15,000-class float32 matrix never needs a float64 copy.

Groups are lists of class indices, one per cluster. `check_groups` is the one rule
for them: every group non-empty, integer indices in [0, C), no class twice in one
group; a class may sit in several groups (overlapping clusters).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

CHUNK_ELEMENTS = 4_000_000  # matrix entries read per step (~32 MB as float64)


# --------------------------------------------------------------------------- checks


def check_matrix(matrix: np.ndarray) -> np.ndarray:
    """The matrix as an array, or ValueError unless it is square and real."""
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be square (C, C), got shape {matrix.shape}")
    if not np.issubdtype(matrix.dtype, np.number) or np.iscomplexobj(matrix):
        raise ValueError(f"matrix must be real numbers, got dtype {matrix.dtype}")
    return matrix


def check_finite(matrix: np.ndarray) -> None:
    """ValueError naming the first non-finite entry."""
    rows_per_step = max(1, CHUNK_ELEMENTS // max(1, matrix.shape[1]))
    for a in range(0, matrix.shape[0], rows_per_step):  # chunked: no (C, C) bool array
        bad = ~np.isfinite(matrix[a : a + rows_per_step])
        if bad.any():
            i, j = np.argwhere(bad)[0]
            i += a
            raise ValueError(f"matrix has a non-finite entry: matrix[{i}, {j}] = {matrix[i, j]}")


def check_groups(groups: Sequence[Sequence[int]], n_classes: int) -> list[list[int]]:
    """The groups as lists of Python ints, or ValueError naming the bad group.

    An empty group or a class listed twice in one group is an error (a cluster is a
    set of at least one class); one class in several groups is allowed.
    """
    out = []
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
        out.append(arr.astype(np.int64).tolist())
    return out


def check_error_pairs(error_pairs: np.ndarray, n_classes: int | None) -> np.ndarray:
    """(E, 2) int64 (true, predicted) pairs, or ValueError naming the bad row.

    n_classes None: any index >= 0. A pair with true == predicted is not an error.
    """
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


def resolve_uncovered(
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


# --------------------------------------------------------------------------- the matrix


def cluster_order(groups: Sequence[Sequence[int]], n_classes: int, matrix: np.ndarray | None = None) -> np.ndarray:
    """(C,) permutation: the classes of groups[0], then groups[1], ..., then every class
    in no group (ascending). A class in several groups is placed with the first.
    `matrix[np.ix_(order, order)]` shows the groups as diagonal blocks.

    Inside a group the classes keep the order listed, or, given the (C, C) matrix, the
    leaf order of an average-linkage hierarchical clustering of their rows (cosine
    distance), so that sub-blocks of similar classes show inside each block.
    """
    check_groups(groups, n_classes)
    if matrix is not None:
        matrix = check_matrix(matrix)
        if matrix.shape[0] != n_classes:
            raise ValueError(f"matrix is {matrix.shape[0]}x{matrix.shape[0]} for n_classes={n_classes}")
    placed = np.zeros(n_classes, dtype=bool)
    order = []
    for g in groups:
        new = [int(c) for c in g if not placed[c]]
        placed[new] = True
        order.extend(new if matrix is None else similarity_order(matrix, new))
    order.extend(np.flatnonzero(~placed).tolist())
    return np.asarray(order, dtype=np.int64)


OPTIMAL_LEAF_ORDER_MAX = 256  # scipy's optimal leaf ordering is cubic in the classes of a group


def similarity_order(matrix: np.ndarray, classes: Sequence[int]) -> list[int]:
    """`classes` in the leaf order of an average-linkage clustering of their rows of the
    (C, C) matrix, by cosine distance (optimal leaf ordering up to OPTIMAL_LEAF_ORDER_MAX
    classes): neighbours in the order are similar classes. An all-zero row is at distance 1
    from every other row."""
    classes = [int(c) for c in classes]
    if len(classes) < 3:
        return classes
    from scipy.cluster.hierarchy import leaves_list, linkage  # scipy comes with scikit-learn

    rows = np.asarray(matrix[classes], dtype=np.float64)  # (k, C)
    norms = np.linalg.norm(rows, axis=1)
    unit = rows / np.where(norms > 0, norms, 1.0)[:, None]
    dist = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)  # (k, k) cosine distance
    dist[(norms == 0)[:, None] | (norms == 0)[None, :]] = 1.0
    np.fill_diagonal(dist, 0.0)
    condensed = dist[np.triu_indices(len(classes), 1)]
    tree = linkage(condensed, "average", optimal_ordering=len(classes) <= OPTIMAL_LEAF_ORDER_MAX)
    return [classes[i] for i in leaves_list(tree)]


def within_between(matrix: np.ndarray, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """(G, 2) float64: per group, [mean of matrix[i, j] over i != j both in the group,
    mean of matrix[i, j] over i in the group and j outside it]. A good group has
    within >> between.

    The diagonal (a class with itself) is left out of the within mean: it says nothing
    about confusability. NaN where a mean has no pairs (a singleton group's within,
    a group holding every class's between).
    """
    matrix = check_matrix(matrix)
    n = matrix.shape[0]
    check_groups(groups, n)
    out = np.full((len(groups), 2), np.nan)
    rows_per_step = max(1, CHUNK_ELEMENTS // n)
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
    matrix = check_matrix(matrix)
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
    # a whole number of f-row blocks per step, about CHUNK_ELEMENTS entries
    rows_per_step = min(n, f * max(1, CHUNK_ELEMENTS // (n * f)))
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


# --------------------------------------------------------------------------- errors


def errors_inside(
    pairs: np.ndarray, groups: Sequence[Sequence[int]], n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(E,) bool: pair inside some group; (G,) int: pairs inside each group.

    pairs: (E, 2) checked (true, predicted) indices (check_error_pairs); groups checked.
    """
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


def random_share(groups: Sequence[Sequence[int]], n_classes: int) -> float:
    """The share of errors inside one cluster expected when the classes are dealt into
    clusters of these sizes at random (a uniformly random relabelling of the C classes).

    Exact, and the same for any errors: a random relabelling turns each error's
    (true, predicted) pair into a uniformly random ordered pair of distinct classes, so the
    expectation is the share of the C (C - 1) ordered pairs that some group holds together
    (a pair in two overlapping groups counts once). NaN for C < 2.
    """
    groups = check_groups(groups, n_classes)
    if n_classes < 2:
        return math.nan
    groups_of: list[list[int]] = [[] for _ in range(n_classes)]
    for gi, g in enumerate(groups):
        for c in g:
            groups_of[c].append(gi)
    if all(len(gs) <= 1 for gs in groups_of):  # disjoint: sum of s (s - 1)
        together = sum(len(g) * (len(g) - 1) for g in groups)
    else:
        together = 0
        for gs in groups_of:
            if gs:
                together += len(set().union(*(groups[gi] for gi in gs))) - 1
    return together / (n_classes * (n_classes - 1))


def error_share_inside(
    error_pairs: np.ndarray, groups: Sequence[Sequence[int]]
) -> tuple[int, int, float]:
    """(inside_count, total, share) of the generalist's errors whose (true, predicted)
    pair lies inside one cluster: the errors a specialist can fix.

    error_pairs: (E, 2) class indices, one row per misclassified validation example.
    share = inside_count / total, NaN when there are no errors.
    """
    pairs = check_error_pairs(error_pairs, None)
    n = int(max([pairs.max(initial=-1)] + [max(g, default=-1) for g in groups])) + 1
    groups = check_groups(groups, n)
    inside, _ = errors_inside(pairs, groups, n)
    total = len(pairs)
    count = int(inside.sum())
    return count, total, (count / total if total else math.nan)


def confused_pairs(
    pairs: np.ndarray, groups: Sequence[Sequence[int]], n_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct (true, predicted) error pairs, most frequent first (ties in
    ascending pair order): (K, 2) pairs, (K,) counts, (K,) bool whether one group
    holds both classes. pairs: checked, non-empty (E, 2)."""
    uniq, counts = np.unique(pairs, axis=0, return_counts=True)
    same, _ = errors_inside(uniq, groups, n_classes)
    order = np.argsort(-counts, kind="stable")
    return uniq[order], counts[order], same[order]
