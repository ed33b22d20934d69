"""Confusability signals: the (C, C) class-similarity matrix the clusters are cut from.

`cluster.signal` chooses it (`cluster.temperature` is T):

    probs           covariance of softmax(z) on cluster.split (Hinton, Vinyals & Dean 2015, section 5.3)
    tempered        covariance of softmax(z / T) on cluster.split
    train_tempered  covariance of softmax(z / T) on the training split
    out_of_fold     covariance of softmax(z / T) on the training split, each row predicted by one of
                    `cluster.folds` generalists trained without that row's fold (costs K trainings)
    head            cosine similarity of the generalist's centred class weight vectors (no data)
    confusion       symmetrised soft confusion on cluster.split: M[i, j] = mean of softmax(z / T)_j
                    over the rows of class i, then (M + M^T) / 2 (needs labels)

At T = 1 every row is nearly one-hot, so off-diagonal covariances are mostly noise;
softened outputs carry the similarity structure ("which 2's look like 3's"). Every
covariance is streamed through `covariance.CovarianceAccumulator` (memory O(C^2)).

Which rows a signal reads decides which errors are held out for an honest score:
`cluster_rows` and `heldout_split`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import Iterator

import numpy as np
import torch

from .covariance import CovarianceAccumulator, rows_per_batch
from .choices import CLUSTER_SIGNALS, LABELLED_SIGNALS
from .config import RunConfig
from .data import Dataset, fold_of_rows  # fold_of_rows: re-exported
from .train import iter_logits

__all__ = [
    "CLUSTER_SIGNALS",
    "LABELLED_SIGNALS",
    "cluster_rows",
    "heldout_split",
    "model_logits",
    "tempered_covariance",
    "confusion_similarity",
    "head_similarity",
    "fold_of_rows",
    "iter_out_of_fold_logits",
    "out_of_fold_covariance",
    "confusability",
]

def cluster_rows(signal: str, split: str) -> str | None:
    """The rows `signal` reads: "val", "train", "test", the path of an unlabeled file, or None (head)."""
    if signal == "head":
        return None
    if signal in ("train_tempered", "out_of_fold"):
        return "train"
    return split


def heldout_split(signal: str, split: str) -> str:
    """The labelled split whose errors the clusters never saw: test, or validation when they read test.

    (An unlabeled cluster.split file is taken to hold no test rows.)
    """
    return "val" if cluster_rows(signal, split) == "test" else "test"


# ---------------------------------------------------------------------------
# signals from a model's outputs


def model_logits(model: torch.nn.Module, inputs, batch_size: int = 4096,
                 device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """(B, C) float32 logits of raw `inputs`, batch by batch in order, on `device`."""
    return iter_logits(model, model.encode(inputs), batch_size, device)


def tempered_covariance(logits: Iterable[torch.Tensor], n_classes: int, temperature: float = 1.0,
                        device: torch.device | str | None = None) -> np.ndarray:
    """(C, C) float64 population covariance of softmax(z / T) over (B, C) logit batches, streamed.

    T = 1 is the paper's (and the `probs` signal's) covariance of predicted probabilities.
    """
    _check_temperature(temperature)
    acc = CovarianceAccumulator(n_classes, device)
    for z in logits:
        z = torch.as_tensor(z).float()
        acc.update(torch.softmax(z if temperature == 1.0 else z / temperature, dim=1))
    return acc.covariance(release=True)


def confusion_similarity(logits: Iterable[torch.Tensor], labels: np.ndarray, n_classes: int,
                         temperature: float = 1.0) -> np.ndarray:
    """(C, C) float64 symmetrised soft confusion over (B, C) logit batches of rows labelled `labels`
    (in order): (M + M^T) / 2, M[i, j] = mean of softmax(z / T)_j over the rows labelled i
    (a row of zeros for a class with no rows)."""
    _check_temperature(temperature)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1 or (len(labels) and (labels.min() < 0 or labels.max() >= n_classes)):
        raise ValueError(f"labels must be a 1-D array of classes in [0, {n_classes}), got shape {labels.shape}")
    sums, start = None, 0
    for z in logits:
        z = torch.as_tensor(z).float()
        if sums is None:
            sums = torch.zeros((n_classes, n_classes), dtype=torch.float64, device=z.device)  # (C, C) per label
        y = torch.from_numpy(labels[start:start + len(z)]).to(z.device)
        if len(y) != len(z):
            raise ValueError(f"more rows of logits than the {len(labels)} labels")
        sums.index_add_(0, y, torch.softmax(z / temperature, dim=1).double())
        start += len(z)
    if start != len(labels):
        raise ValueError(f"{len(labels)} labels for {start} rows of logits")
    if sums is None:
        raise ValueError("no rows: the confusion signal needs labelled rows")
    counts = torch.bincount(torch.from_numpy(labels), minlength=n_classes).double().clamp_min(1.0).to(sums.device)
    m = sums / counts[:, None]
    return (0.5 * (m + m.T)).cpu().numpy()


def head_similarity(model: torch.nn.Module) -> np.ndarray:
    """(C, C) float64 cosine similarity of the rows of `model.head.weight`, centred first.

    Softmax ignores a vector added to every class's weights (every logit moves
    by the same amount), so the rows are compared after removing their mean.
    A row that is all zero after centring is similar only to itself.
    """
    w = model.head.weight.detach().to(device="cpu", dtype=torch.float64)  # (C, d)
    w = w - w.mean(dim=0)
    norms = torch.linalg.vector_norm(w, dim=1)
    w = w / torch.where(norms > 0, norms, 1.0)[:, None]
    sim = w @ w.T
    dead = torch.nonzero(norms == 0).flatten()
    sim[dead, dead] = 1.0
    return sim.numpy()


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")


# ---------------------------------------------------------------------------
# out of fold: every training row predicted by a generalist that never saw it


def iter_out_of_fold_logits(cfg: RunConfig, dataset: Dataset, device: torch.device, folds: int, *, seed: int,
                            progress: bool = False) -> Iterator[tuple[np.ndarray, torch.Tensor, dict]]:
    """Train `folds` generalists, model f on the training rows outside fold f (early stopping
    on the validation split), and yield (rows, (B, C) logits of those rows, fold record) for
    the rows of fold f only. A training row is never predicted by a model that trained on it.

    fold record: {"fold", "examples_seen", "seconds", "rows"}.
    """
    from .generalist import fit_generalist  # a Ray worker never needs it

    fold = fold_of_rows(dataset.train.labels, folds, seed)
    for f in range(folds):
        inside, held = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        part = dataclasses.replace(dataset, train=dataset.train.take(inside))
        model, result = fit_generalist(cfg, part, device, seed=seed + 1000 + f, desc=f"fold {f}", progress=progress)
        record = {"fold": f, "examples_seen": result.examples_seen, "seconds": round(result.seconds, 3),
                  "rows": int(len(held))}
        start = 0
        for logits in model_logits(model, dataset.train.take(held).inputs,
                                   rows_per_batch(cfg.cluster.batch_size, dataset.n_classes), device):
            yield held[start:start + len(logits)], logits, record
            start += len(logits)


def out_of_fold_covariance(cfg: RunConfig, dataset: Dataset, device: torch.device, *, temperature: float,
                           folds: int, seed: int, progress: bool = False) -> tuple[np.ndarray, dict]:
    """(C, C) covariance of softmax(z / T) of out-of-fold logits on the training split, and its cost:
    {"folds", "examples_seen", "train_seconds"} summed over the fold models."""
    _check_temperature(temperature)
    records = {}

    def logits():
        for _, z, record in iter_out_of_fold_logits(cfg, dataset, device, folds, seed=seed, progress=progress):
            records[record["fold"]] = record
            yield z

    cov = tempered_covariance(logits(), dataset.n_classes, temperature, device)
    cost = {"folds": folds, "examples_seen": sum(r["examples_seen"] for r in records.values()),
            "train_seconds": round(sum(r["seconds"] for r in records.values()), 3)}
    return cov, cost


# ---------------------------------------------------------------------------
# the entry point


def confusability(cfg: RunConfig, model: torch.nn.Module, device: torch.device, *,
                  logits: Iterable[torch.Tensor] | None = None, labels: np.ndarray | None = None,
                  dataset: Dataset | None = None, progress: bool = False) -> tuple[np.ndarray, dict]:
    """The (C, C) matrix of `cfg.cluster.signal`, and a record of how it was made.

    logits: (B, C) batches of the generalist's logits on the rows `cluster_rows(signal,
    cfg.cluster.split)` names, in order (see `model_logits`); labels: those rows' labels,
    for `confusion`; dataset: for `out_of_fold`, which trains its own fold models;
    `head` reads only `model`.
    Record: {"signal", "temperature", "rows", "seconds"}, plus the fold models' cost for out_of_fold.
    """
    c = cfg.cluster
    signal = c.signal
    if signal not in CLUSTER_SIGNALS:
        raise ValueError(f"signal={signal!r} must be one of {CLUSTER_SIGNALS}")
    temperature = 1.0 if signal in ("probs", "head") else c.temperature
    n_classes = model.head.out_features
    started = time.perf_counter()
    extra, rows = {}, 0
    if signal == "head":
        matrix = head_similarity(model)
    elif signal == "out_of_fold":
        if dataset is None:
            raise ValueError("signal='out_of_fold' trains fold models: pass dataset")
        matrix, extra = out_of_fold_covariance(cfg, dataset, device, temperature=temperature, folds=c.folds,
                                               seed=cfg.seed, progress=progress)
        rows = len(dataset.train)
    else:
        if logits is None:
            raise ValueError(f"signal={signal!r} reads the model's outputs: pass logits")
        counted = _counting(logits)
        if signal == "confusion":
            if labels is None:
                raise ValueError("signal='confusion' needs the labels of its rows")
            matrix = confusion_similarity(counted, labels, n_classes, temperature)
        else:
            matrix = tempered_covariance(counted, n_classes, temperature, device)
        rows = counted.rows
    record = {"signal": signal, "temperature": temperature, "rows": rows,
              "seconds": round(time.perf_counter() - started, 3), **extra}
    return matrix, record


class _counting:
    """An iterable of batches that counts the rows it has handed out."""

    def __init__(self, batches: Iterable[torch.Tensor]):
        self.batches, self.rows = batches, 0

    def __iter__(self):
        for batch in self.batches:
            self.rows += len(batch)
            yield batch
