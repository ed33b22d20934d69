"""The data one specialist reads, cut by the driver from one pass of the generalist (never N x C).

Made from the labels alone, a `SpecialistPlan` fixes the rows each specialist's
epochs visit; `cut_generalist_outputs` then stores, per plan, the generalist's
collapsed soft targets and scores of its rows (`ShardStore`), and
`specialist_data` hands a worker its share.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import RunConfig, TrainConfig
from .data import Dataset, Split
from .dustbin import EnrichedSampler
from .models import torch_threads
from .train import predict_logits


@dataclass
class SpecialistPlan:
    """Which rows of each split specialist `m` reads; made from the labels alone, before any model runs.

    train_rows: (n,) sorted positions in the training split that its epochs
    visit, over every epoch up to the configured maximum (early stopping is
    decided in the worker, so all of them). orders: (epochs, epoch_size)
    positions into train_rows, epoch by epoch in visiting order: the
    `EnrichedSampler`'s draws with the rng `train_model` makes from `seed`, so
    the specialist sees the examples a sampler over the whole split would, in
    the same order. val_slice: (v,) sorted positions of its own validation
    slice; val_inside / test_inside: positions of the examples of its classes.
    """

    m: int
    classes: list[int]
    seed: int
    fraction: float  # f: realised special share of each epoch
    natural_fraction: float  # pi: special share of the training split
    train_rows: np.ndarray
    orders: np.ndarray
    val_slice: np.ndarray
    val_inside: np.ndarray
    test_inside: np.ndarray
    max_examples: int = 0  # its share of specialists.budget in training examples (0: no cap); see budget_shares


def run_budget(cfg: RunConfig, generalist_examples: int, groups: list[list[int]], trainable: list[int],
               labels: np.ndarray) -> tuple[int, dict[int, int]]:
    """specialists.budget for a run: (its examples, {m: specialist m's share}) over the `trainable` groups;
    (0, {}) when the budget is 0 (no cap)."""
    budget = round(cfg.specialists.budget * generalist_examples)
    if not budget:
        return 0, {}
    shares = budget_shares([groups[m] for m in trainable], labels, cfg.specialists.special_fraction, budget)
    return budget, dict(zip(trainable, shares))


def budget_shares(groups: list[list[int]], labels: np.ndarray, special_fraction: float, total: int) -> list[int]:
    """Each group's specialist's training examples: `total` shared in proportion to their epoch sizes.

    groups: the class groups of the specialists to train (all of a run's,
    so that a resumed run gives each the same share); labels: (N,) training
    labels. Shares are rounded down, so they sum to at most `total`, and are at
    least 1 (a share of 0 would mean "no cap" to `train_model`).
    """
    sizes = np.array([EnrichedSampler(labels, g, special_fraction).epoch_size for g in groups], dtype=np.int64)
    if not len(sizes) or sizes.sum() == 0:
        return [0] * len(sizes)
    return [max(1, int(total * int(size) // int(sizes.sum()))) for size in sizes]


def plan_specialist(m: int, classes, dataset: Dataset, cfg: RunConfig, max_examples: int = 0) -> SpecialistPlan:
    """Specialist m's rows (seed `cfg.seed + m`); ValueError if it cannot be trained on these splits.

    max_examples: its compute budget (`budget_shares`), which also bounds the
    epochs drawn; 0: `specialists.epochs` epochs.
    """
    s = cfg.specialists
    classes = [int(c) for c in classes]
    seed = cfg.seed + m
    sampler = EnrichedSampler(dataset.train.labels, classes, s.special_fraction)
    if sampler.n_other == 0:
        raise ValueError(f"specialist over {len(classes)} classes: no training example lies outside them, so the "
                         "dustbin cannot be learned")
    rng = np.random.default_rng(seed)  # the one train_model(seed=seed) hands its sampler, epoch after epoch
    epochs = specialist_train_config(cfg).epochs
    if max_examples:
        epochs = min(epochs, -(-max_examples // sampler.epoch_size))
    drawn = np.stack([sampler(epoch, rng) for epoch in range(1, epochs + 1)])
    train_rows, orders = np.unique(drawn.ravel(), return_inverse=True)
    # The specialist's own validation slice: its classes' validation examples and others in the enriched
    # ratio, drawn once (seeded), so its accuracy is measured under the prior it is trained on.
    val_slice = np.sort(EnrichedSampler(dataset.val.labels, classes, s.special_fraction)(
        0, np.random.default_rng(seed)))
    if not np.isin(dataset.val.labels[val_slice], classes).any():
        raise ValueError(f"specialist over classes {classes[:10]}: none of them has a validation example")
    inside = {split: np.flatnonzero(np.isin(getattr(dataset, split).labels, classes)) for split in ("val", "test")}
    return SpecialistPlan(m, classes, seed, sampler.fraction, sampler.natural_fraction, train_rows,
                          orders.reshape(drawn.shape), val_slice, inside["val"], inside["test"], max_examples)


class ShardStore:
    """Float32 arrays of known shapes, one per (specialist, name), filled block by block in row order.

    `allocate` every array first: each lives in memory while those allocated
    so far fit in `memory_bytes`, the rest in one raw file each under
    `folder` (written in place, never memory-mapped), so what the driver holds
    does not grow with N x C. Allocating up front, not block by block, also
    keeps thousands of small long-lived blocks from splitting the large
    short-lived ones' freed heap, which glibc then cannot give back. `pop`
    hands an array back whole and forgets it.
    """

    def __init__(self, folder: str | Path, memory_bytes: int = 256 << 20):
        self.folder, self.memory_bytes = Path(folder), memory_bytes
        self._arrays: dict[tuple[int, str], np.ndarray | Path] = {}
        self._shapes: dict[tuple[int, str], tuple[int, int]] = {}
        self._filled: dict[tuple[int, str], int] = {}
        self._in_memory = 0
        self.spilled_bytes = 0  # in files

    def allocate(self, m: int, name: str, rows: int, width: int) -> None:
        key, nbytes = (m, name), rows * width * 4
        if self._in_memory + nbytes <= self.memory_bytes:
            self._arrays[key] = np.empty((rows, width), dtype=np.float32)
            self._in_memory += nbytes
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{m}.{name}.f32"
            with open(path, "wb") as handle:
                handle.truncate(nbytes)
            self._arrays[key] = path
            self.spilled_bytes += nbytes
        self._shapes[key], self._filled[key] = (rows, width), 0

    def write(self, m: int, name: str, block: np.ndarray) -> None:
        """block: (b, width) rows that follow those written before."""
        key = (m, name)
        target, at = self._arrays[key], self._filled[key]
        rows, width = self._shapes[key]
        if block.shape[1:] != (width,) or at + len(block) > rows:
            raise ValueError(f"{key}: block {block.shape} does not fit rows {at}.. of ({rows}, {width})")
        if isinstance(target, Path):
            with open(target, "r+b") as handle:
                handle.seek(at * width * 4)
                handle.write(np.ascontiguousarray(block, dtype=np.float32).tobytes())
        else:
            target[at:at + len(block)] = block
        self._filled[key] = at + len(block)

    def pop(self, m: int, name: str) -> np.ndarray:
        """The whole (rows, width) array, every row written."""
        key = (m, name)
        rows, width = self._shapes.pop(key)
        filled, target = self._filled.pop(key), self._arrays.pop(key)
        if filled != rows:
            raise ValueError(f"{key}: {filled} of its {rows} rows were written")
        if isinstance(target, Path):
            array = np.fromfile(target, dtype=np.float32).reshape(rows, width)
            target.unlink()
            return array
        self._in_memory -= target.nbytes
        return target


def logits_by_batch(model: nn.Module, inputs, batch_size: int, device):
    """(start, (B, K) float32 logits) per batch of raw `inputs`, each batch encoded on its own (so a
    read-only or memory-mapped split is never copied whole); the same batches as `predict_logits`."""
    for start in range(0, len(inputs), batch_size):
        yield start, predict_logits(model, model.encode(inputs[start:start + batch_size]), batch_size, device)


def _collapsed_rows(probs: torch.Tensor, rows: torch.Tensor, classes: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """(r, k+1) `collapse_probs(probs[rows], classes)` of (B, C) probabilities: the same bits.

    collapse_probs sums each row's other columns as one contiguous (r, C - k)
    block; so does this (a row's sum does not depend on the rows beside it),
    without re-checking a softmax just computed and with index_select, several
    times faster than boolean-mask indexing. others: (C - k,) ids.
    """
    picked = probs.index_select(0, rows)  # (r, C)
    return torch.cat([picked.index_select(1, classes), picked.index_select(1, others).sum(1, keepdim=True)], dim=1)


def cut_generalist_outputs(generalist: nn.Module, dataset: Dataset, plans: list[SpecialistPlan], store: ShardStore,
                           batch_size: int, device) -> np.ndarray:
    """One batched pass of the generalist over each split; each plan's share of it goes into `store`.

    Memory: one (batch_size, C) block of logits at a time. Per plan m, the
    store gets "teacher": (n, k+1) generalist probabilities at T=1 on
    train_rows, collapsed onto its classes + dustbin (`collapse_probs`), and
    "val_scores" / "test_scores": (n_in, k) the generalist's logits of its
    classes on val_inside / test_inside. Returns (N_val,) the generalist's
    top-1 class on the validation split. The batches are those of
    `predict_logits` over the whole split, so every value equals what the
    (N, C) logits would give.
    """
    n_classes = generalist.head.out_features
    columns = {}  # m -> (its classes, the others), as index tensors
    for plan in plans:
        others = np.ones(n_classes, dtype=bool)
        others[plan.classes] = False
        columns[plan.m] = (torch.tensor(plan.classes, dtype=torch.long), torch.from_numpy(np.flatnonzero(others)))
    for plan in plans:  # every array before the pass (see ShardStore)
        k = len(plan.classes)
        for name, rows, width in (("teacher", plan.train_rows, k + 1), ("val_scores", plan.val_inside, k),
                                  ("test_scores", plan.test_inside, k)):
            store.allocate(plan.m, name, len(rows), width)
    val_top1 = np.empty(len(dataset.val), dtype=np.int64)
    for split in ("train", "val", "test"):
        rows_of = {"train": lambda p: p.train_rows, "val": lambda p: p.val_inside, "test": lambda p: p.test_inside}[split]
        for start, logits in logits_by_batch(generalist, getattr(dataset, split).inputs, batch_size, device):
            end = start + len(logits)
            if split == "train":
                probs = torch.softmax(torch.from_numpy(logits), dim=1)  # (B, C) at T=1, row by row
            elif split == "val":
                val_top1[start:end] = logits.argmax(1)
            with torch_threads(1):  # thousands of small copies
                for plan in plans:
                    rows = rows_of(plan)
                    lo, hi = np.searchsorted(rows, [start, end])
                    if lo == hi:
                        continue
                    local = rows[lo:hi] - start
                    if split == "train":
                        store.write(plan.m, "teacher",
                                    _collapsed_rows(probs, torch.from_numpy(local), *columns[plan.m]))
                    else:
                        store.write(plan.m, f"{split}_scores", logits[np.ix_(local, plan.classes)])
    return val_top1


@dataclass
class SpecialistData:
    """What one specialist's worker reads besides the generalist and the validation split.

    train: its rows of the training split (plan.train_rows, in that order);
    teacher: (n, k+1) float32 collapsed generalist probabilities at T=1 on
    them; test: the test examples of its classes; val_scores / test_scores:
    (n_in, k) the generalist's logits of its classes on the validation / test
    examples of its classes; val_active: validation examples whose generalist
    top-1 class is one of its classes, val_active_inside: how many of those
    truly are one.
    """

    plan: SpecialistPlan
    train: Split
    teacher: np.ndarray
    test: Split
    val_scores: np.ndarray
    test_scores: np.ndarray
    val_active: int
    val_active_inside: int


def specialist_data(plan: SpecialistPlan, dataset: Dataset, store: ShardStore, val_top1: np.ndarray) -> SpecialistData:
    """Assemble specialist plan.m's data from the splits and its share of `cut_generalist_outputs` (popped)."""
    active = np.isin(val_top1, plan.classes)
    return SpecialistData(
        plan, dataset.train.take(plan.train_rows), store.pop(plan.m, "teacher"),
        dataset.test.take(plan.test_inside), store.pop(plan.m, "val_scores"), store.pop(plan.m, "test_scores"),
        int(active.sum()), int(np.isin(dataset.val.labels[active], plan.classes).sum()))


def specialist_train_config(cfg: RunConfig) -> TrainConfig:
    """The generalist's schedule with the specialists' overrides (0 / -1: inherit)."""
    s, t = cfg.specialists, cfg.train
    return dataclasses.replace(t, epochs=s.epochs or t.epochs, batch_size=s.batch_size or t.batch_size,
                               lr=s.lr or t.lr, patience=t.patience if s.patience < 0 else s.patience,
                               schedule=s.schedule or t.schedule)
