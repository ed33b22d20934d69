"""Transfer sets: the examples a distilled student learns from (Hinton, Vinyals & Dean, 2015, sections 2-3).

The training set, a seeded per-class fraction of it, the training set with
classes left out or only some kept (`transfer.omit_classes` / `keep_classes`),
or a file of unlabeled inputs (`transfer.split=FILE`, read by
`data.read_unlabeled_inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .config import ConfigError, TransferConfig
from .data import Dataset, DataError, read_unlabeled_inputs, resolve_path, take_inputs

__all__ = ["TransferSet", "class_ids", "make_transfer_set"]


@dataclass
class TransferSet:
    """The student's training examples.

    inputs: raw inputs (texts or an (N, ...) array); labels: (N,) int64 class ids
    the student is given, -1 where it is given none; truth: (N,) the true class
    ids where known (for metrics), else -1; present: the class ids the set
    contains (all classes for unlabeled data, whose classes are unknown).
    """

    inputs: list[str] | np.ndarray
    labels: np.ndarray
    truth: np.ndarray
    present: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def labelled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())


def class_ids(names: Sequence[int | str], classes: list[str], key: str) -> np.ndarray:
    """Class names (ints are read as names: MNIST's 3 is "3") -> (k,) ids in `classes`."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = [n for n in names if str(n) not in index]
    if unknown:
        raise ConfigError(f"{key}={list(names)!r}: {unknown[0]!r} is not a class; classes are "
                          f"{classes[:12]}{' ...' if len(classes) > 12 else ''}")
    return np.array([index[str(n)] for n in names], dtype=np.int64)


def _fraction(n: int, fraction: float) -> int:
    """How many of n examples a fraction keeps: at least one."""
    return max(1, int(round(fraction * n)))


def make_transfer_set(cfg: TransferConfig, dataset: Dataset, seed: int, text_column: str = "text") -> TransferSet:
    """The transfer set `cfg` describes, drawn from `dataset` (seeded)."""
    if cfg.split != "train":
        if cfg.omit_classes or cfg.keep_classes:
            raise ConfigError(f"transfer.omit_classes / keep_classes need labels, but transfer.split={cfg.split!r} "
                              "is unlabeled")
        if not resolve_path(cfg.split).is_file():
            raise DataError(f"transfer.split={cfg.split!r}: not 'train' and no such file")
        inputs = read_unlabeled_inputs(cfg.split, dataset, text_column, "transfer.split")
        index = np.arange(len(inputs))
        if cfg.fraction < 1:
            rng = np.random.default_rng(seed)
            index = np.sort(rng.permutation(len(inputs))[: _fraction(len(inputs), cfg.fraction)])
        unknown = np.full(len(index), -1, np.int64)
        return TransferSet(take_inputs(inputs, index), unknown, unknown, np.arange(dataset.n_classes), cfg.split)

    labels = dataset.train.labels
    keep = np.ones(len(labels), dtype=bool)
    if cfg.omit_classes:
        keep &= ~np.isin(labels, class_ids(cfg.omit_classes, dataset.classes, "transfer.omit_classes"))
    if cfg.keep_classes:
        keep &= np.isin(labels, class_ids(cfg.keep_classes, dataset.classes, "transfer.keep_classes"))
    index = np.flatnonzero(keep)
    if cfg.fraction < 1:
        rng = np.random.default_rng(seed)
        chosen = []
        for c in np.unique(labels[index]):  # per class, so a small fraction keeps every class
            members = index[labels[index] == c]
            chosen.append(rng.permutation(members)[: _fraction(len(members), cfg.fraction)])
        index = np.sort(np.concatenate(chosen)) if chosen else index
    if len(index) == 0:
        raise DataError(f"the transfer set is empty (omit_classes={cfg.omit_classes}, keep_classes={cfg.keep_classes})")
    split = dataset.train.take(index)
    shown = split.labels if cfg.labels else np.full(len(index), -1, np.int64)
    return TransferSet(split.inputs, shown, split.labels, np.unique(split.labels), "train")
