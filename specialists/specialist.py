"""One specialist (Hinton, Vinyals & Dean 2015, sections 5.2 and 6.1), trained without Ray.

A specialist covers k confusable classes (one cluster of `clusters.json`) and
one dustbin class standing for the C - k others:

* it starts as the generalist: same network (optionally widened), a head whose
  k rows are the generalist's rows for its classes and whose dustbin row is
  built from the other rows (`models.with_dustbin_head`);
* each epoch visits every training example of its classes and a fresh draw
  from the others, so that a share `special_fraction` (default 1/2) of the
  epoch is special (`EnrichedSampler`);
* its loss adds the generalist's soft targets at temperature T, collapsed onto
  its classes + dustbin (`distill.collapse_probs`), with weight `soft_weight`;
* it stops early on its own validation slice (its classes' validation
  examples plus others in the same enriched ratio).

The dustbin correction
----------------------
Write pi for the share of the specialist's classes in the training split
(natural prior) and f for their realised share of every enriched epoch. The
sampler keeps the within-group proportions (all special examples are visited)
and draws the others uniformly, so relative to the data each special class is
oversampled by f / pi and each other class by (1 - f) / (1 - pi). A model fit
on the enriched epochs estimates p_train(y | x), proportional to
p(y | x) * r_y with r_y those factors (Bayes' rule with a changed prior). The
natural posterior is recovered by dividing r back out; adding one constant to
all logits changes nothing, so only the ratio matters and the whole correction
is one increment of the dustbin logit:

    b = log(f / (1 - f)) - log(pi / (1 - pi))        (log odds ratio; b > 0 when enriched)

    p_natural = softmax(logits + b * e_dustbin)

This is the paper's "log of the proportion by which the specialist classes
are oversampled", made exact for this scheme: the proportion is the odds
ratio f(1 - pi) / (pi(1 - f)), not f / pi.

The correction is exact for what the hard-label term learns. The soft term
learns the generalist's posterior, which is already in the natural prior;
mixing the two would leave the trained specialist between the two priors and
make b an over-correction. With `dustbin_correction="prior"` (default) the
soft targets are therefore moved into the enriched prior while training (b is
subtracted from the collapsed target's dustbin log-probability before it is
softened at T, see `specialist_soft_targets`), so that both terms learn the
same p_train and b is exact. `"paper"` keeps the soft targets as they are
and still stores b (the paper's recipe); `"none"` stores b = 0.

Weights are saved as trained: b is NOT folded into the head's bias. It is
stored in `specialist.json` (`dustbin_correction`, with
`dustbin_correction_applied: false`); a combiner applies it with
`dustbin_corrected(logits, b)`. Early stopping and the own-slice validation
accuracy use the uncorrected logits, since that slice has the enriched prior.

b targets the natural prior pi, which is right for a specialist run on all
data. A combiner that runs it only where the generalist's top class is one of
its classes meets a much higher share rho of its classes there, so
`dustbin_correction_active_top1` stores the same formula with pi replaced by
rho measured on the validation split: b_active = log(f/(1-f)) - log(rho/(1-rho)).

Applied by a combiner that gates specialists by the generalist's top
classes, the natural-prior b hurts; "prior" training and b_active take most
of that loss away (measurements: README, Performance, "Dustbin correction").
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import RunConfig, TrainConfig
from .data import Dataset, Split
from .distill import collapse_labels, collapse_probs, distillation_loss, soft_targets
from .models import (CheckpointError, create_model, load_checkpoint, save_checkpoint, torch_threads,
                     with_dustbin_head)
from .rundir import RunDir, RunDirError, read_json, write_json
from .train import TrainResult, predict_logits, seed_everything, train_model

SPECIALIST_FILE = "specialist.json"  # written last: its presence means the folder is whole


class SpecialistTrainingError(RuntimeError):
    """Some specialists failed after their retries; the others are saved, `--resume` trains the rest."""


# ---------------------------------------------------------------------------
# enriched epochs and the correction they call for


class EnrichedSampler:
    """`sample(epoch, rng)` for `train_model`: all of a group's examples, then a fresh draw of the others.

    labels: (N,) class ids of the training examples; classes: (k,) the group.
    Each epoch returns, shuffled, every position whose label is in `classes`
    (n_special of them) and `n_other = round(n_special * (1 - f) / f)`
    positions drawn without replacement from the rest, capped at how many
    there are (then the realised fraction is above f).

    fraction: realised special share of an epoch; natural_fraction: their
    share of `labels` (pi in the module docstring).
    """

    def __init__(self, labels: np.ndarray, classes, special_fraction: float):
        labels = np.asarray(labels)
        if not 0 < special_fraction < 1:
            raise ValueError(f"special_fraction={special_fraction} must be in (0, 1)")
        is_special = np.isin(labels, np.asarray(list(classes), dtype=np.int64))
        self.special = np.flatnonzero(is_special)
        self.other = np.flatnonzero(~is_special)
        wanted = int(round(len(self.special) * (1 - special_fraction) / special_fraction))
        self.n_other = min(wanted, len(self.other))
        self.epoch_size = len(self.special) + self.n_other
        self.fraction = len(self.special) / self.epoch_size if self.epoch_size else float("nan")
        self.natural_fraction = len(self.special) / len(labels) if len(labels) else float("nan")

    def __call__(self, epoch: int, rng: np.random.Generator) -> np.ndarray:
        drawn = rng.choice(self.other, size=self.n_other, replace=False)
        return rng.permutation(np.concatenate([self.special, drawn]))


def dustbin_correction(fraction: float, natural_fraction: float) -> float:
    """b = log(f / (1 - f)) - log(pi / (1 - pi)): add it to the dustbin logit (see the module docstring).

    fraction: f, the special share of a training epoch; natural_fraction: pi,
    their share of the data the specialist will be used on.
    """
    for name, value in (("fraction", fraction), ("natural_fraction", natural_fraction)):
        if not 0 < value < 1:
            raise ValueError(f"{name}={value} must be in (0, 1)")
    return math.log(fraction / (1 - fraction)) - math.log(natural_fraction / (1 - natural_fraction))


def dustbin_corrected(logits: torch.Tensor, correction: float) -> torch.Tensor:
    """(N, k+1) logits with `correction` added to the last (dustbin) column."""
    out = logits.clone()
    out[:, -1] += correction
    return out


def specialist_soft_targets(teacher_logits: torch.Tensor, classes: torch.Tensor, temperature: float,
                            prior_shift: float = 0.0) -> torch.Tensor:
    """(B, k+1) soft targets at T from the generalist's (B, C) logits, over classes + dustbin.

    The generalist's T=1 probabilities are collapsed (`collapse_probs`: the
    dustbin gets the mass of every other class), and the collapsed
    distribution is then softened at T (`soft_targets` of its log). Collapsing
    first is what a specialist can match: its dustbin is one logit, and a
    student equal to the collapsed generalist at T=1 is equal to these targets
    at every T. (Softening first and then collapsing gives the dustbin
    sum_j exp(z_j / T), which for T > 1 a single logit only matches by
    inflating the dustbin at T=1.)

    prior_shift: b of the module docstring, subtracted from the dustbin's T=1
    log-probability, which moves the targets into the enriched prior the hard
    labels are drawn from (0: the generalist's natural prior).
    """
    collapsed = collapse_probs(torch.softmax(teacher_logits.float(), dim=1), classes)  # (B, k+1) at T=1
    return soften_collapsed(collapsed, temperature, prior_shift)


def soften_collapsed(collapsed: torch.Tensor, temperature: float, prior_shift: float = 0.0) -> torch.Tensor:
    """(B, k+1) soft targets at T from (B, k+1) collapsed T=1 probabilities: the second half of
    `specialist_soft_targets`, for a worker that was shipped the collapsed probabilities, not (B, C) logits."""
    log_p = torch.log(collapsed.clamp_min(torch.finfo(collapsed.dtype).tiny))
    if prior_shift:
        log_p[:, -1] -= prior_shift
    return soft_targets(log_p, temperature)


def conditional_accuracy(scores: np.ndarray, labels: np.ndarray, classes) -> tuple[float, int]:
    """Accuracy on the examples whose label is in `classes`, argmax over those classes only.

    scores: (N, k) scores of `classes` in that order (a specialist's logits
    without the dustbin, or the generalist's columns `classes`); labels: (N,)
    class ids. Examples of other classes are ignored. Returns (accuracy, n).
    """
    classes = np.asarray(list(classes), dtype=np.int64)
    keep = np.isin(labels, classes)
    if not keep.any():
        return float("nan"), 0
    predicted = classes[np.asarray(scores)[keep].argmax(1)]
    return float((predicted == labels[keep]).mean()), int(keep.sum())


# ---------------------------------------------------------------------------
# the data one specialist reads, cut by the driver from one pass of the generalist (never N x C)


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
    short-lived ones' freed heap, which glibc then cannot give back (measured
    at C=5,000: 4 GiB). `pop` hands an array back whole and forgets it.
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


def _logits_by_batch(model: nn.Module, inputs, batch_size: int, device):
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
        for start, logits in _logits_by_batch(generalist, getattr(dataset, split).inputs, batch_size, device):
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


# ---------------------------------------------------------------------------
# training one specialist


def specialist_train_config(cfg: RunConfig) -> TrainConfig:
    """The generalist's schedule with the specialists' overrides (0 / -1: inherit)."""
    s, t = cfg.specialists, cfg.train
    return dataclasses.replace(t, epochs=s.epochs or t.epochs, batch_size=s.batch_size or t.batch_size,
                               lr=s.lr or t.lr, patience=t.patience if s.patience < 0 else s.patience,
                               schedule=s.schedule or t.schedule)


@dataclass
class SpecialistResult:
    model: nn.Module  # head: its k classes in `classes` order, then the dustbin; correction not applied
    classes: list[int]
    dustbin_correction: float  # add to the dustbin logit at inference
    special_fraction: float  # realised special share of each epoch (f)
    natural_fraction: float  # special share of the training split (pi)
    train: TrainResult
    metrics: dict


def train_specialist(generalist: nn.Module, data: SpecialistData, val: Split, cfg: RunConfig, *,
                     device: torch.device | str = "cpu", progress: bool = False,
                     desc: str = "specialist") -> SpecialistResult:
    """Train specialist data.plan.m from its data (`specialist_data`); the generalist is not modified.

    val: the whole validation split (its own slice, the conditional accuracy
    and the dustbin's calibration are measured on it).
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    s, plan = cfg.specialists, data.plan
    classes = plan.classes
    cls = torch.tensor(classes, dtype=torch.long)
    k = len(classes)

    seed_everything(plan.seed)  # the widened units' fresh weights
    model = with_dustbin_head(generalist, classes, widen=s.widen)
    correction = dustbin_correction(plan.fraction, plan.natural_fraction)
    prior_shift = correction if s.dustbin_correction == "prior" else 0.0
    stored_correction = 0.0 if s.dustbin_correction == "none" else correction

    train_x = model.encode(data.train.inputs)  # (n, ...) its rows only
    train_y = collapse_labels(torch.from_numpy(data.train.labels), cls).numpy()  # (n,) in 0..k
    val_x = model.encode(val.take(plan.val_slice).inputs)
    val_y = collapse_labels(torch.from_numpy(val.labels[plan.val_slice]), cls).numpy()
    teacher = torch.from_numpy(data.teacher)  # (n, k+1) collapsed, at T=1

    def sample(epoch: int, rng: np.random.Generator) -> np.ndarray:
        return np.array(plan.orders[epoch - 1])  # drawn by plan_specialist with this same rng

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor, index: np.ndarray) -> dict:
        targets = soften_collapsed(teacher[torch.from_numpy(index)], s.temperature, prior_shift)
        parts = distillation_loss(logits, labels, targets.to(logits.device), s.temperature, s.soft_weight)
        return {"loss": parts.loss, "hard_loss": parts.hard_loss.detach(), "soft_loss": parts.soft_loss.detach()}

    schedule = dataclasses.replace(specialist_train_config(cfg), epochs=len(plan.orders))  # as planned
    result = train_model(model, train_x, train_y, val_x, val_y, schedule, seed=plan.seed,
                         device=device, sample=sample, loss_fn=loss_fn, desc=desc, progress=progress,
                         lr_key="specialists.lr" if s.lr else "train.lr", max_examples=plan.max_examples)

    metrics = {
        "classes": k,
        "best_val_accuracy": result.best_val_accuracy,  # own slice, argmax over k + 1 (uncorrected)
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "examples_seen": result.examples_seen,
        "special_fraction": plan.fraction,
        "natural_fraction": plan.natural_fraction,
        "dustbin_correction": stored_correction,
    }
    eval_batch = cfg.train.eval_batch_size
    for split, inside, general in (("val", val.take(plan.val_inside), data.val_scores),
                                   ("test", data.test, data.test_scores)):
        logits = predict_logits(model, model.encode(inside.inputs), eval_batch, device)
        acc, n = conditional_accuracy(logits[:, :k], inside.labels, classes)
        general_acc, _ = conditional_accuracy(general, inside.labels, classes)
        metrics.update({f"{split}_examples": n, f"{split}_conditional_accuracy": acc,
                        f"generalist_{split}_conditional_accuracy": general_acc})
    # How well the dustbin is calibrated on natural (not enriched) data: the mean predicted dustbin
    # probability, raw and corrected, against the true share of other classes.
    logits = torch.from_numpy(np.concatenate([b for _, b in _logits_by_batch(model, val.inputs, eval_batch, device)]))
    metrics["val_dustbin_share"] = float(1 - np.isin(val.labels, classes).mean())
    metrics["val_dustbin_prob_raw"] = float(torch.softmax(logits, 1)[:, -1].mean())
    metrics["val_dustbin_prob_corrected"] = float(torch.softmax(dustbin_corrected(logits, correction), 1)[:, -1].mean())
    # The prior a combiner gated by the generalist's top-1 class meets instead: among validation examples
    # whose generalist top-1 is one of these classes, the share that truly are one (add-one smoothed).
    share = (data.val_active_inside + 1) / (data.val_active + 2)
    metrics["active_special_share_top1"] = float(share)
    metrics["dustbin_correction_active_top1"] = dustbin_correction(plan.fraction, float(share))
    metrics["seconds"] = round(time.perf_counter() - started, 3)
    metrics["cpu_seconds"] = round(time.process_time() - cpu_started, 3)  # this process's CPU time, all threads
    return SpecialistResult(model, classes, stored_correction, plan.fraction, plan.natural_fraction,
                            result, metrics)


# ---------------------------------------------------------------------------
# the run directory: clusters.json in, specialists/<m>/ out


def specialist_dir(run: RunDir, m: int) -> Path:
    return run.specialists / str(m)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_groups(run: RunDir, class_names: list[str], n_outputs: int) -> list[list[int]]:
    """The groups of `clusters.json`, checked against the run's classes and the generalist's head.

    n_outputs: the generalist's number of output classes. Raises RunDirError
    naming the first mismatch. A group may hold every class (a data set with
    fewer classes than `cluster.classes_per_cluster`); it gets no specialist.
    """
    run.require(run.clusters, what="cluster")
    clusters = read_json(run.clusters)
    where = f"{run.clusters}"
    redo = "; re-cluster (delete it and run with --resume) or point at the run it belongs to"
    n = len(class_names)
    if n_outputs != n:
        raise RunDirError(f"{run.generalist}: the generalist has {n_outputs} outputs but the run has {n} classes")
    if not isinstance(clusters, dict) or not isinstance(clusters.get("groups"), list):
        raise RunDirError(f"{where}: expected an object with a 'groups' list (see cluster.clusters_to_json)")
    if clusters.get("n_classes") != n:
        raise RunDirError(f"{where}: n_classes={clusters.get('n_classes')!r} but the generalist has {n} classes{redo}")
    if not clusters["groups"]:
        raise RunDirError(f"{where}: no groups, so there is no specialist to train{redo}")
    groups = []
    for m, group in enumerate(clusters["groups"]):
        members = group.get("classes") if isinstance(group, dict) else None
        if not isinstance(members, list) or not members or not all(isinstance(c, int) for c in members):
            raise RunDirError(f"{where}: group {m} must have a non-empty 'classes' list of class ids")
        bad = [c for c in members if not 0 <= c < n]
        if bad:
            raise RunDirError(f"{where}: group {m} lists class {bad[0]}, but the generalist has {n} classes "
                              f"(0..{n - 1}){redo}")
        if len(set(members)) != len(members):
            raise RunDirError(f"{where}: group {m} lists a class twice: {members}")
        names, expected = group.get("names"), [class_names[c] for c in members]
        if names is not None and names != expected:
            raise RunDirError(f"{where}: group {m} names its classes {names[:5]}, the run calls them "
                              f"{expected[:5]}{redo}")
        groups.append([int(c) for c in members])
    return groups


def save_specialist(folder: Path, model: nn.Module, info: dict, history: list[dict]) -> None:
    """Weights, training curve, then `specialist.json` last (atomic writes; a kill leaves it absent)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPECIALIST_FILE).unlink(missing_ok=True)  # the folder is unfinished until it is rewritten
    save_checkpoint(model, folder, extra={"specialist": {k: info[k] for k in ("classes", "dustbin_correction")}})
    write_json(folder / "history.json", history)
    # the weights' hash, so a resume can tell these weights from a file damaged or replaced since
    write_json(folder / SPECIALIST_FILE, {**info, "weights_sha256": file_sha256(folder / "model.safetensors")})


def finished_specialist(folder: Path, classes: list[int], generalist_sha256: str) -> dict | None:
    """The folder's `specialist.json` if it is a finished, intact specialist over `classes` of this generalist.

    Intact: its files parse, and the weights hash to the `weights_sha256` that
    `specialist.json` recorded (a folder from before that field must load as
    a checkpoint instead). Anything else is None: `--resume` retrains it.
    """
    try:
        info = read_json(folder / SPECIALIST_FILE)
        read_json(folder / "history.json")
        read_json(folder / "model.json")
    except RunDirError:
        return None
    if (not isinstance(info, dict) or not (folder / "model.safetensors").is_file() or info.get("classes") != classes
            or info.get("generalist_sha256") != generalist_sha256):
        return None
    if "weights_sha256" in info:
        return info if file_sha256(folder / "model.safetensors") == info["weights_sha256"] else None
    try:
        load_checkpoint(folder)
    except CheckpointError:
        return None
    return info


def _check_info(info, folder: Path, n_classes: int | None) -> None:
    """The fields of specialist.json a combiner uses: classes, the dustbin corrections."""
    where = folder / SPECIALIST_FILE
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: expected a JSON object")
    classes = info.get("classes")
    if (not isinstance(classes, list) or not classes
            or not all(isinstance(c, int) and not isinstance(c, bool) for c in classes)):
        raise CheckpointError(f"{where}: 'classes' must be a non-empty list of class ids, got {classes!r:.80}")
    if len(set(classes)) != len(classes):
        raise CheckpointError(f"{where}: 'classes' lists a class twice")
    if n_classes is not None:
        bad = [c for c in classes if not 0 <= c < n_classes]
        if bad or len(classes) >= n_classes:
            why = f"class {bad[0]}" if bad else f"all {len(classes)} classes"
            raise CheckpointError(f"{where}: 'classes' holds {why}, but the run has {n_classes} classes "
                                  f"(0..{n_classes - 1}) and a specialist covers fewer than all")
    for key in ("dustbin_correction", "dustbin_correction_active_top1"):
        value = info.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CheckpointError(f"{where}: {key!r} must be a finite number, got {value!r}")


def load_specialist(folder: str | Path, device: torch.device | str = "cpu", *, n_classes: int | None = None,
                    generalist_sha256: str | None = None) -> tuple[nn.Module, dict]:
    """(model, info): info is `specialist.json` (classes, names, dustbin_correction, metrics, ...).

    The model's logits are (N, k+1) over info["classes"] then the dustbin,
    uncorrected: use `dustbin_corrected(logits, info["dustbin_correction"])`.
    n_classes: the run's class count, to check the classes against;
    generalist_sha256: the run's generalist weights, which the specialist must
    have been trained from (its `generalist_sha256`).
    """
    folder = Path(folder)
    if not (folder / SPECIALIST_FILE).is_file():
        raise CheckpointError(f"{folder} is not a finished specialist (no {SPECIALIST_FILE})")
    try:
        info = read_json(folder / SPECIALIST_FILE)
    except RunDirError as err:
        raise CheckpointError(str(err)) from None
    _check_info(info, folder, n_classes)
    if generalist_sha256 is not None and info.get("generalist_sha256") != generalist_sha256:
        raise CheckpointError(f"{folder} was trained from another generalist (its generalist_sha256 "
                              f"{str(info.get('generalist_sha256'))[:12]!r} is not this run's "
                              f"{generalist_sha256[:12]!r}); delete it and run with --resume to retrain it")
    model = load_checkpoint(folder, device)
    if model.head.out_features != len(info["classes"]) + 1:
        raise CheckpointError(f"{folder}: the head has {model.head.out_features} outputs, "
                              f"{SPECIALIST_FILE} lists {len(info['classes'])} classes + a dustbin")
    return model, info


def specialists_summary(entries: list[dict], trained: list[int], skipped: list[int] = ()) -> dict:
    """The `specialists` section of metrics.json from every specialist's metrics (id order).

    skipped: ids of groups that hold every class, so have no specialist.
    """

    def pooled(key: str, split: str) -> float:
        n = sum(e[f"{split}_examples"] for e in entries)
        hits = sum(e[key] * e[f"{split}_examples"] for e in entries if e[f"{split}_examples"])
        return hits / n if n else float("nan")

    summary = {
        "count": len(entries),
        "trained": len(trained),  # in this invocation; the others were finished already (--resume)
        "examples_seen": sum(e["examples_seen"] for e in entries),  # all specialists' forward+backward passes
        "seconds": round(sum(e["seconds"] for e in entries), 3),  # summed task time, not wall time
        "cpu_seconds": round(sum(e.get("cpu_seconds", 0.0) for e in entries), 3),
        "skipped_groups": list(skipped),  # they hold every class: no dustbin to learn, the generalist covers them
    }
    for split in ("val", "test"):
        summary[f"{split}_conditional_accuracy"] = pooled(f"{split}_conditional_accuracy", split)
        summary[f"generalist_{split}_conditional_accuracy"] = pooled(f"generalist_{split}_conditional_accuracy", split)
    summary["improved_on_val"] = sum(e["val_conditional_accuracy"] > e["generalist_val_conditional_accuracy"]
                                     for e in entries)
    summary["per_specialist"] = entries
    return summary


def specialists_done(run: RunDir) -> bool:
    """Whether every group of clusters.json has a finished specialist of the current generalist (for --resume)."""
    metrics = run.read_metrics().get("specialists", {})
    if "count" not in metrics or not run.clusters.is_file() or not (run.generalist / "model.safetensors").is_file():
        return False
    clusters = read_json(run.clusters)
    groups = [g.get("classes") for g in clusters.get("groups", [])]
    trainable = [m for m, group in enumerate(groups) if len(group) < clusters.get("n_classes", 0)]
    sha = file_sha256(run.generalist / "model.safetensors")
    return metrics["count"] == len(trainable) and all(
        finished_specialist(specialist_dir(run, m), groups[m], sha) is not None for m in trainable)


def model_from_arrays(spec: dict, state: dict[str, np.ndarray]) -> nn.Module:
    """Rebuild a model shipped as its spec and numpy weights (e.g. through Ray's object store)."""
    model = create_model(spec["name"], **spec["kwargs"])
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return model


def model_to_arrays(model: nn.Module) -> tuple[dict, dict[str, np.ndarray]]:
    return model.spec, {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
