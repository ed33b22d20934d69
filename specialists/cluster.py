"""Groups of confusable classes: faiss K-means on the columns of the generalist's prediction covariance.

Hinton, Vinyals & Dean (2015), section 5.3: run the generalist over (unlabeled)
data, take the C x C covariance of its predicted probabilities (covariance.py),
and cluster the columns with K-means. Classes whose predictions rise and fall
together are the ones the generalist confuses; each cluster becomes one
specialist.

numpy (or torch) in, groups out:

    acc = CovarianceAccumulator(n_classes=C)    # covariance.py
    for probs in batches:                       # (B, C) rows summing to 1
        acc.update(probs)
    cov = acc.covariance()                      # (C, C) float64
    clusterer = ConfusionClusterer(classes_per_cluster=20, seed=0).fit(cov)
    clusterer.groups_                           # [[3, 17, 40], [5, 9], ...]

The clustering runs faiss K-means on CPU or GPU, and its torch features and
projection on CPU or CUDA: the backend is a parameter, not a separate code path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, fields

import faiss
import numpy as np
import torch

from .choices import NORMALIZATIONS
from .covariance import check_covariance, normalized_covariance

__all__ = [
    "InvalidParameterError",
    "ConfusionClusterer",
    "clusters_to_json",
]


class InvalidParameterError(ValueError):
    """A ConfusionClusterer setting is invalid, alone or against the number of classes C.

    Raised by ``fit``; the message names the setting and its value
    (``n_clusters=90 must be <= n_classes=77``), so a caller that took the
    settings from a config can prefix the section (``cluster.``). Problems with
    the covariance itself stay plain ValueErrors.
    """


def _project(a: torch.Tensor, rank: int, *, seed: int, symmetric: bool, n_iter: int = 4) -> torch.Tensor:
    """(C, rank) coordinates of the rows of a (C, C) in their top-``rank``
    right singular subspace, a @ V_r: the rank-``rank`` view that best keeps
    the distances between rows.

    Randomised subspace iteration (Halko, Martinsson & Tropp, 2011) with
    ``n_iter`` power steps, O(C^2 * rank) instead of the O(C^3) of an exact
    SVD. For a symmetric a (covariance, correlation) the right singular
    vectors are eigenvectors, and a Rayleigh-Ritz step needs n_iter + 2
    products with a instead of 2 * n_iter + 3.
    """
    n = a.shape[1]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    width = min(n, rank + 10)  # oversampling
    q = torch.randn(n, width, generator=gen, dtype=a.dtype).to(a.device)  # (C, width)
    q, _ = torch.linalg.qr(a @ q)
    if symmetric:
        for _ in range(n_iter):
            q, _ = torch.linalg.qr(a @ q)
        aq = a @ q  # (C, width)
        t = q.T @ aq  # (width, width) = Q^T A Q
        evals, evecs = torch.linalg.eigh(0.5 * (t + t.T))
        top = torch.argsort(evals.abs(), descending=True)[:rank]
        return aq @ evecs[:, top]  # A U_r with U = Q W
    for _ in range(n_iter):
        q, _ = torch.linalg.qr(a.T @ q)
        q, _ = torch.linalg.qr(a @ q)
    _, _, vt = torch.linalg.svd(q.T @ a, full_matrices=False)  # a ~= q @ (q^T a)
    return a @ vt[:rank].T


def _sq_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(C, k) squared Euclidean distances between rows of x and centroids."""
    x2 = np.einsum("ij,ij->i", x, x, dtype=np.float64)[:, None]
    c2 = np.einsum("ij,ij->i", centroids, centroids, dtype=np.float64)[None, :]
    d = x2 + c2 - 2.0 * (x @ centroids.T).astype(np.float64)
    return np.clip(d, 0.0, None)


