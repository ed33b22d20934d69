"""The streamed covariance of the generalist's predicted probabilities, checked, and its normalisations.

Hinton, Vinyals & Dean (2015), section 5.3 cluster the columns of the C x C
covariance of the generalist's probabilities (cluster.py); this file computes
that covariance streamed (memory O(C^2), never O(N * C)), with torch on CPU or
CUDA, and scales it into the points K-means reads (`NORMALIZATIONS`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

__all__ = [
    "CovarianceAccumulator",
    "check_covariance",
    "correlation_from_covariance",
    "rows_per_batch",
    "normalized_covariance",
    "streamed_covariance",
]


BLOCK_ELEMENTS = 1 << 22  # (rows, C) blocks of a (C, C) pass, and the most values of one batch of rows


def rows_per_batch(batch_size: int, n_classes: int) -> int:
    """`batch_size` rows, fewer when C is large: a batch's (B, C) temporaries stay within
    BLOCK_ELEMENTS each (at least 256 rows, so the product stays a large GEMM)."""
    return min(batch_size, max(256, BLOCK_ELEMENTS // n_classes))


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
        mean_b = mean_b.to(torch.float64)
        if self._count == 0:
            self._mean = mean_b
            self._m2 = torch.zeros((self.n_classes, self.n_classes), dtype=torch.float64, device=self.device)
        m2_b = xc.T @ xc  # (C, C) in matmul_dtype: the O(B * C^2) part, one GEMM
        del xc
        for _, rows in _blocks(self.n_classes):  # promoted a block at a time: no (C, C) float64 temporary
            self._m2[rows] += m2_b[rows]
        del m2_b
        if self._count:
            # Chan, Golub & LeVeque: merge (n_a, mean_a, M2_a) with (n_b, mean_b, M2_b).
            n_a, n = self._count, self._count + nb
            delta = mean_b - self._mean
            self._mean += delta * (nb / n)
            self._m2.addr_(delta, delta, alpha=n_a * nb / n)
        self._count += nb
        return self

    def covariance(self, *, release: bool = False) -> np.ndarray:
        """(C, C) float64 population covariance (divide by N), exactly symmetric.

        release=True hands over the accumulator's own matrix, symmetrised and
        scaled in place a block of rows at a time (no second (C, C) matrix); the
        accumulator is empty afterwards.
        """
        self._require_rows()
        # The float product is symmetric only up to rounding: average with the transpose.
        scale = 0.5 / self._count
        if not release:
            return torch.add(self._m2, self._m2.T).mul_(scale).cpu().numpy()  # one (C, C) temporary
        m2, self._m2, self._mean, self._count = self._m2, None, None, 0
        for start, rows in _blocks(self.n_classes):  # rows and columns before `start` are done
            block = torch.add(m2[rows, start:], m2[start:, rows].T).mul_(scale)
            m2[rows, start:] = block
            m2[start:, rows] = block.T
        return m2.cpu().numpy()

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


def correlation_from_covariance(cov, *, overwrite: bool = False) -> np.ndarray:
    """(C, C) float64 correlation matrix from a covariance matrix.

    A class with zero variance (the generalist gives it a constant
    probability) correlates with nothing: its row and column are 0 and its
    diagonal entry is 1. overwrite=True writes it over `cov` when that is a
    C-contiguous float64 array (no second (C, C) matrix).
    """
    cov = check_covariance(cov)
    out = torch.from_numpy(cov) if overwrite else None
    return normalized_covariance(cov, "correlation", torch.device("cpu"), torch.float64, out=out).numpy()


def check_covariance(cov) -> np.ndarray:
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


def _blocks(n: int):
    """(start, slice) over row blocks of an (n, n) matrix, ~BLOCK_ELEMENTS each."""
    step = max(1, BLOCK_ELEMENTS // n)
    for i in range(0, n, step):
        yield i, slice(i, min(n, i + step))


def normalized_covariance(
    cov: np.ndarray, normalize: str, device: torch.device, dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(C, C) points to cluster, on device: row i describes class i, scaled as `normalize` says.

    The covariance is symmetric, so row i is column i: how class i's predicted
    probability co-varies with every class. Scaling is done in float64 block by
    block, so tiny variances neither underflow nor need a float64 (C, C) copy.
    out: the (C, C) tensor to write, which may share `cov`'s memory (each block reads only its own rows).
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
    x = torch.empty((n, n), dtype=dtype, device=device) if out is None else out
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
