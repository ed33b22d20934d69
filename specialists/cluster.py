"""Covariance of the generalist's predictions, and groups of confusable classes.

Hinton, Vinyals & Dean (2015), section 5.3: run the generalist over (unlabeled)
data, take the C x C covariance of its predicted probabilities, and cluster the
columns with K-means. Classes whose predictions rise and fall together are the
ones the generalist confuses; each cluster becomes one specialist.

numpy (or torch) in, groups out:

    acc = CovarianceAccumulator(n_classes=C)
    for probs in batches:                       # (B, C) rows summing to 1
        acc.update(probs)
    cov = acc.covariance()                      # (C, C) float64
    clusterer = ConfusionClusterer(classes_per_cluster=20, seed=0).fit(cov)
    clusterer.groups_                           # [[3, 17, 40], [5, 9], ...]

The covariance is streamed (memory O(C^2), never O(N * C)) and computed with
torch on CPU or CUDA; the clustering runs faiss K-means on CPU or GPU. Both
backends are a parameter, not a separate code path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import faiss
import numpy as np
import torch

from .choices import NORMALIZATIONS

__all__ = [
    "NORMALIZATIONS",
    "InvalidParameterError",
    "CovarianceAccumulator",
    "streamed_covariance",
    "correlation_from_covariance",
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


# ----------------------------------------------------------------------------
# Streamed covariance
# ----------------------------------------------------------------------------


class CovarianceAccumulator:
    """Running mean and covariance of probability rows, fed batch by batch.

    Memory is O(C^2) whatever the number of rows. Each batch is centred on its
    own mean and multiplied in ``matmul_dtype`` (the O(B * C^2) part), then
    merged into float64 running sums with Chan, Golub & LeVeque's parallel
    update (O(C^2) per batch). Centring before the product removes the
    cancellation that ruins ``E[pp^T] - E[p]E[p]^T`` in float32 (a class
    predicted near-certainly can get a negative variance), so the float32
    product runs at the speed of the float32 matmul floor and still matches
    float64 ``np.cov`` within 1e-5 relative, as does the mean (the tests'
    bounds). ``matmul_dtype="float64"`` is slower on CPU. Batches sorted by
    class (very different means) are fine: the merge is exact.

    On CUDA everything stays on the GPU: the float32 product uses TF32 if
    ``torch.backends.cuda.matmul.allow_tf32`` is set (this class does not
    touch that global; the tests then allow 1e-4 relative), and the float64
    running sums are memory-bound adds, cheap next to the product.

    Parameters
    ----------
    n_classes : C, the width of every batch.
    device : torch device for the sums ("cpu", "cuda", "cuda:1"); None = the
        device of the first torch batch (CPU for numpy batches).
    matmul_dtype : "float32" or "float64", dtype of the per-batch product.
    sum_tol : rows whose sum differs from 1 by more than this are rejected.
    validate : check every batch (finite, >= 0, rows sum to 1 within
        ``sum_tol``). Two passes over the batch, negligible next to the product.

    The covariance convention is the population one, ``np.cov(P, rowvar=False,
    bias=True)``: divide by N.
    """

    def __init__(
        self,
        n_classes: int,
        device: str | torch.device | None = None,
        *,
        matmul_dtype: str = "float32",
        sum_tol: float = 1e-3,
        validate: bool = True,
    ):
        if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
            raise ValueError(f"n_classes={n_classes!r} must be a positive integer")
        if matmul_dtype not in ("float32", "float64"):
            raise ValueError(f"matmul_dtype={matmul_dtype!r} must be 'float32' or 'float64'")
        if not sum_tol > 0:
            raise ValueError(f"sum_tol={sum_tol!r} must be > 0")
        self.n_classes = int(n_classes)
        self.device = None if device is None else torch.device(device)
        self.matmul_dtype = getattr(torch, matmul_dtype)
        self.sum_tol = float(sum_tol)
        self.validate = validate
        self._count = 0
        self._n_batches = 0
        self._mean = None  # (C,) float64 on device
        self._m2 = None  # (C, C) float64 on device: sum of centred outer products

    @property
    def count(self) -> int:
        """Number of rows seen so far."""
        return self._count

    @property
    def mean(self) -> np.ndarray:
        """(C,) float64 mean probability per class."""
        self._require_rows()
        return self._mean.cpu().numpy()

    def update(self, batch) -> "CovarianceAccumulator":
        """Add a (B, C) numpy array or torch tensor of probabilities."""
        index = self._n_batches
        self._n_batches += 1
        if self.device is None:
            self.device = batch.device if isinstance(batch, torch.Tensor) else torch.device("cpu")
        x = torch.as_tensor(batch)
        if x.ndim != 2 or x.shape[1] != self.n_classes:
            raise ValueError(
                f"batch {index} has shape {tuple(x.shape)}, expected (B, {self.n_classes})"
            )
        x = x.to(device=self.device, dtype=self.matmul_dtype)
        nb = x.shape[0]
        if nb == 0:
            return self
        if self.validate:
            self._check_batch(x, index)

        # float32 reductions: float64 ones over the batch cost far more on CPU,
        # and the mean stays within the tests' 1e-5 relative bound.
        mean_b = x.mean(dim=0)  # (C,)
        xc = x - mean_b  # (B, C) centred: no cancellation in the product below
        m2_b = xc.T @ xc  # (C, C) in matmul_dtype: the O(B * C^2) part
        del xc
        mean_b = mean_b.to(torch.float64)
        if self._count == 0:
            self._mean = mean_b
            self._m2 = m2_b.to(torch.float64)
        else:
            # Chan, Golub & LeVeque: merge (n_a, mean_a, M2_a) with (n_b, mean_b, M2_b).
            n_a, n = self._count, self._count + nb
            delta = mean_b - self._mean
            self._mean += delta * (nb / n)
            self._m2 += m2_b  # promotes to float64 in place
            self._m2.addr_(delta, delta, alpha=n_a * nb / n)
        self._count += nb
        return self

    def covariance(self) -> np.ndarray:
        """(C, C) float64 population covariance (divide by N), exactly symmetric."""
        self._require_rows()
        # The float product is symmetric only up to rounding: average with the
        # transpose (one (C, C) temporary).
        cov = torch.add(self._m2, self._m2.T).mul_(0.5 / self._count)
        return cov.cpu().numpy()

    def _require_rows(self):
        if self._count == 0:
            raise ValueError("no rows accumulated yet: call update() with a non-empty batch first")

    def _check_batch(self, x: torch.Tensor, index: int):
        # Fast path: one min/max pass (NaN propagates) and one row-sum pass;
        # locate the offending entry only when something is wrong.
        lo, hi = (float(v) for v in torch.aminmax(x))
        if not (math.isfinite(lo) and math.isfinite(hi) and lo >= 0):
            for mask, what in ((~torch.isfinite(x), "non-finite"), (x < 0, "negative")):
                if bool(mask.any()):
                    r, c = (int(v) for v in torch.nonzero(mask)[0])
                    raise ValueError(
                        f"batch {index}, row {r} (global row {self._count + r}), class {c}: "
                        f"{what} probability {float(x[r, c])}"
                    )
        off = (x.sum(dim=1) - 1.0).abs()  # (B,)
        r = int(torch.argmax(off))
        if float(off[r]) > self.sum_tol:
            total = float(x[r].sum(dtype=torch.float64))
            raise ValueError(
                f"batch {index}, row {r} (global row {self._count + r}): probabilities sum to "
                f"{total:.6g}, not 1 (tolerance {self.sum_tol:g})"
            )


def streamed_covariance(
    batches: Iterable, n_classes: int, device: str | torch.device | None = None, **kwargs
) -> tuple[np.ndarray, np.ndarray, int]:
    """Covariance of probability rows streamed as (B, C) batches.

    Returns ``(cov, mean, count)``: (C, C) float64 population covariance, (C,)
    float64 mean, number of rows. ``kwargs`` go to ``CovarianceAccumulator``.
    """
    acc = CovarianceAccumulator(n_classes, device, **kwargs)
    for batch in batches:
        acc.update(batch)
    return acc.covariance(), acc.mean, acc.count


def correlation_from_covariance(cov) -> np.ndarray:
    """(C, C) float64 correlation matrix from a covariance matrix.

    A class with zero variance (the generalist gives it a constant
    probability) correlates with nothing: its row and column are 0 and its
    diagonal entry is 1.
    """
    return _features(_check_covariance(cov), "correlation", torch.device("cpu"), torch.float64).numpy()


def _check_covariance(cov) -> np.ndarray:
    """cov as a (C, C) float64 array, or a ValueError that shows what is wrong."""
    if isinstance(cov, torch.Tensor):
        cov = cov.detach().cpu().numpy()
    cov = np.ascontiguousarray(cov, dtype=np.float64)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"covariance must be a square (C, C) matrix, got shape {cov.shape}")
    if cov.shape[0] < 1:
        raise ValueError("covariance is empty (C=0)")
    t = torch.from_numpy(cov)  # shares memory; torch scans with all threads
    lo, hi = (float(v) for v in torch.aminmax(t))  # NaN propagates
    if not (math.isfinite(lo) and math.isfinite(hi)):
        i, j = np.argwhere(~np.isfinite(cov))[0]
        raise ValueError(f"covariance has a non-finite entry {cov[i, j]} at ({i}, {j})")
    tol = 1e-6 * max(abs(lo), abs(hi)) + 1e-12
    for i, rows in _blocks(cov.shape[0]):
        asym = (t[rows] - t[:, rows].T).abs_()  # (b, C), no (C, C) temporary
        r, j = divmod(int(torch.argmax(asym)), cov.shape[0])
        if float(asym[r, j]) > tol:
            r += i
            raise ValueError(
                f"covariance is not symmetric: cov[{r}, {j}]={cov[r, j]:.6g} but cov[{j}, {r}]={cov[j, r]:.6g}"
            )
    return cov


def _blocks(n: int, elements: int = 2**22):
    """(start, slice) over row blocks of an (n, n) matrix, ~``elements`` each."""
    step = max(1, elements // n)
    for i in range(0, n, step):
        yield i, slice(i, min(n, i + step))


# ----------------------------------------------------------------------------
# Clustering
# ----------------------------------------------------------------------------


def _features(
    cov: np.ndarray, normalize: str, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(C, C) points to cluster, on device: row i describes class i.

    The covariance is symmetric, so row i is column i: how class i's predicted
    probability co-varies with every class. Scaling is done in float64 block by
    block, so tiny variances neither underflow nor need a float64 (C, C) copy.
    """
    t = torch.from_numpy(cov)  # (C, C) float64, shared
    n = cov.shape[0]
    row_scale = col_scale = None
    if normalize == "correlation":
        sd = torch.from_numpy(np.sqrt(np.clip(np.diag(cov), 0.0, None)))
        row_scale = col_scale = torch.where(sd > 0, 1.0 / sd, 0.0)
    elif normalize == "l2":  # unit-length columns, compared by angle
        norms = torch.linalg.vector_norm(t, dim=1)
        row_scale = torch.where(norms > 0, 1.0 / norms, 0.0)
    x = torch.empty((n, n), dtype=dtype, device=device)
    for _, rows in _blocks(n):
        block = t[rows]
        if row_scale is not None:
            block = block * row_scale[rows, None]
        if col_scale is not None:
            block = block * col_scale[None, :]
        x[rows] = block.to(device=device, dtype=dtype)
    if normalize == "correlation":
        x.clamp_(-1.0, 1.0).fill_diagonal_(1.0)
    elif normalize == "l2":
        # A class with zero variance co-varies with nothing: only with itself.
        dead = torch.nonzero(norms == 0).flatten().to(device)
        x[dead, dead] = 1.0
    return x


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

    def __init__(
        self,
        n_clusters: int | None = None,
        *,
        classes_per_cluster: int | None = None,
        max_cluster_size: int | None = None,
        min_cluster_size: int = 2,
        overlap: int = 1,
        overlap_ratio: float = 1.5,
        normalize: str = "l2",
        n_components: int | None = None,
        niter: int = 25,
        nredo: int = 5,
        seed: int = 0,
        use_gpu: bool | str = "auto",
    ):
        self.n_clusters = n_clusters
        self.classes_per_cluster = classes_per_cluster
        self.max_cluster_size = max_cluster_size
        self.min_cluster_size = min_cluster_size
        self.overlap = overlap
        self.overlap_ratio = overlap_ratio
        self.normalize = normalize
        self.n_components = n_components
        self.niter = niter
        self.nredo = nredo
        self.seed = seed
        self.use_gpu = use_gpu

    _PARAMS = (
        "n_clusters", "classes_per_cluster", "max_cluster_size", "min_cluster_size", "overlap",
        "overlap_ratio", "normalize", "n_components", "niter", "nredo", "seed", "use_gpu",
    )

    def get_params(self, deep: bool = True) -> dict:
        """The settings, as given to ``__init__`` (``deep`` is accepted for
        scikit-learn; no setting is itself an estimator)."""
        return {name: getattr(self, name) for name in self._PARAMS}

    def set_params(self, **params) -> "ConfusionClusterer":
        """Change settings (checked by the next ``fit``, as in scikit-learn); returns self."""
        unknown = sorted(set(params) - set(self._PARAMS))
        if unknown:
            raise InvalidParameterError(f"ConfusionClusterer has no setting {', '.join(map(repr, unknown))}; "
                             f"known: {list(self._PARAMS)}")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"ConfusionClusterer({args})"

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
        cov = _check_covariance(cov)
        n_classes = cov.shape[0]
        k = self._resolve_k(n_classes)
        gpu = self._gpu()  # faiss on GPU
        # The torch part (features, projection) uses CUDA whenever allowed and
        # present, even with a CPU-only faiss build.
        device = torch.device("cuda" if self.use_gpu is not False and torch.cuda.is_available() else "cpu")
        x = _features(cov, self.normalize, device)  # (C, C) float32, row i = class i
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