@dataclass(eq=False)  # eq=False: compared and hashed by identity, as an estimator
class ConfusionClusterer:
    """Groups of classes that the generalist confuses, one group per specialist.

    K-means (faiss) on the columns of the generalist's prediction covariance,
    scikit-learn style: ``__init__`` stores settings, ``fit(cov)`` checks them
    (InvalidParameterError) and learns, learned state ends in ``_``.

    Parameters
    ----------
    n_clusters : k, the number of K-means centroids. Give this or
        ``classes_per_cluster``; with neither, k = round(sqrt(C)), which makes
        the number of specialists about equal to their size.
    classes_per_cluster : target group size; k = ceil(C / classes_per_cluster).
    max_cluster_size : no group gets more classes than this (overlap
        included); the classes cheapest to move go to their nearest centroid
        with room. Requires k * max_cluster_size >= C.
    min_cluster_size : smaller groups are dropped and their classes are
        *uncovered* (left to the generalist). Default 2: a specialist for one
        class has nothing to tell apart. 1 keeps singletons.
    overlap : m >= 1. A class may belong to up to m groups: its primary group
        plus up to m - 1 others whose centroid lies within ``overlap_ratio``
        times its distance to its nearest centroid. m = 1: disjoint groups.
    overlap_ratio : >= 1, see ``overlap``.
    normalize : how each class's covariance column becomes a point (one of
        ``NORMALIZATIONS``). "l2" (default): scaled to unit length, spherical
        K-means (cosine), the best on trained generalists. "correlation":
        the column of D^-1/2 cov D^-1/2, Euclidean K-means. "covariance": the
        raw column, which collapses, since every rare class has a near-zero
        column. The measurements are in the README (Clusters, Performance).
    n_components : r. K-means runs on the points projected onto their top r
        singular directions (randomised SVD); None = k, an int >= C = no
        projection. Groups of confusable classes span nearly orthogonal
        directions, where K-means in all C dimensions stalls with two
        centroids in one group and none in another; the top-k subspace is the
        continuous relaxation of the K-means partition (Ding & He, 2004).
    niter, nredo : K-means iterations per run and number of runs from
        k-means++ seeds (faiss keeps the run with the best objective).
    seed : seed of the projection and of K-means (k-means++ initialisation).
        Same seed and covariance -> same groups.
    use_gpu : True, False or "auto". faiss K-means runs on GPU when faiss
        sees one (True without one is an error); the torch features and
        projection run on CUDA unless use_gpu is False.

    Learned attributes
    ------------------
    groups_ : G <= k sorted lists of class indices, one per specialist,
        ordered by their smallest primary member.
    centroids_ : (G, r) float32, aligned with groups_, in the space K-means
        ran in.
    assignment_ : (C,) int64 index into groups_ of each class's primary group,
        -1 for uncovered classes.
    labels_ : assignment_, under scikit-learn's name (what ``fit_predict``
        returns): a class in several groups through ``overlap`` gets its
        primary one (``groups_`` lists them all); uncovered classes get -1,
        scikit-learn's label for points in no cluster (as DBSCAN's noise).
    distances_ : (C,) float64 distance of each class to its primary group's
        centroid; NaN for uncovered classes.
    member_distances_ : G float64 arrays aligned with groups_: each
        member's distance to that group's centroid.
    uncovered_ : sorted list of classes in no group.
    n_classes_ : C.   n_clusters_ : the k K-means ran with.
    inertia_ : final K-means objective reported by faiss.
    """

    # The settings, stored as given (scikit-learn's rule); the fields are the one list of them.
    n_clusters: int | None = None
    _: KW_ONLY
    classes_per_cluster: int | None = None
    max_cluster_size: int | None = None
    min_cluster_size: int = 2
    overlap: int = 1
    overlap_ratio: float = 1.5
    normalize: str = "l2"
    n_components: int | None = None
    niter: int = 25
    nredo: int = 5
    seed: int = 0
    use_gpu: bool | str = "auto"

    def get_params(self, deep: bool = True) -> dict:
        """The settings, as given to ``__init__`` (``deep`` is accepted for
        scikit-learn; no setting is itself an estimator)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def set_params(self, **params) -> "ConfusionClusterer":
        """Change settings (checked by the next ``fit``, as in scikit-learn); returns self."""
        known = [f.name for f in fields(self)]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise InvalidParameterError(f"ConfusionClusterer has no setting {', '.join(map(repr, unknown))}; "
                             f"known: {known}")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    # -- validation ---------------------------------------------------------

    def _resolve_k(self, n_classes: int) -> int:
        """Validate the settings, alone and against C, and return k; raises InvalidParameterError."""

        def positive_int(name, value, low=1):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise InvalidParameterError(f"{name}={value!r} must be an integer >= {low}")

        if self.n_clusters is not None and self.classes_per_cluster is not None:
            raise InvalidParameterError(
                f"give n_clusters={self.n_clusters!r} or classes_per_cluster="
                f"{self.classes_per_cluster!r}, not both"
            )
        if self.n_clusters is not None:
            positive_int("n_clusters", self.n_clusters)
            k = int(self.n_clusters)
            if k > n_classes:
                raise InvalidParameterError(f"n_clusters={k} must be <= n_classes={n_classes}")
        elif self.classes_per_cluster is not None:
            positive_int("classes_per_cluster", self.classes_per_cluster)
            k = math.ceil(n_classes / self.classes_per_cluster)
        else:
            k = max(1, round(math.sqrt(n_classes)))
        positive_int("min_cluster_size", self.min_cluster_size)
        if self.max_cluster_size is not None:
            positive_int("max_cluster_size", self.max_cluster_size)
            if self.max_cluster_size < self.min_cluster_size:
                raise InvalidParameterError(
                    f"max_cluster_size={self.max_cluster_size} must be >= "
                    f"min_cluster_size={self.min_cluster_size}"
                )
            if k * self.max_cluster_size < n_classes:
                raise InvalidParameterError(
                    f"max_cluster_size={self.max_cluster_size} * n_clusters={k} < "
                    f"n_classes={n_classes}: not enough room for every class"
                )
        positive_int("overlap", self.overlap)
        if not (isinstance(self.overlap_ratio, (int, float)) and self.overlap_ratio >= 1):
            raise InvalidParameterError(f"overlap_ratio={self.overlap_ratio!r} must be a number >= 1")
        if self.normalize not in NORMALIZATIONS:
            raise InvalidParameterError(f"normalize={self.normalize!r} must be one of {NORMALIZATIONS}")
        if self.n_components is not None:
            positive_int("n_components", self.n_components)
        positive_int("niter", self.niter)
        positive_int("nredo", self.nredo)
        positive_int("seed", self.seed, low=0)
        if self.use_gpu not in (True, False, "auto"):
            raise InvalidParameterError(f"use_gpu={self.use_gpu!r} must be True, False or 'auto'")
        return k

    def _gpu(self) -> bool:
        n_gpus = faiss.get_num_gpus()
        if self.use_gpu is True and n_gpus == 0:
            raise InvalidParameterError("use_gpu=True but faiss sees 0 GPUs (is faiss-gpu installed?)")
        return bool(self.use_gpu is True or (self.use_gpu == "auto" and n_gpus > 0))

    # -- fit ----------------------------------------------------------------

    def fit(self, cov) -> "ConfusionClusterer":
        """Cluster the classes of a (C, C) prediction covariance."""
        cov = check_covariance(cov)
        n_classes = cov.shape[0]
        k = self._resolve_k(n_classes)
        gpu = self._gpu()  # faiss on GPU
        # The torch part (features, projection) uses CUDA whenever allowed and
        # present, even with a CPU-only faiss build.
        device = torch.device("cuda" if self.use_gpu is not False and torch.cuda.is_available() else "cpu")
        x = normalized_covariance(cov, self.normalize, device)  # (C, C) float32, row i = class i
        del cov
        n_components = min(n_classes, k if self.n_components is None else int(self.n_components))
        if n_components < n_classes:
            x = _project(x, n_components, seed=int(self.seed), symmetric=self.normalize != "l2")  # (C, r)
        if self.normalize == "l2":
            x = x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        x = np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32)

        kmeans = faiss.Kmeans(
            x.shape[1],
            k,
            niter=self.niter,
            nredo=self.nredo,
            seed=int(self.seed),
            spherical=self.normalize == "l2",
            gpu=gpu,
            init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
            # C points is all there is: do not ask for 39 per centroid, do not subsample.
            min_points_per_centroid=1,
            max_points_per_centroid=max(n_classes, 256),
            verbose=False,
        )
        self.inertia_ = float(kmeans.train(x))
        centroids = kmeans.centroids  # (k, r) float32
        dist = np.sqrt(_sq_distances(x, centroids))  # (C, k)

        primary = np.argmin(dist, axis=1)  # (C,)
        if self.max_cluster_size is not None:
            primary = _enforce_capacity(primary, dist, self.max_cluster_size)
        sizes = np.bincount(primary, minlength=k)
        kept = np.flatnonzero(sizes >= self.min_cluster_size)  # k-means ids that become groups
        members = {int(c): set(np.flatnonzero(primary == c).tolist()) for c in kept}
        if self.overlap > 1 and len(kept) > 0:
            _add_overlap(members, dist, primary, kept, self.overlap, self.overlap_ratio, self.max_cluster_size)

        # Canonical order: by smallest primary member, so equal partitions compare equal.
        kept = sorted(kept, key=lambda c: int(np.flatnonzero(primary == c)[0]))
        self.groups_ = [sorted(members[int(c)]) for c in kept]
        self.centroids_ = centroids[kept] if kept else np.zeros((0, x.shape[1]), np.float32)
        self.member_distances_ = [dist[g, c] for g, c in zip(self.groups_, kept)]
        group_of = np.full(k, -1, dtype=np.int64)
        group_of[kept] = np.arange(len(kept))
        self.assignment_ = group_of[primary]
        self.labels_ = self.assignment_  # scikit-learn's name for it (fit_predict returns it)
        self.distances_ = np.where(self.assignment_ >= 0, dist[np.arange(n_classes), primary], np.nan)
        covered = set().union(*map(set, self.groups_)) if self.groups_ else set()
        self.uncovered_ = sorted(set(range(n_classes)) - covered)
        self.n_classes_ = n_classes
        self.n_clusters_ = k
        return self

    def fit_predict(self, cov) -> np.ndarray:
        """``fit(cov)``, then the (C,) ``labels_``."""
        return self.fit(cov).labels_


def _enforce_capacity(primary: np.ndarray, dist: np.ndarray, cap: int) -> np.ndarray:
    """Move classes out of clusters holding more than ``cap``.

    An over-full cluster keeps its ``cap`` classes that would pay most to
    leave; the others go, cheapest move first, to the nearest centroid that
    still has room. primary: (C,) cluster per class, dist: (C, k).
    """
    primary = primary.copy()
    k = dist.shape[1]
    sizes = np.bincount(primary, minlength=k)
    if sizes.max() <= cap:
        return primary
    full = sizes >= cap
    room_dist = np.where(full[None, :], np.inf, dist)  # (C, k) only clusters with room
    evicted = []
    for c in np.flatnonzero(sizes > cap):
        idx = np.flatnonzero(primary == c)
        # cost of leaving = distance to nearest centroid with room - distance to own
        cost = room_dist[idx].min(axis=1) - dist[idx, c]
        order = np.lexsort((idx, -cost))  # most expensive to move first, ties by class index
        evicted.extend(idx[order[cap:]].tolist())
        sizes[c] = cap
    evicted = np.array(sorted(evicted), dtype=np.int64)
    # Cheapest moves first; the nearest open centroid is looked up again as clusters fill.
    cost = room_dist[evicted].min(axis=1) - dist[evicted, primary[evicted]]
    for i in evicted[np.argsort(cost, kind="stable")]:
        open_ = sizes < cap
        c = int(np.argmin(np.where(open_, dist[i], np.inf)))
        primary[i] = c
        sizes[c] += 1
    return primary


def _add_overlap(members, dist, primary, kept, overlap, ratio, cap):
    """Add secondary memberships in place: up to overlap - 1 extra groups per
    class, each within ``ratio`` times the class's nearest-centroid distance,
    closest (smallest ratio) first, never past ``cap``."""
    nearest = dist.min(axis=1)  # (C,)
    cand = dist[:, kept] / np.where(nearest > 0, nearest, np.inf)[:, None]  # (C, len(kept))
    cand[kept[None, :] == primary[:, None]] = np.inf  # not the primary group again
    cls, col = np.nonzero(cand <= ratio)
    order = np.lexsort((col, cls, cand[cls, col]))
    extra = np.zeros(dist.shape[0], dtype=np.int64)
    for i, j in zip(cls[order], col[order]):
        c = int(kept[j])
        if extra[i] >= overlap - 1 or (cap is not None and len(members[c]) >= cap):
            continue
        members[c].add(int(i))
        extra[i] += 1


def clusters_to_json(clusterer: ConfusionClusterer, class_names: Sequence[str] | None = None) -> dict:
    """A fitted clusterer as a JSON-serialisable dict.

    Layout::

        {
          "n_classes": 77,
          "n_groups": 8,
          "settings": {"n_clusters": None, "classes_per_cluster": 10, ..., "n_clusters_used": 8},
          "inertia": 12.3,
          "groups": [
            {"id": 0, "size": 3, "classes": [3, 17, 40], "names": ["a", "b", "c"],
             "distances": [0.21, 0.35, 0.4]},          # each member to this group's centroid
            ...
          ],
          "uncovered": {"classes": [12], "names": ["z"]},
          "assignment": [0, 4, -1, ...]                 # primary group per class, -1 uncovered
        }

    Without ``class_names`` the names are the class indices as strings.
    """
    if not hasattr(clusterer, "groups_"):
        raise ValueError("clusterer is not fitted: call fit(cov) first")
    n = clusterer.n_classes_
    if class_names is None:
        class_names = [str(i) for i in range(n)]
    if len(class_names) != n:
        raise ValueError(f"class_names has {len(class_names)} names for n_classes={n}")
    names = [str(s) for s in class_names]
    settings = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in clusterer.get_params().items()}
    settings["n_clusters_used"] = int(clusterer.n_clusters_)
    return {
        "n_classes": int(n),
        "n_groups": len(clusterer.groups_),
        "settings": settings,
        "inertia": float(clusterer.inertia_),
        "groups": [
            {
                "id": g,
                "size": len(group),
                "classes": [int(c) for c in group],
                "names": [names[c] for c in group],
                "distances": [round(float(d), 6) for d in dists],
            }
            for g, (group, dists) in enumerate(zip(clusterer.groups_, clusterer.member_distances_))
        ],
        "uncovered": {
            "classes": [int(c) for c in clusterer.uncovered_],
            "names": [names[c] for c in clusterer.uncovered_],
        },
        "assignment": [int(a) for a in clusterer.assignment_],
    }
