"""Transfer sets: the examples a distilled student learns from (Hinton, Vinyals & Dean, 2015, sections 2-3).

The training set, a seeded per-class fraction of it, the training set with
classes left out or only some kept (`transfer.omit_classes` / `keep_classes`),
or a file of unlabeled inputs (`transfer.split=FILE`, read by
`data.read_unlabeled_inputs`).

A teacher is nearly always right on its own training set, so its softened
outputs there carry little beyond the labels. Two ways to inputs it has not
memorised: augmented copies of the training inputs (`transfer.augment`,
`augment_inputs`: texts lose, mask or swap tokens; vectors and images get
noise, jitter or mixup), and out-of-fold targets (`transfer.folds`, computed
in distill_run.py), for which `TransferSet.origin` names the training row each
example comes from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .choices import ARRAY_AUGMENTATIONS, TEXT_AUGMENTATIONS
from .config import ConfigError
from .distill_config import TransferConfig
from .data import Dataset, DataError, read_unlabeled_inputs, resolve_path, take_inputs

__all__ = ["MASK_TOKEN", "TransferSet", "augment_inputs", "class_ids", "make_transfer_set"]

MASK_TOKEN = "[MASK]"  # what span masking writes in place of a text's tokens


@dataclass
class TransferSet:
    """The student's training examples.

    inputs: raw inputs (texts or an (N, ...) array); labels: (N,) int64 class ids
    the student is given, -1 where it is given none; truth: (N,) the true class
    ids where known (for metrics), else -1; present: the class ids the set
    contains (all classes for unlabeled data, whose classes are unknown);
    origin: (N,) the row of the dataset's training split each example is (or
    is an augmented copy of), -1 for a file's rows; augmented: (N,) True for
    augmented copies.
    """

    inputs: list[str] | np.ndarray
    labels: np.ndarray
    truth: np.ndarray
    present: np.ndarray
    source: str
    origin: np.ndarray | None = None
    augmented: np.ndarray | None = None

    def __post_init__(self):
        if self.origin is None:
            self.origin = np.full(len(self.labels), -1, np.int64)
        if self.augmented is None:
            self.augmented = np.zeros(len(self.labels), dtype=bool)

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
    transfer = TransferSet(split.inputs, shown, split.labels, np.unique(split.labels), "train", index)
    if not cfg.augment:
        return transfer
    extra, source = augment_inputs(transfer.inputs, dataset.input_kind, cfg.augment, cfg.copies, cfg.strength, seed)
    return TransferSet(_concat(transfer.inputs, extra), np.concatenate([shown, shown[source]]),
                       np.concatenate([split.labels, split.labels[source]]), transfer.present,
                       f"train + {cfg.copies} augmented cop{'y' if cfg.copies == 1 else 'ies'} "
                       f"({', '.join(cfg.augment)}, strength {cfg.strength:g})",
                       np.concatenate([index, index[source]]),
                       np.concatenate([np.zeros(len(index), bool), np.ones(len(source), bool)]))


def _concat(a, b):
    return a + b if isinstance(a, list) else np.concatenate([a, b])


# ---------------------------------------------------------------------------
# augmented copies


def augment_inputs(inputs: list[str] | np.ndarray, input_kind: str, methods: Sequence[str], copies: int,
                   strength: float, seed: int) -> tuple[list[str] | np.ndarray, np.ndarray]:
    """`copies` augmented copies of every input, each made by one of `methods` drawn at random (`Augmenter`).

    Returns the copies, ordered copy by copy ((copies * N) of them), and (copies * N,)
    the index of the input each was made from. Seeded: the same arguments give the same copies.
    """
    if copies < 1:
        raise ConfigError(f"transfer.copies={copies} must be >= 1")
    augmenter = Augmenter(inputs, input_kind, methods, strength)
    source = np.tile(np.arange(len(inputs)), copies)  # (copies * N,)
    # its own stream: the transfer set's other draws do not move it
    return augmenter.draw(source, np.random.default_rng([seed, 7_919])), source


class Augmenter:
    """Augmented copies of some of `inputs`, each made by one of `methods` drawn at random.

    Texts (input_kind "text"): token_dropout drops each token with probability
    `strength` (one is always kept), span_mask replaces a run of
    round(strength * tokens) tokens (at least one) by MASK_TOKEN, swap swaps
    that many adjacent pairs. Arrays (N, ...): noise adds Gaussian noise of sd
    `strength` x each feature's sd (over `inputs`); jitter moves images by up to
    round(10 * strength) pixels (at least one; zero fill) and scales and shifts
    feature vectors by 1 + e and e' sds (e, e' ~ N(0, strength)); mixup mixes
    each input with a random other, lambda ~ Beta(strength, strength) folded to
    >= 0.5, so the copy stays nearest its source. Integer arrays are rounded
    and clipped to their type's range.
    """

    def __init__(self, inputs: list[str] | np.ndarray, input_kind: str, methods: Sequence[str], strength: float):
        self.text = input_kind == "text"
        allowed = TEXT_AUGMENTATIONS if self.text else ARRAY_AUGMENTATIONS
        bad = [m for m in methods if m not in allowed]
        if not methods or bad:
            raise ConfigError(f"transfer.augment={list(methods)!r}: {input_kind} inputs take {allowed}"
                              + (f"; {bad[0]!r} is not one of them" if bad else ""))
        self.methods, self.strength, self.inputs = list(methods), strength, inputs
        if not self.text:
            self.x = np.asarray(inputs)
            self.flat = self.x.reshape(len(self.x), -1).astype(np.float32)
            self.sd = self.flat.std(0) + 1e-8  # (D,) per feature

    def draw(self, source: np.ndarray, rng: np.random.Generator) -> list[str] | np.ndarray:
        """A copy of input source[i] for each i, in that order, drawn from `rng`."""
        method = rng.integers(len(self.methods), size=len(source))
        if self.text:
            return [_augment_text(self.inputs[i], self.methods[m], self.strength, rng) for i, m in zip(source, method)]
        out = self.flat[source].copy()  # (R, D)
        for m, name in enumerate(self.methods):
            rows = np.flatnonzero(method == m)
            if len(rows):
                out[rows] = _augment_arrays(self.flat, source[rows], name, self.strength, self.sd, self.x.shape[1:],
                                            rng)
        if np.issubdtype(self.x.dtype, np.integer):
            info = np.iinfo(self.x.dtype)
            out = np.clip(np.rint(out), info.min, info.max)
        return out.astype(self.x.dtype).reshape(len(source), *self.x.shape[1:])


def _augment_text(text: str, method: str, strength: float, rng: np.random.Generator) -> str:
    tokens = text.split()
    if len(tokens) < 2:
        return text
    count = max(1, int(round(strength * len(tokens))))
    if method == "token_dropout":
        keep = rng.random(len(tokens)) >= strength
        if not keep.any():
            keep[rng.integers(len(tokens))] = True
        tokens = [t for t, k in zip(tokens, keep) if k]
    elif method == "span_mask":
        count = min(count, len(tokens) - 1)  # some of the text stays
        start = int(rng.integers(len(tokens) - count + 1))
        tokens = tokens[:start] + [MASK_TOKEN] * count + tokens[start + count:]
    else:  # swap
        for i in rng.integers(len(tokens) - 1, size=count):
            tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
    return " ".join(tokens)


def _augment_arrays(flat: np.ndarray, source: np.ndarray, method: str, strength: float, sd: np.ndarray,
                    shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """(R, D) copies of rows `source` of `flat` (N, D); `shape`: one input's shape."""
    x = flat[source]
    if method == "noise":
        return x + rng.normal(0.0, strength, x.shape).astype(np.float32) * sd
    if method == "mixup":
        lam = rng.beta(strength, strength, size=(len(x), 1)).astype(np.float32)
        lam = np.maximum(lam, 1 - lam)
        return lam * x + (1 - lam) * flat[rng.integers(len(flat), size=len(x))]
    if len(shape) >= 2:  # jitter of images: a random translation, zero fill
        pixels = max(1, int(round(10 * strength)))
        images = x.reshape(len(x), *shape)
        moved = np.zeros_like(images)
        for r, (dy, dx) in enumerate(rng.integers(-pixels, pixels + 1, size=(len(x), 2))):
            moved[r] = shift_images(images[r], int(dy), int(dx))
        return moved.reshape(len(x), -1)
    scale = 1 + rng.normal(0.0, strength, (len(x), 1)).astype(np.float32)
    return x * scale + rng.normal(0.0, strength, (len(x), 1)).astype(np.float32) * sd


def shift_images(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """image (..., H, W) moved by dy rows and dx columns, zero fill."""
    out = np.zeros_like(image)
    h, w = image.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        image[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out
