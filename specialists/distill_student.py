"""The student of `specialists distill`: its training on cached or fresh soft targets, and per-cluster targets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from .config import TrainConfig
from .data import take_inputs
from .distill import DistillError, distillation_loss
from .train import TrainResult, train_model
from .transfer import Augmenter, TransferSet


def train_student(student: nn.Module, transfer: TransferSet, soft: torch.Tensor, val_inputs, val_labels: np.ndarray,
                  cfg: TrainConfig, *, temperature: float, soft_weight: float, seed: int, device="cpu",
                  desc: str = "student", progress: bool = True, cluster: "ClusterTargets | None" = None,
                  cluster_weight: float = 0.0, fresh: "FreshCopies | None" = None) -> TrainResult:
    """Train `student` in place on `transfer` against cached soft targets; it ends at its best validation epoch.

    soft: (N, C) teacher probabilities at `temperature`, row i for transfer example i.
    The loss is `soft_weight * T^2 CE(soft, student at T) + (1 - soft_weight) CE(labels,
    student)` on a labelled transfer set, the soft term alone on an unlabeled one;
    with `cluster` and cluster_weight > 0, plus cluster_weight * T^2 CE(specialist's
    distribution over its classes, student's over the same classes, at T).
    """
    n_out = student.head.out_features
    if soft.ndim != 2 or soft.shape[0] != len(transfer):
        raise DistillError(f"soft targets have shape {tuple(soft.shape)}; the transfer set has {len(transfer)} examples")
    if n_out != soft.shape[1]:
        raise DistillError(f"the student predicts {n_out} classes but the teacher {soft.shape[1]}: "
                           f"build the student with n_classes={soft.shape[1]}")
    labelled = transfer.labelled
    soft = soft.float()
    use_cluster = cluster is not None and cluster_weight > 0
    if use_cluster and fresh is not None:
        raise DistillError("per-cluster targets are cached per transfer row; fresh copies are drawn anew")

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor, index: np.ndarray) -> dict:
        rows = torch.from_numpy(np.asarray(index))
        targets = soft[rows] if fresh is None else fresh.targets(index, soft)  # (B, C)
        targets = targets.to(logits.device)
        parts = distillation_loss(logits, labels if labelled else None, targets, temperature, soft_weight)
        out = {"loss": parts.loss, "hard_loss": parts.hard_loss.detach(), "soft_loss": parts.soft_loss.detach()}
        if use_cluster:
            term = cluster.loss(logits, rows, temperature)
            out["loss"] = out["loss"] + cluster_weight * term
            out["cluster_loss"] = term.detach()
        return out

    # train_model indexes a label per row; an unlabeled set's placeholders never reach the loss
    labels = np.where(transfer.labels >= 0, transfer.labels, 0)
    inputs = student.encode(transfer.inputs) if fresh is None else fresh
    return train_model(student, inputs, labels, student.encode(val_inputs), val_labels, cfg,
                       seed=seed, device=device, loss_fn=loss_fn, desc=desc, progress=progress)


class FreshCopies:
    """A transfer set's augmented rows drawn anew each time a batch holds them, and labelled there.

    Consistent teaching (Beyer et al., 2022, "Knowledge distillation: a good
    teacher is patient and consistent"): the student and the teacher see the
    same input, and over the epochs the student meets many more inputs than a
    fixed set of copies holds. It stands in for the encoded inputs of
    `train.train_model` (`batch`); the loss then takes the batch's targets
    from `targets`. Plain rows keep their cached targets.

    teacher: raw inputs -> (R, C) the teacher's probabilities at the student's T.
    """

    def __init__(self, transfer: TransferSet, augmenter: Augmenter, plain_rows: np.ndarray,
                 teacher: Callable[[object], torch.Tensor], encode: Callable, seed: int):
        self.transfer, self.augmenter, self.plain_rows = transfer, augmenter, plain_rows
        self.teacher, self.encode = teacher, encode
        self.rng = np.random.default_rng([seed, 104_729])  # its own stream, the same for every student of a grid
        self.drawn = 0  # augmented inputs drawn and labelled so far
        self._last: tuple[np.ndarray, np.ndarray, torch.Tensor] | None = None

    def batch(self, index: np.ndarray, device) -> tuple[torch.Tensor, ...]:
        index = np.asarray(index)
        inputs = take_inputs(self.transfer.inputs, index)
        rows = np.flatnonzero(self.transfer.augmented[index])  # positions in the batch
        targets = None
        if len(rows):
            drawn = self.augmenter.draw(self.plain_rows[index[rows]], self.rng)
            if isinstance(inputs, list):
                for r, text in zip(rows, drawn):
                    inputs[r] = text
            else:  # rows of an array are a copy already
                inputs[rows] = drawn
            targets = self.teacher(drawn).float()
            self.drawn += len(rows)
        self._last = (index, rows, targets)
        return self.encode(inputs).batch(np.arange(len(index)), device)

    def targets(self, index: np.ndarray, soft: torch.Tensor) -> torch.Tensor:
        """(B, C) the targets of the batch `batch` drew last: the teacher's on its fresh rows, `soft`'s on the rest."""
        last, rows, fresh = self._last
        if not np.array_equal(last, index):
            raise DistillError("FreshCopies.targets: asked for another batch than the one drawn last")
        targets = soft[torch.from_numpy(np.asarray(index))].clone()
        if fresh is not None:
            targets[torch.from_numpy(rows)] = fresh
        return targets


@dataclass
class ClusterTargets:
    """Per-cluster targets: for each transfer row, one specialist's log-probabilities over its own classes.

    classes: (N, K) long class ids (K the largest cluster; padding 0); logp: (N, K)
    the specialist's log-probabilities renormalised over its classes (the dustbin
    left out); mask: (N, K) bool, False on padding and on rows no specialist covers.
    """

    classes: torch.Tensor
    logp: torch.Tensor
    mask: torch.Tensor

    def loss(self, logits: torch.Tensor, rows: torch.Tensor, temperature: float) -> torch.Tensor:
        """T^2 CE(specialist at T, student restricted to the same classes at T), mean over covered rows."""
        mask = self.mask[rows].to(logits.device)  # (B, K)
        covered = mask.any(1)
        if not covered.any():
            return logits.sum() * 0.0
        classes, logp = self.classes[rows].to(logits.device), self.logp[rows].to(logits.device)
        z = (logits.gather(1, classes) / temperature).masked_fill(~mask, -1e9)
        target = torch.softmax((logp / temperature).masked_fill(~mask, -1e9), dim=1)
        ce = -(target * torch.log_softmax(z, dim=1)).masked_fill(~mask, 0.0).sum(1)
        return ce[covered].mean() * temperature ** 2


def cluster_targets(model, inputs, rows_class: np.ndarray, batch_size: int = 1024) -> ClusterTargets:
    """ClusterTargets from a loaded run (`ensemble.SpecialistsModel`) on `inputs`.

    rows_class: (N,) the class that picks each row's specialist (its label, or the
    teacher's top class): the first specialist whose classes contain it.
    """
    _, special = model.outputs(inputs, batch_size)  # per specialist (N, k_m + 1), dustbin last
    classes = [np.asarray(info["classes"]) for _, info in model.specialists]
    width = max((len(c) for c in classes), default=1)
    n = len(rows_class)
    ids = torch.zeros(n, width, dtype=torch.long)
    logp = torch.zeros(n, width)
    mask = torch.zeros(n, width, dtype=torch.bool)
    owner = np.full(n, -1)
    for m, cls in enumerate(classes):
        rows = np.flatnonzero((owner < 0) & np.isin(rows_class, cls))
        owner[rows] = m
        if not len(rows):
            continue
        p = torch.from_numpy(special[m][rows, :-1]).double().clamp_min(1e-12)  # (R, k) dustbin left out
        p = p / p.sum(1, keepdim=True)
        ids[rows, :len(cls)] = torch.from_numpy(cls).long()
        logp[rows, :len(cls)] = torch.log(p).float()
        mask[rows, :len(cls)] = True
    return ClusterTargets(ids, logp, mask)
